//! The GPU sampler's Prometheus metrics: per-GPU utilization, per-tenant GPU-seconds and
//! estimated operations, NVML errors. Fed from tick reports and usage windows by the daemon;
//! rendered in the Prometheus text format for the operator API's `/metrics`.
//!
//! Series:
//! - `kycd_gpu_backend_available` (gauge, 0/1)
//! - `kycd_gpu_utilization_ratio{gpu, name}` (gauge, 0..1; absent while unreadable)
//! - `kycd_gpu_seconds_total{tenant, workload}` (counter; tenant `""` = unattributed)
//! - `kycd_gpu_estimated_operations_total{tenant, workload}` (counter; the point estimate)
//! - `kycd_gpu_operations_lower_total{tenant, workload}`,
//!   `kycd_gpu_operations_upper_total{tenant, workload}` (counters; the bounds)
//! - `kycd_gpu_shared_seconds_total{tenant, workload}` (counter; GPU-seconds on a GPU shared
//!   without isolation)
//! - `kycd_gpu_pci_gpus{state}` (gauge; NVIDIA GPUs on the PCI bus by accounting state:
//!   `assigned` to a VM, `idle` on vfio-pci, `host` on the nvidia driver, `unaccounted`)
//! - `kycd_gpu_guest_gap_seconds_total{tenant, workload}` (counter; GPU-seconds a VM held
//!   passed-through GPUs while its guest sent no telemetry)
//! - `kycd_guest_telemetry_domains{state}` (gauge; VMs holding GPUs or having the telemetry
//!   channel, by guest telemetry state: `reporting`, `waiting`, `gap`, `no_gpus`)
//! - `kycd_guest_telemetry_gap{domain}` (gauge, 1 per VM in a guest telemetry gap)
//! - `kycd_nvml_errors_total{kind}` (counter; `unavailable` per failed sample, `gpu_lost`
//!   per GPU that fell off the bus)

use kycd_net::prometheus::{Exposition, Kind};
use std::collections::{BTreeMap, BTreeSet};

use kycd_protocol::UsageWindow;

use super::estimate::Bounds;
use super::guest::host::{GuestState, GuestStatus};
use super::passthrough::{PciGpu, PciState};
use super::sampler::TickReport;
use super::BackendState;
use crate::audit::AuditEvent;

/// The sampler's metrics; see the module docs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GpuMetrics {
    backend_available: bool,
    /// GPU UUID → (model name, utilization 0..1).
    utilization: BTreeMap<String, (String, f64)>,
    /// (tenant, workload) → GPU-seconds.
    gpu_seconds: BTreeMap<(String, String), f64>,
    /// (tenant, workload) → operations (lower, point, upper).
    operations: BTreeMap<(String, String), Bounds>,
    /// (tenant, workload) → GPU-seconds on shared GPUs.
    shared_seconds: BTreeMap<(String, String), f64>,
    /// Error kind → count.
    nvml_errors: BTreeMap<&'static str, u64>,
    /// GPUs already counted as lost (a lost GPU stays lost in every later report).
    lost: BTreeSet<String>,
    /// GPU UUID → model name, from the last sample that reached the driver.
    inventory: BTreeMap<String, String>,
    /// NVIDIA GPUs on the PCI bus (passthrough accounting), as last scanned.
    pci: Vec<PciGpu>,
    /// (tenant, workload) → GPU-seconds held with no guest telemetry.
    guest_gap_seconds: BTreeMap<(String, String), f64>,
    /// Guest telemetry per VM, as of the last tick.
    guests: Vec<GuestStatus>,
    /// Gap starts and ends not yet written to the audit log.
    audit: Vec<AuditEvent>,
}

impl GpuMetrics {
    /// Whether NVML answered the last sample (false before the first).
    pub fn backend_available(&self) -> bool {
        self.backend_available
    }

    /// The GPUs of the last sample that reached the driver: (UUID, name).
    pub fn inventory(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inventory.iter().map(|(u, n)| (u.as_str(), n.as_str()))
    }

