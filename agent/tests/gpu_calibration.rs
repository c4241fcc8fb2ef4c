//! The estimator calibrated on a real H200 (`tests/data/h200-2026-12-04`, copied from the
//! recording described in its README): every GPM pipe, SM clock and power the driver reported
//! each second under loads with known operation counts, served by the fake
//! `libnvidia-ml.so` through the real NVML path (nvml-wrapper, the NVML thread, the sampler),
//! with sample times from a manual clock set to the recorded ones.
//!
//! Per phase, over the seconds inside each load's timed loop: the BF16 matmul's point estimate
//! within ±7 % of the truth, the FP32 CUDA-core load's within ±10 %, the memory-bound copy
//! below 1 % of the BF16 run's rate, the FP8 truth inside [lower, upper]. Two tenants sharing
//! the GPU: the device total right, each tenant's truth inside its [0, device upper] bounds,
//! labelled `shared_split`, and the `exclusive_gpu` violation reported.
//!
//! Set `KYCD_CALIBRATION_TABLE=FILE` to have the phase table written there (BENCHMARKS.md's
//! table comes from it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kycd::gpu::estimate::Bounds;
use kycd::gpu::sampler::{GpuSampler, SamplerOptions, TenantInfo, TenantMap, TickReport};
use kycd::gpu::{NvmlBackend, NvmlOptions, Sample};
use kycd_protocol::clock::ManualClock;
use kycd_protocol::{EstimationMethod, UsageWindow};
use kycd_test_support::fake_nvml::FakeNvml;
use serde_json::{json, Value};

const UUID: &str = "GPU-163b45e6-75c7-fc2e-765c-f19788620a68";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/h200-2026-12-04").join(name)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A load of the recording.
#[derive(Debug, Clone)]
struct Load {
    mode: String,
    start: f64,
    end: f64,
    /// True operations per second (its operations over its timed loop).
    rate: f64,
    pid: u32,
}

fn loads(path: &Path) -> Vec<Load> {
    lines(path)
        .iter()
        .enumerate()
        .map(|(k, l)| {
            let (start, end) = (l["start"].as_f64().unwrap(), l["end"].as_f64().unwrap());
            Load {
                mode: l["mode"].as_str().unwrap().into(),
                start,
                end,
                rate: l["ops"].as_f64().unwrap() / (end - start),
                pid: 1001 + k as u32,
            }
        })
        .collect()
}

fn cgroup(mode: &str) -> String {
    format!("/machine.slice/kycdgpu-{mode}")
}

/// The fake's scenario: one tick per recorded second, every GPM pipe as recorded, a load's
/// process listed while its timed loop runs (as the driver listed them), with an SM
/// utilization share (`shares`, else equal).
fn scenario(gpm: &[Value], loads: &[Load], shares: impl Fn(f64, &Load) -> u32) -> Value {
    let ticks: Vec<Value> = gpm
        .iter()
        .map(|s| {
            let t = s["t"].as_f64().unwrap();
            let metrics: serde_json::Map<String, Value> = s
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let processes: Vec<Value> = loads
                .iter()
                .filter(|l| l.start < t && t <= l.end + 1.0)
                .map(|l| json!({"pid": l.pid, "used_mib": 4096, "sm_util": shares(t, l)}))
                .collect();
            json!({
                "util": s["SM_UTIL"].as_f64().unwrap().round() as u32,
                "sm_clock_mhz": s["sm_mhz"],
                "power_mw": (s["power_w"].as_f64().unwrap() * 1000.0).round() as u32,
                "gpm": metrics,
                "processes": processes,
            })
        })
        .collect();
    json!({"gpus": [{"name": "NVIDIA H200", "uuid": UUID, "max_sm_clock_mhz": 1980,
                     "memory_total_mib": 143771, "ticks": ticks}]})
}

