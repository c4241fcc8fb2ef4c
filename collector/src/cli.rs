//! The command line of `kycd-collector`, in the library so that man pages and shell
//! completions are generated from the same definitions the binary parses with.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the database lives unless `--db` says otherwise.
pub const DEFAULT_DB: &str = "sqlite:///var/lib/kycd-collector/kycd.db";

#[derive(Debug, Parser)]
#[command(
    name = "kycd-collector",
    version,
    about = "kycd collector: ingests signed host usage reports, aggregates tenants' compute across \
             hosts, raises findings, distributes the signed policy, exports for filings"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve report ingest (POST /v1/reports), the policy (GET /v1/policy), the read API
    /// (/v1/tenants, /v1/findings, /v1/hosts, the HTML overview at /) and /healthz, and
    /// evaluate findings periodically.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9478")]
        listen: SocketAddr,
        /// Database URL (sqlite:///path, a plain path, or postgres://user@host/db).
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        /// File holding the bearer token the read API (/, /v1/tenants, /v1/findings,
        /// /v1/hosts) requires. Without it the read API answers loopback clients only.
        #[arg(long, value_name = "FILE")]
        read_token_file: Option<PathBuf>,
        /// Seconds between findings evaluations (0: never, e.g. on ingest-only replicas).
        #[arg(long, default_value_t = 60)]
        evaluate_interval_s: u64,
        #[command(flatten)]
        rules: RuleArgs,
        /// Polling of the agents' signed host statements.
        #[command(flatten)]
        poll: PollArgs,
        /// Bounds of the HTTP listener.
        #[command(flatten)]
        connections: ConnectionArgs,
    },
    /// Publish and show the signed jurisdiction policy agents fetch from GET /v1/policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Evaluate and list findings.
    Findings {
        #[command(subcommand)]
        command: FindingsCommand,
    },
    /// Export per-tenant usage and findings for regulatory filings.
    Export {
        /// Start of the period: YYYY-MM-DD (UTC), RFC 3339, or Unix seconds.
        #[arg(long)]
        since: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::export::Format,
        /// Write to this file instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
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
    /// A key the host id never had starts a new enrollment epoch (a re-imaged host's agent
    /// numbers its reports from 1 again); re-adding a key it had continues that key's epoch.
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
    /// Remove a host's enrollment (its stored records and enrollment history are kept; a later
    /// `hosts add` with a new key starts the next epoch).
    Remove {
        /// Host id.
        #[arg(long)]
        host_id: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

/// Tunables of the findings rules.
#[derive(Debug, Clone, clap::Args)]
pub struct RuleArgs {
    /// A host with neither a stored report nor a verified poll answer for this many seconds is
    /// dark (raise `host_dark`); three poll intervals is the rule of thumb.
    #[arg(long, default_value_t = 180)]
    pub dark_after_s: i64,
    /// Seconds after a policy is published during which hosts may still show the previous
    /// version without a `policy_stale` finding (agents fetch on an interval).
    #[arg(long, default_value_t = 600)]
    pub policy_grace_s: i64,
    /// A host with a report batch refused for good (409 SeqConflict, 400 InvalidRecord,
    /// HostMismatch or Malformed after its signature verified) within this many seconds has a
    /// `report_rejected` finding open.
    #[arg(long, default_value_t = 86_400)]
    pub rejected_window_s: i64,
}

impl RuleArgs {
    /// As evaluation settings.
    pub fn settings(&self) -> crate::findings::EvaluationSettings {
        crate::findings::EvaluationSettings {
            dark_after_s: self.dark_after_s,
            policy_grace_s: self.policy_grace_s,
            rejected_window_s: self.rejected_window_s,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Verify a signed policy (compact JWS) against trust anchors and make it the published
    /// policy; refused unless its version is higher than the published one.
    Publish {
        /// The policy token file.
        file: PathBuf,
        /// JWKS file with the policy signer's public keys.
        #[arg(long, value_name = "JWKS")]
        trust: PathBuf,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Print the published policy's version, publication time, ETag and claims.
    Show {
        /// Print the token itself instead.
        #[arg(long)]
        token: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FindingsCommand {
    /// Run one evaluation now (what `serve` does every --evaluate-interval-s) and print what
    /// was raised and resolved.
    Evaluate {
        #[command(flatten)]
        rules: RuleArgs,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// List findings.
    List {
        /// Only `open` or `resolved`.
        #[arg(long)]
        state: Option<String>,
        /// Only this kind (early_warning, training_threshold_crossed, cluster_capacity_crossed,
        /// host_dark, policy_stale, enforcement_mismatch, report_rejected).
        #[arg(long)]
        kind: Option<String>,
        /// Only about this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
}
/// `serve` flags bounding the HTTP listener ([`crate::server::serve_bounded`]): clients that
/// open connections and never finish a request cannot starve ingest or `/healthz`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Most connections open at once; more are refused (closed at once), never queued.
    #[arg(long, value_name = "N", default_value_t = crate::server::DEFAULT_LIMITS.max_connections,
          value_parser = parse_max_connections)]
    pub max_connections: usize,
    /// Most connections open at once from one IP address (0: no per-IP cap, e.g. behind a
    /// load balancer whose one address carries every client).
    #[arg(long, value_name = "N", default_value_t = crate::server::DEFAULT_LIMITS.max_per_peer)]
    pub max_connections_per_ip: usize,
    /// Seconds a connection may take to send a complete request head (also how long an
    /// idle keep-alive connection stays open).
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub header_read_timeout_s: u64,
    /// Seconds without a byte moving on a connection (a stalled body, an unread answer)
    /// before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout_s: u64,
}

fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=65_536).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: expected 1 to 65536")),
    }
}

impl ConnectionArgs {
    /// The listener's bounds.
    pub fn limits(&self) -> kycd_net::Limits {
        kycd_net::Limits {
            max_connections: self.max_connections,
            max_per_peer: self.max_connections_per_ip,
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
        }
    }
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