    /// GPUs and usage as JSON (`kycctl gpus`, `kycctl usage`).
    pub fn to_json(&self) -> serde_json::Value {
        let gpus: Vec<serde_json::Value> = self
            .inventory
            .iter()
            .map(|(uuid, name)| {
                let utilization = self.utilization.get(uuid).map(|(_, r)| *r);
                serde_json::json!({"uuid": uuid, "name": name, "utilization": utilization})
            })
            .collect();
        let usage: Vec<serde_json::Value> = self
            .gpu_seconds
            .iter()
            .map(|(key, secs)| {
                let ops = self.operations.get(key).copied().unwrap_or_default();
                let shared = self.shared_seconds.get(key).copied().unwrap_or(0.0);
                let (tenant, workload) = key;
                serde_json::json!({"tenant": (!tenant.is_empty()).then_some(tenant), "workload": workload,
                    "gpu_seconds": secs, "ops_lower": ops.lower, "estimated_ops": ops.point,
                    "ops_upper": ops.upper, "shared_gpu_seconds": shared})
            })
            .collect();
        let pci: Vec<serde_json::Value> = self
            .pci
            .iter()
            .map(|g| {
                let domain = match &g.state {
                    PciState::Assigned { domain } => Some(domain.as_str()),
                    _ => None,
                };
                serde_json::json!({"pci": g.address, "pci_id": g.pci_id, "model": g.model,
                    "state": g.state.as_str(), "domain": domain, "iommu_group": g.iommu_group})
            })
            .collect();
        serde_json::json!({"backend_available": self.backend_available, "gpus": gpus, "usage": usage,
            "passthrough": pci, "guests": self.guest_status()})
    }

    /// Guest telemetry per VM, for the agent's status.
    pub fn guest_status(&self) -> Vec<crate::net::operator_api::GuestTelemetryStatus> {
        self.guests
            .iter()
            .map(|g| crate::net::operator_api::GuestTelemetryStatus {
                domain: g.domain.clone(),
                state: g.state.as_str().into(),
                reason: g.reason.map(|r| r.as_str().into()),
                gpus_held: g.gpus_held,
                gpus_reporting: g.gpus_reporting,
                connected: g.connected,
                last_report_ms: g.last_report_ms,
                accepted: g.accepted,
                refused: g.refused,
                capped: g.capped,
                last_error: g.last_error.clone(),
            })
            .collect()
    }

