//! GPUs the host's driver cannot see: passed through to VMs (bound to `vfio-pci`).
//!
//! NVML lists only GPUs bound to the `nvidia` driver. A GPU passed through to a libvirt
//! domain is bound to `vfio-pci` and invisible to it, yet the domain's tenant may be training
//! on it. The host still knows exactly what it allocated: every running domain's status XML
//! (`/run/libvirt/qemu/NAME.xml`) names the host PCI addresses of its `<hostdev type='pci'>`
//! devices ([`crate::discovery::libvirt::domain_pci_hostdevs`]), and sysfs
//! (`/sys/bus/pci/devices/ADDR/{vendor,device,class,driver,iommu_group}`) says what each
//! address is. A PCI ID table (`agent/data/gpu-pci-ids.csv`) names the model, and so its
//! peaks ([`super::peaks`]).
//!
//! Every NVIDIA display or 3D controller in sysfs is then one of:
//! - **assigned**: bound to `vfio-pci` and held by a running domain: accounted to the domain's
//!   tenant by allocation (method `allocation`: GPU-seconds held, upper bound = the GPU's
//!   fastest-precision peak × time, lower bound and point estimate 0);
//! - **idle**: bound to `vfio-pci`, no running domain holds it;
//! - **host**: bound to the `nvidia` driver (NVML measures it);
//! - **unaccounted**: bound to no driver or another one: nobody measures it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kycd_protocol::EstimationMethod;

use super::estimate::Bounds;
use super::guest::host::{GuestStatus, GuestTelemetry, HeldGpu};
use super::peaks::{PeakTable, Rates};
use super::sampler::TenantMap;
use super::usage::{Observation, UsageKey};
use crate::discovery::workload::{WorkloadId, WorkloadKind};

const PCI_IDS_CSV: &str = include_str!("../../data/gpu-pci-ids.csv");

/// PCI vendor ID of NVIDIA.
const NVIDIA: &str = "0x10de";

/// How a GPU on the PCI bus is accounted for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PciState {
    /// Passed through to this running domain.
    Assigned {
        /// The libvirt domain name.
        domain: String,
    },
    /// Bound to `vfio-pci`, held by no running domain.
    Idle,
    /// Bound to the `nvidia` driver: NVML's.
    Host,
    /// Bound to no driver, or to another one.
    Unaccounted {
        /// The driver, if any.
        driver: Option<String>,
    },
}

impl PciState {
    /// The state's name, for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            PciState::Assigned { .. } => "assigned",
            PciState::Idle => "idle",
            PciState::Host => "host",
            PciState::Unaccounted { .. } => "unaccounted",
        }
    }
}

/// One NVIDIA GPU on the PCI bus.
#[derive(Debug, Clone, PartialEq)]
pub struct PciGpu {
    /// PCI address, `0000:17:00.0`.
    pub address: String,
    /// `10de:2330`.
    pub pci_id: String,
    /// The model (as NVML would name it), from the PCI ID table; `None` for an unknown ID.
    pub model: Option<String>,
    /// The IOMMU group.
    pub iommu_group: Option<u32>,
    /// How it is accounted for.
    pub state: PciState,
    /// Its peak rates (all `None` for an unknown model).
    pub rates: Rates,
}

impl PciGpu {
    /// The pseudo-UUID usage windows count it under (NVML has no UUID for it).
    pub fn uuid(&self) -> String {
        format!("PCI-{}", self.address)
    }
}

/// The default `gpu.guest_telemetry_timeout_s`, in ms.
pub const DEFAULT_GUEST_TIMEOUT_MS: i64 = 120_000;

/// Where to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughOptions {
    /// libvirt's status directory (`workloads.libvirt_status_dir`).
    pub libvirt_status_dir: PathBuf,
    /// The sysfs mount (`/sys`; tests use a tree of their own).
    pub sysfs_root: PathBuf,
    /// A domain whose guest has sent no telemetry for this long is in a guest telemetry gap
    /// (`gpu.guest_telemetry_timeout_s`).
    pub guest_timeout_ms: i64,
}

/// Maps PCI IDs to model names.
#[derive(Debug, Clone)]
pub struct PciIds(BTreeMap<String, String>);

impl PciIds {
    /// The table compiled into the agent.
    pub fn builtin() -> Self {
        let rows = PCI_IDS_CSV
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .skip(1)
            .filter_map(|l| l.split_once(','))
            .map(|(id, name)| (id.trim().to_ascii_lowercase(), name.trim().to_owned()))
            .collect();
        PciIds(rows)
    }

