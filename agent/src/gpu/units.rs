//! The units a GPU's operations are measured on, and how a unit's processes share them.
//!
//! A unit is what has its own counters: a whole GPU, or, on a GPU in MIG mode, each GPU
//! instance that runs processes and whose GPM counters could be read
//! (`nvmlGpmMigSampleGet`). A MIG instance's peaks are its GPU's × its share of the SMs; its
//! activity is a percent of its own capacity. Processes on a MIG GPU whose instance has no
//! counters fall back to the whole GPU's unit.
//!
//! vGPU instances are users of units too: a time-sliced vGPU of the whole GPU's, a MIG-backed
//! one of its GPU instance's when the sampler knows which MIG device that instance is (the
//! instance runs a host process too). Otherwise a MIG-backed vGPU is a unit of its own with no
//! estimate: NVML's safe API (nvml-wrapper 0.13) names no MIG device's GPU instance id, so
//! neither its counters nor its share of the peaks can be told.

use std::collections::BTreeMap;

use super::estimate::{self, Rate, Reading};
use super::peaks::Peaks;
use super::{GpuSnapshot, VgpuVm};

/// One unit of a GPU in one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// The GPU's UUID, or the MIG instance's (`MIG-…`).
    pub uuid: String,
    /// Its estimated rate; `None` when nothing was measured or the peak is unknown.
    pub rate: Option<Rate>,
    /// Its dense BF16 peak, FLOP/s (what usage windows sum as `peak_flops`).
    pub peak_flops: Option<f64>,
    /// The processes running on it.
    pub pids: Vec<u32>,
    /// The VMs of the vGPU instances running on it.
    pub vgpus: Vec<VgpuVm>,
}

/// The units of `gpu`, each with its processes; every process of the GPU is in exactly one.
/// `device_rate` is the whole GPU's estimate (the sampler has made it already).
pub fn units(gpu: &GpuSnapshot, peaks: &Peaks, device_rate: Option<Rate>) -> Vec<Unit> {
    let mut rest: Vec<u32> = gpu.processes.iter().map(|p| p.pid).collect();
    let mut out = Vec::new();
    // GPU instances whose vGPUs have a unit above (a MIG device known by its processes).
    let mut placed_gis: Vec<u32> = Vec::new();
    if gpu.mig_enabled == Some(true) {
        let gpu_sms = peaks.sm_count.or(gpu.sm_count).filter(|n| *n > 0);
        for mig in &gpu.mig_instances {
            let (Some(gi), Some(gpm)) = (mig.gpu_instance_id, mig.gpm.as_ref()) else { continue };
            let pids: Vec<u32> =
                gpu.processes.iter().filter(|p| p.gpu_instance_id == Some(gi)).map(|p| p.pid).collect();
            let vgpus: Vec<VgpuVm> =
                gpu.vgpus.iter().filter(|v| v.gpu_instance_id == Some(gi)).map(|v| v.vm.clone()).collect();
            if pids.is_empty() && vgpus.is_empty() {
                continue;
            }
            if !vgpus.is_empty() {
                placed_gis.push(gi);
            }
            rest.retain(|p| !pids.contains(p));
            // Without SM counts the instance's share of the peaks is unknown: no estimate.
            let share = match (mig.sm_count, gpu_sms) {
                (Some(sms), Some(total)) => Some((f64::from(sms) / f64::from(total)).min(1.0)),
                _ => None,
            };
            let rates = share.map(|k| peaks.rates.scaled(k));
            let reading = Reading {
                gpm: Some(gpm),
                sm_clock_mhz: gpu.sm_clock_mhz,
                max_sm_clock_mhz: gpu.max_sm_clock_mhz,
                ..Reading::default()
            };
            out.push(Unit {
                uuid: mig.uuid.clone(),
                rate: rates.and_then(|r| estimate::rate(&r, &reading)),
                peak_flops: rates.and_then(|r| r.bf16),
                pids,
                vgpus,
            });
        }
    }
    // Time-sliced vGPUs share the whole GPU; MIG-backed ones not placed above are units of
    // their own, with no estimate (see the module docs).
    let mut whole = Vec::new();
    for v in &gpu.vgpus {
        match v.gpu_instance_id {
            None => whole.push(v.vm.clone()),
            Some(gi) if !placed_gis.contains(&gi) => out.push(Unit {
                uuid: v.uuid.clone(),
                rate: None,
                peak_flops: None,
                pids: Vec::new(),
                vgpus: vec![v.vm.clone()],
            }),
            Some(_) => {}
        }
    }
    out.push(Unit {
        uuid: gpu.uuid.clone(),
        rate: device_rate,
        peak_flops: peaks.bf16(),
        pids: rest,
        vgpus: whole,
    });
    out
}

