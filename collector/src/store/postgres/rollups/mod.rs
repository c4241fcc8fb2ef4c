//! The PostgreSQL roll-up tables, with the meaning of the SQLite ones
//! (`store/sqlite/rollups/`; schema: [`super::schema::MIGRATION_ROLLUPS`]): this file holds
//! the row operations ingest merges a batch with ([`RollupTx`], on statements prepared once
//! per connection); [`read`] reads the rows back, [`rebuild`] recomputes and checks them.
//!
//! Two collectors may ingest batches about one tenant at once. A batch's first write about a
//! tenant is the upsert of its `rollup_subjects` row, whose row lock is held to the commit:
//! the other batch waits there, so reading and rewriting the tenant's segments is never
//! interleaved (a lost update), and as every batch takes its subjects in key order
//! ([`crate::fleet::rollup::apply`]) two batches never wait on each other in a cycle.

use postgres::types::ToSql;
use postgres::{Client, Statement, Transaction};

use super::driver::get;
use crate::fleet::rollup::apply::{Bucket, RollupTx};
use crate::fleet::rollup::{cluster_name, HostSums, Peak, SegmentRow, Subject, Sums};
use crate::fleet::runs::RunFigures;
use crate::fleet::Placement;
use crate::store::error::StoreError;
use crate::store::schema::corrupt;

mod read;
mod rebuild;

pub(super) use read::read_rollups;
pub(super) use rebuild::{check, rebuild};

/// Windows fetched from the server, and folded into one in-memory batch, at a time while
/// rebuilding: bounds the rebuild's memory.
const REBUILD_CHUNK: i32 = 500_000;

/// The saturation bound of a sum: PostgreSQL fails a `float8` addition that overflows, so
/// every sum is `CASE WHEN a > MAX - b THEN MAX ELSE a + b END` (b ≥ 0: ingest bounds it).
const MAX: &str = "1.7976931348623157e308";

fn sums_upsert(table: &str, day: bool) -> String {
    let (key, n) = if day {
        ("tenant, subject_host, subject_workload, day", 14)
    } else {
        ("tenant, subject_host, subject_workload", 13)
    };
    let values: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {table} AS r ({key}, windows, ops_lower, estimated_ops, ops_upper, gpu_seconds,
             shared_gpu_seconds, guest_gap_gpu_seconds, first_start, last_end, foreign_person)
         VALUES ({}) ON CONFLICT ({key}) DO UPDATE SET
            windows = r.windows + excluded.windows,
            ops_lower = CASE WHEN r.ops_lower > {MAX} - excluded.ops_lower THEN {MAX} ELSE r.ops_lower + excluded.ops_lower END,
            estimated_ops = CASE WHEN r.estimated_ops > {MAX} - excluded.estimated_ops THEN {MAX} ELSE r.estimated_ops + excluded.estimated_ops END,
            ops_upper = CASE WHEN r.ops_upper > {MAX} - excluded.ops_upper THEN {MAX} ELSE r.ops_upper + excluded.ops_upper END,
            gpu_seconds = CASE WHEN r.gpu_seconds > {MAX} - excluded.gpu_seconds THEN {MAX} ELSE r.gpu_seconds + excluded.gpu_seconds END,
            shared_gpu_seconds = CASE WHEN r.shared_gpu_seconds > {MAX} - excluded.shared_gpu_seconds THEN {MAX} ELSE r.shared_gpu_seconds + excluded.shared_gpu_seconds END,
            guest_gap_gpu_seconds = CASE WHEN r.guest_gap_gpu_seconds > {MAX} - excluded.guest_gap_gpu_seconds THEN {MAX} ELSE r.guest_gap_gpu_seconds + excluded.guest_gap_gpu_seconds END,
            first_start = LEAST(r.first_start, excluded.first_start),
            last_end = GREATEST(r.last_end, excluded.last_end),
            foreign_person = r.foreign_person OR excluded.foreign_person",
        values.join(", ")
    )
}

fn add_upsert(table: &str, keys: &str, column: &str) -> String {
    let n = keys.split(',').count() + 1;
    let values: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {table} AS r ({keys}, {column}) VALUES ({}) ON CONFLICT ({keys}) DO UPDATE
         SET {column} = CASE WHEN r.{column} > {MAX} - excluded.{column} THEN {MAX}
             ELSE r.{column} + excluded.{column} END RETURNING {column}",
        values.join(", ")
    )
}

/// The roll-up statements, prepared once per connection.
pub(super) struct RollupStatements {
    subject: Statement,
    method: Statement,
    day: Statement,
    day_method: Statement,
    day_host: Statement,
    host: Statement,
    gap_workload: Statement,
    capacity: Statement,
    peak: Statement,
    touching: Statement,
    move_hosts: Statement,
    drop_hosts: Statement,
    drop_segment: Statement,
    segment: Statement,
    segment_host: Statement,
    cluster: Statement,
}

