//! Peak dense tensor FLOP/s per GPU and the per-interval operation estimate.
//!
//! Peak comes from, in order: the datasheet table (`agent/data/gpu-peak-flops.csv`, embedded
//! at build time, extended or overridden by an operator file of the same format), matched on
//! the NVML name by case-insensitive longest prefix; else SM count × max SM clock × dense
//! tensor FLOP per SM per clock for the compute capability
//! (`agent/data/tensor-flops-per-sm-clock.csv`); else unknown.
//!
//! Operations in an interval = peak × activity × dt, where activity is the GPM "any tensor
//! pipe active" fraction when the GPU has GPM ([`EstimationMethod::GpmTensor`]), else the
//! SM utilization fraction ([`EstimationMethod::UtilizationUpperBound`]: NVML counts an SM
//! period as busy when any kernel runs, tensor or not, so this over-estimates, never under).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kycd_protocol::EstimationMethod;

const PEAK_CSV: &str = include_str!("../../data/gpu-peak-flops.csv");
const PER_SM_CSV: &str = include_str!("../../data/tensor-flops-per-sm-clock.csv");

/// Why a peak table is unusable.
#[derive(Debug, thiserror::Error)]
pub enum FlopsError {
    /// The override file cannot be read.
    #[error("cannot read peak FLOP/s table {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A row is malformed.
    #[error("{source_name} line {line}: {reason}")]
    Parse {
        /// Which table.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Where a GPU's peak came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeakSource {
    /// A datasheet row (built-in or override).
    Table,
    /// SM count × max SM clock × per-SM rate.
    SmClock,
    /// Neither applies: operations cannot be estimated for this GPU.
    Unknown,
}

/// A GPU's peak dense tensor throughput.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// FLOP/s; `None` when unknown.
    pub flops: Option<f64>,
    /// Where it came from.
    pub source: PeakSource,
}

/// The peak lookup tables.
#[derive(Debug, Clone)]
pub struct PeakTable {
    /// (lower-cased NVML name prefix, BF16 dense FLOP/s).
    by_name: Vec<(String, f64)>,
    /// (major, minor) → dense FLOP per SM per clock.
    per_sm_clock: BTreeMap<(i32, i32), f64>,
}

impl PeakTable {
    /// The tables compiled into the agent.
    pub fn builtin() -> Result<Self, FlopsError> {
        Ok(PeakTable {
            by_name: parse_peak_csv(PEAK_CSV, "built-in gpu-peak-flops.csv")?,
            per_sm_clock: parse_per_sm_csv(PER_SM_CSV, "built-in tensor-flops-per-sm-clock.csv")?,
        })
    }

    /// The built-in tables with an operator's `gpu-peak-flops.csv`-format file laid over them:
    /// its rows replace built-in rows with the same prefix and add new ones.
    pub fn with_override(path: Option<&Path>) -> Result<Self, FlopsError> {
        let mut table = Self::builtin()?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .map_err(|source| FlopsError::Read { path: path.into(), source })?;
            for (prefix, flops) in parse_peak_csv(&text, &path.display().to_string())? {
                table.by_name.retain(|(p, _)| *p != prefix);
                table.by_name.push((prefix, flops));
            }
        }
        Ok(table)
    }

    /// Peak of a GPU from what NVML says about it.
    pub fn peak(
        &self,
        name: &str,
        sm_count: Option<u32>,
        max_sm_clock_mhz: Option<u32>,
        cc: Option<[i32; 2]>,
    ) -> Peak {
        let lower = name.to_ascii_lowercase();
        let by_name = self
            .by_name
            .iter()
            .filter(|(prefix, _)| lower.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len());
        if let Some((_, flops)) = by_name {
            return Peak { flops: Some(*flops), source: PeakSource::Table };
        }
        if let (Some(sm), Some(mhz), Some([major, minor])) = (sm_count, max_sm_clock_mhz, cc) {
            if let Some(rate) = self.per_sm_clock.get(&(major, minor)) {
                if sm > 0 && mhz > 0 {
                    let flops = f64::from(sm) * f64::from(mhz) * 1e6 * rate;
                    return Peak { flops: Some(flops), source: PeakSource::SmClock };
                }
            }
        }
        Peak { flops: None, source: PeakSource::Unknown }
    }
}

fn data_rows(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .skip(1) // header
        .map(|(i, l)| (i + 1, l.split(',').map(str::trim).collect()))
}

fn parse_peak_csv(text: &str, source_name: &str) -> Result<Vec<(String, f64)>, FlopsError> {
    let bad = |line, reason: &str| FlopsError::Parse {
        source_name: source_name.into(),
        line,
        reason: reason.into(),
    };
    let mut rows = Vec::new();
    for (line, fields) in data_rows(text) {
        let [prefix, _arch, _cc, _sm, bf16, ..] = fields.as_slice() else {
            return Err(bad(line, "expected 6 columns"));
        };
        let tflops: f64 = bf16.parse().map_err(|_| bad(line, "bf16_dense_tflops is not a number"))?;
        if prefix.is_empty() || !(tflops.is_finite() && tflops > 0.0) {
            return Err(bad(line, "empty name prefix or non-positive peak"));
        }
        rows.push((prefix.to_ascii_lowercase(), tflops * 1e12));
    }
    Ok(rows)
}

