//! GPU sampling: the sampler on its own OS thread (NVML calls block), usage windows into a
//! bounded channel that the spool writer drains, tick reports to an observer that logs the
//! backend's state. Every task is tracked by the daemon's [`TaskTracker`] and stops with
//! its cancellation token (the sampler flushes its open window on the way out).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::gpu::metrics::GpuMetrics;
use crate::gpu::sampler::{GpuSampler, SamplerOptions, TenantMap, TickReport};

/// The sampler's metrics, shared with the request handler (status, `/metrics`, inventory).
pub(super) type SharedGpuMetrics = Arc<Mutex<GpuMetrics>>;

/// Starts GPU sampling (see the module docs); `None` when the sampler cannot start (logged).
pub(super) fn start(
    config: &Config,
    reporting: &crate::reporting::Reporting,
    backend: Box<dyn crate::gpu::GpuBackend>,
    tenants: tokio::sync::watch::Receiver<Arc<TenantMap>>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Option<SharedGpuMetrics> {
    let g = &config.gpu;
    let options = SamplerOptions {
        interval: Duration::from_millis(g.interval_ms),
        window: Duration::from_secs(g.window_s),
        training: crate::gpu::usage::TrainingRule {
            min_gpus: g.training_min_gpus,
            min_activity: f64::from(g.training_min_activity_pct) / 100.0,
            min_duration: Duration::from_secs(g.training_min_minutes.saturating_mul(60)),
        },
        proc_root: PathBuf::from("/proc"),
        cgroup_roots: config.workloads.roots.clone(),
        peak_override: g.peak_flops_file.clone(),
        passthrough: Some(crate::gpu::passthrough::PassthroughOptions {
            libvirt_status_dir: config.workloads.libvirt_status_dir.clone(),
            sysfs_root: g.sysfs_root.clone(),
            guest_timeout_ms: i64::try_from(g.guest_telemetry_timeout_s.saturating_mul(1000))
                .unwrap_or(i64::MAX),
        }),
    };
    let sampler = match GpuSampler::new(backend, &options) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "GPU sampler not started");
            return None;
        }
    };
    let (windows_tx, windows_rx) = crate::gpu::usage::window_channel(256);
    let (reports_tx, reports_rx) = mpsc::channel::<TickReport>(4);
    let sampler = match crate::gpu::sampler::spawn(sampler, tenants, windows_tx, Some(reports_tx), stop) {
        Ok(handle) => handle,
        Err(e) => {
            error!(error = %e, "GPU sampler thread not started");
            return None;
        }
    };
    tracker.spawn_blocking(move || {
        if sampler.join().is_err() {
            error!("the GPU sampler thread panicked");
        }
    });
    let metrics: SharedGpuMetrics = Arc::new(Mutex::new(GpuMetrics::default()));
    let sink_metrics = Arc::clone(&metrics);
    // The writer ends when the sampler's sender is gone (after its last window).
    let sink = reporting.spawn_writer(windows_rx, move |w| {
        if let Ok(mut m) = sink_metrics.lock() {
            m.observe_window(w);
        }
        if w.training_like {
            info!(tenant = ?w.tenant, workload = %w.workload, gpus = w.max_concurrent_gpus,
                  ops_lower = w.lower_ops(), estimated_ops = w.estimated_ops, ops_upper = w.upper_ops(),
                  method = w.method.as_str(), "training-like GPU usage window");
        } else {
            debug!(tenant = ?w.tenant, workload = %w.workload, gpu_seconds = w.gpu_seconds,
                   ops_lower = w.lower_ops(), estimated_ops = w.estimated_ops, ops_upper = w.upper_ops(),
                   method = w.method.as_str(), "GPU usage window");
        }
    });
    tracker.spawn(async move {
        let _ = sink.await;
    });
    tracker.spawn(observe(reports_rx, Arc::clone(&metrics)));
    Some(metrics)
}

/// Logs the backend's availability, lost GPUs (once each) and workloads under `exclusive_gpu`
/// sharing a GPU (when it starts and when it ends), and feeds the metrics.
async fn observe(mut reports: mpsc::Receiver<TickReport>, metrics: SharedGpuMetrics) {
    let mut available = None;
    let mut lost = BTreeSet::new();
    let mut sharing: BTreeSet<(String, String)> = BTreeSet::new();
    while let Some(report) = reports.recv().await {
        let now: BTreeSet<(String, String)> = report
            .exclusivity_violations
            .iter()
            .map(|v| (v.workload.to_string(), v.gpu_uuid.clone()))
            .collect();
        for v in &report.exclusivity_violations {
            if !sharing.contains(&(v.workload.to_string(), v.gpu_uuid.clone())) {
                warn!(tenant = %v.tenant, workload = %v.workload, gpu = %v.gpu_uuid, users = v.users,
                      "workload under the exclusive_gpu condition shares a GPU: its operations cannot be \
                       attributed to it alone (reported as shared GPU time)");
            }
        }
        for (workload, gpu) in sharing.difference(&now) {
            info!(%workload, %gpu, "workload under the exclusive_gpu condition no longer shares the GPU");
        }
        sharing = now;
        if let Ok(mut m) = metrics.lock() {
            m.observe_tick(&report);
        }
        match &report.sample.backend {
            crate::gpu::BackendState::Unavailable { reason } if available != Some(false) => {
                warn!(%reason, "GPU backend unavailable: GPU usage is not measured");
                available = Some(false);
            }
            crate::gpu::BackendState::Ok if available != Some(true) => {
                info!(gpus = report.sample.gpus.len(), "GPU backend available");
                available = Some(true);
            }
            _ => {}
        }
        for gpu in &report.lost_gpus {
            if lost.insert(gpu.clone()) {
                error!(%gpu, "GPU lost (fell off the bus); its usage is no longer measured");
            }
        }
    }
}

/// Queues the sampler's findings (guest telemetry gaps begun and ended) for the audit log.
pub(super) fn record_events(agent: &mut crate::core::Agent, metrics: Option<&SharedGpuMetrics>) {
    let events = metrics.and_then(|m| m.lock().ok().map(|mut m| m.take_audit_events())).unwrap_or_default();
    for event in events {
        agent.record(event);
    }
}

/// The GPU inventory for host statements (empty without a sampler).
pub(super) fn inventory(metrics: Option<&SharedGpuMetrics>) -> Vec<kycd_protocol::GpuInventoryEntry> {
    metrics
        .and_then(|m| {
            m.lock().ok().map(|m| {
                m.inventory()
                    .map(|(uuid, name)| kycd_protocol::GpuInventoryEntry {
                        uuid: uuid.into(),
                        name: name.into(),
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}
