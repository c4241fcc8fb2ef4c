//! Roll-ups: the aggregates of the usage windows that evaluation and the read API need,
//! maintained at ingest in the transaction that stores the windows, so reading the fleet's
//! all-time usage costs the number of tenants, hosts and busy segments, not the number of
//! windows ever stored (issue 20).
//!
//! A roll-up row belongs to a *subject* ([`Subject`]): a tenant, or one workload on one host
//! for windows without a tenant (aggregated per host and workload, as [`super::usage`] does).
//! The tables, all keyed by subject first:
//! - `rollup_subjects`: all-time sums (three operation figures, GPU-seconds, of them shared
//!   and guest-gap seconds, windows, first start, last end, foreign flag);
//! - `rollup_methods`: all-time point estimate by estimation method;
//! - `rollup_days`, `rollup_day_methods`, `rollup_day_hosts`: the same per UTC day, and which
//!   hosts reported the tenant that day (a filing period, a chart, the check);
//! - `rollup_hosts`: per (subject, host) the most GPUs used at once, shared and guest-gap
//!   seconds, and the host's cluster when it last reported;
//! - `rollup_gap_workloads`: per (subject, host, workload) the seconds a VM's guest was silent;
//! - `rollup_capacity`: concurrent FLOP/s per (subject, cluster, minute) — the cluster `*` is
//!   the whole fleet, `site/fabric` a placed cluster, `unplaced` the hosts placed nowhere —
//!   stored a row per hour ([`capacity`]), and `rollup_peaks` the largest bucket of each
//!   (earliest minute among equals);
//! - `rollup_segments` (+ `rollup_segment_hosts`): each tenant's busy segments
//!   ([`super::runs`]): the runs are cut from them at evaluation with the policy's gap.
//!
//! The numbers are the ones [`super::UsageAccumulator`] computes from the raw windows, with
//! one difference: a window counts in the cluster its host was placed in *when the window was
//! stored* (the accumulator uses today's placements). `kycd-collector rollups check`
//! recomputes everything from the raw windows and compares ([`check`]); `rollups rebuild`
//! recomputes the tables (after a restore, or to apply re-placed hosts to history).
//!
//! Layout: this file (the model and how windows add up), [`apply`] (merging a batch's
//! roll-ups into the stored ones through a backend's [`apply::RollupTx`]), [`assemble`] (the
//! stored rows as [`super::FleetUsage`]), [`check`] (the comparison).

use std::collections::{BTreeMap, BTreeSet};

use super::runs::{RunFigures, TOUCH_S};
use super::usage::{saturating_sum, WindowRow, CAPACITY_BUCKET_S};
use super::Placement;

pub mod apply;
pub mod assemble;
pub mod capacity;
pub mod check;

/// Seconds in a roll-up day (UTC days: `start.div_euclid(86,400)`).
pub const DAY_S: i64 = 86_400;

/// The fleet-wide capacity's cluster name (placed clusters are `site/fabric`, which a `*`
/// can never be).
pub const FLEET: &str = "*";

/// The cluster name of the hosts placed nowhere.
pub const UNPLACED: &str = "unplaced";

/// The cluster name of a placement (`site/fabric`), or [`UNPLACED`].
pub fn cluster_name(placement: Option<&Placement>) -> String {
    placement.map_or_else(|| UNPLACED.to_owned(), |p| format!("{}/{}", p.site, p.fabric))
}

/// Which busy segments (so which runs) a read of the roll-ups takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segments {
    /// Every one: every run of the tenants read.
    All,
    /// None: the tenants' totals without their runs (a listing).
    None,
    /// The runs that may have changed since `since`: each segment changed at or after it
    /// (`changed_at`, the ingest time of the batch that last grew it), with every segment of
    /// the tenant after it and those before it no more than `gap_s` apart (its whole run).
    /// What a periodic evaluation reads: the other runs were evaluated before and have not
    /// changed, so the read does not grow with the history. The runs' hosts are not read
    /// (a finding's evidence asks for them: [`crate::fleet::FleetStore::run_hosts`]).
    ChangedSince {
        /// The time (collector clock).
        since: i64,
        /// The policy's `run_gap_s`.
        gap_s: i64,
    },
}

