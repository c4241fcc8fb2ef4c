//! The agent's state and its transitions, without a runtime: trust anchors, the policy in
//! force, verified attestations, known workloads and the last decision for each. The
//! [`crate::daemon`] drives it with typed [`Event`]s and owns everything asynchronous
//! (watchers, timers, sockets, GPU tasks); tests drive it directly with a
//! [`kycd_protocol::clock::ManualClock`].
//!
//! One owner holds all state, so there are no locks and the order of changes is the order
//! of the audit log. Decisions are appended to the audit log and fsync'd *before* they are
//! handed to the [`Enforcer`]. Bad input — an unverifiable attestation, a rolled-back
//! policy, a trust file that does not parse — is logged with its error kind, counted, and
//! otherwise ignored: the agent never stops on bad input.
//!
//! Deadlines (attestation expiry, end of a grace period, a measure taking effect) are
//! tracked as the earliest `next_review_at` of all decisions ([`Agent::settle`] returns
//! it): a verdict flips at its deadline, not on the next polling tick.
//!
//! An event re-decides only the workloads it touches (an attestation: the workload it binds;
//! a policy, trust anchors, a deadline or the periodic tick: all), and the records an event
//! produces are written together with the decisions they lead to, in one fsync'd batch:
//! every record is durable before anything acts on it (enforcement, an admission answer).
//!
//! The periodic tick (`workloads.rescan_interval_s`) is the safety net under inotify: it
//! rescans the cgroup tree, re-reads the drop directory (unchanged files cost a hash, not a
//! verification), retries input that failed for a transient reason (a policy not valid yet,
//! cloud-init data not written yet).
//!
//! When the audit log cannot be written, decisions are not enforced (nothing acts that the
//! log does not show) — but a host must not keep running on stale allows while its disk is
//! broken, so after [`LOCKDOWN_AFTER`] consecutive failed evaluations every workload is
//! denied (`audit_unavailable`) until recording works again. That lockdown is the one
//! enforcement the audit log cannot show; the journal does.

mod archive;
mod counters;
mod error;
mod evaluate;
mod intake;
mod metrics;
mod policy_source;
mod record;
mod reject;
mod views;
mod workloads;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use kycd_protocol::clock::Clock;
use kycd_protocol::{Jwks, VerifyOptions};
use tracing::{error, info, warn};

pub use crate::audit::AuditEvent;
pub use counters::{Connections, Counters};
pub use error::StartError;
pub use reject::RejectKind;

use crate::audit::{AuditLog, AuditOptions};
use crate::config::Config;
use crate::decision::Decision;
use crate::discovery::cgroup::LibvirtDomain;
use crate::discovery::workload::WorkloadId;
use crate::policy::{AppliedPolicy, PolicyGuard};
use crate::reconcile::Enforcer;

use intake::{Attested, Recheck, Rejection};
use policy_source::PolicySource;
use workloads::{Seen, WorkloadState};

/// Consecutive evaluations whose decisions could not be recorded before every workload is
/// denied (see the module docs). At the daemon's retry floor this is about a second.
pub const LOCKDOWN_AFTER: u32 = 4;

/// Inputs to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A path in the drop directory was created, changed, renamed or removed.
    DropDir(PathBuf),
    /// The policy file or the host attestation may have changed.
    ConfigFile(PathBuf),
    /// Reload trust anchors and the policy, and re-verify everything (SIGHUP, `kycctl reload`).
    Reload,
    /// The periodic safety net (see the module docs).
    Tick,
    /// The file watcher lost events: rescan the attestations.
    WatcherOverflow,
    /// The earliest decision deadline passed: re-decide.
    Deadline,
    /// The periodic full reconciliation of the host is due.
    ReconcileDue,
}

/// Which workloads the next evaluation must re-decide.
#[derive(Debug, Default)]
struct Stale {
    /// All of them (a policy or trust change, a deadline, the tick, a failed evaluation).
    all: bool,
    /// These (an attestation for them changed, an admission).
    workloads: BTreeSet<WorkloadId>,
}

