//! The agent poller: every interval, asks each enrolled host with an agent URL for a fresh
//! host-signed statement (`GET /v1/attestation?nonce=N` on the agent's collector API),
//! verifies it and records the outcome through [`StatementStore`].
//!
//! Checks, each failure recorded with its kind ([`PollErrorKind`]):
//! - transport: HTTPS against the configured CA (only that CA when one is given), optional
//!   client certificate (mTLS) and bearer token; `http://` only for a loopback IP with
//!   `insecure_plaintext` (the agent's own rule); a per-host timeout over connect, TLS,
//!   request and body; bodies capped at [`PollerConfig::max_body_bytes`];
//! - the JWS: signed by the host's enrolled key (the one its reports are signed with),
//!   `typ: kyc-host-statement+jwt`, every strict rule of `kycd_protocol::verify`;
//! - `iss` is the polled host's id, `nonce` is the one just sent (a fresh 32-character
//!   URL-safe random nonce per poll, so a recorded answer cannot be replayed), and
//!   `|iat − now| ≤ max_skew_s`.
//!
//! Concurrency: at most [`PollerConfig::concurrency`] polls at once (a semaphore; tasks are
//! spawned only once a permit is held, so a round over 10,000 hosts never has more than that
//! many tasks or sockets). Outcomes go through a bounded channel to one writer that records
//! them in batches (one transaction, one fsync, per batch).
//!
//! Backoff: a host with `f` consecutive failures is not polled again before
//! `last_attempt_at + min(interval × 2^(f−1), backoff_max) × j`, `j ∈ [0.5, 1)` a jitter
//! derived from the host id and `f`. It is computed from the stored poll status, so it
//! survives a collector restart and is visible in `hosts list`.
//!
//! Connections are not kept between polls: at a 60 s interval a pooled connection would sit
//! idle in one of the agent's connection slots for nothing, and 10,000 idle TLS sessions
//! would hold 20,000 descriptors across both ends.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kycd_protocol::{HostStatementClaims, Jwks, VerifyError, VerifyOptions};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::statements::{PollOutcome, PollRecord, PollTarget, StatementStore};
use crate::store::StoreError;

/// Length of the nonce sent with each poll (the agent accepts 16–64).
pub const NONCE_LEN: usize = 32;
/// The URL-safe alphabet of nonces: 64 symbols, so `byte & 63` is unbiased.
const NONCE_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Outcomes recorded per transaction at most.
const RECORD_BATCH: usize = 1024;

/// Tunables and credentials of the poller.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Time between round starts.
    pub interval: Duration,
    /// Polls in flight at most.
    pub concurrency: usize,
    /// Per-host limit over connect, TLS, request and body.
    pub timeout: Duration,
    /// Largest accepted `|iat − now|`, seconds.
    pub max_skew_s: u64,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Longest backoff of a failing host.
    pub backoff_max: Duration,
    /// PEM CA bundle the agents' certificates chain to (then the only roots trusted);
    /// without it the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mTLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
    /// File holding the bearer token sent as `Authorization: Bearer …`.
    pub bearer_token_file: Option<PathBuf>,
    /// Allow `http://` agent URLs on loopback IPs.
    pub insecure_plaintext: bool,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            interval: Duration::from_secs(60),
            concurrency: 256,
            timeout: Duration::from_secs(10),
            max_skew_s: 60,
            max_body_bytes: 1 << 20,
            backoff_max: Duration::from_secs(3600),
            ca_file: None,
            client_cert: None,
            client_key: None,
            bearer_token_file: None,
            insecure_plaintext: false,
        }
    }
}

