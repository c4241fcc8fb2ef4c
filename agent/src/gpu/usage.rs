//! Usage windows per (tenant, workload): what the agent reports about GPU use.
//!
//! The sampler hands [`UsageAggregator::observe`] one [`Observation`] per (workload, GPU) per
//! tick. Windows are aligned to multiples of the window length in Unix time (default 60 s); a
//! tick belongs to the window containing its end instant minus 1 ms, so a tick ending exactly
//! on a boundary counts towards the window it closes. A window is emitted when the first tick
//! of a later window arrives (or on [`UsageAggregator::flush`]), as the
//! [`kycd_protocol::UsageWindow`] wire type.
//!
//! Per window and key: GPU-seconds (tick length for each GPU the workload had a process on),
//! distinct GPUs, most GPUs in one tick, operations as three figures (lower bound, point
//! estimate, upper bound: [`super::estimate`]), GPU-seconds on GPUs shared without isolation,
//! summed dense BF16 peak of the GPUs used, the estimation method (the weakest seen, in
//! [`EstimationMethod::strength`] order), and the local `training_like` flag
//! ([`TrainingRule`]).
//!
//! Windows go to the reporting pipeline over a bounded [`tokio::sync::mpsc`] channel
//! ([`window_channel`]); a full channel back-pressures the sampler thread rather than dropping
//! usage.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kycd_protocol::{EstimationMethod, ForeignStatus, UsageWindow};

use super::estimate::Bounds;
use crate::discovery::workload::WorkloadId;

/// Default window length.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The sending half the sampler writes windows to.
pub type WindowSender = tokio::sync::mpsc::Sender<UsageWindow>;
/// The receiving half the reporting pipeline reads.
pub type WindowReceiver = tokio::sync::mpsc::Receiver<UsageWindow>;

/// A bounded channel for windows (`capacity` at least 1).
pub fn window_channel(capacity: usize) -> (WindowSender, WindowReceiver) {
    tokio::sync::mpsc::channel(capacity.max(1))
}

/// When a workload looks like a training run, locally: at least `min_gpus` GPUs each at least
/// `min_activity` busy (this workload's share) for at least `min_duration` without a break.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingRule {
    /// N: GPUs.
    pub min_gpus: u32,
    /// X: activity fraction per GPU, 0..=1.
    pub min_activity: f64,
    /// T: sustained for this long.
    pub min_duration: Duration,
}

impl Default for TrainingRule {
    fn default() -> Self {
        TrainingRule { min_gpus: 8, min_activity: 0.5, min_duration: Duration::from_secs(10 * 60) }
    }
}

/// Who a usage belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageKey {
    /// Tenant (`sub` of a valid attestation); `None`: unattributed, the policy's `unverified`
    /// path.
    pub tenant: Option<String>,
    /// The workload.
    pub workload: WorkloadId,
    /// From the tenant's attestation.
    pub foreign_person: bool,
}

/// One workload's use of one GPU over one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Who.
    pub key: UsageKey,
    /// Which GPU (or MIG instance).
    pub gpu_uuid: String,
    /// The GPU's dense BF16 tensor peak, FLOP/s, if known.
    pub peak_flops: Option<f64>,
    /// This workload's operations per second on the GPU over the tick; `None` when they
    /// could not be estimated.
    pub ops_per_s: Option<Bounds>,
    /// How busy the GPU was for this workload over the tick, 0..=1 (the training rule's X).
    pub activity: f64,
    /// How the operations were estimated; `Unknown` if they were not.
    pub method: EstimationMethod,
    /// The GPU was shared with another workload without isolation.
    pub shared: bool,
    /// A GPU passed through to a VM whose guest is not reporting (`guest_telemetry_gap`).
    pub guest_gap: bool,
}

#[derive(Debug, Clone)]
struct Open {
    gpus: BTreeSet<String>,
    peak_by_gpu: BTreeMap<String, f64>,
    gpu_seconds: f64,
    shared_gpu_seconds: f64,
    guest_gap_gpu_seconds: f64,
    ops: Bounds,
    max_concurrent: u32,
    method: EstimationMethod,
    training_like: bool,
}

