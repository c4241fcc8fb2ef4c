//! GPU sampling: what the agent knows about this host's GPUs and who uses them.
//!
//! This module owns the path from a GPU driver to per-tenant usage windows:
//!
//! - [`GpuBackend`]: one sample of every GPU per call, plus compute-mode get/set. Two
//!   implementations: [`nvml::NvmlBackend`] (the driver, through `nvml-wrapper`, on its own OS
//!   thread) and [`replay::ReplayBackend`] (a recorded JSON-lines trace, for demos and
//!   benchmarks; `kycctl gpu record` writes one, see [`record`]).
//! - [`attribution`]: GPU process → `/proc/<pid>/cgroup` → [`WorkloadId`](crate::discovery::workload::WorkloadId).
//! - [`peaks`]: per-precision peak rates per GPU model (the datasheet table and its fallback).
//! - [`estimate`]: the per-interval operation estimate from every GPM pipe, clock-scaled,
//!   as three numbers (lower, point, upper); docs/estimates.md explains it for auditors.
//! - [`usage`]: per-(tenant, workload) usage windows, handed to reporting over a bounded channel.
//! - [`sampler`]: one tick = sample → attribute → estimate → aggregate.
//!
//! Compute-mode enforcement (`Prohibited` for GPUs a tenant must not use) is
//! [`crate::enforce::gpu_mode`]'s; it drives the GPUs through [`GpuBackend`].
//!
//! A missing driver, a GPU that falls off the bus and a process that exits between NVML listing
//! it and `/proc` being read are states in the data, never errors that stop sampling.

pub mod attribution;
pub mod estimate;
pub mod guest;
pub mod metrics;
pub mod nvml;
pub mod passthrough;
pub mod peaks;
pub mod record;
pub mod replay;
pub mod sampler;
pub mod trace_estimate;
pub mod units;
pub mod usage;

use serde::{Deserialize, Serialize};

pub use nvml::{NvmlBackend, NvmlOptions};
pub use replay::ReplayBackend;

/// A GPU's compute mode (NVML `nvmlComputeMode_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeMode {
    /// Any number of contexts.
    Default,
    /// Retired by NVIDIA; still reported by old drivers.
    ExclusiveThread,
    /// No CUDA contexts may be created: how the agent denies a GPU.
    Prohibited,
    /// One context, from one process.
    ExclusiveProcess,
}

/// The trace format [`Sample`]s are written in: 1 had GPM's any-tensor activity only (a line
/// without `format` is format 1); 2 adds every GPM pipe ([`GpmPipes`]) per GPU and per MIG GPU
/// instance.
pub const TRACE_FORMAT: u32 = 2;

fn trace_format_1() -> u32 {
    1
}

/// One call to [`GpuBackend::sample`]: every GPU at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Trace format of this line ([`TRACE_FORMAT`] for samples taken now).
    #[serde(default = "trace_format_1")]
    pub format: u32,
    /// When the sample was taken, Unix milliseconds.
    pub at_ms: i64,
    /// Whether the backend could sample at all.
    pub backend: BackendState,
    /// One entry per GPU the backend knows of (lost ones included).
    #[serde(default)]
    pub gpus: Vec<GpuSnapshot>,
}

impl Sample {
    /// A sample in the current [`TRACE_FORMAT`].
    pub fn new(at_ms: i64, backend: BackendState, gpus: Vec<GpuSnapshot>) -> Self {
        Sample { format: TRACE_FORMAT, at_ms, backend, gpus }
    }

    /// A sample with no GPU data, and why.
    pub fn unavailable(at_ms: i64, reason: String) -> Self {
        Sample::new(at_ms, BackendState::Unavailable { reason }, Vec::new())
    }
}

/// Whether a backend could talk to the driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BackendState {
    /// The driver answered.
    Ok,
    /// No driver, no library, no permission, a hung NVML thread, an exhausted trace: no GPU
    /// data this tick. Usage cannot be measured, which the daemon reports.
    Unavailable {
        /// Why, for operators.
        reason: String,
    },
}

/// Health of one GPU in a sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GpuState {
    /// Answering.
    Ok,
    /// NVML says the GPU fell off the bus (`NVML_ERROR_GPU_IS_LOST`).
    Lost,
}

