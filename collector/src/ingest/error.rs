//! [`IngestError`]: why an upload was refused or not stored, with the `kind` the HTTP
//! error body carries and whether the refusal is recorded; [`WindowError`]: which bound of
//! a usage window a record broke (the `reason` of [`IngestError::InvalidRecord`]).

use crate::store::error::StoreError;
#[cfg(doc)]
use crate::store::reports::Rejection;

/// Why an upload was rejected. [`IngestError::kind`] is the `kind` of the JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The signature header is missing, malformed, or does not verify with the host's key.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// The signing `kid` names no enrolled host.
    #[error("host {0:?} is not enrolled")]
    UnknownHost(String),
    /// The body is not gzip (`Content-Encoding` is not `gzip`).
    #[error("Content-Encoding must be gzip")]
    UnsupportedEncoding,
    /// The body, compressed or decompressed, or the record count, exceeds a limit.
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit in force.
        limit: usize,
    },
    /// Not gzip, not strict JSON, or not a report batch.
    #[error("malformed report: {0}")]
    Malformed(String),
    /// The batch's `host_id` is not the signing host.
    #[error("batch host_id {batch:?} is not the signing host {kid:?}")]
    HostMismatch {
        /// The signer.
        kid: String,
        /// The batch's `host_id`.
        batch: String,
    },
    /// A record is invalid; nothing of the batch was stored.
    #[error("record {index} (seq {seq}): {reason}")]
    InvalidRecord {
        /// Index in the batch.
        index: usize,
        /// Its seq.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A window ends after the receive time plus the allowed skew, by at most
    /// [`super::MAX_CLOCK_AHEAD_RETRY_S`]: the sender's clock runs ahead. Retryable (503 with
    /// `Retry-After`); nothing was stored.
    #[error("record {index} (seq {seq}): end {end} is {ahead} s past the receive time plus the allowed clock skew; retry later")]
    ClockAhead {
        /// Index in the batch.
        index: usize,
        /// Its seq.
        seq: u64,
        /// The window's end.
        end: i64,
        /// Seconds past the receive time plus the skew.
        ahead: i64,
    },
    /// A storage failure (including [`StoreError::SeqConflict`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IngestError {
    /// Stable machine name, the `kind` of the error body.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::BadSignature(_) => "BadSignature",
            IngestError::UnknownHost(_) => "UnknownHost",
            IngestError::UnsupportedEncoding => "UnsupportedEncoding",
            IngestError::TooLarge { .. } => "TooLarge",
            IngestError::Malformed(_) => "Malformed",
            IngestError::HostMismatch { .. } => "HostMismatch",
            IngestError::InvalidRecord { .. } => "InvalidRecord",
            IngestError::ClockAhead { .. } => "ClockAhead",
            IngestError::Store(StoreError::SeqConflict { .. }) => "SeqConflict",
            IngestError::Store(e) if e.is_transient() => "Unavailable",
            IngestError::Store(_) => "Internal",
        }
    }

    /// Seconds the sender should wait before sending again, for a retryable error that knows
    /// (a window ahead of the collector's clock: until it is no longer ahead).
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            IngestError::ClockAhead { ahead, .. } => Some(u64::try_from(*ahead).unwrap_or(0).clamp(5, 3600)),
            _ => None,
        }
    }

    /// Whether this refusal of an authenticated batch is permanent (the agent sets the batch
    /// aside and does not send it again), so it is recorded as a [`Rejection`]. `TooLarge`
    /// is not: the agent halves the batch and sends it again.
    pub fn is_recorded_refusal(&self) -> bool {
        matches!(self.kind(), "Malformed" | "HostMismatch" | "InvalidRecord" | "SeqConflict")
    }
}

