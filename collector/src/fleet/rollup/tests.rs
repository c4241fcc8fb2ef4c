//! The roll-ups against the raw windows' aggregation: batches merged in any order through an
//! in-memory [`RollupTx`] give the rows one pass over every window gives, and those rows
//! assemble into the fleet view [`UsageAccumulator`] computes.

use std::collections::BTreeMap;

use super::apply::{apply, RowTx};
use super::assemble::assemble;
use super::check::{close, compare};
use super::*;
use crate::fleet::{FleetUsage, TenantUsage, UsageAccumulator};
use crate::store::error::StoreError;

/// Roll-up tables in memory, with the backends' meaning.
#[derive(Default)]
struct Memory(Rollups);

impl RowTx for Memory {
    fn add_subject(&mut self, subject: &Subject, sums: &Sums) -> Result<(), StoreError> {
        self.0.subjects.entry(subject.clone()).and_modify(|s| s.merge(sums)).or_insert_with(|| sums.clone());
        Ok(())
    }
    fn add_method(&mut self, subject: &Subject, method: &str, ops: f64) -> Result<(), StoreError> {
        *self.0.methods.entry((subject.clone(), method.to_owned())).or_insert(0.0) += ops;
        Ok(())
    }
    fn add_day(&mut self, subject: &Subject, day: i64, sums: &Sums) -> Result<(), StoreError> {
        self.0
            .days
            .entry((subject.clone(), day))
            .and_modify(|s| s.merge(sums))
            .or_insert_with(|| sums.clone());
        Ok(())
    }
    fn add_day_method(
        &mut self,
        subject: &Subject,
        day: i64,
        method: &str,
        ops: f64,
    ) -> Result<(), StoreError> {
        *self.0.day_methods.entry((subject.clone(), day, method.to_owned())).or_insert(0.0) += ops;
        Ok(())
    }
    fn add_day_host(&mut self, subject: &Subject, day: i64, host: &str) -> Result<(), StoreError> {
        self.0.day_hosts.insert((subject.clone(), day, host.to_owned()));
        Ok(())
    }
    fn add_host(&mut self, subject: &Subject, host: &str, sums: &HostSums) -> Result<(), StoreError> {
        let h = self.0.hosts.entry((subject.clone(), host.to_owned())).or_default();
        h.gpus = h.gpus.max(sums.gpus);
        h.shared_gpu_seconds += sums.shared_gpu_seconds;
        h.guest_gap_gpu_seconds += sums.guest_gap_gpu_seconds;
        h.cluster.clone_from(&sums.cluster);
        Ok(())
    }
    fn add_gap_workload(
        &mut self,
        subject: &Subject,
        host: &str,
        workload: &str,
        seconds: f64,
    ) -> Result<(), StoreError> {
        *self
            .0
            .gap_workloads
            .entry((subject.clone(), host.to_owned(), workload.to_owned()))
            .or_insert(0.0) += seconds;
        Ok(())
    }
    fn add_buckets(&mut self, buckets: &[super::apply::Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
        Ok(buckets
            .iter()
            .map(|(subject, cluster, minute, flops)| {
                self.0.capacity.add(subject, cluster, *minute, *flops);
                self.0.capacity.get(subject, cluster, *minute).unwrap_or_default()
            })
            .collect())
    }
    fn raise_peak(&mut self, subject: &Subject, cluster: &str, peak: Peak) -> Result<(), StoreError> {
        self.0.peaks.entry((subject.clone(), cluster.to_owned())).or_insert(peak).raise(peak);
        Ok(())
    }
    fn segments_touching(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        Ok(self
            .0
            .segments
            .get(tenant)
            .map(|s| {
                s.values()
                    .filter(|s| s.end >= start && s.start <= end)
                    .map(|s| SegmentRow { hosts: Default::default(), ..s.clone() })
                    .collect()
            })
            .unwrap_or_default())
    }
    fn write_segment(
        &mut self,
        tenant: &str,
        absorbed: &[i64],
        segment: &SegmentRow,
        _: i64,
    ) -> Result<(), StoreError> {
        let segments = self.0.segments.entry(tenant.to_owned()).or_default();
        let mut hosts = segment.hosts.clone();
        for start in absorbed.iter().chain([&segment.start]) {
            if let Some(old) = segments.remove(start) {
                hosts.extend(old.hosts);
            }
        }
        segments.insert(segment.start, SegmentRow { hosts, ..segment.clone() });
        Ok(())
    }
}

struct Window {
    tenant: Option<&'static str>,
    host: &'static str,
    workload: &'static str,
    start: i64,
    len: i64,
    flops: f64,
    shared: f64,
    gap: f64,
    method: &'static str,
}

impl Window {
    fn row(&self) -> WindowRow<'_> {
        WindowRow {
            tenant: self.tenant,
            host_id: self.host,
            start: self.start,
            end: self.start + self.len,
            gpu_seconds: 8.0 * self.len as f64,
            gpus: 8,
            ops_lower: 0.5e15 * self.len as f64,
            estimated_ops: if self.method == "allocation" { 0.0 } else { 1e15 * self.len as f64 },
            ops_upper: 2e15 * self.len as f64,
            shared_gpu_seconds: self.shared,
            guest_gap_gpu_seconds: self.gap,
            workload: Some(self.workload),
            peak_flops: self.flops,
            method: self.method,
            foreign_person: self.tenant == Some("f"),
        }
    }
}

