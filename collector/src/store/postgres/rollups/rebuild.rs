//! Recomputing the PostgreSQL roll-ups from the raw windows: a rebuild (after a migration,
//! a prune, or on `rollups rebuild`) and the check (`rollups check`).

use std::collections::BTreeMap;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, Transaction};

use super::read::read_rollups;
use super::{PgRollups, RollupStatements, REBUILD_CHUNK};
use crate::fleet::rollup::apply::apply;
use crate::fleet::rollup::check::{compare, TableCheck};
use crate::fleet::rollup::{cluster_name, Rollups, Segments, Tables, UNPLACED};
use crate::fleet::Placement;
use crate::store::error::StoreError;
use crate::store::postgres::driver::{get, pg_error, Failed};

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
    let w = crate::store::postgres::fleet::read_window(r)?;
    rollups.add(&w, clusters.get(w.host_id).map_or(UNPLACED, String::as_str));
    Ok(())
}

/// The roll-up tables, emptied by a rebuild.
const TABLES: &str = "rollup_subjects, rollup_methods, rollup_days, rollup_day_methods, rollup_day_hosts,
    rollup_hosts, rollup_gap_workloads, rollup_capacity, rollup_peaks, rollup_segments, rollup_segment_hosts";

/// Recomputes every roll-up from the raw windows in the transaction `tx` (hosts in the
/// cluster they stand in now), when `only_if_unbuilt` is false or `rollup_state` says they
/// were never built; returns the windows read, or `None` when nothing was to do.
pub(in crate::store::postgres) fn rebuild(
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
    tx.execute("UPDATE rollup_state SET built_at = $1, pruned_before = NULL", &[&now])?;
    Ok(Some(windows))
}

/// The roll-ups the raw windows give against the stored ones, both read in one snapshot
/// (a read-only REPEATABLE READ transaction: ingest may go on meanwhile).
pub(in crate::store::postgres) fn check(client: &mut Client) -> Result<Vec<TableCheck>, StoreError> {
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg_error)?;
    let clusters = placements(&mut tx)?;
    let mut expected = Rollups::default();
    let params: [&(dyn ToSql + Sync); 0] = [];
    let mut rows = tx.query_raw(WINDOWS, params).map_err(pg_error)?;
    while let Some(r) = rows.next().map_err(pg_error)? {
        add_row(&mut expected, &clusters, &r)?;
    }
    drop(rows);
    expected.finish_peaks();
    let stored = read_rollups(&mut tx, None, Tables::All, Segments::All)?;
    let pruned_before: Option<i64> =
        get(&tx.query_one("SELECT pruned_before FROM rollup_state", &[]).map_err(pg_error)?, 0)?;
    tx.commit().map_err(pg_error)?;
    Ok(compare(&expected, &stored, pruned_before))
}
