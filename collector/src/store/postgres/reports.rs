//! Reports and hosts on PostgreSQL ([`ReportStore`]): enrollment with epochs, batch inserts
//! serialised per host by an advisory lock, the acked-seq cache and rejected batches.

use kycd_protocol::PublicKey;
use postgres::error::SqlState;
use postgres::Client;

use super::driver::{get, pg_error, retryable, to_i64, Failed};
use super::rollups::PgRollups;
use super::{PgStore, Statements, ATTEMPTS, HOST_LOCK_CLASS};
use crate::fleet::rollup::apply::apply;
use crate::fleet::rollup::{window_row, Rollups};
use crate::store::error::StoreError;
use crate::store::reports::{
    Enrollment, HostEntry, Rejection, ReportStore, ValidRecord, REJECTIONS_PER_HOST,
};
use crate::store::schema::{parse_key, to_u64, truncate_detail};

/// The batch's records as UNNEST columns.
#[derive(Default)]
struct Columns<'a> {
    seq: Vec<i64>,
    last_seq: Vec<i64>,
    tenant: Vec<Option<&'a str>>,
    workload: Vec<&'a str>,
    start: Vec<i64>,
    end: Vec<i64>,
    gpu_seconds: Vec<f64>,
    gpus: Vec<i64>,
    max_concurrent_gpus: Vec<i64>,
    estimated_ops: Vec<f64>,
    peak_flops: Vec<f64>,
    method: Vec<&'static str>,
    training_like: Vec<bool>,
    foreign_person: Vec<bool>,
    merged_windows: Vec<i64>,
    body_json: Vec<&'a str>,
    ops_lower: Vec<f64>,
    ops_upper: Vec<f64>,
    shared_gpu_seconds: Vec<f64>,
    guest_gap_gpu_seconds: Vec<f64>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, valid: &'a ValidRecord) -> Result<(), StoreError> {
        let w = &valid.record.window;
        self.seq.push(to_i64(valid.record.seq)?);
        self.last_seq.push(to_i64(valid.last_seq)?);
        self.tenant.push(w.tenant.as_deref());
        self.workload.push(&w.workload);
        self.start.push(w.start);
        self.end.push(w.end);
        self.gpu_seconds.push(w.gpu_seconds);
        self.gpus.push(i64::from(w.gpus));
        self.max_concurrent_gpus.push(i64::from(w.max_concurrent_gpus));
        self.estimated_ops.push(w.estimated_ops);
        self.peak_flops.push(w.peak_flops);
        self.method.push(w.method.as_str());
        self.training_like.push(w.training_like);
        self.foreign_person.push(w.tenant_counts_as_foreign());
        self.merged_windows.push(i64::from(w.merged_windows));
        self.body_json.push(&valid.body_json);
        // An old agent's window has no bounds: they are its estimate.
        self.ops_lower.push(w.lower_ops());
        self.ops_upper.push(w.upper_ops());
        self.shared_gpu_seconds.push(w.shared_gpu_seconds);
        self.guest_gap_gpu_seconds.push(w.guest_gap_gpu_seconds);
        Ok(())
    }
}

