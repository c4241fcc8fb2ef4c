//! The uploader: spooled usage records to the collector, `POST {collector_url}/v1/reports`.
//!
//! Each batch is the records from the cursor on (at most `batch_max_records`), as a
//! [`ReportBatch`] JSON, gzip-compressed, signed (`X-Kycd-Signature`, a detached JWS over the
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
//!   `report_batch_rejected` audit record ([`Reporting::take_audit_events`]).
//! - **401** (unknown host, bad signature: the host may not be enrolled yet), **429/503**,
//!   other 5xx and network errors: retried with exponential backoff (base 1 s, full jitter,
//!   cap `backoff_max_s`); `Retry-After` (seconds) is honoured. 401 is logged at error level.

use std::hash::{BuildHasher as _, Hasher as _};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::{sign_detached, PrivateJwk, ReportAck, ReportBatch, UsageRecord, REPORT_SIGNATURE_TYP};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::spool::{covered, SharedSpool, SpoolError};

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
    /// The CA file cannot be read or parsed.
    #[error("{path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client cannot be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
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
    /// Permanent rejections not yet taken for the audit log ([`Reporting::take_audit_events`]).
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
    fn rejected(&self, rejection: Rejection, new_file: bool) {
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

/// A batch the collector refused for good (400/409/413), kept in `rejected/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// When (Unix seconds).
    pub at: i64,
    /// The HTTP status.
    pub status: u16,
    /// The collector's error kind (`kind` in its answer, e.g. `SeqConflict`), else
    /// `http_<status>`.
    pub kind: String,
    /// The collector's message (`error` in its answer), if any, at most 256 characters.
    pub error: Option<String>,
    /// The batch's first seq.
    pub first_seq: u64,
    /// The last seq it covers.
    pub last_seq: u64,
    /// Records in it.
    pub records: u64,
    /// Where it was saved.
    pub file: PathBuf,
}

impl Rejection {
    /// The kind and message from the collector's answer `{"error", "kind"}` (or a bare
    /// string).
    fn describe(status: u16, answer: &serde_json::Value) -> (String, Option<String>) {
        let kind = answer
            .get("kind")
            .and_then(|k| k.as_str())
            .filter(|k| !k.is_empty())
            .map_or_else(|| format!("http_{status}"), |k| k.chars().take(64).collect());
        let error = answer
            .get("error")
            .and_then(|e| e.as_str())
            .or_else(|| answer.as_str())
            .map(|e| e.chars().take(256).collect());
        (kind, error)
    }
}

/// Upload failure kinds (the `kind` label of `kycd_upload_failures_total`).
pub const FAILURE_KINDS: [&str; 7] =
    ["network", "unauthorized", "throttled", "http_error", "bad_answer", "rejected", "spool"];

/// Builds the HTTPS client: rustls (ring), the system trust store plus `ca_file`, no
/// redirects, timeouts.
pub fn build_client(options: &UploaderOptions) -> Result<reqwest::Client, UploadError> {
    https_client(options.ca_file.as_deref(), options.connect_timeout, options.request_timeout)
}

