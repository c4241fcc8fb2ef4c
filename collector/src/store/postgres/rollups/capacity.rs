//! The PostgreSQL capacity rows ([`crate::fleet::rollup::capacity`]: one row per subject,
//! cluster and hour): a batch reads the hour rows it touches in one statement, merges them
//! in memory and writes them back in one. The subjects' `rollup_subjects` row locks, taken
//! earlier in the batch's transaction, keep another collector off these rows meanwhile.

use std::collections::HashMap;

use postgres::{Client, Statement};

use super::{key_columns, PgRollups, KEY};
use crate::fleet::rollup::apply::Bucket;
use crate::fleet::rollup::capacity;
use crate::store::error::StoreError;
use crate::store::postgres::driver::get;

/// The two statements of [`add`].
pub(in crate::store::postgres) struct CapacityStatements {
    read: Statement,
    write: Statement,
}

impl CapacityStatements {
    pub(super) fn prepare(client: &mut Client) -> Result<Self, postgres::Error> {
        Ok(CapacityStatements {
            read: client.prepare(&format!(
                "SELECT {KEY}, cluster, hour, flops FROM rollup_capacity
                 WHERE ({KEY}, cluster, hour) IN
                     (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]))"
            ))?,
            write: client.prepare(&format!(
                "INSERT INTO rollup_capacity ({KEY}, cluster, hour, flops)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bytea[])
                 ON CONFLICT ({KEY}, cluster, hour) DO UPDATE SET flops = excluded.flops"
            ))?,
        })
    }
}

type RowKey = (String, String, String, String, i64);

/// [`crate::fleet::rollup::apply::RollupTx::add_capacity`]: two statements per batch.
pub(super) fn add(ops: &mut PgRollups<'_, '_>, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
    if buckets.is_empty() {
        return Ok(Vec::new());
    }
    let rows = capacity::hour_rows(buckets);
    let [t, h, w] = key_columns(&rows, |r| r.subject);
    let clusters: Vec<&str> = rows.iter().map(|r| r.cluster).collect();
    let hours: Vec<i64> = rows.iter().map(|r| r.hour).collect();
    let result = ops.tx.query(&ops.st.capacity.read, &[&t, &h, &w, &clusters, &hours]);
    let mut stored: HashMap<RowKey, Vec<u8>> = HashMap::new();
    for r in ops.run(result)? {
        stored.insert((get(&r, 0)?, get(&r, 1)?, get(&r, 2)?, get(&r, 3)?, get(&r, 4)?), get(&r, 5)?);
    }
    let mut values = vec![0.0; buckets.len()];
    let mut flops: Vec<Vec<u8>> = Vec::with_capacity(rows.len());
    for row in &rows {
        let s = row.subject;
        let key = (s.tenant.clone(), s.host_id.clone(), s.workload.clone(), row.cluster.to_owned(), row.hour);
        flops.push(row.merge(stored.get(&key).map(Vec::as_slice), &mut values)?);
    }
    let result = ops.tx.execute(&ops.st.capacity.write, &[&t, &h, &w, &clusters, &hours, &flops]);
    ops.run(result)?;
    Ok(values)
}
