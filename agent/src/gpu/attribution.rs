//! Which workload a GPU process belongs to: pid → `/proc/<pid>/cgroup` → [`WorkloadId`].
//!
//! The cgroup v2 line (`0::/machine.slice/machine-qemu\x2d1\x2dvm.scope/libvirt/vcpu0`, or
//! without systemd `0::/machine/qemu-1-vm.libvirt-qemu/vcpu0`) is
//! matched against the configured workload roots (`[cgroup] roots`, the same ones
//! [`crate::discovery::cgroup::discover`] lists): the first path component under a root is the workload,
//! named by [`crate::discovery::cgroup::classify`], so sampling and discovery agree on names. A process
//! under no root (system services, `init.scope`) belongs to the host workload.
//!
//! `proc_root` is `/proc` in production; tests point it at a tree in a temporary directory.

use std::path::{Path, PathBuf};

use crate::discovery::cgroup::classify;
use crate::discovery::workload::WorkloadId;

/// Where a GPU process was found to belong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessOwner {
    /// In this workload.
    Workload {
        /// The workload.
        workload: WorkloadId,
    },
    /// `/proc/<pid>` vanished between NVML listing the process and us reading it: it exited.
    Exited,
    /// `/proc/<pid>/cgroup` could not be read or had no cgroup v2 line.
    Unknown {
        /// Why.
        reason: String,
    },
}

/// Maps pids to workloads.
#[derive(Debug, Clone)]
pub struct Attributor {
    proc_root: PathBuf,
    roots: Vec<String>,
}

impl Attributor {
    /// `proc_root` is normally `/proc`; `roots` are cgroup paths relative to the cgroup2 mount
    /// (`machine.slice`, `kubepods.slice`, …).
    pub fn new(proc_root: &Path, roots: &[String]) -> Self {
        let roots = roots.iter().map(|r| r.trim_matches('/').to_owned()).filter(|r| !r.is_empty()).collect();
        Attributor { proc_root: proc_root.to_owned(), roots }
    }

    /// The owner of `pid`.
    pub fn owner(&self, pid: u32) -> ProcessOwner {
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ProcessOwner::Exited,
            // ESRCH: the process died while we read.
            Err(e) if e.raw_os_error() == Some(3) => return ProcessOwner::Exited,
            Err(e) => return ProcessOwner::Unknown { reason: format!("{}: {e}", path.display()) },
        };
        match self.workload_of(&text) {
            Some(workload) => ProcessOwner::Workload { workload },
            None => ProcessOwner::Unknown { reason: format!("{}: no cgroup v2 entry", path.display()) },
        }
    }

    /// The workload a `/proc/<pid>/cgroup` text names; `None` without a cgroup v2 line.
    pub fn workload_of(&self, proc_cgroup: &str) -> Option<WorkloadId> {
        let path = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
        for root in &self.roots {
            let Some(rest) = path.strip_prefix('/').and_then(|p| p.strip_prefix(root.as_str())) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('/') else { continue };
            if let Some(child) = rest.split('/').next().filter(|c| !c.is_empty()) {
                return Some(classify(root, child));
            }
        }
        Some(WorkloadId::host())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_cgroup_lines_to_workloads() {
        let a = Attributor::new(Path::new("/nonexistent"), &["machine.slice".into(), "user.slice".into()]);
        let vm = a.workload_of("0::/machine.slice/machine-qemu\\x2d1\\x2dgpu\\x2dvm.scope/libvirt/vcpu0\n");
        assert_eq!(vm.unwrap().to_string(), "libvirt_domain:gpu-vm");
        // libvirt without systemd: machine/qemu-N-NAME.libvirt-qemu with threaded children.
        let a = Attributor::new(Path::new("/nonexistent"), &["machine".into()]);
        let vm = a.workload_of("0::/machine/qemu-2-gpu-vm.libvirt-qemu/vcpu0\n");
        assert_eq!(vm.unwrap().to_string(), "libvirt_domain:gpu-vm");
        let a = Attributor::new(Path::new("/nonexistent"), &["machine.slice".into(), "user.slice".into()]);
        let user = a.workload_of("12:cpu:/x\n0::/user.slice/user-1001.slice/session-3.scope\n");
        assert_eq!(user.unwrap().to_string(), "unix_user:1001");
        assert_eq!(
            a.workload_of("0::/system.slice/nvidia-persistenced.service").unwrap(),
            WorkloadId::host()
        );
        assert_eq!(a.workload_of("0::/machine.slice").unwrap(), WorkloadId::host());
        assert_eq!(a.workload_of("1:name=systemd:/x\n"), None);
        assert_eq!(a.owner(1), ProcessOwner::Exited);
    }
}