/// The agent's outbound HTTPS client (uploads, policy fetches): rustls (ring), the system
/// trust store plus the PEM certificates in `ca_file`, no redirects, the given timeouts.
pub fn https_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, UploadError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .user_agent(concat!("kycd/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let ca_err = |reason: String| UploadError::CaFile { path: path.to_owned(), reason };
        let pem = crate::fsutil::read_regular_file(path, 1 << 20).map_err(|e| ca_err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no PEM certificate in it".into()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(UploadError::Client)
}

/// The reports endpoint for a base URL.
pub fn reports_url(base: &str) -> Result<reqwest::Url, UploadError> {
    let joined = format!("{}/v1/reports", base.trim_end_matches('/'));
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

/// A random duration in `[0, d]` (full jitter), from std's randomly keyed hasher.
pub(crate) fn jitter(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let r = h.finish();
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
}

/// Backoff before attempt `failures` (≥ 1): random in `[0, min(cap, base·2^(failures−1))]`.
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    jitter(exp.min(cap))
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
/// each commit.
pub async fn run(
    spool: SharedSpool,
    key: Arc<PrivateJwk>,
    options: UploaderOptions,
    client: reqwest::Client,
    committed: Arc<tokio::sync::Notify>,
    counters: Arc<UploadCounters>,
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
            o = send(&client, &url, &key, &options.host_id, &records) => o,
        };
        match outcome {
            Outcome::Stored(acked_seq) => {
                failures = 0;
                last_upload = tokio::time::Instant::now();
                counters.batches_ok.fetch_add(1, Relaxed);
                counters.records_ok.fetch_add(records.len() as u64, Relaxed);
                counters.last_success_at.store(crate::tokens::unix_now(), Relaxed);
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
                let saved =
                    tokio::task::spawn_blocking(move || save_rejected(&dir, &host, status, &body, &records))
                        .await;
                match saved {
                    Ok(Ok((path, new_file))) => {
                        info!(path = %path.display(), status, %kind, "rejected batch saved");
                        let rejection = Rejection {
                            at: crate::tokens::unix_now(),
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
    f: impl FnOnce(&mut crate::spool::Spool) -> Result<T, SpoolError> + Send + 'static,
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
    records: &[UsageRecord],
) -> Outcome {
    let body = match encode_body(host_id, crate::tokens::unix_now(), records) {
        Ok(b) => b,
        Err(e) => return Outcome::Retry(None, "bad_answer", format!("encoding: {e}")),
    };
    let signature = sign_detached(&body, REPORT_SIGNATURE_TYP, key);
    let response = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::CONTENT_ENCODING, "gzip")
        .header("X-Kycd-Signature", signature)
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

/// Writes a rejected batch to `<dir>/<first>-<last>.json` durably (0600, in a 0700
/// directory); also says whether the file is new.
fn save_rejected(
    dir: &Path,
    host_id: &str,
    status: u16,
    answer: &serde_json::Value,
    records: &[UsageRecord],
) -> std::io::Result<(PathBuf, bool)> {
    let first = records.first().map_or(0, |r| r.seq);
    let last = records.iter().map(covered).max().unwrap_or(0);
    crate::fsutil::create_dir_durably(dir)?;
    // The same batch saved again (a retry) replaces its own file; a different batch whose
    // seqs happen to match (a spool wiped and renumbered) gets a file of its own, so the
    // only copy of an earlier rejected batch is never overwritten.
    let wanted = serde_json::to_value(records)?;
    let same_batch = |path: &Path| {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|doc| doc["records"] == wanted)
    };
    let mut path = dir.join(format!("{first}-{last}.json"));
    let mut n = 1u32;
    while path.exists() && !same_batch(&path) {
        if n > 10_000 {
            return Err(std::io::Error::other(format!("too many rejected batches named {first}-{last}")));
        }
        path = dir.join(format!("{first}-{last}.{n}.json"));
        n += 1;
    }
    let new_file = !path.exists();
    let doc = serde_json::json!({
        "host_id": host_id,
        "rejected_at": crate::tokens::unix_now(),
        "status": status,
        "reason": answer,
        "records": records,
    });
    crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&doc)?)?;
    Ok((path, new_file))
}

/// Batch files (`*.json`) in the rejected directory (0 when there is none).
fn count_rejected_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "json")).count() as u64
    })
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

    /// Spool damage found on open and a rejected batch reach `kycctl status`, `/metrics`
    /// and (once each) the audit events the daemon records.
    #[test]
    fn damage_and_rejections_are_visible_in_status_metrics_and_audit_events() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config { state_dir: dir.path().join("state"), ..Default::default() };
        let spool_dir = config.state_dir.join("spool");
        let mut spool = crate::spool::Spool::open(&spool_dir, crate::spool::SpoolOptions::default()).unwrap();
        for i in 0..3 {
            spool.append(crate::spool::tests::window("t", "cgroup:/w", i * 60)).unwrap();
        }
        let seg = spool.segment_paths().pop().unwrap();
        drop(spool);
        // Flip a byte in record 2's payload.
        let mut bytes = std::fs::read(&seg).unwrap();
        let first_len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        bytes[8 + first_len + 8 + 10] ^= 0x41;
        std::fs::write(&seg, &bytes).unwrap();
        // A batch file left by an earlier run.
        std::fs::create_dir_all(config.state_dir.join("rejected")).unwrap();
        std::fs::write(config.state_dir.join("rejected/100-109.json"), b"{}").unwrap();

        let reporting = Reporting::open(&config, "node-1").unwrap();
        let status = reporting.status();
        assert_eq!(status.spool_damage.regions, 1);
        assert!(status.spool_damage.bytes > 0 && status.spool_damage.last_at.is_some());
        assert_eq!(
            status.rejected,
            crate::net::operator_api::RejectedStatus { kept: 1, ..Default::default() }
        );
        let metrics = reporting.metrics_text();
        for line in [
            "kycd_spool_damage_events_total{kind=\"corrupt\"} 1",
            "kycd_spool_damage_events_total{kind=\"torn_tail\"} 0",
            &format!("kycd_spool_damaged_bytes_total{{kind=\"corrupt\"}} {}", status.spool_damage.bytes),
            "kycd_upload_rejected_batches_total 0",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
        }
        let events = reporting.take_audit_events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "spool_damaged");
        assert_eq!(events[0]["kind"], "corrupt");
        assert_eq!((events[0]["seq_before"].as_u64(), events[0]["seq_after"].as_u64()), (Some(1), Some(3)));
        assert!(std::path::Path::new(events[0]["quarantined"].as_str().unwrap()).is_file());
        assert!(reporting.take_audit_events().is_empty(), "each recorded once");

        let (kind, error) =
            Rejection::describe(409, &serde_json::json!({"error": "seq 5 differs", "kind": "SeqConflict"}));
        assert_eq!((kind.as_str(), error.as_deref()), ("SeqConflict", Some("seq 5 differs")));
        assert_eq!(
            Rejection::describe(400, &serde_json::json!("bad")),
            ("http_400".to_owned(), Some("bad".into()))
        );
        reporting.upload_counters.rejected(
            Rejection {
                at: 1_800_000_000,
                status: 409,
                kind,
                error,
                first_seq: 4,
                last_seq: 13,
                records: 10,
                file: config.state_dir.join("rejected/4-13.json"),
            },
            true,
        );
        let status = reporting.status();
        assert_eq!(
            status.rejected,
            crate::net::operator_api::RejectedStatus {
                batches: 1,
                records: 10,
                kept: 2,
                last: Some(crate::net::operator_api::LastRejection {
                    at: 1_800_000_000,
                    status: 409,
                    kind: "SeqConflict".into()
                }),
            }
        );
        let metrics = reporting.metrics_text();
        assert!(metrics.lines().any(|l| l == "kycd_upload_rejected_batches_total 1"), "{metrics}");
        assert!(metrics.lines().any(|l| l == "kycd_upload_rejected_records_total 10"), "{metrics}");
        let events = reporting.take_audit_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "report_batch_rejected");
        assert_eq!(
            (events[0]["status"].as_u64(), events[0]["kind"].as_str()),
            (Some(409), Some("SeqConflict"))
        );
        assert_eq!((events[0]["first_seq"].as_u64(), events[0]["last_seq"].as_u64()), (Some(4), Some(13)));
        // Older agents' status answers (no damage or rejection fields) still parse.
        let old: crate::net::operator_api::ReportingStatus = serde_json::from_value(serde_json::json!({
            "spool_pending_records": 0, "spool_bytes": 0, "uploading": false, "last_upload_at": null
        }))
        .unwrap();
        assert_eq!(old.rejected, crate::net::operator_api::RejectedStatus::default());
    }
}