/// Which roll-up tables a read takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tables {
    /// What the fleet view needs: all-time sums, methods, hosts, guest-gap workloads, peaks.
    View,
    /// The view and the per-day tables (days, day methods, day hosts): one tenant's history
    /// (the console's chart), without the per-minute capacity buckets.
    History,
    /// Every table (a check or a rebuild).
    All,
}

/// Who a roll-up row is about: a tenant (`host_id` and `workload` empty), or one workload on
/// one host whose windows name no tenant (`tenant` empty; host ids are never empty).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject {
    /// The tenant, or empty.
    pub tenant: String,
    /// The host of a workload without a tenant, or empty.
    pub host_id: String,
    /// That workload, or empty.
    pub workload: String,
}

impl Subject {
    /// The subject of a window.
    pub fn of(w: &WindowRow<'_>) -> Subject {
        match w.tenant {
            Some(tenant) => {
                Subject { tenant: tenant.to_owned(), host_id: String::new(), workload: String::new() }
            }
            None => Subject {
                tenant: String::new(),
                host_id: w.host_id.to_owned(),
                workload: w.workload.unwrap_or_default().to_owned(),
            },
        }
    }

    /// Whether it is a tenant.
    pub fn is_tenant(&self) -> bool {
        self.host_id.is_empty()
    }
}

/// Sums over windows: a subject's all-time totals, or one day's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sums {
    /// Windows.
    pub windows: u64,
    /// Lower bound of operations.
    pub ops_lower: f64,
    /// Point estimate.
    pub estimated_ops: f64,
    /// Upper bound.
    pub ops_upper: f64,
    /// GPU-seconds.
    pub gpu_seconds: f64,
    /// Of them, on a GPU shared without isolation.
    pub shared_gpu_seconds: f64,
    /// Of them, of a VM whose guest sent no telemetry.
    pub guest_gap_gpu_seconds: f64,
    /// Start of the first window.
    pub first_start: i64,
    /// End of the last window.
    pub last_end: i64,
    /// Whether any window marks the tenant a foreign person.
    pub foreign_person: bool,
}

impl Sums {
    fn of(w: &WindowRow<'_>) -> Sums {
        let mut sums = Sums { first_start: w.start, last_end: w.end, ..Sums::default() };
        sums.add(w);
        sums
    }

    fn add(&mut self, w: &WindowRow<'_>) {
        self.merge(&Sums {
            windows: 1,
            ops_lower: w.ops_lower,
            estimated_ops: w.estimated_ops,
            ops_upper: w.ops_upper,
            gpu_seconds: w.gpu_seconds,
            shared_gpu_seconds: w.shared_gpu_seconds,
            guest_gap_gpu_seconds: w.guest_gap_gpu_seconds,
            first_start: w.start,
            last_end: w.end,
            foreign_person: w.foreign_person,
        });
    }

    /// Adds `other` (saturating, like every total).
    pub fn merge(&mut self, other: &Sums) {
        self.windows = self.windows.saturating_add(other.windows);
        self.ops_lower = saturating_sum(self.ops_lower, other.ops_lower);
        self.estimated_ops = saturating_sum(self.estimated_ops, other.estimated_ops);
        self.ops_upper = saturating_sum(self.ops_upper, other.ops_upper);
        self.gpu_seconds = saturating_sum(self.gpu_seconds, other.gpu_seconds);
        self.shared_gpu_seconds = saturating_sum(self.shared_gpu_seconds, other.shared_gpu_seconds);
        self.guest_gap_gpu_seconds = saturating_sum(self.guest_gap_gpu_seconds, other.guest_gap_gpu_seconds);
        self.first_start = self.first_start.min(other.first_start);
        self.last_end = self.last_end.max(other.last_end);
        self.foreign_person |= other.foreign_person;
    }
}

/// A subject's use of one host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSums {
    /// Most GPUs used at once.
    pub gpus: u32,
    /// GPU-seconds on a GPU shared without isolation.
    pub shared_gpu_seconds: f64,
    /// GPU-seconds of a VM whose guest sent no telemetry.
    pub guest_gap_gpu_seconds: f64,
    /// The host's cluster ([`cluster_name`]) when it last reported.
    pub cluster: String,
}

