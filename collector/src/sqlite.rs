//! The SQLite backend of [`ReportStore`]: one database file in WAL mode.
//!
//! Durability: `synchronous=FULL`. An ack tells the agent it may delete the acked records
//! from its spool, so a committed batch must survive a power loss, not only a crash of the
//! collector process; with `NORMAL` in WAL mode the last commits can roll back on power loss
//! after they were acked, and those records would be lost on both sides. FULL costs one
//! fsync of the WAL per commit, i.e. per batch, which batching amortises.
//!
//! Concurrency: one connection behind a mutex. SQLite has one writer at a time anyway; the
//! mutex keeps this process's writers from contending on the file lock, and the busy
//! timeout covers other processes (e.g. `kycd-collector hosts add` while `serve` runs).
//! Callers run these blocking calls off the async reactor.
//!
//! Schema: migrations are ordered SQL strings in [`MIGRATIONS`]; `PRAGMA user_version` is the
//! number applied. Opening applies the missing ones in one transaction, so a database is
//! either wholly at the old version or wholly at the new one.
//!
//! Acked seq: `host_progress.acked_seq` caches the highest contiguous stored seq. After each
//! insert it is advanced by walking forward over stored ranges from the cached value (one
//! index range scan that stops at the first gap), so a request never scans all of a host's
//! rows.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use kycd_protocol::{EstimationMethod, PublicKey};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::store::{
    Enrollment, HostEntry, Rejection, ReportStore, StoreError, ValidRecord, REJECTIONS_PER_HOST,
};

