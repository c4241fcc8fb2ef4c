//! `[api]` and `[log]`: how the daemon serves operators (the local socket API) and logs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The operators' Unix socket (HTTP/1.1 JSON). Mutations (admit) are for root only.
    pub socket: PathBuf,
    /// A group given read access to the socket (mode 0660); absent: root only (0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Most connections open on the socket at once; more are refused (closed at once). Keep it
    /// well below the process's file-descriptor limit (`LimitNOFILE=` in kycd.service).
    pub max_connections: usize,
    /// Most connections open at once from one user (uid) other than root; more from that user
    /// are refused, so one member of `socket_group` cannot lock out the others or root.
    pub max_connections_per_user: usize,
    /// Seconds a connection may take to send a complete request head (also the longest an
    /// idle keep-alive connection stays open).
    pub header_read_timeout_s: u64,
    /// Seconds without a byte moving on a connection (a stalled body, an unread answer)
    /// before it is closed. Longer than the 10 s a request waits for the agent.
    pub idle_timeout_s: u64,
}

impl ApiConfig {
    /// The socket's bounds, for [`kycd_net::serve`].
    pub fn limits(&self) -> kycd_net::Limits {
        kycd_net::Limits {
            max_connections: self.max_connections,
            max_per_peer: self.max_connections_per_user,
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
            // As before: an idle keep-alive connection lasts as long as a fresh one.
            keep_alive_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from("/run/kycd/kycd.sock"),
            socket_group: None,
            max_connections: 64,
            max_connections_per_user: 16,
            header_read_timeout_s: 10,
            idle_timeout_s: 30,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `kycd=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}
