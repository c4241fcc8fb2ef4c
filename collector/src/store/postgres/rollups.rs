//! The PostgreSQL roll-up tables, with the meaning of the SQLite ones
//! (`store/sqlite/rollups.rs`; schema: [`super::schema::MIGRATION_ROLLUPS`]): the row
//! operations ingest merges a batch with ([`RollupTx`], on statements prepared once per
//! connection), reading the rows back, and recomputing them from the raw windows.
//!
//! Two collectors may ingest batches about one tenant at once. A batch's first write about a
//! tenant is the upsert of its `rollup_subjects` row, whose row lock is held to the commit:
//! the other batch waits there, so reading and rewriting the tenant's segments is never
//! interleaved (a lost update), and as every batch takes its subjects in key order
//! ([`crate::fleet::rollup::apply`]) two batches never wait on each other in a cycle.

use std::collections::BTreeMap;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, Statement, Transaction};

use super::driver::{get, pg_error, Failed};
use crate::fleet::rollup::apply::{apply, Bucket, RollupTx};
use crate::fleet::rollup::check::{compare, TableCheck};
use crate::fleet::rollup::{cluster_name, HostSums, Peak, Rollups, SegmentRow, Segments, Subject, Sums};
use crate::fleet::runs::RunFigures;
use crate::fleet::{Placement, WindowRow};
use crate::store::error::StoreError;
use crate::store::schema::{corrupt, count_u32};

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

/// Reads the segments (and their hosts) `filter` selects into `out`.
fn read_segments(
    client: &mut impl GenericClient,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
    out: &mut Rollups,
) -> Result<(), StoreError> {
    for r in
        client.query(&format!("{SEGMENT_COLUMNS} FROM rollup_segments {filter}"), params).map_err(pg_error)?
    {
        let (tenant, segment) = segment_row(&r)?;
        out.segments.entry(tenant).or_default().insert(segment.start, segment);
    }
    for r in client
        .query(&format!("SELECT tenant, start, host FROM rollup_segment_hosts {filter}"), params)
        .map_err(pg_error)?
    {
        let (tenant, start, host): (String, i64, String) = (get(&r, 0)?, get(&r, 1)?, get(&r, 2)?);
        if let Some(segment) = out.segments.get_mut(&tenant).and_then(|s| s.get_mut(&start)) {
            segment.hosts.insert(host);
        }
    }
    Ok(())
}

/// Per tenant with a segment changed at or after `since`, the start of the first segment of
/// the run holding its earliest changed segment (runs cut at pauses longer than `gap_s`): one
/// query for the changed segments, then one per step back for every tenant still walking
/// (a run of many segments takes several; most take one).
fn changed_runs(
    client: &mut impl GenericClient,
    since: i64,
    gap_s: i64,
) -> Result<(Vec<String>, Vec<i64>), StoreError> {
    let changed = client
        .query(
            "SELECT tenant, MIN(start) FROM rollup_segments WHERE changed_at >= $1 GROUP BY tenant",
            &[&since],
        )
        .map_err(pg_error)?;
    let mut from: BTreeMap<String, i64> =
        changed.iter().map(|r| Ok((get(r, 0)?, get(r, 1)?))).collect::<Result<_, StoreError>>()?;
    let mut walking: Vec<String> = from.keys().cloned().collect();
    while !walking.is_empty() {
        let starts: Vec<i64> = walking.iter().map(|t| from.get(t).copied().unwrap_or(i64::MIN)).collect();
        // Segments are disjoint and sorted, so the one before ends the run so far.
        let previous = client
            .query(
                r#"SELECT c.tenant, p.start, p."end" FROM UNNEST($1::text[], $2::bigint[]) AS c(tenant, first)
                   CROSS JOIN LATERAL (SELECT start, "end" FROM rollup_segments s
                       WHERE s.tenant = c.tenant AND s.start < c.first ORDER BY start DESC LIMIT 1) p"#,
                &[&walking, &starts],
            )
            .map_err(pg_error)?;
        walking.clear();
        for r in &previous {
            let (tenant, start, end): (String, i64, i64) = (get(r, 0)?, get(r, 1)?, get(r, 2)?);
            if let Some(first) = from.get_mut(&tenant) {
                if first.saturating_sub(end) <= gap_s {
                    *first = start;
                    walking.push(tenant);
                }
            }
        }
    }
    Ok(from.into_iter().unzip())
}

fn subject(r: &postgres::Row) -> Result<Subject, StoreError> {
    Ok(Subject { tenant: get(r, 0)?, host_id: get(r, 1)?, workload: get(r, 2)? })
}

fn sums(r: &postgres::Row, at: usize) -> Result<Sums, StoreError> {
    let windows: i64 = get(r, at)?;
    Ok(Sums {
        windows: u64::try_from(windows).unwrap_or(0),
        ops_lower: get(r, at + 1)?,
        estimated_ops: get(r, at + 2)?,
        ops_upper: get(r, at + 3)?,
        gpu_seconds: get(r, at + 4)?,
        shared_gpu_seconds: get(r, at + 5)?,
        guest_gap_gpu_seconds: get(r, at + 6)?,
        first_start: get(r, at + 7)?,
        last_end: get(r, at + 8)?,
        foreign_person: get(r, at + 9)?,
    })
}

