//! GPU sampling against the fake `libnvidia-ml.so` (`tests/fake-nvml`), loaded through the
//! same `Nvml::builder().lib_path(..)` call a real host makes.
//!
//! The fake library is built once per test process by running `cargo build -p kycd-fake-nvml`
//! (a cdylib member is not built by `cargo test` itself). Each test copies it, with its own
//! `scenario.json`, into a temporary directory: separate files are separate `dlopen`s, so
//! tests running in parallel do not share the fake's state, and no environment variable is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kycd::discovery::workload::WorkloadId;
use kycd::enforce::GpuComputeModeEnforcer;
use kycd::gpu::attribution::ProcessOwner;
use kycd::gpu::sampler::{GpuSampler, SamplerOptions, TenantInfo, TenantMap, TickReport};
use kycd::gpu::usage::TrainingRule;
use kycd::gpu::{
    BackendState, ComputeMode, GpuBackend, GpuError, GpuState, NvmlBackend, NvmlOptions, Sample,
};
use kycd_protocol::{EstimationMethod, UsageWindow};
use serde_json::json;

use kycd_test_support::fake_nvml::FakeNvml;
use kycd_test_support::host as host_support;

const H100: &str = "NVIDIA H100 80GB HBM3";
const H100_PEAK: f64 = 989.4e12;
const A100_PEAK: f64 = 312e12;
/// The fake's SM clock ÷ max SM clock (1,755 of 1,980 MHz): every estimate is clock-scaled.
const CLOCK: f64 = 1755.0 / 1980.0;
/// A multiple of 60 s, so windows start at T0.
const T0_MS: i64 = 1_764_000_000_000;

/// The fake library with a scenario and a fake /proc, and the sampler over it.
struct FakeHost {
    fake: FakeNvml,
}

impl FakeHost {
    fn new(scenario: serde_json::Value) -> Self {
        FakeHost { fake: FakeNvml::new(scenario) }
    }

    fn dir(&self) -> &Path {
        self.fake.dir.path()
    }

    fn library(&self) -> PathBuf {
        self.fake.library()
    }

    fn backend(&self) -> NvmlBackend {
        NvmlBackend::start(NvmlOptions { library: self.library(), ..Default::default() }).unwrap()
    }

    fn proc_root(&self) -> PathBuf {
        self.fake.proc_root()
    }

    fn process(&self, pid: u32, cgroup: &str) {
        self.fake.process(pid, cgroup);
    }

    fn sampler(&self, backend: Box<dyn GpuBackend>, training: TrainingRule) -> GpuSampler {
        let options = SamplerOptions {
            proc_root: self.proc_root(),
            cgroup_roots: vec!["machine.slice".into(), "user.slice".into(), "kubepods.slice".into()],
            training,
            ..Default::default()
        };
        GpuSampler::new(backend, &options).unwrap()
    }
}

/// The fake NVML backend with sample times replaced by T0 + k seconds, so tick lengths are
/// exact; everything else comes from the real NVML path.
#[derive(Debug)]
struct Clocked<B> {
    inner: B,
    k: i64,
}

impl<B: GpuBackend> GpuBackend for Clocked<B> {
    fn sample(&mut self) -> Sample {
        let mut s = self.inner.sample();
        s.at_ms = T0_MS + self.k * 1000;
        self.k += 1;
        s
    }
    fn compute_mode(&mut self, uuid: &str) -> Result<ComputeMode, GpuError> {
        self.inner.compute_mode(uuid)
    }
    fn set_compute_mode(&mut self, uuid: &str, mode: ComputeMode) -> Result<(), GpuError> {
        self.inner.set_compute_mode(uuid, mode)
    }
}

fn clocked(host: &FakeHost) -> Box<dyn GpuBackend> {
    Box::new(Clocked { inner: host.backend(), k: 0 })
}

/// Runs `ticks` ticks (plus the priming one) and flushes; returns every report and window.
fn run(sampler: &mut GpuSampler, tenants: &TenantMap, ticks: usize) -> (Vec<TickReport>, Vec<UsageWindow>) {
    let mut reports = Vec::new();
    let mut windows = Vec::new();
    for _ in 0..=ticks {
        let mut r = sampler.tick(tenants);
        windows.append(&mut r.windows);
        reports.push(r);
    }
    windows.extend(sampler.flush());
    (reports, windows)
}

fn gpu(i: usize, name: &str, ticks: serde_json::Value) -> serde_json::Value {
    json!({"name": name, "uuid": format!("GPU-{i:08}"), "ticks": ticks})
}

fn proc(pid: u32, sm: u32) -> serde_json::Value {
    json!({"pid": pid, "used_mib": 1024, "sm_util": sm})
}

fn window<'a>(windows: &'a [UsageWindow], workload: &str) -> &'a UsageWindow {
    let found: Vec<_> = windows.iter().filter(|w| w.workload == workload).collect();
    assert_eq!(found.len(), 1, "windows for {workload}: {windows:#?}");
    found[0]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn tenant(name: &str, foreign: bool) -> TenantInfo {
    TenantInfo { tenant: name.into(), foreign_person: foreign, exclusive_gpu: false }
}

