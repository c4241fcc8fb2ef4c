//! The SQLite roll-up tables ([`crate::fleet::rollup`]; schema:
//! [`super::schema::MIGRATION_ROLLUPS`]): the row operations ingest merges a batch with
//! ([`RollupTx`]), reading the rows back (for the fleet view, or all of them for a check),
//! and recomputing them from the raw windows (after migrating an older database, or on
//! `kycd-collector rollups rebuild`).

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::driver::db_error;
use crate::fleet::rollup::apply::{apply, Bucket, RollupTx};
use crate::fleet::rollup::{cluster_name, HostSums, Peak, Rollups, SegmentRow, Segments, Subject, Sums};
use crate::fleet::runs::RunFigures;
use crate::fleet::{Placement, WindowRow};
use crate::store::error::StoreError;
use crate::store::schema::{corrupt, count_u32, to_u64};

/// Windows folded into one in-memory batch while rebuilding: bounds the rebuild's memory.
const REBUILD_CHUNK: usize = 500_000;

/// Sums columns after the key, as every sums table lays them out.
const SUMS: &str = "windows, ops_lower, estimated_ops, ops_upper, gpu_seconds, shared_gpu_seconds,
    guest_gap_gpu_seconds, first_start, last_end, foreign_person";

/// The upsert that adds a row of sums (`?1..?3` the subject, `?4` the day when `day`).
fn sums_upsert(table: &str, day: bool) -> String {
    let (key, first) = if day {
        ("tenant, subject_host, subject_workload, day", 5)
    } else {
        ("tenant, subject_host, subject_workload", 4)
    };
    let values: Vec<String> = (1..first + 10).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {table} ({key}, {SUMS}) VALUES ({}) ON CONFLICT DO UPDATE SET
            windows = windows + excluded.windows,
            ops_lower = min(ops_lower + excluded.ops_lower, 1.7976931348623157e308),
            estimated_ops = min(estimated_ops + excluded.estimated_ops, 1.7976931348623157e308),
            ops_upper = min(ops_upper + excluded.ops_upper, 1.7976931348623157e308),
            gpu_seconds = min(gpu_seconds + excluded.gpu_seconds, 1.7976931348623157e308),
            shared_gpu_seconds = min(shared_gpu_seconds + excluded.shared_gpu_seconds, 1.7976931348623157e308),
            guest_gap_gpu_seconds = min(guest_gap_gpu_seconds + excluded.guest_gap_gpu_seconds, 1.7976931348623157e308),
            first_start = min(first_start, excluded.first_start),
            last_end = max(last_end, excluded.last_end),
            foreign_person = max(foreign_person, excluded.foreign_person)",
        values.join(", ")
    )
}

/// A value added to a stored one (saturating), keyed by the first `keys` columns.
fn add_upsert(table: &str, keys: &str, column: &str) -> String {
    let n = keys.split(',').count() + 1;
    let values: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {table} ({keys}, {column}) VALUES ({}) ON CONFLICT DO UPDATE
         SET {column} = min({column} + excluded.{column}, 1.7976931348623157e308) RETURNING {column}",
        values.join(", ")
    )
}

/// [`RollupTx`] on an SQLite transaction.
pub(super) struct SqliteRollups<'c>(pub(super) &'c Connection);

fn sums_params(s: &Sums) -> [rusqlite::types::Value; 10] {
    use rusqlite::types::Value;
    [
        Value::Integer(i64::try_from(s.windows).unwrap_or(i64::MAX)),
        Value::Real(s.ops_lower),
        Value::Real(s.estimated_ops),
        Value::Real(s.ops_upper),
        Value::Real(s.gpu_seconds),
        Value::Real(s.shared_gpu_seconds),
        Value::Real(s.guest_gap_gpu_seconds),
        Value::Integer(s.first_start),
        Value::Integer(s.last_end),
        Value::Integer(i64::from(s.foreign_person)),
    ]
}

fn key(s: &Subject) -> [rusqlite::types::Value; 3] {
    use rusqlite::types::Value;
    [Value::Text(s.tenant.clone()), Value::Text(s.host_id.clone()), Value::Text(s.workload.clone())]
}