const SEGMENT_COLUMNS: &str = r#"SELECT tenant, start, "end", windows, ops_lower, estimated_ops, ops_upper, gpu_seconds,
    ops_by_method, peak_flops, peak_at"#;

impl RollupStatements {
    pub(super) fn prepare(client: &mut Client) -> Result<Self, postgres::Error> {
        const KEY: &str = "tenant, subject_host, subject_workload";
        Ok(RollupStatements {
            subject: client.prepare(&sums_upsert("rollup_subjects", false))?,
            method: client.prepare(&add_upsert("rollup_methods", &format!("{KEY}, method"), "estimated_ops"))?,
            day: client.prepare(&sums_upsert("rollup_days", true))?,
            day_method: client
                .prepare(&add_upsert("rollup_day_methods", &format!("{KEY}, day, method"), "estimated_ops"))?,
            day_host: client.prepare(
                "INSERT INTO rollup_day_hosts (tenant, day, host) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )?,
            host: client.prepare(&format!(
                "INSERT INTO rollup_hosts AS r ({KEY}, host, gpus, shared_gpu_seconds, guest_gap_gpu_seconds, cluster)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT ({KEY}, host) DO UPDATE SET
                     gpus = GREATEST(r.gpus, excluded.gpus),
                     shared_gpu_seconds = CASE WHEN r.shared_gpu_seconds > {MAX} - excluded.shared_gpu_seconds THEN {MAX} ELSE r.shared_gpu_seconds + excluded.shared_gpu_seconds END,
                     guest_gap_gpu_seconds = CASE WHEN r.guest_gap_gpu_seconds > {MAX} - excluded.guest_gap_gpu_seconds THEN {MAX} ELSE r.guest_gap_gpu_seconds + excluded.guest_gap_gpu_seconds END,
                     cluster = excluded.cluster"
            ))?,
            gap_workload: client
                .prepare(&add_upsert("rollup_gap_workloads", &format!("{KEY}, host, workload"), "seconds"))?,
            capacity: client.prepare(&format!(
                "INSERT INTO rollup_capacity AS r ({KEY}, cluster, minute, flops)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::float8[])
                 ON CONFLICT ({KEY}, cluster, minute) DO UPDATE
                 SET flops = CASE WHEN r.flops > {MAX} - excluded.flops THEN {MAX} ELSE r.flops + excluded.flops END
                 RETURNING {KEY}, cluster, minute, flops"
            ))?,
            peak: client.prepare(&format!(
                "INSERT INTO rollup_peaks AS r ({KEY}, cluster, peak_flops, peak_at) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT ({KEY}, cluster) DO UPDATE SET peak_flops = excluded.peak_flops, peak_at = excluded.peak_at
                 WHERE excluded.peak_flops > r.peak_flops
                    OR (excluded.peak_flops = r.peak_flops AND excluded.peak_at < r.peak_at)"
            ))?,
            touching: client.prepare(&format!(
                r#"{SEGMENT_COLUMNS} FROM rollup_segments WHERE tenant = $1 AND "end" >= $2 AND start <= $3
                   ORDER BY start"#
            ))?,
            move_hosts: client.prepare(
                "INSERT INTO rollup_segment_hosts (tenant, start, host)
                 SELECT tenant, $3, host FROM rollup_segment_hosts WHERE tenant = $1 AND start = $2
                 ON CONFLICT DO NOTHING",
            )?,
            drop_hosts: client.prepare("DELETE FROM rollup_segment_hosts WHERE tenant = $1 AND start = $2")?,
            drop_segment: client.prepare("DELETE FROM rollup_segments WHERE tenant = $1 AND start = $2")?,
            segment: client.prepare(
                r#"INSERT INTO rollup_segments (tenant, start, "end", windows, ops_lower, estimated_ops, ops_upper,
                       gpu_seconds, ops_by_method, peak_flops, peak_at, changed_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                   ON CONFLICT (tenant, start) DO UPDATE SET "end" = excluded."end", windows = excluded.windows,
                       ops_lower = excluded.ops_lower, estimated_ops = excluded.estimated_ops,
                       ops_upper = excluded.ops_upper, gpu_seconds = excluded.gpu_seconds,
                       ops_by_method = excluded.ops_by_method, peak_flops = excluded.peak_flops,
                       peak_at = excluded.peak_at, changed_at = excluded.changed_at"#,
            )?,
            segment_host: client.prepare(
                "INSERT INTO rollup_segment_hosts (tenant, start, host) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )?,
            cluster: client.prepare("SELECT site, fabric FROM host_placement WHERE host_id = $1")?,
        })
    }
}

/// [`RollupTx`] on a PostgreSQL transaction. A driver error is kept in `failed` (the
/// caller retries a serialization failure or deadlock) and reported as a [`StoreError`].
pub(super) struct PgRollups<'t, 'c> {
    pub(super) tx: &'t mut Transaction<'c>,
    pub(super) st: &'t RollupStatements,
    pub(super) failed: Option<postgres::Error>,
}

impl PgRollups<'_, '_> {
    /// `result`, its driver error kept in `failed`: the [`StoreError`] returned stands in
    /// for it until the caller takes it from there.
    fn run<T>(&mut self, result: Result<T, postgres::Error>) -> Result<T, StoreError> {
        result.map_err(|e| {
            self.failed = Some(e);
            StoreError::Busy
        })
    }

    fn exec(&mut self, stmt: &Statement, params: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
        let result = self.tx.execute(stmt, params).map(|_| ());
        self.run(result)
    }

    fn returning(&mut self, stmt: &Statement, params: &[&(dyn ToSql + Sync)]) -> Result<f64, StoreError> {
        let result = self.tx.query_one(stmt, params);
        let row = self.run(result)?;
        get(&row, 0)
    }

    /// The cluster of `host_id` now ([`cluster_name`]), as ingest files its windows.
    pub(super) fn host_cluster(&mut self, host_id: &str) -> Result<String, StoreError> {
        let result = self.tx.query_opt(&self.st.cluster, &[&host_id]);
        let placement = match self.run(result)? {
            Some(row) => Some(Placement { site: get(&row, 0)?, fabric: get(&row, 1)? }),
            None => None,
        };
        Ok(cluster_name(placement.as_ref()))
    }
}

fn sums_values(s: &Sums) -> (i64, [f64; 6], i64, i64, bool) {
    (
        i64::try_from(s.windows).unwrap_or(i64::MAX),
        [
            s.ops_lower,
            s.estimated_ops,
            s.ops_upper,
            s.gpu_seconds,
            s.shared_gpu_seconds,
            s.guest_gap_gpu_seconds,
        ],
        s.first_start,
        s.last_end,
        s.foreign_person,
    )
}

impl RollupTx for PgRollups<'_, '_> {
    fn add_subject(&mut self, subject: &Subject, sums: &Sums) -> Result<(), StoreError> {
        let (n, f, first, last, foreign) = sums_values(sums);
        let st = &self.st.subject;
        self.exec(
            st,
            &[
                &subject.tenant,
                &subject.host_id,
                &subject.workload,
                &n,
                &f[0],
                &f[1],
                &f[2],
                &f[3],
                &f[4],
                &f[5],
                &first,
                &last,
                &foreign,
            ],
        )
    }

    fn add_method(&mut self, subject: &Subject, method: &str, ops: f64) -> Result<(), StoreError> {
        let st = &self.st.method;
        self.returning(st, &[&subject.tenant, &subject.host_id, &subject.workload, &method, &ops]).map(|_| ())
    }

    fn add_day(&mut self, subject: &Subject, day: i64, sums: &Sums) -> Result<(), StoreError> {
        let (n, f, first, last, foreign) = sums_values(sums);
        let st = &self.st.day;
        self.exec(
            st,
            &[
                &subject.tenant,
                &subject.host_id,
                &subject.workload,
                &day,
                &n,
                &f[0],
                &f[1],
                &f[2],
                &f[3],
                &f[4],
                &f[5],
                &first,
                &last,
                &foreign,
            ],
        )
    }

    fn add_day_method(
        &mut self,
        subject: &Subject,
        day: i64,
        method: &str,
        ops: f64,
    ) -> Result<(), StoreError> {
        let st = &self.st.day_method;
        self.returning(st, &[&subject.tenant, &subject.host_id, &subject.workload, &day, &method, &ops])
            .map(|_| ())
    }

    fn add_day_host(&mut self, subject: &Subject, day: i64, host: &str) -> Result<(), StoreError> {
        let st = &self.st.day_host;
        self.exec(st, &[&subject.tenant, &day, &host])
    }

    fn add_host(&mut self, subject: &Subject, host: &str, sums: &HostSums) -> Result<(), StoreError> {
        let gpus = i64::from(sums.gpus);
        let st = &self.st.host;
        self.exec(
            st,
            &[
                &subject.tenant,
                &subject.host_id,
                &subject.workload,
                &host,
                &gpus,
                &sums.shared_gpu_seconds,
                &sums.guest_gap_gpu_seconds,
                &sums.cluster,
            ],
        )
    }

    fn add_gap_workload(
        &mut self,
        subject: &Subject,
        host: &str,
        workload: &str,
        seconds: f64,
    ) -> Result<(), StoreError> {
        let st = &self.st.gap_workload;
        self.returning(
            st,
            &[&subject.tenant, &subject.host_id, &subject.workload, &host, &workload, &seconds],
        )
        .map(|_| ())
    }

    fn add_capacity(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let tenants: Vec<&str> = buckets.iter().map(|b| b.0.tenant.as_str()).collect();
        let hosts: Vec<&str> = buckets.iter().map(|b| b.0.host_id.as_str()).collect();
        let workloads: Vec<&str> = buckets.iter().map(|b| b.0.workload.as_str()).collect();
        let clusters: Vec<&str> = buckets.iter().map(|b| b.1).collect();
        let minutes: Vec<i64> = buckets.iter().map(|b| b.2).collect();
        let flops: Vec<f64> = buckets.iter().map(|b| b.3).collect();
        let result =
            self.tx.query(&self.st.capacity, &[&tenants, &hosts, &workloads, &clusters, &minutes, &flops]);
        let rows = self.run(result)?;
        // RETURNING follows no order: the new values by bucket, then in the buckets' order.
        let mut by_key: std::collections::HashMap<(String, String, String, String, i64), f64> =
            std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            by_key.insert((get(r, 0)?, get(r, 1)?, get(r, 2)?, get(r, 3)?, get(r, 4)?), get(r, 5)?);
        }
        buckets
            .iter()
            .map(|(s, cluster, minute, _)| {
                let key =
                    (s.tenant.clone(), s.host_id.clone(), s.workload.clone(), (*cluster).to_owned(), *minute);
                by_key
                    .get(&key)
                    .copied()
                    .ok_or_else(|| StoreError::Corrupt(format!("capacity bucket {key:?} not returned")))
            })
            .collect()
    }

    fn raise_peak(&mut self, subject: &Subject, cluster: &str, peak: Peak) -> Result<(), StoreError> {
        let st = &self.st.peak;
        self.exec(
            st,
            &[&subject.tenant, &subject.host_id, &subject.workload, &cluster, &peak.flops, &peak.at],
        )
    }

    fn touching_segments(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        let touch = crate::fleet::runs::TOUCH_S;
        let (from, to) = (start.saturating_sub(touch), end.saturating_add(touch));
        let result = self.tx.query(&self.st.touching, &[&tenant, &from, &to]);
        let rows = self.run(result)?;
        rows.iter().map(|r| segment_row(r).map(|(_, s)| s)).collect()
    }

    fn write_segment(
        &mut self,
        tenant: &str,
        replaced: &[i64],
        segment: &SegmentRow,
        changed_at: i64,
    ) -> Result<(), StoreError> {
        let st = self.st;
        for old in replaced.iter().filter(|s| **s != segment.start) {
            self.exec(&st.move_hosts, &[&tenant, old, &segment.start])?;
            self.exec(&st.drop_hosts, &[&tenant, old])?;
            self.exec(&st.drop_segment, &[&tenant, old])?;
        }
        let f = &segment.figures;
        let methods = serde_json::to_string(&f.ops_by_method).map_err(|e| corrupt("segment methods", e))?;
        let windows = i64::try_from(f.windows).unwrap_or(i64::MAX);
        self.exec(
            &st.segment,
            &[
                &tenant,
                &segment.start,
                &segment.end,
                &windows,
                &f.ops_lower,
                &f.estimated_ops,
                &f.ops_upper,
                &f.gpu_seconds,
                &methods,
                &segment.peak.flops,
                &segment.peak.at,
                &changed_at,
            ],
        )?;
        for host in &segment.hosts {
            self.exec(&st.segment_host, &[&tenant, &segment.start, host])?;
        }
        Ok(())
    }
}

/// A segment row (hosts not read) and its tenant.
fn segment_row(r: &postgres::Row) -> Result<(String, SegmentRow), StoreError> {
    let methods: String = get(r, 8)?;
    let windows: i64 = get(r, 3)?;
    let segment = SegmentRow {
        start: get(r, 1)?,
        end: get(r, 2)?,
        figures: RunFigures {
            ops_lower: get(r, 4)?,
            estimated_ops: get(r, 5)?,
            ops_upper: get(r, 6)?,
            gpu_seconds: get(r, 7)?,
            windows: u64::try_from(windows).unwrap_or(0),
            ops_by_method: serde_json::from_str(&methods).map_err(|e| corrupt("segment methods", e))?,
        },
        hosts: Default::default(),
        peak: Peak { flops: get(r, 9)?, at: get(r, 10)? },
    };
    Ok((get(r, 0)?, segment))
}