#[test]
fn eight_gpus_two_tenants_and_an_unattributed_process() {
    // GPUs 0-3: tenant A's VM, tensor activity alternating 50 % / 70 % by tick.
    // GPUs 4-6: tenant B's user; on GPU 6 it shares with a process that has exited (no /proc
    // entry) by SM utilization 60 : 20. GPU 7: a pod with no attestation.
    let mut gpus = Vec::new();
    for i in 0..4u32 {
        let p = proc(1000 + i, 90);
        gpus.push(gpu(
            i as usize,
            H100,
            json!([
                {"util": 95, "tensor": 50.0, "processes": [p]},
                {"util": 95, "tensor": 70.0, "processes": [p]}
            ]),
        ));
    }
    for i in 4..6u32 {
        gpus.push(gpu(
            i as usize,
            H100,
            json!([{"util": 60, "tensor": 30.0, "processes": [proc(2000 + i, 60)]}]),
        ));
    }
    gpus.push(gpu(
        6,
        H100,
        json!([{"util": 80, "tensor": 30.0, "processes": [proc(2006, 60), proc(9999, 20)]}]),
    ));
    gpus.push(gpu(7, H100, json!([{"util": 20, "tensor": 10.0, "processes": [proc(3001, 20)]}])));
    let host = FakeHost::new(json!({"gpus": gpus}));
    for i in 0..4 {
        host.process(1000 + i, "/machine.slice/machine-qemu\\x2d1\\x2dvm\\x2da.scope/libvirt/vcpu0");
    }
    for i in 4..7 {
        host.process(2000 + i, "/user.slice/user-2000.slice/session-1.scope");
    }
    host.process(3001, "/kubepods.slice/pod-x.slice/cri-1.scope");

    let vm_a: WorkloadId = "libvirt_domain:vm-a".parse().unwrap();
    let user_b: WorkloadId = "unix_user:2000".parse().unwrap();
    let tenants: TenantMap = [(vm_a, tenant("tenant-a", true)), (user_b, tenant("tenant-b", false))].into();
    let rule = TrainingRule { min_gpus: 4, min_activity: 0.45, min_duration: Duration::from_secs(30) };
    let mut sampler = host.sampler(clocked(&host), rule);
    let (reports, windows) = run(&mut sampler, &tenants, 60);

    // Every sample saw 8 healthy GPUs with the scenario's static data.
    for r in &reports {
        assert_eq!(r.sample.backend, BackendState::Ok);
        assert_eq!(r.sample.gpus.len(), 8);
        let g = &r.sample.gpus[0];
        assert_eq!((g.name.as_str(), g.sm_count, g.max_sm_clock_mhz), (H100, Some(132), Some(1980)));
        assert_eq!(g.compute_capability, Some([9, 0]));
        assert_eq!(g.memory_used_bytes, Some(1024 << 20));
    }
    assert_eq!(reports[0].dt, Duration::ZERO, "the first sample only primes");
    assert_eq!(reports[0].sample.gpus[0].gpm_tensor_activity_pct, None);
    assert_eq!(reports[1].sample.gpus[0].gpm_tensor_activity_pct, Some(70.0));
    assert_eq!(reports[2].sample.gpus[0].gpm_tensor_activity_pct, Some(50.0));

    // Ticks 1..=60: 30 odd ticks at 70 %, 30 even at 50 %.
    assert_eq!(windows.len(), 3, "{windows:#?}");
    let a = window(&windows, "libvirt_domain:vm-a");
    assert_eq!(a.tenant.as_deref(), Some("tenant-a"));
    assert!(a.foreign_person);
    assert_eq!((a.start, a.end), (T0_MS / 1000, T0_MS / 1000 + 60));
    assert_eq!(a.gpu_seconds, 240.0);
    assert_eq!((a.gpus, a.max_concurrent_gpus), (4, 4));
    let busy_seconds = 4.0 * (30.0 * 0.7 + 30.0 * 0.5) * CLOCK;
    assert!(close(a.estimated_ops, H100_PEAK * busy_seconds), "{}", a.estimated_ops);
    // Any-tensor activity only (no per-pipe metrics in this scenario): TF32 to FP8 bounds.
    assert!(close(a.ops_lower.unwrap(), 494.7e12 * busy_seconds), "{a:?}");
    assert!(close(a.ops_upper.unwrap(), 1978.9e12 * busy_seconds), "{a:?}");
    assert!(close(a.peak_flops, 4.0 * H100_PEAK));
    assert_eq!((a.method, a.shared_gpu_seconds), (EstimationMethod::GpmTensor, 0.0));
    assert!(a.training_like, "4 GPUs at ≥ 45 % for 60 s");

    let b = window(&windows, "unix_user:2000");
    assert_eq!(b.tenant.as_deref(), Some("tenant-b"));
    assert_eq!(b.gpu_seconds, 180.0);
    assert_eq!((b.gpus, b.max_concurrent_gpus), (3, 3));
    // GPUs 4 and 5 whole, GPU 6 by 60 / (60 + 20): shared with a process of no workload, so
    // on GPU 6 tenant B's lower bound is 0 and its upper bound the whole GPU's.
    assert!(
        close(b.estimated_ops, H100_PEAK * 0.3 * 60.0 * CLOCK * (1.0 + 1.0 + 0.75)),
        "{}",
        b.estimated_ops
    );
    assert!(close(b.ops_lower.unwrap(), 494.7e12 * 0.3 * 60.0 * CLOCK * 2.0), "{b:?}");
    assert!(close(b.ops_upper.unwrap(), 1978.9e12 * 0.3 * 60.0 * CLOCK * 3.0), "{b:?}");
    assert_eq!((b.method, b.shared_gpu_seconds), (EstimationMethod::SharedSplit, 60.0));
    assert!(!b.training_like, "only 3 GPUs");

    let pod = window(&windows, "cgroup:/kubepods.slice/pod-x.slice");
    assert_eq!(pod.tenant, None, "no attestation: unattributed");
    assert_eq!(pod.gpu_seconds, 60.0);
    assert!(close(pod.estimated_ops, H100_PEAK * 0.1 * 60.0 * CLOCK));

    // Each tick lists the unattested pod and the exited process for the unverified path.
    let last = reports.last().unwrap();
    let mut unattributed: Vec<_> = last.unattributed.iter().map(|p| (p.pid, p.owner.clone())).collect();
    unattributed.sort_by_key(|(pid, _)| *pid);
    assert_eq!(
        unattributed,
        [
            (
                3001,
                ProcessOwner::Workload { workload: "cgroup:/kubepods.slice/pod-x.slice".parse().unwrap() }
            ),
            (9999, ProcessOwner::Exited),
        ]
    );
    assert_eq!(last.processes.len(), 9);
}

