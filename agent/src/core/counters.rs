//! What the agent counts and shows about its input, enforcement and listeners.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Counters of rejected input, by error kind (exported as metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Attestations rejected, by kind.
    pub attestations_rejected: BTreeMap<&'static str, u64>,
    /// Policies rejected, by kind.
    pub policies_rejected: BTreeMap<&'static str, u64>,
    /// Trust files that failed to load (the previous set was kept).
    pub trust_load_failures: u64,
    /// Enforcement failures, by backend (`kycd_enforcement_errors_total{backend}`).
    pub enforcement_errors: BTreeMap<&'static str, u64>,
    /// Drift repaired, by backend.
    pub drift_repaired: BTreeMap<&'static str, u64>,
    /// Backends whose last reconciliation failed, with its first error (cleared by the next
    /// one that succeeds): what makes `kycctl status` say enforcement is failing now.
    pub enforcement_failing: BTreeMap<&'static str, String>,
    /// Inputs (attestation files and directories, libvirt's status) that could not be read
    /// for want of resources or a failing disk (EMFILE, ENFILE, EIO, …); what they said
    /// before was kept.
    pub input_read_errors: u64,
}

/// Connection counters of the agent's listeners, for status and metrics.
#[derive(Debug, Default)]
pub struct Connections {
    /// The operators' Unix socket.
    pub socket: Arc<kycd_net::ConnStats>,
    /// The collector-facing HTTPS API, when enabled.
    pub collector_api: Option<Arc<kycd_net::ConnStats>>,
}

impl Connections {
    pub(super) fn each(&self) -> impl Iterator<Item = (&'static str, kycd_net::ConnSnapshot)> + '_ {
        std::iter::once(("socket", self.socket.snapshot()))
            .chain(self.collector_api.iter().map(|s| ("collector_api", s.snapshot())))
    }
}