/// How long a writer waits for another process's lock before the call fails as busy.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, in order; `PRAGMA user_version` = how many are applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: hosts and records.
    r#"
    CREATE TABLE hosts (
        host_id     TEXT PRIMARY KEY NOT NULL,
        public_jwk  TEXT NOT NULL,
        enrolled_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE records (
        host_id             TEXT NOT NULL,
        seq                 INTEGER NOT NULL,
        last_seq            INTEGER NOT NULL,
        tenant              TEXT,
        workload            TEXT NOT NULL,
        start               INTEGER NOT NULL,
        "end"               INTEGER NOT NULL,
        gpu_seconds         REAL NOT NULL,
        gpus                INTEGER NOT NULL,
        max_concurrent_gpus INTEGER NOT NULL,
        estimated_ops       REAL NOT NULL,
        peak_flops          REAL NOT NULL,
        method              TEXT NOT NULL,
        training_like       INTEGER NOT NULL,
        foreign_person      INTEGER NOT NULL,
        merged_windows      INTEGER NOT NULL,
        body_json           TEXT NOT NULL,
        received_at         INTEGER NOT NULL,
        UNIQUE (host_id, seq)
    ) STRICT;
    CREATE INDEX records_tenant_start ON records (tenant, start);
    "#,
    // 2: the per-host acked-seq cache, backfilled from the records already stored.
    r#"
    CREATE TABLE host_progress (
        host_id   TEXT PRIMARY KEY NOT NULL,
        acked_seq INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    INSERT INTO host_progress (host_id, acked_seq)
    WITH RECURSIVE walk (host_id, acked) AS (
        SELECT DISTINCT host_id, 0 FROM records
        UNION ALL
        SELECT w.host_id, r.last_seq FROM walk w
        JOIN records r ON r.host_id = w.host_id AND r.seq = w.acked + 1
    )
    SELECT host_id, MAX(acked) FROM walk GROUP BY host_id;
    "#,
    // 3: the fleet view — published policies, tenant identities from host statements,
    // findings (at most one open per kind and subject), and the per-host report time index
    // dark-host detection reads.
    r#"
    CREATE TABLE policies (
        version      INTEGER PRIMARY KEY NOT NULL,
        token        TEXT NOT NULL,
        claims_json  TEXT NOT NULL,
        published_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE tenant_identities (
        tenant          TEXT PRIMARY KEY NOT NULL,
        legal_name      TEXT NOT NULL,
        countries       TEXT NOT NULL,
        owner_countries TEXT NOT NULL,
        foreign_person  INTEGER NOT NULL,
        seen_at         INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE findings (
        id             INTEGER PRIMARY KEY,
        kind           TEXT NOT NULL,
        subject        TEXT NOT NULL,
        tenant         TEXT,
        host_id        TEXT,
        foreign_person INTEGER,
        summary        TEXT NOT NULL,
        evidence_json  TEXT NOT NULL,
        state          TEXT NOT NULL,
        raised_at      INTEGER NOT NULL,
        resolved_at    INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX findings_open ON findings (kind, subject) WHERE state = 'open';
    CREATE INDEX findings_tenant ON findings (tenant);
    CREATE INDEX records_host_received ON records (host_id, received_at);
    "#,
    // 4: agent polling (see crate::sqlite_statements).
    crate::sqlite_statements::MIGRATION_POLLING,
    // 5: enrollment epochs and rejected batches.
    MIGRATION_EPOCHS,
];

/// Step 5: enrollment epochs (see [`crate::store`]) and rejected batches.
///
/// - `hosts.epoch`: the epoch of the current enrollment; `enrollments`: every (host id,
///   epoch) ever enrolled, with its key and when the epoch began. Existing enrollments
///   become epoch 1.
/// - `records` and `host_progress` are keyed by `(host_id, epoch, seq)` and
///   `(host_id, epoch)`; existing rows are epoch 1. SQLite cannot drop a UNIQUE constraint,
///   so `records` is rebuilt (copied in rowid order, one pass; a large database takes a
///   while once, inside the migration's transaction).
/// - `rejections`: permanently refused batches of authenticated hosts.
pub const MIGRATION_EPOCHS: &str = r#"
    ALTER TABLE hosts ADD COLUMN epoch INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE enrollments (
        host_id     TEXT NOT NULL,
        epoch       INTEGER NOT NULL,
        public_jwk  TEXT NOT NULL,
        enrolled_at INTEGER NOT NULL,
        PRIMARY KEY (host_id, epoch)
    ) STRICT;
    INSERT INTO enrollments (host_id, epoch, public_jwk, enrolled_at)
        SELECT host_id, 1, public_jwk, enrolled_at FROM hosts;

    CREATE TABLE records_v5 (
        host_id             TEXT NOT NULL,
        epoch               INTEGER NOT NULL,
        seq                 INTEGER NOT NULL,
        last_seq            INTEGER NOT NULL,
        tenant              TEXT,
        workload            TEXT NOT NULL,
        start               INTEGER NOT NULL,
        "end"               INTEGER NOT NULL,
        gpu_seconds         REAL NOT NULL,
        gpus                INTEGER NOT NULL,
        max_concurrent_gpus INTEGER NOT NULL,
        estimated_ops       REAL NOT NULL,
        peak_flops          REAL NOT NULL,
        method              TEXT NOT NULL,
        training_like       INTEGER NOT NULL,
        foreign_person      INTEGER NOT NULL,
        merged_windows      INTEGER NOT NULL,
        body_json           TEXT NOT NULL,
        received_at         INTEGER NOT NULL,
        UNIQUE (host_id, epoch, seq)
    ) STRICT;
    INSERT INTO records_v5 (host_id, epoch, seq, last_seq, tenant, workload, start, "end",
        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method, training_like,
        foreign_person, merged_windows, body_json, received_at)
    SELECT host_id, 1, seq, last_seq, tenant, workload, start, "end", gpu_seconds, gpus,
        max_concurrent_gpus, estimated_ops, peak_flops, method, training_like, foreign_person,
        merged_windows, body_json, received_at
    FROM records ORDER BY rowid;
    DROP TABLE records;
    ALTER TABLE records_v5 RENAME TO records;
    CREATE INDEX records_tenant_start ON records (tenant, start);
    CREATE INDEX records_host_received ON records (host_id, received_at);

    CREATE TABLE host_progress_v5 (
        host_id   TEXT NOT NULL,
        epoch     INTEGER NOT NULL,
        acked_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (host_id, epoch)
    ) STRICT;
    INSERT INTO host_progress_v5 (host_id, epoch, acked_seq)
        SELECT host_id, 1, acked_seq FROM host_progress;
    DROP TABLE host_progress;
    ALTER TABLE host_progress_v5 RENAME TO host_progress;

    CREATE TABLE rejections (
        id          INTEGER PRIMARY KEY,
        host_id     TEXT NOT NULL,
        epoch       INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        detail      TEXT NOT NULL,
        first_seq   INTEGER,
        last_seq    INTEGER,
        rejected_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX rejections_host ON rejections (host_id, id);
    CREATE INDEX rejections_at ON rejections (rejected_at);
"#;

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

pub(crate) fn db_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy,
        Some(
            code @ (ErrorCode::CannotOpen
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::ReadOnly
            | ErrorCode::OutOfMemory),
        ) => StoreError::Unavailable(format!("{code:?}")),
        _ => StoreError::Database(Box::new(e)),
    }
}

pub(crate) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{value} does not fit in an SQLite integer")))
}

pub(crate) fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative sequence number {value} stored")))
}

/// The wire name of an estimation method, as stored in `records.method`.
pub fn method_name(method: EstimationMethod) -> &'static str {
    match method {
        EstimationMethod::GpmTensor => "gpm_tensor",
        EstimationMethod::UtilizationUpperBound => "utilization_upper_bound",
        EstimationMethod::Unknown => "unknown",
    }
}

