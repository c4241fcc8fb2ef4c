//! The agent's main loop: it owns the live state (trust anchors, the policy in force,
//! verified attestations, known workloads, the last decision for each) and re-decides
//! whenever an input changes or a deadline passes.
//!
//! One task owns all state; everything else (file watcher, signals, timers) sends it events
//! over a bounded channel, so there are no locks and the order of changes is the order of the
//! audit log. Decisions are appended to the audit log and fsync'd *before* they are handed to
//! the [`Enforcer`]. Bad input — an unverifiable attestation, a rolled-back policy, a trust
//! file that does not parse — is logged with its error kind, counted, and otherwise ignored:
//! the daemon never exits on bad input.
//!
//! Deadlines (attestation expiry, end of a grace period, a measure taking effect) are tracked
//! as the earliest `next_review_at` of all decisions, and the loop sleeps exactly until then:
//! a verdict flips at its deadline, not on the next polling tick.
//!
//! The periodic tick (`workloads.rescan_interval_s`) is the safety net under inotify: it
//! rescans the cgroup tree, re-reads the drop directory (unchanged files cost a hash, not a
//! verification), retries input that failed for a transient reason (a policy not valid yet,
//! cloud-init data not written yet) and re-adds watches on directories that appeared late.
//!
//! When the audit log cannot be written, decisions are not enforced (nothing acts that the
//! log does not show) — but a host must not keep running on stale allows while its disk is
//! broken, so after [`LOCKDOWN_AFTER`] consecutive failed evaluations every workload is
//! denied (`audit_unavailable`) until recording works again. That lockdown is the one
//! enforcement the audit log cannot show; the journal does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::{verify, AttestationClaims, Jwks, PolicyClaims, Verdict, VerifyError, VerifyOptions};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::audit::{AuditLog, AuditOptions};
use crate::cgroup::LibvirtDomain;
use crate::config::{Config, Mode};
use crate::decision::{decide, Decision, DecisionInput, Reason, ReasonCode};
use crate::net::operator_api::{Admission, AdmitAnswer, ApiRequest};
use crate::policy::{AppliedPolicy, Offer, PolicyError, PolicyGuard};
use crate::workload::{WorkloadId, WorkloadKind};
use crate::{cgroup, tokens};

/// Shortest sleep of the main loop; see [`run`].
/// `kycd run`'s exit status when it cannot start until an operator acts (a corrupt audit
/// log): 78, `EX_CONFIG` in sysexits.h. kycd.service names it in `RestartPreventExitStatus=`
/// so systemd does not restart into the same refusal forever.
pub const EXIT_NEEDS_OPERATOR: u8 = 78;

const RETRY_FLOOR: Duration = Duration::from_millis(250);

/// File in the state directory holding when each workload was first seen.
const FIRST_SEEN_FILE: &str = "first_seen.json";

/// Consecutive evaluations whose decisions could not be recorded before every workload is
/// denied (see the module docs). At the retry floor this is about a second.
pub const LOCKDOWN_AFTER: u32 = 4;

/// When a workload was first seen and, if it is gone, when it vanished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Seen {
    first: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vanished_at: Option<i64>,
}

/// The first-seen file: the current form, or the bare `id → time` map of earlier releases.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SeenFile {
    Current(BTreeMap<String, Seen>),
    Legacy(BTreeMap<String, i64>),
}

/// Loads persisted first-seen times. A missing file starts empty (first start); a corrupt
/// one is an error, which the caller turns into "seen long ago" (grace already over).
fn load_first_seen(state_dir: &Path) -> Result<BTreeMap<String, Seen>, String> {
    let path = state_dir.join(FIRST_SEEN_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<SeenFile>(&bytes) {
            Ok(SeenFile::Current(map)) => Ok(map),
            Ok(SeenFile::Legacy(map)) => {
                Ok(map.into_iter().map(|(k, first)| (k, Seen { first, vanished_at: None })).collect())
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Capacity of the event channel. The watcher never blocks on it: when it is full, a flag
/// asks the loop for a full rescan instead, so no change is lost.
const EVENT_CAPACITY: usize = 1024;

/// How long shutdown waits for each of its steps (open connections, the GPU sampler).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Capacity of the operator-API request channel (a full channel answers 503).
const API_CAPACITY: usize = 64;

/// Inputs to the main loop.
#[derive(Debug)]
pub enum Event {
    /// A path in the drop directory was created, changed, renamed or removed.
    DropDir(PathBuf),
    /// The policy file or the host attestation may have changed.
    ConfigFile(PathBuf),
    /// Reload trust anchors and the policy, and rescan everything (SIGHUP).
    Reload,
    /// A policy token fetched by [`crate::net::policy_fetch`]; the reply says what became of it.
    FetchedPolicy {
        /// The body as served.
        token: Vec<u8>,
        /// Where the verdict goes.
        reply: tokio::sync::oneshot::Sender<crate::net::policy_fetch::FetchVerdict>,
    },
}

/// Where a policy token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicySource {
    /// `policy.file`.
    File,
    /// The copy of the last accepted fetched policy (`<state_dir>/fetched-policy.jws`).
    FetchedCopy,
    /// Just fetched from `policy.fetch_url`.
    Fetch,
}

impl PolicySource {
    /// The file and the fetched policy are the two sources; the copy is the fetched one.
    fn fetched(self) -> bool {
        matches!(self, PolicySource::FetchedCopy | PolicySource::Fetch)
    }
}

/// What offering a policy token came to (already logged and recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    /// A newer version, now in force.
    Applied(u64),
    /// The version in force (re-read, or re-signed), now in force from this source.
    Unchanged(u64),
    /// The same claims are already in force from the other source, which stays.
    Equivalent(u64),
    /// A lower version than the one in force from the other source: not a rollback
    /// attempt, just the older of the two sources.
    Superseded,
    /// Refused, with the error kind.
    Rejected(&'static str),
}

/// Why the daemon could not start. Once running, it does not stop on errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory cannot be used.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The audit log cannot be opened (the agent must not decide without recording).
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The audit log's end is corrupt: appending would fork the chain. Not fixed by a
    /// restart; `repair` is the operator's command that cuts it back (kept bytes aside).
    #[error("audit log: {source}; to repair, with the agent stopped: {}", repair.as_deref().unwrap_or("no record verifies: move the audit directory aside"))]
    AuditCorrupt {
        /// What is wrong.
        #[source]
        source: crate::audit::AuditError,
        /// `kycctl audit repair --truncate-after SEQ DIR`.
        repair: Option<String>,
    },
    /// The policy anti-rollback state is unusable.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// No host id configured and none in /etc/machine-id.
    #[error("cannot determine the host id: set host_id in the configuration ({0})")]
    HostId(String),
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
    Reporting(#[from] crate::upload::ReportingError),
    /// The policy fetcher cannot be set up (its URL or CA file).
    #[error("policy fetcher: {0}")]
    PolicyFetch(String),
}

pub use crate::reconcile::{Enforcer, RecordOnly};

/// A file that failed intake, by the digest of its content. Permanent failures (bad
/// signature, malformed, expired) are not retried until the content or the trust anchors
/// change; transient ones (not valid yet, a missing cloud-init file) are retried on every
/// tick, silently unless the outcome changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rejection {
    digest: String,
    kind: &'static str,
}

impl Rejection {
    fn permanent(&self) -> bool {
        !is_transient(self.kind)
    }
}

/// Error kinds that may go away without the input changing.
fn is_transient(kind: &str) -> bool {
    matches!(kind, "NotYetValid" | "IssuedInFuture" | "Io" | "CorruptState")
}

/// Error kinds that mean the signing key is not (or no longer) trusted.
fn is_untrusted(kind: &str) -> bool {
    matches!(kind, "UnknownKey" | "AmbiguousKey" | "KeyAlgorithmMismatch" | "BadSignature")
}

/// A verified attestation and where it came from.
#[derive(Debug, Clone)]
struct Attested {
    claims: AttestationClaims,
    token_digest: String,
    workload: WorkloadId,
}

#[derive(Debug, Clone)]
struct WorkloadState {
    first_seen: i64,
    cgroup: Option<PathBuf>,
    /// Tap interfaces, for a running libvirt domain (refreshed on every rescan).
    interfaces: Vec<String>,
}

/// Counters of rejected input, by error kind (exported as metrics by the API issue).
#[derive(Debug, Default)]
pub struct Counters {
    /// Attestations rejected, by kind.
    pub attestations_rejected: BTreeMap<&'static str, u64>,
    /// Policies rejected, by kind.
    pub policies_rejected: BTreeMap<&'static str, u64>,
    /// Trust files that failed to load (the previous set was kept).
    pub trust_load_failures: u64,
    /// Enforcement failures, by backend (`kycd_enforcement_errors_total{backend}`).
    pub enforcement_errors: BTreeMap<&'static str, u64>,
    /// Drift repaired, by backend.
    pub drift_repaired: BTreeMap<&'static str, u64>,
    /// Inputs (attestation files and directories, libvirt's status) that could not be read
    /// for want of resources or a failing disk (EMFILE, ENFILE, EIO, …); what they said
    /// before was kept.
    pub input_read_errors: u64,
}

/// The agent's state and its handlers; [`run`] drives it.
pub struct Agent {
    config: Config,
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
    audit: AuditLog,
    enforcer: Box<dyn Enforcer>,
    counters: Counters,
    /// Input paths whose last read failed for want of resources (see [`is_resource_error`]):
    /// logged and recorded once per outage, not on every rescan.
    read_failing: BTreeSet<PathBuf>,
    /// The last such failure: (Unix time, what failed).
    last_read_error: Option<(i64, String)>,
    /// Connection counters of the operator socket and the collector API.
    connections: Connections,
}

/// Connection counters of the agent's listeners, for status and metrics.
#[derive(Debug, Default)]
pub struct Connections {
    /// The operators' Unix socket.
    pub socket: Arc<kycd_net::ConnStats>,
    /// The collector-facing HTTPS API, when enabled.
    pub collector_api: Option<Arc<kycd_net::ConnStats>>,
}

impl Connections {
    fn each(&self) -> impl Iterator<Item = (&'static str, kycd_net::ConnSnapshot)> + '_ {
        std::iter::once(("socket", self.socket.snapshot()))
            .chain(self.collector_api.iter().map(|s| ("collector_api", s.snapshot())))
    }
}

use crate::fsutil::is_resource_error;

/// What identifies a file that cannot be read as an attestation (a FIFO, a directory, a
/// device): its device, inode, modification time and type. A rejection is recorded once per
/// identity, not on every rescan.
fn file_identity(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) => format!(
            "file:{}:{}:{}.{}:{:o}",
            m.dev(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.mode() & libc::S_IFMT
        ),
        Err(_) => String::new(),
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host_id", &self.host_id)
            .field("workloads", &self.workloads.len())
            .finish()
    }
}

/// The identity part of a host statement's workload entry, from its attestation.
fn statement_subject(claims: &kycd_protocol::AttestationClaims) -> kycd_protocol::StatementSubject {
    let mut owner_countries: Vec<_> =
        claims.beneficial_owners.iter().flat_map(|o| o.countries.iter().copied()).collect();
    owner_countries.sort();
    owner_countries.dedup();
    let mut reseller_countries: Vec<_> = claims.resellers.iter().map(|r| r.country).collect();
    reseller_countries.sort();
    reseller_countries.dedup();
    kycd_protocol::StatementSubject {
        legal_name: claims.subject.legal_name.clone(),
        countries: claims.subject.countries.clone(),
        beneficial_owner_countries: owner_countries,
        reseller_countries,
        payment_source_country: claims.payment_source_country,
        foreign_person: claims.foreign_person,
    }
}

fn now() -> i64 {
    tokens::unix_now()
}

fn host_id(config: &Config) -> Result<String, DaemonError> {
    crate::host::host_id(config).map_err(|e| match e {
        crate::host::HostError::HostId(reason) => DaemonError::HostId(reason),
        other => DaemonError::HostId(other.to_string()),
    })
}

/// A file name in the drop directory that is a delivered attestation: `*.jws`, not hidden
/// (writers stage `.name.jws.tmp` or `.name` and rename into place).
fn is_attestation_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !name.starts_with('.') && name.ends_with(".jws") && name.len() > ".jws".len()
}

/// Why an attestation file was not accepted.
#[derive(Debug, thiserror::Error)]
enum IntakeError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{0}")]
    Io(String),
    #[error("bound to host {bound:?}, this host is {actual:?}")]
    WrongHost { bound: String, actual: String },
    #[error("the host attestation file must carry a binding of kind \"host\"")]
    NotHostBinding,
    /// An input the verification needs could not be read for want of resources or a failing
    /// disk ([`is_resource_error`]): not a verdict on the attestation.
    #[error("{}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
}

