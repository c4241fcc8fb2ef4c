//! Merging a batch's roll-ups into the stored ones, inside the batch's transaction: sums are
//! added, capacity buckets added to and the peaks raised from the buckets' new values, and
//! each tenant's new busy segments joined with the stored segments they touch. A backend
//! supplies the row operations ([`RollupTx`]), each over all of a batch's rows of one table
//! (so a backend can send them in one statement: a drained spool brings a thousand windows);
//! the order of operations, and so of row locks, is this file's: tables in a fixed order,
//! rows in key order, so two collectors ingesting at once on PostgreSQL take the locks of
//! shared rows in one order and never deadlock on them.

use std::collections::BTreeMap;

use super::{add_segment, HostSums, Peak, Rollups, SegmentRow, Subject, Sums, FLEET};
use crate::fleet::runs::TOUCH_S;
use crate::fleet::CAPACITY_BUCKET_S;
use crate::store::error::StoreError;

/// A capacity bucket to add to: (subject, cluster, minute start, FLOP/s).
pub type Bucket<'a> = (&'a Subject, &'a str, i64, f64);

/// The row operations of one backend's roll-up tables, within one transaction; each takes
/// the batch's rows of one table, in key order, keys distinct.
pub trait RollupTx {
    /// Adds each row's sums to the subject's all-time sums (creating the row).
    fn add_subjects(&mut self, rows: &[(&Subject, &Sums)]) -> Result<(), StoreError>;
    /// Adds each `ops` to the subject's all-time point estimate by `method`.
    fn add_methods(&mut self, rows: &[(&Subject, &str, f64)]) -> Result<(), StoreError>;
    /// Adds each row's sums to the subject's sums of the day.
    fn add_days(&mut self, rows: &[(&Subject, i64, &Sums)]) -> Result<(), StoreError>;
    /// Adds each `ops` to the subject's point estimate by method on the day.
    fn add_day_methods(&mut self, rows: &[(&Subject, i64, &str, f64)]) -> Result<(), StoreError>;
    /// Records that the host reported the subject on the day.
    fn add_day_hosts(&mut self, rows: &[(&Subject, i64, &str)]) -> Result<(), StoreError>;
    /// Merges each row into the subject's row for the host (GPUs: the larger; seconds
    /// added; cluster: the new one).
    fn add_hosts(&mut self, rows: &[(&Subject, &str, &HostSums)]) -> Result<(), StoreError>;
    /// Adds guest-gap seconds of (host, workload).
    fn add_gap_workloads(&mut self, rows: &[(&Subject, &str, &str, f64)]) -> Result<(), StoreError>;
    /// Adds each bucket's FLOP/s and returns the buckets' new values, in order.
    fn add_capacity(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError>;
    /// Raises each stored peak of (subject, cluster) to the row's if that is larger (or as
    /// large and earlier).
    fn raise_peaks(&mut self, rows: &[(&Subject, &str, Peak)]) -> Result<(), StoreError>;
    /// The tenant's stored segments that overlap `from..=to` (a reach already widened by the
    /// touch distance), by start, without their hosts.
    fn touching_segments(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError>;
    /// Deletes the tenant's stored segments starting at each `moved.0` (their hosts move to
    /// the segment of `segments` starting at `moved.1`, which absorbed them) and stores
    /// `segments` (start, end, figures, peak; their hosts added to the stored ones; one
    /// starting where a stored one did replaces it), marked changed at `changed_at`.
    fn write_segments(
        &mut self,
        tenant: &str,
        moved: &[(i64, i64)],
        segments: &[SegmentRow],
        changed_at: i64,
    ) -> Result<(), StoreError>;
}

/// The same operations a row at a time, for a backend whose statements cost little each
/// (SQLite, in process): [`RollupTx`] follows, running them over a batch's rows.
pub trait RowTx {
    /// Adds `sums` to the subject's all-time sums (creating the row).
    fn add_subject(&mut self, subject: &Subject, sums: &Sums) -> Result<(), StoreError>;
    /// Adds `ops` to the subject's all-time point estimate by `method`.
    fn add_method(&mut self, subject: &Subject, method: &str, ops: f64) -> Result<(), StoreError>;
    /// Adds `sums` to the subject's sums of `day`.
    fn add_day(&mut self, subject: &Subject, day: i64, sums: &Sums) -> Result<(), StoreError>;
    /// Adds `ops` to the subject's point estimate by `method` on `day`.
    fn add_day_method(
        &mut self,
        subject: &Subject,
        day: i64,
        method: &str,
        ops: f64,
    ) -> Result<(), StoreError>;
    /// Records that `host` reported the subject on `day`.
    fn add_day_host(&mut self, subject: &Subject, day: i64, host: &str) -> Result<(), StoreError>;
    /// Merges `sums` into the subject's row for `host`.
    fn add_host(&mut self, subject: &Subject, host: &str, sums: &HostSums) -> Result<(), StoreError>;
    /// Adds guest-gap seconds of (`host`, `workload`).
    fn add_gap_workload(
        &mut self,
        subject: &Subject,
        host: &str,
        workload: &str,
        seconds: f64,
    ) -> Result<(), StoreError>;
    /// [`RollupTx::add_capacity`].
    fn add_buckets(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError>;
    /// Raises the stored peak of (subject, cluster) to `peak` if that is larger (or as large
    /// and earlier).
    fn raise_peak(&mut self, subject: &Subject, cluster: &str, peak: Peak) -> Result<(), StoreError>;
    /// [`RollupTx::touching_segments`].
    fn segments_touching(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError>;
    /// Stores `segment` (replacing a stored one of its start, whose hosts stay) in place of
    /// the stored segments starting at `absorbed` (all within it, none at its start; their
    /// hosts move to it).
    fn write_segment(
        &mut self,
        tenant: &str,
        absorbed: &[i64],
        segment: &SegmentRow,
        changed_at: i64,
    ) -> Result<(), StoreError>;
}

impl<T: RowTx> RollupTx for T {
    fn add_subjects(&mut self, rows: &[(&Subject, &Sums)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, sums)| self.add_subject(s, sums))
    }

    fn add_methods(&mut self, rows: &[(&Subject, &str, f64)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, method, ops)| self.add_method(s, method, *ops))
    }

    fn add_days(&mut self, rows: &[(&Subject, i64, &Sums)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, day, sums)| self.add_day(s, *day, sums))
    }

    fn add_day_methods(&mut self, rows: &[(&Subject, i64, &str, f64)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, day, method, ops)| self.add_day_method(s, *day, method, *ops))
    }

