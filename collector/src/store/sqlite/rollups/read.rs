//! Reading the SQLite roll-ups back: every row of the fleet view (with the busy segments a
//! [`Segments`] selects), or every row of every table for a check.

use rusqlite::{params, Connection, OptionalExtension};

use super::{segment_row, SEGMENT_COLUMNS, SUMS};
use crate::fleet::rollup::{capacity, HostSums, Peak, Rollups, Segments, Subject, Sums, Tables};
use crate::store::error::StoreError;
use crate::store::schema::{count_u32, to_u64};
use crate::store::sqlite::driver::db_error;

/// Reads the segments `filter` selects into `out`, with their hosts when `with_hosts`.
fn read_segments(
    conn: &Connection,
    filter: &str,
    params: &[&dyn rusqlite::ToSql],
    out: &mut Rollups,
    with_hosts: bool,
) -> Result<(), StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("{SEGMENT_COLUMNS} FROM rollup_segments {filter}")).map_err(db_error)?;
    let rows = stmt.query_map(params, segment_row).map_err(db_error)?;
    for row in rows {
        let (tenant, segment) = row.map_err(db_error)??;
        out.segments.entry(tenant).or_default().insert(segment.start, segment);
    }
    if !with_hosts {
        return Ok(());
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
/// with the per-day tables and the capacity buckets as `tables` says.
pub(in crate::store::sqlite) fn read_rollups(
    conn: &Connection,
    tenant: Option<&str>,
    tables: Tables,
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
        Segments::All => read_segments(conn, WHERE, &[&tenant], &mut out, true)?,
        Segments::None => {}
        Segments::ChangedSince { since, gap_s } => {
            for (tenant, from) in changed_runs(conn, since, gap_s)? {
                read_segments(conn, "WHERE tenant = ?1 AND start >= ?2", &[&tenant, &from], &mut out, false)?;
            }
        }
    }
    if tables == Tables::View {
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
    if tables == Tables::History {
        return Ok(out);
    }
    let mut hours: Vec<(Subject, String, i64, Vec<u8>)> = Vec::new();
    each_row(
        conn,
        &format!("SELECT {KEY}, cluster, hour, flops FROM rollup_capacity {WHERE}"),
        tenant,
        |r| {
            hours.push((subject(r)?, r.get(3)?, r.get(4)?, r.get(5)?));
            Ok(())
        },
    )?;
    for (subject, cluster, hour, flops) in hours {
        for (minute, value) in capacity::decode(hour, &flops)? {
            out.capacity.insert(&subject, &cluster, minute, value);
        }
    }
    Ok(out)
}

/// The host ids `sql` selects (one column) with `params`.
pub(in crate::store::sqlite) fn hosts(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(db_error)?;
    let rows = stmt.query_map(params, |r| r.get(0)).map_err(db_error)?;
    rows.collect::<rusqlite::Result<Vec<String>>>().map_err(db_error)
}

/// The hosts that reported usage of `tenant`, by host id.
pub(in crate::store::sqlite) fn tenant_hosts(
    conn: &Connection,
    tenant: &str,
) -> Result<Vec<String>, StoreError> {
    hosts(
        conn,
        "SELECT host FROM rollup_hosts WHERE tenant = ?1 AND subject_host = '' AND subject_workload = ''
         ORDER BY host",
        &[&tenant],
    )
}

/// The fleet view the stored roll-ups hold (of one tenant when `tenant` is given), with the
/// runs `segments` selects.
pub(in crate::store::sqlite) fn usage(
    conn: &Connection,
    tenant: Option<&str>,
    segments: Segments,
) -> Result<crate::fleet::FleetUsage, StoreError> {
    Ok(crate::fleet::rollup::assemble::assemble(&read_rollups(conn, tenant, Tables::View, segments)?))
}