impl IntakeError {
    fn kind(&self) -> &'static str {
        match self {
            IntakeError::Verify(e) => e.kind(),
            IntakeError::Io(_) => "Io",
            IntakeError::WrongHost { .. } => "WrongHost",
            IntakeError::NotHostBinding => "NotHostBinding",
            IntakeError::Unreadable { .. } => "Io",
        }
    }
}

/// cloud-init's instance id (`v1.instance_id` in instance-data.json).
fn cloud_init_instance_id(path: &Path) -> Result<String, IntakeError> {
    let bytes = crate::fsutil::read_regular_file(path, 1 << 20).map_err(|e| {
        if is_resource_error(&e) {
            IntakeError::Unreadable { path: path.to_owned(), source: e }
        } else {
            IntakeError::Io(format!("{}: {e}", path.display()))
        }
    })?;
    let doc = kycd_protocol::json::parse_strict(&bytes)
        .map_err(|e| IntakeError::Io(format!("{}: {e}", path.display())))?;
    doc["v1"]["instance_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| IntakeError::Io(format!("{}: no v1.instance_id", path.display())))
}

/// Whether intake re-verifies a file whose content was already judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recheck {
    /// Skip content already accepted or permanently rejected (watcher events, ticks).
    IfChanged,
    /// Verify again (the trust anchors may have changed).
    Always,
}

