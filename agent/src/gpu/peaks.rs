//! Per-precision peak rates of a GPU: what [`super::estimate`] multiplies pipe activity by.
//!
//! A GPU's rates come from, in order:
//! 1. the datasheet table `agent/data/gpu-peaks.csv` (embedded at build time), extended or
//!    overridden row by row by an operator file in the same format (`gpu.peak_flops_file`),
//!    matched on the NVML name by case-insensitive longest prefix;
//! 2. SM count × max SM clock × operations per SM per clock for the compute capability
//!    (`agent/data/flops-per-sm-clock.csv`);
//! 3. nothing: operations cannot be estimated for this GPU (method `unknown`).
//!
//! Tables are read by their header, so an operator file in the format before per-precision
//! rates (`…,bf16_dense_tflops,fp8_dense_tflops`) still loads: the precisions it lacks are
//! derived as documented on [`Rates::complete`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const PEAKS_CSV: &str = include_str!("../../data/gpu-peaks.csv");
const PER_SM_CSV: &str = include_str!("../../data/flops-per-sm-clock.csv");

/// Why a peak table is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PeaksError {
    /// The override file cannot be read.
    #[error("cannot read peak table {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A row or the header is malformed.
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

/// Where a GPU's rates came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeakSource {
    /// A datasheet row (built-in or override).
    Table,
    /// SM count × max SM clock × per-SM rate.
    SmClock,
    /// Neither applies: operations cannot be estimated for this GPU.
    Unknown,
}

/// Dense peak rates at the maximum SM clock, operations per second; `None` where the GPU has
/// no such unit or no figure is known.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// HMMA: TF32.
    pub tf32: Option<f64>,
    /// HMMA: BF16 and FP16 (the same rate on every NVIDIA tensor core).
    pub bf16: Option<f64>,
    /// HMMA: FP8 (Ada, Hopper, Blackwell).
    pub fp8: Option<f64>,
    /// HMMA: FP6 (Blackwell).
    pub fp6: Option<f64>,
    /// HMMA: FP4 (Blackwell).
    pub fp4: Option<f64>,
    /// IMMA: INT8.
    pub int8: Option<f64>,
    /// DFMA tensor: FP64 matrix.
    pub fp64_tensor: Option<f64>,
    /// CUDA cores: FP64.
    pub fp64: Option<f64>,
    /// CUDA cores: FP32.
    pub fp32: Option<f64>,
    /// CUDA cores: FP16.
    pub fp16: Option<f64>,
}

impl Rates {
    /// The rates of the HMMA precisions this GPU has, in no particular order.
    pub fn hmma(&self) -> impl Iterator<Item = f64> {
        [self.tf32, self.bf16, self.fp8, self.fp6, self.fp4].into_iter().flatten()
    }

    /// The fastest tensor rate of any precision (HMMA, or INT8 on IMMA where faster): what a
    /// GPU busy with nothing else could do at most. `None` without any tensor rate.
    pub fn fastest_tensor(&self) -> Option<f64> {
        self.hmma().chain(self.int8).reduce(f64::max)
    }

    /// Every rate × `k` (a MIG instance's share of the GPU's SMs).
    pub fn scaled(&self, k: f64) -> Rates {
        let s = |r: Option<f64>| r.map(|r| r * k);
        Rates {
            tf32: s(self.tf32),
            bf16: s(self.bf16),
            fp8: s(self.fp8),
            fp6: s(self.fp6),
            fp4: s(self.fp4),
            int8: s(self.int8),
            fp64_tensor: s(self.fp64_tensor),
            fp64: s(self.fp64),
            fp32: s(self.fp32),
            fp16: s(self.fp16),
        }
    }

    /// Fills what an older-format row leaves out: TF32 runs at half the BF16 rate on every
    /// tensor core that has it (compute capability 8.0 and later), so a row with a BF16 figure
    /// but no TF32 column gets half of it when the compute capability says TF32 exists —
    /// otherwise the lower bound would be no bound. Nothing else is guessed.
    fn complete(mut self, cc: Option<(i32, i32)>) -> Rates {
        if self.tf32.is_none() && cc.is_some_and(|cc| cc >= (8, 0)) {
            self.tf32 = self.bf16.map(|b| b / 2.0);
        }
        self
    }
}