/// One GPU at one instant. `None` means NVML does not support the field on this GPU (or, for
/// a lost GPU, could not read it); it never means zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSnapshot {
    /// NVML index.
    pub index: u32,
    /// NVML UUID (`GPU-…`); for a lost GPU, the last UUID seen at this index.
    pub uuid: String,
    /// Marketing name (`NVIDIA H100 80GB HBM3`), which the peak-FLOP/s table is keyed on.
    pub name: String,
    /// Health.
    pub state: GpuState,
    /// PCI bus id (`00000000:17:00.0`).
    #[serde(default)]
    pub pci_bus_id: Option<String>,
    /// PCI vendor and device ID (`10de:2330`): the model, as the PCI bus names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
    /// Percent of the last sample period in which a kernel ran (coarse: any SM busy counts).
    #[serde(default)]
    pub utilization_gpu_pct: Option<u32>,
    /// Percent of the period the memory controller was busy.
    #[serde(default)]
    pub utilization_memory_pct: Option<u32>,
    /// Device memory in use, bytes.
    #[serde(default)]
    pub memory_used_bytes: Option<u64>,
    /// Device memory, bytes.
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    /// Current SM clock, MHz.
    #[serde(default)]
    pub sm_clock_mhz: Option<u32>,
    /// Maximum SM clock, MHz (for the SM-count fallback of the peak estimate).
    #[serde(default)]
    pub max_sm_clock_mhz: Option<u32>,
    /// Board power draw, milliwatts.
    #[serde(default)]
    pub power_mw: Option<u32>,
    /// CUDA compute capability `[major, minor]`.
    #[serde(default)]
    pub compute_capability: Option<[i32; 2]>,
    /// Streaming multiprocessors.
    #[serde(default)]
    pub sm_count: Option<u32>,
    /// Compute mode.
    #[serde(default)]
    pub compute_mode: Option<ComputeMode>,
    /// Processes holding a compute context.
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
    /// Per-process utilization samples newer than the previous sample's; `None` when the GPU
    /// does not support them (then usage is split between processes evenly).
    #[serde(default)]
    pub process_utilization: Option<Vec<ProcessUtilization>>,
    /// GPM "any tensor pipe active" percent over the interval since the previous sample;
    /// `None` without GPM (pre-Hopper) or on the first sample after start. The same as
    /// `gpm.any_tensor`; kept because format-1 traces have only this.
    #[serde(default)]
    pub gpm_tensor_activity_pct: Option<f64>,
    /// Every GPM pipe over the interval since the previous sample (format 2); `None` without
    /// GPM, on the first sample after start, or in a format-1 trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpm: Option<GpmPipes>,
    /// Whether GPM is supported; `None` if unknown.
    #[serde(default)]
    pub gpm_supported: Option<bool>,
    /// Whether MIG mode is on; `None` where MIG does not exist.
    #[serde(default)]
    pub mig_enabled: Option<bool>,
    /// MIG instances (empty unless MIG is on).
    #[serde(default)]
    pub mig_instances: Vec<MigInstance>,
    /// Active vGPU instances (host with NVIDIA's vGPU manager; empty elsewhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vgpus: Vec<VgpuInstance>,
}

/// The VM a vGPU instance belongs to, as NVML names it (`nvmlVgpuInstanceGetVmID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VgpuVm {
    /// The VM's UUID (KVM: the libvirt domain's UUID).
    Uuid(String),
    /// The hypervisor's domain name or id.
    Domain(String),
}

/// One active vGPU instance (a mediated device or SR-IOV VF given to a VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VgpuInstance {
    /// The vGPU's UUID.
    pub uuid: String,
    /// Its VM.
    pub vm: VgpuVm,
    /// The mediated device's UUID (KVM), as in the domain's `<hostdev type='mdev'>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev_uuid: Option<String>,
    /// The GPU instance of a MIG-backed vGPU; `None` for a time-sliced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
}

impl GpuSnapshot {
    /// A snapshot with only identity filled in: what is known of a GPU that cannot be read.
    pub fn bare(index: u32, uuid: String, name: String, state: GpuState) -> Self {
        GpuSnapshot {
            index,
            uuid,
            name,
            state,
            pci_bus_id: None,
            pci_id: None,
            utilization_gpu_pct: None,
            utilization_memory_pct: None,
            memory_used_bytes: None,
            memory_total_bytes: None,
            sm_clock_mhz: None,
            max_sm_clock_mhz: None,
            power_mw: None,
            compute_capability: None,
            sm_count: None,
            compute_mode: None,
            processes: Vec::new(),
            process_utilization: None,
            gpm_tensor_activity_pct: None,
            gpm: None,
            gpm_supported: None,
            mig_enabled: None,
            mig_instances: Vec::new(),
            vgpus: Vec::new(),
        }
    }
}