/// A fleet's windows: tenants over several hosts and clusters, with pauses (several runs),
/// windows that bridge two segments, shared GPUs, a silent guest, work without a tenant, 10 s
/// and 60 s windows, across a day boundary.
fn windows() -> Vec<Window> {
    let w = |tenant, host, start, len, flops| Window {
        tenant,
        host,
        workload: "vm:a",
        start,
        len,
        flops,
        shared: 0.0,
        gap: 0.0,
        method: "gpm_pipes",
    };
    let day = DAY_S * 20_000;
    let mut out = Vec::new();
    for m in 0..30 {
        out.push(w(Some("t"), "a", day - 900 + 60 * m, 60, 4e15));
        out.push(w(Some("t"), "b", day - 900 + 60 * m, 60, 3e15));
        if m % 7 != 3 {
            out.push(w(Some("f"), "c", day + 60 * m, 60, 2e15));
        }
    }
    // A second run of t after a long pause, on a host of another cluster; six 10 s windows.
    for k in 0..6 {
        out.push(w(Some("t"), "c", day + 10_000 + 10 * k, 10, 9e15));
    }
    // Two segments of f 3 minutes apart, then a late window joining them.
    out.push(w(Some("f"), "a", day + 5_000, 60, 1e15));
    out.push(w(Some("f"), "a", day + 5_240, 60, 1e15));
    out.push(w(Some("f"), "d", day + 5_100, 100, 6e15));
    out.push(Window { shared: 30.0, ..w(Some("f"), "d", day + 5_300, 60, 1e15) });
    out.push(Window {
        gap: 480.0,
        workload: "vm:silent",
        method: "allocation",
        ..w(Some("f"), "b", day + 7_000, 60, 8e15)
    });
    out.push(Window { workload: "cgroup:/x", ..w(None, "a", day + 100, 60, 5e15) });
    out.push(Window { workload: "cgroup:/x", ..w(None, "a", day + 160, 60, 7e15) });
    out.push(Window { workload: "cgroup:/y", ..w(None, "d", day + 160, 60, 1e15) });
    out
}

fn placements() -> Vec<(String, Placement)> {
    let p = |host: &str, site: &str, fabric: &str| {
        (host.to_owned(), Placement { site: site.into(), fabric: fabric.into() })
    };
    vec![p("a", "fra", "ib-1"), p("b", "fra", "ib-1"), p("c", "fra", "ib-2")]
}

fn cluster_of(host: &str) -> String {
    cluster_name(placements().iter().find(|(h, _)| h == host).map(|(_, p)| p))
}

fn assert_same_tenant(a: &TenantUsage, b: &TenantUsage) {
    assert_eq!(a.tenant, b.tenant);
    for (x, y, what) in [
        (a.ops_lower, b.ops_lower, "ops_lower"),
        (a.estimated_ops, b.estimated_ops, "estimated_ops"),
        (a.ops_upper, b.ops_upper, "ops_upper"),
        (a.gpu_seconds, b.gpu_seconds, "gpu_seconds"),
        (a.shared_gpu_seconds, b.shared_gpu_seconds, "shared"),
        (a.guest_gap_gpu_seconds, b.guest_gap_gpu_seconds, "gap"),
        (a.peak_flops, b.peak_flops, "peak"),
    ] {
        assert!(close(x, y), "{}: {what} {x} vs {y}", a.tenant);
    }
    assert_eq!(
        (a.peak_at, a.hosts, &a.host_ids, a.gpus, a.windows, a.first_seen, a.last_seen, a.foreign_person),
        (b.peak_at, b.hosts, &b.host_ids, b.gpus, b.windows, b.first_seen, b.last_seen, b.foreign_person),
        "{}",
        a.tenant
    );
    assert_eq!(
        (&a.shared_gpu_hosts, &a.guest_gap_hosts, &a.guest_gap_workloads, &a.ops_by_method, &a.clusters),
        (&b.shared_gpu_hosts, &b.guest_gap_hosts, &b.guest_gap_workloads, &b.ops_by_method, &b.clusters)
    );
    for gap in [60, 120, 600, 3600, 86_400] {
        assert_eq!(a.runs(gap, 0), b.runs(gap, 0), "{} runs at gap {gap}", a.tenant);
    }
}

fn assert_same_fleet(rolled: &FleetUsage, raw: &FleetUsage) {
    assert_eq!(rolled.tenants.len(), raw.tenants.len());
    for (a, b) in rolled.tenants.iter().zip(&raw.tenants) {
        assert_same_tenant(a, b);
    }
    assert_eq!(rolled.unattributed, raw.unattributed);
}