/// `(pid, share of the unit's activity)` for each of `pids` (deduplicated), from the GPU's
/// per-process SM utilization samples, or evenly when there are none; shares sum to 1 when
/// there are processes.
pub fn process_shares(pids: &[u32], gpu: &GpuSnapshot) -> Vec<(u32, f64)> {
    let mut pids = pids.to_vec();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::peaks::PeakTable;
    use crate::gpu::{GpmPipes, GpuProcess, GpuState, MigInstance};

    fn process(pid: u32, gi: Option<u32>) -> GpuProcess {
        GpuProcess { pid, used_memory_bytes: None, gpu_instance_id: gi }
    }

    #[test]
    fn mig_instances_with_counters_are_units_of_their_own() {
        let mut gpu = GpuSnapshot::bare(0, "GPU-0".into(), "NVIDIA H100 80GB HBM3".into(), GpuState::Ok);
        gpu.mig_enabled = Some(true);
        gpu.sm_clock_mhz = Some(1980);
        gpu.max_sm_clock_mhz = Some(1980);
        gpu.processes =
            vec![process(10, Some(1)), process(11, Some(1)), process(20, Some(2)), process(30, None)];
        let instance = |index: u32, gi: Option<u32>, sms: u32, gpm: Option<GpmPipes>| MigInstance {
            index,
            uuid: format!("MIG-{index}"),
            sm_count: Some(sms),
            memory_total_bytes: None,
            gpu_instance_id: gi,
            gpm,
        };
        let busy = GpmPipes { hmma_tensor: Some(50.0), ..GpmPipes::default() };
        gpu.mig_instances = vec![instance(0, Some(1), 66, Some(busy)), instance(1, Some(2), 33, None)];
        let peaks = PeakTable::builtin().unwrap().peaks(&gpu.name, None, None, None);
        let device_rate = estimate::rate(&peaks.rates, &Reading::of(&gpu));
        let units = units(&gpu, &peaks, device_rate);
        assert_eq!(units.len(), 2, "{units:?}");
        let mig = &units[0];
        assert_eq!((mig.uuid.as_str(), mig.pids.as_slice()), ("MIG-0", &[10, 11][..]));
        // Half the SMs, half busy on HMMA at full clock: a quarter of the GPU's BF16 peak.
        let point = mig.rate.unwrap().ops_per_s.point;
        assert!((point - 989.4e12 / 4.0).abs() < 1e3, "{point}");
        assert_eq!(mig.peak_flops, Some(989.4e12 / 2.0));
        // The instance without counters and the process outside any instance: the GPU's unit.
        assert_eq!((units[1].uuid.as_str(), units[1].pids.as_slice()), ("GPU-0", &[20, 30][..]));
        assert_eq!(units[1].rate, None, "no device-wide reading either");
    }

    #[test]
    fn every_mig_backed_vgpu_of_a_vm_is_a_unit() {
        let mut gpu = GpuSnapshot::bare(0, "GPU-0".into(), "NVIDIA H100 80GB HBM3".into(), GpuState::Ok);
        gpu.mig_enabled = Some(true);
        let vm = crate::gpu::VgpuVm::Uuid("6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10".into());
        let vgpu = |uuid: &str, gi: u32| crate::gpu::VgpuInstance {
            uuid: uuid.into(),
            vm: vm.clone(),
            mdev_uuid: None,
            gpu_instance_id: Some(gi),
        };
        gpu.vgpus = vec![
            vgpu("V1", 1),
            vgpu("V2", 2),
            crate::gpu::VgpuInstance { gpu_instance_id: None, ..vgpu("V3", 0) },
        ];
        let peaks = PeakTable::builtin().unwrap().peaks(&gpu.name, None, None, None);
        let units = units(&gpu, &peaks, None);
        let names: Vec<(&str, usize)> = units.iter().map(|u| (u.uuid.as_str(), u.vgpus.len())).collect();
        // Both MIG-backed vGPUs of the one VM count (no estimate: their instances are not
        // known by id); the time-sliced one shares the whole GPU's unit.
        assert_eq!(names, [("V1", 1), ("V2", 1), ("GPU-0", 1)]);
        assert!(units[..2].iter().all(|u| u.rate.is_none() && u.peak_flops.is_none()));
    }

    #[test]
    fn shares_follow_sm_utilization_else_are_even() {
        let mut gpu = GpuSnapshot::bare(0, "GPU-0".into(), "X".into(), GpuState::Ok);
        assert_eq!(process_shares(&[2, 1, 2], &gpu), vec![(1, 0.5), (2, 0.5)]);
        gpu.process_utilization = Some(vec![
            crate::gpu::ProcessUtilization { pid: 1, timestamp_us: 1, sm_util_pct: 30, mem_util_pct: 0 },
            crate::gpu::ProcessUtilization { pid: 2, timestamp_us: 1, sm_util_pct: 90, mem_util_pct: 0 },
        ]);
        assert_eq!(process_shares(&[1, 2], &gpu), vec![(1, 0.25), (2, 0.75)]);
        assert!(process_shares(&[], &gpu).is_empty());
    }
}