impl PgStore {
    fn insert_once(
        client: &mut Client,
        stmts: &Statements,
        host_id: &str,
        epoch: i64,
        records: &[ValidRecord],
        received_at: i64,
    ) -> Result<u64, Failed> {
        let mut tx = client.transaction()?;
        tx.execute(&stmts.lock_host, &[&HOST_LOCK_CLASS, &host_id])?;
        let state = tx.query_one(&stmts.state, &[&host_id, &epoch])?;
        let cached: Option<i64> = get(&state, 0)?;
        // The end of the host's highest stored range: records above it (the common case, a
        // batch of new records) cannot collide and need no lookup.
        let stored_end: i64 = get::<Option<i64>>(&state, 1)?.unwrap_or(0);

        let mut new = Columns::default();
        let mut inserted: Vec<&ValidRecord> = Vec::new();
        // Records at or below the stored end (re-sent or filling gaps) are compared with
        // what is stored around them, fetched in one query.
        let old: Vec<&ValidRecord> =
            records.iter().filter(|v| to_i64(v.record.seq).is_ok_and(|s| s <= stored_end)).collect();
        let stored: Vec<(i64, i64, String)> = match (old.first(), old.iter().map(|v| v.last_seq).max()) {
            (Some(lo), Some(hi)) => tx
                .query(&stmts.stored_around, &[&host_id, &to_i64(lo.record.seq)?, &to_i64(hi)?, &epoch])?
                .iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
                .collect::<Result<_, StoreError>>()?,
            _ => Vec::new(),
        };
        for valid in records {
            let seq = to_i64(valid.record.seq)?;
            let last_seq = to_i64(valid.last_seq)?;
            if seq <= stored_end {
                // Stored ranges never overlap, so the stored record with the greatest seq at
                // or below our last seq is the only one that can intersect our range.
                let below = stored.partition_point(|(s, _, _)| *s <= last_seq);
                if let Some((stored_seq, stored_last, body)) =
                    below.checked_sub(1).and_then(|i| stored.get(i))
                {
                    if *stored_seq == seq && *stored_last == last_seq && *body == valid.body_json {
                        continue; // re-sent, identical: already stored
                    }
                    if *stored_last >= seq {
                        // `stored` holds every stored record that can intersect this one.
                        let hit = stored
                            .iter()
                            .filter(|(s, l, _)| *s <= last_seq && *l >= seq)
                            .map(|(s, l, _)| Ok((to_u64(*s)?, to_u64(*l)?)))
                            .collect::<Result<Vec<_>, StoreError>>()?;
                        return Err(StoreError::SeqConflict {
                            first: valid.record.seq,
                            last: valid.last_seq,
                            stored: hit,
                        }
                        .into());
                    }
                }
            }
            new.push(valid)?;
            inserted.push(valid);
        }
        if !new.seq.is_empty() {
            let inserted = tx.execute(
                &stmts.insert,
                &[
                    &host_id,
                    &new.seq,
                    &new.last_seq,
                    &new.tenant,
                    &new.workload,
                    &new.start,
                    &new.end,
                    &new.gpu_seconds,
                    &new.gpus,
                    &new.max_concurrent_gpus,
                    &new.estimated_ops,
                    &new.peak_flops,
                    &new.method,
                    &new.training_like,
                    &new.foreign_person,
                    &new.merged_windows,
                    &new.body_json,
                    &received_at,
                    &epoch,
                    &new.ops_lower,
                    &new.ops_upper,
                    &new.shared_gpu_seconds,
                    &new.guest_gap_gpu_seconds,
                ],
            )?;
            if usize::try_from(inserted).ok() != Some(new.seq.len()) {
                // Only a writer that bypasses the host lock can get here; the rows it stored
                // are compared on the next attempt.
                return Err(Failed::Store(StoreError::Busy));
            }
        }
        // The roll-ups move with the windows, in their transaction (issue 20).
        if let (false, Some(st)) = (inserted.is_empty(), &stmts.rollups) {
            let mut ops = PgRollups { tx: &mut tx, st, failed: None };
            let applied = ops.host_cluster(host_id).and_then(|cluster| {
                let mut rollups = Rollups::default();
                for valid in &inserted {
                    rollups.add(&window_row(host_id, &valid.record.window), &cluster);
                }
                apply(&rollups, &mut ops, received_at)
            });
            if let Err(e) = applied {
                return Err(ops.failed.take().map_or(Failed::Store(e), Failed::Pg));
            }
        }
        // Advance the acked seq: first across the batch in memory, then on in the table
        // (where earlier out-of-order batches may continue it).
        let mut acked = cached.unwrap_or(0);
        for valid in records {
            let seq = to_i64(valid.record.seq)?;
            if seq > acked.saturating_add(1) {
                break;
            }
            acked = acked.max(to_i64(valid.last_seq)?);
        }
        let walked = tx.query_one(&stmts.walk, &[&host_id, &acked, &epoch])?;
        let acked: i64 = get::<Option<i64>>(&walked, 0)?.unwrap_or(acked);
        if cached != Some(acked) {
            tx.execute(&stmts.set_acked, &[&host_id, &acked, &epoch])?;
        }
        tx.commit()?;
        Ok(to_u64(acked)?)
    }
}

