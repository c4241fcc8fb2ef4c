//! Training runs: a tenant's usage cut where it pauses.
//!
//! While windows stream through the aggregation, each tenant's windows are folded into
//! [`Activity`]: disjoint busy segments (windows closer than [`TOUCH_S`] to each other join
//! one segment, whatever host or workload reported them), each with its figures. A policy
//! then cuts the segments into [`Run`]s ([`Activity::runs`]): segments separated by no more
//! than the policy's `run_gap_s` belong to one run. So a run is the tenant's contiguous busy
//! time across hosts and workloads: a distributed job on many hosts is one run, and two jobs
//! of one tenant that overlap in time count as one (the conservative reading: their sum
//! reaches a threshold no later than either alone would).
//!
//! A run is named by the start of its first window (`tenant/run/START`). A window arriving
//! late (a host's spool drained after an outage) can join two runs or move a run's start
//! earlier; the findings already raised on the old names stay (threshold findings never
//! close), and the evidence of each names its windows' span.
//!
//! Memory grows with the number of busy segments per tenant, not with windows: agents close
//! windows back to back while a workload runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Windows at most this far apart (seconds) are one busy segment: the agents' window length,
/// so back-to-back windows and a host's clock skew of a few seconds never split a segment.
pub const TOUCH_S: i64 = 60;

/// Figures summed over windows, saturating like every total ([`super::saturating_sum`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    /// Lower bound of operations.
    pub ops_lower: f64,
    /// Point estimate of operations.
    pub estimated_ops: f64,
    /// Upper bound of operations.
    pub ops_upper: f64,
    /// GPU-seconds.
    pub gpu_seconds: f64,
    /// Windows.
    pub windows: u64,
    /// Point estimate by estimation method (wire names).
    pub ops_by_method: BTreeMap<String, f64>,
}

impl RunFigures {
    /// Adds `other` (saturating).
    pub fn merge(&mut self, other: RunFigures) {
        use super::saturating_sum as sum;
        self.ops_lower = sum(self.ops_lower, other.ops_lower);
        self.estimated_ops = sum(self.estimated_ops, other.estimated_ops);
        self.ops_upper = sum(self.ops_upper, other.ops_upper);
        self.gpu_seconds = sum(self.gpu_seconds, other.gpu_seconds);
        self.windows = self.windows.saturating_add(other.windows);
        for (method, ops) in other.ops_by_method {
            let total = self.ops_by_method.entry(method).or_insert(0.0);
            *total = sum(*total, ops);
        }
    }
}

/// One busy segment.
#[derive(Debug, Clone, Default, PartialEq)]
struct Segment {
    end: i64,
    figures: RunFigures,
    /// Hosts (the accumulator's indices) that reported in it.
    hosts: BTreeSet<u32>,
}

/// One window as a run sees it.
#[derive(Debug, Clone, Copy)]
pub struct RunWindow<'a> {
    /// Reporting host (the accumulator's index; [`Activity::runs`] names it).
    pub host: u32,
    /// Start.
    pub start: i64,
    /// End.
    pub end: i64,
    /// Lower bound.
    pub ops_lower: f64,
    /// Point estimate.
    pub estimated_ops: f64,
    /// Upper bound.
    pub ops_upper: f64,
    /// GPU-seconds.
    pub gpu_seconds: f64,
    /// Estimation method.
    pub method: &'a str,
}

/// A tenant's busy segments, by start, and the names of the host indices they hold (set when
/// the aggregation finishes). Two are equal when their segments are, with hosts compared by
/// name: the indices depend on the order the aggregation met the hosts in.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    segments: BTreeMap<i64, Segment>,
    names: Arc<[Arc<str>]>,
}

impl PartialEq for Activity {
    fn eq(&self, other: &Self) -> bool {
        let named = |a: &Activity| -> Vec<(i64, i64, RunFigures, Vec<String>)> {
            a.segments
                .iter()
                .map(|(start, s)| (*start, s.end, s.figures.clone(), a.host_names(&s.hosts)))
                .collect()
        };
        named(self) == named(other)
    }
}