    fn add_day_hosts(&mut self, rows: &[(&Subject, i64, &str)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, day, host)| self.add_day_host(s, *day, host))
    }

    fn add_hosts(&mut self, rows: &[(&Subject, &str, &HostSums)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, host, sums)| self.add_host(s, host, sums))
    }

    fn add_gap_workloads(&mut self, rows: &[(&Subject, &str, &str, f64)]) -> Result<(), StoreError> {
        rows.iter()
            .try_for_each(|(s, host, workload, seconds)| self.add_gap_workload(s, host, workload, *seconds))
    }

    fn add_capacity(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
        self.add_buckets(buckets)
    }

    fn raise_peaks(&mut self, rows: &[(&Subject, &str, Peak)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|(s, cluster, peak)| self.raise_peak(s, cluster, *peak))
    }

    fn touching_segments(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        self.segments_touching(tenant, start, end)
    }

    fn write_segments(
        &mut self,
        tenant: &str,
        moved: &[(i64, i64)],
        segments: &[SegmentRow],
        changed_at: i64,
    ) -> Result<(), StoreError> {
        segments.iter().try_for_each(|segment| {
            let absorbed: Vec<i64> =
                moved.iter().filter(|(_, into)| *into == segment.start).map(|(old, _)| *old).collect();
            self.write_segment(tenant, &absorbed, segment, changed_at)
        })
    }
}