/// A GPU's peak rates and where they came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peaks {
    /// The rates; all `None` when the source is [`PeakSource::Unknown`].
    pub rates: Rates,
    /// Where they came from.
    pub source: PeakSource,
    /// The model's SM count per the table (NVML does not report it on every GPU), for MIG
    /// instance shares.
    pub sm_count: Option<u32>,
}

impl Peaks {
    /// Dense BF16 tensor peak, FLOP/s: the figure usage windows carry as `peak_flops`.
    pub fn bf16(&self) -> Option<f64> {
        self.rates.bf16
    }
}

#[derive(Debug, Clone)]
struct Row {
    rates: Rates,
    sm_count: Option<u32>,
}

/// The peak lookup tables.
#[derive(Debug, Clone)]
pub struct PeakTable {
    /// (lower-cased NVML name prefix, row).
    by_name: Vec<(String, Row)>,
    /// (major, minor) → rates per SM per clock.
    per_sm_clock: BTreeMap<(i32, i32), Rates>,
}

impl PeakTable {
    /// The tables compiled into the agent.
    pub fn builtin() -> Result<Self, PeaksError> {
        Ok(PeakTable {
            by_name: parse_peaks(PEAKS_CSV, "built-in gpu-peaks.csv")?,
            per_sm_clock: parse_per_sm(PER_SM_CSV, "built-in flops-per-sm-clock.csv")?,
        })
    }

    /// The built-in tables with an operator's file laid over them: its rows replace built-in
    /// rows with the same prefix and add new ones.
    pub fn with_override(path: Option<&Path>) -> Result<Self, PeaksError> {
        let mut table = Self::builtin()?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .map_err(|source| PeaksError::Read { path: path.into(), source })?;
            for (prefix, row) in parse_peaks(&text, &path.display().to_string())? {
                table.by_name.retain(|(p, _)| *p != prefix);
                table.by_name.push((prefix, row));
            }
        }
        Ok(table)
    }

    /// Peaks of a GPU from what NVML says about it.
    pub fn peaks(
        &self,
        name: &str,
        sm_count: Option<u32>,
        max_sm_clock_mhz: Option<u32>,
        cc: Option<[i32; 2]>,
    ) -> Peaks {
        let lower = name.to_ascii_lowercase();
        let by_name = self
            .by_name
            .iter()
            .filter(|(prefix, _)| lower.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len());
        if let Some((_, row)) = by_name {
            return Peaks {
                rates: row.rates,
                source: PeakSource::Table,
                sm_count: row.sm_count.or(sm_count),
            };
        }
        if let (Some(sm), Some(mhz), Some([major, minor])) = (sm_count, max_sm_clock_mhz, cc) {
            if let Some(per_sm) = self.per_sm_clock.get(&(major, minor)) {
                if sm > 0 && mhz > 0 && per_sm.bf16.is_some() {
                    let rates = per_sm.scaled(f64::from(sm) * f64::from(mhz) * 1e6);
                    return Peaks { rates, source: PeakSource::SmClock, sm_count: Some(sm) };
                }
            }
        }
        Peaks { rates: Rates::default(), source: PeakSource::Unknown, sm_count }
    }
}

/// A CSV table read by its header: comment (`#`) and blank lines skipped, cells trimmed.
struct Table<'t> {
    source_name: &'t str,
    header: Vec<&'t str>,
    rows: Vec<(usize, Vec<&'t str>)>,
}

