//! `[workloads]`, `[audit]` and `[enforcement]`: what the agent decides about on this host,
//! where it records the decisions, and how it enforces them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[workloads]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The cgroup v2 mount; absent: found in `/proc/self/mountinfo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
    /// Cgroups under these (relative to the cgroup root) are workloads.
    pub roots: Vec<String>,
    /// Seconds between rescans of the cgroup tree (inotify catches most changes sooner).
    pub rescan_interval_s: u64,
    /// libvirt's status directory (`NAME.xml` per running domain), read to map domain
    /// UUIDs in attestation bindings to the domain names in cgroup scope names.
    pub libvirt_status_dir: PathBuf,
    /// How long a vanished workload's first-seen time is kept. A workload that comes back
    /// within this time (a VM restarted) continues its grace period instead of starting a
    /// new one.
    pub forget_after_s: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            cgroup_root: None,
            roots: vec![
                "machine.slice".into(),
                "machine".into(),
                "kubepods.slice".into(),
                "slurmstepd.scope".into(),
            ],
            rescan_interval_s: 5,
            libvirt_status_dir: PathBuf::from("/run/libvirt/qemu"),
            forget_after_s: 30 * 24 * 3600,
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Audit log directory; absent: `<state_dir>/audit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Rotate a segment when it would exceed this size.
    pub max_file_bytes: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { dir: None, max_file_bytes: 64 << 20 }
    }
}

/// `[enforcement]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnforcementConfig {
    /// Seconds between reconciliations of the host's actual state with the decisions (a
    /// decision change reconciles at once). Drift (a thawed cgroup, a deleted rule) is
    /// repaired within one interval.
    pub reconcile_interval_s: u64,
    /// Freeze (or kill) denied workloads' cgroups.
    pub cgroup: bool,
    /// Block denied workloads' network traffic in nftables table `inet kycd`.
    pub nftables: bool,
    /// The command that runs `nft` (arguments allowed, e.g. to enter a network namespace).
    pub nft_command: Vec<String>,
    /// A per-country CIDR list (`CC CIDR` per line). When set, traffic from and to the
    /// countries named by prohibiting measures in effect is dropped for the workloads those
    /// measures apply to, never host-wide (see [`crate::reconcile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geo_cidr_file: Option<PathBuf>,
    /// On stop, lift every block kycd imposed (default: blocks stay — fail closed).
    pub release_on_exit: bool,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        EnforcementConfig {
            reconcile_interval_s: 5,
            cgroup: true,
            nftables: true,
            nft_command: vec!["nft".into()],
            geo_cidr_file: None,
            release_on_exit: false,
        }
    }
}
