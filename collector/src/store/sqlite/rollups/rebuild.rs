//! Recomputing the SQLite roll-ups from the raw windows: a rebuild (after a migration, a
//! prune, or on `rollups rebuild`) and the check (`rollups check`).

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::read::read_rollups;
use super::{SqliteRollups, REBUILD_CHUNK};
use crate::fleet::rollup::apply::apply;
use crate::fleet::rollup::{cluster_name, Rollups, Segments, Tables};
use crate::fleet::{Placement, WindowRow};
use crate::store::error::StoreError;
use crate::store::sqlite::driver::db_error;

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
pub(in crate::store::sqlite) fn host_cluster(conn: &Connection, host_id: &str) -> Result<String, StoreError> {
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
    let clusters: BTreeMap<String, String> = crate::store::sqlite::fleet::placements_on(conn)?
        .into_iter()
        .map(|(host, placement)| (host, cluster_name(Some(&placement))))
        .collect();
    let unplaced = cluster_name(None);
    let mut stmt = conn.prepare(crate::store::sqlite::fleet::WINDOWS_SQL).map_err(db_error)?;
    let mut rows = stmt.query(params![None::<&str>, None::<i64>, None::<i64>]).map_err(db_error)?;
    let (mut read, mut pending) = (0u64, 0usize);
    while let Some(r) = rows.next().map_err(db_error)? {
        crate::store::sqlite::fleet::read_window(r, |w: &WindowRow<'_>| {
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
pub(in crate::store::sqlite) fn rebuild(conn: &mut Connection, now: i64) -> Result<u64, StoreError> {
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
    tx.execute("UPDATE rollup_state SET built_at = ?1, pruned_before = NULL", [now]).map_err(db_error)?;
    tx.commit().map_err(db_error)?;
    Ok(windows)
}

/// Builds the roll-ups of a database migrated from before them (`rollup_state.built_at`
/// NULL), once; a no-op otherwise.
pub(in crate::store::sqlite) fn build_if_needed(conn: &mut Connection, now: i64) -> Result<(), StoreError> {
    let built: Option<Option<i64>> =
        conn.query_row("SELECT built_at FROM rollup_state", [], |r| r.get(0)).optional().map_err(db_error)?;
    if matches!(built, Some(None)) {
        tracing::info!("computing usage roll-ups of the windows stored before them (once)");
        let windows = rebuild(conn, now)?;
        tracing::info!(windows, "usage roll-ups computed");
    }
    Ok(())
}

/// The roll-ups the raw windows give against the stored ones, both read in one snapshot (a
/// read transaction on `conn`, a reader: ingest may go on meanwhile).
pub(in crate::store::sqlite) fn check(
    conn: &mut Connection,
) -> Result<Vec<crate::fleet::rollup::check::TableCheck>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(db_error)?;
    let mut expected = Rollups::default();
    fold_windows(&tx, usize::MAX, &mut expected, |_| Ok(()))?;
    expected.finish_peaks();
    let stored = read_rollups(&tx, None, Tables::All, Segments::All)?;
    let pruned_before: Option<i64> =
        tx.query_row("SELECT pruned_before FROM rollup_state", [], |r| r.get(0)).map_err(db_error)?;
    tx.commit().map_err(db_error)?;
    Ok(crate::fleet::rollup::check::compare(&expected, &stored, pruned_before))
}
