//! The policy fetcher: polls the collector's published policy (`GET {policy.fetch_url}`,
//! the collector's [`kycd_protocol::wire::collector::POLICY`]) and hands what it gets to the
//! main loop.
//!
//! It owns only the HTTP side: the interval (±10 % jitter so a fleet does not fetch in
//! step), `If-None-Match` with the ETag of the last *accepted* answer (a `304` changes
//! nothing), a body capped at [`crate::policy::MAX_POLICY_BYTES`], and backoff after errors.
//! Whether a fetched token is enforced is decided by the main loop (it receives each token
//! as a [`FetchedPolicy`] and answers a [`FetchVerdict`]), through the same
//! verification and anti-rollback as the policy file (see `Agent::offer_fetched_policy`);
//! the loop persists an accepted token in `<state_dir>/fetched-policy.jws`. A rejected token
//! drops the ETag, so it is fetched again next interval (the loop does not re-record an
//! unchanged rejection); a trust anchor added later can then accept it.
//!
//! Network and HTTP errors never touch enforcement: they are logged, counted and retried
//! after `interval · 2^(failures−1)`, capped at 8 intervals or an hour (never below one
//! interval), jittered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use kycd_protocol::backoff::{exponential, spread};

use crate::policy::MAX_POLICY_BYTES;

/// File in the state directory holding the last fetched policy that was accepted.
pub const FETCHED_FILE: &str = "fetched-policy.jws";

/// Longest ETag kept (a longer one is not sent back).
const MAX_ETAG_BYTES: usize = 256;

/// How the fetcher runs (from `[policy]`).
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The full URL of the published policy.
    pub url: reqwest::Url,
    /// Time between fetches (before jitter).
    pub interval: Duration,
}

/// What the main loop made of a fetched token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchVerdict {
    /// A newer version: in force and persisted.
    Applied {
        /// Its version.
        version: u64,
    },
    /// The policy in force (or one equal to it).
    Unchanged {
        /// Its version.
        version: u64,
    },
    /// Refused (rollback, bad signature, expired, garbage, …); the current policy stays.
    Rejected {
        /// The error kind.
        kind: &'static str,
    },
}

/// A fetched token on its way to the main loop, which answers what became of it.
#[derive(Debug)]
pub struct FetchedPolicy {
    /// The body as served.
    pub token: Vec<u8>,
    /// Where the verdict goes.
    pub reply: oneshot::Sender<FetchVerdict>,
}

/// Why one fetch produced no token.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connect, TLS, timeout or a broken body.
    #[error("request failed: {0}")]
    Network(#[source] reqwest::Error),
    /// `404`: the collector has no policy published.
    #[error("no policy published (404)")]
    NotPublished,
    /// Any other unexpected status.
    #[error("unexpected HTTP status {0}")]
    Status(u16),
    /// The body is over the cap.
    #[error("answer larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge,
}

impl FetchError {
    /// Stable name for logs, status and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Network(_) => "network_error",
            FetchError::NotPublished => "not_published",
            FetchError::Status(_) => "http_error",
            FetchError::TooLarge => "too_large",
        }
    }
}

/// The fetcher's state for `kycctl status` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct FetchStatus {
    /// The URL fetched.
    pub url: String,
    /// When the last fetch ended (Unix seconds).
    pub last_at: Option<i64>,
    /// Its outcome: `applied`, `unchanged`, `not_modified`, `rejected: KIND`, or an error
    /// kind with its message.
    pub last_outcome: Option<String>,
    /// The ETag of the last accepted answer.
    pub etag: Option<String>,
    /// When a fetched policy was last accepted (applied or unchanged; Unix seconds).
    pub last_success_at: Option<i64>,
    /// Fetches by outcome (`applied`, `unchanged`, `not_modified`, `rejected`, and the error
    /// kinds of [`FetchError::kind`]).
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// Shared between the fetcher (writer) and the main loop (reader).
pub type SharedFetchStatus = Arc<Mutex<FetchStatus>>;

/// What a successful request brought.
enum Answer {
    NotModified,
    Policy { body: Vec<u8>, etag: Option<String> },
}

async fn fetch_once(
    client: &reqwest::Client,
    url: &reqwest::Url,
    etag: Option<&str>,
) -> Result<Answer, FetchError> {
    let mut request = client.get(url.clone()).header(reqwest::header::ACCEPT, "application/jose");
    if let Some(etag) = etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    let mut response = request.send().await.map_err(FetchError::Network)?;
    match response.status().as_u16() {
        200 => {}
        304 => return Ok(Answer::NotModified),
        404 => return Err(FetchError::NotPublished),
        other => return Err(FetchError::Status(other)),
    }
    if response.content_length().is_some_and(|n| n > MAX_POLICY_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let etag = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_ETAG_BYTES)
        .map(str::to_owned);
    // Read chunk by chunk so a lying or absent Content-Length cannot make us buffer more.
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(FetchError::Network)? {
        if body.len() + chunk.len() > MAX_POLICY_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer::Policy { body, etag })
}

/// `interval` ±10 %.
fn jittered(interval: Duration) -> Duration {
    spread(interval, 0.1)
}