#[test]
fn mig_mode_and_instances_are_reported() {
    // GPU instance 1 (MIG-mig-0) runs two workloads' processes, instance 2 (MIG-mig-1) one;
    // each has its own GPM counters (nvmlGpmMigSampleGet).
    let procs = json!([
        {"pid": 42, "used_mib": 10, "sm_util": 50, "gpu_instance_id": 1},
        {"pid": 43, "used_mib": 10, "sm_util": 50, "gpu_instance_id": 1},
        {"pid": 44, "used_mib": 10, "sm_util": 50, "gpu_instance_id": 2}
    ]);
    let host = FakeHost::new(json!({"gpus": [{
        "name": H100, "uuid": "GPU-mig", "sm_count": 132, "mig": {"enabled": true, "instances": 2},
        "sm_clock_mhz": 1980,
        "ticks": [{"util": 50, "tensor": 40.0, "processes": procs,
                   "mig_gpm": {"1": {"HMMA_TENSOR_UTIL": 80.0, "FP32_UTIL": 0.0},
                               "2": {"HMMA_TENSOR_UTIL": 20.0, "FP32_UTIL": 10.0}}}]
    }, {"name": H100, "uuid": "GPU-plain"}]}));
    let mut backend = host.backend();
    let s = backend.sample();
    let (mig, plain) = (&s.gpus[0], &s.gpus[1]);
    assert_eq!(mig.mig_enabled, Some(true));
    let ids: Vec<_> = mig.mig_instances.iter().map(|m| (m.index, m.uuid.as_str(), m.sm_count)).collect();
    assert_eq!(ids, [(0, "MIG-mig-0", Some(66)), (1, "MIG-mig-1", Some(66))]);
    assert_eq!(mig.mig_instances[0].memory_total_bytes, Some((81_559u64 << 20) / 2));
    let gis: Vec<_> = mig.mig_instances.iter().map(|m| m.gpu_instance_id).collect();
    assert_eq!(gis, [Some(1), Some(2)], "learnt from the processes each MIG device lists");
    assert_eq!(mig.processes[0].gpu_instance_id, Some(1));
    assert_eq!(plain.mig_enabled, Some(false));
    assert!(plain.mig_instances.is_empty());
    let s = backend.sample();
    let pipes = s.gpus[0].mig_instances[0].gpm.as_ref().unwrap();
    assert_eq!((pipes.hmma_tensor, pipes.fp32), (Some(80.0), Some(0.0)));
    drop(backend);

    // Through the sampler: each instance is measured on its own, at half the GPU's peaks.
    for (pid, user) in [(42, 1), (43, 2), (44, 3)] {
        host.process(pid, &format!("/user.slice/user-{user}.slice/x.scope"));
    }
    let tenants: TenantMap = (1..=3)
        .map(|u| (format!("unix_user:{u}").parse().unwrap(), tenant(&format!("t{u}"), true)))
        .collect();
    let mut sampler = host.sampler(clocked(&host), TrainingRule::default());
    let (_, windows) = run(&mut sampler, &tenants, 10);
    let alone = window(&windows, "unix_user:3");
    let half = 989.4e12 / 2.0;
    let point = 10.0 * (half * 0.2 + 66.9e12 / 2.0 * 0.1);
    assert!(close(alone.estimated_ops, point), "{alone:?}");
    assert_eq!(
        (alone.method, alone.shared_gpu_seconds, alone.peak_flops),
        (EstimationMethod::GpmPipes, 0.0, half)
    );
    // Instance 1 is shared by two workloads: [0, the instance's upper figure].
    let shared = window(&windows, "unix_user:1");
    assert_eq!(
        (shared.method, shared.shared_gpu_seconds, shared.ops_lower),
        (EstimationMethod::SharedSplit, 10.0, Some(0.0))
    );
    assert!(close(shared.ops_upper.unwrap(), 10.0 * 1978.9e12 / 2.0 * 0.8), "{shared:?}");
    assert!(close(shared.estimated_ops, 10.0 * half * 0.8 * 0.5), "{shared:?}");
}