/// Why reporting could not be set up at startup.
#[derive(Debug, thiserror::Error)]
pub enum ReportingError {
    /// The host key is unusable.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The spool cannot be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The uploader cannot be set up.
    #[error(transparent)]
    Upload(#[from] UploadError),
}

/// The reporting pipeline of a running daemon: the spool (always), the writer task fed by
/// the GPU sampler, and the uploader (when `reporting.collector_url` is set).
#[derive(Debug)]
pub struct Reporting {
    /// The spool.
    pub spool: SharedSpool,
    /// Notified after each commit.
    pub committed: Arc<tokio::sync::Notify>,
    /// Spool writer counters.
    pub writer_counters: Arc<crate::spool::WriterCounters>,
    /// Uploader counters.
    pub upload_counters: Arc<UploadCounters>,
    group_commit: Duration,
    key: Arc<PrivateJwk>,
    uploader: Option<(UploaderOptions, reqwest::Client)>,
}

impl Reporting {
    /// Loads or creates the host key (`<state_dir>/host.key`), opens the spool
    /// (`<state_dir>/spool`) and builds the HTTP client. Blocking.
    pub fn open(config: &crate::config::Config, host_id: &str) -> Result<Self, ReportingError> {
        let key =
            crate::host::load_or_create_host_key(&crate::host::host_key_path(&config.state_dir), host_id)?;
        let r = &config.reporting;
        let spool = crate::spool::Spool::open(
            &config.state_dir.join("spool"),
            crate::spool::SpoolOptions {
                segment_max_bytes: r.segment_max_bytes,
                max_bytes: r.spool_max_bytes,
            },
        )?;
        let uploader = match UploaderOptions::from_config(config, host_id) {
            Some(options) => {
                reports_url(&options.collector_url)?;
                let client = build_client(&options)?;
                Some((options, client))
            }
            None => {
                info!("reporting.collector_url is not set: usage windows are spooled, not uploaded");
                None
            }
        };
        let upload_counters = Arc::new(UploadCounters::default());
        upload_counters
            .rejected_files
            .store(count_rejected_files(&config.state_dir.join("rejected")), Relaxed);
        Ok(Reporting {
            spool: Arc::new(std::sync::Mutex::new(spool)),
            committed: Arc::new(tokio::sync::Notify::new()),
            writer_counters: Arc::default(),
            upload_counters,
            group_commit: Duration::from_millis(r.group_commit_ms),
            key: Arc::new(key),
            uploader,
        })
    }