impl Agent {
    /// Builds the agent: opens the audit log and the anti-rollback state (both must work,
    /// or the agent does not start), then loads trust anchors, the policy and attestations
    /// (each of which may fail without stopping it).
    pub fn new(config: Config, enforcer: Box<dyn Enforcer>) -> Result<Self, DaemonError> {
        crate::fsutil::create_dir_durably(&config.state_dir)
            .map_err(|source| DaemonError::StateDir { path: config.state_dir.clone(), source })?;
        let host_id = host_id(&config)?;
        let audit_dir = config.audit_dir();
        let audit = match AuditLog::open(
            &audit_dir,
            AuditOptions { max_file_bytes: config.audit.max_file_bytes },
        ) {
            Ok(audit) => audit,
            Err(source @ crate::audit::AuditError::Corrupt { .. }) => {
                let repair = crate::audit::repair_command(&audit_dir);
                error!(error = %source, repair = repair.as_deref().unwrap_or("-"), "audit log corrupt: refusing to start");
                return Err(DaemonError::AuditCorrupt { source, repair });
            }
            Err(e) => return Err(e.into()),
        };
        let guard = PolicyGuard::open(&config.state_dir)?;
        let cgroup_mount = config.workloads.cgroup_root.clone().or_else(|| {
            std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| cgroup::find_cgroup2_mount(&m))
        });
        if cgroup_mount.is_none() {
            warn!("no cgroup2 mount found: only the host workload and attested workloads are known");
        }
        let (first_seen, first_seen_error) = match load_first_seen(&config.state_dir) {
            Ok(map) => (map, None),
            Err(e) => (BTreeMap::new(), Some(e)),
        };
        let mut agent = Agent {
            config,
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
            audit_failures: 0,
            reconcile_due: true,
            full_reconcile_due: true,
            geo: None,
            decided_at: BTreeMap::new(),
            started_at: now(),
            last_reload_error: None,
            decisions: BTreeMap::new(),
            audit,
            enforcer,
            counters: Counters::default(),
            read_failing: BTreeSet::new(),
            last_read_error: None,
            connections: Connections::default(),
        };
        agent.record(json!({"type": "agent_started", "version": env!("CARGO_PKG_VERSION"),
            "host_id": agent.host_id, "mode": agent.config.mode}));
        if let Some(reason) = first_seen_error {
            error!(%reason, "corrupt first-seen file: workloads count as seen long ago (grace periods over)");
            agent.record(json!({"type": "first_seen_corrupt", "reason": reason}));
            agent.first_seen_fallback = Some(0);
            agent.first_seen_dirty = true;
        }
        agent.reload();
        Ok(agent)
    }

    /// Rejection counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn options(&self) -> VerifyOptions {
        VerifyOptions {
            max_token_bytes: self.config.attestations.max_bytes,
            clock_skew_s: self.config.clock_skew_s,
        }
    }

    fn policy_options(&self) -> VerifyOptions {
        VerifyOptions {
            max_token_bytes: crate::policy::MAX_POLICY_BYTES,
            clock_skew_s: self.config.clock_skew_s,
        }
    }

    /// Appends a non-decision event to the audit log. A failure to record is logged loudly;
    /// decisions (see [`Agent::evaluate`]) are not enforced unless recorded.
    fn record(&mut self, event: serde_json::Value) -> bool {
        match self.audit.append(now(), &event) {
            Ok(_) => true,
            Err(e) => {
                error!(error = %e, "cannot write the audit log");
                false
            }
        }
    }

    /// Reloads trust anchors and the policy, and re-verifies every attestation (SIGHUP).
    /// Remembered rejections are forgotten: a key added to the trust set may make them valid.
    pub fn reload(&mut self) {
        self.last_reload_error = None;
        self.rejected.clear();
        self.fetch_rejected = None;
        self.load_trust();
        self.load_geo();
        self.recheck_policy();
        self.load_policy();
        self.rescan_attestations(Recheck::Always);
        self.rescan_workloads();
    }

    /// The periodic safety net: see the module docs.
    pub fn tick(&mut self) {
        self.expire_admitted();
        self.load_policy();
        self.rescan_attestations(Recheck::IfChanged);
        self.rescan_workloads();
    }

    /// Removes attestations kept from admissions once they have expired (they can no longer
    /// attest anything; keeping them would grow the directory forever).
    fn expire_admitted(&mut self) {
        let dir = self.config.admitted_dir();
        let cutoff = now().saturating_sub(i64::try_from(self.config.clock_skew_s).unwrap_or(i64::MAX));
        let expired: Vec<PathBuf> = self
            .attestations
            .iter()
            .filter(|(path, a)| path.parent() == Some(dir.as_path()) && a.claims.exp <= cutoff)
            .map(|(path, _)| path.clone())
            .collect();
        for path in expired {
            match std::fs::remove_file(&path) {
                Ok(()) => self.ingest(&path, false, Recheck::IfChanged), // records the withdrawal
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot remove an expired admitted attestation")
                }
            }
        }
    }

    fn load_trust(&mut self) {
        for (which, path) in
            [("issuers", self.config.trust.issuers.clone()), ("policy", self.config.trust.policy.clone())]
        {
            match tokens::load_jwks(&path) {
                Ok(jwks) => {
                    info!(trust = which, path = %path.display(), kids = ?jwks.kids().collect::<Vec<_>>(), "trust anchors loaded");
                    if which == "issuers" {
                        self.issuers = jwks;
                    } else {
                        self.policy_keys = jwks;
                    }
                }
                Err(e) => {
                    self.counters.trust_load_failures += 1;
                    error!(trust = which, error = %e, "trust anchors not loaded; keeping the previous set");
                    self.last_reload_error = Some(format!("{which} trust anchors: {e}"));
                }
            }
        }
    }

    fn load_geo(&mut self) {
        let Some(path) = self.config.enforcement.geo_cidr_file.clone() else { return };
        match crate::enforce::load_country_cidrs(&path) {
            Ok(geo) => {
                info!(path = %path.display(), countries = geo.len(), "country CIDR list loaded");
                self.geo = Some(geo);
                self.reconcile_due = true;
            }
            Err(e) => {
                *self.counters.enforcement_errors.entry("nftables").or_default() += 1;
                error!(path = %path.display(), error = %e, "country CIDR list not loaded; keeping the previous one");
            }
        }
    }

    /// Drops the policy in force when its signing key is no longer trusted (removed from
    /// the policy trust set): a revoked key must not keep governing the host. Without a
    /// policy every workload is denied until a policy signed by a trusted key arrives.
    fn recheck_policy(&mut self) {
        let Some(token) = &self.policy_token else { return };
        let Err(e) = verify::<PolicyClaims>(token, &self.policy_keys, &self.policy_options(), now()) else {
            return;
        };
        if !is_untrusted(e.kind()) {
            return; // Expiry is the decision engine's business (it denies an expired policy).
        }
        let version = self.policy.as_ref().map(|p| p.claims.version);
        error!(?version, kind = e.kind(), error = %e, "the policy in force is no longer trusted; dropping it");
        self.record(json!({"type": "policy_withdrawn", "version": version, "kind": e.kind(),
            "reason": e.to_string()}));
        self.policy = None;
        self.policy_token = None;
    }

    /// Where an accepted fetched policy is kept.
    fn fetched_copy_path(&self) -> PathBuf {
        self.config.state_dir.join(crate::net::policy_fetch::FETCHED_FILE)
    }

    /// Loads the policy file and the copy of the last fetched policy. The copy goes first:
    /// when both are valid the higher version ends up in force, and the lower one is
    /// recognised as superseded rather than refused as a rollback.
    fn load_policy(&mut self) {
        self.load_policy_file(PolicySource::FetchedCopy);
        self.load_policy_file(PolicySource::File);
    }

    fn load_policy_file(&mut self, source: PolicySource) {
        let path = match source {
            PolicySource::File => self.config.policy.file.clone(),
            PolicySource::FetchedCopy | PolicySource::Fetch => self.fetched_copy_path(),
        };
        let bytes = match crate::fsutil::read_regular_file(&path, crate::policy::MAX_POLICY_BYTES) {
            Ok(b) => tokens::strip_one_newline(b),
            // Nothing fetched yet: the usual case, not worth a word.
            Err(e) if source != PolicySource::File && e.kind() == std::io::ErrorKind::NotFound => {
                self.rejected.remove(&path);
                return;
            }
            Err(e) => {
                let rejection = Rejection { digest: String::new(), kind: "Io" };
                if self.rejected.get(&path) != Some(&rejection) {
                    warn!(path = %path.display(), error = %e, "no policy file; workloads are denied until a policy is applied");
                    self.rejected.insert(path, rejection);
                }
                return;
            }
        };
        let digest = kycd_protocol::token_digest(&bytes);
        if self.policy.as_ref().is_some_and(|p| p.token_digest == digest) {
            self.rejected.remove(&path);
            return;
        }
        let previous = self.rejected.get(&path).filter(|r| r.digest == digest).cloned();
        if previous.as_ref().is_some_and(Rejection::permanent) {
            return;
        }
        let origin = path.display().to_string();
        match self.offer_policy(source, &origin, bytes, previous.as_ref()) {
            Offered::Applied(_) | Offered::Unchanged(_) => {
                self.rejected.remove(&path);
            }
            Offered::Equivalent(_) => {
                self.rejected.insert(path, Rejection { digest, kind: "Equivalent" });
            }
            Offered::Superseded => {
                self.rejected.insert(path, Rejection { digest, kind: "Superseded" });
            }
            Offered::Rejected(kind) => {
                self.rejected.insert(path, Rejection { digest, kind });
            }
        }
    }

    /// The one path every policy token takes, whatever its source: verification and
    /// anti-rollback ([`PolicyGuard::offer`]), then the log line and the audit record.
    /// `previous` is the rejection remembered for this content, if any (an unchanged
    /// transient failure is not recorded again).
    fn offer_policy(
        &mut self,
        source: PolicySource,
        origin: &str,
        bytes: Vec<u8>,
        previous: Option<&Rejection>,
    ) -> Offered {
        match self.guard.offer(&bytes, &self.policy_keys, &self.policy_options(), now()) {
            Ok(offer) => {
                let is_new = matches!(offer, Offer::Applied(_));
                let (Offer::Applied(p) | Offer::Unchanged(p)) = offer;
                let version = p.claims.version;
                let other_source = self.policy_source.fetched() != source.fetched();
                if !is_new
                    && other_source
                    && self.policy.as_ref().is_some_and(|cur| cur.claims_digest == p.claims_digest)
                {
                    debug!(version, origin, "the same policy is already in force from the other source");
                    return Offered::Equivalent(version);
                }
                info!(version, kid = %p.kid, measures = p.claims.measures.len(), origin, "policy applied");
                // Re-reading the version already applied (a restart) is not a new application.
                if is_new || self.policy.is_none() {
                    self.record(json!({"type": "policy_applied", "version": version,
                        "claims_digest": p.claims_digest, "token_digest": p.token_digest, "kid": p.kid,
                        "source": origin}));
                }
                self.policy = Some(p);
                self.policy_token = Some(bytes);
                self.policy_source = source;
                self.reconcile_due = true;
                if is_new {
                    Offered::Applied(version)
                } else {
                    Offered::Unchanged(version)
                }
            }
            // The persisted copy was accepted once, so a newer version has been applied since;
            // the file is likewise just older than what the fetcher brought.
            Err(PolicyError::Rollback { offered, highest })
                if source == PolicySource::FetchedCopy
                    || (source == PolicySource::File
                        && self.policy.is_some()
                        && self.policy_source.fetched()) =>
            {
                info!(
                    offered,
                    in_force = highest,
                    origin,
                    "policy superseded by a newer version; not applied"
                );
                self.record(json!({"type": "policy_superseded", "version": offered, "in_force": highest,
                    "source": origin}));
                Offered::Superseded
            }
            Err(e) => {
                let kind = e.kind();
                let digest = kycd_protocol::token_digest(&bytes);
                if previous.is_some_and(|r| r.digest == digest && r.kind == kind) {
                    return Offered::Rejected(kind); // A transient failure retried, unchanged: already recorded.
                }
                *self.counters.policies_rejected.entry(kind).or_default() += 1;
                if source == PolicySource::Fetch {
                    warn!(kind, error = %e, origin, "fetched policy rejected; keeping the current one");
                } else {
                    error!(kind, error = %e, origin, "policy rejected; keeping the current one");
                }
                self.record(json!({"type": "policy_rejected", "kind": kind, "reason": e.to_string(), "source": origin}));
                Offered::Rejected(kind)
            }
        }
    }

    /// A token from the policy fetcher: offered like the file, and kept in the state
    /// directory once accepted, so a restart enforces it without the collector.
    pub fn offer_fetched_policy(&mut self, token: Vec<u8>) -> crate::net::policy_fetch::FetchVerdict {
        use crate::net::policy_fetch::FetchVerdict;
        let bytes = tokens::strip_one_newline(token);
        let digest = kycd_protocol::token_digest(&bytes);
        if let Some(p) = self.policy.as_ref().filter(|p| p.token_digest == digest) {
            return FetchVerdict::Unchanged { version: p.claims.version };
        }
        let previous = self.fetch_rejected.clone().filter(|r| r.digest == digest);
        if let Some(r) = previous.as_ref().filter(|r| r.permanent()) {
            return FetchVerdict::Rejected { kind: r.kind };
        }
        let origin = self.config.policy.fetch_url.clone().unwrap_or_else(|| "fetch".into());
        match self.offer_policy(PolicySource::Fetch, &origin, bytes.clone(), previous.as_ref()) {
            Offered::Applied(version) => {
                self.fetch_rejected = None;
                self.persist_fetched(&bytes);
                FetchVerdict::Applied { version }
            }
            Offered::Unchanged(version) => {
                // Now in force from this token: the copy must be this token too.
                self.fetch_rejected = None;
                self.persist_fetched(&bytes);
                FetchVerdict::Unchanged { version }
            }
            Offered::Equivalent(version) => {
                self.fetch_rejected = None;
                FetchVerdict::Unchanged { version }
            }
            Offered::Superseded => FetchVerdict::Rejected { kind: "Rollback" },
            Offered::Rejected(kind) => {
                self.fetch_rejected = Some(Rejection { digest, kind });
                FetchVerdict::Rejected { kind }
            }
        }
    }

    /// Writes the fetched policy in force to the state directory (atomically, fsync'd).
    /// A failure leaves it in force now; after a restart the host has the policy file's
    /// version or, if that is lower, none until the next fetch (fail closed).
    fn persist_fetched(&mut self, bytes: &[u8]) {
        let path = self.fetched_copy_path();
        match crate::fsutil::write_atomic(&path, bytes) {
            Ok(()) => {
                self.rejected.remove(&path);
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot keep the fetched policy; a restart will not enforce it until fetched again");
                self.record(json!({"type": "policy_fetch_not_persisted", "reason": e.to_string(),
                    "source": path}));
            }
        }
    }

    /// The fetcher's state, for status and metrics (set by [`run`]).
    pub fn set_fetch_status(&mut self, status: crate::net::policy_fetch::SharedFetchStatus) {
        self.fetch_status = Some(status);
    }

    fn verify_attestation(&self, bytes: &[u8], host_file: bool) -> Result<Attested, IntakeError> {
        let verified = verify::<AttestationClaims>(bytes, &self.issuers, &self.options(), now())?;
        let claims = verified.claims;
        if host_file && claims.binding.kind != kycd_protocol::BindingKind::Host {
            return Err(IntakeError::NotHostBinding);
        }
        if let Some(bound) = &claims.binding.host_id {
            let actual = if host_file {
                cloud_init_instance_id(&self.config.attestations.cloud_init_instance_data)?
            } else {
                self.host_id.clone()
            };
            if *bound != actual {
                return Err(IntakeError::WrongHost { bound: bound.clone(), actual });
            }
        }
        Ok(Attested {
            token_digest: kycd_protocol::token_digest(bytes),
            workload: WorkloadId::from_binding(&claims.binding),
            claims,
        })
    }

    /// Verifies one delivered file and stores or withdraws it.
    fn ingest(&mut self, path: &Path, host_file: bool, recheck: Recheck) {
        let bytes = match crate::fsutil::read_regular_file(
            path,
            self.config.attestations.max_bytes.saturating_add(2),
        ) {
            Ok(bytes) => tokens::strip_one_newline(bytes),
            // `open` fails with EMFILE even for a file that no longer exists; `lstat` needs no
            // descriptor, so a deletion (the way to withdraw an attestation) still counts.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || (is_resource_error(&e)
                        && std::fs::symlink_metadata(path)
                            .is_err_and(|m| m.kind() == std::io::ErrorKind::NotFound)) =>
            {
                self.rejected.remove(path);
                if let Some(gone) = self.attestations.remove(path) {
                    info!(path = %path.display(), workload = %gone.workload, tenant = %gone.claims.sub, "attestation withdrawn");
                    self.record(
                        json!({"type": "attestation_withdrawn", "workload": gone.workload.to_string(),
                        "tenant": gone.claims.sub, "jti": gone.claims.jti, "source": path}),
                    );
                }
                return;
            }
            Err(e) if is_resource_error(&e) => {
                self.read_failed(path, &e);
                return;
            }
            Err(e) => {
                // Not readable as an attestation (a FIFO, a directory, …): rejected once per
                // file identity, so it is not re-recorded on every rescan.
                let identity = file_identity(path);
                let previous = self.rejected.get(path).filter(|r| r.digest == identity).cloned();
                self.read_failing.remove(path);
                self.reject(path, identity, IntakeError::Io(format!("{}: {e}", path.display())), previous);
                return;
            }
        };
        if self.read_failing.remove(path) {
            info!(path = %path.display(), "attestation readable again");
        }
        let digest = kycd_protocol::token_digest(&bytes);
        if recheck == Recheck::IfChanged
            && self.attestations.get(path).is_some_and(|a| a.token_digest == digest)
        {
            return;
        }
        let previous = self.rejected.get(path).filter(|r| r.digest == digest).cloned();
        if recheck == Recheck::IfChanged && previous.as_ref().is_some_and(Rejection::permanent) {
            debug!(path = %path.display(), "unchanged rejected file ignored");
            return;
        }
        match self.verify_attestation(&bytes, host_file) {
            Ok(a) => {
                self.rejected.remove(path);
                if host_file {
                    // cloud-init's instance data was read (when the binding needs it): a later
                    // outage is logged and recorded again.
                    self.read_failing.remove(&self.config.attestations.cloud_init_instance_data);
                }
                let unchanged =
                    self.attestations.get(path).is_some_and(|old| old.token_digest == a.token_digest);
                if !unchanged {
                    info!(path = %path.display(), workload = %a.workload, tenant = %a.claims.sub, jti = %a.claims.jti, "attestation accepted");
                    self.record(json!({"type": "attestation_accepted", "workload": a.workload.to_string(),
                        "tenant": a.claims.sub, "jti": a.claims.jti, "digest": a.token_digest,
                        "exp": a.claims.exp, "source": path}));
                    self.attestations.insert(path.to_owned(), a);
                }
            }
            // cloud-init's instance data could not be read this time: keep what the file
            // attested (a reload under descriptor exhaustion must not withdraw the host's).
            Err(IntakeError::Unreadable { path: input, source }) => self.read_failed(&input, &source),
            Err(e) => self.reject(path, digest, e, previous),
        }
    }

    /// An input (an attestation file or directory, libvirt's status) could not be read for
    /// want of resources or a failing disk: what it said before stays in force. Counted
    /// every time; logged and recorded once per outage.
    fn read_failed(&mut self, path: &Path, e: &std::io::Error) {
        self.counters.input_read_errors = self.counters.input_read_errors.saturating_add(1);
        self.last_read_error = Some((now(), format!("{}: {e}", path.display())));
        if self.read_failing.insert(path.to_owned()) {
            error!(path = %path.display(), error = %e, "cannot read an input; keeping what it said before");
            self.record(json!({"type": "input_read_failed", "source": path, "error": e.to_string()}));
        }
    }

    /// Records an intake failure (once per content and kind) and withdraws whatever the file
    /// attested before: a file that no longer verifies no longer attests.
    fn reject(&mut self, path: &Path, digest: String, e: IntakeError, previous: Option<Rejection>) {
        let rejection = Rejection { digest, kind: e.kind() };
        let repeated = previous.as_ref() == Some(&rejection);
        if !repeated {
            *self.counters.attestations_rejected.entry(e.kind()).or_default() += 1;
            warn!(path = %path.display(), kind = e.kind(), error = %e, "attestation rejected");
            self.record(json!({"type": "attestation_rejected", "kind": e.kind(), "reason": e.to_string(), "source": path}));
        }
        self.rejected.insert(path.to_owned(), rejection);
        if let Some(gone) = self.attestations.remove(path) {
            self.record(json!({"type": "attestation_withdrawn", "workload": gone.workload.to_string(),
                "tenant": gone.claims.sub, "jti": gone.claims.jti, "source": path}));
        }
    }

    /// Re-reads the drop directory, the attestations kept from admissions, and the host
    /// attestation.
    fn rescan_attestations(&mut self, recheck: Recheck) {
        let mut present: BTreeSet<PathBuf> = BTreeSet::new();
        // Directories that could not be listed: what they held before is not gone.
        let mut unlisted: Vec<PathBuf> = Vec::new();
        for dir in [self.config.drop_dir(), self.config.admitted_dir()] {
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    let mut failed = None;
                    for entry in entries {
                        match entry {
                            Ok(entry) if is_attestation_file(&entry.path()) => {
                                present.insert(entry.path());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    match failed {
                        Some(e) => {
                            self.read_failed(&dir, &e);
                            unlisted.push(dir);
                        }
                        None if self.read_failing.remove(&dir) => {
                            info!(dir = %dir.display(), "attestation directory readable again");
                        }
                        None => {}
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == self.config.admitted_dir() => {
                    self.read_failing.remove(&dir);
                }
                Err(e) if is_resource_error(&e) => {
                    self.read_failed(&dir, &e);
                    unlisted.push(dir);
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "cannot read an attestation directory"),
            }
        }
        let host_file = self.config.attestations.host_attestation.clone();
        // Paths in a directory that could not be listed stay known while they exist (`lstat`
        // needs no descriptor): a file deleted during the outage is still withdrawn.
        let kept = |p: &Path| {
            unlisted.iter().any(|d| p.parent() == Some(d.as_path())) && std::fs::symlink_metadata(p).is_ok()
        };
        let stale: Vec<PathBuf> = self
            .attestations
            .keys()
            .filter(|p| **p != host_file && !present.contains(*p) && !kept(p))
            .cloned()
            .collect();
        for path in stale.iter().chain(present.iter()) {
            self.ingest(path, false, recheck);
        }
        let fetched_copy = self.fetched_copy_path();
        self.rejected.retain(|p, _| {
            present.contains(p)
                || kept(p)
                || *p == host_file
                || *p == self.config.policy.file
                || *p == fetched_copy
        });
        if host_file.exists() || self.attestations.contains_key(&host_file) {
            self.ingest(&host_file, true, recheck);
        }
    }

    /// Re-reads the cgroup tree and libvirt's status directory.
    fn rescan_workloads(&mut self) {
        let now = now();
        let status_dir = self.config.workloads.libvirt_status_dir.clone();
        match cgroup::libvirt_domains(&status_dir) {
            Ok(domains) => {
                if self.read_failing.remove(&status_dir) {
                    info!(dir = %status_dir.display(), "libvirt status readable again");
                }
                self.libvirt_domains = domains;
            }
            // Keep the domains known before: a UUID binding must not come loose because the
            // agent is short of descriptors.
            Err(e) => self.read_failed(&status_dir, &e),
        }
        // An admitted domain is known by its status XML once it runs; one that never started
        // is forgotten after an hour.
        let running: BTreeSet<&str> = self.libvirt_domains.iter().filter_map(|d| d.uuid.as_deref()).collect();
        self.admitted_domains.retain(|uuid, (_, at)| !running.contains(uuid.as_str()) && now - *at < 3600);
        let discovery = match &self.cgroup_mount {
            Some(mount) => cgroup::discover(mount, &self.config.workloads.roots, &self.libvirt_domains),
            None => cgroup::Discovery {
                found: vec![cgroup::Discovered { id: WorkloadId::host(), cgroup: None }],
                unreadable_roots: Vec::new(),
            },
        };
        for root in &discovery.unreadable_roots {
            warn!(root = %root.display(), "cannot read a workload root; keeping the workloads known under it");
        }
        let mut keep: BTreeSet<WorkloadId> = discovery.found.iter().map(|d| d.id.clone()).collect();
        // Attested workloads stay known while absent from the tree (a VM between admission
        // and start), and so do those under a root that could not be read this time.
        keep.extend(self.attestations.values().map(|a| self.resolve(&a.workload)));
        keep.extend(self.workloads.iter().filter_map(|(id, w)| {
            let cgroup = w.cgroup.as_ref()?;
            discovery.unreadable_roots.iter().any(|r| cgroup.starts_with(r)).then(|| id.clone())
        }));
        let vanished: Vec<WorkloadId> =
            self.workloads.keys().filter(|id| !keep.contains(id)).cloned().collect();
        for id in vanished {
            self.workloads.remove(&id);
            if let Some(seen) = self.first_seen.get_mut(&id.to_string()) {
                seen.vanished_at = Some(now);
                self.first_seen_dirty = true;
            }
            info!(workload = %id, "workload vanished");
            self.record(json!({"type": "workload_vanished", "workload": id.to_string()}));
        }
        for d in discovery.found {
            let interfaces = if d.id.kind == WorkloadKind::LibvirtDomain {
                match crate::enforce::libvirt::domain_interfaces(&status_dir, &d.id.id) {
                    Ok(interfaces) => {
                        self.read_failing.remove(&status_dir.join(format!("{}.xml", d.id.id)));
                        interfaces
                    }
                    // Keep the taps known before: a network block must not lift because the
                    // status file could not be read this time.
                    Err(e) => {
                        self.read_failed(&status_dir.join(format!("{}.xml", d.id.id)), &e);
                        self.workloads.get(&d.id).map(|w| w.interfaces.clone()).unwrap_or_default()
                    }
                }
            } else {
                Vec::new()
            };
            match self.workloads.get_mut(&d.id) {
                Some(w) => {
                    if w.cgroup != d.cgroup || w.interfaces != interfaces {
                        self.reconcile_due = true;
                    }
                    w.cgroup = d.cgroup;
                    w.interfaces = interfaces;
                }
                None => {
                    let first_seen = self.first_seen_of(&d.id);
                    info!(workload = %d.id, first_seen, "workload discovered");
                    self.workloads.insert(d.id, WorkloadState { first_seen, cgroup: d.cgroup, interfaces });
                    self.reconcile_due = true;
                }
            }
        }
        let forget_before = now.saturating_sub_unsigned(self.config.workloads.forget_after_s);
        let before = self.first_seen.len();
        self.first_seen.retain(|_, seen| seen.vanished_at.is_none_or(|t| t >= forget_before));
        self.first_seen_dirty |= self.first_seen.len() != before;
    }

    /// The attestation in force for each workload: the most recently issued one bound to
    /// it (ties broken by `jti`, so the choice is deterministic). Built once per evaluation.
    fn attestations_in_force(&self) -> BTreeMap<WorkloadId, &Attested> {
        let mut best: BTreeMap<WorkloadId, &Attested> = BTreeMap::new();
        for a in self.attestations.values() {
            let slot = best.entry(self.resolve(&a.workload)).or_insert(a);
            if (a.claims.iat, &a.claims.jti) > (slot.claims.iat, &slot.claims.jti) {
                *slot = a;
            }
        }
        best
    }

    /// Workload → tenant for every attestation in force and within its validity window: whom
    /// GPU usage is attributed to. (Its verdict does not matter: a denied tenant's usage is
    /// still that tenant's.)
    pub fn tenant_map(&self) -> crate::gpu::sampler::TenantMap {
        let now = now();
        let skew = i64::try_from(self.config.clock_skew_s).unwrap_or(i64::MAX);
        self.attestations_in_force()
            .into_iter()
            .filter(|(_, a)| {
                a.claims.exp > now.saturating_sub(skew)
                    && a.claims.nbf.is_none_or(|n| n <= now.saturating_add(skew))
            })
            .map(|(id, a)| {
                let info = crate::gpu::sampler::TenantInfo {
                    tenant: a.claims.sub.clone(),
                    foreign_person: a.claims.foreign_person,
                };
                (id, info)
            })
            .collect()
    }

    /// The workload a binding names on this host: a libvirt domain bound by UUID is the
    /// running domain with that UUID, named as in the cgroup tree.
    fn resolve(&self, id: &WorkloadId) -> WorkloadId {
        if id.kind == WorkloadKind::LibvirtDomain {
            let uuid = id.id.to_ascii_lowercase();
            if let Some(d) = self.libvirt_domains.iter().find(|d| d.uuid.as_deref() == Some(uuid.as_str())) {
                return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: d.name.clone() };
            }
            if let Some((name, _)) = self.admitted_domains.get(&uuid) {
                // A running domain of that name with another UUID is another domain.
                let taken =
                    self.libvirt_domains.iter().any(|d| d.name == *name && d.uuid.as_deref() != Some(&uuid));
                if !taken {
                    return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: name.clone() };
                }
            }
        }
        id.clone()
    }

    /// Re-decides every workload (present or attested), records changed decisions, then
    /// enforces them. Returns the earliest time a decision may change by itself (now, when
    /// some decision could not be recorded and must be retried).
    pub fn evaluate(&mut self) -> Option<i64> {
        let now = now();
        let mut ids: BTreeSet<WorkloadId> = self.workloads.keys().cloned().collect();
        let resolved: Vec<WorkloadId> =
            self.attestations.values().map(|a| self.resolve(&a.workload)).collect();
        ids.extend(resolved);
        for id in &ids {
            if !self.workloads.contains_key(id) {
                // Attested before it exists (e.g. a VM about to start): decided now, so
                // admission can answer; first seen now.
                let first_seen = self.first_seen_of(id);
                self.workloads
                    .insert(id.clone(), WorkloadState { first_seen, cgroup: None, interfaces: Vec::new() });
            }
        }
        self.first_seen_fallback = None;
        self.persist_first_seen();
        let mut changed = Vec::new();
        let in_force = self.attestations_in_force();
        for id in &ids {
            let state = &self.workloads[id];
            let attested = in_force.get(id).copied();
            // A binding by libvirt UUID was resolved to the domain's name above; the engine
            // checks bindings against the workload, so it sees the binding as resolved.
            let claims = attested.map(|a| {
                if a.workload == *id {
                    std::borrow::Cow::Borrowed(&a.claims)
                } else {
                    let mut resolved = a.claims.clone();
                    resolved.binding.id = id.id.clone();
                    std::borrow::Cow::Owned(resolved)
                }
            });
            let decision = decide(&DecisionInput {
                workload: id,
                first_seen: state.first_seen,
                attestation: claims.as_deref(),
                policy: self.policy.as_ref().map(|p| &p.claims),
                now,
                clock_skew_s: self.config.clock_skew_s,
            });
            if self.decisions.get(id) != Some(&decision) {
                changed.push((id.clone(), attested.map(|a| a.token_digest.clone()), decision));
            }
        }
        let gone: Vec<WorkloadId> = self.decisions.keys().filter(|id| !ids.contains(*id)).cloned().collect();
        for id in gone {
            self.decisions.remove(&id);
            self.decided_at.remove(&id);
        }
        let unrecorded = self.record_and_enforce(now, changed);
        if unrecorded > 0 {
            self.audit_failures = self.audit_failures.saturating_add(1);
            error!(
                unrecorded,
                failures = self.audit_failures,
                "cannot record decisions; not enforcing them, will retry"
            );
            if self.audit_failures >= LOCKDOWN_AFTER {
                self.lockdown(now);
            }
            return Some(now);
        }
        self.audit_failures = 0;
        self.decisions.values().filter_map(|d| d.next_review_at).min()
    }

    /// Appends the changed decisions to the audit log (one fsync for all when it can;
    /// record by record when that fails, so one unwritable record does not hold back the
    /// rest); those recorded take effect, and are enforced at the next reconciliation.
    /// Returns how many could not be recorded.
    fn record_and_enforce(
        &mut self,
        now: i64,
        changed: Vec<(WorkloadId, Option<String>, Decision)>,
    ) -> usize {
        if changed.is_empty() {
            return 0;
        }
        let mode = self.config.mode;
        let events: Vec<(i64, serde_json::Value)> = changed
            .iter()
            .map(|(id, digest, d)| {
                (
                    now,
                    json!({"type": "decision", "workload": id.to_string(), "attestation_digest": digest,
                    "mode": mode, "decision": d}),
                )
            })
            .collect();
        // Durable first: nothing is enforced that the audit log does not show.
        let recorded: Vec<bool> = match self.audit.append_batch(events.iter().cloned()) {
            Ok(_) => vec![true; events.len()],
            Err(e) => {
                warn!(error = %e, "cannot append the decisions as one batch; trying one by one");
                events.iter().map(|(ts, event)| self.audit.append(*ts, event).is_ok()).collect()
            }
        };
        let mut unrecorded = 0;
        for ((id, _, decision), ok) in changed.into_iter().zip(recorded) {
            if !ok {
                unrecorded += 1;
                continue;
            }
            info!(workload = %id, verdict = ?decision.verdict, policy_version = ?decision.policy_version,
                  reasons = ?decision.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), "decision");
            self.decided_at.insert(id.clone(), now);
            self.decisions.insert(id, decision);
            self.reconcile_due = true;
        }
        unrecorded
    }

    /// Denies every workload not already denied, unrecorded: the audit log has been failing
    /// for [`LOCKDOWN_AFTER`] evaluations (see the module docs). The synthetic decisions
    /// differ from what the engine decides, so the first evaluation that can record again
    /// records and enforces the real ones.
    fn lockdown(&mut self, now: i64) {
        let ids: Vec<WorkloadId> = self.workloads.keys().cloned().collect();
        for id in ids {
            let current = self.decisions.get(&id);
            if current.is_some_and(|d| d.reasons.iter().any(|r| r.code == ReasonCode::AuditUnavailable)) {
                continue;
            }
            let decision = Decision {
                verdict: Verdict::Deny,
                conditions: None,
                reasons: vec![Reason {
                    code: ReasonCode::AuditUnavailable,
                    measure_id: None,
                    citation: None,
                    detail: "the audit log cannot be written; denied until it can".into(),
                }],
                next_review_at: Some(now),
                policy_version: current.and_then(|d| d.policy_version),
                tenant: current.and_then(|d| d.tenant.clone()),
                attestation_jti: current.and_then(|d| d.attestation_jti.clone()),
            };
            error!(workload = %id, "audit log unavailable: denying (unrecorded)");
            self.decisions.insert(id, decision);
            self.reconcile_due = true;
        }
    }

    /// When `id` was first seen: persisted if known (also after it vanished and came back),
    /// else now (and remembered).
    fn first_seen_of(&mut self, id: &WorkloadId) -> i64 {
        let fallback = self.first_seen_fallback;
        let seen = self
            .first_seen
            .entry(id.to_string())
            .or_insert_with(|| Seen { first: fallback.unwrap_or_else(now), vanished_at: None });
        let first = seen.first;
        if seen.vanished_at.take().is_some() || first == now() || fallback.is_some() {
            self.first_seen_dirty = true;
        }
        first
    }

    fn persist_first_seen(&mut self) {
        if !self.first_seen_dirty {
            return;
        }
        let path = self.config.state_dir.join(FIRST_SEEN_FILE);
        let body = serde_json::to_vec(&self.first_seen).unwrap_or_default();
        match crate::fsutil::write_atomic(&path, &body) {
            Ok(()) => self.first_seen_dirty = false,
            Err(e) => error!(error = %e, path = %path.display(), "cannot persist first-seen times; retrying"),
        }
    }

    /// Converges the host on the recorded decisions (enforce mode only): a full reconcile
    /// on start and every interval, a fast apply on decision changes in between; see
    /// [`crate::reconcile`]. Drift and failures are logged and counted; a failing backend is
    /// retried at the next reconciliation, and what it had applied stays in place.
    pub fn reconcile(&mut self) {
        if self.audit_failures > 0 && self.audit_failures < LOCKDOWN_AFTER {
            // Decisions are partly unrecorded: the host keeps what it has (a lift computed
            // from a partial picture could release a block) until they are recorded or the
            // lockdown denies everything.
            return;
        }
        let full = std::mem::take(&mut self.full_reconcile_due);
        self.reconcile_due = false;
        if self.config.mode != Mode::Enforce {
            return;
        }
        let views = self.decisions.iter().map(|(id, decision)| {
            let w = self.workloads.get(id);
            crate::reconcile::WorkloadView {
                id,
                cgroup: w.and_then(|w| w.cgroup.as_deref()),
                interfaces: w.map(|w| w.interfaces.as_slice()).unwrap_or(&[]),
                decision,
            }
        });
        let desired = crate::reconcile::desired_state(
            views,
            self.policy.as_ref().map(|p| &p.claims),
            self.cgroup_mount.as_deref(),
            self.geo.as_ref(),
            now(),
        );
        let report = if full { self.enforcer.reconcile(&desired) } else { self.enforcer.apply(&desired) };
        for (backend, what) in &report.drift {
            *self.counters.drift_repaired.entry(backend).or_default() += 1;
            warn!(backend, drift = %what, "drift repaired");
        }
        for (backend, error) in &report.errors {
            *self.counters.enforcement_errors.entry(backend).or_default() += 1;
            error!(backend, %error, "enforcement failed; retrying at the next reconciliation");
        }
        if report.changes > 0 {
            info!(
                changes = report.changes,
                frozen = desired.cgroups.len(),
                blocked_cgroups = desired.nft.cgroups.len(),
                blocked_interfaces = desired.nft.interfaces.len(),
                "host reconciled"
            );
        }
    }

    /// SIGHUP: applies a re-read configuration, then reloads trust, policy and attestations.
    /// A configuration that did not load, or changes settings that only a restart can apply
    /// (state dir, mode, sockets, GPU, collector API), keeps the running one — logged and
    /// shown by `kycctl status`.
    pub fn reload_config(&mut self, loaded: Result<Config, String>) {
        let problem = match loaded {
            Err(e) => Some(format!("configuration not reloaded, keeping the running one: {e}")),
            Ok(new) => {
                let restart_only = [
                    ("state_dir", new.state_dir != self.config.state_dir),
                    ("host_id", new.host_id != self.config.host_id),
                    ("mode", new.mode != self.config.mode),
                    ("api", new.api != self.config.api),
                    ("gpu", new.gpu != self.config.gpu),
                    ("collector_api", new.collector_api != self.config.collector_api),
                    ("audit", new.audit != self.config.audit),
                    (
                        "policy.fetch_*",
                        (
                            &new.policy.fetch_url,
                            new.policy.fetch_interval_s,
                            &new.policy.fetch_ca_file,
                            new.policy.fetch_timeout_s,
                        ) != (
                            &self.config.policy.fetch_url,
                            self.config.policy.fetch_interval_s,
                            &self.config.policy.fetch_ca_file,
                            self.config.policy.fetch_timeout_s,
                        ),
                    ),
                ];
                let changed: Vec<&str> = restart_only.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
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
            self.record(json!({"type": "config_reload_failed", "reason": p}));
            self.last_reload_error = Some(p);
        }
    }

    /// The agent's state at a glance (`kycctl status`); `gpu` is the GPU backend's state.
    pub fn status(&self, gpu: String) -> crate::net::operator_api::Status {
        let mut verdicts = BTreeMap::new();
        for d in self.decisions.values() {
            let v = serde_json::to_value(d.verdict).ok().and_then(|v| v.as_str().map(str::to_owned));
            *verdicts.entry(v.unwrap_or_default()).or_default() += 1;
        }
        let now = now();
        crate::net::operator_api::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            host_id: self.host_id.clone(),
            mode: match self.config.mode {
                Mode::Audit => "audit".into(),
                Mode::Enforce => "enforce".into(),
            },
            started_at: self.started_at,
            uptime_s: now - self.started_at,
            policy: self.policy.as_ref().map(|p| crate::net::operator_api::PolicyStatus {
                version: p.claims.version,
                kid: p.kid.clone(),
                source: match (self.policy_source, &self.config.policy.fetch_url) {
                    (PolicySource::File, _) => self.config.policy.file.display().to_string(),
                    (_, Some(url)) => format!("{url} (kept in {})", self.fetched_copy_path().display()),
                    (_, None) => self.fetched_copy_path().display().to_string(),
                },
            }),
            policy_fetch: self.fetch_status.as_ref().and_then(|s| s.lock().ok()).map(|s| {
                crate::net::operator_api::PolicyFetchStatus {
                    url: s.url.clone(),
                    last_at: s.last_at,
                    outcome: s.last_outcome.clone(),
                    etag: s.etag.clone(),
                }
            }),
            issuer_kids: self.issuers.kids().map(str::to_owned).collect(),
            policy_kids: self.policy_keys.kids().map(str::to_owned).collect(),
            verdicts,
            attestations: self.attestations.len(),
            gpu,
            audit_failures: self.audit_failures,
            audit_write_failures: self.audit.health().failures,
            audit_last_error: self.audit.health().last_error.clone(),
            input_read_errors: self.counters.input_read_errors,
            last_read_error: self.last_read_error.clone(),
            connections: self.connections.each().map(|(name, s)| (name.to_owned(), s.into())).collect(),
            enforcement_errors: self
                .counters
                .enforcement_errors
                .iter()
                .map(|(k, v)| ((*k).into(), *v))
                .collect(),
            drift_repaired: self.counters.drift_repaired.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            last_reload_error: self.last_reload_error.clone(),
            reporting: None,
        }
    }

    /// Every known workload with its decision (`kycctl workloads`).
    pub fn workload_rows(&self) -> Vec<crate::net::operator_api::WorkloadRow> {
        self.workloads
            .iter()
            .map(|(id, w)| {
                let decision = self.decisions.get(id);
                crate::net::operator_api::WorkloadRow {
                    workload: id.to_string(),
                    tenant: decision.and_then(|d| d.tenant.clone()),
                    decision: decision.cloned(),
                    decided_at: self.decided_at.get(id).copied(),
                    cgroup: w.cgroup.as_ref().map(|c| c.display().to_string()),
                }
            })
            .collect()
    }

    /// The content of a host statement for `nonce` (the collector API signs it). `gpus` is
    /// the GPU inventory.
    pub fn statement_claims(
        &self,
        nonce: String,
        gpus: Vec<kycd_protocol::GpuInventoryEntry>,
    ) -> kycd_protocol::HostStatementClaims {
        let in_force = self.attestations_in_force();
        let workloads = self
            .decisions
            .iter()
            .map(|(id, d)| {
                let attested = in_force.get(id);
                kycd_protocol::WorkloadStatement {
                    workload: id.to_string(),
                    tenant: d.tenant.clone(),
                    attestation_digest: attested.map(|a| a.token_digest.clone()),
                    attestation_exp: attested.map(|a| a.claims.exp),
                    verdict: d.verdict,
                    conditions: d.conditions.clone(),
                    subject: attested.map(|a| statement_subject(&a.claims)),
                }
            })
            .collect();
        let iat = now();
        kycd_protocol::HostStatementClaims {
            iss: self.host_id.clone(),
            iat,
            exp: iat + 60,
            nonce,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            policy_version: self.policy.as_ref().map(|p| p.claims.version),
            workloads,
            gpus,
            host: None,
        }
    }

    /// The agent's own metrics in the Prometheus text format (the GPU sampler adds its own).
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let labelled = |label: &str, m: &BTreeMap<&'static str, u64>| -> Vec<(String, f64)> {
            m.iter().map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), *v as f64)).collect()
        };
        let mut verdicts: BTreeMap<&'static str, u64> = [("allow", 0), ("condition", 0), ("deny", 0)].into();
        for d in self.decisions.values() {
            let key = match d.verdict {
                Verdict::Allow => "allow",
                Verdict::Condition => "condition",
                Verdict::Deny => "deny",
            };
            *verdicts.entry(key).or_default() += 1;
        }
        family("kycd_workloads", "gauge", "Workloads by recorded verdict.", labelled("verdict", &verdicts));
        family(
            "kycd_policy_version",
            "gauge",
            "Version of the policy in force (0: none).",
            vec![(String::new(), self.policy.as_ref().map_or(0.0, |p| p.claims.version as f64))],
        );
        family(
            "kycd_attestations_rejected_total",
            "counter",
            "Attestations rejected, by error kind.",
            labelled("kind", &self.counters.attestations_rejected),
        );
        family(
            "kycd_policies_rejected_total",
            "counter",
            "Policies rejected, by error kind.",
            labelled("kind", &self.counters.policies_rejected),
        );
        family(
            "kycd_trust_load_failures_total",
            "counter",
            "Trust files that failed to load (the previous set was kept).",
            vec![(String::new(), self.counters.trust_load_failures as f64)],
        );
        family(
            "kycd_enforcement_errors_total",
            "counter",
            "Enforcement failures, by backend.",
            labelled("backend", &self.counters.enforcement_errors),
        );
        family(
            "kycd_enforcement_drift_repaired_total",
            "counter",
            "Drift repaired by reconciliation, by backend.",
            labelled("backend", &self.counters.drift_repaired),
        );
        family(
            "kycd_audit_failing_evaluations",
            "gauge",
            "Consecutive evaluations whose decisions could not be recorded.",
            vec![(String::new(), f64::from(self.audit_failures))],
        );
        family(
            "kycd_audit_write_failures_total",
            "counter",
            "Audit log appends that failed (any record).",
            vec![(String::new(), self.audit.health().failures as f64)],
        );
        family(
            "kycd_audit_last_write_ok",
            "gauge",
            "1 when the last audit log append succeeded, 0 when it failed.",
            vec![(String::new(), if self.audit.health().last_error.is_none() { 1.0 } else { 0.0 })],
        );
        family(
            "kycd_input_read_errors_total",
            "counter",
            "Inputs (attestations, libvirt status) unreadable for want of resources or a failing disk (state kept).",
            vec![(String::new(), self.counters.input_read_errors as f64)],
        );
        for (i, (listener, snapshot)) in self.connections.each().enumerate() {
            snapshot.write_prometheus(&mut out, "kycd_api", listener, i == 0);
        }
        if let Some(status) = self.fetch_status.as_ref().and_then(|s| s.lock().ok()) {
            out.push_str(&crate::net::policy_fetch::metrics_text(&status));
        }
        out
    }

    /// A one-line summary for systemd's `STATUS=`.
    fn status_line(&self) -> String {
        let denied = self.decisions.values().filter(|d| d.verdict == Verdict::Deny).count();
        let policy =
            self.policy.as_ref().map_or("no policy".to_owned(), |p| format!("policy v{}", p.claims.version));
        format!("{:?}: {} workloads, {denied} denied, {policy}", self.config.mode, self.decisions.len())
    }

    /// Lifts every block (`--release-on-exit`).
    fn release(&mut self) {
        let report = self.enforcer.release();
        for (backend, error) in &report.errors {
            error!(backend, %error, "could not lift a block on exit");
        }
        info!(changes = report.changes, "blocks lifted on exit");
    }

    /// Answers an admission request (`kycctl admit`): the attestation it brings goes through
    /// the same verification as a delivered file and, once verified, is persisted in the
    /// drop directory (so it survives restarts like any delivered attestation); then the
    /// workload is decided, recorded and the decision returned. Anything short of a
    /// recorded decision answers deny.
    pub fn admit(&mut self, admission: Admission) -> AdmitAnswer {
        let workload = admission.workload;
        // A domain named like a UUID could otherwise borrow an attestation bound to that
        // UUID: such a name is accepted only as the domain's own UUID.
        if workload.kind == WorkloadKind::LibvirtDomain && cgroup::is_uuid(&workload.id) {
            let own = admission.libvirt_uuid.as_deref() == Some(workload.id.to_ascii_lowercase().as_str());
            if !own {
                return AdmitAnswer::deny(&workload, "a libvirt domain named like a UUID must be that UUID");
            }
        }
        // The UUID → name mapping lets an attestation bound by UUID apply before the domain
        // runs. It is kept only if the domain is admitted, and one name has one UUID.
        let previous_mapping = match (workload.kind, &admission.libvirt_uuid) {
            (WorkloadKind::LibvirtDomain, Some(uuid)) => {
                let previous = self.admitted_domains.clone();
                self.admitted_domains.retain(|u, (name, _)| u == uuid || *name != workload.id);
                self.admitted_domains.insert(uuid.clone(), (workload.id.clone(), now()));
                Some(previous)
            }
            _ => None,
        };
        let answer = self.admit_inner(&workload, admission.attestation);
        if answer.verdict == Verdict::Deny {
            if let Some(previous) = previous_mapping {
                self.admitted_domains = previous;
            }
        }
        answer
    }

    fn admit_inner(&mut self, workload: &WorkloadId, attestation: Option<Vec<u8>>) -> AdmitAnswer {
        if let Some(bytes) = attestation {
            let bytes = tokens::strip_one_newline(bytes);
            let attested = match self.verify_attestation(&bytes, false) {
                Ok(a) => a,
                Err(e) => {
                    *self.counters.attestations_rejected.entry(e.kind()).or_default() += 1;
                    warn!(%workload, kind = e.kind(), error = %e, "admission: attestation rejected");
                    self.record(
                        json!({"type": "attestation_rejected", "kind": e.kind(), "reason": e.to_string(),
                        "source": "admission", "workload": workload.to_string()}),
                    );
                    return AdmitAnswer::deny(workload, format!("attestation rejected ({}): {e}", e.kind()));
                }
            };
            let bound = self.resolve(&attested.workload);
            if bound != *workload {
                let reason = format!("the attestation is bound to {bound}, not {workload}");
                warn!(%workload, %bound, "admission: attestation bound to another workload");
                self.record(
                    json!({"type": "attestation_rejected", "kind": "BindingMismatch", "reason": reason,
                    "source": "admission", "workload": workload.to_string()}),
                );
                return AdmitAnswer::deny(workload, reason);
            }
            let digest_prefix: String = attested.token_digest.chars().take(16).collect();
            let path = self.config.admitted_dir().join(format!("{digest_prefix}.jws"));
            if let Err(e) = crate::fsutil::write_atomic(&path, &bytes) {
                error!(path = %path.display(), error = %e, "admission: cannot persist the attestation");
                return AdmitAnswer::deny(workload, format!("cannot persist the attestation: {e}"));
            }
            if self.attestations.get(&path).is_none_or(|a| a.token_digest != attested.token_digest) {
                info!(%workload, tenant = %attested.claims.sub, jti = %attested.claims.jti, "attestation accepted at admission");
                self.record(json!({"type": "attestation_accepted", "workload": attested.workload.to_string(),
                    "tenant": attested.claims.sub, "jti": attested.claims.jti, "digest": attested.token_digest,
                    "exp": attested.claims.exp, "source": path, "via": "admission"}));
                self.attestations.insert(path, attested);
            }
        }
        if !self.workloads.contains_key(workload) {
            let first_seen = self.first_seen_of(workload);
            self.workloads
                .insert(workload.clone(), WorkloadState { first_seen, cgroup: None, interfaces: Vec::new() });
        }
        self.evaluate();
        // A decision that could not be recorded is no answer: the one on record may be stale.
        if self.audit_failures > 0 {
            return AdmitAnswer::deny(
                workload,
                "the audit log cannot be written; decisions are not recorded",
            );
        }
        match self.decisions.get(workload) {
            Some(d) => AdmitAnswer {
                workload: workload.to_string(),
                verdict: d.verdict,
                decision: Some(d.clone()),
                error: None,
            },
            None => AdmitAnswer::deny(workload, "the decision could not be recorded"),
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::DropDir(path) if is_attestation_file(&path) => {
                self.ingest(&path, false, Recheck::IfChanged)
            }
            Event::DropDir(_) => {}
            Event::ConfigFile(path) if path == self.config.attestations.host_attestation => {
                self.ingest(&path, true, Recheck::IfChanged)
            }
            Event::ConfigFile(path) if path == self.config.policy.file => self.load_policy(),
            Event::ConfigFile(_) => {}
            Event::FetchedPolicy { token, reply } => {
                let verdict = self.offer_fetched_policy(token);
                let _ = reply.send(verdict);
            }
            Event::Reload => {
                info!("reloading trust anchors, policy and attestations");
                self.reload();
            }
        }
    }
}