    /// Guest telemetry gaps that began or ended since the last call, for the audit log.
    pub fn take_audit_events(&mut self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.audit)
    }

    /// Notes gaps that began or ended (logged, and queued for the audit log).
    fn observe_guests(&mut self, now: &[GuestStatus]) {
        let in_gap = |list: &[GuestStatus], domain: &str| {
            list.iter().any(|g| g.domain == domain && g.state == GuestState::Gap)
        };
        for g in now.iter().filter(|g| g.state == GuestState::Gap && !in_gap(&self.guests, &g.domain)) {
            let reason = g.reason.map_or("stopped", |r| r.as_str());
            tracing::warn!(domain = %g.domain, reason, gpus = g.gpus_held, last_report_ms = ?g.last_report_ms,
                "guest telemetry gap: the VM holds passed-through GPUs and its guest is not reporting; \
                 its usage is known only by allocation");
            self.audit.push(AuditEvent::GuestTelemetryGap {
                domain: g.domain.clone(),
                reason: reason.into(),
                gpus: g.gpus_held,
                last_report_ms: g.last_report_ms,
            });
        }
        for g in self.guests.iter().filter(|g| g.state == GuestState::Gap && !in_gap(now, &g.domain)) {
            let holding = now.iter().any(|n| n.domain == g.domain && n.gpus_held > 0);
            tracing::info!(domain = %g.domain, holding, "guest telemetry gap ended");
            self.audit.push(AuditEvent::GuestTelemetryResumed { domain: g.domain.clone(), holding });
        }
        self.guests = now.to_vec();
    }

    /// Takes in one sampler tick.
    pub fn observe_tick(&mut self, report: &TickReport) {
        match &report.sample.backend {
            BackendState::Ok => {
                self.backend_available = true;
                self.inventory = report
                    .sample
                    .gpus
                    .iter()
                    .filter(|g| !g.uuid.is_empty())
                    .map(|g| (g.uuid.clone(), g.name.clone()))
                    .collect();
            }
            BackendState::Unavailable { .. } => {
                self.backend_available = false;
                *self.nvml_errors.entry("unavailable").or_default() += 1;
            }
        }
        self.utilization.clear();
        for gpu in &report.sample.gpus {
            if let Some(pct) = gpu.utilization_gpu_pct {
                self.utilization
                    .insert(gpu.uuid.clone(), (gpu.name.clone(), f64::from(pct.min(100)) / 100.0));
            }
        }
        self.pci.clone_from(&report.passthrough);
        self.observe_guests(&report.guests);
        for uuid in &report.lost_gpus {
            if self.lost.insert(uuid.clone()) {
                *self.nvml_errors.entry("gpu_lost").or_default() += 1;
            }
        }
    }

    /// Takes in one closed usage window.
    pub fn observe_window(&mut self, window: &UsageWindow) {
        let key = (window.tenant.clone().unwrap_or_default(), window.workload.clone());
        *self.gpu_seconds.entry(key.clone()).or_default() += window.gpu_seconds;
        *self.shared_seconds.entry(key.clone()).or_default() += window.shared_gpu_seconds;
        if window.guest_gap_gpu_seconds > 0.0 || self.guest_gap_seconds.contains_key(&key) {
            *self.guest_gap_seconds.entry(key.clone()).or_default() += window.guest_gap_gpu_seconds;
        }
        self.operations.entry(key).or_default().add(Bounds {
            lower: window.lower_ops(),
            point: window.estimated_ops,
            upper: window.upper_ops(),
        });
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Exposition::new();
        out.single(
            "kycd_gpu_backend_available",
            Kind::Gauge,
            "Whether NVML answered the last sample.",
            u8::from(self.backend_available),
        );
        out.family("kycd_gpu_utilization_ratio", Kind::Gauge, "GPU utilization in the last sample.");
        for (uuid, (name, ratio)) in &self.utilization {
            out.sample("kycd_gpu_utilization_ratio", &[("gpu", uuid), ("name", name)], ratio);
        }
        let pick = |f: fn(&Bounds) -> f64| -> BTreeMap<(String, String), f64> {
            self.operations.iter().map(|(k, b)| (k.clone(), f(b))).collect()
        };
        for (metric, help, values) in [
            ("kycd_gpu_seconds_total", "GPU-seconds used, per tenant and workload.", &self.gpu_seconds),
            (
                "kycd_gpu_estimated_operations_total",
                "Estimated operations (point estimate, BF16-equivalent on tensor cores), per tenant and workload.",
                &pick(|b| b.point),
            ),
            (
                "kycd_gpu_operations_lower_total",
                "Lower bound of operations (slowest precision per pipe), per tenant and workload.",
                &pick(|b| b.lower),
            ),
            (
                "kycd_gpu_operations_upper_total",
                "Upper bound of operations (fastest precision per pipe), per tenant and workload.",
                &pick(|b| b.upper),
            ),
            (
                "kycd_gpu_shared_seconds_total",
                "GPU-seconds on GPUs shared with another workload without isolation.",
                &self.shared_seconds,
            ),
            (
                "kycd_gpu_guest_gap_seconds_total",
                "GPU-seconds a VM held passed-through GPUs while its guest sent no telemetry.",
                &self.guest_gap_seconds,
            ),
        ] {
            out.family(metric, Kind::Counter, help);
            for ((tenant, workload), v) in values {
                out.sample(metric, &[("tenant", tenant), ("workload", workload)], v);
            }
        }
        out.family(
            "kycd_gpu_pci_gpus",
            Kind::Gauge,
            "NVIDIA GPUs on the PCI bus by how they are accounted for.",
        );
        for state in ["assigned", "idle", "host", "unaccounted"] {
            let n = self.pci.iter().filter(|g| g.state.as_str() == state).count();
            out.sample("kycd_gpu_pci_gpus", &[("state", state)], n);
        }
        out.family(
            "kycd_guest_telemetry_domains",
            Kind::Gauge,
            "VMs holding passed-through GPUs by guest telemetry state.",
        );
        for state in [GuestState::Reporting, GuestState::Waiting, GuestState::Gap, GuestState::NoGpus] {
            let n = self.guests.iter().filter(|g| g.state == state).count();
            out.sample("kycd_guest_telemetry_domains", &[("state", state.as_str())], n);
        }
        out.family(
            "kycd_guest_telemetry_gap",
            Kind::Gauge,
            "1 for each VM holding passed-through GPUs whose guest is not reporting.",
        );
        for g in self.guests.iter().filter(|g| g.state == GuestState::Gap) {
            out.sample("kycd_guest_telemetry_gap", &[("domain", &g.domain)], 1);
        }
        out.family("kycd_nvml_errors_total", Kind::Counter, "NVML failures by kind.");
        for (kind, n) in &self.nvml_errors {
            out.sample("kycd_nvml_errors_total", &[("kind", kind)], n);
        }
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuSnapshot, GpuState, Sample};
    use kycd_protocol::EstimationMethod;

    fn window(tenant: Option<&str>, gpu_seconds: f64, ops: f64) -> UsageWindow {
        serde_json::from_value(serde_json::json!({
            "tenant": tenant, "workload": "libvirt_domain:vm\"1", "foreign_person": true,
            "start": 0, "end": 60, "gpu_seconds": gpu_seconds, "gpus": 1, "max_concurrent_gpus": 1,
            "estimated_ops": ops, "ops_lower": ops / 2.0, "ops_upper": ops * 2.0,
            "shared_gpu_seconds": gpu_seconds / 9.0,
            "peak_flops": 1e15, "method": EstimationMethod::GpmPipes,
            "training_like": false, "merged_windows": 1
        }))
        .unwrap()
    }

    fn guest(domain: &str, state: GuestState, gpus_held: usize) -> GuestStatus {
        GuestStatus {
            domain: domain.into(),
            gpus_held,
            gpus_reporting: 0,
            channel: None,
            connected: false,
            last_report_ms: None,
            accepted: 0,
            refused: 0,
            capped: 0,
            last_error: None,
            state,
            reason: (state == GuestState::Gap).then_some(crate::gpu::guest::host::GapReason::NoChannel),
        }
    }

    #[test]
    fn guest_telemetry_gaps_begin_and_end_once_each_in_the_audit_log() {
        let mut m = GpuMetrics::default();
        let tick = |m: &mut GpuMetrics, guests: Vec<GuestStatus>| {
            m.observe_tick(&TickReport {
                guests,
                ..TickReport::empty(Sample::new(0, BackendState::Ok, vec![]))
            });
            m.take_audit_events().iter().map(AuditEvent::to_record).collect::<Vec<_>>()
        };
        assert!(tick(&mut m, vec![guest("a", GuestState::Waiting, 8), guest("b", GuestState::Waiting, 1)])
            .is_empty());
        let began = tick(&mut m, vec![guest("a", GuestState::Gap, 8), guest("b", GuestState::Gap, 1)]);
        assert_eq!(began.len(), 2, "{began:?}");
        assert_eq!(
            (began[0]["type"].as_str(), began[0]["reason"].as_str(), began[0]["gpus"].as_u64()),
            (Some("guest_telemetry_gap"), Some("no_channel"), Some(8))
        );
        assert!(
            tick(&mut m, vec![guest("a", GuestState::Gap, 8), guest("b", GuestState::Gap, 1)]).is_empty(),
            "once"
        );
        assert!(m.render().contains("kycd_guest_telemetry_gap{domain=\"a\"} 1"));
        // a reports again; b released its GPU but keeps the channel (no_gpus): both ended,
        // and only a still holds GPUs.
        let ended =
            tick(&mut m, vec![guest("a", GuestState::Reporting, 8), guest("b", GuestState::NoGpus, 0)]);
        let ended: Vec<_> = ended.iter().map(|e| (e["domain"].as_str(), e["holding"].as_bool())).collect();
        assert_eq!(ended, [(Some("a"), Some(true)), (Some("b"), Some(false))]);
        assert!(m.render().contains("kycd_guest_telemetry_domains{state=\"no_gpus\"} 1"));
    }

    #[test]
    fn renders_counters_gauges_and_escapes_labels() {
        let mut m = GpuMetrics::default();
        let mut gpu = GpuSnapshot::bare(0, "GPU-0".into(), "NVIDIA H100 80GB HBM3".into(), GpuState::Ok);
        gpu.utilization_gpu_pct = Some(75);
        let report = TickReport {
            dt: std::time::Duration::from_secs(1),
            lost_gpus: vec!["GPU-7".into()],
            ..TickReport::empty(Sample::new(0, BackendState::Ok, vec![gpu]))
        };
        m.observe_tick(&report);
        m.observe_tick(&report);
        m.observe_window(&window(Some("t-1"), 60.0, 1e16));
        m.observe_window(&window(Some("t-1"), 30.0, 5e15));
        m.observe_window(&window(None, 10.0, 0.0));
        let text = m.render();
        for line in [
            "kycd_gpu_backend_available 1",
            "kycd_gpu_utilization_ratio{gpu=\"GPU-0\",name=\"NVIDIA H100 80GB HBM3\"} 0.75",
            "kycd_gpu_seconds_total{tenant=\"t-1\",workload=\"libvirt_domain:vm\\\"1\"} 90",
            "kycd_gpu_estimated_operations_total{tenant=\"t-1\",workload=\"libvirt_domain:vm\\\"1\"} 15000000000000000",
            "kycd_gpu_seconds_total{tenant=\"\",workload=\"libvirt_domain:vm\\\"1\"} 10",
            // The window helper sends bounds of half and twice the estimate, and 5 s shared.
            "kycd_gpu_operations_lower_total{tenant=\"t-1\",workload=\"libvirt_domain:vm\\\"1\"} 7500000000000000",
            "kycd_gpu_operations_upper_total{tenant=\"t-1\",workload=\"libvirt_domain:vm\\\"1\"} 30000000000000000",
            "kycd_gpu_shared_seconds_total{tenant=\"t-1\",workload=\"libvirt_domain:vm\\\"1\"} 10",
            "kycd_nvml_errors_total{kind=\"gpu_lost\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        m.observe_tick(&TickReport { sample: Sample::unavailable(1, "x".into()), ..report });
        let text = m.render();
        assert!(text.contains("kycd_gpu_backend_available 0"));
        assert!(text.contains("kycd_nvml_errors_total{kind=\"unavailable\"} 1"));
        assert!(!text.contains("kycd_gpu_utilization_ratio{"), "no stale utilization:\n{text}");
    }
}
