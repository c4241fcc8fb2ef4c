//! The uploader: spooled usage records to the collector, `POST {collector_url}/v1/reports`
//! ([`kycd_protocol::wire::collector::REPORTS`]).
//!
//! Each batch is the records from the cursor on (at most `batch_max_records`), as a
//! [`ReportBatch`] JSON, gzip-compressed, signed (`X-Kycd-Signature`, [`kycd_protocol::wire::SIGNATURE_HEADER`], a detached JWS over the
//! exact body with the host key, `kid` = host id). A batch is sent when `batch_max_records`
//! are pending or `batch_max_s` has passed since the last upload.
//!
//! Answers:
//! - **200** `{"acked_seq": N}`: the cursor moves to `N` durably and fully acknowledged
//!   segments are deleted ([`Spool::ack`]). When `N` is below the batch's last seq but not
//!   below the cursor, the rest is sent again (ingest is idempotent). When `N` is *below the
//!   cursor* — the collector's contiguous count is stuck under seqs this agent already
//!   settled (a batch it rejected, see below) — the 200 itself says the batch was stored, so
//!   the cursor moves to the batch's last seq (logged). The same when the batch starts above
//!   `cursor + 1` (records lost locally to a corrupt segment: nothing can close that gap).
//! - **400, 409, 413** (permanent; a 413 first halves the batch size, down to one record):
//!   the batch is written durably to `<state_dir>/rejected/<first>-<last>.json` (mode 0600)
//!   with the status, the collector's `{"error","kind"}` and the records, and the cursor is
//!   moved past it locally: the agent does not send it again. An operator can inspect and
//!   replay the file. Each rejection is made visible: an error log line,
//!   `kycd_upload_rejected_batches_total` / `_records_total`, the `rejected` line of
//!   `kycctl status` (counts, the last one's time, status and kind) and a
//!   `report_batch_rejected` audit record ([`Reporting::take_audit_events`](super::Reporting::take_audit_events)).
//! - **401** (unknown host, bad signature: the host may not be enrolled yet), **429/503**,
//!   other 5xx and network errors: retried with exponential backoff (base 1 s, full jitter,
//!   cap `backoff_max_s`); `Retry-After` (seconds) is honoured. 401 is logged at error level.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::backoff::{exponential, full_jitter};
use kycd_protocol::clock::Clock;
use kycd_protocol::wire::{collector::REPORTS, SIGNATURE_HEADER};
use kycd_protocol::{sign_detached, PrivateJwk, ReportAck, ReportBatch, UsageRecord, REPORT_SIGNATURE_TYP};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::rejected::{save_rejected, Rejection};
use super::spool::{covered, SharedSpool, Spool, SpoolError};

/// Most rejections kept for the audit log before the daemon takes them.
const MAX_UNRECORDED: usize = 1024;

/// Largest answer body read from the collector.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Backoff base.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// How the uploader runs (from `[reporting]`).
#[derive(Debug, Clone)]
pub struct UploaderOptions {
    /// Collector base URL.
    pub collector_url: String,
    /// Extra PEM CA file.
    pub ca_file: Option<PathBuf>,
    /// This host's id (the key's `kid`).
    pub host_id: String,
    /// Where permanently rejected batches are kept.
    pub rejected_dir: PathBuf,
    /// Most records per upload.
    pub batch_max_records: usize,
    /// Upload pending records at least this often.
    pub batch_max: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
}

impl UploaderOptions {
    /// From the configuration; `None` when `reporting.collector_url` is unset.
    pub fn from_config(config: &crate::config::Config, host_id: &str) -> Option<Self> {
        let r = &config.reporting;
        Some(UploaderOptions {
            collector_url: r.collector_url.clone()?,
            ca_file: r.ca_file.clone(),
            host_id: host_id.to_owned(),
            rejected_dir: config.state_dir.join("rejected"),
            batch_max_records: r.batch_max_records,
            batch_max: Duration::from_secs(r.batch_max_s),
            backoff_max: Duration::from_secs(r.backoff_max_s),
            connect_timeout: Duration::from_secs(r.connect_timeout_s),
            request_timeout: Duration::from_secs(r.request_timeout_s),
        })
    }
}

/// Why the uploader could not start.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The HTTPS client cannot be built (its CA file).
    #[error(transparent)]
    Client(#[from] crate::net::client::HttpClientError),
    /// The collector URL is not usable.
    #[error("reporting.collector_url {0:?} is not a valid URL")]
    Url(String),
}