/// The agent's state; see the module docs.
pub struct Agent {
    config: Config,
    clock: Arc<dyn Clock>,
    host_id: String,
    cgroup_mount: Option<PathBuf>,
    issuers: Jwks,
    policy_keys: Jwks,
    guard: PolicyGuard,
    policy: Option<AppliedPolicy>,
    attestations: BTreeMap<PathBuf, Attested>,
    /// The policy in force as delivered, re-verified when the trust anchors change.
    policy_token: Option<Vec<u8>>,
    /// Where the policy in force came from.
    policy_source: PolicySource,
    /// The last fetched token refused, so an unchanged one is not re-recorded every fetch.
    fetch_rejected: Option<Rejection>,
    /// The policy fetcher's state, when it runs (for status and metrics).
    fetch_status: Option<crate::net::policy_fetch::SharedFetchStatus>,
    /// Input files (attestations, the policy) last rejected, so an unchanged bad file is
    /// neither re-verified nor re-recorded on every rescan; see [`Rejection`].
    rejected: BTreeMap<PathBuf, Rejection>,
    workloads: BTreeMap<WorkloadId, WorkloadState>,
    /// When each workload was first seen, persisted in `<state_dir>/first_seen.json` so
    /// neither restarting the agent nor restarting a VM restarts a grace period. Kept for
    /// `workloads.forget_after_s` after the workload vanished.
    first_seen: BTreeMap<String, Seen>,
    first_seen_dirty: bool,
    /// First-seen time given to workloads not in the file while the file is known to be
    /// corrupt (set at start, cleared after the first evaluation): the epoch, so grace
    /// periods count as over — losing the file must not grant new grace.
    first_seen_fallback: Option<i64>,
    /// Running libvirt domains (from the status directory), for UUID bindings.
    libvirt_domains: Vec<LibvirtDomain>,
    /// libvirt domains admitted but not running yet: UUID → (name, when admitted). They let
    /// an attestation bound by UUID apply by name before the status XML exists.
    admitted_domains: BTreeMap<String, (String, i64)>,
    /// When the archive of expired admitted attestations was last pruned ([`archive`]).
    archive_pruned_at: i64,
    /// Consecutive evaluations that could not record every decision.
    audit_failures: u32,
    /// Recorded decisions changed since the last reconciliation: apply the change.
    reconcile_due: bool,
    /// The periodic full reconciliation (reads the host's state back) is due.
    full_reconcile_due: bool,
    /// Per-country CIDRs for geo-blocks (`enforcement.geo_cidr_file`).
    geo: Option<crate::enforce::CountryCidrs>,
    /// When each recorded decision was recorded.
    decided_at: BTreeMap<WorkloadId, i64>,
    /// When the agent started.
    started_at: i64,
    /// Why the last reload (or start) could not load everything, if it could not.
    last_reload_error: Option<String>,
    decisions: BTreeMap<WorkloadId, Decision>,
    /// What the next evaluation re-decides.
    stale: Stale,
    /// Records not written yet: they go out with the next evaluation's decisions, in one
    /// fsync'd batch (see the module docs).
    pending: Vec<(i64, AuditEvent)>,
    /// Bumped whenever what the views show may have changed (decisions, attestations, the
    /// policy): the daemon republishes the statement and the tenant map only then.
    generation: u64,
    audit: AuditLog,
    enforcer: Box<dyn Enforcer>,
    counters: Counters,
    /// Input paths whose last read failed for want of resources (see
    /// [`crate::fsutil::is_resource_error`]): logged and recorded once per outage, not on
    /// every rescan.
    read_failing: BTreeSet<PathBuf>,
    /// The last such failure: (Unix time, what failed).
    last_read_error: Option<(i64, String)>,
    /// Connection counters of the operator socket and the collector API.
    connections: Connections,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host_id", &self.host_id)
            .field("workloads", &self.workloads.len())
            .finish()
    }
}

