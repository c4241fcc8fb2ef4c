//! The daemon: tokio wiring around the agent's [`crate::core`]. It owns nothing the core
//! decides with; it turns the world into [`Event`]s (file watcher, SIGHUP, timers, the
//! policy fetcher) and requests (the operator socket, the collector API) and hands them to
//! the one task that owns the [`Agent`], then publishes what the agent shows (the host
//! statement, the tenant map the GPU sampler attributes usage with).
//!
//! Shutdown is one [`CancellationToken`] (the one `run` is given) and one [`TaskTracker`]:
//! every task stops on the token, and the daemon waits for all of them together for at
//! most [`SHUTDOWN_GRACE`].

mod gpu;
mod handler;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::clock::Clock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Mode};
use crate::core::{Agent, AuditEvent, Event, StartError};
use crate::net::operator_api::{dispatch, ApiRequest};
use crate::net::policy_fetch::FetchedPolicy;
pub use crate::reconcile::{Enforcer, RecordOnly};

/// Exit status when the agent needs an operator before it can run again (a corrupt audit
/// log): systemd's `RestartPreventExitStatus=` keeps it from restarting in a loop.
pub const EXIT_NEEDS_OPERATOR: u8 = 78;

/// The shortest wait before retrying an evaluation whose decisions could not be recorded.
const RETRY_FLOOR: Duration = Duration::from_millis(250);

/// Capacity of the event channel. The watcher never blocks on it: when it is full, a flag
/// asks the loop for a full rescan instead, so no change is lost.
const EVENT_CAPACITY: usize = 1024;

/// How long shutdown waits for every task together (open connections, the GPU sampler's
/// last window, the uploader's request in flight).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Capacity of the operator-API request channel (a full channel answers 503).
const API_CAPACITY: usize = 64;