/// Why the poller cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PollSetupError {
    /// A CA, certificate, key or token file cannot be used.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Inconsistent settings.
    #[error("poller: {0}")]
    Config(String),
    /// The HTTP client cannot be built.
    #[error("poller: cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Why an agent URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentUrlError {
    /// Not a URL.
    #[error("{0:?} is not a URL")]
    Invalid(String),
    /// Neither https nor http.
    #[error("agent URLs are https:// (got scheme {0:?})")]
    Scheme(String),
    /// Plaintext where it is not allowed.
    #[error("http:// only for a loopback IP and with insecure plaintext allowed: {0}")]
    Plaintext(String),
    /// User info, a query or a fragment: an agent URL is a base (`https://host:9477`).
    #[error("an agent URL is scheme://host[:port][/path], without credentials, query or fragment: {0}")]
    NotABase(String),
}

/// Checks an agent base URL: `https://…`, or `http://` to a loopback IP when
/// `allow_plaintext` (as the agent allows plaintext only with `insecure_plaintext` on
/// loopback). Returns the parsed URL.
pub fn check_agent_url(url: &str, allow_plaintext: bool) -> Result<reqwest::Url, AgentUrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| AgentUrlError::Invalid(url.to_owned()))?;
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
        || parsed.host().is_none()
    {
        return Err(AgentUrlError::NotABase(url.to_owned()));
    }
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let loopback = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
            if loopback && allow_plaintext {
                Ok(parsed)
            } else {
                Err(AgentUrlError::Plaintext(url.to_owned()))
            }
        }
        other => Err(AgentUrlError::Scheme(other.to_owned())),
    }
}

/// The attestation URL of an agent base URL with `nonce`.
fn attestation_url(base: &reqwest::Url, nonce: &str) -> reqwest::Url {
    let mut url = base.clone();
    let path = format!("{}/v1/attestation", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(Some(&format!("nonce={nonce}")));
    url
}

/// A fresh random nonce: [`NONCE_LEN`] characters of `[A-Za-z0-9_-]` from the OS RNG.
pub fn generate_nonce() -> Result<String, rand_core::Error> {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; NONCE_LEN];
    rand_core::OsRng.try_fill_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| char::from(NONCE_ALPHABET[usize::from(b & 63)])).collect())
}

/// What went wrong with a poll, as recorded (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PollErrorKind {
    /// Connection refused, no route, DNS, TLS handshake (untrusted certificate, client
    /// certificate refused).
    Unreachable,
    /// The per-host timeout elapsed.
    Timeout,
    /// An HTTP status other than 200.
    HttpStatus,
    /// The signature does not verify with the enrolled key (or names another key).
    BadSignature,
    /// The statement does not echo the nonce sent.
    NonceMismatch,
    /// The statement's `iss` is not the polled host.
    HostMismatch,
    /// `iat` (or `exp`) too far from the collector's clock.
    ClockSkew,
    /// Not a well-formed statement.
    Malformed,
    /// The body exceeds the cap.
    TooLarge,
    /// The stored agent URL is refused by [`check_agent_url`].
    BadUrl,
    /// A local failure (no randomness for the nonce).
    Internal,
}

impl PollErrorKind {
    /// The recorded name.
    pub fn as_str(self) -> &'static str {
        match self {
            PollErrorKind::Unreachable => "unreachable",
            PollErrorKind::Timeout => "timeout",
            PollErrorKind::HttpStatus => "http_status",
            PollErrorKind::BadSignature => "bad_signature",
            PollErrorKind::NonceMismatch => "nonce_mismatch",
            PollErrorKind::HostMismatch => "host_mismatch",
            PollErrorKind::ClockSkew => "clock_skew",
            PollErrorKind::Malformed => "malformed",
            PollErrorKind::TooLarge => "too_large",
            PollErrorKind::BadUrl => "bad_url",
            PollErrorKind::Internal => "internal",
        }
    }
}

fn failed(kind: PollErrorKind, detail: impl Into<String>) -> PollOutcome {
    PollOutcome::Failed { kind: kind.as_str().to_owned(), detail: detail.into() }
}

