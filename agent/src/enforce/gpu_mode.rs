//! GPU enforcement: compute mode `Prohibited` on GPUs a tenant must not use.
//!
//! Declarative: [`GpuComputeModeEnforcer::reconcile`] takes the set of GPU UUIDs that should be
//! prohibited now (GPUs under a `no_gpu` condition, all GPUs of a denied `host`-bound tenant)
//! and makes the hardware match. Before the first change to a GPU it records the mode the GPU
//! had, durably (`state.json`, [`crate::fsutil::write_atomic`]), so that lifting the block —
//! the GPU leaving the set, even after an agent restart — restores exactly that mode. A GPU in
//! the set found in another mode (an operator or a reset changed it) is drift: it is
//! prohibited again and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::EnforceError;
use crate::gpu::{ComputeMode, GpuBackend, GpuError};

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// GPU UUID → compute mode before the agent prohibited it.
    previous_modes: BTreeMap<String, ComputeMode>,
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// GPUs newly set to `Prohibited`.
    pub prohibited: Vec<String>,
    /// GPUs found changed away from `Prohibited` and set back (drift).
    pub drift_repaired: Vec<(String, ComputeMode)>,
    /// GPUs whose block was lifted, with the mode restored.
    pub restored: Vec<(String, ComputeMode)>,
    /// GPUs that could not be handled this time (retried next reconcile).
    pub errors: Vec<(String, GpuError)>,
}

/// Keeps GPUs' compute modes in line with enforcement decisions.
#[derive(Debug)]
pub struct GpuComputeModeEnforcer {
    state_path: PathBuf,
    state: State,
}

impl GpuComputeModeEnforcer {
    /// Loads the remembered modes from `state_path` (absent: none).
    pub fn load(state_path: &Path) -> Result<Self, EnforceError> {
        let state = match std::fs::read(state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| EnforceError::GpuStateParse { path: state_path.into(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(EnforceError::GpuStateRead { path: state_path.into(), source }),
        };
        Ok(GpuComputeModeEnforcer { state_path: state_path.into(), state })
    }

    /// GPUs currently held prohibited by the agent, with the mode each will get back.
    pub fn held(&self) -> &BTreeMap<String, ComputeMode> {
        &self.state.previous_modes
    }

    fn persist(&self) -> Result<(), EnforceError> {
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|source| EnforceError::GpuStateParse { path: self.state_path.clone(), source })?;
        crate::fsutil::write_atomic(&self.state_path, &bytes)
            .map_err(|source| EnforceError::GpuStateWrite { path: self.state_path.clone(), source })
    }

    /// Makes exactly `desired_prohibited` (GPU UUIDs) prohibited by the agent. Per-GPU failures
    /// are reported and retried on the next call; only a state-file failure aborts, before the
    /// GPU it concerns is touched.
    pub fn reconcile(
        &mut self,
        backend: &mut dyn GpuBackend,
        desired_prohibited: &BTreeSet<String>,
    ) -> Result<ReconcileReport, EnforceError> {
        let mut report = ReconcileReport::default();
        for uuid in desired_prohibited {
            let current = match backend.compute_mode(uuid) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(gpu = %uuid, error = %e, "cannot read compute mode");
                    report.errors.push((uuid.clone(), e));
                    continue;
                }
            };
            let held = self.state.previous_modes.contains_key(uuid);
            if !held {
                // Remember the mode first: if we crash after setting it, restart still knows.
                self.state.previous_modes.insert(uuid.clone(), current);
                if let Err(e) = self.persist() {
                    self.state.previous_modes.remove(uuid);
                    return Err(e);
                }
            }
            if current == ComputeMode::Prohibited {
                continue;
            }
            match backend.set_compute_mode(uuid, ComputeMode::Prohibited) {
                Ok(()) if held => {
                    tracing::warn!(gpu = %uuid, found = ?current, "GPU compute mode drifted; prohibited again");
                    report.drift_repaired.push((uuid.clone(), current));
                }
                Ok(()) => {
                    tracing::info!(gpu = %uuid, previous = ?current, "GPU compute mode set to prohibited");
                    report.prohibited.push(uuid.clone());
                }
                Err(e) => {
                    tracing::warn!(gpu = %uuid, error = %e, "cannot prohibit GPU");
                    report.errors.push((uuid.clone(), e));
                }
            }
        }
        let lift: Vec<(String, ComputeMode)> = self
            .state
            .previous_modes
            .iter()
            .filter(|(uuid, _)| !desired_prohibited.contains(*uuid))
            .map(|(u, m)| (u.clone(), *m))
            .collect();
        for (uuid, previous) in lift {
            match backend.set_compute_mode(&uuid, previous) {
                // A GPU that is gone has nothing to restore; forget it.
                Ok(()) | Err(GpuError::NoSuchGpu(_)) => {
                    tracing::info!(gpu = %uuid, restored = ?previous, "GPU block lifted");
                    self.state.previous_modes.remove(&uuid);
                    self.persist()?;
                    report.restored.push((uuid, previous));
                }
                Err(e) => {
                    tracing::warn!(gpu = %uuid, error = %e, "cannot restore GPU compute mode");
                    report.errors.push((uuid, e));
                }
            }
        }
        Ok(report)
    }
}
