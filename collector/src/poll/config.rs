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
