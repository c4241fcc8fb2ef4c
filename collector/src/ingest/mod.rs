//! The ingest pipeline of `POST /v1/reports`, as one synchronous function the HTTP handler
//! runs on the blocking pool (and the benchmark calls directly):
//!
//! 1. **Authenticate first.** The `kid` of the detached JWS in `X-Kycd-Signature` names the
//!    host; its enrolled key (and only that key) must verify the signature over the exact,
//!    still-compressed body. Unauthenticated bytes never reach the gzip decoder or the JSON
//!    parser, so an anonymous client cannot make the collector inflate or parse anything.
//! 2. **Decompress with a cap** ([`Limits::max_decompressed_bytes`]): a zip bomb from a
//!    compromised host stops at the cap.
//! 3. **Parse strictly** (duplicate keys, types, trailing data: [`parse_batch`]) into a
//!    [`ReportBatch`] whose `host_id` must equal the signing `kid`.
//! 4. **Validate every record** before storing any: one bad record rejects the batch. Besides
//!    its shape, every number of a window is bounded ([`check_window`]): a window ends no
//!    later than the receive time plus [`Limits::max_clock_skew_s`] and starts no earlier
//!    than its epoch's enrollment minus [`Limits::max_pre_enrollment_s`]; amounts are finite
//!    and not negative; `peak_flops` is at most [`MAX_PEAK_FLOPS_PER_GPU`] per GPU;
//!    `ops_lower ≤ estimated_ops ≤ ops_upper` (within [`SUM_TOLERANCE`]; absent bounds are
//!    the estimate); `estimated_ops` and `ops_upper` at most `peak_flops ×`
//!    [`kycd_protocol::MAX_OPS_PER_PEAK`] and `gpu_seconds` at most the GPUs over the
//!    window's length (with [`RATE_TOLERANCE`] and [`TICK_SLACK_S`]), `shared_gpu_seconds`
//!    and `guest_gap_gpu_seconds` each at most `gpu_seconds` ([`WindowError`] names the
//!    bound broken). So no host can make a total infinite or a filing period reach years
//!    away, whatever it sends.
//! 5. **Store in one transaction**, idempotently on `(host_id, epoch, seq)`, and answer the
//!    acked seq of `(host_id, epoch)`. The epoch is that of the enrolled key that verified
//!    the signature ([`crate::store`]): a re-imaged host, re-enrolled with a new key, numbers
//!    its records from 1 again without colliding with its old records.
//!
//! A batch that passed step 1 and is then refused for good (`Malformed`, `HostMismatch`,
//! `InvalidRecord`, `SeqConflict`: the agent sets it aside and never sends it again) is
//! recorded ([`crate::store::Rejection`]) so that the loss shows at the collector as a
//! `report_rejected` finding. Unauthenticated requests are never recorded: they would let
//! anyone fill the table.
//!
//! Layout: [`validate`] (step 4 and the limits), [`error`] ([`IngestError`]); this file runs the
//! pipeline.

use std::io::Read as _;
use std::sync::Arc;

use kycd_protocol::{b64, Jwks, ReportAck, ReportBatch, REPORT_SIGNATURE_TYP};
use serde::Deserialize;

use crate::store::reports::{Enrollment, Rejection, ReportStore};

pub mod counters;
pub mod error;
pub mod validate;

pub use counters::IngestCounters;
pub use error::{IngestError, WindowError};
pub use validate::{
    check_window, validate_batch, Admission, Limits, DEFAULT_MAX_CLOCK_SKEW_S, DEFAULT_MAX_PRE_ENROLLMENT_S,
    MAX_CLOCK_AHEAD_RETRY_S, MAX_ID_LEN, MAX_PEAK_FLOPS_PER_GPU, MAX_SIGNATURE_BYTES, MAX_WINDOW_S,
    RATE_TOLERANCE, SUM_TOLERANCE, TICK_SLACK_S,
};

/// A stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// The answer.
    pub ack: ReportAck,
    /// Records in the batch (stored now or before).
    pub records: usize,
    /// The enrollment epoch it was stored under.
    pub epoch: u64,
}

/// The first and last sequence numbers a batch covers (`None` for an empty batch).
fn batch_seqs(batch: &ReportBatch) -> Option<(u64, u64)> {
    let first = batch.records.iter().map(|r| r.seq).min()?;
    let last = batch.records.iter().map(|r| r.last_seq.unwrap_or(r.seq).max(r.seq)).max()?;
    Some((first, last))
}

/// The ingest pipeline over one store.
#[derive(Debug, Clone)]
pub struct Ingestor {
    store: Arc<dyn ReportStore>,
    limits: Limits,
    /// What `POST /v1/reports` answered since start (`/metrics`).
    counters: Arc<IngestCounters>,
}

#[derive(Deserialize)]
struct KidOnly {
    kid: String,
}

/// The `kid` a detached JWS claims (unauthenticated: only used to pick the key to verify
/// with). `None` when the header cannot be read.
pub fn claimed_kid(signature: &[u8]) -> Option<String> {
    let header = signature.split(|&b| b == b'.').next()?;
    if header.len() > kycd_protocol::MAX_HEADER_BYTES * 4 / 3 + 4 {
        return None;
    }
    let bytes = b64::decode(header).ok()?;
    serde_json::from_slice::<KidOnly>(&bytes).ok().map(|h| h.kid)
}