#[test]
fn without_gpm_the_estimate_falls_back_to_utilization_and_says_so() {
    // GPU 0: A100 (no GPM), no per-process samples, two tenants' processes → even split.
    // GPU 1: H100 with GPM, tenant a only. Tenant a's window mixes methods → upper bound.
    let host = FakeHost::new(json!({"gpus": [
        {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-a100", "gpm": false, "process_utilization": false,
         "compute_capability": [8, 0], "sm_count": 108, "ticks": [{"util": 80, "processes": [proc(11, 0), proc(22, 0)]}]},
        {"name": H100, "uuid": "GPU-h100", "ticks": [{"util": 90, "tensor": 25.0, "processes": [proc(12, 90)]}]}
    ]}));
    host.process(11, "/user.slice/user-1.slice/x.scope");
    host.process(12, "/user.slice/user-1.slice/x.scope");
    host.process(22, "/user.slice/user-2.slice/x.scope");
    let tenants: TenantMap = [
        ("unix_user:1".parse().unwrap(), tenant("a", false)),
        ("unix_user:2".parse().unwrap(), tenant("b", false)),
    ]
    .into();
    let mut sampler = host.sampler(clocked(&host), TrainingRule::default());
    let (reports, windows) = run(&mut sampler, &tenants, 10);

    let s = &reports[1].sample.gpus[0];
    assert_eq!(
        (s.gpm_supported, s.gpm_tensor_activity_pct, &s.process_utilization),
        (Some(false), None, &None)
    );
    let est = &reports[1].gpus[0];
    assert_eq!(est.rate.unwrap().method, EstimationMethod::UtilizationUpperBound);
    assert_eq!(reports[1].gpus[1].rate.unwrap().method, EstimationMethod::GpmTensor);

    // The A100 is shared by both tenants: point split evenly, lower 0, upper the whole GPU's
    // utilization × its fastest rate (INT8, 624 TOPS).
    let a = window(&windows, "unix_user:1");
    assert_eq!(a.method, EstimationMethod::UtilizationUpperBound);
    let point = 10.0 * CLOCK * (A100_PEAK * 0.8 * 0.5 + H100_PEAK * 0.25);
    assert!(close(a.estimated_ops, point), "{}", a.estimated_ops);
    assert!(close(a.ops_lower.unwrap(), 10.0 * CLOCK * 494.7e12 * 0.25), "{a:?}");
    assert!(close(a.ops_upper.unwrap(), 10.0 * CLOCK * (624e12 * 0.8 + 1978.9e12 * 0.25)), "{a:?}");
    assert_eq!((a.gpu_seconds, a.gpus, a.shared_gpu_seconds), (20.0, 2, 10.0));
    let b = window(&windows, "unix_user:2");
    assert_eq!(b.method, EstimationMethod::UtilizationUpperBound);
    assert!(close(b.estimated_ops, 10.0 * CLOCK * A100_PEAK * 0.8 * 0.5));
    assert_eq!((b.ops_lower, b.shared_gpu_seconds), (Some(0.0), 10.0));
    assert!(close(b.peak_flops, A100_PEAK));
}

#[test]
fn a_gpu_lost_mid_run_is_reported_and_sampling_continues() {
    let host = FakeHost::new(json!({"gpus": [
        gpu(0, H100, json!([{"util": 100, "tensor": 100.0, "processes": [proc(7, 100)]}])),
        {"name": H100, "uuid": "GPU-lost", "lost_at_tick": 3,
         "ticks": [{"util": 100, "tensor": 100.0, "processes": [proc(8, 100)]}]}
    ]}));
    host.process(7, "/user.slice/user-1.slice/a.scope");
    host.process(8, "/user.slice/user-1.slice/b.scope");
    let tenants: TenantMap = [("unix_user:1".parse().unwrap(), tenant("a", false))].into();
    let mut sampler = host.sampler(clocked(&host), TrainingRule::default());
    let (reports, windows) = run(&mut sampler, &tenants, 5);

    for (k, r) in reports.iter().enumerate() {
        assert_eq!(r.sample.backend, BackendState::Ok, "tick {k}");
        let lost = &r.sample.gpus[1];
        assert_eq!(lost.uuid, "GPU-lost", "a lost GPU keeps its last-known identity");
        if k >= 3 {
            assert_eq!(lost.state, GpuState::Lost, "tick {k}");
            assert_eq!(r.lost_gpus, ["GPU-lost"]);
        } else {
            assert_eq!(lost.state, GpuState::Ok, "tick {k}");
        }
    }
    let w = window(&windows, "unix_user:1");
    // GPU 0 for ticks 1..=5, the lost GPU for ticks 1 and 2.
    assert_eq!(w.gpu_seconds, 7.0);
    assert!(close(w.estimated_ops, 7.0 * H100_PEAK * CLOCK));
    assert_eq!((w.gpus, w.max_concurrent_gpus), (2, 2));
}

#[test]
fn no_library_means_unavailable_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnvidia-ml.so.1");
    let mut backend =
        NvmlBackend::start(NvmlOptions { library: missing.clone(), ..Default::default() }).unwrap();
    for _ in 0..3 {
        let s = backend.sample();
        let BackendState::Unavailable { reason } = &s.backend else { panic!("{s:?}") };
        assert!(reason.contains(&missing.display().to_string()), "{reason}");
        assert!(s.gpus.is_empty());
    }
    assert!(matches!(backend.compute_mode("GPU-x"), Err(GpuError::Unavailable(_))));

    // The library is there but nvmlInit fails (driver missing).
    let host = FakeHost::new(json!({"init_error": "LIBRARY_NOT_FOUND", "gpus": [gpu(0, H100, json!([]))]}));
    let mut sampler = host.sampler(Box::new(host.backend()), TrainingRule::default());
    for _ in 0..3 {
        let r = sampler.tick(&TenantMap::new());
        assert!(matches!(r.sample.backend, BackendState::Unavailable { .. }), "{:?}", r.sample.backend);
        assert!(r.windows.is_empty() && r.processes.is_empty());
    }
    assert!(sampler.flush().is_empty());
}