/// The largest concurrent capacity and the start of its minute (the earliest among equals).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Peak {
    /// FLOP/s.
    pub flops: f64,
    /// Minute start (Unix seconds).
    pub at: i64,
}

impl Peak {
    /// Takes `other` if it is larger, or as large and earlier.
    pub fn raise(&mut self, other: Peak) {
        if other.flops > self.flops || (other.flops == self.flops && other.at < self.at) {
            *self = other;
        }
    }
}

/// One busy segment of a tenant (see [`super::runs`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentRow {
    /// Start of its first window.
    pub start: i64,
    /// End of its last window.
    pub end: i64,
    /// Its figures.
    pub figures: RunFigures,
    /// The hosts that reported in it (when read for assembly or a check; empty when only its
    /// figures were read).
    pub hosts: BTreeSet<String>,
    /// Its largest fleet-wide capacity bucket.
    pub peak: Peak,
}

impl SegmentRow {
    fn of(w: &WindowRow<'_>) -> SegmentRow {
        let mut figures = RunFigures::default();
        add_figures(&mut figures, w);
        SegmentRow {
            start: w.start.min(w.end),
            end: w.end.max(w.start),
            figures,
            hosts: BTreeSet::from([w.host_id.to_owned()]),
            peak: Peak::default(),
        }
    }

    /// Joins `other` into this one.
    pub fn merge(&mut self, other: SegmentRow) {
        self.start = self.start.min(other.start);
        self.end = self.end.max(other.end);
        self.figures.merge(other.figures);
        self.hosts.extend(other.hosts);
        self.peak.raise(other.peak);
    }

    /// Whether a window or segment spanning `start..end` joins this one.
    pub fn touches(&self, start: i64, end: i64) -> bool {
        start <= self.end.saturating_add(TOUCH_S) && end.saturating_add(TOUCH_S) >= self.start
    }
}

fn add_figures(f: &mut RunFigures, w: &WindowRow<'_>) {
    f.merge(RunFigures {
        ops_lower: w.ops_lower,
        estimated_ops: w.estimated_ops,
        ops_upper: w.ops_upper,
        gpu_seconds: w.gpu_seconds,
        windows: 1,
        ops_by_method: if w.estimated_ops > 0.0 {
            BTreeMap::from([(w.method.to_owned(), saturating_sum(0.0, w.estimated_ops))])
        } else {
            BTreeMap::new()
        },
    });
}

/// A set of roll-up rows: the rows one batch adds (built by [`Rollups::add`], merged into
/// the stored ones by [`apply::apply`]), every stored row (read back for a check), or the
/// rows the raw windows give (what a check expects).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollups {
    /// All-time sums per subject.
    pub subjects: BTreeMap<Subject, Sums>,
    /// All-time point estimate per (subject, method).
    pub methods: BTreeMap<(Subject, String), f64>,
    /// Sums per (subject, day).
    pub days: BTreeMap<(Subject, i64), Sums>,
    /// Point estimate per (subject, day, method).
    pub day_methods: BTreeMap<(Subject, i64, String), f64>,
    /// The hosts that reported a tenant on a day.
    pub day_hosts: BTreeSet<(Subject, i64, String)>,
    /// Per (subject, host).
    pub hosts: BTreeMap<(Subject, String), HostSums>,
    /// Guest-gap seconds per (subject, host, workload).
    pub gap_workloads: BTreeMap<(Subject, String, String), f64>,
    /// Concurrent FLOP/s per (subject, cluster, minute start).
    pub capacity: Capacity,
    /// Largest capacity per (subject, cluster).
    pub peaks: BTreeMap<(Subject, String), Peak>,
    /// Busy segments per tenant, by start.
    pub segments: BTreeMap<String, BTreeMap<i64, SegmentRow>>,
}

