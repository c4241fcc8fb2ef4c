//! Reports and hosts on SQLite ([`ReportStore`]): enrollment with epochs, idempotent batch
//! inserts, the acked-seq cache and rejected batches.
//!
//!
//! Acked seq: `host_progress.acked_seq` caches the highest contiguous stored seq. After each
//! insert it is advanced by walking forward over stored ranges from the cached value (one
//! index range scan that stops at the first gap), so a request never scans all of a host's
//! rows.

use kycd_protocol::PublicKey;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::driver::{db_error, to_i64};
use super::SqliteStore;
use crate::store::error::StoreError;
use crate::store::reports::{
    Enrollment, HostEntry, Rejection, ReportStore, ValidRecord, REJECTIONS_PER_HOST,
};
use crate::store::schema::{parse_key, to_u64, truncate_detail};

/// it), so a batch that extends the prefix costs one index probe, not a row read per record.
/// Advances the cached acked seq of `(host_id, epoch)` over contiguous stored ranges; returns
/// it. `batch` are the ranges just stored (by seq): the walk first crosses them in memory,
/// and only then reads on from the table (where earlier out-of-order batches may continue
/// it), so a batch that extends the prefix costs one index probe, not a row read per record.
fn advance_ack(
    tx: &rusqlite::Transaction<'_>,
    host_id: &str,
    epoch: i64,
    batch: &[ValidRecord],
) -> Result<u64, StoreError> {
    let cached: Option<i64> = tx
        .prepare_cached("SELECT acked_seq FROM host_progress WHERE host_id = ?1 AND epoch = ?2")
        .and_then(|mut s| s.query_row(params![host_id, epoch], |r| r.get(0)).optional())
        .map_err(db_error)?;
    let mut acked = cached.unwrap_or(0);
    for valid in batch {
        let seq = to_i64(valid.record.seq)?;
        if seq > acked.saturating_add(1) {
            break;
        }
        acked = acked.max(to_i64(valid.last_seq)?);
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT seq, last_seq FROM records WHERE host_id = ?1 AND epoch = ?2 AND seq > ?3
                 ORDER BY seq",
            )
            .map_err(db_error)?;
        let mut rows = stmt.query(params![host_id, epoch, acked]).map_err(db_error)?;
        while let Some(row) = rows.next().map_err(db_error)? {
            let seq: i64 = row.get(0).map_err(db_error)?;
            if seq != acked.saturating_add(1) {
                break;
            }
            acked = row.get(1).map_err(db_error)?;
        }
    }
    if cached != Some(acked) {
        tx.prepare_cached(
            "INSERT INTO host_progress (host_id, epoch, acked_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (host_id, epoch) DO UPDATE SET acked_seq = excluded.acked_seq",
        )
        .and_then(|mut s| s.execute(params![host_id, epoch, acked]))
        .map_err(db_error)?;
    }
    to_u64(acked)
}

/// The stored records of `(host_id, epoch)` that intersect `[first, last]`, by seq (for the
/// text of a conflict): from the greatest seq at or below `first` (ranges never overlap, so
/// no earlier one reaches it) up to `last`.
fn conflicting_ranges(
    tx: &rusqlite::Transaction<'_>,
    host_id: &str,
    epoch: i64,
    first: i64,
    last: i64,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT seq, last_seq FROM records
             WHERE host_id = ?1 AND epoch = ?2 AND seq <= ?4 AND last_seq >= ?3 AND seq >= COALESCE(
                 (SELECT MAX(seq) FROM records WHERE host_id = ?1 AND epoch = ?2 AND seq <= ?3), ?3)
             ORDER BY seq",
        )
        .map_err(db_error)?;
    let rows = stmt
        .query_map(params![host_id, epoch, first, last], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(db_error)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, last_seq) = row.map_err(db_error)?;
        out.push((to_u64(seq)?, to_u64(last_seq)?));
    }
    Ok(out)
}

