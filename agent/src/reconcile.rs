//! From decisions to host state: what the host must look like ([`Desired`]), and the
//! [`Enforcer`] that makes it so.
//!
//! Enforcement is declarative. The daemon derives the complete desired state from the
//! decisions it has *recorded* (so nothing is enforced that the audit log does not show) and
//! hands it to the enforcer, which reads the kernel's actual state back and converges —
//! at once when a decision changes, and every `enforcement.reconcile_interval_s` to repair
//! drift. Lifting a block is the same operation as imposing one: it is simply no longer
//! desired.
//!
//! What each verdict asks for:
//! - `deny`: the workload's cgroup is frozen (or killed, when a prohibiting measure says
//!   `enforcement: kill`), and its network cut off in nftables — host processes by cgroup,
//!   a VM by its tap interfaces. The `host` workload has neither (freezing the host would
//!   cut off its operators); the GPU backend acts on it.
//! - `condition` with `network: deny_egress`: the network cut, no freeze.
//! - Geo scope: with `enforcement.geo_cidr_file`, traffic from and to the countries named by
//!   prohibiting measures in effect is dropped for the workloads those measures apply to,
//!   not host-wide. A workload is in geo scope when it is not denied (a denied one is cut off
//!   entirely already), is not the `host` workload (the host's own processes and operators
//!   keep their network), and some such measure reaches its tenant: `applies_to: all`
//!   reaches every tenant, `foreign_persons` a tenant whose attestation says foreign person,
//!   or one whose status is unknown (no attestation in force: fail closed). A U.S. tenant is
//!   reached only by `all` measures; when both kinds name CIDRs, such a tenant is blocked
//!   from all of them (one CIDR set: over-blocking, never under-blocking).
//! - GPUs: compute mode `Prohibited` on every GPU when the `host` workload (a single-tenant
//!   host) is denied or conditioned `no_gpu`; the previous mode is restored when lifted.
//!   Compute mode is per device, so a `no_gpu` condition on a VM or container is not
//!   enforced at the device (that would stop other tenants sharing the GPU); it is recorded
//!   and reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kycd_protocol::{Enforcement, ForeignStatus, MeasureAction, NetworkCondition, PolicyClaims, Verdict};
use tracing::{info, warn};

use crate::config::Config;
use crate::decision::Decision;
use crate::discovery::workload::{WorkloadId, WorkloadKind};
use crate::enforce::GpuComputeModeEnforcer;
use crate::enforce::{CgroupAction, CgroupEnforcer, CountryCidrs, NftDesired, NftEnforcer};
use crate::gpu::{BackendState, GpuBackend};

/// The host state the decisions ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Workload cgroups to freeze or kill.
    pub cgroups: BTreeMap<PathBuf, CgroupAction>,
    /// What nftables must block.
    pub nft: NftDesired,
    /// Every GPU's compute mode must be `Prohibited`.
    pub prohibit_gpus: bool,
}

/// One workload as the desired-state computation sees it.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadView<'a> {
    /// The workload.
    pub id: &'a WorkloadId,
    /// Its cgroup directory, when it has one on this host.
    pub cgroup: Option<&'a Path>,
    /// Its tap interfaces (libvirt domains).
    pub interfaces: &'a [String],
    /// Its recorded decision.
    pub decision: &'a Decision,
    /// Its tenant's foreign status, from the attestation its decision used (`unknown`
    /// without one); decides whether a measure limited to foreign persons reaches it.
    pub foreign: ForeignStatus,
}