/// The inotify watches: the drop directory and the directories of the policy file and the
/// host attestation. A directory that does not exist yet (or was replaced) is (re)watched
/// on the next tick; until then the tick's rescan covers it.
struct Watches {
    watcher: notify::RecommendedWatcher,
    /// Directory → inode it had when watched.
    watched: BTreeMap<PathBuf, u64>,
    wanted: Vec<PathBuf>,
}

impl Watches {
    fn ensure(&mut self) {
        use notify::Watcher as _;
        use std::os::unix::fs::MetadataExt as _;
        for dir in &self.wanted {
            let inode = std::fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| m.ino());
            let current = self.watched.get(dir).copied();
            if inode == current {
                continue;
            }
            if current.is_some() {
                let _ = self.watcher.unwatch(dir);
                self.watched.remove(dir);
            }
            let Some(inode) = inode else { continue };
            match self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    debug!(dir = %dir.display(), "watching");
                    self.watched.insert(dir.clone(), inode);
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot watch; the periodic rescan covers it")
                }
            }
        }
    }
}

/// Starts the watcher; see [`Watches`].
fn start_watcher(
    config: &Config,
    tx: mpsc::Sender<Event>,
    overflow: Arc<AtomicBool>,
) -> Result<Watches, DaemonError> {
    let drop_dir = config.drop_dir();
    let files = [config.policy.file.clone(), config.attestations.host_attestation.clone()];
    let watched_files = files.clone();
    let dir_for_events = drop_dir.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(ev) if !ev.need_rescan() => ev,
            _ => {
                overflow.store(true, Ordering::Relaxed);
                return;
            }
        };
        // Our own reads of a file raise access/open events; reacting to them would re-read
        // the file forever.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for path in event.paths {
            let msg = if path.parent() == Some(dir_for_events.as_path()) {
                Event::DropDir(path)
            } else if watched_files.contains(&path) {
                Event::ConfigFile(path)
            } else {
                continue;
            };
            if tx.try_send(msg).is_err() {
                overflow.store(true, Ordering::Relaxed);
            }
        }
    })?;
    crate::fsutil::create_dir_durably(&drop_dir)
        .map_err(|source| DaemonError::StateDir { path: drop_dir.clone(), source })?;
    let mut wanted = vec![drop_dir];
    for dir in files.iter().filter_map(|f| f.parent()) {
        if !wanted.iter().any(|w| w == dir) {
            wanted.push(dir.to_owned());
        }
    }
    let mut watches = Watches { watcher, watched: BTreeMap::new(), wanted };
    watches.ensure();
    Ok(watches)
}

