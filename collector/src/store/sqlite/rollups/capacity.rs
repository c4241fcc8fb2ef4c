//! The SQLite capacity rows ([`crate::fleet::rollup::capacity`]: one row per subject, cluster
//! and hour): each hour row a batch touches is read, merged in memory and written back, in
//! the batch's write transaction.

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::fleet::rollup::apply::Bucket;
use crate::fleet::rollup::capacity;
use crate::store::error::StoreError;
use crate::store::sqlite::driver::db_error;

/// [`crate::fleet::rollup::apply::RollupTx::add_capacity`]: two statements per hour row.
pub(super) fn add(conn: &Connection, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
    let mut read = conn
        .prepare_cached(
            "SELECT flops FROM rollup_capacity
             WHERE tenant = ?1 AND subject_host = ?2 AND subject_workload = ?3 AND cluster = ?4 AND hour = ?5",
        )
        .map_err(db_error)?;
    let mut write = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO rollup_capacity (tenant, subject_host, subject_workload, cluster, hour, flops)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(db_error)?;
    let mut values = vec![0.0; buckets.len()];
    for row in capacity::hour_rows(buckets) {
        let s = row.subject;
        let stored: Option<Vec<u8>> = read
            .query_row(params![s.tenant, s.host_id, s.workload, row.cluster, row.hour], |r| r.get(0))
            .optional()
            .map_err(db_error)?;
        let flops = row.merge(stored.as_deref(), &mut values)?;
        write
            .execute(params![s.tenant, s.host_id, s.workload, row.cluster, row.hour, flops])
            .map_err(db_error)?;
    }
    Ok(values)
}
