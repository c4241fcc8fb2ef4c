//! Why the agent could not start.

use std::path::PathBuf;

/// Why the agent could not start. Once running, it does not stop on errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory cannot be used.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The audit log cannot be opened (the agent must not decide without recording).
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The audit log's end is corrupt: appending would fork the chain. Not fixed by a
    /// restart; `repair` is the operator's command that cuts it back (kept bytes aside).
    #[error("audit log: {source}; to repair, with the agent stopped: {}", repair.as_deref().unwrap_or("no record verifies: move the audit directory aside"))]
    AuditCorrupt {
        /// What is wrong.
        #[source]
        source: crate::audit::AuditError,
        /// `kycctl audit repair --truncate-after SEQ DIR`.
        repair: Option<String>,
    },
    /// The policy anti-rollback state is unusable.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// No host id configured and none in /etc/machine-id.
    #[error("cannot determine the host id: set host_id in the configuration ({0})")]
    HostId(String),
}

impl From<crate::host::HostError> for StartError {
    /// The host id's own reason, not the whole message again (it says the same).
    fn from(e: crate::host::HostError) -> Self {
        match e {
            crate::host::HostError::HostId(reason) => StartError::HostId(reason),
            other => StartError::HostId(other.to_string()),
        }
    }
}
