//! One sample of every GPU: static facts read once per NVML session, then per tick the
//! utilisation, clocks, power, memory, processes, MIG instances and every GPM pipe (per GPU,
//! and per MIG GPU instance that runs processes).

use std::collections::HashMap;

use nvml_wrapper::enum_wrappers::device::Clock;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, GpmSample, Nvml};

use super::thread::{from_nvml_mode, UNINITIALIZED};
use crate::gpu::{
    BackendState, GpmPipes, GpuProcess, GpuSnapshot, GpuState, MigInstance, ProcessUtilization, Sample,
    VgpuInstance, VgpuVm,
};

/// What the thread remembers between samples of one initialised NVML.
pub(super) struct Memory<'n> {
    /// Previous GPM sample per GPU UUID, and per (GPU UUID, GPU instance id) for MIG
    /// instances (`None`: the whole GPU): GPM metrics are differences of two samples.
    gpm: HashMap<(String, Option<u32>), GpmSample<'n>>,
    /// Newest per-process utilization timestamp seen per GPU UUID.
    last_process_sample_us: HashMap<String, u64>,
    /// What does not change while NVML stays initialised (the index → GPU mapping is fixed
    /// for an NVML session), read once: fewer driver calls per tick, and a GPU that is lost
    /// can still be named.
    statics: HashMap<u32, Static>,
}

impl Memory<'_> {
    /// Nothing remembered yet (a fresh NVML session).
    pub(super) fn new() -> Self {
        Memory { gpm: HashMap::new(), last_process_sample_us: HashMap::new(), statics: HashMap::new() }
    }
}

pub(super) fn sample_all<'n>(nvml: &'n Nvml, at_ms: i64, memory: &mut Memory<'n>) -> Sample {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(NvmlError::Uninitialized) => return Sample::unavailable(at_ms, UNINITIALIZED.into()),
        Err(e) => return Sample::unavailable(at_ms, format!("nvmlDeviceGetCount: {e}")),
    };
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        gpus.push(sample_gpu(nvml, index, memory));
    }
    Sample::new(at_ms, BackendState::Ok, gpus)
}

/// Field reader: `NotSupported` and friends become `None`; `GpuLost` also flags the GPU.
struct Reader {
    lost: bool,
}

impl Reader {
    fn get<T>(&mut self, what: &'static str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                None
            }
            Err(NvmlError::NotSupported | NvmlError::NotFound) => None,
            Err(e) => {
                tracing::debug!(field = what, error = %e, "NVML field unreadable");
                None
            }
        }
    }
}

/// Per-GPU facts read once per NVML session.
#[derive(Debug, Clone, Default)]
struct Static {
    uuid: String,
    name: String,
    pci_bus_id: Option<String>,
    pci_id: Option<String>,
    compute_capability: Option<[i32; 2]>,
    sm_count: Option<u32>,
    max_sm_clock_mhz: Option<u32>,
    gpm_supported: Option<bool>,
}

fn read_static(device: &Device<'_>, r: &mut Reader) -> Option<Static> {
    let pci = r.get("pci_info", device.pci_info());
    let st = Static {
        uuid: r.get("uuid", device.uuid())?,
        name: r.get("name", device.name())?,
        // pciDeviceId is the device ID in the upper 16 bits, the vendor's in the lower.
        pci_id: pci
            .as_ref()
            .map(|p| format!("{:04x}:{:04x}", p.pci_device_id & 0xffff, p.pci_device_id >> 16)),
        pci_bus_id: pci.map(|p| p.bus_id),
        compute_capability: r
            .get("compute_capability", device.cuda_compute_capability())
            .map(|c| [c.major, c.minor]),
        sm_count: r.get("attributes", device.attributes()).map(|a| a.multiprocessor_count),
        max_sm_clock_mhz: r.get("max_sm_clock", device.max_clock_info(Clock::SM)),
        gpm_supported: r.get("gpm_support", device.gpm_support()),
    };
    (!r.lost).then_some(st)
}