/// A process with a compute context on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Host pid (as NVML reports it: the init namespace's).
    pub pid: u32,
    /// Device memory it holds, bytes; `None` where the driver cannot tell.
    #[serde(default)]
    pub used_memory_bytes: Option<u64>,
    /// MIG GPU instance it runs in.
    #[serde(default)]
    pub gpu_instance_id: Option<u32>,
}

/// A per-process utilization sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUtilization {
    /// Host pid.
    pub pid: u32,
    /// CPU timestamp of the sample, µs.
    pub timestamp_us: u64,
    /// SM utilization percent.
    pub sm_util_pct: u32,
    /// Memory utilization percent.
    pub mem_util_pct: u32,
}

/// One MIG device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigInstance {
    /// Index under its parent GPU.
    pub index: u32,
    /// MIG UUID (`MIG-…`).
    pub uuid: String,
    /// SMs in this instance.
    #[serde(default)]
    pub sm_count: Option<u32>,
    /// Its memory, bytes.
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    /// The GPU instance id (what processes' `gpu_instance_id` names), learnt from the
    /// processes running in it; `None` while it runs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
    /// GPM pipes of this GPU instance (`nvmlGpmMigSampleGet`) since the previous sample;
    /// percent of the instance's own capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpm: Option<GpmPipes>,
}

/// GPM metrics over one interval, each a percent (0–100) of the interval and of the GPU's
/// (or GPU instance's) capacity; `None` for one the driver did not report. Names follow
/// `nvmlGpmMetricId_t` (`NVML_GPM_METRIC_HMMA_TENSOR_UTIL` → `hmma_tensor`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpmPipes {
    /// SMs with at least one warp assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_util: Option<f64>,
    /// Warps resident vs the maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_occupancy: Option<f64>,
    /// Any tensor pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any_tensor: Option<f64>,
    /// HMMA tensor pipe: TF32, FP16, BF16, FP8 (Hopper+), FP6/FP4 (Blackwell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmma_tensor: Option<f64>,
    /// IMMA tensor pipe: INT8 (INT4 before Hopper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imma_tensor: Option<f64>,
    /// DFMA tensor pipe: FP64 matrix operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dfma_tensor: Option<f64>,
    /// FP64 CUDA cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp64: Option<f64>,
    /// FP32 CUDA cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp32: Option<f64>,
    /// FP16 CUDA cores (non-tensor half precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16: Option<f64>,
    /// Integer pipe (recorded, not counted: mostly address and index arithmetic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integer: Option<f64>,
    /// DRAM bandwidth (recorded, not counted: moving bytes is not an operation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dram_bw: Option<f64>,
}

/// Why a compute-mode call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// The backend cannot reach a driver.
    #[error("GPU backend unavailable: {0}")]
    Unavailable(String),
    /// No GPU with this UUID.
    #[error("no GPU {0}")]
    NoSuchGpu(String),
    /// The GPU fell off the bus.
    #[error("GPU {0} is lost")]
    Lost(String),
    /// The driver refused (not supported, no permission, …).
    #[error("NVML: {0}")]
    Driver(String),
}

/// A source of GPU samples and the compute-mode switch.
///
/// Calls block until the driver answers (NVML has no async API). Call them from a dedicated
/// thread or `spawn_blocking`, never from a reactor thread: [`sampler::spawn`] does that.
pub trait GpuBackend: Send + std::fmt::Debug {
    /// Every GPU, now. Never fails: trouble is a [`BackendState`] or [`GpuState`].
    fn sample(&mut self) -> Sample;
    /// The compute mode of the GPU with this UUID.
    fn compute_mode(&mut self, uuid: &str) -> Result<ComputeMode, GpuError>;
    /// Sets the compute mode of the GPU with this UUID.
    fn set_compute_mode(&mut self, uuid: &str, mode: ComputeMode) -> Result<(), GpuError>;
}

/// Unix milliseconds now.
pub(crate) fn unix_ms_now() -> i64 {
    unix_ms(&kycd_protocol::clock::SystemClock)
}

/// Unix milliseconds by `clock`.
pub(crate) fn unix_ms(clock: &dyn kycd_protocol::clock::Clock) -> i64 {
    clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
