//! What both backends share about their schema: the rule that picks the migrations a
//! database still needs, and how stored values are read back (counts, keys, sequence
//! numbers) and bounded (failure details). The SQL itself differs by dialect and lives with
//! each backend ([`super::sqlite`], [`super::postgres`]).

use kycd_protocol::{HostStatementClaims, PublicKey};

use crate::statements::PollOutcome;

use super::error::StoreError;

/// The migrations (1-based version, SQL) a database at schema `version` still needs to reach
/// `target`, in order; empty when it is there already. A database written by a newer
/// collector (a version above `migrations.len()`) is refused, never downgraded.
pub(crate) fn pending_migrations<'m>(
    migrations: &[&'m str],
    version: i64,
    target: usize,
) -> Result<Vec<(usize, &'m str)>, StoreError> {
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    if version > supported {
        return Err(StoreError::SchemaTooNew { found: version, supported });
    }
    let applied = usize::try_from(version).unwrap_or(0);
    Ok(migrations.iter().enumerate().take(target).skip(applied).map(|(i, sql)| (i + 1, *sql)).collect())
}

/// A stored count as `u32`: negative (corrupt) reads as 0, too large saturates. Counts the
/// backends read back (GPUs, hosts, failures) are bounded far below either limit.
pub(crate) fn count_u32(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

/// Longest stored poll failure detail: an error chain is useful, a hostile agent's novel is not.
pub const MAX_DETAIL: usize = 1024;

/// `detail` cut to [`MAX_DETAIL`] bytes at a character boundary.
pub(crate) fn truncate_detail(detail: &str) -> &str {
    if detail.len() <= MAX_DETAIL {
        return detail;
    }
    let mut end = MAX_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    &detail[..end]
}

/// A stored public key (JWK JSON) of `host_id`; one that no longer parses is corrupt data.
pub(crate) fn parse_key(host_id: &str, jwk: &str) -> Result<PublicKey, StoreError> {
    PublicKey::from_jwk_json(jwk.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("stored key of host {host_id:?}: {e}")))
}

/// A stored sequence number: negative ones are corrupt.
pub(crate) fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative sequence number {value} stored")))
}

/// A [`StoreError::Corrupt`] naming `what` could not be read back.
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A verified statement's claims as stored (`poll_latest.claims_json`).
pub(crate) fn statement_json(claims: &HostStatementClaims) -> Result<String, StoreError> {
    serde_json::to_string(claims)
        .map_err(|e| StoreError::Corrupt(format!("statement claims do not serialize: {e}")))
}

/// A stored statement (`poll_latest.claims_json`) of `host_id` read back.
pub(crate) fn parse_statement(host_id: &str, json: &str) -> Result<HostStatementClaims, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("stored statement of host {host_id:?}: {e}")))
}

/// How a poll attempt is stored in `poll_status` and `poll_history`.
#[derive(Debug)]
pub(crate) struct StoredOutcome<'a> {
    /// Whether the statement verified.
    pub ok: bool,
    /// `ok`, or the failure kind.
    pub kind: &'a str,
    /// The token's digest for an Ok (the token itself is kept in `poll_latest`), else the
    /// failure detail cut to [`MAX_DETAIL`].
    pub detail: String,
    /// `kind: detail` of a failure.
    pub last_error: Option<String>,
}

/// The stored columns of a poll `outcome`.
pub(crate) fn stored_outcome(outcome: &PollOutcome) -> StoredOutcome<'_> {
    let (ok, kind, detail) = match outcome {
        PollOutcome::Ok { token, .. } => (true, "ok", kycd_protocol::token_digest(token.as_bytes())),
        PollOutcome::Failed { kind, detail } => (false, kind.as_str(), truncate_detail(detail).to_owned()),
    };
    let last_error = (!ok).then(|| format!("{kind}: {detail}"));
    StoredOutcome { ok, kind, detail, last_error }
}

/// The columns both backends read a finding from, in [`StoredFinding`]'s order.
pub(crate) const FINDING_COLUMNS: &str = "id, kind, subject, tenant, host_id, foreign_person, summary,
    evidence_json, state, raised_at, resolved_at, due_at, acknowledged_by, acknowledged_at, filed_reference,
    filed_by, filed_at, dismissed_reason, dismissed_by, dismissed_at";

/// A finding's row as both backends read it ([`FINDING_COLUMNS`]), before decoding.
#[derive(Debug)]
pub(crate) struct StoredFinding {
    pub id: i64,
    pub kind: String,
    pub subject: String,
    pub tenant: Option<String>,
    pub host_id: Option<String>,
    pub foreign_person: Option<bool>,
    pub summary: String,
    pub evidence_json: String,
    pub state: String,
    pub raised_at: i64,
    pub resolved_at: Option<i64>,
    pub due_at: Option<i64>,
    pub acknowledged: (Option<String>, Option<i64>),
    pub filed: (Option<String>, Option<String>, Option<i64>),
    pub dismissed: (Option<String>, Option<String>, Option<i64>),
}

impl StoredFinding {
    /// Decodes kind, state and evidence (typed errors for corrupt values) and the lifecycle
    /// columns (a step is recorded only when all its columns are).
    pub(crate) fn decode(self) -> Result<crate::fleet::Finding, StoreError> {
        use crate::fleet::{
            Acknowledgement, Dismissal, Filing, Finding, FindingKind, FindingState, NewFinding,
        };
        let kind =
            FindingKind::parse(&self.kind).ok_or_else(|| corrupt("stored finding kind", &self.kind))?;
        let state =
            FindingState::parse(&self.state).ok_or_else(|| corrupt("stored finding state", &self.state))?;
        let evidence =
            serde_json::from_str(&self.evidence_json).map_err(|e| corrupt("stored finding evidence", e))?;
        let acknowledged = match self.acknowledged {
            (Some(by), Some(at)) => Some(Acknowledgement { by, at }),
            _ => None,
        };
        let filed = match self.filed {
            (Some(reference), Some(by), Some(at)) => Some(Filing { reference, by, at }),
            _ => None,
        };
        let dismissed = match self.dismissed {
            (Some(reason), Some(by), Some(at)) => Some(Dismissal { reason, by, at }),
            _ => None,
        };
        Ok(Finding {
            id: self.id,
            finding: NewFinding {
                kind,
                subject: self.subject,
                tenant: self.tenant,
                host_id: self.host_id,
                foreign_person: self.foreign_person,
                summary: self.summary,
                evidence,
                due_at: self.due_at,
            },
            state,
            raised_at: self.raised_at,
            resolved_at: self.resolved_at,
            acknowledged,
            filed,
            dismissed,
        })
    }
}

/// The lifecycle columns an action sets: (column of the actor, of the time, of the text).
pub(crate) fn action_columns(
    action: &crate::fleet::FindingAction,
) -> (&'static str, &'static str, Option<(&'static str, &str)>) {
    use crate::fleet::FindingAction;
    match action {
        FindingAction::Acknowledge => ("acknowledged_by", "acknowledged_at", None),
        FindingAction::File { reference } => {
            ("filed_by", "filed_at", Some(("filed_reference", reference.as_str())))
        }
        FindingAction::Dismiss { reason } => {
            ("dismissed_by", "dismissed_at", Some(("dismissed_reason", reason.as_str())))
        }
    }
}