    /// The model name of `pci_id` (`10de:2330`).
    pub fn model(&self, pci_id: &str) -> Option<&str> {
        self.0.get(&pci_id.to_ascii_lowercase()).map(String::as_str)
    }
}

/// How often the PCI bus and the domains' status XML are read again: assignments change when
/// a domain starts or stops, not between two ticks.
pub const RESCAN_MS: i64 = 10_000;

/// The sampler's view of passed-through GPUs, rescanned every [`RESCAN_MS`].
#[derive(Debug)]
pub struct PassthroughAccounting {
    options: PassthroughOptions,
    ids: PciIds,
    gpus: Vec<PciGpu>,
    scanned_at_ms: Option<i64>,
    guests: GuestTelemetry,
    /// Running domains' UUIDs (lower case) → names, for vGPUs NVML names by VM UUID.
    domains_by_uuid: BTreeMap<String, String>,
}

impl PassthroughAccounting {
    /// Accounting over `options`; nothing is read before the first [`Self::refresh`].
    pub fn new(options: PassthroughOptions) -> Self {
        let guests = GuestTelemetry::new(options.guest_timeout_ms);
        PassthroughAccounting {
            options,
            ids: PciIds::builtin(),
            gpus: Vec::new(),
            scanned_at_ms: None,
            guests,
            domains_by_uuid: BTreeMap::new(),
        }
    }

    /// Rescans when [`RESCAN_MS`] have passed (or never scanned), logging GPUs that became
    /// idle or unaccounted.
    pub fn refresh(&mut self, now_ms: i64, peaks: &PeakTable) {
        if self.scanned_at_ms.is_some_and(|at| (0..RESCAN_MS).contains(&(now_ms - at))) {
            return;
        }
        let gpus = scan(&self.options, &self.ids, peaks);
        for g in &gpus {
            let before = self.gpus.iter().find(|b| b.address == g.address).map(|b| &b.state);
            if before == Some(&g.state) {
                continue;
            }
            match &g.state {
                PciState::Unaccounted { driver } => {
                    tracing::warn!(pci = %g.address, model = ?g.model, ?driver,
                    "NVIDIA GPU bound to no driver or an unknown one: its use is neither measured nor accounted")
                }
                PciState::Idle => {
                    tracing::info!(pci = %g.address, model = ?g.model, "GPU bound to vfio-pci, held by no running domain")
                }
                PciState::Assigned { domain } => tracing::info!(pci = %g.address, model = ?g.model, %domain,
                    "GPU passed through to a domain: accounted by allocation"),
                PciState::Host => {}
            }
        }
        self.gpus = gpus;
        self.scanned_at_ms = Some(now_ms);
        let running: Vec<String> = match crate::discovery::cgroup::libvirt_domains(
            &self.options.libvirt_status_dir,
        ) {
            Ok(domains) => {
                self.domains_by_uuid =
                    domains.iter().filter_map(|d| Some((d.uuid.clone()?, d.name.clone()))).collect();
                domains.into_iter().map(|d| d.name).collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list libvirt's running domains; vGPU owners kept from the last scan");
                self.domains_by_uuid.values().cloned().collect()
            }
        };
        self.guests.update(now_ms, self.holding(&running));
    }

    /// The running domain with this UUID (as of the last rescan).
    pub fn domain_by_uuid(&self, uuid: &str) -> Option<&str> {
        self.domains_by_uuid.get(&uuid.to_ascii_lowercase()).map(String::as_str)
    }

    /// Each running domain that holds GPUs or has the telemetry channel: its GPUs and its
    /// channel socket.
    fn holding(&self, running: &[String]) -> BTreeMap<String, (Vec<HeldGpu>, Option<PathBuf>)> {
        let channel_of = |domain: &str| {
            crate::discovery::libvirt::domain_telemetry_channel(&self.options.libvirt_status_dir, domain)
                .unwrap_or_else(|e| {
                    tracing::warn!(%domain, error = %e, "cannot read the domain's status XML for its telemetry channel");
                    None
                })
        };
        let mut holding: BTreeMap<String, (Vec<HeldGpu>, Option<PathBuf>)> = running
            .iter()
            .filter_map(|d| channel_of(d).map(|c| (d.clone(), (Vec::new(), Some(c)))))
            .collect();
        for g in &self.gpus {
            let PciState::Assigned { domain } = &g.state else { continue };
            let entry = holding.entry(domain.clone()).or_insert_with(|| (Vec::new(), channel_of(domain)));
            entry.0.push(HeldGpu {
                address: g.address.clone(),
                pci_id: g.pci_id.clone(),
                model: g.model.clone(),
                fastest: g.rates.bf16.and(g.rates.fastest_tensor()),
            });
        }
        holding
    }