/// The GPU sampler thread and its observers; see [`start_gpu`].
struct GpuTasks {
    /// The sampler's metrics (status; rendered by the operator API's `/metrics`).
    metrics: Arc<std::sync::Mutex<crate::gpu::metrics::GpuMetrics>>,
    sampler: std::thread::JoinHandle<()>,
    /// The spool writer (see [`crate::spool::run_writer`]).
    sink: tokio::task::JoinHandle<()>,
    observer: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl GpuTasks {
    async fn stop(self) {
        self.stop.cancel();
        // The sampler flushes its open window into the sink on the way out.
        let _ = tokio::task::spawn_blocking(move || self.sampler.join()).await;
        let _ = self.sink.await;
        self.observer.abort();
    }
}

/// Starts GPU sampling: the sampler on its own OS thread (NVML calls block), usage windows
/// into a bounded channel that the spool writer drains, tick reports to an observer that
/// logs the backend's state.
fn start_gpu(
    config: &Config,
    reporting: &crate::upload::Reporting,
    backend: Box<dyn crate::gpu::GpuBackend>,
    tenants: tokio::sync::watch::Receiver<Arc<crate::gpu::sampler::TenantMap>>,
    stop: CancellationToken,
) -> Option<GpuTasks> {
    use crate::gpu::sampler::{GpuSampler, SamplerOptions};
    let g = &config.gpu;
    let options = SamplerOptions {
        interval: Duration::from_millis(g.interval_ms),
        window: Duration::from_secs(g.window_s),
        training: crate::gpu::usage::TrainingRule {
            min_gpus: g.training_min_gpus,
            min_activity: f64::from(g.training_min_activity_pct) / 100.0,
            min_duration: Duration::from_secs(g.training_min_minutes.saturating_mul(60)),
        },
        proc_root: PathBuf::from("/proc"),
        cgroup_roots: config.workloads.roots.clone(),
        peak_override: g.peak_flops_file.clone(),
    };
    let sampler = match GpuSampler::new(backend, &options) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "GPU sampler not started");
            return None;
        }
    };
    let (windows_tx, windows_rx) = crate::gpu::usage::window_channel(256);
    let (reports_tx, mut reports_rx) = mpsc::channel::<crate::gpu::sampler::TickReport>(4);
    let sampler =
        match crate::gpu::sampler::spawn(sampler, tenants, windows_tx, Some(reports_tx), stop.clone()) {
            Ok(handle) => handle,
            Err(e) => {
                error!(error = %e, "GPU sampler thread not started");
                return None;
            }
        };
    let metrics = Arc::new(std::sync::Mutex::new(crate::gpu::metrics::GpuMetrics::default()));
    let sink_metrics = Arc::clone(&metrics);
    let sink = reporting.spawn_writer(windows_rx, move |w| {
        if let Ok(mut m) = sink_metrics.lock() {
            m.observe_window(w);
        }
        if w.training_like {
            info!(tenant = ?w.tenant, workload = %w.workload, gpus = w.max_concurrent_gpus,
                  estimated_ops = w.estimated_ops, method = ?w.method, "training-like GPU usage window");
        } else {
            debug!(tenant = ?w.tenant, workload = %w.workload, gpu_seconds = w.gpu_seconds,
                   estimated_ops = w.estimated_ops, method = ?w.method, "GPU usage window");
        }
    });
    let observer_metrics = Arc::clone(&metrics);
    let observer = tokio::spawn(async move {
        let mut available = None;
        let mut lost = BTreeSet::new();
        while let Some(report) = reports_rx.recv().await {
            if let Ok(mut m) = observer_metrics.lock() {
                m.observe_tick(&report);
            }
            match &report.sample.backend {
                crate::gpu::BackendState::Unavailable { reason } if available != Some(false) => {
                    warn!(%reason, "GPU backend unavailable: GPU usage is not measured");
                    available = Some(false);
                }
                crate::gpu::BackendState::Ok if available != Some(true) => {
                    info!(gpus = report.sample.gpus.len(), "GPU backend available");
                    available = Some(true);
                }
                _ => {}
            }
            for gpu in &report.lost_gpus {
                if lost.insert(gpu.clone()) {
                    error!(%gpu, "GPU lost (fell off the bus); its usage is no longer measured");
                }
            }
        }
    });
    Some(GpuTasks { metrics, sampler, sink, observer, stop })
}

