//! One sampling tick: sample every GPU → attribute processes to workloads and tenants →
//! estimate operations → aggregate into usage windows.
//!
//! Per GPU and tick, the estimate ([`super::estimate`]) is made for each *unit*: the whole GPU,
//! or on a MIG GPU each GPU instance with its own GPM counters (`nvmlGpmMigSampleGet`; its peaks
//! are the GPU's × its share of the SMs). A unit whose processes all belong to one workload
//! gives that workload its whole estimate. A unit shared by several workloads without
//! isolation cannot be split from device-wide counters: each workload gets the unit's point
//! estimate × its share of the processes' SM utilization (evenly when the GPU has no
//! per-process samples), 0 as its lower bound and the unit's whole upper bound, labelled
//! [`EstimationMethod::SharedSplit`], and the interval counts as shared GPU time. A workload
//! whose tenant's decision carries the `exclusive_gpu` condition and shares a unit is listed in
//! [`TickReport::exclusivity_violations`].
//!
//! Processes whose workload has no tenant (no valid attestation) produce windows with no
//! tenant and are listed in [`TickReport::unattributed`] for the policy's `unverified` path;
//! processes that exited before `/proc` was read keep their share (it is not handed to
//! others) and are listed there too.
//!
//! The tick's length is the time between this sample and the previous one, capped at twice
//! the interval so a suspended host does not book its sleep as GPU use; the first sample only
//! primes (GPM activity is a difference of two samples).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::clock::{Clock as _, SystemClock};
use kycd_protocol::{EstimationMethod, UsageWindow};
use tokio_util::sync::CancellationToken;

use super::attribution::{Attributor, ProcessOwner};
use super::estimate::{self, Bounds, Rate, Reading};
use super::guest::host::GuestStatus;
use super::passthrough::{PassthroughAccounting, PassthroughOptions, PciGpu};
use super::peaks::{self, PeakTable, Peaks};
use super::units::{process_shares, units, Unit};
use super::usage::{Observation, TrainingRule, UsageAggregator, UsageKey, WindowSender, DEFAULT_WINDOW};
use super::{BackendState, GpuBackend, GpuSnapshot, GpuState, Sample, VgpuVm};
use crate::discovery::workload::WorkloadId;

/// Sampler settings (the daemon fills these from the `[gpu]` config section).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    /// Sampling interval (default 1 s).
    pub interval: Duration,
    /// Usage window length (default 60 s).
    pub window: Duration,
    /// The local `training_like` rule.
    pub training: TrainingRule,
    /// `/proc`.
    pub proc_root: PathBuf,
    /// Workload cgroup roots, relative to the cgroup2 mount.
    pub cgroup_roots: Vec<String>,
    /// Operator peak-FLOP/s table laid over the built-in one.
    pub peak_override: Option<PathBuf>,
    /// Where to find GPUs passed through to VMs ([`super::passthrough`]); `None`: not looked
    /// for.
    pub passthrough: Option<PassthroughOptions>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            interval: Duration::from_secs(1),
            window: DEFAULT_WINDOW,
            training: TrainingRule::default(),
            proc_root: PathBuf::from("/proc"),
            cgroup_roots: vec!["machine.slice".into(), "user.slice".into(), "kubepods.slice".into()],
            peak_override: None,
            passthrough: None,
        }
    }
}

/// The tenant a workload's valid attestation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    /// Tenant id (`sub`).
    pub tenant: String,
    /// From the attestation.
    pub foreign_person: bool,
    /// The tenant's decision carries the `exclusive_gpu` condition.
    pub exclusive_gpu: bool,
}

/// Workload → tenant, for workloads with a valid attestation; owned by the daemon.
pub type TenantMap = BTreeMap<WorkloadId, TenantInfo>;

/// A GPU process and who it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributedProcess {
    /// GPU UUID.
    pub gpu_uuid: String,
    /// Host pid.
    pub pid: u32,
    /// Workload, or why none.
    pub owner: ProcessOwner,
    /// Tenant, if the workload has a valid attestation.
    pub tenant: Option<String>,
    /// Its fraction of the GPU's peak over the tick.
    pub activity: f64,
}