impl ReportStore for SqliteStore {
    fn enrollment(&self, host_id: &str) -> Result<Option<Enrollment>, StoreError> {
        let conn = self.lock()?;
        let row: Option<(String, i64, i64)> = conn
            .prepare_cached(
                "SELECT h.public_jwk, h.epoch, COALESCE(e.enrolled_at, h.enrolled_at)
                 FROM hosts h LEFT JOIN enrollments e USING (host_id, epoch) WHERE h.host_id = ?1",
            )
            .and_then(|mut s| s.query_row([host_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
            .map_err(db_error)?;
        row.map(|(jwk, epoch, enrolled_at)| {
            Ok(Enrollment { public_key: parse_key(host_id, &jwk)?, epoch: to_u64(epoch)?, enrolled_at })
        })
        .transpose()
    }

    fn enroll_host(&self, host_id: &str, key: &PublicKey, enrolled_at: i64) -> Result<u64, StoreError> {
        let jwk = key.to_jwk();
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        let enrolled: Option<i64> = tx
            .query_row("SELECT 1 FROM hosts WHERE host_id = ?1", [host_id], |r| r.get(0))
            .optional()
            .map_err(db_error)?;
        if enrolled.is_some() {
            return Err(StoreError::AlreadyEnrolled(host_id.to_owned()));
        }
        // The epoch this key had (re-enrolling the same agent continues its numbering), else
        // one above every epoch the host id had, enrolled or only seen in stored records.
        let mut known = None;
        {
            let mut stmt = tx
                .prepare("SELECT epoch, public_jwk FROM enrollments WHERE host_id = ?1")
                .map_err(db_error)?;
            let rows = stmt
                .query_map([host_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(db_error)?;
            for row in rows {
                let (epoch, stored) = row.map_err(db_error)?;
                if parse_key(host_id, &stored)?.to_jwk() == jwk {
                    known = Some(epoch);
                }
            }
        }
        let epoch = match known {
            Some(epoch) => epoch,
            None => {
                let highest: i64 = tx
                    .query_row(
                        "SELECT MAX(COALESCE((SELECT MAX(epoch) FROM enrollments WHERE host_id = ?1), 0),
                                    COALESCE((SELECT MAX(epoch) FROM host_progress WHERE host_id = ?1), 0))",
                        [host_id],
                        |r| r.get(0),
                    )
                    .map_err(db_error)?;
                let epoch = highest.saturating_add(1);
                tx.execute(
                    "INSERT INTO enrollments (host_id, epoch, public_jwk, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
                    params![host_id, epoch, jwk.to_string(), enrolled_at],
                )
                .map_err(db_error)?;
                epoch
            }
        };
        tx.execute(
            "INSERT INTO hosts (host_id, public_jwk, enrolled_at, epoch) VALUES (?1, ?2, ?3, ?4)",
            params![host_id, jwk.to_string(), enrolled_at, epoch],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        to_u64(epoch)
    }

    fn remove_host(&self, host_id: &str) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        let removed = conn.execute("DELETE FROM hosts WHERE host_id = ?1", [host_id]).map_err(db_error)?;
        Ok(removed > 0)
    }

    fn list_hosts(&self) -> Result<Vec<HostEntry>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT h.host_id, h.public_jwk, h.enrolled_at, h.epoch, COALESCE(p.acked_seq, 0)
                 FROM hosts h LEFT JOIN host_progress p USING (host_id, epoch) ORDER BY h.host_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(db_error)?;
        let mut hosts = Vec::new();
        for row in rows {
            let (host_id, jwk, enrolled_at, epoch, acked): (String, String, i64, i64, i64) =
                row.map_err(db_error)?;
            let public_key = parse_key(&host_id, &jwk)?;
            hosts.push(HostEntry {
                host_id,
                public_key,
                enrolled_at,
                epoch: to_u64(epoch)?,
                acked_seq: to_u64(acked)?,
            });
        }
        Ok(hosts)
    }

    fn insert_batch(
        &self,
        host_id: &str,
        epoch: u64,
        records: &[ValidRecord],
        received_at: i64,
    ) -> Result<u64, StoreError> {
        let epoch = to_i64(epoch)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        {
            let mut find = tx
                .prepare_cached(
                    "SELECT seq, last_seq, body_json FROM records
                     WHERE host_id = ?1 AND epoch = ?2 AND seq <= ?3 ORDER BY seq DESC LIMIT 1",
                )
                .map_err(db_error)?;
            let mut insert = tx
                .prepare_cached(
                    r#"INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at,
                        ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds)
                       VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                               ?20, ?21, ?22, ?23)"#,
                )
                .map_err(db_error)?;
            // The end of the epoch's highest stored range: records above it (the common case,
            // a batch of new records) cannot collide and need no lookup.
            let stored_end: i64 = tx
                .prepare_cached(
                    "SELECT last_seq FROM records WHERE host_id = ?1 AND epoch = ?2 ORDER BY seq DESC LIMIT 1",
                )
                .and_then(|mut s| s.query_row(params![host_id, epoch], |r| r.get(0)).optional())
                .map_err(db_error)?
                .unwrap_or(0);
            let mut rollups = crate::fleet::rollup::Rollups::default();
            let cluster =
                if self.rollups { super::rollups::host_cluster(&tx, host_id)? } else { String::new() };
            for valid in records {
                let seq = to_i64(valid.record.seq)?;
                let last_seq = to_i64(valid.last_seq)?;
                // Stored ranges never overlap, so the stored record with the greatest seq at
                // or below our last seq is the only one that can intersect our range.
                let existing: Option<(i64, i64, String)> = if seq > stored_end {
                    None
                } else {
                    find.query_row(params![host_id, epoch, last_seq], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()
                    .map_err(db_error)?
                };
                if let Some((stored_seq, stored_last, body)) = existing {
                    if stored_seq == seq && stored_last == last_seq && body == valid.body_json {
                        continue; // re-sent, identical: already stored
                    }
                    if stored_last >= seq {
                        return Err(StoreError::SeqConflict {
                            first: valid.record.seq,
                            last: valid.last_seq,
                            stored: conflicting_ranges(&tx, host_id, epoch, seq, last_seq)?,
                        });
                    }
                }
                let w = &valid.record.window;
                insert
                    .execute(params![
                        host_id,
                        epoch,
                        seq,
                        last_seq,
                        w.tenant,
                        w.workload,
                        w.start,
                        w.end,
                        w.gpu_seconds,
                        w.gpus,
                        w.max_concurrent_gpus,
                        w.estimated_ops,
                        w.peak_flops,
                        w.method.as_str(),
                        w.training_like,
                        w.tenant_counts_as_foreign(),
                        w.merged_windows,
                        valid.body_json,
                        received_at,
                        // An old agent's window has no bounds: they are its estimate.
                        w.lower_ops(),
                        w.upper_ops(),
                        w.shared_gpu_seconds,
                        w.guest_gap_gpu_seconds,
                    ])
                    .map_err(db_error)?;
                rollups.add(&crate::fleet::rollup::window_row(host_id, w), &cluster);
            }
            // The roll-ups move with the windows, in their transaction (issue 20).
            if self.rollups {
                crate::fleet::rollup::apply::apply(
                    &rollups,
                    &mut super::rollups::SqliteRollups(&tx),
                    received_at,
                )?;
            }
        }
        let acked = advance_ack(&tx, host_id, epoch, records)?;
        tx.commit().map_err(db_error)?;
        Ok(acked)
    }

    fn acked_seq(&self, host_id: &str, epoch: u64) -> Result<u64, StoreError> {
        let epoch = to_i64(epoch)?;
        let conn = self.lock()?;
        let acked: Option<i64> = conn
            .prepare_cached("SELECT acked_seq FROM host_progress WHERE host_id = ?1 AND epoch = ?2")
            .and_then(|mut s| s.query_row(params![host_id, epoch], |r| r.get(0)).optional())
            .map_err(db_error)?;
        to_u64(acked.unwrap_or(0))
    }

    fn stored_ranges(&self, host_id: &str, epoch: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let epoch = to_i64(epoch)?;
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare("SELECT seq, last_seq FROM records WHERE host_id = ?1 AND epoch = ?2 ORDER BY seq")
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![host_id, epoch], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, last) = row.map_err(db_error)?;
            out.push((to_u64(seq)?, to_u64(last)?));
        }
        Ok(out)
    }