fn parse_per_sm_csv(text: &str, source_name: &str) -> Result<BTreeMap<(i32, i32), f64>, FlopsError> {
    let bad = |line, reason: &str| FlopsError::Parse {
        source_name: source_name.into(),
        line,
        reason: reason.into(),
    };
    let mut rows = BTreeMap::new();
    for (line, fields) in data_rows(text) {
        let [cc, rate] = fields.as_slice() else { return Err(bad(line, "expected 2 columns")) };
        let (major, minor) =
            cc.split_once('.').ok_or_else(|| bad(line, "compute capability is not MAJOR.MINOR"))?;
        let major = major.parse().map_err(|_| bad(line, "bad major"))?;
        let minor = minor.parse().map_err(|_| bad(line, "bad minor"))?;
        let rate: f64 = rate.parse().map_err(|_| bad(line, "flop_per_sm_per_clock is not a number"))?;
        rows.insert((major, minor), rate);
    }
    Ok(rows)
}

/// Activity of a GPU over one interval and how it was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activity {
    /// Fraction of peak, 0..=1.
    pub fraction: f64,
    /// The method label carried into every record.
    pub method: EstimationMethod,
}

/// The activity of a GPU from its snapshot: GPM tensor activity when present, else SM
/// utilization (an upper bound). `None` when neither is known.
pub fn activity(gpm_tensor_pct: Option<f64>, utilization_gpu_pct: Option<u32>) -> Option<Activity> {
    if let Some(pct) = gpm_tensor_pct.filter(|p| p.is_finite()) {
        return Some(Activity {
            fraction: (pct / 100.0).clamp(0.0, 1.0),
            method: EstimationMethod::GpmTensor,
        });
    }
    utilization_gpu_pct.map(|pct| Activity {
        fraction: (f64::from(pct) / 100.0).clamp(0.0, 1.0),
        method: EstimationMethod::UtilizationUpperBound,
    })
}

/// Estimated operations: peak FLOP/s × activity × seconds.
pub fn estimate_ops(peak_flops: f64, activity_fraction: f64, dt_s: f64) -> f64 {
    peak_flops * activity_fraction * dt_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_by_longest_prefix_then_sm_clock_then_unknown() {
        let t = PeakTable::builtin().unwrap();
        let h100 = t.peak("NVIDIA H100 80GB HBM3", None, None, None);
        assert_eq!(h100, Peak { flops: Some(989.4e12), source: PeakSource::Table });
        // "NVIDIA H100 NVL" must not match a shorter "NVIDIA H10…" row, nor H20 match H200.
        assert_eq!(t.peak("NVIDIA H100 NVL", None, None, None).flops, Some(835.5e12));
        assert_eq!(t.peak("nvidia h20", None, None, None).flops, Some(148e12));
        let fallback = t.peak("NVIDIA Future X", Some(100), Some(2000), Some([9, 0]));
        assert_eq!(fallback, Peak { flops: Some(100.0 * 2000e6 * 4096.0), source: PeakSource::SmClock });
        assert_eq!(t.peak("Mystery", Some(1), Some(1), Some([1, 0])).source, PeakSource::Unknown);
    }

    #[test]
    fn override_file_replaces_and_adds_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peaks.csv");
        std::fs::write(
            &path,
            "# operator table\nnvml_name_prefix,architecture,compute_capability,sm_count,bf16_dense_tflops,fp8_dense_tflops\n\
             NVIDIA H100 80GB HBM3,Hopper,9.0,132,1000,\nACME Tensor 1,X,9.0,10,5,\n",
        )
        .unwrap();
        let t = PeakTable::with_override(Some(&path)).unwrap();
        assert_eq!(t.peak("NVIDIA H100 80GB HBM3", None, None, None).flops, Some(1000e12));
        assert_eq!(t.peak("ACME Tensor 1", None, None, None).flops, Some(5e12));
        std::fs::write(&path, "h\nX,Y,9.0,1,notanumber,\n").unwrap();
        assert!(PeakTable::with_override(Some(&path)).is_err());
    }

    #[test]
    fn activity_prefers_gpm() {
        let a = activity(Some(50.0), Some(100)).unwrap();
        assert_eq!((a.fraction, a.method), (0.5, EstimationMethod::GpmTensor));
        let b = activity(None, Some(80)).unwrap();
        assert_eq!((b.fraction, b.method), (0.8, EstimationMethod::UtilizationUpperBound));
        assert_eq!(activity(None, None), None);
        assert_eq!(estimate_ops(1e15, 0.5, 2.0), 1e15);
    }
}
