//! Usage reporting: the windows of GPU usage a host spools and uploads to the collector
//! (`POST /v1/reports`), and the collector's acknowledgement.

use serde::{Deserialize, Serialize};

use super::NumericDate;

/// How a window's operations were estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimationMethod {
    /// GPM tensor-pipe activity × peak tensor FLOP/s (Hopper+).
    GpmTensor,
    /// SM utilisation × peak tensor FLOP/s: an upper bound.
    UtilizationUpperBound,
    /// Some GPU in the window has no known peak FLOP/s, or neither GPM nor utilization could
    /// be read for it (e.g. MIG without GPM): `estimated_ops` counts only what could be
    /// estimated, so it is a lower bound.
    Unknown,
}

/// GPU usage of one (tenant, workload) over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageWindow {
    /// Tenant (`sub`), or absent for unattributed usage.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Workload id (`kind:id`).
    pub workload: String,
    /// Whether the tenant is a foreign person (from its attestation).
    #[serde(default)]
    pub foreign_person: bool,
    /// Window start.
    pub start: NumericDate,
    /// Window end (exclusive).
    pub end: NumericDate,
    /// GPU-seconds of use.
    pub gpu_seconds: f64,
    /// Distinct GPUs used.
    pub gpus: u32,
    /// Most GPUs used at the same time (one sample) within the window.
    #[serde(default)]
    pub max_concurrent_gpus: u32,
    /// Estimated operations.
    pub estimated_ops: f64,
    /// Peak FLOP/s capacity of the GPUs used (for cluster-capacity aggregation).
    pub peak_flops: f64,
    /// How operations were estimated.
    pub method: EstimationMethod,
    /// The agent's local training heuristic fired in this window (enough GPUs busy enough for
    /// long enough); a hint for the collector, which decides findings from the totals.
    #[serde(default)]
    pub training_like: bool,
    /// How many original windows were merged into this one (1 unless the spool neared its cap).
    #[serde(default = "one")]
    pub merged_windows: u32,
}

fn one() -> u32 {
    1
}

/// One spooled record: a usage window and its sequence number on its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Strictly increasing per host, never reused; ingest is idempotent on (host_id, seq).
    pub seq: u64,
    /// For a record merged from several spooled windows (the spool near its size cap): it
    /// stands for every sequence number `seq..=last_seq`, which the collector counts as
    /// received. Absent for an ordinary record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// The window.
    pub window: UsageWindow,
}

/// The collector's answer to `POST /v1/reports` (200): every record of the host with
/// `seq <= acked_seq` is stored (sequence numbers start at 1; 0 = none yet). The agent
/// advances its durable cursor to it, and only then deletes spooled records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportAck {
    /// Highest contiguous stored sequence number of the host.
    pub acked_seq: u64,
}

/// A batch of records uploaded to `POST /v1/reports`: the request body is this JSON,
/// gzip-compressed (`Content-Encoding: gzip`), and `X-Kycd-Signature` carries a detached
/// JWS over the exact body bytes (`typ` [`crate::REPORT_SIGNATURE_TYP`], `kid` = the
/// host id), signed with the host's Ed25519 key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportBatch {
    /// Reporting host.
    pub host_id: String,
    /// When the batch was sent.
    pub sent_at: NumericDate,
    /// Records in increasing `seq` order.
    pub records: Vec<UsageRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_window_new_fields_default_for_old_senders() {
        let old = serde_json::json!({
            "tenant": "t", "workload": "host:host", "start": 0, "end": 60, "gpu_seconds": 60.0,
            "gpus": 1, "estimated_ops": 1.0, "peak_flops": 1.0, "method": "gpm_tensor"
        });
        let w: UsageWindow = serde_json::from_value(old).unwrap();
        assert_eq!((w.max_concurrent_gpus, w.training_like, w.merged_windows), (0, false, 1));
        let wire = serde_json::to_value(EstimationMethod::Unknown).unwrap();
        assert_eq!(wire, serde_json::json!("unknown"));
    }
}