    fn record_rejection(&self, rejection: &Rejection) -> Result<(), StoreError> {
        let seqs = match rejection.seqs {
            Some((first, last)) => (Some(to_i64(first)?), Some(to_i64(last)?)),
            None => (None, None),
        };
        let epoch = to_i64(rejection.epoch)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        tx.prepare_cached(
            "INSERT INTO rejections (host_id, epoch, kind, detail, first_seq, last_seq, rejected_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                rejection.host_id,
                epoch,
                rejection.kind,
                truncate_detail(&rejection.detail),
                seqs.0,
                seqs.1,
                rejection.rejected_at
            ])
        })
        .map_err(db_error)?;
        // Keep the newest REJECTIONS_PER_HOST of the host: one index range delete.
        tx.prepare_cached(
            "DELETE FROM rejections WHERE host_id = ?1 AND id <=
                 (SELECT id FROM rejections WHERE host_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )
        .and_then(|mut s| s.execute(params![rejection.host_id, REJECTIONS_PER_HOST]))
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::record;

    #[test]
    fn overlap_with_a_stored_merged_record_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("db")).unwrap();
        assert_eq!(store.insert_batch("h", 1, &[record(2, Some(4))], 0).unwrap(), 0);
        for overlapping in [record(3, None), record(4, None), record(1, Some(2)), record(2, Some(3))] {
            assert!(matches!(
                store.insert_batch("h", 1, &[overlapping], 0),
                Err(StoreError::SeqConflict { .. })
            ));
        }
        assert_eq!(store.insert_batch("h", 1, &[record(2, Some(4))], 0).unwrap(), 0, "identical re-send");
        assert_eq!(store.insert_batch("h", 1, &[record(1, None), record(5, None)], 0).unwrap(), 5);
        assert_eq!(store.stored_ranges("h", 1).unwrap(), [(1, 1), (2, 4), (5, 5)]);
    }
}
