//! `kycctl gpu estimate`: the device-level estimate over part of a recorded trace.
//!
//! For auditors and calibration runs (`bench/gpu_calibration`): the same estimate the sampler
//! makes ([`super::estimate`], same peak table), per GPU and in total, over the sampling
//! intervals that lie inside `[from, to]`. An interval is the time between two consecutive
//! samples that both reached the driver; its activity is what the later sample reports.

use std::collections::BTreeMap;

use kycd_protocol::EstimationMethod;
use serde::Serialize;

use super::estimate::{self, Bounds, Reading};
use super::peaks::PeakTable;
use super::{BackendState, GpuState, Sample};

/// One GPU's figures over the span.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuFigures {
    /// GPU UUID.
    pub uuid: String,
    /// Model name.
    pub name: String,
    /// The weakest method of its intervals (`unknown` when its peak is unknown).
    pub method: EstimationMethod,
    /// Seconds of intervals counted for it.
    pub seconds: f64,
    /// Operations, lower bound.
    pub ops_lower: f64,
    /// Operations, point estimate.
    pub estimated_ops: f64,
    /// Operations, upper bound.
    pub ops_upper: f64,
}

/// The three figures, summed over GPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Operations, lower bound.
    pub ops_lower: f64,
    /// Operations, point estimate.
    pub estimated_ops: f64,
    /// Operations, upper bound.
    pub ops_upper: f64,
}

/// What `kycctl gpu estimate --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpanEstimate {
    /// Start of the span asked for, Unix seconds.
    pub from: f64,
    /// End of the span asked for, Unix seconds.
    pub to: f64,
    /// Seconds covered by the intervals counted (at most `to - from`).
    pub seconds: f64,
    /// Intervals counted.
    pub intervals: usize,
    /// Per GPU.
    pub gpus: Vec<GpuFigures>,
    /// All GPUs.
    pub total: Totals,
}

/// The estimate over the intervals of `samples` inside `[from, to]` (Unix seconds).
pub fn estimate_span(samples: &[Sample], peaks: &PeakTable, from: f64, to: f64) -> SpanEstimate {
    let mut gpus: BTreeMap<String, (GpuFigures, Bounds)> = BTreeMap::new();
    let (mut seconds, mut intervals) = (0.0, 0);
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.backend == BackendState::Ok).collect();
    for pair in ok.windows(2) {
        let (before, after) = (pair[0], pair[1]);
        let (start, end) = (before.at_ms as f64 / 1000.0, after.at_ms as f64 / 1000.0);
        if end <= start || start < from || end > to {
            continue;
        }
        let dt = end - start;
        seconds += dt;
        intervals += 1;
        for gpu in after.gpus.iter().filter(|g| g.state == GpuState::Ok) {
            let p = peaks.peaks(&gpu.name, gpu.sm_count, gpu.max_sm_clock_mhz, gpu.compute_capability);
            let rate = estimate::rate(&p.rates, &Reading::of(gpu));
            let (figures, ops) = gpus.entry(gpu.uuid.clone()).or_insert_with(|| {
                let figures = GpuFigures {
                    uuid: gpu.uuid.clone(),
                    name: gpu.name.clone(),
                    method: EstimationMethod::GpmPipes,
                    seconds: 0.0,
                    ops_lower: 0.0,
                    estimated_ops: 0.0,
                    ops_upper: 0.0,
                };
                (figures, Bounds::default())
            });
            figures.seconds += dt;
            match rate {
                Some(r) => {
                    figures.method = figures.method.weakest(r.method);
                    ops.add(r.ops_per_s.scaled(dt));
                }
                None => figures.method = EstimationMethod::Unknown,
            }
        }
    }
    let mut total = Totals::default();
    let gpus = gpus
        .into_values()
        .map(|(mut f, ops)| {
            (f.ops_lower, f.estimated_ops, f.ops_upper) = (ops.lower, ops.point, ops.upper);
            total.ops_lower += ops.lower;
            total.estimated_ops += ops.point;
            total.ops_upper += ops.upper;
            f
        })
        .collect();
    SpanEstimate { from, to, seconds, intervals, gpus, total }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpmPipes, GpuSnapshot};

    fn sample(at_s: i64, hmma: f64) -> Sample {
        let mut gpu = GpuSnapshot::bare(0, "GPU-0".into(), "NVIDIA H200".into(), GpuState::Ok);
        gpu.gpm = Some(GpmPipes { hmma_tensor: Some(hmma), ..GpmPipes::default() });
        (gpu.sm_clock_mhz, gpu.max_sm_clock_mhz) = (Some(990), Some(1980));
        Sample::new(at_s * 1000, BackendState::Ok, vec![gpu])
    }

    #[test]
    fn counts_only_intervals_inside_the_span() {
        let samples: Vec<Sample> =
            (0..10).map(|k| sample(100 + k, if k < 5 { 0.0 } else { 100.0 })).collect();
        let peaks = PeakTable::builtin().unwrap();
        let e = estimate_span(&samples, &peaks, 104.5, 109.0);
        // Intervals (105,106] … (108,109]: 4 s at 100 % HMMA and half clock.
        assert_eq!((e.intervals, e.seconds), (4, 4.0));
        assert!((e.total.estimated_ops - 4.0 * 989.4e12 * 0.5).abs() < 1e3, "{e:?}");
        assert!((e.total.ops_upper - 4.0 * 1978.9e12 * 0.5).abs() < 1e3, "{e:?}");
        assert_eq!(e.gpus[0].method, EstimationMethod::GpmPipes);
        let none = estimate_span(&samples, &peaks, 200.0, 300.0);
        assert_eq!((none.intervals, none.gpus.len(), none.total.estimated_ops), (0, 0, 0.0));
    }
}
