//! The poller's settings and its HTTP client: intervals, limits, the CA, client identity
//! and bearer token files, and why they cannot be used ([`PollSetupError`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::statement::chain;

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
    /// Hosts whose TLS sessions are kept for resumption (with `ca_file`): at least the number
    /// of hosts polled, so each round resumes every agent's session instead of a full
    /// handshake.
    pub tls_session_cache: usize,
    /// Keep each agent's connection open between rounds (HTTP/1.1 keep-alive, one idle
    /// connection per agent, closed after [`PollerConfig::interval`] +
    /// [`KEEP_ALIVE_MARGIN`]) where the agent keeps it too; off: a new connection per poll.
    pub keep_alive: bool,
}

/// How long past the poll interval an idle connection to an agent is kept: the next round
/// reaches a host at about the same offset into the round, late by at most the round's
/// jitter. Less than the 30 s margin of the agent's default keep-alive (90 s), so the
/// collector normally closes its idle connection before the agent would.
pub const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(15);

/// Default size of the TLS session cache, in hosts: a 12,500-host fleet with room.
pub const DEFAULT_TLS_SESSION_CACHE: usize = 16_384;

/// TLS 1.3 tickets rustls keeps per server: its cache is sized in tickets, this many per
/// server (`ClientSessionMemoryCache::new` divides by it), so a cache for N hosts holds N × 8.
const TICKETS_PER_HOST: usize = 8;

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
            tls_session_cache: DEFAULT_TLS_SESSION_CACHE,
            keep_alive: true,
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

pub(super) fn file_err(path: &Path, reason: impl std::fmt::Display) -> PollSetupError {
    PollSetupError::File { path: path.to_owned(), reason: reason.to_string() }
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, PollSetupError> {
    let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return Err(file_err(path, "not a regular file of at most 1 MiB"));
    }
    std::fs::read(path).map_err(|e| file_err(path, e))
}

/// The TLS configuration of a poller with a private agent CA: only that CA trusted, the
/// client certificate if given, and a session cache sized to the fleet. rustls keeps 256
/// sessions by default, so a round over more hosts than that evicts every session before
/// its host comes round again, and every poll pays a full handshake (an ECDHE key exchange
/// and certificate signature and verification on both sides); with the cache sized to the
/// fleet each poll after the first round resumes (TLS 1.3 tickets). Resumed sessions keep
/// the client certificate the agent verified in the full handshake.
fn tls_config(config: &PollerConfig, ca: &Path) -> Result<rustls::ClientConfig, PollSetupError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let pem = read_file(ca)?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| file_err(ca, e))?).map_err(|e| file_err(ca, e))?;
    }
    if roots.is_empty() {
        return Err(file_err(ca, "no PEM certificate in it"));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PollSetupError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(roots);
    let mut tls = match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read_file(cert)?)
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(cert, e))?;
            if chain.is_empty() {
                return Err(file_err(cert, "no PEM certificate in it"));
            }
            let key = PrivateKeyDer::from_pem_slice(&read_file(key)?).map_err(|e| file_err(key, e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| file_err(cert, e))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(PollSetupError::Config("set both the client certificate and its key".into())),
    };
    let tickets = config.tls_session_cache.max(1).saturating_mul(TICKETS_PER_HOST);
    tls.resumption = rustls::client::Resumption::in_memory_sessions(tickets);
    Ok(tls)
}

/// Builds the HTTP client of the poller from `config`.
///
/// With [`PollerConfig::keep_alive`] the pool keeps one idle connection per agent (per
/// scheme, host and port) for the poll interval + [`KEEP_ALIVE_MARGIN`], so each round reuses
/// the last round's connection where the agent kept it open: no TCP or TLS handshake at
/// all. The pool has no global cap, so it is bounded by the fleet: 10,000 agents hold 10,000
/// idle TLS connections between rounds — 10,000 descriptors (`LimitNOFILE=65536` in
/// kycd-collector.service) and, measured in the poll bench, about 26 KiB of memory each
/// (260 MiB for 10,000; BENCHMARKS.md). A connection the agent closed is dropped from the pool when the close is
/// seen, and a poll that finds it closed under its request is retried once on a new
/// connection ([`super::statement`]'s transport errors).
pub fn build_client(config: &PollerConfig) -> Result<reqwest::Client, PollSetupError> {
    let (idle_per_host, idle_timeout) = if config.keep_alive {
        (1, Some(config.interval.saturating_add(KEEP_ALIVE_MARGIN)))
    } else {
        (0, None)
    };
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .pool_max_idle_per_host(idle_per_host)
        .pool_idle_timeout(idle_timeout)
        .user_agent(concat!("kycd-collector/", env!("CARGO_PKG_VERSION")));
    if config.concurrency == 0 {
        return Err(PollSetupError::Config("concurrency must be at least 1".into()));
    }
    if let Some(ca) = &config.ca_file {
        // The deployment with a private agent CA: rustls configured here (roots, client
        // certificate, session cache); reqwest uses it as given.
        return builder
            .use_preconfigured_tls(tls_config(config, ca)?)
            .build()
            .map_err(PollSetupError::Client);
    }
    // System roots (no private CA): reqwest's own rustls configuration.
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
    builder.build().map_err(PollSetupError::Client)
}