impl ReportStore for PgStore {
    fn enrollment(&self, host_id: &str) -> Result<Option<Enrollment>, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let row = client
            .query_opt(
                "SELECT h.public_jwk, h.epoch, COALESCE(e.enrolled_at, h.enrolled_at)
                 FROM hosts h LEFT JOIN enrollments e USING (host_id, epoch) WHERE h.host_id = $1",
                &[&host_id],
            )
            .map_err(pg_error)?;
        row.map(|row| {
            let jwk: String = get(&row, 0)?;
            Ok(Enrollment {
                public_key: parse_key(host_id, &jwk)?,
                epoch: to_u64(get(&row, 1)?)?,
                enrolled_at: get(&row, 2)?,
            })
        })
        .transpose()
    }

    fn enroll_host(&self, host_id: &str, key: &PublicKey, enrolled_at: i64) -> Result<u64, StoreError> {
        let jwk = key.to_jwk();
        let text = jwk.to_string();
        let epoch = self.in_transaction("enroll host", |tx| {
            // Serialised with this host's ingest and other enrollments of it.
            tx.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2::text))", &[&HOST_LOCK_CLASS, &host_id])?;
            if tx.query_opt("SELECT 1 FROM hosts WHERE host_id = $1", &[&host_id])?.is_some() {
                return Err(StoreError::AlreadyEnrolled(host_id.to_owned()).into());
            }
            // The epoch this key had (re-enrolling the same agent continues its numbering),
            // else one above every epoch the host id had, enrolled or only seen in records.
            let mut known = None;
            for row in tx.query("SELECT epoch, public_jwk FROM enrollments WHERE host_id = $1", &[&host_id])? {
                let stored: String = get(&row, 1)?;
                if parse_key(host_id, &stored)?.to_jwk() == jwk {
                    known = Some(get::<i64>(&row, 0)?);
                }
            }
            let epoch = match known {
                Some(epoch) => epoch,
                None => {
                    let row = tx.query_one(
                        "SELECT GREATEST(
                             COALESCE((SELECT max(epoch) FROM enrollments WHERE host_id = $1), 0),
                             COALESCE((SELECT max(epoch) FROM host_progress WHERE host_id = $1), 0))",
                        &[&host_id],
                    )?;
                    let epoch = get::<i64>(&row, 0)?.saturating_add(1);
                    tx.execute(
                        "INSERT INTO enrollments (host_id, epoch, public_jwk, enrolled_at) VALUES ($1, $2, $3, $4)",
                        &[&host_id, &epoch, &text, &enrolled_at],
                    )?;
                    epoch
                }
            };
            tx.execute(
                "INSERT INTO hosts (host_id, public_jwk, enrolled_at, epoch) VALUES ($1, $2, $3, $4)",
                &[&host_id, &text, &enrolled_at, &epoch],
            )?;
            Ok(epoch)
        });
        match epoch {
            Err(StoreError::Database(e))
                if e.downcast_ref::<postgres::Error>().and_then(postgres::Error::code)
                    == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                Err(StoreError::AlreadyEnrolled(host_id.to_owned()))
            }
            other => to_u64(other?),
        }
    }

    fn remove_host(&self, host_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let removed =
            client.execute("DELETE FROM hosts WHERE host_id = $1", &[&host_id]).map_err(pg_error)?;
        Ok(removed > 0)
    }

    fn list_hosts(&self) -> Result<Vec<HostEntry>, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let rows = client
            .query(
                "SELECT h.host_id, h.public_jwk, h.enrolled_at, h.epoch, COALESCE(p.acked_seq, 0)
                 FROM hosts h LEFT JOIN host_progress p USING (host_id, epoch) ORDER BY h.host_id",
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|row| {
                let host_id: String = get(row, 0)?;
                let jwk: String = get(row, 1)?;
                let public_key = parse_key(&host_id, &jwk)?;
                Ok(HostEntry {
                    host_id,
                    public_key,
                    enrolled_at: get(row, 2)?,
                    epoch: to_u64(get(row, 3)?)?,
                    acked_seq: to_u64(get(row, 4)?)?,
                })
            })
            .collect()
    }

    fn insert_batch(
        &self,
        host_id: &str,
        epoch: u64,
        records: &[ValidRecord],
        received_at: i64,
    ) -> Result<u64, StoreError> {
        let epoch = to_i64(epoch)?;
        let mut conn = self.checkout()?;
        let (client, stmts) = conn.parts()?;
        let mut attempt = 1;
        loop {
            match Self::insert_once(client, stmts, host_id, epoch, records, received_at) {
                Ok(acked) => return Ok(acked),
                Err(Failed::Pg(e)) if retryable(&e) && attempt < ATTEMPTS => {
                    tracing::debug!(host = host_id, attempt, error = %e, "retrying batch insert");
                    attempt += 1;
                }
                Err(Failed::Pg(e)) if super::partitions::no_partition(&e) && attempt < ATTEMPTS => {
                    // A window of a month without a partition: make it, then try again.
                    let ends: Vec<i64> = records.iter().map(|v| v.record.window.end).collect();
                    super::partitions::ensure_partitions(client, &ends)
                        .map_err(super::partitions::store_error)?;
                    attempt += 1;
                }
                Err(Failed::Store(StoreError::Busy)) if attempt < ATTEMPTS => attempt += 1,
                Err(Failed::Pg(e)) => return Err(pg_error(e)),
                Err(Failed::Store(e)) => return Err(e),
            }
        }
    }

    fn acked_seq(&self, host_id: &str, epoch: u64) -> Result<u64, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let row = client
            .query_opt(
                "SELECT acked_seq FROM host_progress WHERE host_id = $1 AND epoch = $2",
                &[&host_id, &to_i64(epoch)?],
            )
            .map_err(pg_error)?;
        match row {
            Some(row) => to_u64(get(&row, 0)?),
            None => Ok(0),
        }
    }

    fn stored_ranges(&self, host_id: &str, epoch: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let rows = client
            .query(
                "SELECT seq, last_seq FROM records WHERE host_id = $1 AND epoch = $2 ORDER BY seq",
                &[&host_id, &to_i64(epoch)?],
            )
            .map_err(pg_error)?;
        rows.iter().map(|row| Ok((to_u64(get(row, 0)?)?, to_u64(get(row, 1)?)?))).collect()
    }

    fn record_rejection(&self, rejection: &Rejection) -> Result<(), StoreError> {
        let epoch = to_i64(rejection.epoch)?;
        let (first, last) = match rejection.seqs {
            Some((first, last)) => (Some(to_i64(first)?), Some(to_i64(last)?)),
            None => (None, None),
        };
        let detail = truncate_detail(&rejection.detail);
        let keep = i64::from(REJECTIONS_PER_HOST);
        self.in_transaction("record rejection", |tx| {
            tx.execute(
                "INSERT INTO rejections (host_id, epoch, kind, detail, first_seq, last_seq, rejected_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &rejection.host_id,
                    &epoch,
                    &rejection.kind,
                    &detail,
                    &first,
                    &last,
                    &rejection.rejected_at,
                ],
            )?;
            // Keep the newest REJECTIONS_PER_HOST of the host: one index range delete.
            tx.execute(
                "DELETE FROM rejections WHERE host_id = $1 AND id <=
                     (SELECT id FROM rejections WHERE host_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
                &[&rejection.host_id, &keep],
            )?;
            Ok(())
        })
    }
}
