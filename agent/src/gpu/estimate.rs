//! Operations per interval from GPU pipe activity: three numbers, not one.
//!
//! For one GPU (or MIG GPU instance) over one sampling interval, with `c` = current SM clock ÷
//! maximum SM clock (a GPU under a power cap runs well below the clock its peaks are quoted
//! at: 1,359–1,468 MHz of 1,980 on an H200 under matmul load):
//!
//! ```text
//! rate = c × Σ over pipes  activity(pipe) × peak(pipe, precision)
//! ```
//!
//! | pipe (GPM metric) | lower precision | point | upper precision |
//! |---|---|---|---|
//! | HMMA tensor | slowest the GPU has (TF32) | BF16 | fastest (FP8 on Hopper and Ada, FP4 on Blackwell) |
//! | IMMA tensor | INT8 | INT8 | INT8 |
//! | DFMA tensor | FP64 tensor | same | same |
//! | FP64, FP32, FP16 CUDA cores | their rate | same | same |
//!
//! GPM cannot tell which precision ran on a pipe (FP8 and BF16 matmuls both show as HMMA
//! activity), so the point estimate is BF16-equivalent and the bounds say what the same activity
//! would be at the slowest and fastest precision ([`EstimationMethod::GpmPipes`]). A format-1
//! trace or a driver that reports only "any tensor" activity counts it as HMMA
//! ([`EstimationMethod::GpmTensor`]). Without GPM (before Hopper), SM utilization × the BF16
//! peak is the point figure, 0 the lower bound and SM utilization × the fastest tensor rate the
//! upper one ([`EstimationMethod::UtilizationUpperBound`]: any kernel counts as busy). The
//! integer pipe and DRAM bandwidth are recorded but not counted: integer work is mostly address
//! arithmetic, and moving bytes is not an operation.
//!
//! docs/estimates.md explains the method, its calibration on a real H200 and its limits.

use kycd_protocol::EstimationMethod;

use super::peaks::Rates;
use super::{GpmPipes, GpuSnapshot};

/// Three figures of one quantity (operations, or operations per second).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bounds {
    /// Fewest the measurement allows.
    pub lower: f64,
    /// The documented point estimate.
    pub point: f64,
    /// Most the measurement allows.
    pub upper: f64,
}

impl Bounds {
    /// All three × `k`.
    pub fn scaled(self, k: f64) -> Bounds {
        Bounds { lower: self.lower * k, point: self.point * k, upper: self.upper * k }
    }

    /// Adds `other` to each figure.
    pub fn add(&mut self, other: Bounds) {
        self.lower += other.lower;
        self.point += other.point;
        self.upper += other.upper;
    }

    /// One of several unisolated users' figures: the point estimate split by `share`, nothing
    /// as the lower bound (it may have run nothing of what the counters saw) and the whole as
    /// the upper bound (it may have run all of it).
    pub fn shared(self, share: f64) -> Bounds {
        Bounds { lower: 0.0, point: self.point * share, upper: self.upper }
    }
}

/// The estimated rate of one GPU or GPU instance over one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Operations per second.
    pub ops_per_s: Bounds,
    /// How it was measured.
    pub method: EstimationMethod,
    /// The busiest counted pipe's activity (or SM utilization), 0..=1: how busy the GPU was,
    /// for the local training rule.
    pub activity: f64,
}

/// What one interval's estimate reads from a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading<'a> {
    /// Every GPM pipe (format 2).
    pub gpm: Option<&'a GpmPipes>,
    /// GPM any-tensor activity, percent (format 1, or a driver without the breakdown).
    pub any_tensor_pct: Option<f64>,
    /// NVML SM utilization, percent (no GPM).
    pub utilization_pct: Option<u32>,
    /// SM clock at the end of the interval, MHz.
    pub sm_clock_mhz: Option<u32>,
    /// Maximum SM clock, MHz.
    pub max_sm_clock_mhz: Option<u32>,
}

impl<'a> Reading<'a> {
    /// The whole GPU's reading from its snapshot.
    pub fn of(gpu: &'a GpuSnapshot) -> Self {
        Reading {
            gpm: gpu.gpm.as_ref(),
            any_tensor_pct: gpu.gpm_tensor_activity_pct,
            utilization_pct: gpu.utilization_gpu_pct,
            sm_clock_mhz: gpu.sm_clock_mhz,
            max_sm_clock_mhz: gpu.max_sm_clock_mhz,
        }
    }
}

/// Current ÷ maximum SM clock, in 0..=1; 1 when either is unknown (the datasheet peak, the
/// larger figure, rather than a guess).
pub fn clock_ratio(sm_clock_mhz: Option<u32>, max_sm_clock_mhz: Option<u32>) -> f64 {
    match (sm_clock_mhz, max_sm_clock_mhz) {
        (Some(now), Some(max)) if max > 0 => (f64::from(now) / f64::from(max)).clamp(0.0, 1.0),
        _ => 1.0,
    }
}

fn fraction(pct: Option<f64>) -> Option<f64> {
    pct.filter(|p| p.is_finite()).map(|p| (p / 100.0).clamp(0.0, 1.0))
}