/// Runs the sampler over every recorded second, the manual clock at each second's end.
fn sample_recording(
    gpm: &[Value],
    loads: &[Load],
    tenants: &TenantMap,
    fake: &FakeNvml,
) -> (Vec<TickReport>, Vec<UsageWindow>) {
    for l in loads {
        fake.process(l.pid, &cgroup(&l.mode));
    }
    let times: Vec<i64> = gpm.iter().map(|s| (s["t"].as_f64().unwrap() * 1000.0).round() as i64).collect();
    let clock = Arc::new(ManualClock::at(times[0] / 1000));
    clock.advance(Duration::from_millis((times[0] % 1000) as u64));
    let backend = NvmlBackend::start_with_clock(
        NvmlOptions { library: fake.library(), ..Default::default() },
        clock.clone(),
    )
    .unwrap();
    let options = SamplerOptions {
        proc_root: fake.proc_root(),
        cgroup_roots: vec!["machine.slice".into()],
        ..Default::default()
    };
    let mut sampler = GpuSampler::new(Box::new(backend), &options).unwrap();
    let (mut reports, mut windows) = (Vec::new(), Vec::new());
    for (k, at) in times.iter().enumerate() {
        if k > 0 {
            clock.advance(Duration::from_millis((at - times[k - 1]) as u64));
        }
        let mut report = sampler.tick(tenants);
        assert_eq!(report.sample.at_ms, *at, "the sample is stamped by the manual clock");
        windows.append(&mut report.windows);
        reports.push(report);
    }
    windows.extend(sampler.flush());
    (reports, windows)
}

/// The device estimate summed over the ticks whose interval lies inside `[start, end]`, and
/// the seconds they cover.
fn device_ops(reports: &[TickReport], start: f64, end: f64) -> (Bounds, f64) {
    let mut ops = Bounds::default();
    let mut seconds = 0.0;
    for r in reports.iter().filter(|r| !r.dt.is_zero()) {
        let to = r.sample.at_ms as f64 / 1000.0;
        let from = to - r.dt.as_secs_f64();
        if from >= start && to <= end {
            ops.add(r.gpus[0].ops.unwrap());
            seconds += r.dt.as_secs_f64();
        }
    }
    (ops, seconds)
}

/// One row of the phase table.
struct Phase {
    name: String,
    truth: f64,
    ops: Bounds,
    seconds: f64,
}

impl Phase {
    fn row(&self) -> String {
        let t = |x: f64| x / self.seconds / 1e12;
        let ratio =
            if self.truth > 0.0 { format!("{:.3}", self.ops.point / self.truth) } else { "–".into() };
        format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {ratio} |",
            self.name,
            self.seconds,
            t(self.truth),
            t(self.ops.lower),
            t(self.ops.point),
            t(self.ops.upper)
        )
    }
}

fn write_table(phases: &[Phase]) {
    let mut text = String::from(
        "| load | seconds | true TFLOP/s | lower | point | upper | point ÷ truth |\n|---|---|---|---|---|---|---|\n",
    );
    for p in phases {
        text.push_str(&p.row());
        text.push('\n');
    }
    eprintln!("{text}");
    if let Some(path) = std::env::var_os("KYCD_CALIBRATION_TABLE") {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }
}