/// One GPU's device-wide estimate for a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuEstimate {
    /// GPU UUID.
    pub uuid: String,
    /// Peak rates and their source.
    pub peaks: Peaks,
    /// Rate and method; `None` when nothing was readable or the peak is unknown.
    pub rate: Option<Rate>,
    /// Operations in the tick (rate × tick length).
    pub ops: Option<Bounds>,
}

/// A workload that must not share a GPU, found sharing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedUse {
    /// The GPU (or MIG instance) UUID.
    pub gpu_uuid: String,
    /// The workload.
    pub workload: WorkloadId,
    /// Its tenant.
    pub tenant: String,
    /// How many workloads (and unattributable processes) used the GPU.
    pub users: usize,
}

/// What one tick saw.
#[derive(Debug, Clone, PartialEq)]
pub struct TickReport {
    /// The raw sample.
    pub sample: Sample,
    /// Tick length booked (zero for the priming sample).
    pub dt: Duration,
    /// UUIDs of GPUs that fell off the bus.
    pub lost_gpus: Vec<String>,
    /// Every GPU process.
    pub processes: Vec<AttributedProcess>,
    /// Processes with no tenant: unattested workloads, exited or unreadable processes.
    pub unattributed: Vec<AttributedProcess>,
    /// Per-GPU estimates.
    pub gpus: Vec<GpuEstimate>,
    /// Workloads under `exclusive_gpu` that shared a GPU this tick.
    pub exclusivity_violations: Vec<SharedUse>,
    /// NVIDIA GPUs on the PCI bus and how each is accounted for (empty when passthrough
    /// accounting is off).
    pub passthrough: Vec<PciGpu>,
    /// Guest telemetry of every domain holding passed-through GPUs.
    pub guests: Vec<GuestStatus>,
    /// Windows this tick closed.
    pub windows: Vec<UsageWindow>,
}

impl TickReport {
    /// A report of `sample` in which nothing was booked.
    pub fn empty(sample: Sample) -> Self {
        TickReport {
            sample,
            dt: Duration::ZERO,
            lost_gpus: Vec::new(),
            processes: Vec::new(),
            unattributed: Vec::new(),
            gpus: Vec::new(),
            exclusivity_violations: Vec::new(),
            passthrough: Vec::new(),
            guests: Vec::new(),
            windows: Vec::new(),
        }
    }
}

/// Why a sampler cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// The peak table is unusable.
    #[error("peak table")]
    Peaks(#[from] peaks::PeaksError),
}

/// Samples a backend and aggregates usage.
#[derive(Debug)]
pub struct GpuSampler {
    backend: Box<dyn GpuBackend>,
    attributor: Attributor,
    /// pid → (owner, when read, Unix ms). Reading `/proc/<pid>/cgroup` is the costliest part
    /// of a tick (the kernel walks every hierarchy under a global lock), and a training job's
    /// processes stay put for hours. An entry lives only while NVML keeps listing its pid on
    /// consecutive ticks (pid reuse needs the pid to vanish first, and a wrap of pid_max
    /// within one interval) and is re-read every [`OWNER_RECHECK_MS`] to notice a process
    /// moved to another cgroup.
    owners: HashMap<u32, (ProcessOwner, i64)>,
    peaks: PeakTable,
    aggregator: UsageAggregator,
    interval: Duration,
    last_at_ms: Option<i64>,
    /// The previous sample's time whatever the backend said: GPUs passed through to VMs are
    /// accounted whether NVML answers or not (a host passing every GPU through may have no
    /// NVIDIA driver loaded at all).
    last_any_ms: Option<i64>,
    passthrough: Option<PassthroughAccounting>,
}