impl RollupTx for SqliteRollups<'_> {
    fn add_subject(&mut self, subject: &Subject, sums: &Sums) -> Result<(), StoreError> {
        let mut stmt = self.0.prepare_cached(&sums_upsert("rollup_subjects", false)).map_err(db_error)?;
        let values: Vec<rusqlite::types::Value> = key(subject).into_iter().chain(sums_params(sums)).collect();
        stmt.execute(rusqlite::params_from_iter(values)).map_err(db_error)?;
        Ok(())
    }

    fn add_method(&mut self, subject: &Subject, method: &str, ops: f64) -> Result<(), StoreError> {
        let sql =
            add_upsert("rollup_methods", "tenant, subject_host, subject_workload, method", "estimated_ops");
        let mut stmt = self.0.prepare_cached(&sql).map_err(db_error)?;
        stmt.query_row(params![subject.tenant, subject.host_id, subject.workload, method, ops], |_| Ok(()))
            .map_err(db_error)
    }

    fn add_day(&mut self, subject: &Subject, day: i64, sums: &Sums) -> Result<(), StoreError> {
        let mut stmt = self.0.prepare_cached(&sums_upsert("rollup_days", true)).map_err(db_error)?;
        let values: Vec<rusqlite::types::Value> = key(subject)
            .into_iter()
            .chain([rusqlite::types::Value::Integer(day)])
            .chain(sums_params(sums))
            .collect();
        stmt.execute(rusqlite::params_from_iter(values)).map_err(db_error)?;
        Ok(())
    }

    fn add_day_method(
        &mut self,
        subject: &Subject,
        day: i64,
        method: &str,
        ops: f64,
    ) -> Result<(), StoreError> {
        let sql = add_upsert(
            "rollup_day_methods",
            "tenant, subject_host, subject_workload, day, method",
            "estimated_ops",
        );
        let mut stmt = self.0.prepare_cached(&sql).map_err(db_error)?;
        stmt.query_row(params![subject.tenant, subject.host_id, subject.workload, day, method, ops], |_| {
            Ok(())
        })
        .map_err(db_error)
    }

    fn add_day_host(&mut self, subject: &Subject, day: i64, host: &str) -> Result<(), StoreError> {
        let mut stmt = self
            .0
            .prepare_cached("INSERT OR IGNORE INTO rollup_day_hosts (tenant, day, host) VALUES (?1, ?2, ?3)")
            .map_err(db_error)?;
        stmt.execute(params![subject.tenant, day, host]).map_err(db_error)?;
        Ok(())
    }

    fn add_host(&mut self, subject: &Subject, host: &str, sums: &HostSums) -> Result<(), StoreError> {
        let mut stmt = self
            .0
            .prepare_cached(
                "INSERT INTO rollup_hosts (tenant, subject_host, subject_workload, host, gpus, shared_gpu_seconds,
                     guest_gap_gpu_seconds, cluster) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT DO UPDATE SET gpus = max(gpus, excluded.gpus),
                     shared_gpu_seconds = min(shared_gpu_seconds + excluded.shared_gpu_seconds, 1.7976931348623157e308),
                     guest_gap_gpu_seconds = min(guest_gap_gpu_seconds + excluded.guest_gap_gpu_seconds, 1.7976931348623157e308),
                     cluster = excluded.cluster",
            )
            .map_err(db_error)?;
        stmt.execute(params![
            subject.tenant,
            subject.host_id,
            subject.workload,
            host,
            sums.gpus,
            sums.shared_gpu_seconds,
            sums.guest_gap_gpu_seconds,
            sums.cluster
        ])
        .map_err(db_error)?;
        Ok(())
    }

    fn add_gap_workload(
        &mut self,
        subject: &Subject,
        host: &str,
        workload: &str,
        seconds: f64,
    ) -> Result<(), StoreError> {
        let sql = add_upsert(
            "rollup_gap_workloads",
            "tenant, subject_host, subject_workload, host, workload",
            "seconds",
        );
        let mut stmt = self.0.prepare_cached(&sql).map_err(db_error)?;
        stmt.query_row(
            params![subject.tenant, subject.host_id, subject.workload, host, workload, seconds],
            |_| Ok(()),
        )
        .map_err(db_error)
    }

    fn add_capacity(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
        let sql =
            add_upsert("rollup_capacity", "tenant, subject_host, subject_workload, cluster, minute", "flops");
        let mut stmt = self.0.prepare_cached(&sql).map_err(db_error)?;
        buckets
            .iter()
            .map(|(subject, cluster, minute, flops)| {
                stmt.query_row(
                    params![subject.tenant, subject.host_id, subject.workload, cluster, minute, flops],
                    |r| r.get(0),
                )
                .map_err(db_error)
            })
            .collect()
    }

    fn raise_peak(&mut self, subject: &Subject, cluster: &str, peak: Peak) -> Result<(), StoreError> {
        let mut stmt = self
            .0
            .prepare_cached(
                "INSERT INTO rollup_peaks (tenant, subject_host, subject_workload, cluster, peak_flops, peak_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT DO UPDATE SET peak_flops = excluded.peak_flops, peak_at = excluded.peak_at
                 WHERE excluded.peak_flops > peak_flops OR (excluded.peak_flops = peak_flops AND excluded.peak_at < peak_at)",
            )
            .map_err(db_error)?;
        stmt.execute(params![
            subject.tenant,
            subject.host_id,
            subject.workload,
            cluster,
            peak.flops,
            peak.at
        ])
        .map_err(db_error)?;
        Ok(())
    }

    fn touching_segments(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        // Segments are disjoint: those ending at or after the reach are the last few, found
        // through the end index; of them, those starting before the window's end touch it.
        let mut stmt = self
            .0
            .prepare_cached(&format!(
                r#"{SEGMENT_COLUMNS} FROM rollup_segments INDEXED BY rollup_segments_end
                   WHERE tenant = ?1 AND "end" >= ?2 AND start <= ?3 ORDER BY start"#
            ))
            .map_err(db_error)?;
        let touch = crate::fleet::runs::TOUCH_S;
        let rows = stmt
            .query_map(params![tenant, start.saturating_sub(touch), end.saturating_add(touch)], segment_row)
            .map_err(db_error)?;
        rows.map(|r| r.map_err(db_error)?.map(|(_, segment)| segment)).collect()
    }

    fn write_segment(
        &mut self,
        tenant: &str,
        replaced: &[i64],
        segment: &SegmentRow,
        changed_at: i64,
    ) -> Result<(), StoreError> {
        for old in replaced.iter().filter(|s| **s != segment.start) {
            self.0
                .prepare_cached(
                    "INSERT OR IGNORE INTO rollup_segment_hosts (tenant, start, host)
                     SELECT tenant, ?3, host FROM rollup_segment_hosts WHERE tenant = ?1 AND start = ?2",
                )
                .and_then(|mut s| s.execute(params![tenant, old, segment.start]))
                .map_err(db_error)?;
            for sql in [
                "DELETE FROM rollup_segment_hosts WHERE tenant = ?1 AND start = ?2",
                "DELETE FROM rollup_segments WHERE tenant = ?1 AND start = ?2",
            ] {
                self.0
                    .prepare_cached(sql)
                    .and_then(|mut s| s.execute(params![tenant, old]))
                    .map_err(db_error)?;
            }
        }
        let f = &segment.figures;
        let methods = serde_json::to_string(&f.ops_by_method).map_err(|e| corrupt("segment methods", e))?;
        self.0
            .prepare_cached(
                r#"INSERT OR REPLACE INTO rollup_segments (tenant, start, "end", windows, ops_lower, estimated_ops,
                       ops_upper, gpu_seconds, ops_by_method, peak_flops, peak_at, changed_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"#,
            )
            .and_then(|mut s| {
                s.execute(params![
                    tenant,
                    segment.start,
                    segment.end,
                    i64::try_from(f.windows).unwrap_or(i64::MAX),
                    f.ops_lower,
                    f.estimated_ops,
                    f.ops_upper,
                    f.gpu_seconds,
                    methods,
                    segment.peak.flops,
                    segment.peak.at,
                    changed_at
                ])
            })
            .map_err(db_error)?;
        let mut insert = self
            .0
            .prepare_cached(
                "INSERT OR IGNORE INTO rollup_segment_hosts (tenant, start, host) VALUES (?1, ?2, ?3)",
            )
            .map_err(db_error)?;
        for host in &segment.hosts {
            insert.execute(params![tenant, segment.start, host]).map_err(db_error)?;
        }
        Ok(())
    }
}