const SUMS: &str = "windows, ops_lower, estimated_ops, ops_upper, gpu_seconds, shared_gpu_seconds,
    guest_gap_gpu_seconds, first_start, last_end, foreign_person";

/// Calls `f` with every row `sql` selects (`$1`: the tenant, or NULL for all rows), streamed.
fn each_row(
    client: &mut impl GenericClient,
    sql: &str,
    tenant: Option<&str>,
    mut f: impl FnMut(&postgres::Row) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let params: [&(dyn ToSql + Sync); 1] = [&tenant];
    let mut rows = client.query_raw(sql, params).map_err(pg_error)?;
    while let Some(row) = rows.next().map_err(pg_error)? {
        f(&row)?;
    }
    Ok(())
}

/// The stored roll-ups (of one tenant when `tenant` is given): what the fleet view needs, and
/// with `full` also the day tables and capacity buckets (a check).
pub(super) fn read_rollups(
    client: &mut impl GenericClient,
    tenant: Option<&str>,
    full: bool,
    segments: Segments,
) -> Result<Rollups, StoreError> {
    const KEY: &str = "tenant, subject_host, subject_workload";
    const WHERE: &str = "WHERE $1::text IS NULL OR tenant = $1::text";
    let mut out = Rollups::default();
    each_row(client, &format!("SELECT {KEY}, {SUMS} FROM rollup_subjects {WHERE}"), tenant, |r| {
        out.subjects.insert(subject(r)?, sums(r, 3)?);
        Ok(())
    })?;
    each_row(
        client,
        &format!("SELECT {KEY}, method, estimated_ops FROM rollup_methods {WHERE}"),
        tenant,
        |r| {
            out.methods.insert((subject(r)?, get(r, 3)?), get(r, 4)?);
            Ok(())
        },
    )?;
    let hosts_sql = format!(
        "SELECT {KEY}, host, gpus, shared_gpu_seconds, guest_gap_gpu_seconds, cluster FROM rollup_hosts {WHERE}"
    );
    each_row(client, &hosts_sql, tenant, |r| {
        let sums = HostSums {
            gpus: count_u32(get(r, 4)?),
            shared_gpu_seconds: get(r, 5)?,
            guest_gap_gpu_seconds: get(r, 6)?,
            cluster: get(r, 7)?,
        };
        out.hosts.insert((subject(r)?, get(r, 3)?), sums);
        Ok(())
    })?;
    each_row(
        client,
        &format!("SELECT {KEY}, host, workload, seconds FROM rollup_gap_workloads {WHERE}"),
        tenant,
        |r| {
            out.gap_workloads.insert((subject(r)?, get(r, 3)?, get(r, 4)?), get(r, 5)?);
            Ok(())
        },
    )?;
    each_row(
        client,
        &format!("SELECT {KEY}, cluster, peak_flops, peak_at FROM rollup_peaks {WHERE}"),
        tenant,
        |r| {
            out.peaks.insert((subject(r)?, get(r, 3)?), Peak { flops: get(r, 4)?, at: get(r, 5)? });
            Ok(())
        },
    )?;
    match segments {
        Segments::All => read_segments(client, WHERE, &[&tenant], &mut out)?,
        Segments::ChangedSince { since, gap_s } => {
            let (tenants, firsts) = changed_runs(client, since, gap_s)?;
            let filter = "JOIN UNNEST($1::text[], $2::bigint[]) AS c(tenant, first) USING (tenant) WHERE start >= c.first";
            read_segments(client, filter, &[&tenants, &firsts], &mut out)?;
        }
    }
    if !full {
        return Ok(out);
    }
    each_row(client, &format!("SELECT {KEY}, day, {SUMS} FROM rollup_days {WHERE}"), tenant, |r| {
        out.days.insert((subject(r)?, get(r, 3)?), sums(r, 4)?);
        Ok(())
    })?;
    each_row(
        client,
        &format!("SELECT {KEY}, day, method, estimated_ops FROM rollup_day_methods {WHERE}"),
        tenant,
        |r| {
            out.day_methods.insert((subject(r)?, get(r, 3)?, get(r, 4)?), get(r, 5)?);
            Ok(())
        },
    )?;
    each_row(client, &format!("SELECT tenant, day, host FROM rollup_day_hosts {WHERE}"), tenant, |r| {
        let subject = Subject { tenant: get(r, 0)?, host_id: String::new(), workload: String::new() };
        out.day_hosts.insert((subject, get(r, 1)?, get(r, 2)?));
        Ok(())
    })?;
    each_row(
        client,
        &format!("SELECT {KEY}, cluster, minute, flops FROM rollup_capacity {WHERE}"),
        tenant,
        |r| {
            out.capacity.insert((subject(r)?, get(r, 3)?, get(r, 4)?), get(r, 5)?);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Every window, as the aggregation reads them.
const WINDOWS: &str = r#"
    SELECT tenant, host_id, start, "end", gpu_seconds, GREATEST(max_concurrent_gpus, gpus), estimated_ops,
           peak_flops, method, foreign_person, ops_lower, ops_upper, shared_gpu_seconds,
           guest_gap_gpu_seconds, CASE WHEN guest_gap_gpu_seconds > 0 OR tenant IS NULL THEN workload END
    FROM records"#;

fn placements(client: &mut impl GenericClient) -> Result<BTreeMap<String, String>, StoreError> {
    let rows = client.query("SELECT host_id, site, fabric FROM host_placement", &[]).map_err(pg_error)?;
    rows.iter()
        .map(|r| Ok((get(r, 0)?, cluster_name(Some(&Placement { site: get(r, 1)?, fabric: get(r, 2)? })))))
        .collect()
}

/// Adds the window of `r` (as [`WINDOWS`] selects it) to `rollups`, in its host's cluster.
fn add_row(
    rollups: &mut Rollups,
    clusters: &BTreeMap<String, String>,
    r: &postgres::Row,
) -> Result<(), StoreError> {
    let (tenant, host_id, workload, method): (Option<String>, String, Option<String>, String) =
        (get(r, 0)?, get(r, 1)?, get(r, 14)?, get(r, 8)?);
    let unplaced = cluster_name(None);
    let w = WindowRow {
        tenant: tenant.as_deref(),
        host_id: &host_id,
        start: get(r, 2)?,
        end: get(r, 3)?,
        gpu_seconds: get(r, 4)?,
        gpus: count_u32(get(r, 5)?),
        estimated_ops: get(r, 6)?,
        peak_flops: get(r, 7)?,
        method: &method,
        foreign_person: get(r, 9)?,
        ops_lower: get(r, 10)?,
        ops_upper: get(r, 11)?,
        shared_gpu_seconds: get(r, 12)?,
        guest_gap_gpu_seconds: get(r, 13)?,
        workload: workload.as_deref(),
    };
    rollups.add(&w, clusters.get(&host_id).unwrap_or(&unplaced));
    Ok(())
}

/// The roll-up tables, emptied by a rebuild.
const TABLES: &str = "rollup_subjects, rollup_methods, rollup_days, rollup_day_methods, rollup_day_hosts,
    rollup_hosts, rollup_gap_workloads, rollup_capacity, rollup_peaks, rollup_segments, rollup_segment_hosts";

/// Recomputes every roll-up from the raw windows in the transaction `tx` (hosts in the
/// cluster they stand in now), when `only_if_unbuilt` is false or `rollup_state` says they
/// were never built; returns the windows read, or `None` when nothing was to do.
pub(super) fn rebuild(
    tx: &mut Transaction<'_>,
    st: &RollupStatements,
    now: i64,
    only_if_unbuilt: bool,
) -> Result<Option<u64>, Failed> {
    // The state row's lock makes concurrent rebuilds (two collectors opening a migrated
    // database) one after the other; the second finds the work done.
    let built: Option<i64> = tx.query_one("SELECT built_at FROM rollup_state FOR UPDATE", &[])?.get(0);
    if only_if_unbuilt && built.is_some() {
        return Ok(None);
    }
    tx.batch_execute(&format!("TRUNCATE {TABLES}"))?;
    let clusters = placements(tx)?;
    let stmt = tx.prepare(WINDOWS)?;
    let portal = tx.bind(&stmt, &[])?;
    let mut windows = 0u64;
    loop {
        let rows = tx.query_portal(&portal, REBUILD_CHUNK)?;
        if rows.is_empty() {
            break;
        }
        let mut batch = Rollups::default();
        for r in &rows {
            add_row(&mut batch, &clusters, r)?;
        }
        windows += rows.len() as u64;
        let mut ops = PgRollups { tx: &mut *tx, st, failed: None };
        if let Err(e) = apply(&batch, &mut ops, now) {
            return Err(ops.failed.take().map_or(Failed::Store(e), Failed::Pg));
        }
    }
    tx.execute("UPDATE rollup_state SET built_at = $1", &[&now])?;
    Ok(Some(windows))
}

/// The roll-ups the raw windows give against the stored ones.
pub(super) fn check(client: &mut Client) -> Result<Vec<TableCheck>, StoreError> {
    let clusters = placements(client)?;
    let mut expected = Rollups::default();
    let params: [&(dyn ToSql + Sync); 0] = [];
    let mut rows = client.query_raw(WINDOWS, params).map_err(pg_error)?;
    while let Some(r) = rows.next().map_err(pg_error)? {
        add_row(&mut expected, &clusters, &r)?;
    }
    drop(rows);
    expected.finish_peaks();
    let stored = read_rollups(client, None, true, Segments::All)?;
    Ok(compare(&expected, &stored))
}
