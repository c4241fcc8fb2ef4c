//! Enforcement backends: the code that turns decisions into kernel state.
//!
//! Each backend is declarative: it is handed the complete desired state, reads back what the
//! kernel actually has, and converges the two. That makes every call idempotent, repairs
//! drift (a rule deleted or a cgroup thawed by hand), and makes lifting a measure the same
//! operation as imposing one — the measure is simply no longer desired.
//!
//! - [`cgroup`] owns `cgroup.freeze` / `cgroup.kill` on workload cgroups, and a state file
//!   recording what each cgroup looked like before kycd touched it.
//! - [`nft`] owns the nftables table `inet kycd` (and nothing else in the ruleset).
//! - [`gpu_mode`] owns the compute mode of GPUs a tenant must not use, and a state file
//!   recording each GPU's mode before kycd prohibited it.
//!
//! Finding what to enforce on (workloads, cgroups, a libvirt domain's tap interfaces) is
//! [`crate::discovery`]'s. All backends fail with the one [`EnforceError`].
//!
//! Wiring into the daemon's `Enforcer` trait lives in `daemon.rs`.

pub mod cgroup;
pub mod gpu_mode;
pub mod nft;

use std::path::PathBuf;

pub use cgroup::{CgroupAction, CgroupEnforcer, CgroupReport};
pub use gpu_mode::GpuComputeModeEnforcer;
pub use nft::{load_country_cidrs, Cidr, CountryCidrs, NftActual, NftDesired, NftEnforcer, NftReport};

/// Why an enforcement step failed. [`EnforceError::backend`] labels it for the metric
/// `kycd_enforcement_errors_total{backend}`.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// The `nft` program (or the wrapper in front of it) could not be started.
    #[error("cannot run {program}")]
    NftMissing {
        /// The program that was not found.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `nft` ran and failed; nothing of its transaction was applied.
    #[error("nft failed ({status}): {stderr}")]
    NftFailed {
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// `nft -j` printed something that is not the JSON expected of it.
    #[error("unexpected nft JSON output: {0}")]
    NftParse(String),
    /// No cgroup2 mount under `/sys/fs/cgroup`, which is where `nft` resolves cgroup paths.
    #[error("cgroup2 mount {0} is not under /sys/fs/cgroup; nft cannot resolve cgroup paths")]
    CgroupMountUnsupported(PathBuf),
    /// Reading or writing a cgroup interface file failed.
    #[error("cgroup file {path}")]
    CgroupIo {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused access to a cgroup file (not root, or a delegated subtree).
    #[error("permission denied on {path}")]
    PermissionDenied {
        /// The file.
        path: PathBuf,
    },
    /// The cgroup directory no longer exists (the workload ended).
    #[error("cgroup {path} is gone")]
    CgroupGone {
        /// The cgroup directory.
        path: PathBuf,
    },
    /// A cgroup interface file had contents the kernel does not write.
    #[error("cgroup file {path} has unexpected contents {content:?}")]
    CgroupParse {
        /// The file.
        path: PathBuf,
        /// What it held (truncated).
        content: String,
    },
    /// The backend's state file could not be written or read.
    #[error("enforcement state file {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A country CIDR file could not be read.
    #[error("CIDR file {path}")]
    CidrFileIo {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of a country CIDR file is malformed.
    #[error("CIDR file {path} line {line}: {reason}")]
    CidrFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The GPU compute-mode state file cannot be read.
    #[error("cannot read GPU enforcement state {path}")]
    GpuStateRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The GPU compute-mode state file is not ours.
    #[error("GPU enforcement state {path} is malformed")]
    GpuStateParse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The GPU compute-mode state file cannot be written; nothing was changed on the GPU.
    #[error("cannot write GPU enforcement state {path}")]
    GpuStateWrite {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl EnforceError {
    /// The backend this error belongs to: the `backend` label of
    /// `kycd_enforcement_errors_total`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::NftMissing { .. }
            | Self::NftFailed { .. }
            | Self::NftParse(_)
            | Self::CgroupMountUnsupported(_)
            | Self::CidrFileIo { .. }
            | Self::CidrFile { .. } => "nftables",
            Self::CgroupIo { .. }
            | Self::PermissionDenied { .. }
            | Self::CgroupGone { .. }
            | Self::CgroupParse { .. }
            | Self::State { .. } => "cgroup",
            Self::GpuStateRead { .. } | Self::GpuStateParse { .. } | Self::GpuStateWrite { .. } => "gpu",
        }
    }

    /// A short, stable label for the kind of failure (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NftMissing { .. } => "nft_missing",
            Self::NftFailed { .. } => "nft_failed",
            Self::NftParse(_) => "nft_parse",
            Self::CgroupMountUnsupported(_) => "cgroup_mount",
            Self::CgroupIo { .. } => "io",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::CgroupGone { .. } => "cgroup_gone",
            Self::CgroupParse { .. } => "cgroup_parse",
            Self::State { .. } => "state_file",
            Self::CidrFileIo { .. } | Self::CidrFile { .. } => "cidr_file",
            Self::GpuStateRead { .. } | Self::GpuStateParse { .. } | Self::GpuStateWrite { .. } => {
                "gpu_state"
            }
        }
    }

    /// Classifies an I/O error on the cgroup file `path`.
    pub(crate) fn cgroup_io(path: PathBuf, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::NotFound => {
                let dir = path.parent().map(PathBuf::from).unwrap_or(path);
                Self::CgroupGone { path: dir }
            }
            std::io::ErrorKind::PermissionDenied => Self::PermissionDenied { path },
            _ => Self::CgroupIo { path, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_backend_label() {
        let e = EnforceError::cgroup_io(
            PathBuf::from("/cg/x/cgroup.freeze"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(matches!(&e, EnforceError::CgroupGone { path } if path == &PathBuf::from("/cg/x")));
        assert_eq!(e.backend(), "cgroup");
        let e = EnforceError::cgroup_io(
            PathBuf::from("/cg/x/cgroup.freeze"),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(e.kind(), "permission_denied");
        let e = EnforceError::NftFailed { status: "exit status: 1".into(), stderr: "Error".into() };
        assert_eq!(e.backend(), "nftables");
    }
}