/// The wait after `failures` (≥ 1) consecutive failures; see the module docs.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let cap = interval.saturating_mul(8).min(Duration::from_secs(3600)).max(interval);
    exponential(interval, failures, cap)
}

fn now() -> i64 {
    kycd_protocol::clock::unix_now()
}

/// Runs the fetcher until `shutdown`: fetches at once, then every interval, sending each
/// token to `policies` (the main loop) and waiting for its verdict.
pub async fn run(
    options: FetchOptions,
    client: reqwest::Client,
    policies: mpsc::Sender<FetchedPolicy>,
    status: SharedFetchStatus,
    shutdown: CancellationToken,
) {
    info!(url = %options.url, interval_s = options.interval.as_secs(), "policy fetcher started");
    let mut etag: Option<String> = None;
    let mut failures: u32 = 0;
    loop {
        let fetched = tokio::select! {
            () = shutdown.cancelled() => break,
            r = fetch_once(&client, &options.url, etag.as_deref()) => r,
        };
        let (outcome, detail): (&'static str, String) = match fetched {
            Ok(Answer::NotModified) => {
                failures = 0;
                debug!(url = %options.url, "published policy not modified");
                ("not_modified", "not_modified".into())
            }
            Ok(Answer::Policy { body, etag: new_etag }) => {
                failures = 0;
                let (reply_tx, reply_rx) = oneshot::channel();
                let sent = tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = policies.send(FetchedPolicy { token: body, reply: reply_tx }) => r,
                };
                if sent.is_err() {
                    break; // The main loop is gone.
                }
                let verdict = tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = reply_rx => r,
                };
                match verdict {
                    Ok(FetchVerdict::Applied { .. }) | Ok(FetchVerdict::Unchanged { .. }) => {
                        etag = new_etag;
                        if let Ok(mut s) = status.lock() {
                            s.last_success_at = Some(now());
                        }
                        let kind = if matches!(verdict, Ok(FetchVerdict::Applied { .. })) {
                            "applied"
                        } else {
                            "unchanged"
                        };
                        (kind, kind.into())
                    }
                    Ok(FetchVerdict::Rejected { kind }) => {
                        etag = None;
                        ("rejected", format!("rejected: {kind}"))
                    }
                    Err(_) => break, // The main loop dropped the request: shutting down.
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(url = %options.url, kind = e.kind(), error = %e, failures,
                      "policy fetch failed; the policy in force stays, retrying later");
                (e.kind(), format!("{}: {e}", e.kind()))
            }
        };
        if let Ok(mut s) = status.lock() {
            s.last_at = Some(now());
            s.last_outcome = Some(detail);
            s.etag.clone_from(&etag);
            *s.outcomes.entry(outcome).or_default() += 1;
        }
        let wait = if failures == 0 {
            jittered(options.interval)
        } else {
            jittered(backoff(options.interval, failures))
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    info!("policy fetcher stopped");
}

/// The Prometheus text for the fetcher (appended to the agent's `/metrics`).
pub fn metrics_text(status: &FetchStatus) -> String {
    use kycd_net::prometheus::{Exposition, Kind};
    let mut out = Exposition::new();
    out.family("kycd_policy_fetches_total", Kind::Counter, "Policy fetches, by outcome.");
    for (outcome, n) in &status.outcomes {
        out.sample("kycd_policy_fetches_total", &[("outcome", outcome)], n);
    }
    out.single(
        "kycd_policy_fetch_last_success_timestamp_seconds",
        Kind::Gauge,
        "When a fetched policy was last accepted (Unix seconds; 0: never since start).",
        status.last_success_at.unwrap_or(0),
    );
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let interval = Duration::from_secs(300);
        for _ in 0..1000 {
            let d = jittered(interval);
            assert!(d >= Duration::from_secs(270) && d <= Duration::from_secs(330), "{d:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let i = Duration::from_secs(300);
        assert_eq!(backoff(i, 1), i);
        assert_eq!(backoff(i, 2), Duration::from_secs(600));
        assert_eq!(backoff(i, 4), Duration::from_secs(2400));
        assert_eq!(backoff(i, 5), Duration::from_secs(2400), "capped at 8 intervals");
        assert_eq!(backoff(i, 60), Duration::from_secs(2400));
        assert_eq!(backoff(Duration::from_secs(600), 4), Duration::from_secs(3600), "capped at an hour");
        assert_eq!(backoff(Duration::from_secs(1), 10), Duration::from_secs(8));
        let long = Duration::from_secs(7200);
        assert_eq!(backoff(long, 3), long, "never below one interval");
    }

    #[test]
    fn metrics_render_outcomes_and_age() {
        let mut s = FetchStatus::default();
        let text = metrics_text(&s);
        assert!(text.contains("# TYPE kycd_policy_fetches_total counter"), "{text}");
        assert!(text.contains("kycd_policy_fetch_last_success_timestamp_seconds 0\n"), "{text}");
        s.outcomes.insert("applied", 2);
        s.last_success_at = Some(90);
        let text = metrics_text(&s);
        assert!(text.contains("kycd_policy_fetches_total{outcome=\"applied\"} 2"), "{text}");
        assert!(text.contains("kycd_policy_fetch_last_success_timestamp_seconds 90\n"), "{text}");
    }
}