#[test]
fn compute_mode_enforce_lift_and_drift() {
    let host = FakeHost::new(json!({"state_file": "", "gpus": [
        {"name": H100, "uuid": "GPU-0", "compute_mode": "exclusive_process"},
        {"name": H100, "uuid": "GPU-1"}
    ]}));
    let modes_file = host.dir().join("modes.json");
    let state = host.dir().join("enforce/state.json");
    // The enforcer and the sampler share one NVML thread through clones of the handle.
    let mut backend = host.backend();
    let mut sampler = host.sampler(Box::new(backend.clone()), TrainingRule::default());
    let mut enforcer = GpuComputeModeEnforcer::load(&state).unwrap();
    let deny: BTreeSet<String> = ["GPU-0".to_string()].into();

    let r = enforcer.reconcile(&mut backend, &deny).unwrap();
    assert_eq!(r.prohibited, ["GPU-0"]);
    assert!(r.errors.is_empty() && r.restored.is_empty() && r.drift_repaired.is_empty());
    assert_eq!(backend.compute_mode("GPU-0").unwrap(), ComputeMode::Prohibited);
    assert_eq!(backend.compute_mode("GPU-1").unwrap(), ComputeMode::Default);
    assert_eq!(sampler.tick(&TenantMap::new()).sample.gpus[0].compute_mode, Some(ComputeMode::Prohibited));

    // Idempotent.
    let r = enforcer.reconcile(&mut backend, &deny).unwrap();
    assert!(r.prohibited.is_empty() && r.drift_repaired.is_empty() && r.errors.is_empty());

    // Someone sets the GPU back to default behind the agent's back: drift, repaired.
    std::fs::write(&modes_file, r#"{"GPU-0": 0}"#).unwrap();
    assert_eq!(backend.compute_mode("GPU-0").unwrap(), ComputeMode::Default);
    let r = enforcer.reconcile(&mut backend, &deny).unwrap();
    assert_eq!(r.drift_repaired, [("GPU-0".to_string(), ComputeMode::Default)]);
    assert_eq!(backend.compute_mode("GPU-0").unwrap(), ComputeMode::Prohibited);

    // An agent restart remembers the original mode, and lifting restores it.
    drop(enforcer);
    let mut enforcer = GpuComputeModeEnforcer::load(&state).unwrap();
    assert_eq!(enforcer.held(), &BTreeMap::from([("GPU-0".to_string(), ComputeMode::ExclusiveProcess)]));
    let r = enforcer.reconcile(&mut backend, &BTreeSet::new()).unwrap();
    assert_eq!(r.restored, [("GPU-0".to_string(), ComputeMode::ExclusiveProcess)]);
    assert_eq!(backend.compute_mode("GPU-0").unwrap(), ComputeMode::ExclusiveProcess);
    assert!(enforcer.held().is_empty());

    // An unknown GPU is an error for that GPU only.
    let r = enforcer.reconcile(&mut backend, &["GPU-9".to_string(), "GPU-1".to_string()].into()).unwrap();
    assert_eq!(r.prohibited, ["GPU-1"]);
    assert_eq!(r.errors, [("GPU-9".to_string(), GpuError::NoSuchGpu("GPU-9".into()))]);
}

#[test]
fn record_then_replay_gives_back_the_same_samples() {
    let host = FakeHost::new(
        json!({"gpus": [gpu(0, H100, json!([{"util": 10, "tensor": 5.0, "processes": [proc(5, 10)]}]))]}),
    );
    let out = host.dir().join("trace.jsonl");
    let summary = kycd::gpu::record::record_nvml(
        &host.library(),
        Duration::from_millis(40),
        Duration::from_millis(10),
        &out,
    )
    .unwrap();
    assert_eq!((summary.samples, summary.unavailable), (5, 0));
    let lines: Vec<Sample> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    let mut replay = kycd::gpu::ReplayBackend::open(&out, true).unwrap();
    for line in &lines {
        assert_eq!(&replay.sample(), line);
    }
    // Looping keeps time moving forward.
    let again = replay.sample();
    assert!(again.at_ms > lines[4].at_ms);
    assert_eq!(again.gpus, lines[0].gpus);
}

#[test]
fn the_sampler_thread_hands_windows_to_a_bounded_channel() {
    let host = FakeHost::new(
        json!({"gpus": [gpu(0, H100, json!([{"util": 50, "tensor": 50.0, "processes": [proc(5, 50)]}]))]}),
    );
    host.process(5, "/user.slice/user-5.slice/a.scope");
    let options = SamplerOptions {
        interval: Duration::from_millis(20),
        proc_root: host.proc_root(),
        cgroup_roots: vec!["user.slice".into()],
        ..Default::default()
    };
    let sampler = GpuSampler::new(Box::new(host.backend()), &options).unwrap();
    let tenants: TenantMap = [("unix_user:5".parse().unwrap(), tenant("t5", false))].into();
    let (_tenants_tx, tenants_rx) = tokio::sync::watch::channel(Arc::new(tenants));
    let (tx, mut rx) = kycd::gpu::usage::window_channel(4);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let thread = kycd::gpu::sampler::spawn(sampler, tenants_rx, tx, None, shutdown.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(250));
    shutdown.cancel();
    thread.join().unwrap();
    let mut windows = Vec::new();
    while let Ok(w) = rx.try_recv() {
        windows.push(w);
    }
    assert!(!windows.is_empty());
    let seconds: f64 = windows.iter().map(|w| w.gpu_seconds).sum();
    assert!(windows
        .iter()
        .all(|w| w.tenant.as_deref() == Some("t5") && w.method == EstimationMethod::GpmTensor));
    // Booked time cannot exceed the time the thread ran (ticks are capped at 2 intervals).
    assert!(seconds > 0.0 && seconds < 0.5, "{seconds}");
}

#[test]
fn kycctl_gpu_record_writes_a_trace_or_says_nvml_is_missing() {
    let host = FakeHost::new(json!({"gpus": [gpu(0, H100, json!([{"util": 10}])), gpu(1, H100, json!([]))]}));
    let out = host.dir().join("t.jsonl");
    let run = |lib: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kycctl"))
            .args(["gpu", "record", "--seconds", "0", "--interval-ms", "10", "--out"])
            .arg(&out)
            .arg("--nvml-library")
            .arg(lib)
            .output()
            .unwrap()
    };
    let ok = run(&host.library());
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    let sample: Sample = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert_eq!(sample.gpus.len(), 2);
    assert_eq!(sample.gpus[0].utilization_gpu_pct, Some(10));

    let missing = run(&host.dir().join("absent.so"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NVML unavailable"));
}

/// A real child process in a real cgroup v2 directory, attributed through the real /proc.
/// Needs root and a writable cgroup2 mount; skips (loudly) otherwise.
#[test]
fn real_processes_in_real_cgroups_are_attributed_through_proc() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let Some(mount) = kycd::discovery::cgroup::find_cgroup2_mount(&mountinfo) else {
        kycd_test_support::skip!("SKIP: no cgroup2 mount");
        return;
    };
    let root = format!("kycd-gpu-test-{}.slice", std::process::id());
    let pod = mount.join(&root).join("pod-a.slice");
    if let Err(e) = std::fs::create_dir_all(&pod) {
        kycd_test_support::skip!("SKIP: cannot create {}: {e} (needs root)", pod.display());
        return;
    }
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let moved = std::fs::write(pod.join("cgroup.procs"), child.id().to_string());
    let cleanup = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir(&pod);
        let _ = std::fs::remove_dir(mount.join(&root));
    };
    if let Err(e) = moved {
        cleanup(&mut child);
        kycd_test_support::skip!("SKIP: cannot move a process into {}: {e}", pod.display());
        return;
    }
    let host = FakeHost::new(json!({"gpus": [gpu(0, H100, json!([{"util": 100, "tensor": 40.0,
        "processes": [proc(child.id(), 100), proc(1, 0)]}]))]}));
    let options = SamplerOptions { cgroup_roots: vec![root.clone()], ..Default::default() };
    let mut sampler = GpuSampler::new(clocked(&host), &options).unwrap();
    let workload: WorkloadId = format!("cgroup:/{root}/pod-a.slice").parse().unwrap();
    let tenants: TenantMap = [(workload.clone(), tenant("real", false))].into();
    let (reports, windows) = run(&mut sampler, &tenants, 3);
    cleanup(&mut child);

    let owners: BTreeMap<u32, ProcessOwner> =
        reports[1].processes.iter().map(|p| (p.pid, p.owner.clone())).collect();
    assert_eq!(owners[&child.id()], ProcessOwner::Workload { workload });
    // pid 1 is outside every workload root: the host workload, with no tenant here.
    assert_eq!(owners[&1], ProcessOwner::Workload { workload: WorkloadId::host() });
    let w = window(&windows, &format!("cgroup:/{root}/pod-a.slice"));
    assert_eq!(w.tenant.as_deref(), Some("real"));
    // The child has all the SM utilization: the whole 40 % for 3 ticks.
    assert!(close(w.estimated_ops, 3.0 * H100_PEAK * 0.4 * CLOCK));
    assert_eq!(window(&windows, "host:host").estimated_ops, 0.0);
}

