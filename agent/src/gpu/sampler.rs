//! One sampling tick: sample every GPU → attribute processes to workloads and tenants →
//! estimate operations → aggregate into usage windows.
//!
//! Per GPU and tick, the GPU's activity (GPM tensor activity, else SM utilization; see
//! [`super::flops`]) is split between its processes by their per-process SM utilization
//! samples, or evenly when the GPU has none. A workload's share is the sum of its processes'.
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
use super::flops::{self, Activity, Peak, PeakTable};
use super::usage::{Observation, TrainingRule, UsageAggregator, UsageKey, WindowSender, DEFAULT_WINDOW};
use super::{BackendState, GpuBackend, GpuState, Sample};
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

/// One GPU's estimate for a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuEstimate {
    /// GPU UUID.
    pub uuid: String,
    /// Peak and its source.
    pub peak: Peak,
    /// Activity and method; `None` when neither GPM nor utilization was readable.
    pub activity: Option<Activity>,
    /// Estimated operations in the tick; `None` when the peak or activity is unknown.
    pub ops: Option<f64>,
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
    /// Windows this tick closed.
    pub windows: Vec<UsageWindow>,
}

/// Why a sampler cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// The peak table is unusable.
    #[error("peak FLOP/s table")]
    Peaks(#[from] flops::FlopsError),
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

        let mut report = TickReport {
            sample: Sample { at_ms: sample.at_ms, backend: sample.backend.clone(), gpus: Vec::new() },
            dt,
            lost_gpus: Vec::new(),
            processes: Vec::new(),
            unattributed: Vec::new(),
            gpus: Vec::new(),
            windows: Vec::new(),
        };
        if let BackendState::Unavailable { reason } = &sample.backend {
            tracing::debug!(%reason, "GPU backend unavailable");
        }
        // Forget pids no GPU lists any more (see `owners`).
        let listed: HashSet<u32> =
            sample.gpus.iter().flat_map(|g| g.processes.iter().map(|p| p.pid)).collect();
        self.owners.retain(|pid, _| listed.contains(pid));
        let mut observations = Vec::new();
        for gpu in &sample.gpus {
            if gpu.state == GpuState::Lost {
                report.lost_gpus.push(gpu.uuid.clone());
                continue;
            }
            let peak = self.peaks.peak(&gpu.name, gpu.sm_count, gpu.max_sm_clock_mhz, gpu.compute_capability);
            let activity = flops::activity(gpu.gpm_tensor_activity_pct, gpu.utilization_gpu_pct);
            let ops = match (peak.flops, activity) {
                (Some(p), Some(a)) => Some(flops::estimate_ops(p, a.fraction, dt.as_secs_f64())),
                _ => None,
            };
            report.gpus.push(GpuEstimate { uuid: gpu.uuid.clone(), peak, activity, ops });

            let shares = process_shares(gpu);
            let gpu_activity = activity.map_or(0.0, |a| a.fraction);
            let method = activity.map_or(EstimationMethod::Unknown, |a| a.method);
            let mut per_key: BTreeMap<UsageKey, f64> = BTreeMap::new();
            for (pid, share) in shares {
                let owner = self.owner(pid, sample.at_ms);
                let tenant_info = match &owner {
                    ProcessOwner::Workload { workload } => tenants.get(workload),
                    _ => None,
                };
                let p = AttributedProcess {
                    gpu_uuid: gpu.uuid.clone(),
                    pid,
                    owner: owner.clone(),
                    tenant: tenant_info.map(|t| t.tenant.clone()),
                    activity: gpu_activity * share,
                };
                if p.tenant.is_none() {
                    tracing::debug!(gpu = %gpu.uuid, pid, owner = ?p.owner, "unattributed GPU process");
                    report.unattributed.push(p.clone());
                }
                report.processes.push(p);
                if let ProcessOwner::Workload { workload } = owner {
                    let key = UsageKey {
                        tenant: tenant_info.map(|t| t.tenant.clone()),
                        workload,
                        foreign_person: tenant_info.is_some_and(|t| t.foreign_person),
                    };
                    *per_key.entry(key).or_default() += gpu_activity * share;
                }
            }
            if dt.is_zero() {
                continue;
            }
            for (key, act) in per_key {
                observations.push(Observation {
                    key,
                    gpu_uuid: gpu.uuid.clone(),
                    peak_flops: peak.flops,
                    activity: act,
                    method,
                });
            }
        }
        if !dt.is_zero() {
            report.windows = self.aggregator.observe(sample.at_ms, dt, &observations);
        }
        report.sample = sample;
        report
    }
}

impl GpuSampler {
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

/// How often a cached process owner is re-read from `/proc/<pid>/cgroup`.
pub const OWNER_RECHECK_MS: i64 = 10_000;

/// `(pid, share of the GPU's activity)` for each process on the GPU; shares sum to 1 when
/// there are processes.
fn process_shares(gpu: &super::GpuSnapshot) -> Vec<(u32, f64)> {
    let mut pids: Vec<u32> = gpu.processes.iter().map(|p| p.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    if pids.is_empty() {
        return Vec::new();
    }
    let mut util: BTreeMap<u32, u32> = BTreeMap::new();
    for s in gpu.process_utilization.iter().flatten() {
        // Several samples per pid since the last read: take the newest view's level (max).
        let e = util.entry(s.pid).or_default();
        *e = (*e).max(s.sm_util_pct);
    }
    let total: u32 = pids.iter().map(|p| util.get(p).copied().unwrap_or(0)).sum();
    if total == 0 {
        let even = 1.0 / pids.len() as f64;
        return pids.into_iter().map(|p| (p, even)).collect();
    }
    pids.into_iter().map(|p| (p, f64::from(util.get(&p).copied().unwrap_or(0)) / f64::from(total))).collect()
}

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
            // Sleep in short steps so shutdown is prompt.
            while !shutdown.is_cancelled() && SystemClock.instant() < due {
                std::thread::sleep(
                    due.saturating_duration_since(SystemClock.instant()).min(Duration::from_millis(100)),
                );
            }
        }
        for w in sampler.flush() {
            let _ = windows.blocking_send(w);
        }
    })
}
