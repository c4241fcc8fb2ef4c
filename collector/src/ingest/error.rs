//! [`IngestError`]: why an upload was refused or not stored, with the `kind` the HTTP
//! error body carries and whether the refusal is recorded.

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