impl Agent {
    /// Builds the agent: opens the audit log and the anti-rollback state (both must work,
    /// or the agent does not start), then loads trust anchors, the policy and attestations
    /// (each of which may fail without stopping it). Nothing is decided until
    /// [`Agent::settle`].
    pub fn new(
        config: Config,
        enforcer: Box<dyn Enforcer>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        crate::fsutil::create_dir_durably(&config.state_dir)
            .map_err(|source| StartError::StateDir { path: config.state_dir.clone(), source })?;
        let host_id = crate::host::host_id(&config)?;
        let audit_dir = config.audit_dir();
        let audit = match AuditLog::open(
            &audit_dir,
            AuditOptions { max_file_bytes: config.audit.max_file_bytes },
        ) {
            Ok(audit) => audit,
            Err(source @ crate::audit::AuditError::Corrupt { .. }) => {
                let repair = crate::audit::repair_command(&audit_dir);
                error!(error = %source, repair = repair.as_deref().unwrap_or("-"), "audit log corrupt: refusing to start");
                return Err(StartError::AuditCorrupt { source, repair });
            }
            Err(e) => return Err(e.into()),
        };
        let guard = PolicyGuard::open(&config.state_dir)?;
        let cgroup_mount = config.workloads.cgroup_root.clone().or_else(|| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|m| crate::discovery::cgroup::find_cgroup2_mount(&m))
        });
        if cgroup_mount.is_none() {
            warn!("no cgroup2 mount found: only the host workload and attested workloads are known");
        }
        let (first_seen, first_seen_error) = match workloads::load_first_seen(&config.state_dir) {
            Ok(map) => (map, None),
            Err(e) => (BTreeMap::new(), Some(e)),
        };
        let started_at = clock.unix_now();
        let mut agent = Agent {
            config,
            clock,
            host_id,
            cgroup_mount,
            issuers: Jwks::default(),
            policy_keys: Jwks::default(),
            guard,
            policy: None,
            policy_token: None,
            policy_source: PolicySource::File,
            fetch_rejected: None,
            fetch_status: None,
            attestations: BTreeMap::new(),
            rejected: BTreeMap::new(),
            workloads: BTreeMap::new(),
            first_seen,
            first_seen_dirty: false,
            first_seen_fallback: None,
            libvirt_domains: Vec::new(),
            admitted_domains: BTreeMap::new(),
            archive_pruned_at: i64::MIN,
            audit_failures: 0,
            reconcile_due: true,
            full_reconcile_due: true,
            geo: None,
            decided_at: BTreeMap::new(),
            started_at,
            last_reload_error: None,
            decisions: BTreeMap::new(),
            stale: Stale { all: true, workloads: BTreeSet::new() },
            pending: Vec::new(),
            generation: 0,
            audit,
            enforcer,
            counters: Counters::default(),
            read_failing: BTreeSet::new(),
            last_read_error: None,
            connections: Connections::default(),
        };
        agent.record(AuditEvent::AgentStarted {
            version: env!("CARGO_PKG_VERSION").into(),
            host_id: agent.host_id.clone(),
            mode: agent.config.mode,
        });
        if let Some(reason) = first_seen_error {
            error!(%reason, "corrupt first-seen file: workloads count as seen long ago (grace periods over)");
            agent.record(AuditEvent::FirstSeenCorrupt { reason });
            agent.first_seen_fallback = Some(0);
            agent.first_seen_dirty = true;
        }
        agent.reload();
        Ok(agent)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Rejection counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How many workloads are known.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// Changes whenever the statement or the tenant map may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The listeners' connection counters (the daemon sets the collector API's).
    pub fn connections_mut(&mut self) -> &mut Connections {
        &mut self.connections
    }

    /// The fetcher's state, for status and metrics (set by the daemon).
    pub fn set_fetch_status(&mut self, status: crate::net::policy_fetch::SharedFetchStatus) {
        self.fetch_status = Some(status);
    }

    /// The agent's clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    fn now(&self) -> i64 {
        self.clock.unix_now()
    }

    fn options(&self) -> VerifyOptions {
        VerifyOptions {
            max_token_bytes: self.config.attestations.max_bytes,
            clock_skew_s: self.config.clock_skew_s,
        }
    }

    /// Marks everything for re-decision (and the views for republishing).
    fn all_stale(&mut self) {
        self.stale.all = true;
        self.generation += 1;
    }

    /// Marks one workload (as bound; resolved here) for re-decision.
    fn stale_workload(&mut self, bound: &WorkloadId) {
        let id = self.resolve(bound);
        self.stale.workloads.insert(id);
    }

    /// Applies one event. Decisions follow in [`Agent::settle`].
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::DropDir(path) if intake::is_attestation_file(&path) => {
                self.ingest(&path, false, Recheck::IfChanged)
            }
            Event::DropDir(_) => {}
            Event::ConfigFile(path) if path == self.config.attestations.host_attestation => {
                self.ingest(&path, true, Recheck::IfChanged)
            }
            Event::ConfigFile(path) if path == self.config.policy.file => self.load_policy(),
            Event::ConfigFile(_) => {}
            Event::Reload => {
                info!("reloading trust anchors, policy and attestations");
                self.reload();
            }
            Event::Tick => self.tick(),
            Event::WatcherOverflow => {
                warn!("file watcher overflowed; rescanning attestations");
                self.rescan_attestations(Recheck::IfChanged);
            }
            Event::Deadline => self.all_stale(),
            Event::ReconcileDue => {
                self.reconcile_due = true;
                self.full_reconcile_due = true;
            }
        }
    }

    /// Re-decides what the events since the last call touched, writes the queued records and
    /// the changed decisions (one fsync), and converges the host on them when due. Returns
    /// the earliest time a decision may change by itself (now, when some decision could not
    /// be recorded and must be retried).
    pub fn settle(&mut self) -> Option<i64> {
        let next = self.evaluate();
        if self.reconcile_due {
            self.reconcile();
        }
        next
    }

    /// Reloads trust anchors and the policy, and re-verifies every attestation.
    /// Remembered rejections are forgotten: a key added to the trust set may make them valid.
    pub fn reload(&mut self) {
        self.last_reload_error = None;
        self.rejected.clear();
        self.fetch_rejected = None;
        self.all_stale();
        self.load_trust();
        self.load_geo();
        self.recheck_policy();
        self.load_policy();
        self.rescan_attestations(Recheck::Always);
        self.rescan_workloads();
    }

    /// The periodic safety net: see the module docs.
    fn tick(&mut self) {
        self.all_stale();
        self.expire_admitted();
        self.load_policy();
        self.rescan_attestations(Recheck::IfChanged);
        self.rescan_workloads();
    }

    /// SIGHUP: applies a re-read configuration, then reloads trust, policy and attestations.
    /// A configuration that did not load, or changes settings that only a restart can apply
    /// (state dir, mode, sockets, GPU, collector API), keeps the running one — logged and
    /// shown by `kycctl status`.
    pub fn reload_config(&mut self, loaded: Result<Config, String>) {
        let problem = match loaded {
            Err(e) => Some(format!("configuration not reloaded, keeping the running one: {e}")),
            Ok(new) => {
                let changed = restart_only_changes(&self.config, &new);
                if changed.is_empty() {
                    info!("configuration reloaded");
                    self.config = new;
                    None
                } else {
                    Some(format!(
                        "configuration not reloaded, keeping the running one: {} can only change on restart",
                        changed.join(", ")
                    ))
                }
            }
        };
        self.reload();
        if let Some(p) = problem {
            error!(reason = %p, "reload");
            self.record(AuditEvent::ConfigReloadFailed { reason: p.clone() });
            self.last_reload_error = Some(p);
        }
    }

    /// Lifts every block (`--release-on-exit`).
    pub fn release(&mut self) {
        let report = self.enforcer.release();
        for (backend, error) in &report.errors {
            error!(backend, %error, "could not lift a block on exit");
        }
        info!(changes = report.changes, "blocks lifted on exit");
    }
}

/// The settings `new` changes that only a restart can apply.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let fetch = |c: &Config| {
        (
            c.policy.fetch_url.clone(),
            c.policy.fetch_interval_s,
            c.policy.fetch_ca_file.clone(),
            c.policy.fetch_timeout_s,
        )
    };
    [
        ("state_dir", new.state_dir != old.state_dir),
        ("host_id", new.host_id != old.host_id),
        ("mode", new.mode != old.mode),
        ("api", new.api != old.api),
        ("gpu", new.gpu != old.gpu),
        ("collector_api", new.collector_api != old.collector_api),
        ("audit", new.audit != old.audit),
        ("policy.fetch_*", fetch(new) != fetch(old)),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key)
    .collect()
}