/// Computes the desired state. `cgroup_mount` makes cgroup paths relative for nftables;
/// `geo` is the per-country CIDR list, when configured.
pub fn desired_state<'a>(
    workloads: impl IntoIterator<Item = WorkloadView<'a>>,
    policy: Option<&PolicyClaims>,
    cgroup_mount: Option<&Path>,
    geo: Option<&CountryCidrs>,
    now: i64,
) -> Desired {
    let mut desired = Desired::default();
    // Workloads that may be in geo scope: (foreign status, cgroup relative to the mount, taps).
    let mut geo_candidates: Vec<(ForeignStatus, Option<String>, &[String])> = Vec::new();
    for w in workloads {
        if w.id.kind == WorkloadKind::Host {
            let no_gpu = w.decision.conditions.as_ref().is_some_and(|c| c.no_gpu);
            desired.prohibit_gpus |= w.decision.verdict == Verdict::Deny || no_gpu;
            continue;
        }
        let (freeze, block_network) = match w.decision.verdict {
            Verdict::Deny => (Some(cgroup_action(w.decision, policy)), true),
            Verdict::Condition => {
                let egress = w
                    .decision
                    .conditions
                    .as_ref()
                    .is_some_and(|c| c.network == Some(NetworkCondition::DenyEgress));
                (None, egress)
            }
            Verdict::Allow => (None, false),
        };
        if let (Some(action), Some(cgroup)) = (freeze, w.cgroup) {
            desired.cgroups.insert(cgroup.to_owned(), action);
        }
        let rel = w
            .cgroup
            .zip(cgroup_mount)
            .and_then(|(c, m)| c.strip_prefix(m).ok())
            .map(|rel| rel.to_string_lossy().into_owned());
        if block_network {
            desired.nft.cgroups.extend(rel);
            desired.nft.interfaces.extend(w.interfaces.iter().cloned());
        } else if w.decision.verdict != Verdict::Deny {
            geo_candidates.push((w.foreign, rel, w.interfaces));
        }
    }
    if let (Some(policy), Some(geo)) = (policy, geo) {
        // Prohibiting measures in effect that name countries with CIDRs.
        let geo_measures: Vec<_> = policy
            .measures
            .iter()
            .filter(|m| m.action == MeasureAction::Prohibit && m.effective_from.is_none_or(|t| t <= now))
            .filter(|m| m.matcher.countries.iter().any(|c| geo.contains_key(c.as_str())))
            .collect();
        for (foreign, rel, interfaces) in geo_candidates {
            if geo_measures.iter().any(|m| m.reaches(foreign)) {
                desired.nft.geo_cgroups.extend(rel);
                desired.nft.geo_interfaces.extend(interfaces.iter().cloned());
            }
        }
        for country in geo_measures.iter().flat_map(|m| &m.matcher.countries) {
            if let Some((v4, v6)) = geo.get(country.as_str()) {
                desired.nft.cidrs_v4.extend(v4.iter().map(ToString::to_string));
                desired.nft.cidrs_v6.extend(v6.iter().map(ToString::to_string));
            }
        }
    }
    desired
}

/// `kill` if any prohibiting measure behind the denial says so, else `freeze` (also for
/// denials no measure caused: no attestation, grace over, no policy).
fn cgroup_action(decision: &Decision, policy: Option<&PolicyClaims>) -> CgroupAction {
    let prohibiting =
        decision.reasons.iter().filter(|r| r.code == crate::decision::ReasonCode::MeasureProhibit);
    let kill = prohibiting.filter_map(|r| r.measure_id.as_deref()).any(|id| {
        policy.is_some_and(|p| {
            p.measures.iter().any(|m| m.id == id && m.enforcement == Some(Enforcement::Kill))
        })
    });
    if kill {
        CgroupAction::Kill
    } else {
        CgroupAction::Freeze
    }
}

