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
//! Connections: with [`PollerConfig::keep_alive`] (the default) each agent's connection stays
//! open between rounds (HTTP/1.1 keep-alive, one idle connection per agent for the interval
//! plus 15 s), so a round costs no TCP or TLS handshake where the agent kept it open too (its
//! `collector_api.keep_alive_s`, 90 s by default); otherwise the next poll opens a new
//! connection and resumes the TLS session ([`PollerConfig::tls_session_cache`]). The price
//! is one idle connection per agent at both ends: a descriptor and ~26 KiB each at the
//! collector (10,000 agents: BENCHMARKS.md, polling), within each agent's per-IP cap of its collector
//! API (a listener of its own, so never a place of the operator socket). A request that
//! fails because the agent closed the kept connection under it is retried once on a new
//! connection, within the same per-host timeout: a stale connection never fails a poll.

//!
//! Layout: [`config`] (settings, HTTP client), [`statement`] (nonce, URL, verification,
//! failure kinds), [`schedule`] (backoff); this file runs the rounds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::clock::{Clock, SystemClock};
use kycd_protocol::{statement_body_digest, statement_body_part};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::statements::{PollOutcome, PollRecord, PollTarget, StatementStore};
use crate::store::error::StoreError;

pub mod config;
pub mod schedule;
pub mod statement;

pub use config::{build_client, PollSetupError, PollerConfig, DEFAULT_TLS_SESSION_CACHE};
use config::{file_err, read_file};
pub use schedule::next_attempt_at;
use statement::{attestation_url, chain, failed, failure_kind_name};
pub use statement::{
    check_agent_url, generate_nonce, verify_statement, AgentUrlError, PollErrorKind, NONCE_LEN,
};

/// Outcomes recorded per transaction at most.
const RECORD_BATCH: usize = 1024;

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

/// The body of a host's last verified digest-bound statement, sent back as `have` so the
/// agent can leave it out while it is still the current one.
#[derive(Debug)]
struct KnownBody {
    /// Its `body_sha256`.
    digest: String,
    /// The body part as received (base64url).
    body_b64: Box<[u8]>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn StatementStore>,
    /// Per host polled, the body of its last verified digest-bound statement: one entry per
    /// host, replaced as bodies change and dropped with hosts that are no longer polled.
    bodies: std::sync::Mutex<HashMap<String, Arc<KnownBody>>>,
    /// Poll times, skew checks and latencies.
    clock: Arc<dyn Clock>,
    client: reqwest::Client,
    bearer: Option<String>,
    config: PollerConfig,
}

impl Poller {
    /// A poller over `store` with `config` (reads the CA, client identity and token files).
    pub fn new(store: Arc<dyn StatementStore>, config: PollerConfig) -> Result<Poller, PollSetupError> {
        Self::with_clock(store, config, Arc::new(SystemClock))
    }