    /// The host key (it also signs the collector API's host statements).
    pub fn host_key(&self) -> Arc<PrivateJwk> {
        Arc::clone(&self.key)
    }

    /// The spool depth, the last successful upload, spool damage and rejected batches (for
    /// `kycctl status`).
    pub fn status(&self) -> crate::net::operator_api::ReportingStatus {
        let (pending, bytes, stats) = self
            .spool
            .lock()
            .map(|s| (s.pending(), s.used_bytes(), s.stats()))
            .unwrap_or((0, 0, crate::spool::SpoolStats::default()));
        let c = &self.upload_counters;
        let last = c.last_success_at.load(Relaxed);
        let last_rejection = c.last_rejection.lock().ok().and_then(|r| r.clone());
        crate::net::operator_api::ReportingStatus {
            spool_pending_records: pending,
            spool_bytes: bytes,
            uploading: self.uploader.is_some(),
            last_upload_at: (last > 0).then_some(last),
            spool_damage: crate::net::operator_api::SpoolDamageStatus {
                regions: stats.damaged_regions,
                bytes: stats.damaged_bytes,
                torn_tails: stats.torn_tails,
                torn_tail_bytes: stats.truncated_bytes,
                quarantine_failures: stats.quarantine_failures,
                last_at: (stats.last_damage_at > 0).then_some(stats.last_damage_at),
            },
            rejected: crate::net::operator_api::RejectedStatus {
                batches: c.batches_rejected.load(Relaxed),
                records: c.records_rejected.load(Relaxed),
                kept: c.rejected_files.load(Relaxed),
                last: last_rejection.map(|r| crate::net::operator_api::LastRejection {
                    at: r.at,
                    status: r.status,
                    kind: r.kind,
                }),
            },
        }
    }

    /// Audit events for what reporting found since the last call: `spool_damaged` (one per
    /// damaged region or torn tail quarantined) and `report_batch_rejected` (one per batch
    /// the collector refused for good). Never blocks: a spool busy with an fsync is asked
    /// again on the next call.
    pub fn take_audit_events(&self) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        if let Ok(mut spool) = self.spool.try_lock() {
            for d in spool.take_damage() {
                events.push(serde_json::json!({
                    "type": "spool_damaged",
                    "kind": d.kind.as_str(),
                    "segment": d.segment,
                    "offset": d.offset,
                    "bytes": d.len,
                    "seq_before": d.seq_before,
                    "seq_after": d.seq_after,
                    "quarantined": d.quarantined,
                    "found_at": d.found_at,
                }));
            }
        }
        if let Ok(mut queue) = self.upload_counters.unrecorded_rejections.lock() {
            for r in queue.drain(..) {
                events.push(serde_json::json!({
                    "type": "report_batch_rejected",
                    "status": r.status,
                    "kind": r.kind,
                    "error": r.error,
                    "first_seq": r.first_seq,
                    "last_seq": r.last_seq,
                    "records": r.records,
                    "file": r.file,
                    "rejected_at": r.at,
                }));
            }
        }
        events
    }

