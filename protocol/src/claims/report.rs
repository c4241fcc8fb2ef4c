//! Usage reporting: the windows of GPU usage a host spools and uploads to the collector
//! (`POST /v1/reports`), and the collector's acknowledgement.

use serde::{Deserialize, Serialize};

use super::{ForeignStatus, NumericDate};

/// How a window's operations were estimated (docs/estimates.md has the method in full).
///
/// A window carries the weakest method of any GPU-interval in it, in this order (weakest
/// first): `unknown`, `allocation`, `guest_reported`, `utilization_upper_bound`,
/// `shared_split`, `gpm_tensor`, `gpm_pipes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimationMethod {
    /// Every GPM pipe (HMMA, IMMA, DFMA tensor; FP64, FP32, FP16 CUDA cores) × its
    /// per-precision peak × SM clock ÷ max SM clock (Hopper+, one workload on the GPU or MIG
    /// instance). Point estimate: BF16 on HMMA; bounds: slowest and fastest precision per pipe.
    GpmPipes,
    /// GPM "any tensor pipe" activity × peak dense BF16 tensor FLOP/s, without the per-pipe
    /// breakdown: what older agents reported (not clock-scaled, CUDA-core work not counted)
    /// and how a trace recorded by one replays (clock-scaled, bounds from the tensor
    /// precisions).
    GpmTensor,
    /// The GPU was shared by several workloads without isolation (no MIG instance each,
    /// compute mode not exclusive): device-wide counters cannot be split, so the point
    /// estimate is the device's split by SM-utilization share, the lower bound 0 and the
    /// upper bound the whole device's.
    SharedSplit,
    /// SM utilisation × peak (no GPM, pre-Hopper), clock-scaled: an upper bound (any kernel
    /// counts as busy); the lower bound is 0.
    UtilizationUpperBound,
    /// GPUs passed through to a VM (bound to `vfio-pci`): the host's driver cannot see them,
    /// so only the allocation is known. GPU-seconds are the time held, the upper bound is
    /// the GPUs' fastest-precision peak × that time, the lower bound and the point estimate
    /// are 0.
    Allocation,
    /// GPUs passed through to a VM whose guest reports its own measurement (`kycd guest` over
    /// the `org.kycd.telemetry.0` channel). The guest is the tenant's: the host books the
    /// guest's latest rate over its own clock, capped at the GPUs' fastest peak, only for GPUs
    /// the domain holds. Point estimate and lower bound are the guest's (so untrusted); the
    /// upper bound stays the allocation.
    GuestReported,
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
    /// The tenant's status in three values (`unknown` for unattributed usage). Absent from
    /// older agents' windows: read it through [`UsageWindow::foreign_status`], which
    /// derives it from `tenant` and `foreign_person`. Absent stays absent when re-serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_status: Option<ForeignStatus>,
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
    /// Estimated operations: the point estimate (BF16-equivalent on the HMMA pipe).
    pub estimated_ops: f64,
    /// Fewest operations the measured activity allows (each pipe at its slowest precision;
    /// 0 for a shared GPU or without GPM). Absent from older agents: read it through
    /// [`UsageWindow::lower_ops`], which falls back to `estimated_ops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_lower: Option<f64>,
    /// Most operations the measured activity allows (each pipe at its fastest precision:
    /// FP8 on Hopper's HMMA, FP4 on Blackwell's, INT8 on IMMA; the whole device for a shared
    /// GPU). Absent from older agents: read it through [`UsageWindow::upper_ops`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_upper: Option<f64>,
    /// GPU-seconds in which this workload shared a GPU (or MIG instance) with another
    /// workload without isolation, so its operations could not be attributed to it alone.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_gpu_seconds: f64,
    /// GPU-seconds in which this workload (a VM) held passed-through GPUs while its guest sent
    /// no telemetry (`guest_telemetry_gap`): for those seconds only the allocation is known.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guest_gap_gpu_seconds: f64,
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

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// No window's operations, point or upper bound, exceed its `peak_flops` (the summed dense
/// BF16 tensor peak of its GPUs) × its length × this. The fastest precision any GPU has is 4×
/// its BF16 rate (FP4 on Blackwell); HMMA, IMMA, DFMA and the CUDA-core pipes are counted side
/// by side and, together, are at most 1× more at full activity on every GPU in the peak table.
pub const MAX_OPS_PER_PEAK: f64 = 5.0;