    /// Reads the guests' telemetry channels (every tick; never blocks).
    pub fn poll_guests(&mut self, now_ms: i64) {
        self.guests.poll(now_ms);
    }

    /// Every domain's guest telemetry.
    pub fn guest_status(&self, now_ms: i64) -> Vec<GuestStatus> {
        self.guests.status(now_ms)
    }

    /// The GPUs as last scanned.
    pub fn gpus(&self) -> &[PciGpu] {
        &self.gpus
    }

    /// One observation per assigned GPU for the tick: the domain's workload and tenant, the
    /// GPU's BF16 peak, upper bound its fastest rate; lower bound and point estimate the
    /// guest's fresh rate ([`EstimationMethod::GuestReported`]) or 0
    /// ([`EstimationMethod::Allocation`], flagged when the guest is in a telemetry gap).
    pub fn observations(&self, tenants: &TenantMap, now_ms: i64) -> Vec<Observation> {
        self.gpus
            .iter()
            .filter_map(|g| {
                let PciState::Assigned { domain } = &g.state else { return None };
                let workload = WorkloadId { kind: WorkloadKind::LibvirtDomain, id: domain.clone() };
                let tenant = tenants.get(&workload);
                let guest = self.guests.rate(domain, &g.address, now_ms);
                let ops_per_s = g.rates.bf16.and(g.rates.fastest_tensor()).map(|upper| Bounds {
                    lower: guest.map_or(0.0, |r| r.lower),
                    point: guest.map_or(0.0, |r| r.point),
                    upper,
                });
                Some(Observation {
                    key: UsageKey {
                        tenant: tenant.map(|t| t.tenant.clone()),
                        workload,
                        foreign_person: tenant.is_some_and(|t| t.foreign_person),
                    },
                    gpu_uuid: g.uuid(),
                    peak_flops: g.rates.bf16,
                    method: match (ops_per_s, guest) {
                        (None, _) => EstimationMethod::Unknown,
                        (Some(_), Some(_)) => EstimationMethod::GuestReported,
                        (Some(_), None) => EstimationMethod::Allocation,
                    },
                    ops_per_s,
                    // Without the guest's word, nothing is known of how busy it is.
                    activity: guest.map_or(0.0, |r| r.activity),
                    shared: false,
                    guest_gap: self.guests.in_gap(domain, &g.address, now_ms),
                })
            })
            .collect()
    }
}

/// Every NVIDIA GPU on the PCI bus and how it is accounted for, now. Errors reading one
/// device or one domain are logged and skip that device or domain; a host without sysfs or
/// libvirt has none.
pub fn scan(options: &PassthroughOptions, ids: &PciIds, peaks: &PeakTable) -> Vec<PciGpu> {
    let holders = domain_holders(&options.libvirt_status_dir);
    let devices = options.sysfs_root.join("bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(&devices) else { return Vec::new() };
    let mut gpus: Vec<PciGpu> = entries
        .flatten()
        .filter_map(|e| {
            let address = e.file_name().to_string_lossy().into_owned();
            read_gpu(&e.path(), address, ids, peaks, &holders)
        })
        .collect();
    gpus.sort_by(|a, b| a.address.cmp(&b.address));
    gpus
}

/// PCI address → the running domain that holds it.
fn domain_holders(status_dir: &Path) -> BTreeMap<String, String> {
    let mut holders = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(status_dir) else { return holders };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(domain) = file.strip_suffix(".xml") else { continue };
        match crate::discovery::libvirt::domain_pci_hostdevs(status_dir, domain) {
            Ok(addresses) => {
                for address in addresses {
                    holders.insert(address, domain.to_owned());
                }
            }
            Err(e) => {
                tracing::warn!(%domain, error = %e, "cannot read the domain's status XML; its passed-through GPUs are not accounted this time")
            }
        }
    }
    holders
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_ascii_lowercase())
}