#[test]
fn h200_loads_one_after_another_are_counted_within_the_calibration_bounds() {
    let gpm = lines(&data("gpm.jsonl"));
    let loads = loads(&data("loads.jsonl"));
    let fake = FakeNvml::new(scenario(&gpm, &loads, |_, _| 100));
    let tenants: TenantMap = loads
        .iter()
        .map(|l| {
            let info =
                TenantInfo { tenant: format!("t-{}", l.mode), foreign_person: true, exclusive_gpu: true };
            (format!("cgroup:{}", cgroup(&l.mode)).parse().unwrap(), info)
        })
        .collect();
    let (reports, windows) = sample_recording(&gpm, &loads, &tenants, &fake);
    assert!(reports.iter().all(|r| r.sample.gpus.len() == 1), "{:?}", reports[0].sample.backend);

    // The real NVML path delivered every pipe and the recorded clock.
    let steady = reports.iter().find(|r| r.sample.at_ms as f64 / 1000.0 > loads[0].start + 3.0).unwrap();
    let gpu = &steady.sample.gpus[0];
    assert_eq!(gpu.max_sm_clock_mhz, Some(1980));
    assert!(gpu.power_mw.is_some_and(|p| p > 600_000), "the recorded power: {:?}", gpu.power_mw);
    assert!(gpu.sm_clock_mhz.is_some_and(|c| c < 1600), "power-capped clock: {:?}", gpu.sm_clock_mhz);
    let pipes = gpu.gpm.as_ref().unwrap();
    assert!(
        pipes.hmma_tensor.unwrap() > 90.0 && pipes.fp32.is_some() && pipes.dram_bw.is_some(),
        "{pipes:?}"
    );

    let mut phases = Vec::new();
    for l in &loads {
        let (ops, seconds) = device_ops(&reports, l.start, l.end);
        assert!(seconds >= (l.end - l.start) - 2.5, "{}: {seconds} s counted", l.mode);
        assert!(ops.lower <= ops.point && ops.point <= ops.upper, "{}: {ops:?}", l.mode);
        phases.push(Phase { name: l.mode.clone(), truth: l.rate * seconds, ops, seconds });
    }
    write_table(&phases);
    let phase = |m: &str| phases.iter().find(|p| p.name == m).unwrap();
    let bf16 = phase("matmul");
    let ratio = bf16.ops.point / bf16.truth;
    assert!((ratio - 1.0).abs() <= 0.07, "BF16 matmul point ÷ truth = {ratio:.3}");
    let fp32 = phase("fp32");
    let ratio = fp32.ops.point / fp32.truth;
    assert!((ratio - 1.0).abs() <= 0.10, "FP32 CUDA-core point ÷ truth = {ratio:.3}");
    let copy = phase("membound");
    let (copy_rate, bf16_rate) = (copy.ops.point / copy.seconds, bf16.truth / bf16.seconds);
    assert!(copy_rate < 0.01 * bf16_rate, "memory-bound copy at {copy_rate:e}/s, BF16 truth {bf16_rate:e}/s");
    let fp8 = phase("fp8");
    assert!(
        fp8.ops.lower <= fp8.truth && fp8.truth <= fp8.ops.upper,
        "FP8 truth {:e} outside {:?}",
        fp8.truth,
        fp8.ops
    );
    assert!(fp8.ops.point < fp8.truth, "FP8 runs faster than the BF16-equivalent point estimate says");

    // Each load's window carries the three figures, labelled; nothing was shared.
    for l in &loads {
        let w: Vec<&UsageWindow> =
            windows.iter().filter(|w| w.workload == format!("cgroup:{}", cgroup(&l.mode))).collect();
        assert!(!w.is_empty(), "{}: no window", l.mode);
        for w in w {
            let (lower, upper) = (w.ops_lower.unwrap(), w.ops_upper.unwrap());
            assert!(lower <= w.estimated_ops && w.estimated_ops <= upper, "{w:?}");
            assert_eq!(
                (w.method, w.shared_gpu_seconds, w.tenant.clone()),
                (EstimationMethod::GpmPipes, 0.0, Some(format!("t-{}", l.mode)))
            );
        }
    }
    assert!(reports.iter().all(|r| r.exclusivity_violations.is_empty()), "one load at a time shares nothing");

    // What `kycctl gpu record` would have written replays to the same figures.
    let trace: Vec<Sample> = reports.iter().map(|r| r.sample.clone()).collect();
    let text: String = trace.iter().map(|s| serde_json::to_string(s).unwrap() + "\n").collect();
    let path = fake.dir.path().join("trace.jsonl");
    std::fs::write(&path, &text).unwrap();
    let replay = kycd::gpu::ReplayBackend::open(&path, false).unwrap();
    let peaks = kycd::gpu::peaks::PeakTable::builtin().unwrap();
    let again =
        kycd::gpu::trace_estimate::estimate_span(replay.samples(), &peaks, loads[0].start, loads[0].end);
    // The same figures, up to float summation order.
    assert!((again.total.estimated_ops / bf16.ops.point - 1.0).abs() < 1e-6, "{again:?} vs {:?}", bf16.ops);
    if let Some(out) = std::env::var_os("KYCD_WRITE_H200_TRACE") {
        std::fs::write(out, text).unwrap();
    }
}

