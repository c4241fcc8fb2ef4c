//! `kycd-collector serve`: ingest, the read API and policy, findings evaluation and agent
//! polling in one process, until SIGTERM/SIGINT; and the flags bounding them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use super::database::open;
use super::findings::RuleArgs;
use crate::ingest::{Ingestor, Limits};
use crate::store::Storage;

/// How long in-flight requests may run after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `serve` flags bounding the HTTP listener ([`crate::http::serve_bounded`]): clients that
/// open connections and never finish a request cannot starve ingest or `/healthz`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Most connections open at once; more are refused (closed at once), never queued.
    #[arg(long, value_name = "N", default_value_t = crate::http::DEFAULT_LIMITS.max_connections,
          value_parser = parse_max_connections)]
    pub max_connections: usize,
    /// Most connections open at once from one IP address (0: no per-IP cap, e.g. behind a
    /// load balancer whose one address carries every client).
    #[arg(long, value_name = "N", default_value_t = crate::http::DEFAULT_LIMITS.max_per_peer)]
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
            keep_alive_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
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
    /// Hosts whose TLS sessions are kept for resumption with --poll-ca-file: at least the
    /// number of hosts polled, so every poll after the first round resumes instead of a full
    /// handshake (about 2 KB of memory per host).
    #[arg(long, default_value_t = crate::poll::DEFAULT_TLS_SESSION_CACHE)]
    pub poll_tls_session_cache: usize,
    /// Open a new connection for every poll instead of keeping each agent's connection
    /// open between rounds (keep-alive costs one idle connection per agent at both ends).
    #[arg(long)]
    pub poll_no_keep_alive: bool,
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
            tls_session_cache: self.poll_tls_session_cache,
            keep_alive: !self.poll_no_keep_alive,
            ..crate::poll::PollerConfig::default()
        })
    }
}

/// What `serve` runs besides ingest.
#[derive(Debug)]
pub struct ServeOptions {
    /// Bounds of the HTTP listener.
    pub limits: kycd_net::Limits,
    /// The read API's bearer token file (none: loopback clients only).
    pub read_token_file: Option<PathBuf>,
    /// The named write tokens of finding actions (none: actions refused).
    pub write_token_file: Option<PathBuf>,
    /// Seconds between findings evaluations (0: never).
    pub evaluate_interval_s: u64,
    /// The findings rules.
    pub rules: RuleArgs,
    /// The agent poller.
    pub poll: PollArgs,
    /// Record retention.
    pub retention: super::records::RetentionArgs,
}

/// Runs `serve` on `listen` over the database `db` until SIGTERM/SIGINT.
pub async fn run(listen: SocketAddr, db: &str, options: ServeOptions) -> anyhow::Result<()> {
    // Off the reactor: the PostgreSQL client blocks on a runtime of its own.
    let owned = db.to_owned();
    let store =
        tokio::task::spawn_blocking(move || open(&owned, true)).await.context("opening the database")??;
    let access = match &options.read_token_file {
        Some(path) => {
            let token =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            if token.trim().len() < 16 {
                bail!("the read token in {} must be at least 16 characters", path.display());
            }
            crate::http::ReadAccess::token(&token)
        }
        None => crate::http::ReadAccess::loopback_only(),
    };
    let writers = match &options.write_token_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            crate::http::WriteAccess::parse(&text)
                .with_context(|| format!("write token file {}", path.display()))?
        }
        None => crate::http::WriteAccess::none(),
    };
    let api = crate::http::ApiState::new(Arc::clone(&store), access, writers);
    let ingestor = Arc::new(Ingestor::new(store.clone(), Limits::default()));
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %bound, db = %crate::store::postgres::redact_url(db), "collector serving");
    log_retention(&store, options.retention.min_s).await;
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        signals.cancel();
    });
    if options.evaluate_interval_s > 0 {
        tokio::spawn(crate::findings::run_evaluator(
            Arc::clone(&store),
            options.rules.settings(),
            Duration::from_secs(options.evaluate_interval_s),
            shutdown.clone(),
        ));
    }
    let _poller = spawn_poller(store.clone(), &options.poll, &shutdown)?;
    let app = crate::http::app(ingestor, api);
    let stats = Arc::new(kycd_net::ConnStats::default());
    let server =
        tokio::spawn(crate::http::serve_bounded(listener, app, options.limits, stats, shutdown.clone()));
    shutdown.cancelled().await;
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined.context("server task")??,
        Err(_) => tracing::warn!("in-flight requests still running after the grace period; exiting"),
    }
    Ok(())
}

/// Logs the effective record retention (the configured one, or the published policy's if
/// larger): what `records prune` will hold a cut-off against.
async fn log_retention(store: &Arc<dyn Storage>, configured: u64) {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || store.current_policy()).await {
        Ok(Ok(policy)) => {
            let (min_s, set_by) =
                crate::records::effective_min_s(configured, policy.as_ref().map(|p| &p.claims));
            tracing::info!(min_s, configured, set_by, "record retention");
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, configured, "record retention: cannot read the published policy")
        }
        Err(e) => tracing::warn!(error = %e, "record retention: task failed"),
    }
}

/// Starts the agent poller unless `--poll-interval-s 0`.
fn spawn_poller(
    store: Arc<dyn Storage>,
    args: &PollArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(config) = args.to_config() else {
        tracing::info!("agent polling off (--poll-interval-s 0)");
        return Ok(None);
    };
    tracing::info!(
        interval_s = config.interval.as_secs(),
        concurrency = config.concurrency,
        "agent polling on"
    );
    Ok(Some(crate::poll::spawn(store, config, shutdown.clone()).context("starting the agent poller")?))
}