const SEGMENT_COLUMNS: &str = r#"SELECT tenant, start, "end", windows, ops_lower, estimated_ops, ops_upper, gpu_seconds,
    ops_by_method, peak_flops, peak_at"#;

/// A segment row (hosts not read) and its tenant.
fn segment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<(String, SegmentRow), StoreError>> {
    let (tenant, methods, windows): (String, String, i64) = (r.get(0)?, r.get(8)?, r.get(3)?);
    let segment = SegmentRow {
        start: r.get(1)?,
        end: r.get(2)?,
        figures: RunFigures {
            ops_lower: r.get(4)?,
            estimated_ops: r.get(5)?,
            ops_upper: r.get(6)?,
            gpu_seconds: r.get(7)?,
            windows: u64::try_from(windows).unwrap_or(0),
            ops_by_method: BTreeMap::new(),
        },
        hosts: Default::default(),
        peak: Peak { flops: r.get(9)?, at: r.get(10)? },
    };
    Ok(serde_json::from_str(&methods).map_err(|e| corrupt("segment methods", e)).map(|ops_by_method| {
        let mut segment = segment;
        segment.figures.ops_by_method = ops_by_method;
        (tenant, segment)
    }))
}

/// Reads the segments (and their hosts) `filter` selects into `out`.
fn read_segments(
    conn: &Connection,
    filter: &str,
    params: &[&dyn rusqlite::ToSql],
    out: &mut Rollups,
) -> Result<(), StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("{SEGMENT_COLUMNS} FROM rollup_segments {filter}")).map_err(db_error)?;
    let rows = stmt.query_map(params, segment_row).map_err(db_error)?;
    for row in rows {
        let (tenant, segment) = row.map_err(db_error)??;
        out.segments.entry(tenant).or_default().insert(segment.start, segment);
    }
    let mut stmt = conn
        .prepare_cached(&format!("SELECT tenant, start, host FROM rollup_segment_hosts {filter}"))
        .map_err(db_error)?;
    let mut rows = stmt.query(params).map_err(db_error)?;
    while let Some(r) = rows.next().map_err(db_error)? {
        let (tenant, start, host): (String, i64, String) =
            (r.get(0).map_err(db_error)?, r.get(1).map_err(db_error)?, r.get(2).map_err(db_error)?);
        if let Some(segment) = out.segments.get_mut(&tenant).and_then(|s| s.get_mut(&start)) {
            segment.hosts.insert(host);
        }
    }
    Ok(())
}