impl Activity {
    /// Folds one window in, joining every segment it touches.
    pub fn add(&mut self, w: &RunWindow<'_>) {
        let (start, end) = (w.start.min(w.end), w.end.max(w.start));
        // The common case, a window inside or right after one segment, updates it in place.
        let mut touching = self
            .segments
            .range_mut(..=end.saturating_add(TOUCH_S))
            .rev()
            .take_while(|(_, s)| s.end.saturating_add(TOUCH_S) >= start);
        if let (Some((key, segment)), None) = (touching.next(), touching.next()) {
            if *key <= start {
                segment.end = segment.end.max(end);
                let f = &mut segment.figures;
                f.ops_lower = super::saturating_sum(f.ops_lower, w.ops_lower);
                f.estimated_ops = super::saturating_sum(f.estimated_ops, w.estimated_ops);
                f.ops_upper = super::saturating_sum(f.ops_upper, w.ops_upper);
                f.gpu_seconds = super::saturating_sum(f.gpu_seconds, w.gpu_seconds);
                f.windows = f.windows.saturating_add(1);
                if w.estimated_ops > 0.0 {
                    match f.ops_by_method.get_mut(w.method) {
                        Some(ops) => *ops = super::saturating_sum(*ops, w.estimated_ops),
                        None => {
                            f.ops_by_method.insert(w.method.to_owned(), finite(w.estimated_ops));
                        }
                    }
                }
                segment.hosts.insert(w.host);
                return;
            }
        }
        let mut start = start;
        let mut segment = Segment { end: w.end.max(w.start), ..Segment::default() };
        segment.hosts.insert(w.host);
        let f = &mut segment.figures;
        (f.ops_lower, f.estimated_ops, f.ops_upper, f.gpu_seconds, f.windows) =
            (finite(w.ops_lower), finite(w.estimated_ops), finite(w.ops_upper), finite(w.gpu_seconds), 1);
        if f.estimated_ops > 0.0 {
            f.ops_by_method.insert(w.method.to_owned(), f.estimated_ops);
        }
        // Segments are disjoint and sorted, so their ends increase too: walk back from the
        // last one starting before the window's reach while they still reach the window.
        let reach = segment.end.saturating_add(TOUCH_S);
        let touched: Vec<i64> = self
            .segments
            .range(..=reach)
            .rev()
            .take_while(|(_, s)| s.end.saturating_add(TOUCH_S) >= start)
            .map(|(s, _)| *s)
            .collect();
        for key in touched {
            if let Some(old) = self.segments.remove(&key) {
                start = start.min(key);
                segment.end = segment.end.max(old.end);
                segment.figures.merge(old.figures);
                segment.hosts.extend(old.hosts);
            }
        }
        self.segments.insert(start, segment);
    }

    /// The runs: segments no more than `gap_s` apart joined, in time order. `peak` gives the
    /// largest concurrent capacity (FLOP/s, minute start) between two times; a run whose last
    /// window ended within `gap_s` of `now` is still running.
    pub fn runs(&self, gap_s: i64, now: i64, peak: impl Fn(i64, i64) -> (f64, i64)) -> Vec<Run> {
        let mut runs: Vec<(i64, Segment)> = Vec::new();
        for (start, segment) in &self.segments {
            match runs.last_mut() {
                Some((_, run)) if start.saturating_sub(run.end) <= gap_s => {
                    run.end = run.end.max(segment.end);
                    run.figures.merge(segment.figures.clone());
                    run.hosts.extend(segment.hosts.iter().copied());
                }
                _ => runs.push((*start, segment.clone())),
            }
        }
        runs.into_iter()
            .map(|(start, s)| {
                let (peak_flops, peak_at) = peak(start, s.end);
                Run {
                    first_start: start,
                    last_end: s.end,
                    still_running: now.saturating_sub(s.end) <= gap_s,
                    hosts: self.host_names(&s.hosts),
                    peak_flops,
                    peak_at,
                    figures: s.figures,
                }
            })
            .collect()
    }

    /// The activity of stored segments: (start, end, figures, host ids), disjoint.
    pub fn from_segments(
        segments: impl IntoIterator<Item = (i64, i64, RunFigures, Vec<String>)>,
    ) -> Activity {
        let mut index: BTreeMap<String, u32> = BTreeMap::new();
        let mut names: Vec<Arc<str>> = Vec::new();
        let mut activity = Activity::default();
        for (start, end, figures, hosts) in segments {
            let hosts = hosts
                .into_iter()
                .map(|host| {
                    let next = u32::try_from(names.len()).unwrap_or(u32::MAX);
                    *index.entry(host).or_insert_with_key(|host| {
                        names.push(Arc::from(host.as_str()));
                        next
                    })
                })
                .collect();
            activity.segments.insert(start, Segment { end, figures, hosts });
        }
        activity.names = names.into();
        activity
    }

