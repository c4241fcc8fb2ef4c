//! What the agent writes into its audit log: one typed [`AuditEvent`] per kind of record.
//!
//! The log's format is fixed by the records already written (operators' tools, the
//! collector's exports and `kycctl audit verify` read them): the event is a JSON object with
//! a `type` tag and its keys in lexicographic order, as the agent has written them since
//! 0.1.0. [`AuditEvent::to_record`] produces exactly that (serde_json's map is ordered), so
//! a log keeps one byte format across releases; `agent/tests/audit_format.rs` checks it
//! against a log written by the 0.1.0 agent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::decision::Decision;

/// One audit record's event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The agent started (first record of every run).
    AgentStarted {
        /// Its version.
        version: String,
        /// This host's id.
        host_id: String,
        /// Audit or enforce.
        mode: Mode,
    },
    /// The agent stopped cleanly (last record of a run).
    AgentStopped,
    /// The first-seen file did not parse: grace periods count as over.
    FirstSeenCorrupt {
        /// What was wrong.
        reason: String,
    },
    /// A policy (newer, or first since start) is now in force.
    PolicyApplied {
        /// Its version.
        version: u64,
        /// SHA-256 of its canonical claims.
        claims_digest: String,
        /// SHA-256 of the token.
        token_digest: String,
        /// The signing key.
        kid: String,
        /// Where it came from (file path or fetch URL).
        source: String,
    },
    /// A policy lower than the one in force from the other source: not applied.
    PolicySuperseded {
        /// Its version.
        version: u64,
        /// The version in force.
        in_force: u64,
        /// Where it came from.
        source: String,
    },
    /// A policy was refused.
    PolicyRejected {
        /// The error kind.
        kind: String,
        /// Why.
        reason: String,
        /// Where it came from.
        source: String,
    },
    /// The policy in force lost its trust (its key was removed) and was dropped.
    PolicyWithdrawn {
        /// Its version, if one was in force.
        version: Option<u64>,
        /// The error kind.
        kind: String,
        /// Why.
        reason: String,
    },
    /// A fetched policy in force could not be kept in the state directory.
    PolicyFetchNotPersisted {
        /// Why.
        reason: String,
        /// The copy's path.
        source: PathBuf,
    },
    /// An attestation was verified and stored.
    AttestationAccepted {
        /// The workload it binds (as bound, before libvirt UUID resolution).
        workload: String,
        /// The tenant (`sub`).
        tenant: String,
        /// Its `jti`.
        jti: String,
        /// SHA-256 of the token.
        digest: String,
        /// Its expiry.
        exp: i64,
        /// The file it is kept in.
        source: PathBuf,
        /// `admission` when it came with an admission request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<String>,
    },
    /// An attestation (file or admission) was refused.
    AttestationRejected {
        /// The error kind.
        kind: String,
        /// Why.
        reason: String,
        /// The file, or `admission`.
        source: String,
        /// For an admission: the workload asking.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<String>,
    },
    /// An attestation stopped attesting (deleted, or no longer verifies).
    AttestationWithdrawn {
        /// The workload it bound.
        workload: String,
        /// The tenant.
        tenant: String,
        /// Its `jti`.
        jti: String,
        /// The file.
        source: PathBuf,
    },
    /// An input could not be read for want of resources or a failing disk; what it said
    /// before stays in force.
    InputReadFailed {
        /// The input.
        source: PathBuf,
        /// The error.
        error: String,
    },
    /// A workload left the host.
    WorkloadVanished {
        /// Its id.
        workload: String,
    },
    /// A decision changed; it is enforced only once this record is durable.
    Decision {
        /// The workload.
        workload: String,
        /// SHA-256 of the attestation in force (null: none).
        attestation_digest: Option<String>,
        /// Audit or enforce.
        mode: Mode,
        /// The decision.
        decision: Decision,
    },
    /// SIGHUP's configuration was not applied.
    ConfigReloadFailed {
        /// Why.
        reason: String,
    },
    /// A caller of the operator socket was refused.
    ApiRefused {
        /// Its uid (null: credentials unreadable).
        uid: Option<u32>,
        /// What it asked for.
        request: String,
    },
    /// A damaged spool region (or torn tail) was quarantined.
    SpoolDamaged {
        /// `corrupt` or `torn_tail`, …
        kind: String,
        /// The segment.
        segment: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// How many bytes.
        bytes: u64,
        /// Last good sequence number before it.
        seq_before: u64,
        /// First good sequence number after it.
        seq_after: Option<u64>,
        /// Where the bytes were kept.
        quarantined: PathBuf,
        /// When it was found.
        found_at: i64,
    },
    /// The collector refused a report batch for good.
    ReportBatchRejected {
        /// HTTP status.
        status: u16,
        /// The collector's error kind.
        kind: String,
        /// Its message.
        error: Option<String>,
        /// First record.
        first_seq: u64,
        /// Last record.
        last_seq: u64,
        /// How many records.
        records: u64,
        /// Where the batch was kept.
        file: PathBuf,
        /// When.
        rejected_at: i64,
    },
    /// A VM holding passed-through GPUs has sent no guest telemetry for the gap timeout: its
    /// usage is known only by allocation from now.
    GuestTelemetryGap {
        /// The libvirt domain.
        domain: String,
        /// `no_channel`, `never_reported` or `stopped`.
        reason: String,
        /// GPUs it holds.
        gpus: usize,
        /// When its last report was accepted (Unix ms), if ever.
        last_report_ms: Option<i64>,
    },
    /// A VM's guest telemetry covers all its GPUs again (or it holds none any more).
    GuestTelemetryResumed {
        /// The libvirt domain.
        domain: String,
        /// Still holding GPUs (false: the gap ended because the domain released them).
        holding: bool,
    },
}