/// Applies the missing migrations of [`MIGRATIONS`] up to `target` in one transaction.
fn migrate(conn: &mut Connection, target: usize) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_error)?;
    let pending = crate::store::pending_migrations(MIGRATIONS, version, target)?;
    if pending.is_empty() {
        return Ok(());
    }
    for (version, sql) in pending {
        tx.execute_batch(sql).map_err(db_error)?;
        tracing::info!(version, "applied schema migration");
    }
    tx.pragma_update(None, "user_version", i64::try_from(target).unwrap_or(i64::MAX)).map_err(db_error)?;
    tx.commit().map_err(db_error)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(db_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "cannot switch {} to WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(db_error)?;
    conn.pragma_update(None, "cache_size", -65536).map_err(db_error)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode, and migrates it
    /// to the current schema.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_at_version(path, MIGRATIONS.len())
    }

    fn open_at_version(path: impl Into<PathBuf>, version: usize) -> Result<Self, StoreError> {
        let path = path.into();
        let mut conn = open_connection(&path)?;
        migrate(&mut conn, version)?;
        Ok(SqliteStore { path, conn: Mutex::new(conn) })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.lock()?.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_error)
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Unavailable("a database call panicked".into()))
    }
}

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

fn parse_key(host_id: &str, jwk: &str) -> Result<PublicKey, StoreError> {
    PublicKey::from_jwk_json(jwk.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("stored key of host {host_id:?}: {e}")))
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
                        training_like, foreign_person, merged_windows, body_json, received_at)
                       VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"#,
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
                        method_name(w.method),
                        w.training_like,
                        w.foreign_person,
                        w.merged_windows,
                        valid.body_json,
                        received_at,
                    ])
                    .map_err(db_error)?;
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
                crate::store::truncate_detail(&rejection.detail),
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
    fn opening_an_old_version_database_migrates_it_and_backfills_acks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let old = SqliteStore::open_at_version(&path, 1).unwrap();
            assert_eq!(old.schema_version().unwrap(), 1);
            let conn = old.lock().unwrap();
            for (host, seq, last) in [("a", 1, 1), ("a", 2, 5), ("a", 7, 7), ("b", 2, 2)] {
                conn.execute(
                    r#"INSERT INTO records (host_id, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at)
                       VALUES (?1, ?2, ?3, 't', 'w', 0, 60, 1.0, 1, 1, 1.0, 1.0, 'unknown', 0, 0, 1, '{}', 0)"#,
                    params![host, seq, last],
                )
                .unwrap();
            }
            let tables: i64 = conn
                .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'host_progress'", [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(tables, 0);
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        assert_eq!(store.acked_seq("a", 1).unwrap(), 5);
        assert_eq!(store.acked_seq("b", 1).unwrap(), 0);
        // The cache keeps advancing from the backfilled value.
        assert_eq!(store.insert_batch("a", 1, &[record(6, None)], 0).unwrap(), 7);
        assert_eq!(store.insert_batch("b", 1, &[record(1, None)], 0).unwrap(), 2);
    }

    /// A database of the last schema before enrollment epochs (version 4), with an enrolled
    /// host, a removed one and their records, opens at the current version: everything is
    /// epoch 1, and a new key for either host id starts epoch 2 beside it.
    #[test]
    fn a_version_4_database_migrates_to_enrollment_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        let key = |host: &str| {
            kycd_protocol::PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, host).unwrap().public_key()
        };
        let (a1, b1) = (key("a"), key("b"));
        {
            let old = SqliteStore::open_at_version(&path, 4).unwrap();
            let conn = old.lock().unwrap();
            // As version 4 wrote them: hosts without an epoch, records unique on (host_id, seq).
            for (host, jwk, at) in [("a", a1.to_jwk().to_string(), 100), ("b", b1.to_jwk().to_string(), 200)]
            {
                conn.execute(
                    "INSERT INTO hosts (host_id, public_jwk, enrolled_at) VALUES (?1, ?2, ?3)",
                    params![host, jwk, at],
                )
                .unwrap();
            }
            for (host, seq, last) in [("a", 1, 1), ("a", 2, 3), ("b", 1, 1)] {
                conn.execute(
                    r#"INSERT INTO records (host_id, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at)
                       VALUES (?1, ?2, ?3, 't', 'w', 0, 60, 1.0, 1, 1, 1.0, 1.0, 'unknown', 0, 0, 1, '{}', 0)"#,
                    params![host, seq, last],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO host_progress (host_id, acked_seq) VALUES (?1, ?2)
                     ON CONFLICT (host_id) DO UPDATE SET acked_seq = excluded.acked_seq",
                    params![host, last],
                )
                .unwrap();
            }
            conn.execute("DELETE FROM hosts WHERE host_id = 'b'", []).unwrap();
            let err = conn.execute(
                r#"INSERT INTO records (host_id, seq, last_seq, tenant, workload, start, "end",
                    gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                    training_like, foreign_person, merged_windows, body_json, received_at)
                   VALUES ('a', 1, 1, 't', 'w', 0, 60, 1.0, 1, 1, 1.0, 1.0, 'unknown', 0, 0, 1, '{}', 0)"#,
                [],
            );
            assert!(err.is_err(), "version 4: one record per (host_id, seq)");
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), 5);
        crate::store::test_support::check_migrated_to_epochs(&store, &a1, key, || {
            store.lock().unwrap().query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0)).unwrap()
        });
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(SqliteStore::open(&path), Err(StoreError::SchemaTooNew { found: 99, .. })));
    }

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