/// Accumulates ticks into windows.
#[derive(Debug, Clone)]
pub struct UsageAggregator {
    window_ms: i64,
    rule: TrainingRule,
    /// Index of the window being filled.
    current: Option<i64>,
    open: BTreeMap<UsageKey, Open>,
    /// Since when each key has met the training rule without a break (Unix ms).
    runs: BTreeMap<UsageKey, i64>,
    last_end_ms: i64,
}

impl UsageAggregator {
    /// Windows of `window` (whole seconds, at least 1).
    pub fn new(window: Duration, rule: TrainingRule) -> Self {
        let window_ms = i64::try_from(window.as_secs().max(1)).unwrap_or(i64::MAX / 2_000) * 1000;
        UsageAggregator {
            window_ms,
            rule,
            current: None,
            open: BTreeMap::new(),
            runs: BTreeMap::new(),
            last_end_ms: 0,
        }
    }

    /// Adds one tick `(end_ms - dt, end_ms]`; returns windows this tick closed.
    ///
    /// A tick that began before the window its end falls in is split at the window's start:
    /// the part before it goes to the window just closed (when that is the one before),
    /// and nothing is counted before a window's start. So a window never holds more than
    /// `gpus × (end - start)` GPU-seconds or `peak × (end - start)` operations, whatever
    /// the sampling interval — the collector refuses windows that do.
    pub fn observe(&mut self, end_ms: i64, dt: Duration, observations: &[Observation]) -> Vec<UsageWindow> {
        let index = (end_ms - 1).div_euclid(self.window_ms);
        let window_start_ms = index.saturating_mul(self.window_ms);
        let start_ms = end_ms.saturating_sub(i64::try_from(dt.as_millis()).unwrap_or(i64::MAX));
        let mut closed = Vec::new();
        if let Some(current) = self.current.filter(|c| *c != index) {
            if current == index - 1 && start_ms < window_start_ms {
                let before = (window_start_ms - start_ms).min(self.window_ms);
                let before = Duration::from_millis(u64::try_from(before).unwrap_or(0));
                self.accumulate(window_start_ms, before, observations);
                // The closed window then runs to its nominal end.
                self.last_end_ms = window_start_ms;
            }
            closed = self.close_current();
        }
        self.current = Some(index);
        self.last_end_ms = end_ms;
        let within = end_ms - start_ms.max(window_start_ms);
        self.accumulate(end_ms, Duration::from_millis(u64::try_from(within).unwrap_or(0)), observations);
        closed
    }

    /// Adds `(end_ms - dt, end_ms]` of `observations` to the window being filled.
    fn accumulate(&mut self, end_ms: i64, dt: Duration, observations: &[Observation]) {
        let dt_s = dt.as_secs_f64();

        let mut per_key: BTreeMap<&UsageKey, Vec<&Observation>> = BTreeMap::new();
        for o in observations {
            per_key.entry(&o.key).or_default().push(o);
        }
        // A key that used no GPU this tick has broken its run.
        self.runs.retain(|k, _| per_key.contains_key(k));

        let start_ms = end_ms - i64::try_from(dt.as_millis()).unwrap_or(0);
        for (key, obs) in per_key {
            let open = self.open.entry(key.clone()).or_insert_with(|| Open {
                gpus: BTreeSet::new(),
                peak_by_gpu: BTreeMap::new(),
                gpu_seconds: 0.0,
                shared_gpu_seconds: 0.0,
                guest_gap_gpu_seconds: 0.0,
                ops: Bounds::default(),
                max_concurrent: 0,
                // The strongest: every observation can only weaken it.
                method: EstimationMethod::GpmPipes,
                training_like: false,
            });
            let gpus_now: BTreeSet<&str> = obs.iter().map(|o| o.gpu_uuid.as_str()).collect();
            open.max_concurrent = open.max_concurrent.max(u32::try_from(gpus_now.len()).unwrap_or(u32::MAX));
            open.gpu_seconds += dt_s * gpus_now.len() as f64;
            let shared_now: BTreeSet<&str> =
                obs.iter().filter(|o| o.shared).map(|o| o.gpu_uuid.as_str()).collect();
            open.shared_gpu_seconds += dt_s * shared_now.len() as f64;
            let gap_now: BTreeSet<&str> =
                obs.iter().filter(|o| o.guest_gap).map(|o| o.gpu_uuid.as_str()).collect();
            open.guest_gap_gpu_seconds += dt_s * gap_now.len() as f64;
            for o in &obs {
                open.gpus.insert(o.gpu_uuid.clone());
                let method = if o.ops_per_s.is_none() { EstimationMethod::Unknown } else { o.method };
                open.method = open.method.weakest(method);
                if let Some(peak) = o.peak_flops {
                    open.peak_by_gpu.insert(o.gpu_uuid.clone(), peak);
                }
                if let Some(rate) = o.ops_per_s {
                    open.ops.add(rate.scaled(dt_s));
                }
            }
            let busy = obs
                .iter()
                .filter(|o| o.activity >= self.rule.min_activity)
                .map(|o| o.gpu_uuid.as_str())
                .collect::<BTreeSet<_>>()
                .len();
            if busy >= self.rule.min_gpus as usize && self.rule.min_gpus > 0 {
                let since = *self.runs.entry(key.clone()).or_insert(start_ms);
                let min_ms = i64::try_from(self.rule.min_duration.as_millis()).unwrap_or(i64::MAX);
                if end_ms - since >= min_ms {
                    open.training_like = true;
                }
            } else {
                self.runs.remove(key);
            }
        }
    }