impl GpuSampler {
    /// A sampler over `backend`.
    pub fn new(backend: Box<dyn GpuBackend>, options: &SamplerOptions) -> Result<Self, SamplerError> {
        Ok(GpuSampler {
            backend,
            attributor: Attributor::new(&options.proc_root, &options.cgroup_roots),
            owners: HashMap::new(),
            peaks: PeakTable::with_override(options.peak_override.as_deref())?,
            aggregator: UsageAggregator::new(options.window, options.training),
            interval: options.interval,
            last_at_ms: None,
            last_any_ms: None,
            passthrough: options.passthrough.clone().map(PassthroughAccounting::new),
        })
    }

    /// The backend, e.g. for the compute-mode enforcer between ticks.
    pub fn backend_mut(&mut self) -> &mut dyn GpuBackend {
        self.backend.as_mut()
    }

    /// Closes the window being filled (shutdown).
    pub fn flush(&mut self) -> Vec<UsageWindow> {
        self.aggregator.flush()
    }

    /// One tick. Blocks on the backend: call from a dedicated thread (see [`spawn`]).
    pub fn tick(&mut self, tenants: &TenantMap) -> TickReport {
        let sample = self.backend.sample();
        let cap = i64::try_from(self.interval.as_millis()).unwrap_or(i64::MAX / 4).saturating_mul(2);
        let dt_ms = match (self.last_at_ms, &sample.backend) {
            (Some(last), BackendState::Ok) => (sample.at_ms - last).clamp(0, cap),
            _ => 0,
        };
        // An unavailable backend breaks the chain: the next good sample only primes again.
        self.last_at_ms = (sample.backend == BackendState::Ok).then_some(sample.at_ms);
        let dt = Duration::from_millis(u64::try_from(dt_ms).unwrap_or(0));
        let any_dt_ms = self.last_any_ms.map_or(0, |last| (sample.at_ms - last).clamp(0, cap));
        self.last_any_ms = Some(sample.at_ms);

        let mut report = TickReport {
            dt,
            ..TickReport::empty(Sample::new(sample.at_ms, sample.backend.clone(), Vec::new()))
        };
        if let BackendState::Unavailable { reason } = &sample.backend {
            tracing::debug!(%reason, "GPU backend unavailable");
        }
        // Forget pids no GPU lists any more (see `owners`).
        let listed: HashSet<u32> =
            sample.gpus.iter().flat_map(|g| g.processes.iter().map(|p| p.pid)).collect();
        self.owners.retain(|pid, _| listed.contains(pid));
        // Rescanned first: vGPUs are named after the domains it lists.
        if let Some(passthrough) = &mut self.passthrough {
            passthrough.refresh(sample.at_ms, &self.peaks);
            passthrough.poll_guests(sample.at_ms);
        }
        let mut observations = Vec::new();
        for gpu in &sample.gpus {
            if gpu.state == GpuState::Lost {
                report.lost_gpus.push(gpu.uuid.clone());
                continue;
            }
            let peaks =
                self.peaks.peaks(&gpu.name, gpu.sm_count, gpu.max_sm_clock_mhz, gpu.compute_capability);
            let rate = estimate::rate(&peaks.rates, &Reading::of(gpu));
            let ops = rate.map(|r| r.ops_per_s.scaled(dt.as_secs_f64()));
            report.gpus.push(GpuEstimate { uuid: gpu.uuid.clone(), peaks, rate, ops });
            for unit in units(gpu, &peaks, rate) {
                self.attribute(&unit, gpu, (sample.at_ms, dt), tenants, &mut report, &mut observations);
            }
        }
        // Passed-through GPUs count over the tick whatever NVML did; when NVML only primed,
        // they alone make the tick.
        let mut tick = dt;
        if let Some(passthrough) = &mut self.passthrough {
            report.passthrough = passthrough.gpus().to_vec();
            report.guests = passthrough.guest_status(sample.at_ms);
            // (With NVML priming, `attribute` observed nothing: the tick is the passthrough's.)
            if dt.is_zero() {
                tick = Duration::from_millis(u64::try_from(any_dt_ms).unwrap_or(0));
            }
            if !tick.is_zero() {
                observations.extend(passthrough.observations(tenants, sample.at_ms));
            }
        }
        if !tick.is_zero() {
            report.windows = self.aggregator.observe(sample.at_ms, tick, &observations);
        }
        report.sample = sample;
        report
    }
}