/// Merged batch by batch, in several orders, the stored rows equal one pass's, and assemble
/// into the accumulator's fleet view (totals, hosts, clusters, peaks, runs at any gap).
#[test]
fn batches_in_any_order_roll_up_to_what_the_windows_aggregate_to() {
    let all = windows();
    let mut expected = Rollups::default();
    let mut acc = UsageAccumulator::with_placements(placements());
    for w in &all {
        expected.add(&w.row(), &cluster_of(w.host));
        acc.add(&w.row());
    }
    expected.finish_peaks();
    let raw = acc.finish_fleet();
    assert_eq!(raw.tenants.len(), 2);
    assert_eq!(raw.tenants[1].runs(3600, 0).len(), 2, "t has two runs: {:?}", raw.tenants[1].runs(3600, 0));
    assert_eq!(
        raw.tenants[0].runs(60, 0).len(),
        3,
        "f has three busy segments: {:?}",
        raw.tenants[0].runs(60, 0)
    );
    for (order, batch) in [("in order", 1usize), ("reversed", 3), ("interleaved", 7)] {
        let mut memory = Memory::default();
        let mut indices: Vec<usize> = (0..all.len()).collect();
        match order {
            "reversed" => indices.reverse(),
            "interleaved" => indices.sort_by_key(|i| (i % 5, *i)),
            _ => {}
        }
        for chunk in indices.chunks(batch) {
            let mut rollups = Rollups::default();
            for i in chunk {
                rollups.add(&all[*i].row(), &cluster_of(all[*i].host));
            }
            apply(&rollups, &mut memory, 0).unwrap();
        }
        let differences: Vec<_> =
            compare(&expected, &memory.0, None).into_iter().filter(|t| t.differences > 0).collect();
        assert!(differences.is_empty(), "{order}: {differences:#?}");
        assert_same_fleet(&assemble(&memory.0), &raw);
    }
    assert_same_fleet(&assemble(&expected), &raw);
}

/// The check notices a stored row that differs, one missing and one extra.
#[test]
fn the_check_reports_each_difference() {
    let mut expected = Rollups::default();
    for w in windows() {
        expected.add(&w.row(), &cluster_of(w.host));
    }
    expected.finish_peaks();
    let mut stored = expected.clone();
    let key = stored.subjects.keys().next().cloned().unwrap();
    stored.subjects.get_mut(&key).unwrap().estimated_ops *= 1.001;
    let day = stored.days.keys().next().cloned().unwrap();
    stored.days.remove(&day);
    stored.capacity.insert(&key, FLEET, 0, 1.0);
    let checks = compare(&expected, &stored, None);
    let by_table: BTreeMap<&str, usize> = checks.iter().map(|c| (c.table, c.differences)).collect();
    assert_eq!(
        (by_table["rollup_subjects"], by_table["rollup_days"], by_table["rollup_capacity"]),
        (1, 1, 1)
    );
    assert_eq!(checks.iter().map(|c| c.differences).sum::<usize>(), 3, "{checks:#?}");
    assert!(checks.iter().find(|c| c.table == "rollup_days").unwrap().examples[0].starts_with("missing"));
}

/// After a prune the all-time tables still count the pruned windows: only what lies after
/// the cut-off is compared, and the rest is reported as not compared.
#[test]
fn after_a_prune_only_what_follows_the_cut_off_is_compared() {
    let all = windows();
    let mut stored = Rollups::default();
    for w in &all {
        stored.add(&w.row(), &cluster_of(w.host));
    }
    stored.finish_peaks();
    // The windows kept: those ending after the cut-off, in the first of the fixture's days.
    let cut = DAY_S * 20_000 - 600;
    let mut expected = Rollups::default();
    for w in all.iter().filter(|w| w.start + w.len > cut) {
        expected.add(&w.row(), &cluster_of(w.host));
    }
    expected.finish_peaks();
    assert!(compare(&expected, &stored, None).iter().any(|c| c.differences > 0), "pruned windows differ");
    let checks = compare(&expected, &stored, Some(cut));
    let compared: Vec<&str> = checks.iter().filter(|c| c.not_compared.is_none()).map(|c| c.table).collect();
    assert_eq!(compared, ["rollup_days", "rollup_day_methods", "rollup_day_hosts", "rollup_capacity"]);
    assert!(checks.iter().all(|c| c.differences == 0), "{checks:#?}");
    for table in ["rollup_days", "rollup_capacity"] {
        assert!(checks.iter().find(|c| c.table == table).unwrap().expected_rows > 0, "{table} is compared");
    }
    // A difference after the cut-off is still found.
    let (subject, cluster, minute, _) = stored.capacity.iter().last().unwrap();
    let (subject, cluster) = (subject.clone(), cluster.to_owned());
    stored.capacity.add(&subject, &cluster, minute, 1e15);
    let checks = compare(&expected, &stored, Some(cut));
    assert_eq!(checks.iter().map(|c| c.differences).sum::<usize>(), 1);
}