    /// The spool's and the uploader's metrics in the Prometheus text format (for `/metrics`).
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: f64| [(String::new(), v)];
        let (pending, bytes, stats) = match self.spool.lock() {
            Ok(s) => (s.pending(), s.used_bytes(), s.stats()),
            Err(_) => (0, 0, crate::spool::SpoolStats::default()),
        };
        family(
            "kycd_spool_pending_records",
            "gauge",
            "Usage records spooled and not yet acknowledged by the collector.",
            &one(pending as f64),
        );
        family("kycd_spool_bytes", "gauge", "Bytes of spool segments on disk.", &one(bytes as f64));
        family(
            "kycd_spool_merges_total",
            "counter",
            "Merge passes run because the spool neared its cap.",
            &one(stats.merges as f64),
        );
        let by_damage = |corrupt: u64, torn: u64| {
            [
                ("{kind=\"corrupt\"}".to_owned(), corrupt as f64),
                ("{kind=\"torn_tail\"}".to_owned(), torn as f64),
            ]
        };
        family(
            "kycd_spool_damage_events_total",
            "counter",
            "Damaged spool regions (corrupt) and torn tails quarantined and cut out of segments since start.",
            &by_damage(stats.damaged_regions, stats.torn_tails),
        );
        family(
            "kycd_spool_damaged_bytes_total",
            "counter",
            "Bytes of those regions and tails (copies kept in the spool's quarantine/ directory).",
            &by_damage(stats.damaged_bytes, stats.truncated_bytes),
        );
        family(
            "kycd_spool_quarantine_failures_total",
            "counter",
            "Damaged spool bytes that could not be quarantined (left in place and retried).",
            &one(stats.quarantine_failures as f64),
        );
        family(
            "kycd_spool_append_errors_total",
            "counter",
            "Failed spool appends (each retried).",
            &one(self.writer_counters.append_errors.load(Relaxed) as f64),
        );
        let c = &self.upload_counters;
        family(
            "kycd_upload_batches_total",
            "counter",
            "Report batches the collector stored.",
            &one(c.batches_ok.load(Relaxed) as f64),
        );
        family(
            "kycd_upload_records_total",
            "counter",
            "Usage records in report batches the collector stored.",
            &one(c.records_ok.load(Relaxed) as f64),
        );
        family(
            "kycd_upload_rejected_batches_total",
            "counter",
            "Report batches the collector refused for good (400/409/413), kept in rejected/ and not sent again.",
            &one(c.batches_rejected.load(Relaxed) as f64),
        );
        family(
            "kycd_upload_rejected_records_total",
            "counter",
            "Seqs covered by those batches.",
            &one(c.records_rejected.load(Relaxed) as f64),
        );
        let failures = c.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let by_kind: Vec<(String, f64)> = FAILURE_KINDS
            .iter()
            .map(|k| (format!("{{kind=\"{k}\"}}"), failures.get(k).copied().unwrap_or(0) as f64))
            .collect();
        family(
            "kycd_upload_failures_total",
            "counter",
            "Failed upload attempts (retried) and permanently rejected batches, by kind.",
            &by_kind,
        );
        family(
            "kycd_upload_last_success_timestamp_seconds",
            "gauge",
            "When the collector last stored a batch (Unix seconds; 0: never since start).",
            &one(c.last_success_at.load(Relaxed) as f64),
        );
        out
    }

    /// Starts the spool writer for `windows`; `observe` sees each window first (metrics).
    pub fn spawn_writer(
        &self,
        windows: crate::gpu::usage::WindowReceiver,
        observe: impl FnMut(&kycd_protocol::UsageWindow) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::spool::run_writer(
            Arc::clone(&self.spool),
            windows,
            self.group_commit,
            Arc::clone(&self.committed),
            Arc::clone(&self.writer_counters),
            observe,
        ))
    }

    /// Starts the uploader, when a collector is configured.
    pub fn spawn_uploader(&self, shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let (options, client) = self.uploader.clone()?;
        Some(tokio::spawn(run(
            Arc::clone(&self.spool),
            Arc::clone(&self.key),
            options,
            client,
            Arc::clone(&self.committed),
            Arc::clone(&self.upload_counters),
            shutdown,
        )))
    }
}