/// Why a usage window is refused ([`super::check_window`]). The message starts with the
/// field it is about, so an operator reading the agent's `rejected/` note knows what to look
/// at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WindowError {
    /// An identifier (workload, tenant) is empty, too long or has control characters.
    #[error("{field} {reason}")]
    Id {
        /// `workload` or `tenant`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The window starts before the Unix epoch.
    #[error("start must be >= 0")]
    NegativeStart,
    /// The window does not end after its start.
    #[error("end must be after start")]
    EndNotAfterStart,
    /// The window is longer than [`super::MAX_WINDOW_S`].
    #[error("window longer than {max_s} s")]
    TooLong {
        /// The limit.
        max_s: i64,
    },
    /// The window ends after the receive time plus the allowed clock skew.
    #[error("end {end} is more than {skew_s} s after the receive time {received_at}")]
    EndAhead {
        /// The window's end.
        end: i64,
        /// The allowed skew.
        skew_s: i64,
        /// The receive time.
        received_at: i64,
    },
    /// The window starts too long before its epoch's enrollment.
    #[error("start {start} is more than {allowed_s} s before the host's enrollment at {enrolled_at}")]
    StartBeforeEnrollment {
        /// The window's start.
        start: i64,
        /// How long before enrollment a window may start.
        allowed_s: i64,
        /// When the epoch began.
        enrolled_at: i64,
    },
    /// An amount is NaN, infinite or negative.
    #[error("{field} must be a finite number >= 0")]
    NotAnAmount {
        /// The field.
        field: &'static str,
    },
    /// `merged_windows` is 0.
    #[error("merged_windows must be >= 1")]
    NoMergedWindows,
    /// `peak_flops` is above [`super::MAX_PEAK_FLOPS_PER_GPU`] per GPU.
    #[error("peak_flops {peak_flops:e} exceeds {per_gpu:e} FLOP/s per GPU for {gpus} GPUs")]
    PeakTooHigh {
        /// The claimed peak.
        peak_flops: f64,
        /// The per-GPU cap.
        per_gpu: f64,
        /// The window's GPUs.
        gpus: f64,
    },
    /// The bounds of the operations do not enclose the point estimate:
    /// `ops_lower ≤ estimated_ops ≤ ops_upper` does not hold (beyond float rounding).
    #[error(
        "ops_lower {ops_lower:e} <= estimated_ops {estimated_ops:e} <= ops_upper {ops_upper:e} does not hold"
    )]
    BoundsOutOfOrder {
        /// The lower bound (the estimate when absent).
        ops_lower: f64,
        /// The point estimate.
        estimated_ops: f64,
        /// The upper bound (the estimate when absent).
        ops_upper: f64,
    },
    /// An operation figure (`estimated_ops` or `ops_upper`) is above what the window's GPUs
    /// can do at their fastest precision over its length.
    #[error(
        "{field} {ops:e} exceeds peak_flops × duration × {per_peak} ({peak_flops:e} FLOP/s × ({duration_s} s × {tolerance} + {slack_s} s) × {per_peak} = {max_ops:e})"
    )]
    OpsAbovePeak {
        /// `estimated_ops` or `ops_upper`.
        field: &'static str,
        /// Its value.
        ops: f64,
        /// The window's peak.
        peak_flops: f64,
        /// The window's length.
        duration_s: i64,
        /// [`super::RATE_TOLERANCE`].
        tolerance: f64,
        /// [`super::TICK_SLACK_S`].
        slack_s: f64,
        /// [`kycd_protocol::MAX_OPS_PER_PEAK`].
        per_peak: f64,
        /// The bound.
        max_ops: f64,
    },
    /// More GPU-seconds than the window's GPUs over its length.
    #[error(
        "gpu_seconds {gpu_seconds} exceeds gpus × duration ({gpus} × {duration_s} s × {tolerance} + {slack_s} s = {max})"
    )]
    GpuSecondsAboveDuration {
        /// The claimed GPU-seconds.
        gpu_seconds: f64,
        /// The window's GPUs.
        gpus: f64,
        /// The window's length.
        duration_s: i64,
        /// [`super::RATE_TOLERANCE`].
        tolerance: f64,
        /// [`super::TICK_SLACK_S`].
        slack_s: f64,
        /// The bound.
        max: f64,
    },
    /// More shared GPU-seconds than GPU-seconds (beyond float rounding).
    #[error("shared_gpu_seconds {shared_gpu_seconds} exceeds gpu_seconds {gpu_seconds}")]
    SharedAboveGpuSeconds {
        /// The claimed shared GPU-seconds.
        shared_gpu_seconds: f64,
        /// The window's GPU-seconds.
        gpu_seconds: f64,
    },
    /// The three-valued foreign status contradicts the window's other fields: a tenant's
    /// window says `foreign_person` one way and `foreign_status` the other, or a window
    /// without a tenant claims a known status (only an attestation can establish one).
    #[error("foreign_status {status} contradicts {what}")]
    ForeignStatusContradiction {
        /// The status sent.
        status: &'static str,
        /// What it contradicts.
        what: &'static str,
    },
    /// More GPU-seconds with a VM's guest silent than GPU-seconds (beyond float rounding).
    #[error("guest_gap_gpu_seconds {guest_gap_gpu_seconds} exceeds gpu_seconds {gpu_seconds}")]
    GuestGapAboveGpuSeconds {
        /// The claimed GPU-seconds without guest telemetry.
        guest_gap_gpu_seconds: f64,
        /// The window's GPU-seconds.
        gpu_seconds: f64,
    },
}