/// Why the daemon could not start. Once running, it does not stop on errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The agent's state could not be opened.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The file watcher could not be started.
    #[error("file watcher: {0}")]
    Watch(#[from] notify::Error),
    /// The operator socket could not be created.
    #[error(transparent)]
    Api(#[from] crate::net::operator_api::ApiError),
    /// The collector API could not be started.
    #[error(transparent)]
    Https(#[from] crate::net::collector_api::HttpsError),
    /// The host key, spool or uploader cannot be set up.
    #[error(transparent)]
    Reporting(#[from] crate::reporting::ReportingError),
    /// The policy fetcher cannot be set up (its URL or CA file).
    #[error("policy fetcher: {0}")]
    PolicyFetch(String),
}

impl DaemonError {
    /// Whether an operator must act before the agent can start (see [`EXIT_NEEDS_OPERATOR`]).
    pub fn needs_operator(&self) -> bool {
        matches!(self, DaemonError::Start(StartError::AuditCorrupt { .. }))
    }
}

/// Starts the policy fetcher when `policy.fetch_url` is set.
fn start_policy_fetcher(
    config: &Config,
    fetched: mpsc::Sender<FetchedPolicy>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Option<crate::net::policy_fetch::SharedFetchStatus>, DaemonError> {
    let p = &config.policy;
    let Some(url) = &p.fetch_url else { return Ok(None) };
    let url = reqwest::Url::parse(url)
        .map_err(|e| DaemonError::PolicyFetch(format!("policy.fetch_url {url:?}: {e}")))?;
    let timeout = Duration::from_secs(p.fetch_timeout_s);
    let client = crate::net::client::https_client(
        p.fetch_ca_file.as_deref(),
        timeout.min(Duration::from_secs(10)),
        timeout,
    )
    .map_err(|e| DaemonError::PolicyFetch(e.to_string()))?;
    let status = Arc::new(std::sync::Mutex::new(crate::net::policy_fetch::FetchStatus {
        url: url.to_string(),
        ..Default::default()
    }));
    let options =
        crate::net::policy_fetch::FetchOptions { url, interval: Duration::from_secs(p.fetch_interval_s) };
    tracker.spawn(crate::net::policy_fetch::run(options, client, fetched, Arc::clone(&status), shutdown));
    Ok(Some(status))
}

/// Publishes `value` to a watch channel's receivers when it differs from what they have.
fn publish<T: PartialEq>(tx: &tokio::sync::watch::Sender<Arc<T>>, value: T) {
    tx.send_if_modified(|current| {
        let changed = **current != value;
        if changed {
            *current = Arc::new(value);
        }
        changed
    });
}

/// Runs the agent until `shutdown` is cancelled. `reload` carries SIGHUP's freshly loaded
/// configuration (or why it did not load); `gpu`, when given, is sampled.
pub async fn run(
    config: Config,
    enforcer: Box<dyn Enforcer>,
    gpu: Option<Box<dyn crate::gpu::GpuBackend>>,
    mut reload: mpsc::Receiver<Result<Config, String>>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let tracker = TaskTracker::new();
    let (tx, mut rx) = mpsc::channel(EVENT_CAPACITY);
    let overflow = Arc::new(AtomicBool::new(false));
    let rescan_every = Duration::from_secs(config.workloads.rescan_interval_s);
    let mut watches = watch::Watches::start(&config, tx, overflow.clone())?;
    // Agent handlers do blocking file I/O and fsync; block_in_place keeps them off the
    // reactor's other tasks.
    let host_id = tokio::task::block_in_place(|| crate::host::host_id(&config)).map_err(StartError::from)?;
    // Host key (refusing an unsafe one), spool, uploader: see crate::reporting::Reporting.
    let reporting = tokio::task::block_in_place(|| crate::reporting::Reporting::open(&config, &host_id))?;
    let mut agent = tokio::task::block_in_place(|| Agent::new(config, enforcer, clock))?;
    let mut next_review = tokio::task::block_in_place(|| agent.settle());
    let (fetched_tx, mut fetched_rx) = mpsc::channel::<FetchedPolicy>(4);
    if let Some(status) = start_policy_fetcher(agent.config(), fetched_tx, &tracker, shutdown.clone())? {
        agent.set_fetch_status(status);
    }
    let (tenants_tx, tenants_rx) = tokio::sync::watch::channel(Arc::new(agent.tenant_map()));
    if let Some(uploader) = reporting.spawn_uploader(shutdown.clone()) {
        tracker.spawn(async move {
            let _ = uploader.await;
        });
    }
    let gpu_metrics = gpu.and_then(|backend| {
        gpu::start(agent.config(), &reporting, backend, tenants_rx, &tracker, shutdown.clone())
    });
    // The socket exists only once the agent can answer: before, admission finds no agent
    // and fails closed.
    let socket = agent.config().api.socket.clone();
    let listener = crate::net::operator_api::bind(&socket, agent.config().api.socket_group.as_deref())?;
    let (api_tx, mut api_rx) = mpsc::channel::<ApiRequest>(API_CAPACITY);
    let mut inventory = gpu::inventory(gpu_metrics.as_ref());
    let serves_statements = agent.config().collector_api.enabled;
    // Only statements carry them; read once, as they do not change while the agent runs (the
    // collector API stamps the uptime per request).
    let host_facts = serves_statements.then(|| tokio::task::block_in_place(crate::host::host_facts));
    let (statement_tx, statement_rx) = tokio::sync::watch::channel(Arc::new(agent.statement_claims(
        String::new(),
        inventory.clone(),
        host_facts.clone(),
    )));
    if serves_statements {
        let api = crate::net::collector_api::bind(&agent.config().collector_api).await?;
        info!(listen = %agent.config().collector_api.listen, "collector API listening");
        let stats = Arc::new(kycd_net::ConnStats::default());
        agent.connections_mut().collector_api = Some(Arc::clone(&stats));
        let key = reporting.host_key();
        tracker.spawn(crate::net::collector_api::serve(
            api,
            api_tx.clone(),
            statement_rx,
            key,
            stats,
            shutdown.clone(),
        ));
    }
    let socket_stats = Arc::clone(&agent.connections_mut().socket);
    tracker.spawn(crate::net::operator_api::serve(
        listener,
        api_tx,
        agent.config().api.limits(),
        socket_stats,
        shutdown.clone(),
    ));
    info!(host_id = %agent.host_id(), workloads = agent.workload_count(), socket = %socket.display(), "kycd ready");
    // Ready: state loaded, decisions recorded, enforcement reconciled, socket answering.
    let notifier = crate::notify::Notifier::from_env();
    notifier.notify(&format!("READY=1\nSTATUS={}", agent.status_line()));
    let mut watchdog =
        tokio::time::interval(notifier.watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(rescan_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile_tick =
        tokio::time::interval(Duration::from_secs(agent.config().enforcement.reconcile_interval_s));
    reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let clock = agent.clock();
    let mut published = agent.generation();
    loop {
        // A deadline already due means the last evaluation could not record its decisions
        // (e.g. a failing disk): retry at RETRY_FLOOR rather than spin.
        let sleep_for = next_review
            .map(|t| {
                Duration::from_secs(u64::try_from(t.saturating_sub(clock.unix_now())).unwrap_or(0))
                    .max(RETRY_FLOOR)
            })
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(loaded) = reload.recv() => tokio::task::block_in_place(|| agent.reload_config(loaded)),
            Some(request) = api_rx.recv() => tokio::task::block_in_place(|| {
                let mut node = handler::Node { agent: &mut agent, reporting: &reporting, gpu: gpu_metrics.as_ref() };
                dispatch(request, &mut node);
            }),
            Some(fetched) = fetched_rx.recv() => tokio::task::block_in_place(|| {
                let verdict = agent.offer_fetched_policy(fetched.token);
                let _ = fetched.reply.send(verdict);
            }),
            Some(event) = rx.recv() => tokio::task::block_in_place(|| {
                agent.handle(event);
                // Take what had arrived meanwhile (bounded: a busy writer cannot starve the
                // loop), then re-decide once.
                for _ in 0..rx.len() {
                    let Ok(more) = rx.try_recv() else { break };
                    agent.handle(more);
                }
                if overflow.swap(false, Ordering::Relaxed) {
                    agent.handle(Event::WatcherOverflow);
                }
            }),
            _ = tick.tick() => tokio::task::block_in_place(|| {
                if overflow.swap(false, Ordering::Relaxed) {
                    warn!("file watcher overflowed; rescanning attestations");
                }
                watches.ensure();
                agent.handle(Event::Tick);
            }),
            _ = watchdog.tick(), if notifier.watchdog_interval().is_some() => {
                // The loop turned: the agent is alive (a stuck handler stops these).
                notifier.notify(&format!("WATCHDOG=1\nSTATUS={}", agent.status_line()));
            }
            _ = reconcile_tick.tick() => agent.handle(Event::ReconcileDue),
            () = tokio::time::sleep(sleep_for) => agent.handle(Event::Deadline),
        }
        next_review = tokio::task::block_in_place(|| {
            // Spool damage and rejected report batches, found by the reporting tasks; guest
            // telemetry gaps, found by the GPU sampler.
            record_reporting_events(&mut agent, &reporting);
            gpu::record_events(&mut agent, gpu_metrics.as_ref());
            agent.settle()
        });
        // What the collector API and the GPU sampler see, republished only when it changed.
        let current = gpu::inventory(gpu_metrics.as_ref());
        if agent.generation() != published || current != inventory {
            published = agent.generation();
            inventory = current;
            if serves_statements {
                // Its times are set per request.
                let mut statement =
                    agent.statement_claims(String::new(), inventory.clone(), host_facts.clone());
                statement.iat = 0;
                statement.exp = 0;
                publish(&statement_tx, statement);
            }
        }
        // The tenant map also changes with time alone (an attestation expiring).
        publish(&tenants_tx, agent.tenant_map());
    }
    notifier.notify("STOPPING=1");
    // Requests still queued are answered by nobody: their callers see the agent gone.
    api_rx.close();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        warn!(grace = ?SHUTDOWN_GRACE, "tasks still running after the grace period (connections, GPU sampler, uploader); stopping anyway");
    }
    let _ = std::fs::remove_file(&socket);
    // Blocks stay in place while the agent is down (fail closed), unless asked otherwise.
    if agent.config().mode == Mode::Enforce && agent.config().enforcement.release_on_exit {
        tokio::task::block_in_place(|| agent.release());
    }
    tokio::task::block_in_place(|| {
        record_reporting_events(&mut agent, &reporting);
        gpu::record_events(&mut agent, gpu_metrics.as_ref());
        agent.record(AuditEvent::AgentStopped);
        agent.flush_records();
    });
    info!("kycd stopped");
    Ok(())
}

/// Queues the reporting tasks' findings (spool damage, batches the collector refused) for
/// the audit log.
fn record_reporting_events(agent: &mut Agent, reporting: &crate::reporting::Reporting) {
    for event in reporting.take_audit_events() {
        agent.record(event);
    }
}