    /// Busy segments held.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Names the host indices of the segments with `names` (the aggregation's host table).
    pub fn name_hosts(&mut self, names: Arc<[Arc<str>]>) {
        self.names = names;
    }

    /// The sorted names of `hosts`.
    fn host_names(&self, hosts: &BTreeSet<u32>) -> Vec<String> {
        let mut out: Vec<String> = hosts
            .iter()
            .filter_map(|h| self.names.get(usize::try_from(*h).ok()?).map(|n| n.to_string()))
            .collect();
        out.sort();
        out
    }
}

fn finite(v: f64) -> f64 {
    super::saturating_sum(0.0, v)
}

/// One training run of a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Start of its first window: the run's name (`tenant/run/START`).
    pub first_start: i64,
    /// End of its last window.
    pub last_end: i64,
    /// Whether its last window ended within the run gap of the evaluation: it may go on.
    pub still_running: bool,
    /// The hosts that reported it, sorted.
    pub hosts: Vec<String>,
    /// Largest concurrent FLOP/s capacity in one minute of the run, summed across hosts.
    pub peak_flops: f64,
    /// Start of that minute.
    pub peak_at: i64,
    /// Its figures.
    #[serde(flatten)]
    pub figures: RunFigures,
}

impl Run {
    /// The subject of a finding about the run of `tenant`.
    pub fn subject(&self, tenant: &str) -> String {
        format!("{tenant}/run/{}", self.first_start)
    }

    /// GPU-hours.
    pub fn gpu_hours(&self) -> f64 {
        self.figures.gpu_seconds / 3600.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(host: u32, start: i64, len: i64) -> RunWindow<'static> {
        RunWindow {
            host,
            start,
            end: start + len,
            ops_lower: 1.0,
            estimated_ops: 2.0,
            ops_upper: 4.0,
            gpu_seconds: len as f64,
            method: "gpm_pipes",
        }
    }

    fn runs(a: &Activity, gap: i64, now: i64) -> Vec<Run> {
        let mut a = a.clone();
        a.name_hosts((0..3).map(|h| Arc::from(format!("h{h}"))).collect());
        a.runs(gap, now, |s, _| (1.0, s))
    }

    /// Back-to-back windows of two hosts, in any order, are one segment; a pause longer than
    /// the gap starts a new run, a shorter one does not; a late window joins two runs.
    #[test]
    fn runs_are_cut_at_pauses_longer_than_the_gap() {
        let mut a = Activity::default();
        // Run 1: hosts 0 and 1, minutes 0..10, added out of order.
        for m in (0..10).rev() {
            a.add(&window(0, 60 * m, 60));
            a.add(&window(1, 60 * m + 5, 60));
        }
        // A pause of 30 minutes, then run 2 on host 1 for 5 minutes, a 10-minute pause, 5 more.
        for m in 40..45 {
            a.add(&window(1, 60 * m, 60));
        }
        for m in 55..60 {
            a.add(&window(1, 60 * m, 60));
        }
        assert_eq!(a.segments(), 3);
        let r = runs(&a, 900, 3600);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[0].first_start, r[0].last_end, r[0].figures.windows), (0, 605, 20));
        assert_eq!(r[0].hosts, ["h0", "h1"]);
        assert!(!r[0].still_running);
        assert_eq!((r[1].first_start, r[1].last_end, r[1].figures.windows), (2400, 3600, 10));
        assert_eq!((r[1].figures.estimated_ops, r[1].figures.ops_upper), (20.0, 40.0));
        assert_eq!(r[1].figures.ops_by_method.get("gpm_pipes").copied(), Some(20.0));
        assert!(r[1].still_running);
        assert_eq!(r[1].subject("t"), "t/run/2400");
        // With a 5-minute gap run 2 is two runs; with an hour, everything is one.
        assert_eq!(runs(&a, 300, 3600).len(), 3);
        assert_eq!(runs(&a, 3600, 3600).len(), 1);
        // A late window filling the pause joins runs 1 and 2 into one segment.
        for m in 10..40 {
            a.add(&window(2, 60 * m, 60));
        }
        assert_eq!(a.segments(), 2);
        assert_eq!(runs(&a, 300, 3600)[0].hosts, ["h0", "h1", "h2"]);
    }
}