impl<'t> Table<'t> {
    fn parse(text: &'t str, source_name: &'t str) -> Result<Self, PeaksError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|(i, l)| (i + 1, l.split(',').map(str::trim).collect::<Vec<_>>()));
        let Some((_, header)) = lines.next() else {
            return Err(PeaksError::Parse {
                source_name: source_name.into(),
                line: 1,
                reason: "no header".into(),
            });
        };
        Ok(Table { source_name, header, rows: lines.collect() })
    }

    fn bad(&self, line: usize, reason: impl Into<String>) -> PeaksError {
        PeaksError::Parse { source_name: self.source_name.into(), line, reason: reason.into() }
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| *h == name)
    }

    /// The cell of `column` in `row`, `None` when the column or the cell is empty/absent.
    fn cell<'r>(&self, row: &'r [&'t str], column: Option<usize>) -> Option<&'r str> {
        column.and_then(|c| row.get(c)).copied().filter(|c| !c.is_empty())
    }

    /// A positive finite number (× `unit`) from a cell, or `None` for an empty one.
    fn rate(&self, line: usize, row: &[&str], name: &str, unit: f64) -> Result<Option<f64>, PeaksError> {
        let Some(text) = self.cell(row, self.column(name)) else { return Ok(None) };
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(Some(v * unit)),
            _ => Err(self.bad(line, format!("{name} is not a positive number: {text:?}"))),
        }
    }

    fn rates(&self, line: usize, row: &[&str], names: [&str; 10], unit: f64) -> Result<Rates, PeaksError> {
        let [tf32, bf16, fp8, fp6, fp4, int8, fp64_tensor, fp64, fp32, fp16] = names;
        Ok(Rates {
            tf32: self.rate(line, row, tf32, unit)?,
            bf16: self.rate(line, row, bf16, unit)?,
            fp8: self.rate(line, row, fp8, unit)?,
            fp6: self.rate(line, row, fp6, unit)?,
            fp4: self.rate(line, row, fp4, unit)?,
            int8: self.rate(line, row, int8, unit)?,
            fp64_tensor: self.rate(line, row, fp64_tensor, unit)?,
            fp64: self.rate(line, row, fp64, unit)?,
            fp32: self.rate(line, row, fp32, unit)?,
            fp16: self.rate(line, row, fp16, unit)?,
        })
    }
}

