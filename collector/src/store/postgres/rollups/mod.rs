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

mod capacity;
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

/// `SELECT * FROM UNNEST($1::T1[], …)`: one row per array element, the arrays of one batch.
fn unnest(types: &[&str]) -> String {
    let arrays: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("${}::{t}[]", i + 1)).collect();
    format!("SELECT * FROM UNNEST({})", arrays.join(", "))
}

/// `r.c + excluded.c`, saturating at [`MAX`].
fn sat(c: &str) -> String {
    format!("{c} = CASE WHEN r.{c} > {MAX} - excluded.{c} THEN {MAX} ELSE r.{c} + excluded.{c} END")
}

/// The key of every roll-up row.
const KEY: &str = "tenant, subject_host, subject_workload";
const KEY_TYPES: [&str; 3] = ["text", "text", "text"];
const SUMS_TYPES: [&str; 10] =
    ["bigint", "float8", "float8", "float8", "float8", "float8", "float8", "bigint", "bigint", "bool"];

fn sums_upsert(table: &str, day: bool) -> String {
    let (key, types): (String, Vec<&str>) = if day {
        (format!("{KEY}, day"), KEY_TYPES.iter().chain(&["bigint"]).chain(&SUMS_TYPES).copied().collect())
    } else {
        (KEY.to_owned(), KEY_TYPES.iter().chain(&SUMS_TYPES).copied().collect())
    };
    let sums: Vec<String> = [
        "ops_lower",
        "estimated_ops",
        "ops_upper",
        "gpu_seconds",
        "shared_gpu_seconds",
        "guest_gap_gpu_seconds",
    ]
    .iter()
    .map(|c| sat(c))
    .collect();
    format!(
        "INSERT INTO {table} AS r ({key}, windows, ops_lower, estimated_ops, ops_upper, gpu_seconds,
             shared_gpu_seconds, guest_gap_gpu_seconds, first_start, last_end, foreign_person)
         {} ON CONFLICT ({key}) DO UPDATE SET windows = r.windows + excluded.windows, {},
            first_start = LEAST(r.first_start, excluded.first_start),
            last_end = GREATEST(r.last_end, excluded.last_end),
            foreign_person = r.foreign_person OR excluded.foreign_person",
        unnest(&types),
        sums.join(", ")
    )
}