fn sample_gpu<'n>(nvml: &'n Nvml, index: u32, memory: &mut Memory<'n>) -> GpuSnapshot {
    let known = memory.statics.get(&index).cloned();
    let lost = |memory: &mut Memory<'n>, st: Option<Static>| {
        let st = st.unwrap_or_default();
        tracing::warn!(index, uuid = %st.uuid, "GPU lost");
        memory.gpm.retain(|(uuid, _), _| *uuid != st.uuid);
        GpuSnapshot::bare(index, st.uuid, st.name, GpuState::Lost)
    };
    let device = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(index, error = %e, "no handle for GPU");
            return lost(memory, known);
        }
    };
    let mut r = Reader { lost: false };
    let st = match known {
        Some(st) => st,
        None => match read_static(&device, &mut r) {
            Some(st) => {
                memory.statics.insert(index, st.clone());
                st
            }
            None => return lost(memory, None),
        },
    };
    let uuid = st.uuid.clone();
    let mut snap = GpuSnapshot::bare(index, uuid.clone(), st.name.clone(), GpuState::Ok);
    snap.pci_bus_id = st.pci_bus_id.clone();
    snap.pci_id = st.pci_id.clone();
    snap.compute_capability = st.compute_capability;
    snap.sm_count = st.sm_count;
    snap.max_sm_clock_mhz = st.max_sm_clock_mhz;
    if let Some(u) = r.get("utilization", device.utilization_rates()) {
        snap.utilization_gpu_pct = Some(u.gpu);
        snap.utilization_memory_pct = Some(u.memory);
    }
    if let Some(m) = r.get("memory", device.memory_info()) {
        snap.memory_used_bytes = Some(m.used);
        snap.memory_total_bytes = Some(m.total);
    }
    snap.sm_clock_mhz = r.get("sm_clock", device.clock_info(Clock::SM));
    snap.power_mw = r.get("power", device.power_usage());
    snap.compute_mode = r.get("compute_mode", device.compute_mode()).map(from_nvml_mode);
    snap.processes = r
        .get("processes", device.running_compute_processes())
        .unwrap_or_default()
        .into_iter()
        .map(|p| GpuProcess {
            pid: p.pid,
            used_memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            },
            gpu_instance_id: p.gpu_instance_id,
        })
        .collect();
    snap.process_utilization = process_utilization(&device, &uuid, memory, &mut r);
    snap.mig_enabled = r.get("mig_mode", device.mig_mode()).map(|m| m.current == 1);
    if snap.mig_enabled == Some(true) {
        snap.mig_instances = mig_instances(&device, &mut r);
    }
    snap.vgpus = vgpus(&device, &mut r);
    snap.gpm_supported = st.gpm_supported;
    if st.gpm_supported == Some(true) {
        snap.gpm = gpm_pipes(nvml, &device, (&uuid, None), memory, &mut r);
        snap.gpm_tensor_activity_pct = snap.gpm.as_ref().and_then(|g| g.any_tensor);
        for mig in &mut snap.mig_instances {
            if let Some(gi) = mig.gpu_instance_id {
                mig.gpm = gpm_pipes(nvml, &device, (&uuid, Some(gi)), memory, &mut r);
            }
        }
        // Instances that ran nothing this time start afresh when they do.
        let live: Vec<u32> = snap.mig_instances.iter().filter_map(|m| m.gpu_instance_id).collect();
        memory.gpm.retain(|(u, gi), _| *u != uuid || gi.is_none_or(|gi| live.contains(&gi)));
    }
    if r.lost {
        return lost(memory, Some(st));
    }
    snap
}

fn process_utilization(
    device: &Device<'_>,
    uuid: &str,
    memory: &mut Memory<'_>,
    r: &mut Reader,
) -> Option<Vec<ProcessUtilization>> {
    let last = memory.last_process_sample_us.get(uuid).copied().unwrap_or(0);
    let samples = match device.process_utilization_stats(last) {
        Ok(s) => s,
        // NVML answers NOT_FOUND when there is no sample newer than `last`.
        Err(NvmlError::NotFound) => Vec::new(),
        Err(e) => {
            r.get::<()>("process_utilization", Err(e));
            return None;
        }
    };
    if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
        memory.last_process_sample_us.insert(uuid.to_owned(), newest.max(last));
    }
    Some(
        samples
            .into_iter()
            .map(|s| ProcessUtilization {
                pid: s.pid,
                timestamp_us: s.timestamp,
                sm_util_pct: s.sm_util,
                mem_util_pct: s.mem_util,
            })
            .collect(),
    )
}

/// NVML's "no GPU instance" (`INVALID_GPU_INSTANCE_ID`) for a vGPU that is not MIG-backed.
const NO_GPU_INSTANCE: u32 = 0xFFFF_FFFF;

