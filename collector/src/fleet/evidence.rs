//! The stored windows a finding quotes as its evidence.

use serde::{Deserialize, Serialize};

/// One stored window, as evidence for a finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowEvidence {
    /// Reporting host.
    pub host_id: String,
    /// The host's enrollment epoch it was reported in.
    pub epoch: u64,
    /// Its sequence number there (in that epoch).
    pub seq: u64,
    /// Window start.
    pub start: i64,
    /// Window end.
    pub end: i64,
    /// Lower bound of operations.
    pub ops_lower: f64,
    /// Estimated operations (point estimate).
    pub estimated_ops: f64,
    /// Upper bound of operations.
    pub ops_upper: f64,
    /// GPU-seconds shared with another workload without isolation.
    pub shared_gpu_seconds: f64,
    /// GPU-seconds a VM held passed-through GPUs while its guest sent no telemetry.
    pub guest_gap_gpu_seconds: f64,
    /// Peak FLOP/s capacity.
    pub peak_flops: f64,
    /// GPUs used.
    pub gpus: u32,
    /// Estimation method.
    pub method: String,
}