    /// [`Poller::new`] reading time from `clock`.
    pub fn with_clock(
        store: Arc<dyn StatementStore>,
        config: PollerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Poller, PollSetupError> {
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
        let bodies = std::sync::Mutex::default();
        Ok(Poller { inner: Arc::new(Inner { store, bodies, clock, client, bearer, config }) })
    }

    /// The HTTP client the polls go through (its pool holds the kept connections): for a
    /// baseline over the same connections.
    pub fn client(&self) -> &reqwest::Client {
        &self.inner.client
    }

    /// Polls one host and verifies its statement (nothing is recorded).
    pub async fn poll_host(&self, target: &PollTarget) -> PollOutcome {
        self.inner.poll_host(target).await
    }

    /// One round: every target not backing off, at most `concurrency` at once, outcomes
    /// recorded in batches. Stops early (recording what finished) on `shutdown`.
    pub async fn round(&self, shutdown: &CancellationToken) -> Result<RoundReport, StoreError> {
        let inner = self.inner.clone();
        let started = inner.clock.instant();
        let store = inner.store.clone();
        let (targets, status) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.poll_targets()?, store.host_poll_status()?))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("poll target query task: {e}")))??;
        inner.keep_bodies_of(&targets);
        let now = inner.clock.unix_now();
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
                let polled_at = inner.clock.unix_now();
                let t0 = inner.clock.instant();
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    o = inner.poll_host(&target) => o,
                };
                let record = PollRecord { host_id: target.host_id, polled_at, outcome };
                let latency = inner.clock.instant().saturating_duration_since(t0);
                let _ = tx.send((record, latency)).await;
            });
        }
        drop(tx);
        while tasks.join_next().await.is_some() {}
        let written = writer.await.map_err(|e| StoreError::Unavailable(format!("poll writer task: {e}")))?;
        report.ok = written.ok;
        report.failed = written.failed;
        report.unrecorded = written.unrecorded;
        report.latencies = written.latencies;
        report.elapsed = inner.clock.instant().saturating_duration_since(started);
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
        let known = self.known_body(&target.host_id);
        let url = attestation_url(&base, &nonce, known.as_ref().map(|k| k.digest.as_str()));
        let fetched = tokio::time::timeout(self.config.timeout, self.fetch(&url)).await;
        let mut body = match fetched {
            Err(_) => {
                return failed(PollErrorKind::Timeout, format!("no answer within {:?}", self.config.timeout))
            }
            Ok(Err((kind, detail))) => return failed(kind, detail),
            Ok(Ok(body)) => body,
        };
        body.truncate(body.trim_ascii_end().len());
        // `head~`: the agent left out the body we said we hold. It goes back in before
        // anything is verified, so what is verified and kept is the whole statement.
        if let (Some(known), Some(b"")) = (&known, statement_body_part(&body)) {
            body.extend_from_slice(&known.body_b64);
        }
        match verify_statement(target, &body, &nonce, self.clock.unix_now(), self.config.max_skew_s) {
            Ok(claims) => match String::from_utf8(body) {
                Ok(token) => {
                    let token = token.trim().to_owned();
                    self.remember_body(&target.host_id, known, &token);
                    PollOutcome::Ok { claims: Box::new(claims), token }
                }
                Err(_) => failed(PollErrorKind::Malformed, "body is not UTF-8"),
            },
            Err((kind, detail)) => failed(kind, detail),
        }
    }

    fn known_body(&self, host_id: &str) -> Option<Arc<KnownBody>> {
        self.bodies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(host_id).cloned()
    }

    /// Keeps the body of a verified digest-bound `token` for the next poll of the host (its
    /// digest computed only when it is not the one held already).
    fn remember_body(&self, host_id: &str, known: Option<Arc<KnownBody>>, token: &str) {
        let Some(body_b64) = statement_body_part(token.as_bytes()) else {
            return;
        };
        if known.is_some_and(|k| *k.body_b64 == *body_b64) {
            return;
        }
        let Ok(body) = kycd_protocol::b64::decode(body_b64) else {
            return;
        };
        let known = KnownBody { digest: statement_body_digest(&body), body_b64: body_b64.into() };
        self.bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host_id.to_owned(), Arc::new(known));
    }

    /// Forgets the bodies of hosts not among `polled` (no longer enrolled or without a URL).
    fn keep_bodies_of(&self, polled: &[PollTarget]) {
        let hosts: std::collections::HashSet<&str> = polled.iter().map(|t| t.host_id.as_str()).collect();
        self.bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|host, _| hosts.contains(host.as_str()));
    }

    async fn fetch(&self, url: &reqwest::Url) -> Result<Vec<u8>, (PollErrorKind, String)> {
        let transport = |e: reqwest::Error| {
            let kind = if e.is_timeout() { PollErrorKind::Timeout } else { PollErrorKind::Unreachable };
            (kind, chain(&e))
        };
        let send = || {
            let mut request = self.client.get(url.clone());
            if let Some(token) = &self.bearer {
                request = request.bearer_auth(token);
            }
            request.send()
        };
        let mut response = match send().await {
            // Sent on a kept connection the agent closed meanwhile (its keep-alive ran out as
            // the round reached it): no answer, nothing happened at the agent that matters
            // (a statement is only signed), so once more on a new connection. A refused or
            // timed-out connection is not retried.
            Err(e) if self.config.keep_alive && e.is_request() && !e.is_connect() && !e.is_timeout() => {
                tracing::debug!(%url, error = %chain(&e), "request failed before an answer; retrying on a new connection");
                send().await.map_err(transport)?
            }
            sent => sent.map_err(transport)?,
        };
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