    /// Closes the window being filled (at shutdown), ending it at the last tick.
    pub fn flush(&mut self) -> Vec<UsageWindow> {
        self.close_current()
    }

    fn close_current(&mut self) -> Vec<UsageWindow> {
        let Some(index) = self.current.take() else { return Vec::new() };
        let start = index * self.window_ms / 1000;
        let nominal_end = (index + 1) * self.window_ms / 1000;
        // A partial window (flush) ends at its last tick, rounded up to a whole second.
        let end = nominal_end.min((self.last_end_ms + 999).div_euclid(1000));
        std::mem::take(&mut self.open)
            .into_iter()
            .map(|(key, open)| UsageWindow {
                foreign_status: Some(match key.tenant {
                    None => ForeignStatus::Unknown,
                    Some(_) => ForeignStatus::from_flag(key.foreign_person),
                }),
                tenant: key.tenant,
                workload: key.workload.to_string(),
                foreign_person: key.foreign_person,
                start,
                end,
                gpu_seconds: open.gpu_seconds,
                gpus: u32::try_from(open.gpus.len()).unwrap_or(u32::MAX),
                max_concurrent_gpus: open.max_concurrent,
                estimated_ops: open.ops.point,
                ops_lower: Some(open.ops.lower),
                ops_upper: Some(open.ops.upper),
                shared_gpu_seconds: open.shared_gpu_seconds,
                guest_gap_gpu_seconds: open.guest_gap_gpu_seconds,
                peak_flops: open.peak_by_gpu.values().sum(),
                method: open.method,
                training_like: open.training_like,
                merged_windows: 1,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(tenant: &str, gpu: usize, activity: f64, method: EstimationMethod) -> Observation {
        Observation {
            key: UsageKey {
                tenant: Some(tenant.into()),
                workload: WorkloadId::host(),
                foreign_person: false,
            },
            gpu_uuid: format!("GPU-{gpu}"),
            peak_flops: Some(1e15),
            ops_per_s: Some(Bounds {
                lower: 0.5e15 * activity,
                point: 1e15 * activity,
                upper: 2e15 * activity,
            }),
            activity,
            method,
            shared: false,
            guest_gap: false,
        }
    }

    #[test]
    fn windows_align_and_carry_totals() {
        let mut agg = UsageAggregator::new(Duration::from_secs(60), TrainingRule::default());
        let t0 = 1_764_000_000_000; // a multiple of 60 s
        let mut closed = Vec::new();
        for k in 1..=61 {
            let o = [
                obs("a", 0, 0.5, EstimationMethod::GpmTensor),
                obs("a", 1, 0.25, EstimationMethod::GpmTensor),
            ];
            closed.extend(agg.observe(t0 + k * 1000, Duration::from_secs(1), &o));
        }
        assert_eq!(closed.len(), 1);
        let w = &closed[0];
        assert_eq!((w.start, w.end), (t0 / 1000, t0 / 1000 + 60));
        assert_eq!(w.gpu_seconds, 120.0);
        assert_eq!((w.gpus, w.max_concurrent_gpus), (2, 2));
        assert!((w.estimated_ops - 60.0 * 0.75e15).abs() < 1.0);
        let (lower, upper) = (w.ops_lower.unwrap(), w.ops_upper.unwrap());
        assert!((lower - 60.0 * 0.375e15).abs() < 1.0 && (upper - 60.0 * 1.5e15).abs() < 1.0, "{w:?}");
        assert_eq!(w.shared_gpu_seconds, 0.0);
        assert_eq!(w.peak_flops, 2e15);
        assert_eq!(w.method, EstimationMethod::GpmTensor);
        let rest = agg.flush();
        assert_eq!((rest[0].start, rest[0].end, rest[0].gpu_seconds), (t0 / 1000 + 60, t0 / 1000 + 61, 2.0));
    }

    #[test]
    fn ticks_straddling_a_window_start_are_split_and_never_overfill_a_window() {
        // A 5 s sampling interval whose ticks do not line up with the 60 s windows: each
        // window holds exactly its own 60 s per GPU, the first nothing before its start.
        let mut agg = UsageAggregator::new(Duration::from_secs(60), TrainingRule::default());
        let t0 = 1_764_000_000_000; // a multiple of 60 s
        let mut closed = Vec::new();
        for k in 0..30 {
            let o = [obs("a", 0, 1.0, EstimationMethod::GpmTensor)];
            closed.extend(agg.observe(t0 + 3_000 + k * 5_000, Duration::from_secs(5), &o));
        }
        closed.extend(agg.flush());
        assert!(closed.len() >= 3, "{closed:?}");
        for w in &closed {
            let length = (w.end - w.start) as f64;
            assert!(w.gpu_seconds <= length + 1e-9, "{w:?}");
            assert!(w.estimated_ops <= w.peak_flops * length * (1.0 + 1e-12), "{w:?}");
        }
        // The first tick (t0 - 2 s, t0 + 3 s] counts from t0 only; the tick ending at
        // t0 + 63 s gives its first 2 s to the first window, which so holds exactly 60 s.
        assert_eq!((closed[0].gpu_seconds, closed[1].gpu_seconds, closed[2].gpu_seconds), (60.0, 60.0, 28.0));
        let total: f64 = closed.iter().map(|w| w.gpu_seconds).sum();
        assert_eq!(total, 148.0, "every second from t0 to the last tick at t0 + 148 s, once");
        // A window flushed right after a tick that began before it (an agent stopping 3 s
        // into a window, with 5 s ticks) holds only its own 3 s.
        let mut agg = UsageAggregator::new(Duration::from_secs(60), TrainingRule::default());
        agg.observe(t0 - 2_000, Duration::ZERO, &[obs("a", 0, 1.0, EstimationMethod::GpmTensor)]);
        agg.observe(t0 + 3_000, Duration::from_secs(5), &[obs("a", 0, 1.0, EstimationMethod::GpmTensor)]);
        let short = agg.flush();
        let w = short.iter().find(|w| w.start == t0 / 1000).unwrap();
        assert_eq!((w.end - w.start, w.gpu_seconds), (3, 3.0), "{short:?}");
    }

    #[test]
    fn training_like_needs_enough_gpus_for_long_enough() {
        let rule = TrainingRule { min_gpus: 2, min_activity: 0.5, min_duration: Duration::from_secs(30) };
        let mut agg = UsageAggregator::new(Duration::from_secs(60), rule);
        let t0 = 1_764_000_000_000;
        for k in 1..=29 {
            let o = [
                obs("a", 0, 0.9, EstimationMethod::GpmTensor),
                obs("a", 1, 0.9, EstimationMethod::UtilizationUpperBound),
            ];
            agg.observe(t0 + k * 1000, Duration::from_secs(1), &o);
        }
        // 29 s is not enough; one idle GPU resets the run.
        agg.observe(t0 + 30_000, Duration::from_secs(1), &[obs("a", 0, 0.9, EstimationMethod::GpmTensor)]);
        let w = agg.flush();
        assert!(!w[0].training_like);
        assert_eq!(w[0].method, EstimationMethod::UtilizationUpperBound);
        for k in 31..=61 {
            let o = [
                obs("a", 0, 0.9, EstimationMethod::GpmTensor),
                obs("a", 1, 0.6, EstimationMethod::GpmTensor),
            ];
            agg.observe(t0 + k * 1000, Duration::from_secs(1), &o);
        }
        assert!(agg.flush()[0].training_like);
    }
}
