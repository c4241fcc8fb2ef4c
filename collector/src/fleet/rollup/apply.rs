//! Merging a batch's roll-ups into the stored ones, inside the batch's transaction: sums are
//! added, capacity buckets added to and the peaks raised from the buckets' new values, and
//! each new busy segment joined with the stored segments it touches. A backend supplies the
//! row operations ([`RollupTx`]); the order of operations, and so of row locks, is this
//! file's: subjects in key order, so two collectors ingesting at once on PostgreSQL take
//! the locks of shared rows in one order and never deadlock on them.

use std::collections::BTreeMap;

use super::{HostSums, Peak, Rollups, SegmentRow, Subject, Sums, FLEET};
use crate::fleet::CAPACITY_BUCKET_S;
use crate::store::error::StoreError;

/// A capacity bucket to add to: (subject, cluster, minute start, FLOP/s).
pub type Bucket<'a> = (&'a Subject, &'a str, i64, f64);

/// The row operations of one backend's roll-up tables, within one transaction.
pub trait RollupTx {
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
    /// Merges `sums` into the subject's row for `host` (GPUs: the larger; seconds added;
    /// cluster: the new one).
    fn add_host(&mut self, subject: &Subject, host: &str, sums: &HostSums) -> Result<(), StoreError>;
    /// Adds guest-gap seconds of (`host`, `workload`).
    fn add_gap_workload(
        &mut self,
        subject: &Subject,
        host: &str,
        workload: &str,
        seconds: f64,
    ) -> Result<(), StoreError>;
    /// Adds each `(subject, cluster, minute, flops)` to its bucket (distinct buckets) and
    /// returns their new values, in order. One call per batch: a backend may send them in one
    /// statement (a drained spool brings a thousand windows, so a thousand buckets).
    fn add_capacity(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError>;
    /// Raises the stored peak of (subject, cluster) to `peak` if that is larger (or as large
    /// and earlier).
    fn raise_peak(&mut self, subject: &Subject, cluster: &str, peak: Peak) -> Result<(), StoreError>;
    /// The tenant's stored segments that touch `start..end` (within the touch distance), by
    /// start, without their hosts.
    fn touching_segments(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError>;
    /// Stores `segment` (its start, end, figures and peak; its hosts added to the stored
    /// ones) in place of the stored segments starting at `replaced` (their hosts move to
    /// it), marked changed at `changed_at`.
    fn write_segment(
        &mut self,
        tenant: &str,
        replaced: &[i64],
        segment: &SegmentRow,
        changed_at: i64,
    ) -> Result<(), StoreError>;
}

/// Merges `batch` (rows built by [`Rollups::add`]; its peaks are ignored) into the stored
/// roll-ups through `tx`.
pub fn apply(batch: &Rollups, tx: &mut dyn RollupTx, changed_at: i64) -> Result<(), StoreError> {
    for (subject, sums) in &batch.subjects {
        tx.add_subject(subject, sums)?;
    }
    for ((subject, method), ops) in &batch.methods {
        tx.add_method(subject, method, *ops)?;
    }
    for ((subject, day), sums) in &batch.days {
        tx.add_day(subject, *day, sums)?;
    }
    for ((subject, day, method), ops) in &batch.day_methods {
        tx.add_day_method(subject, *day, method, *ops)?;
    }
    for (subject, day, host) in &batch.day_hosts {
        tx.add_day_host(subject, *day, host)?;
    }
    for ((subject, host), sums) in &batch.hosts {
        tx.add_host(subject, host, sums)?;
    }
    for ((subject, host, workload), seconds) in &batch.gap_workloads {
        tx.add_gap_workload(subject, host, workload, *seconds)?;
    }
    // The buckets' values after the batch: the peaks can only grow, so each is the larger of
    // the stored peak and the largest bucket the batch touched.
    let mut peaks: BTreeMap<(&Subject, &str), Peak> = BTreeMap::new();
    let mut fleet_buckets: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    let buckets: Vec<Bucket<'_>> = batch
        .capacity
        .iter()
        .map(|((s, cluster, minute), flops)| (s, cluster.as_str(), *minute, *flops))
        .collect();
    let values = tx.add_capacity(&buckets)?;
    if values.len() != buckets.len() {
        return Err(StoreError::Corrupt(format!(
            "{} capacity buckets updated, {} expected",
            values.len(),
            buckets.len()
        )));
    }
    for ((subject, cluster, minute, _), value) in buckets.iter().zip(values) {
        let (subject, cluster, minute) = (*subject, *cluster, minute);
        peaks
            .entry((subject, cluster))
            .or_insert(Peak { flops: value, at: *minute })
            .raise(Peak { flops: value, at: *minute });
        if cluster == FLEET && subject.is_tenant() {
            fleet_buckets.entry(subject.tenant.as_str()).or_default().push((*minute, value));
        }
    }
    for ((subject, cluster), peak) in &peaks {
        tx.raise_peak(subject, cluster, *peak)?;
    }
    for (tenant, segments) in &batch.segments {
        let buckets = fleet_buckets.get(tenant.as_str()).map_or(&[][..], Vec::as_slice);
        for segment in segments.values() {
            let mut merged = segment.clone();
            merged.peak = Peak { flops: 0.0, at: segment.start };
            // As [`super::segment_peak`] takes it: the first largest bucket in time order.
            let minutes = segment.start.div_euclid(CAPACITY_BUCKET_S) * CAPACITY_BUCKET_S..segment.end;
            for (minute, value) in buckets.iter().filter(|(minute, _)| minutes.contains(minute)) {
                if *value > merged.peak.flops {
                    merged.peak = Peak { flops: *value, at: *minute };
                }
            }
            let stored = tx.touching_segments(tenant, segment.start, segment.end)?;
            let replaced: Vec<i64> = stored.iter().map(|s| s.start).collect();
            for old in stored {
                merged.merge(old);
            }
            tx.write_segment(tenant, &replaced, &merged, changed_at)?;
        }
    }
    Ok(())
}
