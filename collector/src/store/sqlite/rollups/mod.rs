//! The SQLite roll-up tables ([`crate::fleet::rollup`]; schema:
//! [`super::schema::MIGRATION_ROLLUPS`]): this file holds the row operations ingest merges a
//! batch with ([`RollupTx`]); [`read`] reads the rows back (the fleet view, or every row for
//! a check), [`rebuild`] recomputes them from the raw windows (after migrating an older
//! database, after a prune, on `kycd-collector rollups rebuild`) and checks them.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use super::driver::db_error;
use crate::fleet::rollup::apply::{Bucket, RowTx};
use crate::fleet::rollup::{HostSums, Peak, SegmentRow, Subject, Sums};
use crate::fleet::runs::RunFigures;
use crate::store::error::StoreError;
use crate::store::schema::corrupt;

mod capacity;
mod read;
mod rebuild;

pub(super) use read::{hosts, read_rollups, tenant_hosts, usage};
pub(super) use rebuild::{build_if_needed, check, host_cluster, rebuild};

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

impl RowTx for SqliteRollups<'_> {
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

    fn add_buckets(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
        capacity::add(self.0, buckets)
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

    fn segments_touching(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        // Segments are disjoint and sorted, so ends grow with starts: the touching ones are
        // the last one starting at or before the reach's start, if it reaches it, and those
        // starting within the reach; all found on the primary key (no index on the end to
        // keep up as segments grow).
        let mut stmt = self
            .0
            .prepare_cached(&format!(
                r#"{SEGMENT_COLUMNS} FROM rollup_segments WHERE tenant = ?1 AND start <= ?3 AND "end" >= ?2
                   AND start >= COALESCE((SELECT MAX(start) FROM rollup_segments WHERE tenant = ?1 AND start <= ?2), ?2)
                   ORDER BY start"#
            ))
            .map_err(db_error)?;
        let rows = stmt.query_map(params![tenant, start, end], segment_row).map_err(db_error)?;
        rows.map(|r| r.map_err(db_error)?.map(|(_, segment)| segment)).collect()
    }

    fn write_segment(
        &mut self,
        tenant: &str,
        absorbed: &[i64],
        segment: &SegmentRow,
        changed_at: i64,
    ) -> Result<(), StoreError> {
        for old in absorbed {
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