/// What one reconciliation found and did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Changes applied (cgroups frozen/thawed/killed, set elements added/removed).
    pub changes: usize,
    /// Drift repaired, by backend: state someone else changed back.
    pub drift: Vec<(&'static str, String)>,
    /// Failures, by backend; the rest was still applied, and the next reconcile retries.
    pub errors: Vec<(&'static str, String)>,
}

/// Makes the host match the desired state. Implementations are idempotent: the same
/// desired state twice changes nothing the second time (unless something drifted).
pub trait Enforcer: Send {
    /// Converges the host on `desired`, reading the actual state back (drift repair).
    fn reconcile(&mut self, desired: &Desired) -> ReconcileReport;
    /// Applies a change of `desired` quickly, trusting the state this enforcer last applied
    /// where reading it back is slow (a 10,000-element nft table); falls back to a full
    /// reconcile when the kernel disagrees. Drift is caught by the periodic [`reconcile`].
    ///
    /// [`reconcile`]: Enforcer::reconcile
    fn apply(&mut self, desired: &Desired) -> ReconcileReport {
        self.reconcile(desired)
    }
    /// Lifts everything this enforcer imposed (`--release-on-exit`).
    fn release(&mut self) -> ReconcileReport {
        self.reconcile(&Desired::default())
    }
}

/// The enforcer of audit mode: changes nothing.
#[derive(Debug, Default)]
pub struct RecordOnly;

impl Enforcer for RecordOnly {
    fn reconcile(&mut self, _: &Desired) -> ReconcileReport {
        ReconcileReport::default()
    }
}

/// The real enforcer: cgroup v2, nftables and GPU compute-mode backends, each optional by
/// configuration.
#[derive(Debug)]
pub struct HostEnforcer {
    cgroup: Option<CgroupEnforcer>,
    nft: Option<NftEnforcer>,
    gpu: Option<GpuEnforcement>,
}

/// The GPU backend: its own handle on NVML, and the enforcer's state (or why it has none).
#[derive(Debug)]
struct GpuEnforcement {
    backend: Box<dyn GpuBackend>,
    enforcer: Result<GpuComputeModeEnforcer, String>,
}

impl GpuEnforcement {
    fn reconcile(&mut self, prohibit: bool, report: &mut ReconcileReport) {
        let enforcer = match &mut self.enforcer {
            Ok(e) => e,
            Err(why) => {
                if prohibit {
                    report.errors.push(("gpu", why.clone()));
                }
                return;
            }
        };
        if !prohibit && enforcer.held().is_empty() {
            return; // Nothing to impose or lift: no NVML call at all.
        }
        let mut uuids = std::collections::BTreeSet::new();
        if prohibit {
            // GPUs already prohibited stay so even when a sample misses them (NVML briefly
            // unavailable): only a lifted decision lifts a block.
            uuids.extend(enforcer.held().keys().cloned());
            let sample = self.backend.sample();
            if let BackendState::Unavailable { reason } = &sample.backend {
                report.errors.push(("gpu", format!("GPU backend unavailable: {reason}")));
            }
            uuids.extend(sample.gpus.into_iter().map(|g| g.uuid).filter(|u| !u.is_empty()));
        }
        match enforcer.reconcile(self.backend.as_mut(), &uuids) {
            Ok(r) => {
                report.changes += r.prohibited.len() + r.restored.len();
                report.drift.extend(r.drift_repaired.iter().map(|(g, m)| ("gpu", format!("{g} was {m:?}"))));
                report.errors.extend(r.errors.iter().map(|(g, e)| ("gpu", format!("{g}: {e}"))));
            }
            Err(e) => report.errors.push(("gpu", e.to_string())),
        }
    }
}

impl HostEnforcer {
    /// Builds the backends `config.enforcement` enables, and the GPU backend when a GPU
    /// handle is given. The cgroup and GPU backends keep their state (what each cgroup or GPU
    /// looked like before kycd changed it) in `<state_dir>/enforce/`.
    pub fn from_config(config: &Config, gpu: Option<Box<dyn GpuBackend>>) -> Self {
        let e = &config.enforcement;
        let cgroup = e.cgroup.then(|| CgroupEnforcer::new(config.state_dir.join("enforce/cgroup.json")));
        let nft = e.nftables.then(|| {
            let nft = NftEnforcer::new(e.nft_command.clone());
            match &config.workloads.cgroup_root {
                Some(mount) => nft.with_cgroup_mount(mount.clone()),
                None => nft,
            }
        });
        let gpu = gpu.map(|backend| {
            let path = config.state_dir.join("enforce/gpu.json");
            let enforcer = GpuComputeModeEnforcer::load(&path).map_err(|e| {
                warn!(error = %e, "GPU enforcement state unusable: GPUs cannot be prohibited");
                format!("GPU enforcement state: {e}")
            });
            GpuEnforcement { backend, enforcer }
        });
        HostEnforcer { cgroup, nft, gpu }
    }
}

impl HostEnforcer {
    fn converge(&mut self, desired: &Desired, full: bool) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        if let Some(cgroup) = &mut self.cgroup {
            let r = cgroup.reconcile(&desired.cgroups);
            report.changes += r.frozen.len() + r.killed.len() + r.thawed.len();
            for path in &r.frozen {
                info!(cgroup = %path.display(), "frozen");
            }
            for path in &r.killed {
                info!(cgroup = %path.display(), "killed");
            }
            for path in &r.thawed {
                info!(cgroup = %path.display(), "thawed (block lifted)");
            }
            for path in &r.pending {
                warn!(cgroup = %path.display(), "freeze requested, not yet in effect; rechecked next reconcile");
            }
            report.drift.extend(r.drift.iter().map(|p| ("cgroup", format!("{} was thawed", p.display()))));
            report.errors.extend(r.errors.iter().map(|(p, e)| ("cgroup", format!("{}: {e}", p.display()))));
        }
        if let Some(nft) = &mut self.nft {
            let result = if full { nft.reconcile(&desired.nft) } else { nft.apply(&desired.nft) };
            match result {
                Ok(r) => {
                    report.changes += r.added + r.removed;
                    if r.drift > 0 {
                        report
                            .drift
                            .push(("nftables", format!("{} set elements restored or removed", r.drift)));
                    }
                    // A block that cannot be expressed is a block not in force: an error,
                    // counted, not a warning.
                    report.errors.extend(
                        r.skipped
                            .iter()
                            .map(|(what, why)| ("nftables", format!("{what} not blocked: {why}"))),
                    );
                }
                Err(e) => report.errors.push(("nftables", e.to_string())),
            }
        }
        if let Some(gpu) = &mut self.gpu {
            gpu.reconcile(desired.prohibit_gpus, &mut report);
        }
        report
    }
}