impl AuditEvent {
    /// The event as the log stores it: a JSON object whose keys (`type` included) are in
    /// lexicographic order (see the module docs).
    pub fn to_record(&self) -> serde_json::Value {
        // Serializing these types cannot fail (no maps with non-string keys, no custom
        // serializers); Null would be refused by the log rather than written.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::AgentStarted { .. } => "agent_started",
            AuditEvent::AgentStopped => "agent_stopped",
            AuditEvent::FirstSeenCorrupt { .. } => "first_seen_corrupt",
            AuditEvent::PolicyApplied { .. } => "policy_applied",
            AuditEvent::PolicySuperseded { .. } => "policy_superseded",
            AuditEvent::PolicyRejected { .. } => "policy_rejected",
            AuditEvent::PolicyWithdrawn { .. } => "policy_withdrawn",
            AuditEvent::PolicyFetchNotPersisted { .. } => "policy_fetch_not_persisted",
            AuditEvent::AttestationAccepted { .. } => "attestation_accepted",
            AuditEvent::AttestationRejected { .. } => "attestation_rejected",
            AuditEvent::AttestationWithdrawn { .. } => "attestation_withdrawn",
            AuditEvent::InputReadFailed { .. } => "input_read_failed",
            AuditEvent::WorkloadVanished { .. } => "workload_vanished",
            AuditEvent::Decision { .. } => "decision",
            AuditEvent::ConfigReloadFailed { .. } => "config_reload_failed",
            AuditEvent::ApiRefused { .. } => "api_refused",
            AuditEvent::SpoolDamaged { .. } => "spool_damaged",
            AuditEvent::ReportBatchRejected { .. } => "report_batch_rejected",
            AuditEvent::GuestTelemetryGap { .. } => "guest_telemetry_gap",
            AuditEvent::GuestTelemetryResumed { .. } => "guest_telemetry_resumed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_tag_and_keys_in_lexicographic_order() {
        let event = AuditEvent::AttestationRejected {
            kind: "Malformed".into(),
            reason: "r".into(),
            source: "admission".into(),
            workload: None,
        };
        assert_eq!(
            event.to_record().to_string(),
            r#"{"kind":"Malformed","reason":"r","source":"admission","type":"attestation_rejected"}"#
        );
        assert_eq!(AuditEvent::AgentStopped.to_record().to_string(), r#"{"type":"agent_stopped"}"#);
        let kind = event.kind();
        assert_eq!(event.to_record()["type"], kind);
    }
}
