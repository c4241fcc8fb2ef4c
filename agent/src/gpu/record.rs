//! `kycctl gpu record`: write a GPU trace for [`ReplayBackend`](super::ReplayBackend).
//!
//! Samples a backend every `interval` for `duration` and appends each [`Sample`](super::Sample)
//! as one JSON line (the format documented in [`super::replay`]). Each line is flushed as it is
//! written, so a recording cut short is still a valid trace.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kycd_protocol::clock::{Clock as _, SystemClock};

use super::GpuBackend;

/// Why a recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The output cannot be written.
    #[error("cannot write GPU trace {path}")]
    Write {
        /// The trace.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A sample would not serialise (cannot happen for well-formed samples).
    #[error("cannot encode a GPU sample")]
    Encode(#[source] serde_json::Error),
    /// The NVML thread could not start.
    #[error("cannot start NVML")]
    Nvml(#[from] super::nvml::NvmlBackendError),
}

/// `kycctl gpu record`: records the real (NVML) backend loaded from `library`.
pub fn record_nvml(
    library: &Path,
    duration: Duration,
    interval: Duration,
    out: &Path,
) -> Result<RecordSummary, RecordError> {
    let options = super::NvmlOptions { library: library.into(), ..Default::default() };
    let mut backend = super::NvmlBackend::start(options)?;
    record(&mut backend, duration, interval, out)
}

/// What a recording produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSummary {
    /// Lines written.
    pub samples: usize,
    /// Of which the backend was unavailable.
    pub unavailable: usize,
}

/// Records `backend` into `out` (created or truncated): one sample at start, then one per
/// `interval` until `duration` has passed. Sampling is paced on a fixed schedule, so a slow
/// sample does not shift the ones after it.
pub fn record(
    backend: &mut dyn GpuBackend,
    duration: Duration,
    interval: Duration,
    out: &Path,
) -> Result<RecordSummary, RecordError> {
    let write_err = |source| RecordError::Write { path: out.into(), source };
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).map_err(write_err)?);
    let interval = interval.max(Duration::from_millis(1));
    let start = SystemClock.instant();
    let mut summary = RecordSummary { samples: 0, unavailable: 0 };
    let mut due = start;
    loop {
        let sample = backend.sample();
        if sample.backend != super::BackendState::Ok {
            summary.unavailable += 1;
        }
        let mut line = serde_json::to_vec(&sample).map_err(RecordError::Encode)?;
        line.push(b'\n');
        file.write_all(&line).map_err(write_err)?;
        file.flush().map_err(write_err)?;
        summary.samples += 1;
        due += interval;
        if due.duration_since(start) > duration {
            break;
        }
        std::thread::sleep(due.saturating_duration_since(SystemClock.instant()));
    }
    file.into_inner().map_err(|e| write_err(e.into_error()))?.sync_all().map_err(write_err)?;
    Ok(summary)
}