/// Merges `batch` (rows built by [`Rollups::add`]; its peaks are ignored) into the stored
/// roll-ups through `tx`.
pub fn apply(batch: &Rollups, tx: &mut dyn RollupTx, changed_at: i64) -> Result<(), StoreError> {
    tx.add_subjects(&batch.subjects.iter().collect::<Vec<_>>())?;
    tx.add_methods(&batch.methods.iter().map(|((s, m), ops)| (s, m.as_str(), *ops)).collect::<Vec<_>>())?;
    tx.add_days(&batch.days.iter().map(|((s, day), sums)| (s, *day, sums)).collect::<Vec<_>>())?;
    let day_methods: Vec<_> =
        batch.day_methods.iter().map(|((s, day, m), ops)| (s, *day, m.as_str(), *ops)).collect();
    tx.add_day_methods(&day_methods)?;
    tx.add_day_hosts(
        &batch.day_hosts.iter().map(|(s, day, host)| (s, *day, host.as_str())).collect::<Vec<_>>(),
    )?;
    tx.add_hosts(&batch.hosts.iter().map(|((s, host), sums)| (s, host.as_str(), sums)).collect::<Vec<_>>())?;
    let gaps: Vec<_> = batch
        .gap_workloads
        .iter()
        .map(|((s, host, workload), sec)| (s, host.as_str(), workload.as_str(), *sec))
        .collect();
    tx.add_gap_workloads(&gaps)?;
    // The buckets' values after the batch: the peaks can only grow, so each is the larger of
    // the stored peak and the largest bucket the batch touched.
    let buckets: Vec<Bucket<'_>> = batch.capacity.iter().collect();
    let values = tx.add_capacity(&buckets)?;
    if values.len() != buckets.len() {
        return Err(StoreError::Corrupt(format!(
            "{} capacity buckets updated, {} expected",
            values.len(),
            buckets.len()
        )));
    }
    let mut peaks: BTreeMap<(&Subject, &str), Peak> = BTreeMap::new();
    let mut fleet_buckets: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    for ((subject, cluster, minute, _), value) in buckets.iter().zip(values) {
        let peak = Peak { flops: value, at: *minute };
        peaks.entry((*subject, *cluster)).or_insert(peak).raise(peak);
        if *cluster == FLEET && subject.is_tenant() {
            fleet_buckets.entry(subject.tenant.as_str()).or_default().push((*minute, value));
        }
    }
    tx.raise_peaks(&peaks.iter().map(|((s, cluster), peak)| (*s, *cluster, *peak)).collect::<Vec<_>>())?;
    for (tenant, segments) in &batch.segments {
        let buckets = fleet_buckets.get(tenant.as_str()).map_or(&[][..], Vec::as_slice);
        merge_segments(tx, tenant, segments, buckets, changed_at)?;
    }
    Ok(())
}

/// Joins the batch's segments of `tenant` (with their peaks from the batch's `buckets`, the
/// fleet-wide ones' new values by minute) with the stored ones: one read of the stored
/// segments the batch's span touches, the merge in memory, one write of what changed.
fn merge_segments(
    tx: &mut dyn RollupTx,
    tenant: &str,
    segments: &BTreeMap<i64, SegmentRow>,
    buckets: &[(i64, f64)],
    changed_at: i64,
) -> Result<(), StoreError> {
    let (Some(first), Some(end)) = (segments.values().next(), segments.values().map(|s| s.end).max()) else {
        return Ok(());
    };
    let reach = (first.start.saturating_sub(TOUCH_S), end.saturating_add(TOUCH_S));
    let stored = tx.touching_segments(tenant, reach.0, reach.1)?;
    let mut merged: BTreeMap<i64, SegmentRow> = stored.iter().map(|s| (s.start, s.clone())).collect();
    for segment in segments.values() {
        let mut fresh = SegmentRow { peak: Peak { flops: 0.0, at: segment.start }, ..segment.clone() };
        // As [`super::segment_peak`] takes it: the first largest bucket in time order.
        let minutes = segment.start.div_euclid(CAPACITY_BUCKET_S) * CAPACITY_BUCKET_S..segment.end;
        for (minute, value) in buckets.iter().filter(|(minute, _)| minutes.contains(minute)) {
            if *value > fresh.peak.flops {
                fresh.peak = Peak { flops: *value, at: *minute };
            }
        }
        add_segment(&mut merged, fresh);
    }
    // What is left as it was stored (read without hosts, so compared as read) stays.
    let unchanged = |s: &SegmentRow| stored.iter().any(|old| old == s);
    let written: Vec<SegmentRow> = merged.into_values().filter(|s| !unchanged(s)).collect();
    // A stored segment not left as it was lies within the written one that absorbed it; one
    // of the same start is overwritten in place.
    let moved: Vec<(i64, i64)> = stored
        .iter()
        .filter_map(|old| {
            written.iter().find(|s| (s.start..=s.end).contains(&old.start)).map(|s| (old.start, s.start))
        })
        .filter(|(old, into)| old != into)
        .collect();
    tx.write_segments(tenant, &moved, &written, changed_at)
}
