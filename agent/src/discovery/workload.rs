//! Workloads: what on this host a decision is about.
//!
//! A workload is named by the same `(kind, id)` pair an attestation's `binding` uses, so an
//! attestation binds to a workload by equality of that pair. Its string form `kind:id`
//! (e.g. `libvirt_domain:6f1c…`, `unix_user:1001`, `cgroup:/kubepods.slice/…`, `host:host`)
//! is what operators type (`kycctl admit --workload`) and what the audit log records.

use std::fmt;
use std::str::FromStr;

use kycd_protocol::BindingKind;

/// Identity of a workload on this host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    /// Kind (same vocabulary as attestation bindings).
    pub kind: WorkloadKind,
    /// Id within the kind.
    pub id: String,
}

/// Kind of workload; mirrors [`BindingKind`] with a total order for stable output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    /// A cgroup v2 path.
    Cgroup,
    /// A libvirt domain.
    LibvirtDomain,
    /// A Unix user's slice.
    UnixUser,
    /// The whole host.
    Host,
}

impl WorkloadKind {
    /// The wire name (as in attestation bindings).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Cgroup => "cgroup",
            WorkloadKind::LibvirtDomain => "libvirt_domain",
            WorkloadKind::UnixUser => "unix_user",
            WorkloadKind::Host => "host",
        }
    }
}

impl From<BindingKind> for WorkloadKind {
    fn from(k: BindingKind) -> Self {
        match k {
            BindingKind::Cgroup => WorkloadKind::Cgroup,
            BindingKind::LibvirtDomain => WorkloadKind::LibvirtDomain,
            BindingKind::UnixUser => WorkloadKind::UnixUser,
            BindingKind::Host => WorkloadKind::Host,
        }
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// Why a `kind:id` string is not a workload id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workload must be KIND:ID with KIND one of cgroup, libvirt_domain, unix_user, host; got {0:?}")]
pub struct BadWorkloadId(pub String);

impl FromStr for WorkloadId {
    type Err = BadWorkloadId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadWorkloadId(s.chars().take(80).collect());
        let (kind, id) = s.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "cgroup" => WorkloadKind::Cgroup,
            "libvirt_domain" => WorkloadKind::LibvirtDomain,
            "unix_user" => WorkloadKind::UnixUser,
            "host" => WorkloadKind::Host,
            _ => return Err(bad()),
        };
        if id.is_empty() || id.chars().any(char::is_control) {
            return Err(bad());
        }
        Ok(WorkloadId { kind, id: id.to_owned() })
    }
}

impl WorkloadId {
    /// The one workload that stands for the whole host.
    pub fn host() -> Self {
        WorkloadId { kind: WorkloadKind::Host, id: "host".into() }
    }

    /// The workload an attestation binding names. A `host` binding's id is a label for the
    /// issuer's benefit; every host binding names this host's single host workload.
    pub fn from_binding(binding: &kycd_protocol::Binding) -> Self {
        match binding.kind {
            kycd_protocol::BindingKind::Host => WorkloadId::host(),
            kind => WorkloadId { kind: kind.into(), id: binding.id.clone() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_kind_id() {
        for s in ["cgroup:/machine.slice/a.scope", "libvirt_domain:vm-1", "unix_user:1001", "host:host"] {
            let id: WorkloadId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        for bad in ["", "vm-1", "pod:x", "host:", "unix_user:1\n"] {
            assert!(bad.parse::<WorkloadId>().is_err(), "{bad:?}");
        }
    }
}