/// Uploader counters (for logs and `/metrics`).
#[derive(Debug, Default)]
pub struct UploadCounters {
    /// Batches the collector stored (200).
    pub batches_ok: AtomicU64,
    /// Records sent in stored batches.
    pub records_ok: AtomicU64,
    /// Failed attempts that will be retried.
    pub retries: AtomicU64,
    /// Batches permanently rejected and moved to `rejected/`.
    pub batches_rejected: AtomicU64,
    /// Records in those batches.
    pub records_rejected: AtomicU64,
    /// Failed attempts and permanent rejections, by kind (`kycd_upload_failures_total`).
    pub failures: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// When a batch was last stored (Unix seconds; 0: never).
    pub last_success_at: std::sync::atomic::AtomicI64,
    /// The last permanent rejection (for `kycctl status`).
    pub last_rejection: std::sync::Mutex<Option<Rejection>>,
    /// Permanent rejections not yet taken for the audit log ([`Reporting::take_audit_events`](super::Reporting::take_audit_events)).
    pub unrecorded_rejections: std::sync::Mutex<Vec<Rejection>>,
    /// Batch files in `rejected/`: those found on start, plus one per new rejection.
    pub rejected_files: AtomicU64,
}

impl UploadCounters {
    fn failed(&self, kind: &'static str) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(kind).or_default() += 1;
        }
    }

    /// Counts a permanently rejected batch, saved in `rejected/` (`new_file`: not replacing
    /// an earlier file of the same name), and queues it for the audit log.
    pub(super) fn rejected(&self, rejection: Rejection, new_file: bool) {
        self.failed("rejected");
        self.batches_rejected.fetch_add(1, Relaxed);
        self.records_rejected.fetch_add(rejection.last_seq - rejection.first_seq + 1, Relaxed);
        if new_file {
            self.rejected_files.fetch_add(1, Relaxed);
        }
        if let Ok(mut last) = self.last_rejection.lock() {
            *last = Some(rejection.clone());
        }
        if let Ok(mut queue) = self.unrecorded_rejections.lock() {
            if queue.len() < MAX_UNRECORDED {
                queue.push(rejection);
            } else {
                warn!("too many rejected batches waiting for the audit log: this one is counted and logged only");
            }
        }
    }
}

/// Upload failure kinds (the `kind` label of `kycd_upload_failures_total`).
pub const FAILURE_KINDS: [&str; 7] =
    ["network", "unauthorized", "throttled", "http_error", "bad_answer", "rejected", "spool"];

/// The reports endpoint for a base URL.
pub fn reports_url(base: &str) -> Result<reqwest::Url, UploadError> {
    let joined = format!("{}{REPORTS}", base.trim_end_matches('/'));
    reqwest::Url::parse(&joined).map_err(|_| UploadError::Url(base.to_owned()))
}

/// The request body for `records`: gzip(JSON [`ReportBatch`]).
pub fn encode_body(host_id: &str, sent_at: i64, records: &[UsageRecord]) -> std::io::Result<Vec<u8>> {
    let batch = ReportBatch { host_id: host_id.to_owned(), sent_at, records: records.to_vec() };
    let json = serde_json::to_vec(&batch)?;
    let mut gz =
        flate2::write::GzEncoder::new(Vec::with_capacity(json.len() / 4), flate2::Compression::default());
    gz.write_all(&json)?;
    gz.finish()
}

