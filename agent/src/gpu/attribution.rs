//! Which workload a GPU process belongs to: pid → `/proc/<pid>/cgroup` → [`WorkloadId`].
//!
//! The cgroup v2 line (`0::/machine.slice/machine-qemu\x2d1\x2dvm.scope/libvirt/vcpu0`, or
//! without systemd `0::/machine/qemu-1-vm.libvirt-qemu/vcpu0`) is
//! matched against the configured workload roots (`[cgroup] roots`, the same ones
//! [`crate::discovery::cgroup::discover`] lists): the first path component under a root is the workload,
//! named by [`crate::discovery::cgroup::classify`], so sampling and discovery agree on names. A process
//! under no root (system services, `init.scope`) belongs to the host workload — except a
//! Slurm job's: under `proctrack/linuxproc` (no job cgroups) a job's processes stay in
//! slurmd's cgroup, so a process under no root that descends from `slurmstepd` belongs to
//! `unix_user:<its real uid>`, the workload the Slurm prolog (`packaging/slurm/prolog.sh`)
//! admitted the job as. slurmstepd runs as root and starts the job's tasks as the job's user;
//! a user cannot put a process of theirs under slurmstepd but by submitting a job.
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
            Some(workload) if workload == WorkloadId::host() => {
                let workload = self.slurm_job_user(pid).unwrap_or(workload);
                ProcessOwner::Workload { workload }
            }
            Some(workload) => ProcessOwner::Workload { workload },
            None => ProcessOwner::Unknown { reason: format!("{}: no cgroup v2 entry", path.display()) },
        }
    }

    /// `unix_user:<real uid>` of `pid` when one of its ancestors is `slurmstepd` (a Slurm
    /// job's task); `None` otherwise or when `/proc` cannot say.
    fn slurm_job_user(&self, pid: u32) -> Option<WorkloadId> {
        let uid = self.real_uid(pid)?;
        let mut current = pid;
        // Deep enough for any job's process tree; bounds a loop in a corrupt tree.
        for _ in 0..64 {
            let stat = std::fs::read_to_string(self.proc_root.join(current.to_string()).join("stat")).ok()?;
            let (comm, ppid) = comm_and_parent(&stat)?;
            // A command name is the process's to choose (prctl): only root's slurmstepd counts.
            if comm == "slurmstepd" && current != pid && self.real_uid(current) == Some(0) {
                let kind = crate::discovery::workload::WorkloadKind::UnixUser;
                return Some(WorkloadId { kind, id: uid.to_string() });
            }
            if ppid <= 1 {
                return None;
            }
            current = ppid;
        }
        None
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

impl Attributor {
    /// The real uid of `pid` (`/proc/<pid>/status`).
    fn real_uid(&self, pid: u32) -> Option<u32> {
        let status = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
    }
}

/// The command name and parent pid of a `/proc/<pid>/stat` line: `PID (COMM) STATE PPID …`,
/// COMM possibly holding spaces and parentheses (the last `)` ends it).
fn comm_and_parent(stat: &str) -> Option<(&str, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let ppid = stat.get(close + 1..)?.split_whitespace().nth(1)?.parse().ok()?;
    Some((comm, ppid))
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

    #[test]
    fn a_slurm_job_task_outside_every_root_belongs_to_its_user() {
        let proc_root = tempfile::tempdir().unwrap();
        let process = |pid: u32, comm: &str, ppid: u32, uid: u32, cgroup: &str| {
            let d = proc_root.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")).unwrap();
            std::fs::write(d.join("status"), format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"))
                .unwrap();
            std::fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        };
        process(100, "slurmd", 1, 0, "/system.slice/slurmd.service");
        process(200, "slurmstepd", 100, 0, "/system.slice/slurmd.service");
        process(300, "bash", 200, 1001, "/system.slice/slurmd.service");
        process(301, "python3 (x) y", 300, 1001, "/system.slice/slurmd.service");
        process(400, "nvidia-smi", 100, 0, "/system.slice/slurmd.service");
        process(500, "train", 200, 1002, "/machine.slice/machine-qemu\\x2d1\\x2dvm.scope");
        let a = Attributor::new(proc_root.path(), &["machine.slice".into()]);
        let owner = |pid| match a.owner(pid) {
            ProcessOwner::Workload { workload } => workload.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(owner(300), "unix_user:1001");
        assert_eq!(owner(301), "unix_user:1001", "a grandchild of slurmstepd");
        // slurmstepd itself and slurmd's other children are the host's.
        assert_eq!(owner(200), "host:host");
        assert_eq!(owner(400), "host:host");
        // A user's own process named slurmstepd is no Slurm job.
        process(600, "slurmstepd", 1, 1003, "/user.slice/user-1003.slice/session-1.scope");
        process(601, "train", 600, 1003, "/user.slice/user-1003.slice/session-1.scope");
        assert_eq!(owner(601), "host:host");
        // A workload root still decides first.
        assert_eq!(owner(500), "libvirt_domain:vm");
    }
}
