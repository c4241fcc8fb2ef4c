//! The lifecycle of a finding a provider may have to file: `open → acknowledged →
//! filed(reference, by, at)` or `dismissed(reason, by, at)`, each step taken by a named
//! actor (an operator at the command line, or the name of the API token used) and recorded in
//! the collector's hash-chained audit log in the same transaction as the state change.
//!
//! Threshold findings ([`FindingKind::is_threshold`]) never close on their own: a crossed
//! threshold is a fact that needs a filing (or a recorded decision not to file), not a state
//! that a raised threshold or a pruned window can undo. The other kinds are conditions and
//! resolve when they stop holding, from any state; their acknowledgement or dismissal stays
//! recorded on the resolved finding.

use serde::{Deserialize, Serialize};

use super::{FindingKind, FindingState};
use crate::store::error::StoreError;

/// Longest actor name, filing reference or dismissal reason, in bytes.
pub const MAX_ACTION_TEXT: usize = 512;

/// Who acknowledged a finding, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    /// The actor.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
}

/// The filing a finding was reported in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filing {
    /// The filing's reference (the regulator's acknowledgement number, a case id, …).
    pub reference: String,
    /// The actor.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
}

/// Why a finding needs no filing, who decided, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dismissal {
    /// The reason.
    pub reason: String,
    /// The actor.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
}

/// An operator's step on a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum FindingAction {
    /// Seen and being worked on.
    Acknowledge,
    /// Reported, under `reference`.
    File {
        /// The filing's reference.
        reference: String,
    },
    /// Needs no filing, because of `reason`.
    Dismiss {
        /// Why.
        reason: String,
    },
}

impl FindingAction {
    /// The action's name in the audit log and the API path.
    pub fn name(&self) -> &'static str {
        match self {
            FindingAction::Acknowledge => "acknowledge",
            FindingAction::File { .. } => "file",
            FindingAction::Dismiss { .. } => "dismiss",
        }
    }

    /// The state a finding in `from` moves to, or why it cannot.
    pub fn transition(&self, id: i64, from: FindingState) -> Result<FindingState, StoreError> {
        let to = match self {
            FindingAction::Acknowledge => FindingState::Acknowledged,
            FindingAction::File { .. } => FindingState::Filed,
            FindingAction::Dismiss { .. } => FindingState::Dismissed,
        };
        let allowed = match self {
            FindingAction::Acknowledge => from == FindingState::Open,
            FindingAction::File { .. } | FindingAction::Dismiss { .. } => {
                matches!(from, FindingState::Open | FindingState::Acknowledged)
            }
        };
        if allowed {
            Ok(to)
        } else {
            Err(StoreError::InvalidTransition { id, from: from.as_str(), action: self.name() })
        }
    }

    /// Checks the action's text and the actor: non-empty after trimming, at most
    /// [`MAX_ACTION_TEXT`] bytes, no control characters (they would forge lines in a listing).
    pub fn validate(&self, actor: &str) -> Result<(), StoreError> {
        check_text("actor", actor)?;
        match self {
            FindingAction::Acknowledge => Ok(()),
            FindingAction::File { reference } => check_text("reference", reference),
            FindingAction::Dismiss { reason } => check_text("reason", reason),
        }
    }

    /// The audit log's event for this action on finding `id` (of `kind`, about `subject`),
    /// moving it from `from` to `to`.
    pub fn audit_event(
        &self,
        id: i64,
        kind: FindingKind,
        subject: &str,
        from: FindingState,
        to: FindingState,
        actor: &str,
    ) -> serde_json::Value {
        let mut event = serde_json::json!({
            "type": format!("finding_{}", match self {
                FindingAction::Acknowledge => "acknowledged",
                FindingAction::File { .. } => "filed",
                FindingAction::Dismiss { .. } => "dismissed",
            }),
            "finding_id": id,
            "kind": kind.as_str(),
            "subject": subject,
            "from": from.as_str(),
            "to": to.as_str(),
            "by": actor,
        });
        if let Some(map) = event.as_object_mut() {
            match self {
                FindingAction::Acknowledge => {}
                FindingAction::File { reference } => {
                    map.insert("reference".into(), reference.clone().into());
                }
                FindingAction::Dismiss { reason } => {
                    map.insert("reason".into(), reason.clone().into());
                }
            }
        }
        event
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), StoreError> {
    let problem = if value.trim().is_empty() {
        "must not be empty"
    } else if value.len() > MAX_ACTION_TEXT {
        "is too long"
    } else if value.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidAction(format!("{field} {problem} (at most {MAX_ACTION_TEXT} bytes of text)")))
}

/// One record of the collector's audit log as stored: its line (the agent's record format,
/// [`kycd_protocol::audit_chain`]) and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Sequence number, from 0.
    pub seq: u64,
    /// The record's line (without `\n`).
    pub line: String,
    /// Its hash, as stored.
    pub hash: String,
}