/// The GPU's active vGPU instances; none where NVML has no vGPU manager (or no such call).
fn vgpus(device: &Device<'_>, r: &mut Reader) -> Vec<VgpuInstance> {
    r.get("vgpus", device.active_vgpus())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| {
            let vm = match r.get("vgpu_vm_id", v.vm_id())? {
                nvml_wrapper::enum_wrappers::vgpu::VmId::Uuid(u) => VgpuVm::Uuid(u.to_ascii_lowercase()),
                nvml_wrapper::enum_wrappers::vgpu::VmId::Domain(d) => VgpuVm::Domain(d),
            };
            Some(VgpuInstance {
                uuid: r.get("vgpu_uuid", v.uuid())?,
                vm,
                mdev_uuid: r.get("vgpu_mdev_uuid", v.mdev_uuid()),
                gpu_instance_id: r
                    .get("vgpu_gpu_instance", v.gpu_instance_id())
                    .filter(|gi| *gi != NO_GPU_INSTANCE),
            })
        })
        .collect()
}

fn mig_instances(device: &Device<'_>, r: &mut Reader) -> Vec<MigInstance> {
    let max = r.get("mig_device_count", device.mig_device_count()).unwrap_or(0);
    (0..max)
        .filter_map(|index| {
            // Slots without an instance answer NOT_FOUND.
            let mig = device.mig_device_by_index(index).ok()?;
            // NVML has no safe call for a MIG device's GPU instance id; the processes running
            // in it carry it, and an instance without processes needs no attribution.
            let gpu_instance_id = r
                .get("mig_processes", mig.running_compute_processes())
                .unwrap_or_default()
                .into_iter()
                .find_map(|p| p.gpu_instance_id);
            Some(MigInstance {
                index,
                uuid: r.get("mig_uuid", mig.uuid())?,
                sm_count: r.get("mig_attributes", mig.attributes()).map(|a| a.multiprocessor_count),
                memory_total_bytes: r.get("mig_memory", mig.memory_info()).map(|m| m.total),
                gpu_instance_id,
                gpm: None,
            })
        })
        .collect()
}

/// The GPM metrics kycd reads, in the order [`pipes_from`] assigns them.
const PIPES: [GpmMetricId; 11] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::HmmaTensorUtil,
    GpmMetricId::ImmaTensorUtil,
    GpmMetricId::DfmaTensorUtil,
    GpmMetricId::Fp64Util,
    GpmMetricId::Fp32Util,
    GpmMetricId::Fp16Util,
    GpmMetricId::IntegerUtil,
    GpmMetricId::DramBwUtil,
];

/// Every GPM pipe since the previous sample of the GPU (`gi` `None`) or of one of its MIG GPU
/// instances; `None` on the first sample or when GPM cannot be read.
fn gpm_pipes<'n>(
    nvml: &'n Nvml,
    device: &Device<'n>,
    (uuid, gi): (&str, Option<u32>),
    memory: &mut Memory<'n>,
    r: &mut Reader,
) -> Option<GpmPipes> {
    let key = (uuid.to_owned(), gi);
    let taken = match gi {
        None => device.gpm_sample(),
        Some(gi) => device.gpm_mig_sample(gi),
    };
    let Some(now) = r.get("gpm_sample", taken) else {
        memory.gpm.remove(&key);
        return None;
    };
    let pipes = memory.gpm.remove(&key).and_then(|before| {
        let results =
            r.get("gpm_metrics", nvml_wrapper::gpm::gpm_metrics_get(nvml, &before, &now, &PIPES))?;
        let pipes =
            pipes_from(results.into_iter().map(|m| m.ok().map(|m| m.value).filter(|v| v.is_finite())));
        // Every metric unsupported is no GPM reading, not a reading of nothing.
        (pipes != GpmPipes::default()).then_some(pipes)
    });
    memory.gpm.insert(key, now);
    pipes
}

/// Assigns metric values, in [`PIPES`] order, to their fields.
fn pipes_from(mut values: impl Iterator<Item = Option<f64>>) -> GpmPipes {
    let mut next = || values.next().flatten();
    GpmPipes {
        sm_util: next(),
        sm_occupancy: next(),
        any_tensor: next(),
        hmma_tensor: next(),
        imma_tensor: next(),
        dfma_tensor: next(),
        fp64: next(),
        fp32: next(),
        fp16: next(),
        integer: next(),
        dram_bw: next(),
    }
}