/// The rate of a GPU with peaks `rates` over the interval `reading` describes; `None` when
/// nothing was measured or the GPU's BF16 peak is unknown.
pub fn rate(rates: &Rates, reading: &Reading<'_>) -> Option<Rate> {
    let bf16 = rates.bf16?;
    let hmma_slowest = rates.hmma().fold(bf16, f64::min);
    let hmma_fastest = rates.hmma().fold(bf16, f64::max);
    let clock = clock_ratio(reading.sm_clock_mhz, reading.max_sm_clock_mhz);

    let gpm = reading.gpm.filter(|g| {
        [g.hmma_tensor, g.imma_tensor, g.dfma_tensor, g.fp64, g.fp32, g.fp16].iter().any(Option::is_some)
    });
    let (hmma, method) = match gpm {
        Some(g) if g.hmma_tensor.is_some() || g.imma_tensor.is_some() || g.dfma_tensor.is_some() => {
            (fraction(g.hmma_tensor), EstimationMethod::GpmPipes)
        }
        // CUDA-core pipes only: tensor activity from "any tensor" where there is one.
        Some(g) => (fraction(g.any_tensor.or(reading.any_tensor_pct)), EstimationMethod::GpmTensor),
        None => match fraction(reading.any_tensor_pct) {
            Some(any) => (Some(any), EstimationMethod::GpmTensor),
            None => {
                let u = f64::from(reading.utilization_pct?.min(100)) / 100.0;
                let fastest = rates.fastest_tensor().unwrap_or(bf16);
                let ops = Bounds { lower: 0.0, point: u * bf16, upper: u * fastest }.scaled(clock);
                return Some(Rate {
                    ops_per_s: ops,
                    method: EstimationMethod::UtilizationUpperBound,
                    activity: u,
                });
            }
        },
    };

    let hmma = hmma.unwrap_or(0.0);
    let mut ops = Bounds { lower: hmma * hmma_slowest, point: hmma * bf16, upper: hmma * hmma_fastest };
    let mut activity = hmma;
    if let Some(g) = gpm {
        for (pipe, peak) in [
            (g.imma_tensor, rates.int8),
            (g.dfma_tensor, rates.fp64_tensor),
            (g.fp64, rates.fp64),
            (g.fp32, rates.fp32),
            (g.fp16, rates.fp16),
        ] {
            let (Some(a), Some(peak)) = (fraction(pipe), peak) else { continue };
            ops.add(Bounds { lower: a * peak, point: a * peak, upper: a * peak });
            activity = activity.max(a);
        }
    }
    Some(Rate { ops_per_s: ops.scaled(clock), method, activity })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::peaks::PeakTable;

    fn h200() -> Rates {
        PeakTable::builtin().unwrap().peaks("NVIDIA H200", None, None, None).rates
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn pipes_are_clock_scaled_and_bounded_by_precision() {
        // The H200's steady BF16 second: HMMA 93.5 % at 1,468 of 1,980 MHz.
        let gpm = GpmPipes { hmma_tensor: Some(93.5), fp32: Some(0.0), ..GpmPipes::default() };
        let reading = Reading {
            gpm: Some(&gpm),
            sm_clock_mhz: Some(1468),
            max_sm_clock_mhz: Some(1980),
            ..Reading::default()
        };
        let r = rate(&h200(), &reading).unwrap();
        let c = 1468.0 / 1980.0;
        assert_eq!(r.method, EstimationMethod::GpmPipes);
        assert!(close(r.ops_per_s.point, 0.935 * 989.4e12 * c), "{r:?}");
        assert!(close(r.ops_per_s.lower, 0.935 * 494.7e12 * c), "{r:?}");
        assert!(close(r.ops_per_s.upper, 0.935 * 1978.9e12 * c), "{r:?}");
        assert!(close(r.activity, 0.935));
        // CUDA-core FP32 at 76.4 % and full clock: counted at the FP32 rate in all three.
        let gpm = GpmPipes { hmma_tensor: Some(0.0), fp32: Some(76.4), ..GpmPipes::default() };
        let r = rate(&h200(), &Reading { gpm: Some(&gpm), ..Reading::default() }).unwrap();
        assert!(
            close(r.ops_per_s.point, 0.764 * 66.9e12) && close(r.ops_per_s.lower, r.ops_per_s.upper),
            "{r:?}"
        );
        // A memory-bound copy: DRAM and integer activity count for nothing.
        let gpm = GpmPipes {
            hmma_tensor: Some(0.0),
            dram_bw: Some(88.7),
            integer: Some(30.0),
            ..GpmPipes::default()
        };
        let r = rate(&h200(), &Reading { gpm: Some(&gpm), ..Reading::default() }).unwrap();
        assert_eq!(r.ops_per_s, Bounds::default());
    }

    #[test]
    fn without_the_breakdown_any_tensor_then_utilization_are_used_and_labelled() {
        let v1 = Reading {
            any_tensor_pct: Some(50.0),
            sm_clock_mhz: Some(990),
            max_sm_clock_mhz: Some(1980),
            ..Reading::default()
        };
        let r = rate(&h200(), &v1).unwrap();
        assert_eq!(r.method, EstimationMethod::GpmTensor);
        assert!(close(r.ops_per_s.point, 0.5 * 989.4e12 * 0.5), "{r:?}");
        let util = Reading { utilization_pct: Some(80), ..Reading::default() };
        let r = rate(&h200(), &util).unwrap();
        assert_eq!(r.method, EstimationMethod::UtilizationUpperBound);
        assert_eq!(r.ops_per_s.lower, 0.0);
        assert!(
            close(r.ops_per_s.point, 0.8 * 989.4e12) && close(r.ops_per_s.upper, 0.8 * 1978.9e12),
            "{r:?}"
        );
        assert_eq!(rate(&h200(), &Reading::default()), None);
        assert_eq!(rate(&Rates::default(), &util), None, "no BF16 peak, no estimate");
    }

    #[test]
    fn shared_figures_keep_the_whole_as_the_upper_bound() {
        let b = Bounds { lower: 1.0, point: 2.0, upper: 4.0 };
        assert_eq!(b.shared(0.25), Bounds { lower: 0.0, point: 0.5, upper: 4.0 });
        assert_eq!(clock_ratio(Some(3000), Some(1980)), 1.0);
        assert_eq!(clock_ratio(None, Some(1980)), 1.0);
    }
}
