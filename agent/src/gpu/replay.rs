//! Replaying a recorded GPU trace: GPU data for demos and benchmarks on hosts without GPUs.
//!
//! # Trace format (JSON lines)
//! One [`Sample`] per line, UTF-8 JSON, in the order taken — exactly what
//! [`GpuBackend::sample`] returned on the recording host:
//! ```json
//! {"at_ms":1764098400000,"backend":{"state":"ok"},"gpus":[{"index":0,"uuid":"GPU-…",
//!  "name":"NVIDIA H100 80GB HBM3","state":{"state":"ok"},"utilization_gpu_pct":97,
//!  "processes":[{"pid":4242,"used_memory_bytes":1073741824}],"gpm_tensor_activity_pct":61.5,…}]}
//! ```
//! Fields a GPU does not support are absent or `null`. `kycctl gpu record` writes this format;
//! blank lines are ignored. Each line carries its `format` ([`super::TRACE_FORMAT`]; absent =
//! 1, the format before every GPM pipe was recorded, which still replays: its estimates use
//! the any-tensor activity). A line in a newer format is refused, not half-read.
//!
//! Replay returns the lines in order. When the trace is exhausted it either starts over
//! (`looped`, shifting timestamps by the trace's span so time keeps moving forward) or reports
//! the backend unavailable. Compute-mode calls act on an in-memory table seeded from the
//! trace's first sample, so the GPU enforcer can be demonstrated on a replay.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{ComputeMode, GpuBackend, GpuError, Sample};

/// Why a trace cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file cannot be read.
    #[error("cannot read GPU trace {path}")]
    Read {
        /// The trace.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is in a trace format newer than this agent reads.
    #[error(
        "GPU trace {path} line {line}: trace format {format} is newer than this kycd reads (up to {})",
        super::TRACE_FORMAT
    )]
    Format {
        /// The trace.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line's format.
        format: u32,
    },
    /// A line is not a sample.
    #[error("GPU trace {path} line {line}: not a sample")]
    Parse {
        /// The trace.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// [`GpuBackend`] replaying a JSON-lines trace.
#[derive(Debug, Clone)]
pub struct ReplayBackend {
    samples: Vec<Sample>,
    next: usize,
    looped: bool,
    /// Added to recorded timestamps on each pass after the first.
    offset_ms: i64,
    modes: HashMap<String, ComputeMode>,
}

impl ReplayBackend {
    /// Loads a trace file.
    pub fn open(path: &Path, looped: bool) -> Result<Self, ReplayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ReplayError::Read { path: path.into(), source })?;
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let sample: Sample = serde_json::from_str(line).map_err(|source| ReplayError::Parse {
                path: path.into(),
                line: i + 1,
                source,
            })?;
            if sample.format > super::TRACE_FORMAT {
                return Err(ReplayError::Format { path: path.into(), line: i + 1, format: sample.format });
            }
            samples.push(sample);
        }
        Ok(Self::from_samples(samples, looped))
    }

    /// A replay of samples already in memory.
    pub fn from_samples(samples: Vec<Sample>, looped: bool) -> Self {
        let modes = samples
            .first()
            .map(|s| s.gpus.iter().filter_map(|g| Some((g.uuid.clone(), g.compute_mode?))).collect())
            .unwrap_or_default();
        ReplayBackend { samples, next: 0, looped, offset_ms: 0, modes }
    }

    /// The trace's samples, as recorded.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    fn span_ms(&self) -> i64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) => {
                // One sample interval past the last sample, so the restart does not repeat a time.
                let step = if self.samples.len() > 1 {
                    (b.at_ms - a.at_ms) / (self.samples.len() as i64 - 1)
                } else {
                    1000
                };
                b.at_ms - a.at_ms + step.max(1)
            }
            _ => 0,
        }
    }
}

impl GpuBackend for ReplayBackend {
    fn sample(&mut self) -> Sample {
        if self.next >= self.samples.len() && self.looped && !self.samples.is_empty() {
            self.next = 0;
            self.offset_ms += self.span_ms();
        }
        let Some(sample) = self.samples.get(self.next) else {
            return Sample::unavailable(super::unix_ms_now(), "GPU trace exhausted".into());
        };
        self.next += 1;
        let mut sample = sample.clone();
        sample.at_ms += self.offset_ms;
        for gpu in &mut sample.gpus {
            if let Some(mode) = self.modes.get(&gpu.uuid) {
                gpu.compute_mode = Some(*mode);
            }
        }
        sample
    }

    fn compute_mode(&mut self, uuid: &str) -> Result<ComputeMode, GpuError> {
        self.modes.get(uuid).copied().ok_or_else(|| GpuError::NoSuchGpu(uuid.to_owned()))
    }

    fn set_compute_mode(&mut self, uuid: &str, mode: ComputeMode) -> Result<(), GpuError> {
        match self.modes.get_mut(uuid) {
            Some(m) => {
                *m = mode;
                Ok(())
            }
            None => Err(GpuError::NoSuchGpu(uuid.to_owned())),
        }
    }
}