/// The error and its sources, one line (reqwest's Display alone hides the TLS reason).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn classify_verify(e: &VerifyError) -> PollErrorKind {
    match e {
        VerifyError::BadSignature(_)
        | VerifyError::UnknownKey(_)
        | VerifyError::AmbiguousKey(_)
        | VerifyError::KeyAlgorithmMismatch { .. } => PollErrorKind::BadSignature,
        VerifyError::Expired { .. }
        | VerifyError::NotYetValid { .. }
        | VerifyError::IssuedInFuture { .. } => PollErrorKind::ClockSkew,
        VerifyError::TooLarge { .. } => PollErrorKind::TooLarge,
        _ => PollErrorKind::Malformed,
    }
}

/// Checks a received statement against what was asked (host, nonce, time `now`).
pub fn verify_statement(
    target: &PollTarget,
    body: &[u8],
    nonce: &str,
    now: i64,
    max_skew_s: u64,
) -> Result<HostStatementClaims, (PollErrorKind, String)> {
    let jwks = Jwks::from_keys([target.public_key.clone()])
        .map_err(|e| (PollErrorKind::Internal, format!("enrolled key unusable: {e}")))?;
    let token = body.trim_ascii();
    let options = VerifyOptions { max_token_bytes: body.len().max(1), clock_skew_s: max_skew_s };
    let claims = kycd_protocol::verify::<HostStatementClaims>(token, &jwks, &options, now)
        .map_err(|e| (classify_verify(&e), e.to_string()))?
        .claims;
    if claims.iss != target.host_id {
        return Err((
            PollErrorKind::HostMismatch,
            format!("statement is from {:?}, polled {:?}", claims.iss, target.host_id),
        ));
    }
    if claims.nonce != nonce {
        return Err((PollErrorKind::NonceMismatch, format!("sent nonce {nonce:?}, got {:?}", claims.nonce)));
    }
    let skew = claims.iat.saturating_sub(now).unsigned_abs();
    if skew > max_skew_s {
        return Err((
            PollErrorKind::ClockSkew,
            format!("iat {} is {skew} s from the collector's clock {now} (max {max_skew_s} s)", claims.iat),
        ));
    }
    Ok(claims)
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// When a host with `failures` consecutive failures, last tried at `last_attempt_at`, may
/// be polled again (None: now). See the module doc.
pub fn next_attempt_at(
    host_id: &str,
    last_attempt_at: Option<i64>,
    failures: u32,
    interval: Duration,
    backoff_max: Duration,
) -> Option<i64> {
    use std::hash::{Hash as _, Hasher as _};
    let last = last_attempt_at?;
    if failures == 0 {
        return None;
    }
    let base = interval.as_secs_f64().max(1.0);
    let exp = base * 2f64.powi(i32::try_from(failures.saturating_sub(1).min(30)).unwrap_or(30));
    let delay = exp.min(backoff_max.as_secs_f64());
    // Deterministic jitter: the same host and failure count always give the same delay (so
    // a restart does not reshuffle), different hosts failing together spread out.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (host_id, failures).hash(&mut hasher);
    let jitter = 0.5 + 0.5 * (hasher.finish() % 1_000_000) as f64 / 1_000_000.0;
    Some(last.saturating_add((delay * jitter).ceil() as i64))
}

/// What one round did.
#[derive(Debug, Clone, Default)]
pub struct RoundReport {
    /// Hosts polled.
    pub polled: usize,
    /// Verified statements.
    pub ok: usize,
    /// Failures, by kind.
    pub failed: std::collections::BTreeMap<&'static str, usize>,
    /// Hosts skipped because they are backing off.
    pub backing_off: usize,
    /// Outcomes that could not be recorded (database errors).
    pub unrecorded: usize,
    /// Each poll's duration (request to verified or failed), in completion order.
    pub latencies: Vec<Duration>,
    /// The whole round, recording included.
    pub elapsed: Duration,
}

/// The poller: a configured HTTP client and the store.
#[derive(Debug, Clone)]
pub struct Poller {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn StatementStore>,
    client: reqwest::Client,
    bearer: Option<String>,
    config: PollerConfig,
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> PollSetupError {
    PollSetupError::File { path: path.to_owned(), reason: reason.to_string() }
}

fn read_file(path: &Path) -> Result<Vec<u8>, PollSetupError> {
    let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return Err(file_err(path, "not a regular file of at most 1 MiB"));
    }
    std::fs::read(path).map_err(|e| file_err(path, e))
}

/// Builds the HTTP client of the poller from `config`.
pub fn build_client(config: &PollerConfig) -> Result<reqwest::Client, PollSetupError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .pool_max_idle_per_host(0)
        .user_agent(concat!("kycd-collector/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_file {
        let certs =
            reqwest::Certificate::from_pem_bundle(&read_file(path)?).map_err(|e| file_err(path, e))?;
        if certs.is_empty() {
            return Err(file_err(path, "no PEM certificate in it"));
        }
        // A private agent CA replaces the system roots: a public CA must not be able to
        // impersonate an agent.
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            let mut pem = read_file(cert)?;
            pem.push(b'\n');
            pem.extend(read_file(key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| file_err(cert, chain(&e)))?;
            builder = builder.identity(identity);
        }
        (None, None) => {}
        _ => return Err(PollSetupError::Config("set both the client certificate and its key".into())),
    }
    if config.concurrency == 0 {
        return Err(PollSetupError::Config("concurrency must be at least 1".into()));
    }
    builder.build().map_err(PollSetupError::Client)
}

impl Poller {
    /// A poller over `store` with `config` (reads the CA, client identity and token files).
    pub fn new(store: Arc<dyn StatementStore>, config: PollerConfig) -> Result<Poller, PollSetupError> {
        let client = build_client(&config)?;
        let bearer = match &config.bearer_token_file {
            Some(path) => {
                let token = String::from_utf8(read_file(path)?).map_err(|e| file_err(path, e))?;
                let token = token.trim().to_owned();
                if token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()) {
                    return Err(file_err(path, "the bearer token must be printable ASCII without spaces"));
                }
                Some(token)
            }
            None => None,
        };
        Ok(Poller { inner: Arc::new(Inner { store, client, bearer, config }) })
    }

    /// Polls one host and verifies its statement (nothing is recorded).
    pub async fn poll_host(&self, target: &PollTarget) -> PollOutcome {
        self.inner.poll_host(target).await
    }

    /// One round: every target not backing off, at most `concurrency` at once, outcomes
    /// recorded in batches. Stops early (recording what finished) on `shutdown`.
    pub async fn round(&self, shutdown: &CancellationToken) -> Result<RoundReport, StoreError> {
        let started = Instant::now();
        let inner = self.inner.clone();
        let store = inner.store.clone();
        let (targets, status) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.poll_targets()?, store.host_poll_status()?))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("poll target query task: {e}")))??;
        let now = unix_now();
        let status: std::collections::HashMap<String, (Option<i64>, u32)> =
            status.into_iter().map(|s| (s.host_id, (s.last_attempt_at, s.consecutive_failures))).collect();
        let mut report = RoundReport::default();
        let due: Vec<PollTarget> = targets
            .into_iter()
            .filter(|t| {
                let (last, failures) = status.get(&t.host_id).copied().unwrap_or((None, 0));
                let next = next_attempt_at(
                    &t.host_id,
                    last,
                    failures,
                    inner.config.interval,
                    inner.config.backoff_max,
                );
                let due = next.is_none_or(|at| at <= now);
                if !due {
                    report.backing_off += 1;
                }
                due
            })
            .collect();

        let (tx, mut rx) = mpsc::channel::<(PollRecord, Duration)>(RECORD_BATCH * 2);
        let writer_store = inner.store.clone();
        let writer = tokio::spawn(async move {
            let mut report = RoundReport::default();
            let mut buf = Vec::with_capacity(RECORD_BATCH);
            while rx.recv_many(&mut buf, RECORD_BATCH).await > 0 {
                let batch: Vec<PollRecord> = buf
                    .drain(..)
                    .map(|(record, latency)| {
                        report.latencies.push(latency);
                        match &record.outcome {
                            PollOutcome::Ok { .. } => report.ok += 1,
                            PollOutcome::Failed { kind, .. } => {
                                let kind = failure_kind_name(kind);
                                *report.failed.entry(kind).or_default() += 1;
                            }
                        }
                        record
                    })
                    .collect();
                let n = batch.len();
                let store = writer_store.clone();
                let recorded = tokio::task::spawn_blocking(move || store.record_polls(&batch)).await;
                match recorded {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, polls = n, "cannot record poll outcomes");
                        report.unrecorded += n;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, polls = n, "poll recording task failed");
                        report.unrecorded += n;
                    }
                }
            }
            report
        });

        let slots = Arc::new(Semaphore::new(inner.config.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for target in due {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            // Reap finished tasks so the set stays as small as the concurrency.
            while tasks.try_join_next().is_some() {}
            report.polled += 1;
            let inner = inner.clone();
            let tx = tx.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let polled_at = unix_now();
                let t0 = Instant::now();
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    o = inner.poll_host(&target) => o,
                };
                let record = PollRecord { host_id: target.host_id, polled_at, outcome };
                let _ = tx.send((record, t0.elapsed())).await;
            });
        }
        drop(tx);
        while tasks.join_next().await.is_some() {}
        let written = writer.await.map_err(|e| StoreError::Unavailable(format!("poll writer task: {e}")))?;
        report.ok = written.ok;
        report.failed = written.failed;
        report.unrecorded = written.unrecorded;
        report.latencies = written.latencies;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Runs rounds every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.inner.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            match self.round(&shutdown).await {
                Ok(r) => tracing::info!(
                    polled = r.polled,
                    ok = r.ok,
                    failed = ?r.failed,
                    backing_off = r.backing_off,
                    unrecorded = r.unrecorded,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    "poll round done"
                ),
                Err(e) => tracing::warn!(error = %e, "poll round failed"),
            }
        }
        tracing::info!("poller stopped");
    }
}

