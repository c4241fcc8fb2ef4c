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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::{verify, AttestationClaims, Jwks, VerifyError, VerifyOptions};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::audit::{AuditLog, AuditOptions};
use crate::config::{Config, Mode};
use crate::decision::{decide, Decision, DecisionInput};
use crate::policy::{AppliedPolicy, Offer, PolicyGuard};
use crate::workload::{WorkloadId, WorkloadKind};
use crate::{cgroup, tokens};

/// Shortest sleep of the main loop; see [`run`].
const RETRY_FLOOR: Duration = Duration::from_millis(250);

/// File in the state directory holding when each workload was first seen.
const FIRST_SEEN_FILE: &str = "first_seen.json";

/// Loads persisted first-seen times. A missing or unreadable file starts empty: the
/// consequence is a grace period restarting, which the audit log shows.
fn load_first_seen(state_dir: &Path) -> BTreeMap<String, i64> {
    let path = state_dir.join(FIRST_SEEN_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            error!(path = %path.display(), error = %e, "corrupt first-seen file; grace periods restart");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Capacity of the event channel. The watcher never blocks on it: when it is full, a flag
/// asks the loop for a full rescan instead, so no change is lost.
const EVENT_CAPACITY: usize = 1024;

/// Inputs to the main loop.
#[derive(Debug)]
pub enum Event {
    /// A path in the drop directory was created, changed, renamed or removed.
    DropDir(PathBuf),
    /// The policy file or the host attestation may have changed.
    ConfigFile(PathBuf),
    /// Reload trust anchors and the policy, and rescan everything (SIGHUP).
    Reload,
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
    /// The policy anti-rollback state is unusable.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// No host id configured and none in /etc/machine-id.
    #[error("cannot determine the host id: set host_id in the configuration ({0})")]
    HostId(String),
    /// The file watcher could not be started.
    #[error("file watcher: {0}")]
    Watch(#[from] notify::Error),
}

/// Receives each new decision after it is durably recorded (the enforcement issue implements
/// the cgroup, nftables and GPU backends behind this trait).
pub trait Enforcer: Send {
    /// Makes the host match `decision` for `workload`.
    fn enforce(&mut self, workload: &WorkloadId, cgroup: Option<&Path>, decision: &Decision);
}

/// The enforcer of `mode = "audit"`: records only.
#[derive(Debug, Default)]
pub struct RecordOnly;

impl Enforcer for RecordOnly {
    fn enforce(&mut self, workload: &WorkloadId, _: Option<&Path>, decision: &Decision) {
        debug!(%workload, verdict = ?decision.verdict, "audit mode: not enforcing");
    }
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
    /// Files last rejected, with the digest of the content rejected, so an unchanged bad
    /// file is not re-recorded on every rescan.
    rejected: BTreeMap<PathBuf, String>,
    workloads: BTreeMap<WorkloadId, WorkloadState>,
    /// When each known workload was first seen, persisted in `<state_dir>/first_seen.json`
    /// so restarting the agent does not restart grace periods.
    first_seen: BTreeMap<String, i64>,
    first_seen_dirty: bool,
    /// libvirt domain UUID (lower case) → domain name, for domains seen in the cgroup tree.
    libvirt_uuids: BTreeMap<String, String>,
    decisions: BTreeMap<WorkloadId, Decision>,
    audit: AuditLog,
    enforcer: Box<dyn Enforcer>,
    counters: Counters,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host_id", &self.host_id)
            .field("workloads", &self.workloads.len())
            .finish()
    }
}

fn now() -> i64 {
    tokens::unix_now()
}

fn host_id(config: &Config) -> Result<String, DaemonError> {
    if let Some(id) = &config.host_id {
        return Ok(id.clone());
    }
    let id = std::fs::read_to_string("/etc/machine-id").map_err(|e| DaemonError::HostId(e.to_string()))?;
    let id = id.trim();
    if id.is_empty() {
        return Err(DaemonError::HostId("/etc/machine-id is empty".into()));
    }
    Ok(id.to_owned())
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
    /// A verification failure, with the digest of the content that failed.
    #[error("{0}")]
    Rejected(Box<IntakeError>, String),
}

impl IntakeError {
    fn kind(&self) -> &'static str {
        match self {
            IntakeError::Verify(e) => e.kind(),
            IntakeError::Io(_) => "Io",
            IntakeError::WrongHost { .. } => "WrongHost",
            IntakeError::NotHostBinding => "NotHostBinding",
            IntakeError::Rejected(inner, _) => inner.kind(),
        }
    }
}

/// cloud-init's instance id (`v1.instance_id` in instance-data.json).
fn cloud_init_instance_id(path: &Path) -> Result<String, IntakeError> {
    let bytes = tokens::read_bounded(path, 1 << 20).map_err(|e| IntakeError::Io(e.to_string()))?;
    let doc = kycd_protocol::json::parse_strict(&bytes)
        .map_err(|e| IntakeError::Io(format!("{}: {e}", path.display())))?;
    doc["v1"]["instance_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| IntakeError::Io(format!("{}: no v1.instance_id", path.display())))
}

impl Agent {
    /// Builds the agent: opens the audit log and the anti-rollback state (both must work,
    /// or the agent does not start), then loads trust anchors, the policy and attestations
    /// (each of which may fail without stopping it).
    pub fn new(config: Config, enforcer: Box<dyn Enforcer>) -> Result<Self, DaemonError> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| DaemonError::StateDir { path: config.state_dir.clone(), source })?;
        let host_id = host_id(&config)?;
        let audit = AuditLog::open(
            &config.audit_dir(),
            AuditOptions { max_file_bytes: config.audit.max_file_bytes },
        )?;
        let guard = PolicyGuard::open(&config.state_dir)?;
        let cgroup_mount = config.workloads.cgroup_root.clone().or_else(|| {
            std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| cgroup::find_cgroup2_mount(&m))
        });
        if cgroup_mount.is_none() {
            warn!("no cgroup2 mount found: only the host workload and attested workloads are known");
        }
        let config_state_dir = config.state_dir.clone();
        let mut agent = Agent {
            config,
            host_id,
            cgroup_mount,
            issuers: Jwks::default(),
            policy_keys: Jwks::default(),
            guard,
            policy: None,
            attestations: BTreeMap::new(),
            rejected: BTreeMap::new(),
            workloads: BTreeMap::new(),
            first_seen: load_first_seen(&config_state_dir),
            first_seen_dirty: false,
            libvirt_uuids: BTreeMap::new(),
            decisions: BTreeMap::new(),
            audit,
            enforcer,
            counters: Counters::default(),
        };
        agent.record(json!({"type": "agent_started", "version": env!("CARGO_PKG_VERSION"),
            "host_id": agent.host_id, "mode": agent.config.mode}));
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

    /// Reloads trust anchors and the policy, and rescans attestations and workloads.
    pub fn reload(&mut self) {
        self.load_trust();
        self.load_policy();
        self.rescan_attestations();
        self.rescan_workloads();
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
                }
            }
        }
    }

    fn load_policy(&mut self) {
        let path = self.config.policy.file.clone();
        let bytes = match tokens::read_bounded(&path, self.config.attestations.max_bytes.max(1 << 20)) {
            Ok(b) => tokens::strip_one_newline(b),
            Err(e) => {
                warn!(error = %e, "no policy file; workloads are denied until a policy is applied");
                return;
            }
        };
        let options = VerifyOptions { max_token_bytes: 1 << 20, clock_skew_s: self.config.clock_skew_s };
        match self.guard.offer(&bytes, &self.policy_keys, &options, now()) {
            Ok(Offer::Applied(p)) => {
                info!(version = p.claims.version, kid = %p.kid, measures = p.claims.measures.len(), "policy applied");
                self.record(json!({"type": "policy_applied", "version": p.claims.version,
                    "claims_digest": p.claims_digest, "token_digest": p.token_digest, "kid": p.kid,
                    "source": path}));
                self.policy = Some(p);
            }
            Ok(Offer::Unchanged(p)) => {
                if self.policy.is_none() {
                    info!(version = p.claims.version, "policy loaded (already applied before)");
                    self.policy = Some(p);
                }
            }
            Err(e) => {
                *self.counters.policies_rejected.entry(e.kind()).or_default() += 1;
                error!(kind = e.kind(), error = %e, path = %path.display(), "policy rejected; keeping the current one");
                self.record(json!({"type": "policy_rejected", "kind": e.kind(), "reason": e.to_string(), "source": path}));
            }
        }
    }

    fn read_attestation(&self, path: &Path) -> Result<Vec<u8>, IntakeError> {
        let bytes = tokens::read_bounded(path, self.config.attestations.max_bytes.saturating_add(2))
            .map_err(|e| IntakeError::Io(e.to_string()))?;
        Ok(tokens::strip_one_newline(bytes))
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
    fn ingest(&mut self, path: &Path, host_file: bool) {
        if !path.exists() {
            self.rejected.remove(path);
            if let Some(gone) = self.attestations.remove(path) {
                info!(path = %path.display(), workload = %gone.workload, tenant = %gone.claims.sub, "attestation withdrawn");
                self.record(json!({"type": "attestation_withdrawn", "workload": gone.workload.to_string(),
                    "tenant": gone.claims.sub, "jti": gone.claims.jti, "source": path}));
            }
            return;
        }
        let result = self.read_attestation(path).and_then(|bytes| {
            let digest = kycd_protocol::token_digest(&bytes);
            if self.rejected.get(path) == Some(&digest) {
                return Ok(None);
            }
            match self.verify_attestation(&bytes, host_file) {
                Ok(a) => Ok(Some(a)),
                Err(e) => Err(IntakeError::Rejected(Box::new(e), digest)),
            }
        });
        match result {
            Ok(None) => debug!(path = %path.display(), "unchanged rejected file ignored"),
            Ok(Some(a)) => {
                self.rejected.remove(path);
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
            Err(e) => {
                if let IntakeError::Rejected(_, digest) = &e {
                    self.rejected.insert(path.to_owned(), digest.clone());
                }
                *self.counters.attestations_rejected.entry(e.kind()).or_default() += 1;
                warn!(path = %path.display(), kind = e.kind(), error = %e, "attestation rejected");
                self.record(json!({"type": "attestation_rejected", "kind": e.kind(), "reason": e.to_string(), "source": path}));
                // A file that no longer verifies no longer attests.
                self.attestations.remove(path);
            }
        }
    }

    /// Re-reads the drop directory and the host attestation (start, reload, watcher overflow).
    fn rescan_attestations(&mut self) {
        let drop_dir = self.config.drop_dir();
        let mut present: BTreeSet<PathBuf> = BTreeSet::new();
        match std::fs::read_dir(&drop_dir) {
            Ok(entries) => {
                present.extend(entries.flatten().map(|e| e.path()).filter(|p| is_attestation_file(p)))
            }
            Err(e) => {
                warn!(dir = %drop_dir.display(), error = %e, "cannot read the attestation drop directory")
            }
        }
        let host_file = self.config.attestations.host_attestation.clone();
        let stale: Vec<PathBuf> =
            self.attestations.keys().filter(|p| **p != host_file && !present.contains(*p)).cloned().collect();
        for path in stale.iter().chain(present.iter()) {
            self.ingest(path, false);
        }
        if host_file.exists() || self.attestations.contains_key(&host_file) {
            self.ingest(&host_file, true);
        }
    }

    /// Re-reads the cgroup tree.
    fn rescan_workloads(&mut self) {
        let Some(mount) = &self.cgroup_mount else {
            if !self.workloads.contains_key(&WorkloadId::host()) {
                let first_seen = self.first_seen_of(&WorkloadId::host());
                self.workloads.insert(WorkloadId::host(), WorkloadState { first_seen, cgroup: None });
            }
            return;
        };
        let found = cgroup::discover(mount, &self.config.workloads.roots);
        self.libvirt_uuids = found
            .iter()
            .filter(|d| d.id.kind == WorkloadKind::LibvirtDomain)
            .filter_map(|d| {
                let uuid = cgroup::libvirt_domain_uuid(&self.config.workloads.libvirt_status_dir, &d.id.id)?;
                Some((uuid, d.id.id.clone()))
            })
            .collect();
        let mut ids: BTreeSet<&WorkloadId> = found.iter().map(|d| &d.id).collect();
        // Attested workloads stay known while absent from the tree (a VM between admission
        // and start): dropping them would restart their grace period on every rescan.
        ids.extend(self.attestations.values().map(|a| &a.workload));
        let vanished: Vec<WorkloadId> =
            self.workloads.keys().filter(|id| !ids.contains(id)).cloned().collect();
        for id in vanished {
            self.workloads.remove(&id);
            self.first_seen.remove(&id.to_string());
            self.first_seen_dirty = true;
            info!(workload = %id, "workload vanished");
            self.record(json!({"type": "workload_vanished", "workload": id.to_string()}));
        }
        for d in found {
            if !self.workloads.contains_key(&d.id) {
                let first_seen = self.first_seen_of(&d.id);
                info!(workload = %d.id, first_seen, "workload discovered");
                self.workloads.insert(d.id, WorkloadState { first_seen, cgroup: d.cgroup });
            }
        }
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

    /// The workload a binding names on this host: a libvirt domain bound by UUID is the
    /// domain of that name in the cgroup tree, once it is running.
    fn resolve(&self, id: &WorkloadId) -> WorkloadId {
        if id.kind == WorkloadKind::LibvirtDomain {
            if let Some(name) = self.libvirt_uuids.get(&id.id.to_ascii_lowercase()) {
                return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: name.clone() };
            }
        }
        id.clone()
    }

    /// Re-decides every workload (present or attested), records changed decisions, then
    /// enforces them. Returns the earliest time a decision may change by itself.
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
                self.workloads.insert(id.clone(), WorkloadState { first_seen, cgroup: None });
            }
        }
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
        }
        if !changed.is_empty() {
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
            match self.audit.append_batch(events) {
                Ok(_) => {
                    for (id, _, decision) in changed {
                        info!(workload = %id, verdict = ?decision.verdict, policy_version = ?decision.policy_version,
                              reasons = ?decision.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), "decision");
                        if mode == Mode::Enforce {
                            let cgroup = self.workloads.get(&id).and_then(|w| w.cgroup.clone());
                            self.enforcer.enforce(&id, cgroup.as_deref(), &decision);
                        }
                        self.decisions.insert(id, decision);
                    }
                }
                Err(e) => error!(error = %e, "cannot record decisions; not enforcing them, will retry"),
            }
        }
        self.decisions.values().filter_map(|d| d.next_review_at).min()
    }

    /// When `id` was first seen: persisted if known, else now (and remembered).
    fn first_seen_of(&mut self, id: &WorkloadId) -> i64 {
        *self.first_seen.entry(id.to_string()).or_insert_with(|| {
            self.first_seen_dirty = true;
            now()
        })
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

    fn handle(&mut self, event: Event) {
        match event {
            Event::DropDir(path) if is_attestation_file(&path) => self.ingest(&path, false),
            Event::DropDir(_) => {}
            Event::ConfigFile(path) if path == self.config.attestations.host_attestation => {
                self.ingest(&path, true)
            }
            Event::ConfigFile(path) if path == self.config.policy.file => self.load_policy(),
            Event::ConfigFile(_) => {}
            Event::Reload => {
                info!("reloading trust anchors, policy and attestations");
                self.reload();
            }
        }
    }
}