/// Parses a decompressed body as a [`ReportBatch`], strictly: straight into the typed
/// structs, whose derived deserializers refuse a duplicate key (`{"seq":1,"seq":9}` cannot
/// mean different things to different readers), a missing field, a wrong type and trailing
/// data; serde_json's recursion limit bounds nesting. Unknown fields are ignored (a newer
/// agent may add some) and are not stored: `body_json` is the re-serialized record. Typed
/// parsing is several times faster than `kycd_protocol::json::parse_strict` into a `Value`
/// and then into the types, with the same duplicate-key guarantee for every field read.
pub fn parse_batch(json: &[u8]) -> Result<ReportBatch, IngestError> {
    serde_json::from_slice(json).map_err(|e| IngestError::Malformed(e.to_string()))
}

/// Inflates a gzip body, refusing to produce more than `limit` bytes.
pub fn gunzip_capped(body: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(8).min(limit));
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::MultiGzDecoder::new(body)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::Malformed(format!("body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge { what: "decompressed body", limit });
    }
    Ok(out)
}

impl Ingestor {
    /// A pipeline over `store` with `limits`.
    pub fn new(store: Arc<dyn ReportStore>, limits: Limits) -> Self {
        Ingestor { store, limits, counters: Arc::default() }
    }

    /// The ingest endpoint's counters (kept by the HTTP handler, read by `/metrics`).
    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ReportStore> {
        &self.store
    }

    /// Runs the whole pipeline over one upload: `signature` is the `X-Kycd-Signature`
    /// value, `body` the exact (gzip) request body, `now` the receive time (Unix seconds).
    /// Blocking: call it off the async reactor.
    pub fn ingest(&self, signature: &[u8], body: &[u8], now: i64) -> Result<Ingested, IngestError> {
        if body.len() > self.limits.max_body_bytes {
            return Err(IngestError::TooLarge { what: "body", limit: self.limits.max_body_bytes });
        }
        if signature.len() > MAX_SIGNATURE_BYTES {
            return Err(IngestError::BadSignature("signature header too large".into()));
        }
        let kid = claimed_kid(signature)
            .ok_or_else(|| IngestError::BadSignature("no readable kid in the signature header".into()))?;
        let enrollment = self.store.enrollment(&kid)?.ok_or_else(|| IngestError::UnknownHost(kid.clone()))?;
        let jwks = Jwks::from_keys([enrollment.public_key.clone()])
            .map_err(|e| IngestError::BadSignature(e.to_string()))?;
        let header = kycd_protocol::verify_detached(signature, body, &jwks, REPORT_SIGNATURE_TYP)
            .map_err(|e| IngestError::BadSignature(format!("{}: {e}", e.kind())))?;
        if header.alg != kycd_protocol::Algorithm::EdDSA {
            return Err(IngestError::BadSignature("host reports must be signed with EdDSA".into()));
        }
        // Authenticated: from here on a permanent refusal is recorded.
        let mut seqs = None;
        let result = self.ingest_authenticated(&header.kid, &enrollment, body, now, &mut seqs);
        if let Err(e) = &result {
            if e.is_recorded_refusal() {
                let rejection = Rejection {
                    host_id: header.kid.clone(),
                    epoch: enrollment.epoch,
                    kind: e.kind().to_owned(),
                    detail: e.to_string(),
                    seqs,
                    rejected_at: now,
                };
                if let Err(store) = self.store.record_rejection(&rejection) {
                    tracing::warn!(host = %header.kid, epoch = enrollment.epoch, kind = e.kind(), error = %store,
                        "cannot record a rejected batch");
                }
            }
        }
        result
    }

    /// Steps 2 to 5 for a batch whose signature verified with `enrollment`'s key; `seqs` is
    /// set to the batch's seq range once it parses.
    fn ingest_authenticated(
        &self,
        host_id: &str,
        enrollment: &Enrollment,
        body: &[u8],
        now: i64,
        seqs: &mut Option<(u64, u64)>,
    ) -> Result<Ingested, IngestError> {
        let json = gunzip_capped(body, self.limits.max_decompressed_bytes)?;
        let batch = parse_batch(&json)?;
        *seqs = batch_seqs(&batch);
        if batch.host_id != host_id {
            return Err(IngestError::HostMismatch { kid: host_id.to_owned(), batch: batch.host_id });
        }
        let admission = Admission { received_at: now, enrolled_at: enrollment.enrolled_at };
        let records = validate_batch(batch, &self.limits, admission)?;
        let acked_seq = self.store.insert_batch(host_id, enrollment.epoch, &records, now)?;
        Ok(Ingested { ack: ReportAck { acked_seq }, records: records.len(), epoch: enrollment.epoch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gunzip_is_capped() {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![b'a'; 1000]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip_capped(&gz, 1000).unwrap().len(), 1000);
        assert!(matches!(gunzip_capped(&gz, 999), Err(IngestError::TooLarge { .. })));
        assert!(matches!(gunzip_capped(b"{\"not\": \"gzip\"}", 1000), Err(IngestError::Malformed(_))));
    }

    #[test]
    fn claimed_kid_reads_the_unverified_header() {
        let key = kycd_protocol::PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "host-9").unwrap();
        let sig = kycd_protocol::sign_detached(b"x", REPORT_SIGNATURE_TYP, &key);
        assert_eq!(claimed_kid(sig.as_bytes()).as_deref(), Some("host-9"));
        assert_eq!(claimed_kid(b"garbage..x"), None);
    }
}