/// Backoff before attempt `failures` (≥ 1): random in `[0, min(cap, base·2^(failures−1))]`.
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    full_jitter(exponential(BACKOFF_BASE, failures, cap))
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// What one attempt came to.
enum Outcome {
    /// 200: the collector's ack.
    Stored(u64),
    /// Permanent rejection (400/409/413) with the status and the collector's body.
    Rejected(u16, serde_json::Value),
    /// Try again after at least this long (Retry-After), or after the backoff; the failure
    /// kind (one of [`FAILURE_KINDS`]) and what happened.
    Retry(Option<Duration>, &'static str, String),
}

/// Runs the uploader until `shutdown`. `committed` is notified by the spool writer after
/// each commit. `clock` stamps batches (`sent_at`), successes and rejections; the waits
/// between attempts are tokio timers, so a paused tokio clock still drives them in tests.
#[allow(clippy::too_many_arguments)] // Each is one of the pipeline's shared parts.
pub async fn run(
    spool: SharedSpool,
    key: Arc<PrivateJwk>,
    options: UploaderOptions,
    client: reqwest::Client,
    committed: Arc<tokio::sync::Notify>,
    counters: Arc<UploadCounters>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    let url = match reports_url(&options.collector_url) {
        Ok(url) => url,
        Err(e) => {
            error!(error = %e, "uploads disabled");
            return;
        }
    };
    info!(%url, host_id = %options.host_id, "uploading usage reports");
    let mut limit = options.batch_max_records.max(1);
    let mut failures = 0u32;
    let mut last_upload = tokio::time::Instant::now();
    loop {
        let (pending, acked) = match with_spool(&spool, |s| Ok((s.pending(), s.acked_seq()))).await {
            Ok(v) => v,
            Err(e) => {
                error!(error = %e, "spool unavailable to the uploader");
                (0, 0)
            }
        };
        let due = pending > 0
            && (pending >= options.batch_max_records as u64 || last_upload.elapsed() >= options.batch_max);
        if !due {
            let wait = if pending > 0 {
                options.batch_max.saturating_sub(last_upload.elapsed())
            } else {
                options.batch_max
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = committed.notified() => {}
                () = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            }
            continue;
        }
        let records = match with_spool(&spool, move |s| s.read_from(acked + 1, limit)).await {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => {
                last_upload = tokio::time::Instant::now();
                continue;
            }
            Err(e) => {
                error!(error = %e, "cannot read the spool; retrying");
                counters.failed("spool");
                failures += 1;
                if sleep_or_stop(&shutdown, backoff(failures, options.backoff_max)).await {
                    return;
                }
                continue;
            }
        };
        let first = records.first().map_or(0, |r| r.seq);
        let last = records.iter().map(covered).max().unwrap_or(0);
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            o = send(&client, &url, &key, &options.host_id, clock.unix_now(), &records) => o,
        };
        match outcome {
            Outcome::Stored(acked_seq) => {
                failures = 0;
                last_upload = tokio::time::Instant::now();
                counters.batches_ok.fetch_add(1, Relaxed);
                counters.records_ok.fetch_add(records.len() as u64, Relaxed);
                counters.last_success_at.store(clock.unix_now(), Relaxed);
                let to = if acked_seq < last && (acked_seq < acked || first > acked + 1) {
                    // Either the collector's count is stuck under seqs this agent settled
                    // (a rejected batch), or seqs acked+1..first-1 are gone locally (a
                    // corrupt segment): resending cannot close that gap, the 200 says this
                    // batch is stored.
                    warn!(acked_seq, cursor = acked, first_seq = first, last_seq = last,
                          "collector's acked_seq is behind a gap it cannot close (rejected batch or lost records): trusting the 200 for this batch");
                    last
                } else {
                    acked_seq
                };
                info!(first_seq = first, last_seq = last, acked_seq, "report batch stored");
                if let Err(e) = with_spool(&spool, move |s| s.ack(to)).await {
                    error!(error = %e, "cannot persist the acknowledgement; the batch will be sent again");
                }
                limit = options.batch_max_records.max(1);
                if to == acked {
                    // No progress (a 200 acknowledging nothing new): do not spin.
                    failures += 1;
                    if sleep_or_stop(&shutdown, backoff(failures, options.backoff_max)).await {
                        return;
                    }
                }
            }
            Outcome::Rejected(413, body) if limit > 1 => {
                limit = (records.len() / 2).max(1);
                warn!(records = records.len(), next_limit = limit, collector = %body, "batch too large for the collector; halving");
            }
            Outcome::Rejected(status, body) => {
                last_upload = tokio::time::Instant::now();
                error!(status, first_seq = first, last_seq = last, collector = %body,
                       "collector permanently rejected a report batch: kept in rejected/, not sent again");
                let dir = options.rejected_dir.clone();
                let host = options.host_id.clone();
                let (kind, message) = Rejection::describe(status, &body);
                let count = records.len() as u64;
                let save_clock = Arc::clone(&clock);
                let saved = tokio::task::spawn_blocking(move || {
                    save_rejected(&dir, &host, save_clock.unix_now(), status, &body, &records)
                })
                .await;
                match saved {
                    Ok(Ok((path, new_file))) => {
                        info!(path = %path.display(), status, %kind, "rejected batch saved");
                        let rejection = Rejection {
                            at: clock.unix_now(),
                            status,
                            kind,
                            error: message,
                            first_seq: first,
                            last_seq: last,
                            records: count,
                            file: path,
                        };
                        counters.rejected(rejection, new_file);
                        if let Err(e) = with_spool(&spool, move |s| s.ack(last)).await {
                            error!(error = %e, "cannot persist the cursor past a rejected batch");
                        }
                    }
                    Ok(Err(e)) => {
                        error!(error = %e, "cannot save a rejected batch; keeping it in the spool and retrying");
                        failures += 1;
                        if sleep_or_stop(&shutdown, backoff(failures, options.backoff_max)).await {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                limit = options.batch_max_records.max(1);
            }
            Outcome::Retry(after, kind, reason) => {
                failures += 1;
                counters.failed(kind);
                counters.retries.fetch_add(1, Relaxed);
                let delay = after.unwrap_or_else(|| backoff(failures, options.backoff_max));
                warn!(%reason, attempt = failures, delay_ms = delay.as_millis() as u64, first_seq = first,
                      "report upload failed; retrying");
                if sleep_or_stop(&shutdown, delay).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `d`; true when shut down meanwhile.
async fn sleep_or_stop(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

async fn with_spool<T: Send + 'static>(
    spool: &SharedSpool,
    f: impl FnOnce(&mut Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    let spool = Arc::clone(spool);
    tokio::task::spawn_blocking(move || match spool.lock() {
        Ok(mut s) => f(&mut s),
        Err(_) => Err(SpoolError::TailPending { path: PathBuf::from("<poisoned spool lock>") }),
    })
    .await
    .unwrap_or_else(|_| Err(SpoolError::TailPending { path: PathBuf::from("<spool task panicked>") }))
}

async fn send(
    client: &reqwest::Client,
    url: &reqwest::Url,
    key: &PrivateJwk,
    host_id: &str,
    sent_at: i64,
    records: &[UsageRecord],
) -> Outcome {
    let body = match encode_body(host_id, sent_at, records) {
        Ok(b) => b,
        Err(e) => return Outcome::Retry(None, "bad_answer", format!("encoding: {e}")),
    };
    let signature = sign_detached(&body, REPORT_SIGNATURE_TYP, key);
    let response = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::CONTENT_ENCODING, "gzip")
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await;
    let response = match response {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(None, "network", format!("network: {e}")),
    };
    let status = response.status().as_u16();
    let after = retry_after(response.headers());
    let body = read_limited(response).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned())
    });
    match status {
        200 => match serde_json::from_slice::<ReportAck>(&body) {
            Ok(ack) => Outcome::Stored(ack.acked_seq),
            Err(e) => Outcome::Retry(None, "bad_answer", format!("200 with an unreadable ack: {e}")),
        },
        400 | 409 | 413 => Outcome::Rejected(status, json),
        401 => {
            error!(collector = %json, "collector does not accept this host's signature (not enrolled yet? register `kycctl host-key --public` with the collector); retrying");
            Outcome::Retry(None, "unauthorized", format!("401 {json}"))
        }
        429 | 503 => Outcome::Retry(after, "throttled", format!("{status} {json}")),
        _ => Outcome::Retry(None, "http_error", format!("{status} {json}")),
    }
}

async fn read_limited(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ANSWER_BYTES.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let cap = Duration::from_secs(300);
        for failures in 1..40 {
            let d = backoff(failures, cap);
            let bound = BACKOFF_BASE.saturating_mul(1 << (failures - 1).min(20)).min(cap);
            assert!(d <= bound, "{failures}: {d:?} > {bound:?}");
        }
        let samples: std::collections::BTreeSet<_> = (0..20).map(|_| backoff(10, cap)).collect();
        assert!(samples.len() > 10, "jittered");
    }

    #[test]
    fn reports_url_joins() {
        assert_eq!(reports_url("https://c:9478/").unwrap().as_str(), "https://c:9478/v1/reports");
        assert_eq!(reports_url("http://c").unwrap().as_str(), "http://c/v1/reports");
        assert!(reports_url("not a url").is_err());
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(reqwest::header::RETRY_AFTER, "999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }
}
