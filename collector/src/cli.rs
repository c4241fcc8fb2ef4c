//! The command line of `kycd-collector`, in the library so that man pages and shell
//! completions are generated from the same definitions the binary parses with.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the database lives unless `--db` says otherwise.
pub const DEFAULT_DB: &str = "sqlite:///var/lib/kycd-collector/kycd.db";

#[derive(Debug, Parser)]
#[command(name = "kycd-collector", about = "kycd collector: ingest of signed host usage reports")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve POST /v1/reports and GET /healthz.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9478")]
        listen: SocketAddr,
        /// Database URL (sqlite:///path, or a plain path).
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        /// Polling of the agents' signed host statements.
        #[command(flatten)]
        poll: PollArgs,
    },
    /// Manage enrolled hosts.
    Hosts {
        #[command(subcommand)]
        command: HostsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Enroll a host with its public Ed25519 JWK (as `kycctl host-key --public` prints it).
    Add {
        /// Host id (must equal the JWK's kid).
        #[arg(long)]
        host_id: String,
        /// File with the public JWK.
        #[arg(long)]
        public_jwk: PathBuf,
        /// Base URL of the host's agent collector API (e.g. https://node-1:9477), to poll it.
        #[arg(long)]
        agent_url: Option<String>,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Set or clear the agent URL the collector polls a host at.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["url", "clear"])))]
    SetAgentUrl {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Base URL of the agent's collector API (https://…; http:// only to a loopback IP).
        #[arg(long)]
        url: Option<String>,
        /// Stop polling the host.
        #[arg(long)]
        clear: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List enrolled hosts (with agent URL and last poll status).
    List {
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Remove a host's enrollment (its stored records are kept).
    Remove {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// `serve` flags of the agent poller ([`crate::poll`]).
#[derive(Debug, Clone, clap::Args)]
pub struct PollArgs {
    /// Seconds between poll rounds over the hosts with an agent URL (0: no polling).
    #[arg(long, default_value_t = 60)]
    pub poll_interval_s: u64,
    /// Polls in flight at most.
    #[arg(long, default_value_t = 256)]
    pub poll_concurrency: usize,
    /// Per-host timeout (connect, TLS, request and body), seconds.
    #[arg(long, default_value_t = 10)]
    pub poll_timeout_s: u64,
    /// Largest accepted difference between a statement's iat and the collector's clock, seconds.
    #[arg(long, default_value_t = 60)]
    pub poll_max_skew_s: u64,
    /// PEM CA bundle of the agents' certificates (then the only roots trusted).
    #[arg(long)]
    pub poll_ca_file: Option<PathBuf>,
    /// PEM client certificate for mTLS to the agents.
    #[arg(long, requires = "poll_client_key")]
    pub poll_client_cert: Option<PathBuf>,
    /// PEM private key of --poll-client-cert.
    #[arg(long, requires = "poll_client_cert")]
    pub poll_client_key: Option<PathBuf>,
    /// File with the bearer token the agents expect.
    #[arg(long)]
    pub poll_bearer_token_file: Option<PathBuf>,
    /// Allow http:// agent URLs to loopback IPs (tests and demos only).
    #[arg(long)]
    pub poll_insecure_plaintext: bool,
}

impl PollArgs {
    /// The poller configuration, or None when polling is off (`--poll-interval-s 0`).
    pub fn to_config(&self) -> Option<crate::poll::PollerConfig> {
        if self.poll_interval_s == 0 {
            return None;
        }
        Some(crate::poll::PollerConfig {
            interval: std::time::Duration::from_secs(self.poll_interval_s),
            concurrency: self.poll_concurrency,
            timeout: std::time::Duration::from_secs(self.poll_timeout_s.max(1)),
            max_skew_s: self.poll_max_skew_s,
            ca_file: self.poll_ca_file.clone(),
            client_cert: self.poll_client_cert.clone(),
            client_key: self.poll_client_key.clone(),
            bearer_token_file: self.poll_bearer_token_file.clone(),
            insecure_plaintext: self.poll_insecure_plaintext,
            ..crate::poll::PollerConfig::default()
        })
    }
}