impl Rollups {
    /// Adds one window whose host stood in `cluster` ([`cluster_name`]). Peaks are not kept
    /// up here: [`Rollups::finish_peaks`] computes them from the capacity, or the backend
    /// from the stored buckets.
    pub fn add(&mut self, w: &WindowRow<'_>, cluster: &str) {
        let subject = Subject::of(w);
        let day = w.start.div_euclid(DAY_S);
        match self.subjects.get_mut(&subject) {
            Some(sums) => sums.add(w),
            None => {
                self.subjects.insert(subject.clone(), Sums::of(w));
            }
        }
        match self.days.get_mut(&(subject.clone(), day)) {
            Some(sums) => sums.add(w),
            None => {
                self.days.insert((subject.clone(), day), Sums::of(w));
            }
        }
        if w.estimated_ops > 0.0 {
            add_to(&mut self.methods, (subject.clone(), w.method.to_owned()), w.estimated_ops);
            add_to(&mut self.day_methods, (subject.clone(), day, w.method.to_owned()), w.estimated_ops);
        }
        let host = self.hosts.entry((subject.clone(), w.host_id.to_owned())).or_default();
        host.gpus = host.gpus.max(w.gpus);
        host.shared_gpu_seconds = saturating_sum(host.shared_gpu_seconds, w.shared_gpu_seconds);
        host.guest_gap_gpu_seconds = saturating_sum(host.guest_gap_gpu_seconds, w.guest_gap_gpu_seconds);
        cluster.clone_into(&mut host.cluster);
        if w.guest_gap_gpu_seconds > 0.0 {
            let key = (subject.clone(), w.host_id.to_owned(), w.workload.unwrap_or_default().to_owned());
            add_to(&mut self.gap_workloads, key, w.guest_gap_gpu_seconds);
        }
        let share = (w.end.saturating_sub(w.start) as f64 / CAPACITY_BUCKET_S as f64).clamp(0.0, 1.0);
        let minute = w.start.div_euclid(CAPACITY_BUCKET_S) * CAPACITY_BUCKET_S;
        let flops = w.peak_flops * share;
        self.capacity.add(&subject, FLEET, minute, flops);
        if let Some(tenant) = w.tenant {
            self.capacity.add(&subject, cluster, minute, flops);
            self.day_hosts.insert((subject, day, w.host_id.to_owned()));
            add_segment(self.segments.entry(tenant.to_owned()).or_default(), SegmentRow::of(w));
        }
    }

    /// Sets every peak (per subject and cluster, and per segment) from the capacity held.
    pub fn finish_peaks(&mut self) {
        self.peaks.clear();
        for (subject, cluster, minute, flops) in self.capacity.iter() {
            let peak = Peak { flops, at: minute };
            match self.peaks.get_mut(&(subject.clone(), cluster.to_owned())) {
                Some(p) => p.raise(peak),
                None => {
                    self.peaks.insert((subject.clone(), cluster.to_owned()), peak);
                }
            }
        }
        for (tenant, segments) in &mut self.segments {
            let subject = Subject { tenant: tenant.clone(), host_id: String::new(), workload: String::new() };
            for segment in segments.values_mut() {
                segment.peak = segment_peak(&self.capacity, &subject, segment.start, segment.end);
            }
        }
    }
}

/// The largest fleet-wide bucket of `subject` among the minutes starting within `start..end`
/// (from `start`'s own minute on): a segment's peak, as [`super::TenantUsage::runs`] takes it.
pub fn segment_peak(capacity: &Capacity, subject: &Subject, start: i64, end: i64) -> Peak {
    let from = start.div_euclid(CAPACITY_BUCKET_S) * CAPACITY_BUCKET_S;
    let mut peak = Peak { flops: 0.0, at: start };
    if let Some(minutes) = capacity.0.get(subject).and_then(|clusters| clusters.get(FLEET)) {
        for (minute, flops) in minutes.range(from..end) {
            if *flops > peak.flops {
                peak = Peak { flops: *flops, at: *minute };
            }
        }
    }
    peak
}

/// Capacity buckets: FLOP/s per subject, cluster and minute start, nested so that adding a
/// window compares its subject and cluster against the few of a batch, then minutes (a flat
/// map keyed by the triple compared the subject's strings at every step of every search,
/// which was a third of ingest's time for a batch of 1,000 windows).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capacity(BTreeMap<Subject, BTreeMap<String, BTreeMap<i64, f64>>>);