fn compute_capability(text: &str) -> Option<(i32, i32)> {
    let (major, minor) = text.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn parse_peaks(text: &str, source_name: &str) -> Result<Vec<(String, Row)>, PeaksError> {
    let table = Table::parse(text, source_name)?;
    let prefix_column = table.column("nvml_name_prefix");
    if prefix_column.is_none() || table.column("bf16_dense_tflops").is_none() {
        return Err(table.bad(1, "header must name nvml_name_prefix and bf16_dense_tflops"));
    }
    let names = [
        "tf32_dense_tflops",
        "bf16_dense_tflops",
        "fp8_dense_tflops",
        "fp6_dense_tflops",
        "fp4_dense_tflops",
        "int8_dense_tops",
        "fp64_tensor_tflops",
        "fp64_tflops",
        "fp32_tflops",
        "fp16_tflops",
    ];
    let mut rows = Vec::new();
    for (line, row) in &table.rows {
        if row.len() > table.header.len() {
            return Err(
                table.bad(*line, format!("{} cells, the header has {}", row.len(), table.header.len()))
            );
        }
        let Some(prefix) = table.cell(row, prefix_column) else {
            return Err(table.bad(*line, "empty nvml_name_prefix"));
        };
        let rates = table.rates(*line, row, names, 1e12)?;
        if rates.bf16.is_none() {
            return Err(table.bad(*line, "bf16_dense_tflops is required"));
        }
        let cc = table.cell(row, table.column("compute_capability")).and_then(compute_capability);
        let sm_count = table.cell(row, table.column("sm_count")).and_then(|s| s.parse().ok());
        rows.push((prefix.to_ascii_lowercase(), Row { rates: rates.complete(cc), sm_count }));
    }
    Ok(rows)
}

fn parse_per_sm(text: &str, source_name: &str) -> Result<BTreeMap<(i32, i32), Rates>, PeaksError> {
    let table = Table::parse(text, source_name)?;
    let names = ["tf32", "bf16", "fp8", "fp6", "fp4", "int8", "fp64_tensor", "fp64", "fp32", "fp16"];
    let mut rows = BTreeMap::new();
    for (line, row) in &table.rows {
        let cc = table
            .cell(row, table.column("compute_capability"))
            .and_then(compute_capability)
            .ok_or_else(|| table.bad(*line, "compute_capability is not MAJOR.MINOR"))?;
        rows.insert(cc, table.rates(*line, row, names, 1.0)?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_by_longest_prefix_then_sm_clock_then_unknown() {
        let t = PeakTable::builtin().unwrap();
        let h100 = t.peaks("NVIDIA H100 80GB HBM3", None, None, None);
        assert_eq!((h100.bf16(), h100.source, h100.sm_count), (Some(989.4e12), PeakSource::Table, Some(132)));
        assert_eq!(
            (h100.rates.tf32, h100.rates.fp8, h100.rates.fp32),
            (Some(494.7e12), Some(1978.9e12), Some(66.9 * 1e12))
        );
        // "NVIDIA H100 NVL" must not match a shorter "NVIDIA H10…" row, nor H20 match H200.
        assert_eq!(t.peaks("NVIDIA H100 NVL", None, None, None).bf16(), Some(835.5e12));
        assert_eq!(t.peaks("nvidia h20", None, None, None).bf16(), Some(148e12));
        assert_eq!(t.peaks("NVIDIA B200", None, None, None).rates.fp4, Some(9000e12));
        let fallback = t.peaks("NVIDIA Future X", Some(100), Some(2000), Some([9, 0]));
        assert_eq!(fallback.source, PeakSource::SmClock);
        assert_eq!(fallback.bf16(), Some(100.0 * 2000e6 * 4096.0));
        assert_eq!(fallback.rates.fp8, Some(100.0 * 2000e6 * 8192.0));
        assert_eq!(t.peaks("Mystery", Some(1), Some(1), Some([1, 0])).source, PeakSource::Unknown);
        // Every built-in row has the BF16 figure and, on tensor cores with TF32, a lower one.
        for (prefix, row) in &t.by_name {
            let bf16 = row.rates.bf16.unwrap();
            assert!(row.rates.hmma().all(|r| r > 0.0), "{prefix}");
            assert!(row.rates.tf32.is_none_or(|t| t < bf16), "{prefix}");
            assert!(row.rates.fp8.is_none_or(|f| f > bf16), "{prefix}");
        }
    }

    #[test]
    fn override_file_in_the_old_or_new_format_replaces_and_adds_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peaks.csv");
        std::fs::write(
            &path,
            "# operator table\nnvml_name_prefix,architecture,compute_capability,sm_count,bf16_dense_tflops,fp8_dense_tflops\n\
             NVIDIA H100 80GB HBM3,Hopper,9.0,132,1000,\nACME Tensor 1,X,9.0,10,5,10\n",
        )
        .unwrap();
        let t = PeakTable::with_override(Some(&path)).unwrap();
        let h100 = t.peaks("NVIDIA H100 80GB HBM3", None, None, None).rates;
        // The old format has no TF32 column: half of BF16 on a tensor core that has TF32.
        assert_eq!((h100.bf16, h100.tf32, h100.fp8, h100.fp32), (Some(1000e12), Some(500e12), None, None));
        assert_eq!(t.peaks("ACME Tensor 1", None, None, None).rates.fp8, Some(10e12));
        std::fs::write(&path, "nvml_name_prefix,bf16_dense_tflops,fp32_tflops\nX,1,2\n").unwrap();
        let x = PeakTable::with_override(Some(&path)).unwrap().peaks("X", None, None, None).rates;
        assert_eq!((x.bf16, x.fp32, x.tf32), (Some(1e12), Some(2e12), None));
        for bad in [
            "h\nX,Y,9.0,1,notanumber,\n",
            "nvml_name_prefix,bf16_dense_tflops\nX,-1\n",
            "nvml_name_prefix,bf16_dense_tflops\nX,\n",
            "nvml_name_prefix,bf16_dense_tflops\nX,1,2\n",
            "nvml_name_prefix,fp8_dense_tflops\nX,1\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(PeakTable::with_override(Some(&path)).is_err(), "{bad}");
        }
    }
}
