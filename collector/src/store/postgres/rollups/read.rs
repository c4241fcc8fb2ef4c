//! Reading the PostgreSQL roll-ups back: every row of the fleet view (with the busy segments
//! a [`Segments`] selects), or every row of every table for a check.

use std::collections::BTreeMap;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;
use postgres::GenericClient;

use super::{segment_row, SEGMENT_COLUMNS};
use crate::fleet::rollup::{HostSums, Peak, Rollups, Segments, Subject, Sums, Tables};
use crate::store::error::StoreError;
use crate::store::postgres::driver::{get, pg_error};
use crate::store::schema::count_u32;

/// Reads the segments `filter` selects into `out`, with their hosts when `with_hosts`.
fn read_segments(
    client: &mut impl GenericClient,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
    out: &mut Rollups,
    with_hosts: bool,
) -> Result<(), StoreError> {
    for r in
        client.query(&format!("{SEGMENT_COLUMNS} FROM rollup_segments {filter}"), params).map_err(pg_error)?
    {
        let (tenant, segment) = segment_row(&r)?;
        out.segments.entry(tenant).or_default().insert(segment.start, segment);
    }
    if !with_hosts {
        return Ok(());
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
/// with the per-day tables and the capacity buckets as `tables` says.
pub(in crate::store::postgres) fn read_rollups(
    client: &mut impl GenericClient,
    tenant: Option<&str>,
    tables: Tables,
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
        Segments::All => read_segments(client, WHERE, &[&tenant], &mut out, true)?,
        Segments::None => {}
        Segments::ChangedSince { since, gap_s } => {
            let (tenants, firsts) = changed_runs(client, since, gap_s)?;
            let filter = "JOIN UNNEST($1::text[], $2::bigint[]) AS c(tenant, first) USING (tenant) WHERE start >= c.first";
            read_segments(client, filter, &[&tenants, &firsts], &mut out, false)?;
        }
    }
    if tables == Tables::View {
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
    if tables == Tables::History {
        return Ok(out);
    }
    each_row(
        client,
        &format!("SELECT {KEY}, cluster, hour, flops FROM rollup_capacity {WHERE}"),
        tenant,
        |r| {
            let (subject, cluster, hour): (Subject, String, i64) = (subject(r)?, get(r, 3)?, get(r, 4)?);
            let flops: Vec<Option<f64>> = get(r, 5)?;
            for (minute, value) in super::capacity::minutes(hour, &flops) {
                out.capacity.insert(&subject, &cluster, minute, value);
            }
            Ok(())
        },
    )?;
    Ok(out)
}