impl GpuSampler {
    /// Attributes one unit's processes to workloads and its estimate to their keys.
    fn attribute(
        &mut self,
        unit: &Unit,
        gpu: &GpuSnapshot,
        (at_ms, dt): (i64, Duration),
        tenants: &TenantMap,
        report: &mut TickReport,
        observations: &mut Vec<Observation>,
    ) {
        // vGPUs have no per-instance utilization in NVML's safe API: processes and vGPUs
        // share the unit evenly, processes among themselves by their SM utilization.
        let users_n = unit.pids.len() + unit.vgpus.len();
        let pid_part = if users_n == 0 { 0.0 } else { unit.pids.len() as f64 / users_n as f64 };
        let shares = process_shares(&unit.pids, gpu);
        let owners: Vec<(u32, f64, ProcessOwner)> =
            shares.into_iter().map(|(pid, share)| (pid, share * pid_part, self.owner(pid, at_ms))).collect();
        let vgpu_owners: Vec<WorkloadId> = unit.vgpus.iter().map(|vm| self.vgpu_workload(vm)).collect();
        // Who used the unit: each workload once, each process of no workload on its own.
        let users: HashSet<String> = owners
            .iter()
            .map(|(pid, _, owner)| match owner {
                ProcessOwner::Workload { workload } => workload.to_string(),
                _ => format!("pid:{pid}"),
            })
            .chain(vgpu_owners.iter().map(ToString::to_string))
            .collect();
        let shared = users.len() > 1;
        let activity = unit.rate.map_or(0.0, |r| r.activity);
        let mut per_key: BTreeMap<UsageKey, f64> = BTreeMap::new();
        for (pid, share, owner) in owners {
            let tenant_info = match &owner {
                ProcessOwner::Workload { workload } => tenants.get(workload),
                _ => None,
            };
            let p = AttributedProcess {
                gpu_uuid: unit.uuid.clone(),
                pid,
                owner: owner.clone(),
                tenant: tenant_info.map(|t| t.tenant.clone()),
                activity: activity * share,
            };
            if p.tenant.is_none() {
                tracing::debug!(gpu = %unit.uuid, pid, owner = ?p.owner, "unattributed GPU process");
                report.unattributed.push(p.clone());
            }
            report.processes.push(p);
            let ProcessOwner::Workload { workload } = owner else { continue };
            let key = Self::usage_key(workload, tenant_info, (&unit.uuid, shared, users.len()), report);
            *per_key.entry(key).or_default() += share;
        }
        for workload in vgpu_owners {
            let tenant_info = tenants.get(&workload);
            if tenant_info.is_none() {
                tracing::debug!(gpu = %unit.uuid, %workload, "vGPU of a VM without a tenant");
            }
            let key = Self::usage_key(workload, tenant_info, (&unit.uuid, shared, users.len()), report);
            *per_key.entry(key).or_default() += 1.0 / users_n as f64;
        }
        if dt.is_zero() {
            return;
        }
        for (key, share) in per_key {
            let (ops_per_s, method) = match unit.rate {
                Some(r) if shared => {
                    (Some(r.ops_per_s.shared(share)), r.method.weakest(EstimationMethod::SharedSplit))
                }
                Some(r) => (Some(r.ops_per_s.scaled(share)), r.method),
                None => (None, EstimationMethod::Unknown),
            };
            observations.push(Observation {
                key,
                gpu_uuid: unit.uuid.clone(),
                peak_flops: unit.peak_flops,
                ops_per_s,
                activity: activity * share,
                method,
                shared,
                guest_gap: false,
            });
        }
    }