#[test]
fn process_owners_are_cached_while_listed_and_rechecked_every_ten_seconds() {
    let on = json!({"util": 50, "processes": [proc(5, 50)]});
    let off = json!({"util": 0});
    // Listed for ticks 0..=11, gone at 12, back at 13.
    let mut ticks = vec![on.clone(); 12];
    ticks.extend([off, on]);
    let host = FakeHost::new(json!({"gpus": [gpu(0, H100, json!(ticks))]}));
    host.process(5, "/user.slice/user-1.slice/a.scope");
    let mut sampler = host.sampler(clocked(&host), TrainingRule::default());
    let owner = |r: &TickReport| r.processes.first().map(|p| p.owner.clone());
    let user = |n: u32| Some(ProcessOwner::Workload { workload: format!("unix_user:{n}").parse().unwrap() });
    let mut seen = Vec::new();
    for k in 0..14 {
        if k == 2 {
            // The process moves to another cgroup.
            host.process(5, "/user.slice/user-2.slice/a.scope");
        }
        seen.push(owner(&sampler.tick(&TenantMap::new())));
    }
    assert_eq!(seen[0], user(1));
    assert_eq!(seen[9], user(1), "cached for 10 s");
    assert_eq!(seen[10], user(2), "re-read after 10 s");
    assert_eq!(seen[12], None);
    assert_eq!(seen[13], user(2));
}

#[test]
fn a_hung_driver_stalls_gpu_data_not_the_caller() {
    let host = FakeHost::new(json!({"count_delay_ms": 400, "gpus": [gpu(0, H100, json!([{"util": 1}]))]}));
    let options = NvmlOptions { library: host.library(), queue: 1, reply_timeout: Duration::from_millis(50) };
    let mut backend = NvmlBackend::start(options).unwrap();
    let started = kycd_protocol::clock::monotonic();
    let s = backend.sample();
    let BackendState::Unavailable { reason } = &s.backend else { panic!("{s:?}") };
    assert!(reason.contains("did not answer"), "{reason}");
    // The thread is still inside the first call: one more request queues, the next is refused.
    let _ = backend.sample();
    let s = backend.sample();
    let BackendState::Unavailable { reason } = &s.backend else { panic!("{s:?}") };
    assert!(reason.contains("busy"), "{reason}");
    assert!(started.elapsed() < Duration::from_millis(350), "callers never wait for the driver");
    // Dropping the handle does not wait for the wedged thread beyond its grace period.
    let dropped = kycd_protocol::clock::monotonic();
    drop(backend);
    assert!(dropped.elapsed() < Duration::from_millis(1500));
}

