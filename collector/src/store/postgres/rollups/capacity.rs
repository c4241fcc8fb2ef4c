//! The PostgreSQL capacity rows ([`crate::fleet::rollup::capacity`]: one row per subject,
//! cluster and hour): `flops` is the hour's 60 minute buckets as a `float8[]`, NULL where a
//! minute has none. A batch's hour rows go in one upsert that adds the batch's array to the
//! stored one element by element (saturating, as every sum) and returns the new arrays: one
//! statement a batch, as for every other roll-up table. The batch's buckets in key order and
//! the subjects' `rollup_subjects` row locks, taken first, order the row locks.

use std::collections::HashMap;

use postgres::{Client, Statement};

use super::{key_columns, PgRollups, KEY, MAX};
use crate::fleet::rollup::apply::Bucket;
use crate::fleet::rollup::capacity::{self, MINUTES};
use crate::store::error::StoreError;
use crate::store::postgres::driver::get;

/// The upsert of [`add`].
pub(in crate::store::postgres) struct CapacityStatements {
    add: Statement,
}

impl CapacityStatements {
    pub(super) fn prepare(client: &mut Client) -> Result<Self, postgres::Error> {
        // Row n of the key arrays takes elements (n-1)*60+1 ..= n*60 of the flat array $6.
        Ok(CapacityStatements {
            add: client.prepare(&format!(
                "INSERT INTO rollup_capacity AS r ({KEY}, cluster, hour, flops)
                 SELECT k.t, k.h, k.w, k.c, k.hour, ($6::float8[])[(k.n - 1) * {MINUTES} + 1 : k.n * {MINUTES}]
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                     WITH ORDINALITY AS k(t, h, w, c, hour, n)
                 ON CONFLICT ({KEY}, cluster, hour) DO UPDATE SET flops = ARRAY(
                     SELECT CASE WHEN a IS NULL THEN b WHEN b IS NULL THEN a
                                 WHEN a > {MAX} - b THEN {MAX} ELSE a + b END
                     FROM unnest(r.flops, excluded.flops) WITH ORDINALITY AS u(a, b, i) ORDER BY i)
                 RETURNING {KEY}, cluster, hour, flops"
            ))?,
        })
    }
}

type RowKey = (String, String, String, String, i64);

/// [`crate::fleet::rollup::apply::RollupTx::add_capacity`]: one statement per batch.
pub(super) fn add(ops: &mut PgRollups<'_, '_>, buckets: &[Bucket<'_>]) -> Result<Vec<f64>, StoreError> {
    if buckets.is_empty() {
        return Ok(Vec::new());
    }
    let rows = capacity::hour_rows(buckets);
    let [t, h, w] = key_columns(&rows, |r| r.subject);
    let clusters: Vec<&str> = rows.iter().map(|r| r.cluster).collect();
    let hours: Vec<i64> = rows.iter().map(|r| r.hour).collect();
    let width = usize::try_from(MINUTES).unwrap_or(60);
    let mut flops: Vec<Option<f64>> = vec![None; rows.len() * width];
    for (n, row) in rows.iter().enumerate() {
        for (_, minute, value) in row.adds() {
            if let Some(slot) = flops.get_mut(n * width + row.slot(*minute)) {
                *slot = Some(*value);
            }
        }
    }
    let result = ops.tx.query(&ops.st.capacity.add, &[&t, &h, &w, &clusters, &hours, &flops]);
    // RETURNING follows no order: the new arrays by row, then each bucket's value.
    let mut stored: HashMap<RowKey, Vec<Option<f64>>> = HashMap::with_capacity(rows.len());
    for r in ops.run(result)? {
        stored.insert((get(&r, 0)?, get(&r, 1)?, get(&r, 2)?, get(&r, 3)?, get(&r, 4)?), get(&r, 5)?);
    }
    let mut values = vec![0.0; buckets.len()];
    for row in &rows {
        let s = row.subject;
        let key = (s.tenant.clone(), s.host_id.clone(), s.workload.clone(), row.cluster.to_owned(), row.hour);
        let array = stored
            .get(&key)
            .ok_or_else(|| StoreError::Corrupt(format!("capacity row {key:?} not returned")))?;
        for (index, minute, _) in row.adds() {
            let value = array.get(row.slot(*minute)).copied().flatten();
            let value = value
                .ok_or_else(|| StoreError::Corrupt(format!("capacity bucket {minute} of {key:?} empty")))?;
            if let Some(slot) = values.get_mut(*index) {
                *slot = value;
            }
        }
    }
    Ok(values)
}

/// The minute buckets of a stored row (`flops` as read).
pub(super) fn minutes(hour: i64, flops: &[Option<f64>]) -> Vec<(i64, f64)> {
    (0i64..)
        .zip(flops)
        .filter_map(|(i, value)| value.map(|v| (hour + i * crate::fleet::CAPACITY_BUCKET_S, v)))
        .collect()
}
