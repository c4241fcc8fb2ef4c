//! Discovery: what runs on this host and where, read from the kernel and libvirt.
//!
//! - [`workload`]: the workload names decisions, attestations and the audit log use.
//! - [`cgroup`]: workloads from the cgroup v2 tree (and the cgroup2 mount itself).
//! - [`libvirt`]: running libvirt domains' tap interfaces, for the nftables interface sets.
//!
//! Nothing here changes kernel state; turning decisions into kernel state is
//! [`crate::enforce`]'s.

pub mod cgroup;
pub mod libvirt;
pub mod workload;