fn add_upsert(table: &str, keys: &str, types: &[&str], column: &str) -> String {
    format!(
        "INSERT INTO {table} AS r ({keys}, {column}) {} ON CONFLICT ({keys}) DO UPDATE SET {}",
        unnest(types),
        sat(column)
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
    capacity: capacity::CapacityStatements,
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
        let t = |extra: &[&'static str]| -> Vec<&'static str> {
            KEY_TYPES.iter().chain(extra).copied().collect()
        };
        Ok(RollupStatements {
            subject: client.prepare(&sums_upsert("rollup_subjects", false))?,
            method: client.prepare(&add_upsert(
                "rollup_methods",
                &format!("{KEY}, method"),
                &t(&["text", "float8"]),
                "estimated_ops",
            ))?,
            day: client.prepare(&sums_upsert("rollup_days", true))?,
            day_method: client.prepare(&add_upsert(
                "rollup_day_methods",
                &format!("{KEY}, day, method"),
                &t(&["bigint", "text", "float8"]),
                "estimated_ops",
            ))?,
            day_host: client.prepare(&format!(
                "INSERT INTO rollup_day_hosts (tenant, day, host) {} ON CONFLICT DO NOTHING",
                unnest(&["text", "bigint", "text"])
            ))?,
            host: client.prepare(&format!(
                "INSERT INTO rollup_hosts AS r ({KEY}, host, gpus, shared_gpu_seconds, guest_gap_gpu_seconds, cluster)
                 {} ON CONFLICT ({KEY}, host) DO UPDATE SET gpus = GREATEST(r.gpus, excluded.gpus), {}, {},
                     cluster = excluded.cluster",
                unnest(&t(&["text", "bigint", "float8", "float8", "text"])),
                sat("shared_gpu_seconds"),
                sat("guest_gap_gpu_seconds")
            ))?,
            gap_workload: client.prepare(&add_upsert(
                "rollup_gap_workloads",
                &format!("{KEY}, host, workload"),
                &t(&["text", "text", "float8"]),
                "seconds",
            ))?,
            capacity: capacity::CapacityStatements::prepare(client)?,
            peak: client.prepare(&format!(
                "INSERT INTO rollup_peaks AS r ({KEY}, cluster, peak_flops, peak_at) {}
                 ON CONFLICT ({KEY}, cluster) DO UPDATE SET peak_flops = excluded.peak_flops, peak_at = excluded.peak_at
                 WHERE excluded.peak_flops > r.peak_flops
                    OR (excluded.peak_flops = r.peak_flops AND excluded.peak_at < r.peak_at)",
                unnest(&t(&["text", "float8", "bigint"]))
            ))?,
            touching: client.prepare(&format!(
                r#"{SEGMENT_COLUMNS} FROM rollup_segments WHERE tenant = $1 AND start <= $3 AND "end" >= $2
                   AND start >= COALESCE((SELECT max(start) FROM rollup_segments WHERE tenant = $1 AND start <= $2), $2)
                   ORDER BY start"#
            ))?,
            move_hosts: client.prepare(
                "INSERT INTO rollup_segment_hosts (tenant, start, host)
                 SELECT tenant, $3, host FROM rollup_segment_hosts WHERE tenant = $1 AND start = $2
                 ON CONFLICT DO NOTHING",
            )?,
            drop_hosts: client.prepare("DELETE FROM rollup_segment_hosts WHERE tenant = $1 AND start = $2")?,
            drop_segment: client.prepare("DELETE FROM rollup_segments WHERE tenant = $1 AND start = $2")?,
            segment: client.prepare(&format!(
                r#"INSERT INTO rollup_segments (tenant, start, "end", windows, ops_lower, estimated_ops, ops_upper,
                       gpu_seconds, ops_by_method, peak_flops, peak_at, changed_at) {}
                   ON CONFLICT (tenant, start) DO UPDATE SET "end" = excluded."end", windows = excluded.windows,
                       ops_lower = excluded.ops_lower, estimated_ops = excluded.estimated_ops,
                       ops_upper = excluded.ops_upper, gpu_seconds = excluded.gpu_seconds,
                       ops_by_method = excluded.ops_by_method, peak_flops = excluded.peak_flops,
                       peak_at = excluded.peak_at, changed_at = excluded.changed_at"#,
                unnest(&[
                    "text", "bigint", "bigint", "bigint", "float8", "float8", "float8", "float8", "text", "float8", "bigint",
                    "bigint"
                ])
            ))?,
            segment_host: client.prepare(&format!(
                "INSERT INTO rollup_segment_hosts (tenant, start, host) {} ON CONFLICT DO NOTHING",
                unnest(&["text", "bigint", "text"])
            ))?,
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

/// The subject columns of `rows`.
fn key_columns<'a, T>(rows: &'a [T], subject: impl Fn(&T) -> &'a Subject) -> [Vec<&'a str>; 3] {
    [
        rows.iter().map(|r| subject(r).tenant.as_str()).collect(),
        rows.iter().map(|r| subject(r).host_id.as_str()).collect(),
        rows.iter().map(|r| subject(r).workload.as_str()).collect(),
    ]
}

/// The sums columns of `rows` (as [`SUMS_TYPES`]).
struct SumsColumns {
    windows: Vec<i64>,
    figures: [Vec<f64>; 6],
    first: Vec<i64>,
    last: Vec<i64>,
    foreign: Vec<bool>,
}

impl SumsColumns {
    fn of<'a>(sums: impl Iterator<Item = &'a Sums>) -> SumsColumns {
        let mut c = SumsColumns {
            windows: vec![],
            figures: Default::default(),
            first: vec![],
            last: vec![],
            foreign: vec![],
        };
        for s in sums {
            c.windows.push(i64::try_from(s.windows).unwrap_or(i64::MAX));
            let f = [
                s.ops_lower,
                s.estimated_ops,
                s.ops_upper,
                s.gpu_seconds,
                s.shared_gpu_seconds,
                s.guest_gap_gpu_seconds,
            ];
            for (column, value) in c.figures.iter_mut().zip(f) {
                column.push(value);
            }
            c.first.push(s.first_start);
            c.last.push(s.last_end);
            c.foreign.push(s.foreign_person);
        }
        c
    }
}

impl RollupTx for PgRollups<'_, '_> {
    fn add_subjects(&mut self, rows: &[(&Subject, &Sums)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let c = SumsColumns::of(rows.iter().map(|r| r.1));
        let f = &c.figures;
        let st = &self.st.subject;
        self.exec(
            st,
            &[
                &t, &h, &w, &c.windows, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &c.first, &c.last,
                &c.foreign,
            ],
        )
    }

    fn add_methods(&mut self, rows: &[(&Subject, &str, f64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let methods: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let ops: Vec<f64> = rows.iter().map(|r| r.2).collect();
        let st = &self.st.method;
        self.exec(st, &[&t, &h, &w, &methods, &ops])
    }

    fn add_days(&mut self, rows: &[(&Subject, i64, &Sums)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let days: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let c = SumsColumns::of(rows.iter().map(|r| r.2));
        let f = &c.figures;
        let st = &self.st.day;
        self.exec(
            st,
            &[
                &t, &h, &w, &days, &c.windows, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &c.first, &c.last,
                &c.foreign,
            ],
        )
    }

    fn add_day_methods(&mut self, rows: &[(&Subject, i64, &str, f64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let days: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let methods: Vec<&str> = rows.iter().map(|r| r.2).collect();
        let ops: Vec<f64> = rows.iter().map(|r| r.3).collect();
        let st = &self.st.day_method;
        self.exec(st, &[&t, &h, &w, &days, &methods, &ops])
    }

    fn add_day_hosts(&mut self, rows: &[(&Subject, i64, &str)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tenants: Vec<&str> = rows.iter().map(|r| r.0.tenant.as_str()).collect();
        let days: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let hosts: Vec<&str> = rows.iter().map(|r| r.2).collect();
        let st = &self.st.day_host;
        self.exec(st, &[&tenants, &days, &hosts])
    }

    fn add_hosts(&mut self, rows: &[(&Subject, &str, &HostSums)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let hosts: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let gpus: Vec<i64> = rows.iter().map(|r| i64::from(r.2.gpus)).collect();
        let shared: Vec<f64> = rows.iter().map(|r| r.2.shared_gpu_seconds).collect();
        let gap: Vec<f64> = rows.iter().map(|r| r.2.guest_gap_gpu_seconds).collect();
        let clusters: Vec<&str> = rows.iter().map(|r| r.2.cluster.as_str()).collect();
        let st = &self.st.host;
        self.exec(st, &[&t, &h, &w, &hosts, &gpus, &shared, &gap, &clusters])
    }

    fn add_gap_workloads(&mut self, rows: &[(&Subject, &str, &str, f64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let hosts: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let workloads: Vec<&str> = rows.iter().map(|r| r.2).collect();
        let seconds: Vec<f64> = rows.iter().map(|r| r.3).collect();
        let st = &self.st.gap_workload;
        self.exec(st, &[&t, &h, &w, &hosts, &workloads, &seconds])
    }

    fn add_capacity(&mut self, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
        capacity::add(self, buckets)
    }

    fn raise_peaks(&mut self, rows: &[(&Subject, &str, Peak)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [t, h, w] = key_columns(rows, |r| r.0);
        let clusters: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let flops: Vec<f64> = rows.iter().map(|r| r.2.flops).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.2.at).collect();
        let st = &self.st.peak;
        self.exec(st, &[&t, &h, &w, &clusters, &flops, &at])
    }

    fn touching_segments(
        &mut self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        let result = self.tx.query(&self.st.touching, &[&tenant, &start, &end]);
        let rows = self.run(result)?;
        rows.iter().map(|r| segment_row(r).map(|(_, s)| s)).collect()
    }

    fn write_segments(
        &mut self,
        tenant: &str,
        moved: &[(i64, i64)],
        segments: &[SegmentRow],
        changed_at: i64,
    ) -> Result<(), StoreError> {
        let st = self.st;
        for (old, into) in moved {
            self.exec(&st.move_hosts, &[&tenant, old, into])?;
            self.exec(&st.drop_hosts, &[&tenant, old])?;
            self.exec(&st.drop_segment, &[&tenant, old])?;
        }
        if segments.is_empty() {
            return Ok(());
        }
        let tenants: Vec<&str> = segments.iter().map(|_| tenant).collect();
        let starts: Vec<i64> = segments.iter().map(|s| s.start).collect();
        let ends: Vec<i64> = segments.iter().map(|s| s.end).collect();
        let windows: Vec<i64> =
            segments.iter().map(|s| i64::try_from(s.figures.windows).unwrap_or(i64::MAX)).collect();
        let figure = |f: fn(&SegmentRow) -> f64| segments.iter().map(f).collect::<Vec<f64>>();
        let (lower, point, upper, gpu_seconds, peak) = (
            figure(|s| s.figures.ops_lower),
            figure(|s| s.figures.estimated_ops),
            figure(|s| s.figures.ops_upper),
            figure(|s| s.figures.gpu_seconds),
            figure(|s| s.peak.flops),
        );
        let methods = segments
            .iter()
            .map(|s| {
                serde_json::to_string(&s.figures.ops_by_method).map_err(|e| corrupt("segment methods", e))
            })
            .collect::<Result<Vec<String>, StoreError>>()?;
        let peak_at: Vec<i64> = segments.iter().map(|s| s.peak.at).collect();
        let changed: Vec<i64> = segments.iter().map(|_| changed_at).collect();
        self.exec(
            &st.segment,
            &[
                &tenants,
                &starts,
                &ends,
                &windows,
                &lower,
                &point,
                &upper,
                &gpu_seconds,
                &methods,
                &peak,
                &peak_at,
                &changed,
            ],
        )?;
        let pairs: Vec<(i64, &str)> =
            segments.iter().flat_map(|s| s.hosts.iter().map(|h| (s.start, h.as_str()))).collect();
        let host_tenants: Vec<&str> = pairs.iter().map(|_| tenant).collect();
        let host_starts: Vec<i64> = pairs.iter().map(|p| p.0).collect();
        let hosts: Vec<&str> = pairs.iter().map(|p| p.1).collect();
        self.exec(&st.segment_host, &[&host_tenants, &host_starts, &hosts])
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