/// Per tenant with a segment changed at or after `since`, the start of the first segment of
/// the run holding its earliest changed segment (runs cut at pauses longer than `gap_s`).
fn changed_runs(conn: &Connection, since: i64, gap_s: i64) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT tenant, MIN(start) FROM rollup_segments INDEXED BY rollup_segments_changed
             WHERE changed_at >= ?1 GROUP BY tenant",
        )
        .map_err(db_error)?;
    let changed: Vec<(String, i64)> = stmt
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db_error)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db_error)?;
    let mut previous = conn
        .prepare_cached(
            r#"SELECT start, "end" FROM rollup_segments WHERE tenant = ?1 AND start < ?2 ORDER BY start DESC LIMIT 1"#,
        )
        .map_err(db_error)?;
    let mut out = Vec::with_capacity(changed.len());
    for (tenant, mut from) in changed {
        // Segments are disjoint and sorted, so the one before ends the run so far.
        while let Some((start, end)) = previous
            .query_row(params![tenant, from], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .optional()
            .map_err(db_error)?
        {
            if from.saturating_sub(end) > gap_s {
                break;
            }
            from = start;
        }
        out.push((tenant, from));
    }
    Ok(out)
}

fn subject(r: &rusqlite::Row<'_>) -> rusqlite::Result<Subject> {
    Ok(Subject { tenant: r.get(0)?, host_id: r.get(1)?, workload: r.get(2)? })
}