impl Enforcer for HostEnforcer {
    fn reconcile(&mut self, desired: &Desired) -> ReconcileReport {
        self.converge(desired, true)
    }

    fn apply(&mut self, desired: &Desired) -> ReconcileReport {
        self.converge(desired, false)
    }

    fn release(&mut self) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        if let Some(cgroup) = &mut self.cgroup {
            let r = cgroup.reconcile(&BTreeMap::new());
            report.changes += r.thawed.len();
            report.errors.extend(r.errors.iter().map(|(p, e)| ("cgroup", format!("{}: {e}", p.display()))));
        }
        if let Some(nft) = &self.nft {
            if let Err(e) = nft.remove_table() {
                report.errors.push(("nftables", e.to_string()));
            }
        }
        if let Some(gpu) = &mut self.gpu {
            gpu.reconcile(false, &mut report);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Reason, ReasonCode};
    use crate::enforce::Cidr;
    use kycd_protocol::Conditions;

    fn decision(verdict: Verdict, measure: Option<&str>, conditions: Option<Conditions>) -> Decision {
        Decision {
            verdict,
            conditions,
            reasons: vec![Reason {
                code: ReasonCode::MeasureProhibit,
                measure_id: measure.map(str::to_owned),
                citation: None,
                detail: String::new(),
            }],
            next_review_at: None,
            policy_version: Some(1),
            tenant: None,
            attestation_jti: None,
        }
    }