/// The static name of a recorded failure kind (for counting).
fn failure_kind_name(kind: &str) -> &'static str {
    [
        PollErrorKind::Unreachable,
        PollErrorKind::Timeout,
        PollErrorKind::HttpStatus,
        PollErrorKind::BadSignature,
        PollErrorKind::NonceMismatch,
        PollErrorKind::HostMismatch,
        PollErrorKind::ClockSkew,
        PollErrorKind::Malformed,
        PollErrorKind::TooLarge,
        PollErrorKind::BadUrl,
    ]
    .into_iter()
    .map(PollErrorKind::as_str)
    .find(|k| *k == kind)
    .unwrap_or("internal")
}

impl Inner {
    async fn poll_host(&self, target: &PollTarget) -> PollOutcome {
        let base = match check_agent_url(&target.agent_url, self.config.insecure_plaintext) {
            Ok(url) => url,
            Err(e) => return failed(PollErrorKind::BadUrl, e.to_string()),
        };
        let nonce = match generate_nonce() {
            Ok(n) => n,
            Err(e) => return failed(PollErrorKind::Internal, format!("no randomness for the nonce: {e}")),
        };
        let fetched =
            tokio::time::timeout(self.config.timeout, self.fetch(&attestation_url(&base, &nonce))).await;
        let body = match fetched {
            Err(_) => {
                return failed(PollErrorKind::Timeout, format!("no answer within {:?}", self.config.timeout))
            }
            Ok(Err((kind, detail))) => return failed(kind, detail),
            Ok(Ok(body)) => body,
        };
        match verify_statement(target, &body, &nonce, unix_now(), self.config.max_skew_s) {
            Ok(claims) => match String::from_utf8(body) {
                Ok(token) => PollOutcome::Ok { claims, token: token.trim().to_owned() },
                Err(_) => failed(PollErrorKind::Malformed, "body is not UTF-8"),
            },
            Err((kind, detail)) => failed(kind, detail),
        }
    }