impl Capacity {
    /// Adds `flops` to the bucket (saturating).
    pub fn add(&mut self, subject: &Subject, cluster: &str, minute: i64, flops: f64) {
        let clusters = match self.0.get_mut(subject) {
            Some(clusters) => clusters,
            None => self.0.entry(subject.clone()).or_default(),
        };
        let minutes = match clusters.get_mut(cluster) {
            Some(minutes) => minutes,
            None => clusters.entry(cluster.to_owned()).or_default(),
        };
        add_to(minutes, minute, flops);
    }

    /// Sets the bucket's value.
    pub fn insert(&mut self, subject: &Subject, cluster: &str, minute: i64, flops: f64) {
        self.0
            .entry(subject.clone())
            .or_default()
            .entry(cluster.to_owned())
            .or_default()
            .insert(minute, flops);
    }

    /// Whether it holds no bucket.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bucket's value, if it has one.
    pub fn get(&self, subject: &Subject, cluster: &str, minute: i64) -> Option<f64> {
        self.0.get(subject).and_then(|c| c.get(cluster)).and_then(|m| m.get(&minute)).copied()
    }

    /// Every bucket, in key order (subject, cluster, minute).
    pub fn iter(&self) -> impl Iterator<Item = (&Subject, &str, i64, f64)> + '_ {
        self.0.iter().flat_map(|(subject, clusters)| {
            clusters.iter().flat_map(move |(cluster, minutes)| {
                minutes.iter().map(move |(minute, flops)| (subject, cluster.as_str(), *minute, *flops))
            })
        })
    }

    /// Keeps only the buckets of minutes from `from` on.
    pub fn retain_from(&mut self, from: i64) {
        for clusters in self.0.values_mut() {
            for minutes in clusters.values_mut() {
                minutes.retain(|minute, _| *minute >= from);
            }
            clusters.retain(|_, minutes| !minutes.is_empty());
        }
        self.0.retain(|_, clusters| !clusters.is_empty());
    }

    /// The buckets keyed by (subject, cluster, minute), for comparing.
    pub fn flat(&self) -> BTreeMap<(&Subject, &str, i64), f64> {
        self.iter().map(|(subject, cluster, minute, flops)| ((subject, cluster, minute), flops)).collect()
    }
}

fn add_to<K: Ord>(map: &mut BTreeMap<K, f64>, key: K, value: f64) {
    let total = map.entry(key).or_insert(0.0);
    *total = saturating_sum(*total, value);
}

/// Folds `segment` into the disjoint, sorted `segments`, joining every one it touches.
pub fn add_segment(segments: &mut BTreeMap<i64, SegmentRow>, mut segment: SegmentRow) {
    let reach = segment.end.saturating_add(TOUCH_S);
    let touched: Vec<i64> = segments
        .range(..=reach)
        .rev()
        .take_while(|(_, s)| s.touches(segment.start, segment.end))
        .map(|(start, _)| *start)
        .collect();
    for start in touched {
        if let Some(old) = segments.remove(&start) {
            segment.merge(old);
        }
    }
    segments.insert(segment.start, segment);
}

/// A window as ingest received it, for [`Rollups::add`] (the same values ingest stores: an
/// old agent's window without bounds counts its estimate for them).
pub fn window_row<'a>(host_id: &'a str, w: &'a kycd_protocol::UsageWindow) -> WindowRow<'a> {
    WindowRow {
        tenant: w.tenant.as_deref(),
        host_id,
        start: w.start,
        end: w.end,
        gpu_seconds: w.gpu_seconds,
        gpus: w.gpus.max(w.max_concurrent_gpus),
        ops_lower: w.lower_ops(),
        estimated_ops: w.estimated_ops,
        ops_upper: w.upper_ops(),
        shared_gpu_seconds: w.shared_gpu_seconds,
        guest_gap_gpu_seconds: w.guest_gap_gpu_seconds,
        workload: Some(&w.workload),
        peak_flops: w.peak_flops,
        method: w.method.as_str(),
        foreign_person: w.tenant_counts_as_foreign(),
    }
}

#[cfg(test)]
mod tests;