    /// The usage key of `workload` on a unit, noting an `exclusive_gpu` workload that shares it.
    fn usage_key(
        workload: WorkloadId,
        tenant_info: Option<&TenantInfo>,
        (unit, shared, users): (&str, bool, usize),
        report: &mut TickReport,
    ) -> UsageKey {
        if let Some(t) = tenant_info.filter(|t| shared && t.exclusive_gpu) {
            let violation = SharedUse {
                gpu_uuid: unit.to_owned(),
                workload: workload.clone(),
                tenant: t.tenant.clone(),
                users,
            };
            if !report.exclusivity_violations.contains(&violation) {
                report.exclusivity_violations.push(violation);
            }
        }
        UsageKey {
            tenant: tenant_info.map(|t| t.tenant.clone()),
            workload,
            foreign_person: tenant_info.is_some_and(|t| t.foreign_person),
        }
    }

    /// The workload a vGPU's VM is: its libvirt domain, found by UUID among the running
    /// domains (one not found keeps the UUID as its name: a workload with no tenant).
    fn vgpu_workload(&self, vm: &VgpuVm) -> WorkloadId {
        let name = match vm {
            VgpuVm::Domain(name) => name.clone(),
            VgpuVm::Uuid(uuid) => {
                self.passthrough.as_ref().and_then(|p| p.domain_by_uuid(uuid)).unwrap_or(uuid).to_owned()
            }
        };
        WorkloadId { kind: crate::discovery::workload::WorkloadKind::LibvirtDomain, id: name }
    }

    fn owner(&mut self, pid: u32, now_ms: i64) -> ProcessOwner {
        if let Some((owner, read_at)) = self.owners.get(&pid) {
            if now_ms.saturating_sub(*read_at) < OWNER_RECHECK_MS {
                return owner.clone();
            }
        }
        let owner = self.attributor.owner(pid);
        // Exited and unreadable processes are not remembered: they are rare and may change.
        if matches!(owner, ProcessOwner::Workload { .. }) {
            self.owners.insert(pid, (owner.clone(), now_ms));
        } else {
            self.owners.remove(&pid);
        }
        owner
    }
}

/// The longest the sampler thread sleeps before it looks at the shutdown token again.
const SHUTDOWN_STEP: Duration = Duration::from_millis(250);

/// How often a cached process owner is re-read from `/proc/<pid>/cgroup`.
pub const OWNER_RECHECK_MS: i64 = 10_000;

/// Runs `sampler` on a dedicated OS thread, one tick per interval, until `shutdown`; windows go
/// to `windows` (blocking when full: usage is back-pressured, never dropped) and each tick's
/// report to `reports` when given. Flushes the open window on shutdown.
pub fn spawn(
    mut sampler: GpuSampler,
    tenants: tokio::sync::watch::Receiver<Arc<TenantMap>>,
    windows: WindowSender,
    reports: Option<tokio::sync::mpsc::Sender<TickReport>>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("kycd-gpu-sampler".into()).spawn(move || {
        let mut due = SystemClock.instant();
        while !shutdown.is_cancelled() {
            let map = Arc::clone(&tenants.borrow());
            let mut report = sampler.tick(&map);
            for w in std::mem::take(&mut report.windows) {
                if windows.blocking_send(w).is_err() {
                    tracing::warn!("usage window receiver closed; GPU sampler stopping");
                    return;
                }
            }
            if let Some(tx) = &reports {
                // Reports are for observers (metrics, API); a slow one misses ticks.
                let _ = tx.try_send(report);
            }
            due += sampler.interval;
            let now = SystemClock.instant();
            if due < now {
                due = now;
            }
            // Sleep in steps so shutdown is prompt (within SHUTDOWN_STEP); each wake-up costs
            // CPU, which the sampling budget (0.1 % of a core) notices at 10 a second.
            while !shutdown.is_cancelled() && SystemClock.instant() < due {
                std::thread::sleep(due.saturating_duration_since(SystemClock.instant()).min(SHUTDOWN_STEP));
            }
        }
        for w in sampler.flush() {
            let _ = windows.blocking_send(w);
        }
    })
}