/// Longest collector audit record line, in bytes.
pub const MAX_AUDIT_RECORD: usize = 64 << 10;

/// The next record after `last` ((seq, hash) of the newest stored record, none for an empty
/// log): (seq, line without `\n`, hash).
pub fn next_audit_record(
    last: Option<(u64, String)>,
    ts: i64,
    event: &serde_json::Value,
) -> Result<(u64, String, String), StoreError> {
    let (seq, prev) = match last {
        Some((seq, hash)) => {
            (seq.checked_add(1).ok_or_else(|| StoreError::Corrupt("audit seq exhausted".into()))?, hash)
        }
        None => (0, kycd_protocol::audit_chain::GENESIS_PREV.to_owned()),
    };
    let (mut line, hash) = kycd_protocol::audit_chain::encode_record(seq, ts, &prev, event, MAX_AUDIT_RECORD)
        .map_err(|e| StoreError::InvalidAction(e.to_string()))?;
    line.pop();
    let line = String::from_utf8(line).map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
    Ok((seq, line, hash))
}

/// What [`verify_audit_log`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditVerification {
    /// Records checked.
    pub records: u64,
    /// Hash of the newest record (the chain's head), none for an empty log.
    pub head: Option<String>,
}

/// Checks a log read in order: every line canonical, `seq` from 0 without gaps, each `prev`
/// the hash of the record before, and each stored hash the line's hash. Any break is
/// [`StoreError::AuditBroken`] naming the record.
pub fn verify_audit_log(rows: impl IntoIterator<Item = AuditRow>) -> Result<AuditVerification, StoreError> {
    use kycd_protocol::audit_chain::{check_link, line_hash, parse_record, GENESIS_PREV};
    let mut last: Option<(u64, String)> = None;
    let mut records = 0u64;
    for row in rows {
        let broken = |reason: String| StoreError::AuditBroken { seq: row.seq, reason };
        let link = parse_record(row.line.as_bytes()).map_err(|e| broken(e.reason))?;
        if link.seq != row.seq {
            return Err(broken(format!("line says seq {}", link.seq)));
        }
        match &last {
            None if link.seq != 0 || link.prev != GENESIS_PREV => {
                return Err(broken("the first record is not seq 0 after the genesis hash".into()))
            }
            None => {}
            Some((seq, hash)) => check_link(&link, *seq, hash).map_err(broken)?,
        }
        let hash = line_hash(row.line.as_bytes());
        if hash != row.hash {
            return Err(broken("stored hash does not match the line".into()));
        }
        last = Some((link.seq, hash));
        records += 1;
    }
    Ok(AuditVerification { records, head: last.map(|(_, h)| h) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_texts() {
        use FindingState::*;
        let file = FindingAction::File { reference: "BIS-1".into() };
        assert_eq!(FindingAction::Acknowledge.transition(1, Open).unwrap(), Acknowledged);
        assert_eq!(file.transition(1, Open).unwrap(), Filed);
        assert_eq!(file.transition(1, Acknowledged).unwrap(), Filed);
        for from in [Acknowledged, Filed, Dismissed, Resolved] {
            assert!(matches!(
                FindingAction::Acknowledge.transition(7, from),
                Err(StoreError::InvalidTransition { id: 7, .. })
            ));
        }
        for from in [Filed, Dismissed, Resolved] {
            assert!(file.transition(1, from).is_err());
        }
        assert!(file.validate("alice").is_ok());
        assert!(FindingAction::File { reference: " ".into() }.validate("alice").is_err());
        assert!(FindingAction::Dismiss { reason: "a\nb".into() }.validate("alice").is_err());
        assert!(FindingAction::Acknowledge.validate("").is_err());
        assert!(FindingAction::Acknowledge.validate(&"x".repeat(MAX_ACTION_TEXT + 1)).is_err());
    }

    #[test]
    fn the_audit_log_chains_and_any_edit_breaks_it() {
        let mut rows = Vec::new();
        let mut last = None;
        for i in 0..3 {
            let (seq, line, hash) =
                next_audit_record(last.clone(), 100 + i, &serde_json::json!({"i": i})).unwrap();
            last = Some((seq, hash.clone()));
            rows.push(AuditRow { seq, line, hash });
        }
        let ok = verify_audit_log(rows.clone()).unwrap();
        assert_eq!((ok.records, ok.head.as_deref()), (3, Some(rows[2].hash.as_str())));
        let mut edited = rows.clone();
        edited[1].line = edited[1].line.replace("\"i\":1", "\"i\":9");
        assert!(matches!(verify_audit_log(edited), Err(StoreError::AuditBroken { seq: 1, .. })));
        let mut dropped = rows.clone();
        dropped.remove(1);
        assert!(matches!(verify_audit_log(dropped), Err(StoreError::AuditBroken { seq: 2, .. })));
        assert!(matches!(verify_audit_log(rows[1..].to_vec()), Err(StoreError::AuditBroken { seq: 1, .. })));
    }
}
