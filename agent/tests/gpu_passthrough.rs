//! GPUs passed through to a VM, which the host's NVML cannot see: the sampler accounts them
//! by allocation from the domain's live (status) XML and a sysfs tree laid out as on a real
//! host (`/sys/bus/pci/devices/ADDR/{vendor,device,class}` files, `driver` and `iommu_group`
//! symlinks). Passthrough itself needs a real device; docs/vm-accounting.md has the manual
//! check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kycd::gpu::metrics::GpuMetrics;
use kycd::gpu::passthrough::{PassthroughOptions, PciState};
use kycd::gpu::sampler::{GpuSampler, SamplerOptions, TenantInfo, TenantMap};
use kycd::gpu::{BackendState, NvmlBackend, NvmlOptions};
use kycd_protocol::clock::ManualClock;
use kycd_protocol::{EstimationMethod, UsageWindow};
use kycd_test_support::sysfs::{nvidia_function, passed_through_gpu};

/// A multiple of 60 s, so windows start there.
const T0: i64 = 1_764_000_000;

#[test]
fn a_vm_holding_eight_passed_through_h100s_is_accounted_by_allocation_without_nvml() {
    let sys = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    // The eight GPUs the recorded domain holds, on vfio-pci, with their audio functions.
    for bus in ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"] {
        passed_through_gpu(sys.path(), bus, "0x2330");
    }
    // An H200 on vfio-pci that no domain holds, and a GPU bound to nothing.
    nvidia_function(sys.path(), "0000:e1:00.0", "0x2335", "0x030200", Some("vfio-pci"));
    nvidia_function(sys.path(), "0000:f1:00.0", "0x2330", "0x030200", None);
    let xml = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libvirt/gpu-vm.xml");
    std::fs::copy(xml, run.path().join("gpu-vm.xml")).unwrap();

    // No NVIDIA driver on the host at all: every sample is "unavailable".
    let clock = Arc::new(ManualClock::at(T0));
    let missing = run.path().join("libnvidia-ml.so.1");
    let backend =
        NvmlBackend::start_with_clock(NvmlOptions { library: missing, ..Default::default() }, clock.clone())
            .unwrap();
    let options = SamplerOptions {
        passthrough: Some(PassthroughOptions {
            libvirt_status_dir: run.path().to_owned(),
            sysfs_root: sys.path().to_owned(),
            guest_timeout_ms: kycd::gpu::passthrough::DEFAULT_GUEST_TIMEOUT_MS,
        }),
        ..Default::default()
    };
    let mut sampler = GpuSampler::new(Box::new(backend), &options).unwrap();
    let tenant = TenantInfo { tenant: "tenant-foreign".into(), foreign_person: true, exclusive_gpu: false };
    let tenants: TenantMap = [("libvirt_domain:gpu-vm".parse().unwrap(), tenant)].into();

    let mut windows: Vec<UsageWindow> = Vec::new();
    let mut metrics = GpuMetrics::default();
    for k in 0..=60 {
        if k > 0 {
            clock.advance(Duration::from_secs(1));
        }
        let mut report = sampler.tick(&tenants);
        assert!(matches!(report.sample.backend, BackendState::Unavailable { .. }));
        windows.append(&mut report.windows);
        metrics.observe_tick(&report);
    }
    windows.extend(sampler.flush());

    assert_eq!(windows.len(), 1, "{windows:#?}");
    let w = &windows[0];
    assert_eq!(
        (w.tenant.as_deref(), w.workload.as_str(), w.foreign_person),
        (Some("tenant-foreign"), "libvirt_domain:gpu-vm", true)
    );
    assert_eq!((w.start, w.end, w.gpu_seconds, w.gpus, w.max_concurrent_gpus), (T0, T0 + 60, 480.0, 8, 8));
    assert_eq!(w.method, EstimationMethod::Allocation);
    assert_eq!((w.ops_lower, w.estimated_ops), (Some(0.0), 0.0), "nothing is known of the work done");
    let upper = 8.0 * 1978.9e12 * 60.0;
    assert!((w.ops_upper.unwrap() - upper).abs() < upper * 1e-9, "{w:?}");
    assert!((w.peak_flops - 8.0 * 989.4e12).abs() < 1.0, "{w:?}");

    // What the agent shows: every NVIDIA GPU on the bus and how it is accounted for.
    let json = metrics.to_json();
    let states: Vec<(String, String)> = json["passthrough"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["pci"].as_str().unwrap().to_owned(), g["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(states.len(), 10, "{states:?}");
    assert_eq!(states.iter().filter(|(_, s)| s == "assigned").count(), 8);
    assert!(states.contains(&("0000:e1:00.0".into(), "idle".into())));
    assert!(states.contains(&("0000:f1:00.0".into(), "unaccounted".into())));
    assert_eq!(json["passthrough"][0]["domain"], "gpu-vm");
    let text = metrics.render();
    for line in [
        "kycd_gpu_pci_gpus{state=\"assigned\"} 8",
        "kycd_gpu_pci_gpus{state=\"idle\"} 1",
        "kycd_gpu_pci_gpus{state=\"unaccounted\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
    }

    // The domain stops (libvirt removes its status file): at the next rescan its GPUs are idle
    // and no more usage is booked.
    std::fs::remove_file(run.path().join("gpu-vm.xml")).unwrap();
    let mut later = Vec::new();
    for _ in 0..30 {
        clock.advance(Duration::from_secs(1));
        later.extend(sampler.tick(&tenants).windows);
    }
    later.extend(sampler.flush());
    let booked: f64 = later.iter().map(|w| w.gpu_seconds).sum();
    assert!(booked <= 8.0 * 10.0, "at most one rescan interval more: {booked}");
    let report = sampler.tick(&tenants);
    assert!(report.passthrough.iter().all(|g| !matches!(g.state, PciState::Assigned { .. })));
}