    fn policy() -> PolicyClaims {
        serde_json::from_value(serde_json::json!({
            "iss": "a", "iat": 0, "exp": 10_000, "version": 1, "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01},
            "measures": [
                {"id": "kp", "match": {"countries": ["KP"]}, "roles": ["customer"], "action": "prohibit",
                 "enforcement": "kill", "citation": "c"},
                {"id": "ir", "match": {"countries": ["IR"]}, "roles": ["customer"], "action": "prohibit",
                 "citation": "c"},
                {"id": "later", "match": {"countries": ["CU"]}, "roles": ["customer"], "action": "prohibit",
                 "effective_from": 5_000, "citation": "c"},
                {"id": "cond", "match": {"countries": ["RU"]}, "roles": ["customer"], "action": "condition",
                 "conditions": {"network": "deny_egress"}, "citation": "c"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn deny_freezes_or_kills_and_cuts_the_network_condition_only_cuts() {
        let mount = Path::new("/sys/fs/cgroup");
        let ids: Vec<WorkloadId> =
            ["cgroup:/a", "cgroup:/b", "libvirt_domain:vm", "cgroup:/c", "host:host", "cgroup:/gone"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let cgroups = [
            Some(PathBuf::from("/sys/fs/cgroup/kubepods.slice/a")),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods.slice/b")),
            Some(PathBuf::from("/sys/fs/cgroup/machine.slice/machine-qemu\\x2d1\\x2dvm.scope")),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods.slice/c")),
            None,
            None,
        ];
        let decisions = [
            decision(Verdict::Deny, Some("kp"), None),
            decision(Verdict::Deny, Some("ir"), None),
            decision(Verdict::Deny, None, None),
            decision(
                Verdict::Condition,
                Some("cond"),
                Some(Conditions { network: Some(NetworkCondition::DenyEgress), ..Conditions::default() }),
            ),
            decision(Verdict::Deny, None, None),
            decision(Verdict::Deny, None, None),
        ];
        let taps = vec!["vnet3".to_owned()];
        let views = (0..ids.len()).map(|i| WorkloadView {
            id: &ids[i],
            cgroup: cgroups[i].as_deref(),
            interfaces: if i == 2 { &taps } else { &[] },
            decision: &decisions[i],
            foreign: ForeignStatus::Unknown,
        });
        let policy = policy();
        let d = desired_state(views, Some(&policy), Some(mount), None, 1_000);
        let actions: Vec<(String, CgroupAction)> = d
            .cgroups
            .iter()
            .map(|(p, a)| (p.strip_prefix(mount).unwrap().display().to_string(), *a))
            .collect();
        assert_eq!(
            actions,
            [
                ("kubepods.slice/a".into(), CgroupAction::Kill),
                ("kubepods.slice/b".into(), CgroupAction::Freeze),
                ("machine.slice/machine-qemu\\x2d1\\x2dvm.scope".into(), CgroupAction::Freeze),
            ]
        );
        let cut: Vec<&str> = d.nft.cgroups.iter().map(String::as_str).collect();
        assert_eq!(
            cut,
            [
                "kubepods.slice/a",
                "kubepods.slice/b",
                "kubepods.slice/c",
                "machine.slice/machine-qemu\\x2d1\\x2dvm.scope"
            ]
        );
        assert_eq!(d.nft.interfaces.iter().collect::<Vec<_>>(), ["vnet3"]);
        assert!(d.nft.cidrs_v4.is_empty(), "no geo list configured");
    }

    #[test]
    fn geo_block_reaches_only_the_workloads_a_prohibiting_measure_applies_to() {
        let mount = Path::new("/sys/fs/cgroup");
        let ids: Vec<WorkloadId> =
            ["cgroup:/f", "cgroup:/us", "cgroup:/unattested", "cgroup:/denied", "host:host"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let cgroups: Vec<PathBuf> = ["f", "us", "unattested", "denied", "-"]
            .iter()
            .map(|c| Path::new("/sys/fs/cgroup/tenants.slice").join(c))
            .collect();
        let statuses = [
            ForeignStatus::Foreign,
            ForeignStatus::Us,
            ForeignStatus::Unknown,
            ForeignStatus::Foreign,
            ForeignStatus::Foreign,
        ];
        let verdicts = [Verdict::Allow, Verdict::Allow, Verdict::Allow, Verdict::Deny, Verdict::Allow];
        let decisions: Vec<Decision> = verdicts.iter().map(|v| decision(*v, None, None)).collect();
        let taps = [vec![], vec!["vnet-us".to_owned()], vec!["vnet-u".to_owned()], vec![], vec![]];
        let views = || {
            (0..ids.len()).map(|i| WorkloadView {
                id: &ids[i],
                cgroup: (i != 4).then(|| cgroups[i].as_path()),
                interfaces: &taps[i],
                decision: &decisions[i],
                foreign: statuses[i],
            })
        };
        let geo: CountryCidrs = [
            ("KP".to_owned(), (vec![Cidr::parse("175.45.176.0/22").unwrap()], vec![])),
            ("IR".to_owned(), (vec![Cidr::parse("2.176.0.0/12").unwrap()], vec![])),
        ]
        .into_iter()
        .collect();
        fn in_scope(d: &Desired) -> (Vec<&str>, Vec<&str>, usize) {
            let cgs = d.nft.geo_cgroups.iter().map(String::as_str).collect();
            let ifs = d.nft.geo_interfaces.iter().map(String::as_str).collect();
            (cgs, ifs, d.nft.cidrs_v4.len())
        }

        // Default (`foreign_persons`): the foreign and the unknown tenant; not the U.S. one, not
        // the denied one (cut off already), never the host.
        let mut policy = policy();
        let d = desired_state(views(), Some(&policy), Some(mount), Some(&geo), 1_000);
        assert_eq!(in_scope(&d), (vec!["tenants.slice/f", "tenants.slice/unattested"], vec!["vnet-u"], 2));
        assert!(d.nft.cgroups.contains("tenants.slice/denied"));

        // `applies_to: all` on one measure: the U.S. tenant is reached too.
        policy.measures[1].applies_to = kycd_protocol::AppliesTo::All;
        let d = desired_state(views(), Some(&policy), Some(mount), Some(&geo), 1_000);
        assert_eq!(
            in_scope(&d),
            (
                vec!["tenants.slice/f", "tenants.slice/unattested", "tenants.slice/us"],
                vec!["vnet-u", "vnet-us"],
                2
            )
        );

        // No country of a prohibiting measure has CIDRs: nothing is in geo scope.
        let d = desired_state(views(), Some(&policy), Some(mount), Some(&CountryCidrs::new()), 1_000);
        assert_eq!(in_scope(&d), (vec![], vec![], 0));
    }

    #[test]
    fn gpus_are_prohibited_for_a_denied_or_no_gpu_host_only() {
        let host = WorkloadId::host();
        let vm: WorkloadId = "libvirt_domain:vm".parse().unwrap();
        let no_gpu = Some(Conditions { no_gpu: true, ..Conditions::default() });
        let cases = [
            (&host, decision(Verdict::Deny, None, None), true),
            (&host, decision(Verdict::Condition, None, no_gpu.clone()), true),
            (&host, decision(Verdict::Allow, None, None), false),
            (&vm, decision(Verdict::Condition, None, no_gpu), false),
            (&vm, decision(Verdict::Deny, None, None), false),
        ];
        for (id, d, want) in cases {
            let view =
                WorkloadView { id, cgroup: None, interfaces: &[], decision: &d, foreign: ForeignStatus::Us };
            let got = desired_state([view], None, None, None, 0).prohibit_gpus;
            assert_eq!(got, want, "{id} {:?}", d.verdict);
        }
    }

    /// A GPU backend double whose samples can go missing (NVML briefly unavailable) while
    /// its compute modes stay settable.
    #[derive(Debug, Clone, Default)]
    struct FlakyGpus {
        modes: std::sync::Arc<std::sync::Mutex<BTreeMap<String, crate::gpu::ComputeMode>>>,
        unavailable: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl GpuBackend for FlakyGpus {
        fn sample(&mut self) -> crate::gpu::Sample {
            let down = self.unavailable.load(std::sync::atomic::Ordering::SeqCst);
            let gpus = if down {
                vec![]
            } else {
                let modes = self.modes.lock().unwrap();
                modes
                    .keys()
                    .enumerate()
                    .map(|(i, u)| {
                        crate::gpu::GpuSnapshot::bare(
                            i as u32,
                            u.clone(),
                            "g".into(),
                            crate::gpu::GpuState::Ok,
                        )
                    })
                    .collect()
            };
            let backend =
                if down { BackendState::Unavailable { reason: "flaky".into() } } else { BackendState::Ok };
            crate::gpu::Sample::new(0, backend, gpus)
        }
        fn compute_mode(&mut self, uuid: &str) -> Result<crate::gpu::ComputeMode, crate::gpu::GpuError> {
            self.modes.lock().unwrap().get(uuid).copied().ok_or(crate::gpu::GpuError::NoSuchGpu(uuid.into()))
        }
        fn set_compute_mode(
            &mut self,
            uuid: &str,
            mode: crate::gpu::ComputeMode,
        ) -> Result<(), crate::gpu::GpuError> {
            self.modes.lock().unwrap().insert(uuid.into(), mode);
            Ok(())
        }
    }

    #[test]
    fn a_missed_gpu_sample_does_not_lift_a_gpu_block() {
        use crate::gpu::ComputeMode;
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { state_dir: dir.path().to_owned(), ..Config::default() };
        config.enforcement.cgroup = false;
        config.enforcement.nftables = false;
        let gpus = FlakyGpus::default();
        gpus.modes.lock().unwrap().extend([("GPU-0".to_string(), ComputeMode::Default)]);
        let mut enforcer = HostEnforcer::from_config(&config, Some(Box::new(gpus.clone())));
        let prohibit = Desired { prohibit_gpus: true, ..Desired::default() };
        let r = enforcer.reconcile(&prohibit);
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(gpus.modes.lock().unwrap()["GPU-0"], ComputeMode::Prohibited);
        gpus.unavailable.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = enforcer.reconcile(&prohibit);
        assert_eq!(r.errors.len(), 1, "the unavailable backend is reported: {r:?}");
        assert_eq!(gpus.modes.lock().unwrap()["GPU-0"], ComputeMode::Prohibited, "lifted on a missed sample");
        gpus.unavailable.store(false, std::sync::atomic::Ordering::SeqCst);
        enforcer.reconcile(&Desired::default());
        assert_eq!(gpus.modes.lock().unwrap()["GPU-0"], ComputeMode::Default, "restored when lifted");
    }

    #[test]
    fn a_missing_nft_is_an_error_of_the_nftables_backend_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { state_dir: dir.path().to_owned(), ..Config::default() };
        config.enforcement.cgroup = false;
        config.enforcement.nft_command = vec!["/nonexistent/kycd-test/nft".into()];
        let mut enforcer = HostEnforcer::from_config(&config, None);
        let mut desired = Desired::default();
        desired.nft.interfaces.insert("vnet0".into());
        for report in [enforcer.reconcile(&desired), enforcer.apply(&desired)] {
            assert_eq!(report.errors.len(), 1, "{report:?}");
            assert_eq!(report.errors[0].0, "nftables");
            assert!(report.errors[0].1.contains("/nonexistent/kycd-test/nft"), "{report:?}");
            assert_eq!(report.changes, 0);
        }
    }

    #[test]
    fn geo_blocks_follow_prohibiting_measures_in_effect() {
        let geo: CountryCidrs = [
            ("KP".to_owned(), (vec![crate::enforce::Cidr::parse("175.45.176.0/22").unwrap()], vec![])),
            ("CU".to_owned(), (vec![crate::enforce::Cidr::parse("152.206.0.0/15").unwrap()], vec![])),
            ("RU".to_owned(), (vec![crate::enforce::Cidr::parse("5.3.0.0/16").unwrap()], vec![])),
            ("IR".to_owned(), (vec![], vec![crate::enforce::Cidr::parse("2a01:5ec0::/29").unwrap()])),
        ]
        .into_iter()
        .collect();
        let policy = policy();
        let before = desired_state([], Some(&policy), None, Some(&geo), 1_000);
        assert_eq!(before.nft.cidrs_v4.iter().collect::<Vec<_>>(), ["175.45.176.0/22"]);
        assert_eq!(before.nft.cidrs_v6.iter().collect::<Vec<_>>(), ["2a01:5ec0::/29"]);
        let after = desired_state([], Some(&policy), None, Some(&geo), 5_000);
        assert_eq!(after.nft.cidrs_v4.len(), 2, "CU's measure took effect; RU's is only a condition");
        assert_eq!(desired_state([], None, None, Some(&geo), 5_000), Desired::default());
    }
}