fn sums(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Sums> {
    let windows: i64 = r.get(at)?;
    Ok(Sums {
        windows: to_u64(windows).unwrap_or(0),
        ops_lower: r.get(at + 1)?,
        estimated_ops: r.get(at + 2)?,
        ops_upper: r.get(at + 3)?,
        gpu_seconds: r.get(at + 4)?,
        shared_gpu_seconds: r.get(at + 5)?,
        guest_gap_gpu_seconds: r.get(at + 6)?,
        first_start: r.get(at + 7)?,
        last_end: r.get(at + 8)?,
        foreign_person: r.get::<_, i64>(at + 9)? != 0,
    })
}

/// Calls `f` with every row `sql` selects (`?1`: the tenant, or NULL for all rows).
fn each_row(
    conn: &Connection,
    sql: &str,
    tenant: Option<&str>,
    mut f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(sql).map_err(db_error)?;
    let mut rows = stmt.query([tenant]).map_err(db_error)?;
    while let Some(r) = rows.next().map_err(db_error)? {
        f(r).map_err(db_error)?;
    }
    Ok(())
}

/// The stored roll-ups (of one tenant when `tenant` is given): what the fleet view needs, and
/// with `full` also the day tables and capacity buckets (a check).
pub(super) fn read_rollups(
    conn: &Connection,
    tenant: Option<&str>,
    full: bool,
    segments: Segments,
) -> Result<Rollups, StoreError> {
    const KEY: &str = "tenant, subject_host, subject_workload";
    const WHERE: &str = "WHERE ?1 IS NULL OR tenant = ?1";
    let mut out = Rollups::default();
    each_row(conn, &format!("SELECT {KEY}, {SUMS} FROM rollup_subjects {WHERE}"), tenant, |r| {
        out.subjects.insert(subject(r)?, sums(r, 3)?);
        Ok(())
    })?;
    each_row(
        conn,
        &format!("SELECT {KEY}, method, estimated_ops FROM rollup_methods {WHERE}"),
        tenant,
        |r| {
            out.methods.insert((subject(r)?, r.get(3)?), r.get(4)?);
            Ok(())
        },
    )?;
    let hosts_sql = format!(
        "SELECT {KEY}, host, gpus, shared_gpu_seconds, guest_gap_gpu_seconds, cluster FROM rollup_hosts {WHERE}"
    );
    each_row(conn, &hosts_sql, tenant, |r| {
        let sums = HostSums {
            gpus: count_u32(r.get(4)?),
            shared_gpu_seconds: r.get(5)?,
            guest_gap_gpu_seconds: r.get(6)?,
            cluster: r.get(7)?,
        };
        out.hosts.insert((subject(r)?, r.get(3)?), sums);
        Ok(())
    })?;
    each_row(
        conn,
        &format!("SELECT {KEY}, host, workload, seconds FROM rollup_gap_workloads {WHERE}"),
        tenant,
        |r| {
            out.gap_workloads.insert((subject(r)?, r.get(3)?, r.get(4)?), r.get(5)?);
            Ok(())
        },
    )?;
    each_row(
        conn,
        &format!("SELECT {KEY}, cluster, peak_flops, peak_at FROM rollup_peaks {WHERE}"),
        tenant,
        |r| {
            out.peaks.insert((subject(r)?, r.get(3)?), Peak { flops: r.get(4)?, at: r.get(5)? });
            Ok(())
        },
    )?;
    match segments {
        Segments::All => read_segments(conn, WHERE, &[&tenant], &mut out)?,
        Segments::ChangedSince { since, gap_s } => {
            for (tenant, from) in changed_runs(conn, since, gap_s)? {
                read_segments(conn, "WHERE tenant = ?1 AND start >= ?2", &[&tenant, &from], &mut out)?;
            }
        }
    }
    if !full {
        return Ok(out);
    }
    each_row(conn, &format!("SELECT {KEY}, day, {SUMS} FROM rollup_days {WHERE}"), tenant, |r| {
        out.days.insert((subject(r)?, r.get(3)?), sums(r, 4)?);
        Ok(())
    })?;
    each_row(
        conn,
        &format!("SELECT {KEY}, day, method, estimated_ops FROM rollup_day_methods {WHERE}"),
        tenant,
        |r| {
            out.day_methods.insert((subject(r)?, r.get(3)?, r.get(4)?), r.get(5)?);
            Ok(())
        },
    )?;
    each_row(conn, &format!("SELECT tenant, day, host FROM rollup_day_hosts {WHERE}"), tenant, |r| {
        let subject = Subject { tenant: r.get(0)?, host_id: String::new(), workload: String::new() };
        out.day_hosts.insert((subject, r.get(1)?, r.get(2)?));
        Ok(())
    })?;
    each_row(
        conn,
        &format!("SELECT {KEY}, cluster, minute, flops FROM rollup_capacity {WHERE}"),
        tenant,
        |r| {
            out.capacity.insert((subject(r)?, r.get(3)?, r.get(4)?), r.get(5)?);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Every roll-up table, emptied by a rebuild.
const TABLES: [&str; 11] = [
    "rollup_subjects",
    "rollup_methods",
    "rollup_days",
    "rollup_day_methods",
    "rollup_day_hosts",
    "rollup_hosts",
    "rollup_gap_workloads",
    "rollup_capacity",
    "rollup_peaks",
    "rollup_segments",
    "rollup_segment_hosts",
];

/// The cluster of `host_id` now ([`cluster_name`]), as ingest files its windows.
pub(super) fn host_cluster(conn: &Connection, host_id: &str) -> Result<String, StoreError> {
    let placement = conn
        .prepare_cached("SELECT site, fabric FROM host_placement WHERE host_id = ?1")
        .and_then(|mut s| {
            s.query_row([host_id], |r| Ok(Placement { site: r.get(0)?, fabric: r.get(1)? })).optional()
        })
        .map_err(db_error)?;
    Ok(cluster_name(placement.as_ref()))
}

/// Streams every stored window into `rollups` (each host in its cluster now), handing them
/// to `flush` every `chunk` windows and at the end; returns the windows read.
fn fold_windows(
    conn: &Connection,
    chunk: usize,
    rollups: &mut Rollups,
    mut flush: impl FnMut(&mut Rollups) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let clusters: BTreeMap<String, String> = super::fleet::placements_on(conn)?
        .into_iter()
        .map(|(host, placement)| (host, cluster_name(Some(&placement))))
        .collect();
    let unplaced = cluster_name(None);
    let mut stmt = conn.prepare(super::fleet::WINDOWS_SQL).map_err(db_error)?;
    let mut rows = stmt.query(params![None::<&str>, None::<i64>, None::<i64>]).map_err(db_error)?;
    let (mut read, mut pending) = (0u64, 0usize);
    while let Some(r) = rows.next().map_err(db_error)? {
        super::fleet::read_window(r, |w: &WindowRow<'_>| {
            rollups.add(w, clusters.get(w.host_id).unwrap_or(&unplaced));
        })
        .map_err(db_error)?;
        read += 1;
        pending += 1;
        if pending >= chunk {
            flush(rollups)?;
            pending = 0;
        }
    }
    flush(rollups)?;
    Ok(read)
}

/// Recomputes every roll-up from the raw windows in one transaction (hosts in the cluster
/// they stand in now); returns the windows read.
pub(super) fn rebuild(conn: &mut Connection, now: i64) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
    for table in TABLES {
        tx.execute(&format!("DELETE FROM {table}"), []).map_err(db_error)?;
    }
    let mut rollups = Rollups::default();
    let windows = fold_windows(&tx, REBUILD_CHUNK, &mut rollups, |batch| {
        apply(batch, &mut SqliteRollups(&tx), now)?;
        *batch = Rollups::default();
        Ok(())
    })?;
    tx.execute("UPDATE rollup_state SET built_at = ?1", [now]).map_err(db_error)?;
    tx.commit().map_err(db_error)?;
    Ok(windows)
}

/// Builds the roll-ups of a database migrated from before them (`rollup_state.built_at`
/// NULL), once; a no-op otherwise.
pub(super) fn build_if_needed(conn: &mut Connection, now: i64) -> Result<(), StoreError> {
    let built: Option<Option<i64>> =
        conn.query_row("SELECT built_at FROM rollup_state", [], |r| r.get(0)).optional().map_err(db_error)?;
    if matches!(built, Some(None)) {
        tracing::info!("computing usage roll-ups of the windows stored before them (once)");
        let windows = rebuild(conn, now)?;
        tracing::info!(windows, "usage roll-ups computed");
    }
    Ok(())
}

/// The roll-ups the raw windows give against the stored ones.
pub(super) fn check(conn: &Connection) -> Result<Vec<crate::fleet::rollup::check::TableCheck>, StoreError> {
    let mut expected = Rollups::default();
    fold_windows(conn, usize::MAX, &mut expected, |_| Ok(()))?;
    expected.finish_peaks();
    let stored = read_rollups(conn, None, true, Segments::All)?;
    Ok(crate::fleet::rollup::check::compare(&expected, &stored))
}
