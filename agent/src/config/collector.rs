//! `[collector_api]` and `[reporting]`: the agent's two links with the collector (the HTTPS API
//! it serves to it, the usage reports it uploads to it).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[collector_api]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorApiConfig {
    /// Serve it.
    pub enabled: bool,
    /// `IP:PORT`.
    pub listen: String,
    /// Server certificate chain (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA whose client certificates are accepted (mTLS); absent: no client certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// A file holding the bearer token collectors must present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// Serve plain HTTP (loopback addresses only).
    pub insecure_plaintext: bool,
    /// Most connections open at once; more are refused (closed at once).
    pub max_connections: usize,
    /// Most connections open at once from one IP address; more from it are refused.
    pub max_connections_per_ip: usize,
    /// Seconds an answered connection may wait idle for its next request (HTTP/1.1
    /// keep-alive): longer than the collector's poll interval, so a collector polling every
    /// 60 s reuses its connection instead of a new TLS handshake each round. An idle
    /// connection still holds one of `max_connections` (and of its IP's
    /// `max_connections_per_ip`).
    pub keep_alive_s: u64,
}

/// Default [`CollectorApiConfig::keep_alive_s`]: the collector's default 60 s poll interval
/// plus 30 s for where in its round a host comes (a round over 10,000 hosts takes seconds)
/// and a late round. The collector gives up its idle connection first (after its interval +
/// 15 s), so the agent rarely closes one the collector is about to use.
pub const DEFAULT_KEEP_ALIVE_S: u64 = 90;

impl CollectorApiConfig {
    /// The listener's bounds, for [`kycd_net::serve`].
    pub fn limits(&self) -> kycd_net::Limits {
        kycd_net::Limits {
            max_connections: self.max_connections,
            max_per_peer: self.max_connections_per_ip,
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(30),
            keep_alive_timeout: std::time::Duration::from_secs(self.keep_alive_s),
        }
    }
}

impl Default for CollectorApiConfig {
    fn default() -> Self {
        CollectorApiConfig {
            enabled: false,
            listen: "[::]:9477".into(),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            bearer_token_file: None,
            insecure_plaintext: false,
            max_connections: 512,
            max_connections_per_ip: 128,
            keep_alive_s: DEFAULT_KEEP_ALIVE_S,
        }
    }
}

/// `[reporting]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportingConfig {
    /// Collector base URL (`https://collector:9478`); reports go to `{url}/v1/reports`.
    /// Absent: nothing is uploaded, but windows are still spooled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector_url: Option<String>,
    /// PEM CA certificate(s) trusted for the collector in addition to the system store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Group commit: the first window of a batch waits at most this long for others before
    /// the batch is written and fsync'd (0: commit what is queued at once).
    pub group_commit_ms: u64,
    /// A spool segment is sealed at this size.
    pub segment_max_bytes: u64,
    /// Cap on the spool; near it the oldest windows are merged per (tenant, workload).
    pub spool_max_bytes: u64,
    /// Most records per upload.
    pub batch_max_records: usize,
    /// Upload at least this often (seconds) while records are pending.
    pub batch_max_s: u64,
    /// Cap of the exponential retry backoff (seconds; base 1 s, full jitter).
    pub backoff_max_s: u64,
    /// TCP/TLS connect timeout (seconds).
    pub connect_timeout_s: u64,
    /// Whole-request timeout (seconds).
    pub request_timeout_s: u64,
}

impl Default for ReportingConfig {
    fn default() -> Self {
        ReportingConfig {
            collector_url: None,
            ca_file: None,
            group_commit_ms: 100,
            segment_max_bytes: 4 << 20,
            spool_max_bytes: 256 << 20,
            batch_max_records: 1000,
            batch_max_s: 10,
            backoff_max_s: 300,
            connect_timeout_s: 10,
            request_timeout_s: 60,
        }
    }
}