#[test]
fn two_tenants_sharing_the_h200_get_bounds_that_hold_their_truth() {
    let gpm = lines(&data("shared-gpu/gpm.jsonl"));
    let mut loads = loads(&data("shared-gpu/loads.jsonl"));
    for (l, name) in loads.iter_mut().zip(["shareA", "shareB"]) {
        l.mode = name.into();
    }
    // The SM utilization split the driver reported per process, second by second.
    let trace = lines(&data("shared-gpu/trace.jsonl"));
    let share = |t: f64, l: &Load| -> u32 {
        let nearest = trace
            .iter()
            .min_by_key(|s| ((s["at_ms"].as_f64().unwrap() / 1000.0 - t).abs() * 1000.0) as i64)
            .unwrap();
        let pid = if l.mode == "shareA" { 507 } else { 508 };
        nearest["gpus"][0]["process_utilization"]
            .as_array()
            .and_then(|u| u.iter().find(|p| p["pid"] == pid))
            .map_or(50, |p| p["sm_util_pct"].as_u64().unwrap() as u32)
    };
    let fake = FakeNvml::new(scenario(&gpm, &loads, share));
    let tenants: TenantMap = loads
        .iter()
        .map(|l| {
            let info = TenantInfo {
                tenant: l.mode.clone(),
                foreign_person: true,
                exclusive_gpu: l.mode == "shareA",
            };
            (format!("cgroup:{}", cgroup(&l.mode)).parse().unwrap(), info)
        })
        .collect();
    let (reports, windows) = sample_recording(&gpm, &loads, &tenants, &fake);

    // The device total is right (1.01× in the recording's own analysis).
    let (start, end) = (loads[0].start.max(loads[1].start), loads[0].end.min(loads[1].end));
    let (device, seconds) = device_ops(&reports, start, end);
    let truth: f64 = loads.iter().map(|l| l.rate * seconds).sum();
    let ratio = device.point / truth;
    assert!((ratio - 1.0).abs() <= 0.07, "device point ÷ both tenants' truth = {ratio:.3}");
    write_table(&[Phase { name: "shared (device)".into(), truth, ops: device, seconds }]);

    // Each tenant: lower 0, upper the device's, labelled, shared time counted; its true
    // operations inside its bounds whatever the split said.
    for l in &loads {
        let w: Vec<&UsageWindow> =
            windows.iter().filter(|w| w.workload == format!("cgroup:{}", cgroup(&l.mode))).collect();
        let point: f64 = w.iter().map(|w| w.estimated_ops).sum();
        let upper: f64 = w.iter().map(|w| w.upper_ops()).sum();
        let lower: f64 = w.iter().map(|w| w.lower_ops()).sum();
        let shared: f64 = w.iter().map(|w| w.shared_gpu_seconds).sum();
        let own_truth = l.rate * (l.end - l.start);
        assert_eq!(lower, 0.0, "{}", l.mode);
        assert!(
            own_truth <= upper && point <= upper,
            "{}: truth {own_truth:e}, point {point:e}, upper {upper:e}",
            l.mode
        );
        assert!(shared >= (l.end - l.start) - 2.0, "{}: {shared} s shared", l.mode);
        assert!(w.iter().all(|w| w.method == EstimationMethod::SharedSplit), "{w:?}");
    }
    // Only the tenant under exclusive_gpu is reported as violating it.
    let violations: Vec<_> = reports.iter().flat_map(|r| r.exclusivity_violations.iter()).collect();
    assert!(!violations.is_empty());
    assert!(
        violations.iter().all(|v| v.tenant == "shareA" && v.gpu_uuid == UUID && v.users == 2),
        "{violations:?}"
    );
}

#[test]
fn a_format_1_trace_still_replays_and_a_newer_format_is_refused() {
    // kycd's own recording of the same run, made before per-pipe sampling: any-tensor only.
    let replay = kycd::gpu::ReplayBackend::open(&data("trace.jsonl"), false).unwrap();
    assert!(replay.samples().iter().all(|s| s.format == 1 && s.gpus.iter().all(|g| g.gpm.is_none())));
    let peaks = kycd::gpu::peaks::PeakTable::builtin().unwrap();
    let bf16 = &loads(&data("loads.jsonl"))[0];
    let e = kycd::gpu::trace_estimate::estimate_span(replay.samples(), &peaks, bf16.start, bf16.end);
    assert_eq!(e.gpus[0].method, EstimationMethod::GpmTensor);
    // Any-tensor activity, clock-scaled, is as good as HMMA for a BF16-only load.
    let ratio = e.total.estimated_ops / (bf16.rate * e.seconds);
    assert!((ratio - 1.0).abs() <= 0.07, "format-1 replay point ÷ truth = {ratio:.3}");
    assert!(e.total.ops_lower < e.total.estimated_ops && e.total.estimated_ops < e.total.ops_upper);

    let dir = tempfile::tempdir().unwrap();
    let newer = dir.path().join("t.jsonl");
    std::fs::write(&newer, "{\"format\":3,\"at_ms\":0,\"backend\":{\"state\":\"ok\"},\"gpus\":[]}\n")
        .unwrap();
    let err = kycd::gpu::ReplayBackend::open(&newer, false).unwrap_err().to_string();
    assert!(err.contains("line 1: trace format 3 is newer than this kycd reads (up to 2)"), "{err}");
}
