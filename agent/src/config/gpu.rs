//! `[gpu]`: GPU sampling through NVML.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[gpu]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Sample GPUs (and, in enforce mode, set compute modes). A host without NVML runs on,
    /// reporting the GPU backend unavailable.
    pub enabled: bool,
    /// `libnvidia-ml.so`: a bare name (searched like dlopen does) or a path.
    pub nvml_library: PathBuf,
    /// Replay this recorded trace (`kycctl gpu record`) in a loop instead of reading NVML:
    /// for demos and tests on machines without GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_trace: Option<PathBuf>,
    /// Milliseconds between samples.
    pub interval_ms: u64,
    /// Seconds per usage window.
    pub window_s: u64,
    /// A CSV laid over the built-in per-precision peak table (columns by header as in
    /// `agent/data/gpu-peaks.csv`, or the older bf16/fp8 format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops_file: Option<PathBuf>,
    /// `training_like`: at least this many GPUs …
    pub training_min_gpus: u32,
    /// … each at least this busy (percent) …
    pub training_min_activity_pct: u32,
    /// … for at least this many minutes.
    pub training_min_minutes: u64,
    /// A VM holding passed-through GPUs whose guest (`kycd guest`) has sent no telemetry for
    /// this many seconds is in a guest telemetry gap (status, metric, audit record, and the
    /// collector's `guest_telemetry_gap` finding).
    pub guest_telemetry_timeout_s: u64,
    /// Where sysfs is mounted: the PCI bus (`bus/pci/devices`) is read there for GPUs passed
    /// through to VMs. `/sys` on a host; another tree only in tests.
    pub sysfs_root: PathBuf,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            nvml_library: PathBuf::from(crate::gpu::nvml::DEFAULT_LIBRARY),
            replay_trace: None,
            interval_ms: 1000,
            window_s: 60,
            peak_flops_file: None,
            training_min_gpus: 8,
            training_min_activity_pct: 50,
            training_min_minutes: 10,
            guest_telemetry_timeout_s: 120,
            sysfs_root: PathBuf::from("/sys"),
        }
    }
}
