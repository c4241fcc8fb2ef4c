//! The roll-up check: the rows the raw windows give ([`Rollups::add`] over every stored
//! window, then [`Rollups::finish_peaks`]) against the stored rows, table by table. Sums are
//! compared with a relative tolerance of 1e-9: floating-point addition depends on order, and
//! ingest adds batch by batch what the check adds window by window.
//!
//! After a prune deleted windows (the roll-ups keep their usage), only what lies wholly after
//! the cut-off can be compared: the day tables from the day after the cut-off's day, the
//! capacity buckets from the cut-off on. The all-time tables are then reported as not
//! compared, with the reason.

use std::collections::BTreeMap;
use std::fmt::Debug;

use super::{Rollups, SegmentRow, Sums};

/// At most this many differences are listed per table (the count is always exact).
const LISTED: usize = 5;

/// What the check found in one table.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TableCheck {
    /// The table.
    pub table: &'static str,
    /// Rows the windows give.
    pub expected_rows: usize,
    /// Rows stored.
    pub stored_rows: usize,
    /// Rows that differ, are missing or are extra.
    pub differences: usize,
    /// The first few, described.
    pub examples: Vec<String>,
    /// Why the table was not compared (windows pruned), when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_compared: Option<String>,
}

/// Compares every table of `stored` with `expected`; `pruned_before`: windows ending by then
/// may have been pruned (see the module docs).
pub fn compare(expected: &Rollups, stored: &Rollups, pruned_before: Option<i64>) -> Vec<TableCheck> {
    match pruned_before {
        None => compare_all(expected, stored),
        Some(before) => {
            let (mut expected, mut stored) = (expected.clone(), stored.clone());
            let first_day = before.div_euclid(super::DAY_S) + 1;
            for r in [&mut expected, &mut stored] {
                r.days.retain(|(_, day), _| *day >= first_day);
                r.day_methods.retain(|(_, day, _), _| *day >= first_day);
                r.day_hosts.retain(|(_, day, _)| *day >= first_day);
                r.capacity.retain_from(before);
            }
            let reason = format!(
                "windows that ended by {} were pruned; the roll-ups keep their usage",
                crate::dates::rfc3339(before)
            );
            compare_all(&expected, &stored)
                .into_iter()
                .map(|mut c| {
                    if !matches!(
                        c.table,
                        "rollup_days" | "rollup_day_methods" | "rollup_day_hosts" | "rollup_capacity"
                    ) {
                        c = TableCheck {
                            table: c.table,
                            not_compared: Some(reason.clone()),
                            ..TableCheck::default()
                        };
                    }
                    c
                })
                .collect()
        }
    }
}

fn compare_all(expected: &Rollups, stored: &Rollups) -> Vec<TableCheck> {
    vec![
        table("rollup_subjects", &expected.subjects, &stored.subjects, sums_close),
        table("rollup_methods", &expected.methods, &stored.methods, |a, b| close(*a, *b)),
        table("rollup_days", &expected.days, &stored.days, sums_close),
        table("rollup_day_methods", &expected.day_methods, &stored.day_methods, |a, b| close(*a, *b)),
        table(
            "rollup_day_hosts",
            &expected.day_hosts.iter().map(|k| (k, ())).collect(),
            &stored.day_hosts.iter().map(|k| (k, ())).collect(),
            |_, _| true,
        ),
        table("rollup_hosts", &expected.hosts, &stored.hosts, |a, b| {
            a.gpus == b.gpus
                && a.cluster == b.cluster
                && close(a.shared_gpu_seconds, b.shared_gpu_seconds)
                && close(a.guest_gap_gpu_seconds, b.guest_gap_gpu_seconds)
        }),
        table("rollup_gap_workloads", &expected.gap_workloads, &stored.gap_workloads, |a, b| close(*a, *b)),
        table("rollup_capacity", &expected.capacity.flat(), &stored.capacity.flat(), |a, b| close(*a, *b)),
        table("rollup_peaks", &expected.peaks, &stored.peaks, |a, b| close(a.flops, b.flops) && a.at == b.at),
        table("rollup_segments", &flatten(&expected.segments), &flatten(&stored.segments), segments_close),
    ]
}

fn flatten(segments: &BTreeMap<String, BTreeMap<i64, SegmentRow>>) -> BTreeMap<(&String, i64), &SegmentRow> {
    segments
        .iter()
        .flat_map(|(tenant, s)| s.iter().map(move |(start, row)| ((tenant, *start), row)))
        .collect()
}

fn table<K: Ord + Debug, V: Debug>(
    name: &'static str,
    expected: &BTreeMap<K, V>,
    stored: &BTreeMap<K, V>,
    same: impl Fn(&V, &V) -> bool,
) -> TableCheck {
    let mut check = TableCheck {
        table: name,
        expected_rows: expected.len(),
        stored_rows: stored.len(),
        ..TableCheck::default()
    };
    let mut note = |what: String| {
        check.differences += 1;
        if check.examples.len() < LISTED {
            check.examples.push(what);
        }
    };
    for (key, want) in expected {
        match stored.get(key) {
            None => note(format!("missing {key:?}: expected {want:?}")),
            Some(have) if !same(want, have) => note(format!("{key:?}: expected {want:?}, stored {have:?}")),
            Some(_) => {}
        }
    }
    for (key, have) in stored {
        if !expected.contains_key(key) {
            note(format!("extra {key:?}: stored {have:?}"));
        }
    }
    check
}

/// Equal within a relative 1e-9 (or both within 1e-6 of 0).
pub fn close(a: f64, b: f64) -> bool {
    let diff = (a - b).abs();
    diff <= 1e-6 || diff <= 1e-9 * a.abs().max(b.abs())
}

fn sums_close(a: &Sums, b: &Sums) -> bool {
    a.windows == b.windows
        && a.first_start == b.first_start
        && a.last_end == b.last_end
        && a.foreign_person == b.foreign_person
        && close(a.ops_lower, b.ops_lower)
        && close(a.estimated_ops, b.estimated_ops)
        && close(a.ops_upper, b.ops_upper)
        && close(a.gpu_seconds, b.gpu_seconds)
        && close(a.shared_gpu_seconds, b.shared_gpu_seconds)
        && close(a.guest_gap_gpu_seconds, b.guest_gap_gpu_seconds)
}

fn segments_close(a: &&SegmentRow, b: &&SegmentRow) -> bool {
    let (fa, fb) = (&a.figures, &b.figures);
    a.end == b.end
        && a.hosts == b.hosts
        && a.peak.at == b.peak.at
        && close(a.peak.flops, b.peak.flops)
        && fa.windows == fb.windows
        && close(fa.ops_lower, fb.ops_lower)
        && close(fa.estimated_ops, fb.estimated_ops)
        && close(fa.ops_upper, fb.ops_upper)
        && close(fa.gpu_seconds, fb.gpu_seconds)
        && fa.ops_by_method.len() == fb.ops_by_method.len()
        && fa.ops_by_method.iter().zip(&fb.ops_by_method).all(|((m, x), (n, y))| m == n && close(*x, *y))
}