/// Watches the drop directory and the directories of the policy file and host attestation.
fn start_watcher(
    config: &Config,
    tx: mpsc::Sender<Event>,
    overflow: Arc<AtomicBool>,
) -> Result<notify::RecommendedWatcher, DaemonError> {
    use notify::Watcher as _;
    let drop_dir = config.drop_dir();
    let files = [config.policy.file.clone(), config.attestations.host_attestation.clone()];
    let watched_files = files.clone();
    let dir_for_events = drop_dir.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
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
    std::fs::create_dir_all(&drop_dir)
        .map_err(|source| DaemonError::StateDir { path: drop_dir.clone(), source })?;
    watcher.watch(&drop_dir, notify::RecursiveMode::NonRecursive)?;
    for file in &files {
        if let Some(dir) = file.parent().filter(|d| d.is_dir()) {
            if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch; changes are picked up on reload");
            }
        }
    }
    Ok(watcher)
}

/// Runs the agent until `shutdown` is cancelled. `events` carries reload requests (SIGHUP);
/// the returned sender feeds the same channel, for callers that add sources.
pub async fn run(
    config: Config,
    enforcer: Box<dyn Enforcer>,
    mut reload: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let (tx, mut rx) = mpsc::channel(EVENT_CAPACITY);
    let overflow = Arc::new(AtomicBool::new(false));
    let rescan_every = Duration::from_secs(config.workloads.rescan_interval_s);
    let _watcher = start_watcher(&config, tx, overflow.clone())?;
    // Agent handlers do blocking file I/O and fsync; block_in_place keeps them off the
    // reactor's other tasks.
    let mut agent = tokio::task::block_in_place(|| Agent::new(config, enforcer))?;
    let mut next_review = tokio::task::block_in_place(|| agent.evaluate());
    info!(host_id = %agent.host_id, workloads = agent.workloads.len(), "kycd ready");
    let mut tick = tokio::time::interval(rescan_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            Some(()) = reload.recv() => tokio::task::block_in_place(|| agent.handle(Event::Reload)),
            Some(event) = rx.recv() => tokio::task::block_in_place(|| {
                agent.handle(event);
                // Drain what arrived meanwhile before re-deciding once.
                while let Ok(more) = rx.try_recv() {
                    agent.handle(more);
                }
            }),
            _ = tick.tick() => tokio::task::block_in_place(|| {
                if overflow.swap(false, Ordering::Relaxed) {
                    warn!("file watcher overflowed; rescanning attestations");
                    agent.rescan_attestations();
                }
                agent.rescan_workloads();
            }),
            () = tokio::time::sleep(sleep_for) => {}
        }
        next_review = tokio::task::block_in_place(|| agent.evaluate());
    }
    tokio::task::block_in_place(|| agent.record(json!({"type": "agent_stopped"})));
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
}
