//! Known workloads: the cgroup tree and libvirt's status directory rescanned, libvirt
//! bindings by UUID resolved to running domains, and when each workload was first seen
//! (persisted, so restarting neither the agent nor a VM restarts a grace period).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use super::intake::Attested;
use super::{Agent, AuditEvent};
use crate::discovery::cgroup;
use crate::discovery::workload::{WorkloadId, WorkloadKind};

/// File in the state directory holding when each workload was first seen.
const FIRST_SEEN_FILE: &str = "first_seen.json";

/// When a workload was first seen and, if it is gone, when it vanished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Seen {
    first: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vanished_at: Option<i64>,
}

/// The first-seen file: the current form, or the bare `id → time` map of earlier releases.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SeenFile {
    Current(BTreeMap<String, Seen>),
    Legacy(BTreeMap<String, i64>),
}

/// Loads persisted first-seen times. A missing file starts empty (first start); a corrupt
/// one is an error, which the caller turns into "seen long ago" (grace already over).
pub(super) fn load_first_seen(state_dir: &Path) -> Result<BTreeMap<String, Seen>, String> {
    let path = state_dir.join(FIRST_SEEN_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<SeenFile>(&bytes) {
            Ok(SeenFile::Current(map)) => Ok(map),
            Ok(SeenFile::Legacy(map)) => {
                Ok(map.into_iter().map(|(k, first)| (k, Seen { first, vanished_at: None })).collect())
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A workload on the host (or attested before it exists).
#[derive(Debug, Clone)]
pub(super) struct WorkloadState {
    pub(super) first_seen: i64,
    pub(super) cgroup: Option<PathBuf>,
    /// Tap interfaces, for a running libvirt domain (refreshed on every rescan).
    pub(super) interfaces: Vec<String>,
}

impl Agent {
    /// Re-reads the cgroup tree and libvirt's status directory.
    pub(super) fn rescan_workloads(&mut self) {
        let now = self.now();
        let status_dir = self.config.workloads.libvirt_status_dir.clone();
        match cgroup::libvirt_domains(&status_dir) {
            Ok(domains) => {
                if self.read_failing.remove(&status_dir) {
                    info!(dir = %status_dir.display(), "libvirt status readable again");
                }
                if domains != self.libvirt_domains {
                    // Bindings by UUID may resolve differently now.
                    self.all_stale();
                }
                self.libvirt_domains = domains;
            }
            // Keep the domains known before: a UUID binding must not come loose because the
            // agent is short of descriptors.
            Err(e) => self.read_failed(&status_dir, &e),
        }
        // An admitted domain is known by its status XML once it runs; one that never started
        // is forgotten after an hour.
        let running: BTreeSet<&str> = self.libvirt_domains.iter().filter_map(|d| d.uuid.as_deref()).collect();
        let admitted = self.admitted_domains.len();
        self.admitted_domains.retain(|uuid, (_, at)| !running.contains(uuid.as_str()) && now - *at < 3600);
        if self.admitted_domains.len() != admitted {
            self.all_stale();
        }
        let discovery = match &self.cgroup_mount {
            Some(mount) => cgroup::discover(mount, &self.config.workloads.roots, &self.libvirt_domains),
            None => cgroup::Discovery {
                found: vec![cgroup::Discovered { id: WorkloadId::host(), cgroup: None }],
                unreadable_roots: Vec::new(),
            },
        };
        for root in &discovery.unreadable_roots {
            warn!(root = %root.display(), "cannot read a workload root; keeping the workloads known under it");
        }
        let mut keep: BTreeSet<WorkloadId> = discovery.found.iter().map(|d| d.id.clone()).collect();
        // Attested workloads stay known while absent from the tree (a VM between admission
        // and start), and so do those under a root that could not be read this time.
        keep.extend(self.attestations.values().map(|a| self.resolve(&a.workload)));
        keep.extend(self.workloads.iter().filter_map(|(id, w)| {
            let cgroup = w.cgroup.as_ref()?;
            discovery.unreadable_roots.iter().any(|r| cgroup.starts_with(r)).then(|| id.clone())
        }));
        let vanished: Vec<WorkloadId> =
            self.workloads.keys().filter(|id| !keep.contains(id)).cloned().collect();
        for id in vanished {
            self.workloads.remove(&id);
            if let Some(seen) = self.first_seen.get_mut(&id.to_string()) {
                seen.vanished_at = Some(now);
                self.first_seen_dirty = true;
            }
            info!(workload = %id, "workload vanished");
            self.record(AuditEvent::WorkloadVanished { workload: id.to_string() });
            self.stale.workloads.insert(id);
        }
        for d in discovery.found {
            let interfaces = if d.id.kind == WorkloadKind::LibvirtDomain {
                let status_file = status_dir.join(format!("{}.xml", d.id.id));
                match crate::discovery::libvirt::domain_interfaces(&status_dir, &d.id.id) {
                    Ok(interfaces) => {
                        self.read_failing.remove(&status_file);
                        interfaces
                    }
                    // Keep the taps known before: a network block must not lift because the
                    // status file could not be read this time.
                    Err(e) => {
                        self.read_failed(&status_file, &e);
                        self.workloads.get(&d.id).map(|w| w.interfaces.clone()).unwrap_or_default()
                    }
                }
            } else {
                Vec::new()
            };
            match self.workloads.get_mut(&d.id) {
                Some(w) => {
                    if w.cgroup != d.cgroup || w.interfaces != interfaces {
                        self.reconcile_due = true;
                    }
                    w.cgroup = d.cgroup;
                    w.interfaces = interfaces;
                }
                None => {
                    let first_seen = self.first_seen_of(&d.id);
                    info!(workload = %d.id, first_seen, "workload discovered");
                    self.stale.workloads.insert(d.id.clone());
                    self.workloads.insert(d.id, WorkloadState { first_seen, cgroup: d.cgroup, interfaces });
                    self.reconcile_due = true;
                }
            }
        }
        let forget_before = now.saturating_sub_unsigned(self.config.workloads.forget_after_s);
        let before = self.first_seen.len();
        self.first_seen.retain(|_, seen| seen.vanished_at.is_none_or(|t| t >= forget_before));
        self.first_seen_dirty |= self.first_seen.len() != before;
    }

    /// Knows `id` from now on (attested or admitted before it exists, e.g. a VM about to
    /// start), first seen now unless seen before.
    pub(super) fn ensure_workload(&mut self, id: &WorkloadId) {
        if !self.workloads.contains_key(id) {
            let first_seen = self.first_seen_of(id);
            self.workloads
                .insert(id.clone(), WorkloadState { first_seen, cgroup: None, interfaces: Vec::new() });
        }
    }

    /// The attestation in force for each workload: the most recently issued one bound to
    /// it (ties broken by `jti`, so the choice is deterministic).
    pub(super) fn attestations_in_force(&self) -> BTreeMap<WorkloadId, &Attested> {
        let mut best: BTreeMap<WorkloadId, &Attested> = BTreeMap::new();
        for a in self.attestations.values() {
            let slot = best.entry(self.resolve(&a.workload)).or_insert(a);
            if (a.claims.iat, &a.claims.jti) > (slot.claims.iat, &slot.claims.jti) {
                *slot = a;
            }
        }
        best
    }

    /// Workload → tenant for every attestation in force and within its validity window: whom
    /// GPU usage is attributed to. (Its verdict does not matter: a denied tenant's usage is
    /// still that tenant's; its conditions say whether it must not share a GPU.)
    pub fn tenant_map(&self) -> crate::gpu::sampler::TenantMap {
        let now = self.now();
        let skew = i64::try_from(self.config.clock_skew_s).unwrap_or(i64::MAX);
        self.attestations_in_force()
            .into_iter()
            .filter(|(_, a)| {
                a.claims.exp > now.saturating_sub(skew)
                    && a.claims.nbf.is_none_or(|n| n <= now.saturating_add(skew))
            })
            .map(|(id, a)| {
                let exclusive_gpu = self
                    .decisions
                    .get(&id)
                    .and_then(|d| d.conditions.as_ref())
                    .is_some_and(|c| c.exclusive_gpu);
                let info = crate::gpu::sampler::TenantInfo {
                    tenant: a.claims.sub.clone(),
                    foreign_person: a.claims.foreign_person,
                    exclusive_gpu,
                };
                (id, info)
            })
            .collect()
    }

    /// The workload a binding names on this host: a libvirt domain bound by UUID is the
    /// running domain with that UUID, named as in the cgroup tree.
    pub(super) fn resolve(&self, id: &WorkloadId) -> WorkloadId {
        if id.kind == WorkloadKind::LibvirtDomain {
            let uuid = id.id.to_ascii_lowercase();
            if let Some(d) = self.libvirt_domains.iter().find(|d| d.uuid.as_deref() == Some(uuid.as_str())) {
                return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: d.name.clone() };
            }
            if let Some((name, _)) = self.admitted_domains.get(&uuid) {
                // A running domain of that name with another UUID is another domain.
                let taken =
                    self.libvirt_domains.iter().any(|d| d.name == *name && d.uuid.as_deref() != Some(&uuid));
                if !taken {
                    return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: name.clone() };
                }
            }
        }
        id.clone()
    }

    /// When `id` was first seen: persisted if known (also after it vanished and came back),
    /// else now (and remembered).
    pub(super) fn first_seen_of(&mut self, id: &WorkloadId) -> i64 {
        let fallback = self.first_seen_fallback;
        let now = self.now();
        let seen = self
            .first_seen
            .entry(id.to_string())
            .or_insert_with(|| Seen { first: fallback.unwrap_or(now), vanished_at: None });
        let first = seen.first;
        if seen.vanished_at.take().is_some() || first == now || fallback.is_some() {
            self.first_seen_dirty = true;
        }
        first
    }

    pub(super) fn persist_first_seen(&mut self) {
        if !self.first_seen_dirty {
            return;
        }
        let path = self.config.state_dir.join(FIRST_SEEN_FILE);
        let body = serde_json::to_vec(&self.first_seen).unwrap_or_default();
        match crate::fsutil::write_atomic(&path, &body) {
            Ok(()) => self.first_seen_dirty = false,
            Err(e) => error!(error = %e, path = %path.display(), "cannot persist first-seen times; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_seen_file_reads_the_legacy_and_current_forms() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_first_seen(dir.path()).unwrap().is_empty(), "missing file: first start");
        std::fs::write(dir.path().join(FIRST_SEEN_FILE), r#"{"host:host":100}"#).unwrap();
        let map = load_first_seen(dir.path()).unwrap();
        assert_eq!(map["host:host"], Seen { first: 100, vanished_at: None });
        std::fs::write(dir.path().join(FIRST_SEEN_FILE), r#"{"a:b":{"first":5,"vanished_at":9}}"#).unwrap();
        assert_eq!(load_first_seen(dir.path()).unwrap()["a:b"], Seen { first: 5, vanished_at: Some(9) });
        std::fs::write(dir.path().join(FIRST_SEEN_FILE), "{not json").unwrap();
        assert!(load_first_seen(dir.path()).is_err(), "corrupt is an error, not a fresh start");
    }
}