    async fn fetch(&self, url: &reqwest::Url) -> Result<Vec<u8>, (PollErrorKind, String)> {
        let transport = |e: reqwest::Error| {
            let kind = if e.is_timeout() { PollErrorKind::Timeout } else { PollErrorKind::Unreachable };
            (kind, chain(&e))
        };
        let mut request = self.client.get(url.clone());
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(transport)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err((PollErrorKind::HttpStatus, format!("HTTP {}", response.status())));
        }
        let cap = self.config.max_body_bytes;
        if response.content_length().is_some_and(|n| n > cap as u64) {
            return Err((PollErrorKind::TooLarge, format!("content-length over the {cap}-byte cap")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > cap {
                return Err((PollErrorKind::TooLarge, format!("body over the {cap}-byte cap")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Starts the poller as a task (`kycd-collector serve` with polling enabled).
pub fn spawn(
    store: Arc<dyn StatementStore>,
    config: PollerConfig,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, PollSetupError> {
    let poller = Poller::new(store, config)?;
    Ok(tokio::spawn(poller.run(shutdown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_fresh_url_safe_and_the_right_length() {
        let a = generate_nonce().unwrap();
        let b = generate_nonce().unwrap();
        assert_ne!(a, b);
        for n in [&a, &b] {
            assert_eq!(n.len(), NONCE_LEN);
            assert!(n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'), "{n}");
        }
        // Every symbol of the alphabet shows up: the mapping is not stuck on a subset.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.extend(generate_nonce().unwrap().bytes());
        }
        assert_eq!(seen.len(), 64);
    }

    #[test]
    fn agent_url_rules() {
        assert!(check_agent_url("https://node-1.example:9477", false).is_ok());
        assert!(check_agent_url("https://10.0.0.1:9477/", false).is_ok());
        assert!(check_agent_url("http://127.0.0.1:9477", true).is_ok());
        assert!(check_agent_url("http://[::1]:9477", true).is_ok());
        assert!(check_agent_url("http://127.3.2.1:9477", true).is_ok());
        let plaintext =
            |u: &str, allow| matches!(check_agent_url(u, allow), Err(AgentUrlError::Plaintext(_)));
        assert!(plaintext("http://127.0.0.1:9477", false));
        assert!(plaintext("http://10.0.0.1:9477", true));
        assert!(plaintext("http://localhost:9477", true), "names may resolve anywhere");
        assert!(matches!(check_agent_url("ftp://h", true), Err(AgentUrlError::Scheme(_))));
        assert!(matches!(check_agent_url("not a url", true), Err(AgentUrlError::Invalid(_))));
        for bad in ["https://u:p@h:9477", "https://h:9477/?x=1", "https://h:9477/#f"] {
            assert!(matches!(check_agent_url(bad, false), Err(AgentUrlError::NotABase(_))), "{bad}");
        }
    }

    #[test]
    fn attestation_urls_keep_the_base_path() {
        let base = check_agent_url("https://h:9477", false).unwrap();
        assert_eq!(attestation_url(&base, "abc").as_str(), "https://h:9477/v1/attestation?nonce=abc");
        let base = check_agent_url("https://h:9477/agent/", false).unwrap();
        assert_eq!(attestation_url(&base, "abc").as_str(), "https://h:9477/agent/v1/attestation?nonce=abc");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let i = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        assert_eq!(next_attempt_at("h", None, 3, i, max), None, "never tried");
        assert_eq!(next_attempt_at("h", Some(1000), 0, i, max), None, "healthy");
        let delay = |f| next_attempt_at("h", Some(1000), f, i, max).unwrap() - 1000;
        for f in 1..=6u32 {
            let full = (60 * 2i64.pow(f - 1)).min(3600);
            assert!(delay(f) >= full / 2 && delay(f) <= full, "f={f}: {}", delay(f));
        }
        assert!(delay(40) <= 3600 && delay(40) >= 1800);
        assert_eq!(delay(3), delay(3), "deterministic");
        let spread: std::collections::HashSet<i64> =
            (0..50).map(|h| next_attempt_at(&format!("host-{h}"), Some(0), 4, i, max).unwrap()).collect();
        assert!(spread.len() > 10, "hosts failing together spread out: {spread:?}");
    }
}