/// The last path component of a sysfs symlink (`driver` → `vfio-pci`).
fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn read_gpu(
    dir: &Path,
    address: String,
    ids: &PciIds,
    peaks: &PeakTable,
    holders: &BTreeMap<String, String>,
) -> Option<PciGpu> {
    if read_trimmed(&dir.join("vendor"))? != NVIDIA {
        return None;
    }
    // Display (0x0300) and 3D (0x0302) controllers; not the GPUs' audio or USB functions.
    let class = read_trimmed(&dir.join("class"))?;
    if !(class.starts_with("0x0300") || class.starts_with("0x0302")) {
        return None;
    }
    let device = read_trimmed(&dir.join("device"))?;
    let pci_id = format!("10de:{}", device.strip_prefix("0x").unwrap_or(&device));
    let model = ids.model(&pci_id).map(str::to_owned);
    let rates = model.as_deref().map(|m| peaks.peaks(m, None, None, None).rates).unwrap_or_default();
    let driver = link_name(&dir.join("driver"));
    let state = match (driver.as_deref(), holders.get(&address)) {
        (Some("vfio-pci"), Some(domain)) => PciState::Assigned { domain: domain.clone() },
        (Some("vfio-pci"), None) => PciState::Idle,
        (Some("nvidia"), _) => PciState::Host,
        _ => PciState::Unaccounted { driver },
    };
    let iommu_group = link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
    Some(PciGpu { address, pci_id, model, iommu_group, state, rates })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs PCI device as the kernel lays it out (files, and symlinks for driver and
    /// IOMMU group).
    pub(crate) fn device(
        root: &Path,
        address: &str,
        vendor: &str,
        device: &str,
        class: &str,
        driver: Option<&str>,
    ) {
        let dir = root.join("bus/pci/devices").join(address);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, value) in [("vendor", vendor), ("device", device), ("class", class)] {
            std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
        }
        if let Some(driver) = driver {
            std::os::unix::fs::symlink(format!("../../../../bus/pci/drivers/{driver}"), dir.join("driver"))
                .unwrap();
        }
        std::os::unix::fs::symlink("../../../../kernel/iommu_groups/42", dir.join("iommu_group")).unwrap();
    }

    #[test]
    fn every_nvidia_gpu_is_assigned_idle_host_or_unaccounted() {
        let sys = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        device(sys.path(), "0000:17:00.0", "0x10de", "0x2330", "0x030200", Some("vfio-pci"));
        device(sys.path(), "0000:17:00.1", "0x10de", "0x22a3", "0x040300", Some("snd_hda_intel")); // its audio
        device(sys.path(), "0000:2a:00.0", "0x10de", "0x2335", "0x030200", Some("vfio-pci"));
        device(sys.path(), "0000:3a:00.0", "0x10de", "0x2330", "0x030200", Some("nvidia"));
        device(sys.path(), "0000:4a:00.0", "0x10de", "0x9999", "0x030000", None);
        device(sys.path(), "0000:00:1f.0", "0x8086", "0x1234", "0x060100", Some("lpc_ich"));
        let xml = "<domstatus><domain><devices><hostdev mode='subsystem' type='pci' managed='yes'>\
            <source><address domain='0x0000' bus='0x17' slot='0x00' function='0x0'/></source></hostdev>\
            </devices></domain></domstatus>";
        std::fs::write(run.path().join("vm-a.xml"), xml).unwrap();
        let options = PassthroughOptions {
            libvirt_status_dir: run.path().to_owned(),
            sysfs_root: sys.path().to_owned(),
            guest_timeout_ms: DEFAULT_GUEST_TIMEOUT_MS,
        };
        let gpus = scan(&options, &PciIds::builtin(), &PeakTable::builtin().unwrap());
        let summary: Vec<(&str, Option<&str>, &PciState)> =
            gpus.iter().map(|g| (g.address.as_str(), g.model.as_deref(), &g.state)).collect();
        assert_eq!(
            summary,
            [
                (
                    "0000:17:00.0",
                    Some("NVIDIA H100 80GB HBM3"),
                    &PciState::Assigned { domain: "vm-a".into() }
                ),
                ("0000:2a:00.0", Some("NVIDIA H200"), &PciState::Idle),
                ("0000:3a:00.0", Some("NVIDIA H100 80GB HBM3"), &PciState::Host),
                ("0000:4a:00.0", None, &PciState::Unaccounted { driver: None }),
            ]
        );
        assert_eq!(
            (gpus[0].pci_id.as_str(), gpus[0].iommu_group, gpus[0].uuid()),
            ("10de:2330", Some(42), "PCI-0000:17:00.0".into())
        );
        assert_eq!(gpus[0].rates.fp8, Some(1978.9e12));
        assert_eq!(gpus[3].rates, Rates::default(), "unknown model: no peaks");
        // No sysfs, no libvirt: nothing, no error.
        let none = PassthroughOptions {
            libvirt_status_dir: "/nonexistent".into(),
            sysfs_root: "/nonexistent".into(),
            guest_timeout_ms: DEFAULT_GUEST_TIMEOUT_MS,
        };
        assert!(scan(&none, &PciIds::builtin(), &PeakTable::builtin().unwrap()).is_empty());
    }
}