impl UsageWindow {
    /// The tenant's foreign status: as sent, or for an older agent's window derived from
    /// `tenant` and `foreign_person` (no tenant: `unknown`).
    pub fn foreign_status(&self) -> ForeignStatus {
        self.foreign_status.unwrap_or(match self.tenant {
            None => ForeignStatus::Unknown,
            Some(_) => ForeignStatus::from_flag(self.foreign_person),
        })
    }

    /// Whether the window's tenant counts as foreign for thresholds and filings: its status
    /// is anything but `us` (an `unknown` one counts as foreign). False for a window without a
    /// tenant, whose usage is aggregated apart (and there always treated as foreign).
    pub fn tenant_counts_as_foreign(&self) -> bool {
        self.tenant.is_some() && self.foreign_status() != ForeignStatus::Us
    }

    /// The lower bound of operations; `estimated_ops` for a window from an agent that did
    /// not send bounds.
    pub fn lower_ops(&self) -> f64 {
        self.ops_lower.unwrap_or(self.estimated_ops)
    }

    /// The upper bound of operations; `estimated_ops` for a window from an agent that did
    /// not send bounds.
    pub fn upper_ops(&self) -> f64 {
        self.ops_upper.unwrap_or(self.estimated_ops)
    }
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
    fn foreign_status_derives_for_old_windows_and_round_trips() {
        let base = serde_json::json!({
            "workload": "cgroup:/x", "start": 0, "end": 60, "gpu_seconds": 1.0,
            "gpus": 1, "estimated_ops": 1.0, "peak_flops": 1.0, "method": "unknown"
        });
        let cases = [
            (serde_json::json!({}), ForeignStatus::Unknown),
            (serde_json::json!({"tenant": "t", "foreign_person": true}), ForeignStatus::Foreign),
            (serde_json::json!({"tenant": "t", "foreign_person": false}), ForeignStatus::Us),
            (serde_json::json!({"tenant": "t", "foreign_status": "unknown"}), ForeignStatus::Unknown),
        ];
        for (extra, want) in cases {
            let mut v = base.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            let w: UsageWindow = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(w.foreign_status(), want, "{v}");
            let again = serde_json::to_value(&w).unwrap();
            assert_eq!(serde_json::from_value::<UsageWindow>(again).unwrap(), w);
        }
        let mut v = base.clone();
        v["foreign_status"] = serde_json::json!("maybe");
        assert!(serde_json::from_value::<UsageWindow>(v).is_err());
        let w = UsageWindow {
            foreign_status: Some(ForeignStatus::Foreign),
            ..serde_json::from_value(base).unwrap()
        };
        // A merge keeps the stricter status: foreign, then unknown, then U.S.
        use ForeignStatus::{Foreign, Unknown, Us};
        for (a, b, want) in
            [(Us, Us, Us), (Us, Unknown, Unknown), (Unknown, Foreign, Foreign), (Foreign, Us, Foreign)]
        {
            assert_eq!((a.merge(b), b.merge(a)), (want, want), "{a:?} {b:?}");
        }
        assert_eq!(serde_json::to_value(&w).unwrap()["foreign_status"], "foreign");
    }

    #[test]
    fn usage_window_new_fields_default_for_old_senders() {
        let old = serde_json::json!({
            "tenant": "t", "workload": "host:host", "start": 0, "end": 60, "gpu_seconds": 60.0,
            "gpus": 1, "estimated_ops": 1.0, "peak_flops": 1.0, "method": "gpm_tensor"
        });
        let w: UsageWindow = serde_json::from_value(old).unwrap();
        assert_eq!((w.max_concurrent_gpus, w.training_like, w.merged_windows), (0, false, 1));
        // Bounds of an old agent's window are its estimate; its method is kept.
        assert_eq!((w.ops_lower, w.ops_upper, w.shared_gpu_seconds), (None, None, 0.0));
        assert_eq!((w.lower_ops(), w.upper_ops(), w.method), (1.0, 1.0, EstimationMethod::GpmTensor));
        let again = serde_json::to_value(&w).unwrap();
        assert!(again.get("ops_lower").is_none() && again.get("shared_gpu_seconds").is_none(), "{again}");
        assert_eq!((w.foreign_status, w.foreign_status()), (None, ForeignStatus::Us));
        assert!(again.get("foreign_status").is_none(), "{again}");
        let wire = serde_json::to_value(EstimationMethod::Unknown).unwrap();
        assert_eq!(wire, serde_json::json!("unknown"));
    }
}