/// The daemon end to end: the real `kycd` binary loads the fake library from
/// `gpu.nvml_library`, and in enforce mode prohibits every GPU of a denied host, then restores
/// each GPU's own mode when a host attestation arrives.
#[test]
fn the_daemon_prohibits_the_gpus_of_a_denied_host_and_restores_them() {
    let fake = FakeHost::new(json!({"state_file": "", "gpus": [
        {"name": H100, "uuid": "GPU-0", "compute_mode": "exclusive_process"},
        {"name": H100, "uuid": "GPU-1"}
    ]}));
    let modes = || -> BTreeMap<String, u32> {
        serde_json::from_slice(&std::fs::read(fake.dir().join("modes.json")).unwrap_or_default())
            .unwrap_or_default()
    };
    let mut host = host_support::Host::new("");
    host.extra_config = format!(
        "mode = \"enforce\"\n[enforcement]\nnftables = false\ncgroup = false\nreconcile_interval_s = 1\n\
         [gpu]\nnvml_library = \"{}\"\n",
        fake.library().display()
    );
    host.write_config();
    host.write_policy(1, &[]); // no attestation → deny
    host.start();
    host.wait_for_verdict("host:host", "deny");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    // NVML_COMPUTEMODE_PROHIBITED = 2, EXCLUSIVE_PROCESS = 3, DEFAULT = 0.
    while modes() != BTreeMap::from([("GPU-0".into(), 2), ("GPU-1".into(), 2)]) {
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "GPUs not prohibited: {:?}\n{}",
            modes(),
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The sampler says so on its first tick, which may come after the reconciliation that
    // prohibited the GPUs: wait for it rather than race it.
    while !host.log().contains("GPU backend available") {
        assert!(kycd_protocol::clock::monotonic() < deadline, "no 'GPU backend available':\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
        "iss": "kyc", "sub": "tenant-bm", "jti": "h-1", "iat": host_support::now() - 5,
        "exp": host_support::now() + 3600, "kyc": {"status": "verified"},
        "subject": {"kind": "individual", "legal_name": "X", "countries": ["US"]},
        "binding": {"kind": "host", "id": "bare-metal"}, "foreign_person": false
    }))
    .unwrap();
    host_support::atomic_write(
        &host.path("etc/host.jws"),
        kycd_protocol::sign(&claims, &host.issuer).unwrap().as_bytes(),
    );
    host.wait_for_verdict("host:host", "allow");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    while modes() != BTreeMap::from([("GPU-0".into(), 3), ("GPU-1".into(), 0)]) {
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "modes not restored: {:?}\n{}",
            modes(),
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.stop();
}

/// No NVIDIA library on the host: the agent runs, decides and says so.
#[test]
fn the_daemon_runs_without_nvml_and_reports_the_gpu_backend_unavailable() {
    let mut host = host_support::Host::new("");
    let missing = host.path("no-such/libnvidia-ml.so.1");
    host.extra_config = format!("[gpu]\nnvml_library = \"{}\"\n", missing.display());
    host.write_config();
    host.write_policy(1, &[]);
    host.start();
    host.wait_for_verdict("host:host", "deny");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    while !host.log().contains("GPU backend unavailable") {
        assert!(kycd_protocol::clock::monotonic() < deadline, "{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    host.stop();
}

/// `gpu.replay_trace`: the daemon replays a recorded trace instead of NVML (demos, tests) and
/// closes usage windows from it.
#[test]
fn the_daemon_replays_a_trace_into_usage_windows() {
    let mut host = host_support::Host::new("");
    // The H200 recording as a format-2 trace (every GPM pipe; written by the calibration
    // test through the fake NVML), its load processes moved to pid 1: the host's workload.
    let trace = host.path("trace.jsonl");
    let recorded = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/h200-2026-12-04/trace-format2.jsonl"),
    )
    .unwrap();
    let lines: Vec<String> = recorded
        .lines()
        .map(|l| {
            let mut sample: serde_json::Value = serde_json::from_str(l).unwrap();
            for p in sample["gpus"][0]["processes"].as_array_mut().unwrap() {
                p["pid"] = json!(1);
            }
            for p in sample["gpus"][0]["process_utilization"].as_array_mut().into_iter().flatten() {
                p["pid"] = json!(1);
            }
            sample.to_string()
        })
        .collect();
    std::fs::write(&trace, lines.join("\n")).unwrap();
    host.extra_config = format!(
        "[log]\nlevel = \"kycd=debug,info\"\n[gpu]\nreplay_trace = \"{}\"\ninterval_ms = 100\nwindow_s = 1\n",
        trace.display()
    );
    host.write_config();
    host.write_policy(1, &[]);
    host.start();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    while !host.log().contains("GPU usage window") {
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "no usage window from the replay:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = host.log();
    assert!(log.contains("REPLAYED"), "the replay is announced:\n{log}");
    let window = log.lines().find(|l| l.contains("GPU usage window")).unwrap();
    assert!(window.contains("host:host"), "pid 1 is the host's: {window}");
    // The three figures and the method, from every pipe of the format-2 trace (the log may
    // be coloured: escapes stripped first).
    let window: String = {
        let mut plain = String::new();
        let mut chars = window.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                plain.push(c);
            }
        }
        plain
    };
    let figure = |name: &str| -> f64 {
        let at = window.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name}: {window}"));
        window[at + name.len() + 1..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let (lower, point, upper) = (figure("ops_lower"), figure("estimated_ops"), figure("ops_upper"));
    assert!(0.0 < lower && lower < point && point < upper, "{window}");
    assert!(window.contains("gpm_pipes"), "{window}");
    host.stop();
}

/// A libvirt status file as `/run/libvirt/qemu/NAME.xml` holds it: enough to name the domain
/// and its UUID.
fn status_xml(dir: &Path, name: &str, id: u32, uuid: &str) {
    let xml = format!(
        "<domstatus state='running' pid='1'>\n  <domain type='kvm' id='{id}'>\n    <name>{name}</name>\n    \
         <uuid>{uuid}</uuid>\n  </domain>\n</domstatus>\n"
    );
    std::fs::write(dir.join(format!("{name}.xml")), xml).unwrap();
}

#[test]
fn vgpu_instances_are_attributed_to_their_vms_tenants() {
    const VM_A: &str = "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10";
    const VM_B: &str = "0c8e2d4a-7b1f-4e55-a2c3-9d8e7f6a5b4c";
    const NOT_RUNNING: &str = "11111111-2222-3333-4444-555555555555";
    let pipes = json!({"HMMA_TENSOR_UTIL": 50.0, "FP32_UTIL": 0.0});
    // GPU 0: one time-sliced vGPU (vm-a, named by UUID in upper case as some drivers do);
    // GPU 1: two vGPUs (vm-b, and a VM libvirt does not list); GPU 2: a MIG-backed vGPU of
    // vm-b whose GPU instance runs no host process.
    let host = FakeHost::new(json!({"gpus": [
        {"name": H100, "uuid": "GPU-0", "ticks": [{"util": 50, "gpm": pipes}],
         "vgpus": [{"uuid": "VGPU-a", "vm_id": VM_A.to_uppercase(), "mdev_uuid": "c2177883-f1bb-47f0-914d-32a22e3a8804"}]},
        {"name": H100, "uuid": "GPU-1", "ticks": [{"util": 50, "gpm": pipes}],
         "vgpus": [{"uuid": "VGPU-b", "vm_id": VM_B}, {"uuid": "VGPU-x", "vm_id": NOT_RUNNING}]},
        {"name": H100, "uuid": "GPU-2", "mig": {"enabled": true, "instances": 2},
         "ticks": [{"util": 50, "mig_gpm": {"1": pipes}}],
         "vgpus": [{"uuid": "VGPU-m", "vm_id": "vm-b", "vm_id_type": "domain", "gpu_instance_id": 1}]}
    ]}));
    let s = host.backend().sample();
    let v = &s.gpus[0].vgpus[0];
    assert_eq!(
        (v.uuid.as_str(), &v.vm, v.mdev_uuid.as_deref(), v.gpu_instance_id),
        ("VGPU-a", &kycd::gpu::VgpuVm::Uuid(VM_A.into()), Some("c2177883-f1bb-47f0-914d-32a22e3a8804"), None)
    );
    assert_eq!(s.gpus[2].vgpus[0].gpu_instance_id, Some(1));
    assert_eq!(s.gpus[2].vgpus[0].vm, kycd::gpu::VgpuVm::Domain("vm-b".into()));

    let run_dir = tempfile::tempdir().unwrap();
    status_xml(run_dir.path(), "vm-a", 3, VM_A);
    status_xml(run_dir.path(), "vm-b", 4, VM_B);
    let options = SamplerOptions {
        proc_root: host.proc_root(),
        passthrough: Some(kycd::gpu::passthrough::PassthroughOptions {
            libvirt_status_dir: run_dir.path().to_owned(),
            sysfs_root: run_dir.path().join("no-sysfs"),
            guest_timeout_ms: kycd::gpu::passthrough::DEFAULT_GUEST_TIMEOUT_MS,
        }),
        ..Default::default()
    };
    let mut sampler = GpuSampler::new(clocked(&host), &options).unwrap();
    let tenants: TenantMap = [
        ("libvirt_domain:vm-a".parse().unwrap(), tenant("tenant-a", true)),
        ("libvirt_domain:vm-b".parse().unwrap(), tenant("tenant-b", false)),
    ]
    .into();
    let (_, windows) = run(&mut sampler, &tenants, 10);
    let whole = 10.0 * H100_PEAK * 0.5 * CLOCK;
    // Alone on GPU 0: the GPU's whole estimate, measured.
    let a = window(&windows, "libvirt_domain:vm-a");
    assert_eq!(
        (a.tenant.as_deref(), a.foreign_person, a.method),
        (Some("tenant-a"), true, EstimationMethod::GpmPipes)
    );
    assert!(close(a.estimated_ops, whole), "{a:?}");
    assert_eq!((a.gpu_seconds, a.gpus, a.peak_flops, a.shared_gpu_seconds), (10.0, 1, H100_PEAK, 0.0));
    // GPU 1 is shared by two vGPUs (no per-vGPU utilization): half the point estimate each,
    // [0, the device's upper], shared GPU time; vm-b's MIG-backed vGPU on GPU 2 cannot be
    // measured, so the window's method is the weakest: unknown.
    let b = window(&windows, "libvirt_domain:vm-b");
    assert_eq!(
        (b.tenant.as_deref(), b.method, b.gpus, b.gpu_seconds),
        (Some("tenant-b"), EstimationMethod::Unknown, 2, 20.0)
    );
    assert!(close(b.estimated_ops, whole / 2.0), "{b:?}");
    assert_eq!((b.ops_lower, b.shared_gpu_seconds, b.peak_flops), (Some(0.0), 10.0, H100_PEAK));
    // The VM libvirt does not list keeps its UUID and has no tenant.
    let x = window(&windows, &format!("libvirt_domain:{NOT_RUNNING}"));
    assert_eq!((x.tenant.as_deref(), x.method), (None, EstimationMethod::SharedSplit));
}