/// Starts the policy fetcher when `policy.fetch_url` is set.
fn start_policy_fetcher(
    config: &Config,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) -> Result<Option<(crate::net::policy_fetch::SharedFetchStatus, tokio::task::JoinHandle<()>)>, DaemonError> {
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
    // The fetcher sends `FetchedPolicy`; each is forwarded into the main loop's events.
    let (fetched_tx, mut fetched_rx) = mpsc::channel::<crate::net::policy_fetch::FetchedPolicy>(1);
    let forward_shutdown = shutdown.clone();
    tokio::spawn(async move {
        while let Some(crate::net::policy_fetch::FetchedPolicy { token, reply }) = fetched_rx.recv().await {
            tokio::select! {
                () = forward_shutdown.cancelled() => break,
                r = events.send(Event::FetchedPolicy { token, reply }) => if r.is_err() { break },
            }
        }
    });
    let task = tokio::spawn(crate::net::policy_fetch::run(
        options,
        client,
        fetched_tx,
        Arc::clone(&status),
        shutdown,
    ));
    Ok(Some((status, task)))
}

/// Runs the agent until `shutdown` is cancelled. `reload` carries SIGHUP's freshly loaded
/// configuration (or why it did not load); `gpu`, when given, is sampled (see [`start_gpu`]).
pub async fn run(
    config: Config,
    enforcer: Box<dyn Enforcer>,
    gpu: Option<Box<dyn crate::gpu::GpuBackend>>,
    mut reload: mpsc::Receiver<Result<Config, String>>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let (tx, mut rx) = mpsc::channel(EVENT_CAPACITY);
    let fetch_tx = tx.clone();
    let overflow = Arc::new(AtomicBool::new(false));
    let rescan_every = Duration::from_secs(config.workloads.rescan_interval_s);
    let mut watches = start_watcher(&config, tx, overflow.clone())?;
    // Agent handlers do blocking file I/O and fsync; block_in_place keeps them off the
    // reactor's other tasks.
    // Host key (refusing an unsafe one), spool, uploader: see crate::upload::Reporting.
    let reporting = tokio::task::block_in_place(|| {
        crate::upload::Reporting::open(&config, &host_id(&config)?).map_err(DaemonError::from)
    })?;
    let mut agent = tokio::task::block_in_place(|| Agent::new(config, enforcer))?;
    let mut next_review = tokio::task::block_in_place(|| {
        let next = agent.evaluate();
        agent.reconcile();
        next
    });
    let fetcher = match start_policy_fetcher(&agent.config, fetch_tx, shutdown.child_token())? {
        Some((status, task)) => {
            agent.set_fetch_status(status);
            Some(task)
        }
        None => None,
    };
    let (tenants_tx, tenants_rx) = tokio::sync::watch::channel(Arc::new(agent.tenant_map()));
    let uploader = reporting.spawn_uploader(shutdown.child_token());
    let gpu_tasks = gpu.and_then(|backend| {
        start_gpu(&agent.config, &reporting, backend, tenants_rx, shutdown.child_token())
    });
    // The socket exists only once the agent can answer: before, admission finds no agent
    // and fails closed.
    let socket = agent.config.api.socket.clone();
    let listener = crate::net::operator_api::bind(&socket, agent.config.api.socket_group.as_deref())?;
    let (api_tx, mut api_rx) = mpsc::channel::<ApiRequest>(API_CAPACITY);
    let api_shutdown = shutdown.child_token();
    let gpu_inventory = |tasks: &Option<GpuTasks>| -> Vec<kycd_protocol::GpuInventoryEntry> {
        tasks
            .as_ref()
            .and_then(|t| {
                t.metrics.lock().ok().map(|m| {
                    m.inventory()
                        .map(|(uuid, name)| kycd_protocol::GpuInventoryEntry {
                            uuid: uuid.into(),
                            name: name.into(),
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let (statement_tx, statement_rx) = tokio::sync::watch::channel(Arc::new(
        agent.statement_claims(String::new(), gpu_inventory(&gpu_tasks)),
    ));
    let https_task = if agent.config.collector_api.enabled {
        let api = crate::net::collector_api::bind(&agent.config.collector_api).await?;
        info!(listen = %agent.config.collector_api.listen, "collector API listening");
        let key = reporting.host_key();
        let stats = Arc::new(kycd_net::ConnStats::default());
        agent.connections.collector_api = Some(Arc::clone(&stats));
        let serve = crate::net::collector_api::serve(
            api,
            api_tx.clone(),
            statement_rx,
            key,
            stats,
            api_shutdown.clone(),
        );
        Some(tokio::spawn(serve))
    } else {
        None
    };
    let api_task = tokio::spawn(crate::net::operator_api::serve(
        listener,
        api_tx,
        agent.config.api.limits(),
        Arc::clone(&agent.connections.socket),
        api_shutdown.clone(),
    ));
    info!(host_id = %agent.host_id, workloads = agent.workloads.len(), socket = %socket.display(), "kycd ready");
    // Ready: state loaded, decisions recorded, enforcement reconciled, socket answering.
    let notifier = crate::notify::Notifier::from_env();
    notifier.notify(&format!("READY=1\nSTATUS={}", agent.status_line()));
    let mut watchdog =
        tokio::time::interval(notifier.watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(rescan_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile_tick =
        tokio::time::interval(Duration::from_secs(agent.config.enforcement.reconcile_interval_s));
    reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A deadline already due means the last evaluation could not record its decisions
        // (e.g. a failing disk): retry at RETRY_FLOOR rather than spin.
        let sleep_for = next_review
            .map(|t| {
                Duration::from_secs(u64::try_from(t.saturating_sub(now())).unwrap_or(0)).max(RETRY_FLOOR)
            })
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(loaded) = reload.recv() => tokio::task::block_in_place(|| agent.reload_config(loaded)),
            Some(request) = api_rx.recv() => tokio::task::block_in_place(|| match request {
                ApiRequest::Admit(admission, reply) => {
                    // A caller that gave up gets nothing done on its behalf.
                    if !reply.is_closed() {
                        let _ = reply.send(agent.admit(admission));
                    }
                }
                ApiRequest::Status(reply) => {
                    let gpu = match &gpu_tasks {
                        None => "disabled".to_owned(),
                        Some(t) if t.metrics.lock().is_ok_and(|m| m.backend_available()) => "available".to_owned(),
                        Some(_) => "unavailable".to_owned(),
                    };
                    let mut status = agent.status(gpu);
                    status.reporting = Some(reporting.status());
                    let _ = reply.send(status);
                }
                ApiRequest::Workloads(reply) => {
                    let _ = reply.send(agent.workload_rows());
                }
                ApiRequest::Reload(reply) => {
                    agent.handle(Event::Reload);
                    let _ = reply.send(());
                }
                ApiRequest::Gpus(reply) => {
                    let value = match &gpu_tasks {
                        Some(t) => t.metrics.lock().map(|m| m.to_json()).unwrap_or_default(),
                        None => json!({"backend_available": false, "disabled": true, "gpus": [], "usage": []}),
                    };
                    let _ = reply.send(value);
                }
                ApiRequest::Refused { uid, request } => {
                    agent.record(json!({"type": "api_refused", "uid": uid, "request": request}));
                }
                ApiRequest::Metrics(reply) => {
                    let mut text = agent.metrics_text();
                    text.push_str(&reporting.metrics_text());
                    if let Some(t) = &gpu_tasks {
                        if let Ok(m) = t.metrics.lock() {
                            text.push_str(&m.render());
                        }
                    }
                    let _ = reply.send(text);
                }
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
                    warn!("file watcher overflowed; rescanning attestations");
                    agent.rescan_attestations(Recheck::IfChanged);
                }
            }),
            _ = tick.tick() => tokio::task::block_in_place(|| {
                if overflow.swap(false, Ordering::Relaxed) {
                    warn!("file watcher overflowed; rescanning attestations");
                }
                watches.ensure();
                agent.tick();
            }),
            _ = watchdog.tick(), if notifier.watchdog_interval().is_some() => {
                // The loop turned: the agent is alive (a stuck handler stops these).
                notifier.notify(&format!("WATCHDOG=1\nSTATUS={}", agent.status_line()));
            }
            _ = reconcile_tick.tick() => {
                agent.reconcile_due = true;
                agent.full_reconcile_due = true;
            }
            () = tokio::time::sleep(sleep_for) => {}
        }
        next_review = tokio::task::block_in_place(|| {
            // Spool damage and rejected report batches, found by the reporting tasks.
            for event in reporting.take_audit_events() {
                agent.record(event);
            }
            let next = agent.evaluate();
            if agent.reconcile_due {
                agent.reconcile();
            }
            next
        });
        // The statement's content, for the collector API (its times are set per request);
        // only built when that API is served.
        if https_task.is_some() {
            let mut statement = agent.statement_claims(String::new(), gpu_inventory(&gpu_tasks));
            statement.iat = 0;
            statement.exp = 0;
            statement_tx.send_if_modified(|current| {
                let changed = **current != statement;
                if changed {
                    *current = Arc::new(statement);
                }
                changed
            });
        }
        let tenants = agent.tenant_map();
        tenants_tx.send_if_modified(|current| {
            let changed = **current != tenants;
            if changed {
                *current = Arc::new(tenants);
            }
            changed
        });
    }
    if let Some(tasks) = gpu_tasks {
        if tokio::time::timeout(SHUTDOWN_GRACE * 3, tasks.stop()).await.is_err() {
            warn!("the GPU sampler did not stop within the grace period");
        }
    }
    notifier.notify("STOPPING=1");
    if let Some(fetcher) = fetcher {
        if tokio::time::timeout(SHUTDOWN_GRACE, fetcher).await.is_err() {
            warn!("the policy fetcher did not stop within the grace period");
        }
    }
    if let Some(uploader) = uploader {
        let _ = uploader.await;
    }
    // Requests still queued are answered by nobody: their callers see the agent gone.
    api_rx.close();
    api_shutdown.cancel();
    // Shutdown is bounded: connections get a short grace, then are dropped.
    if tokio::time::timeout(SHUTDOWN_GRACE, api_task).await.is_err() {
        warn!("operator connections did not close within the grace period");
    }
    if let Some(task) = https_task {
        if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
            warn!("collector API connections did not close within the grace period");
        }
    }
    let _ = std::fs::remove_file(&socket);
    // Blocks stay in place while the agent is down (fail closed), unless asked otherwise.
    if agent.config.mode == Mode::Enforce && agent.config.enforcement.release_on_exit {
        tokio::task::block_in_place(|| agent.release());
    }
    tokio::task::block_in_place(|| {
        for event in reporting.take_audit_events() {
            agent.record(event);
        }
        agent.record(json!({"type": "agent_stopped"}))
    });
    info!("kycd stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_dir_file_filter() {
        for ok in ["/d/tenant-1.jws", "/d/a.jws"] {
            assert!(is_attestation_file(Path::new(ok)), "{ok}");
        }
        for skip in ["/d/.tenant-1.jws", "/d/.jws", "/d/x.jws.tmp", "/d/x.jws~", "/d/x.json", "/d/x"] {
            assert!(!is_attestation_file(Path::new(skip)), "{skip}");
        }
    }

    #[test]
    fn transient_and_untrusted_error_kinds() {
        assert!(is_transient("NotYetValid") && is_transient("Io") && is_transient("IssuedInFuture"));
        assert!(!is_transient("BadSignature") && !is_transient("Expired") && !is_transient("Malformed"));
        assert!(is_untrusted("UnknownKey") && is_untrusted("BadSignature"));
        assert!(!is_untrusted("Expired"));
    }

    #[test]
    fn first_seen_file_reads_the_legacy_and_current_forms() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_first_seen(dir.path()).unwrap().is_empty(), "missing file: first start");
        std::fs::write(dir.path().join(FIRST_SEEN_FILE), r#"{"host:host":100}"#).unwrap();
        let map = load_first_seen(dir.path()).unwrap();
        assert_eq!(map["host:host"], Seen { first: 100, vanished_at: None });
        std::fs::write(dir.path().join(FIRST_SEEN_FILE), r#"{"a:b":{"first":5,"vanished_at":9}}"#).unwrap();
        assert_eq!(load_first_seen(dir.path()).unwrap()["a:b"], Seen { first: 5, vanished_at: Some(9) });
        std::fs::write(dir.path().join(FIRST_SEEN_FILE), "{not json").unwrap();
        assert!(load_first_seen(dir.path()).is_err(), "corrupt is an error, not a fresh start");
    }
}
