//! The SQLite schema: its migrations, in order, and how they are applied.
//!
//! Migrations are ordered SQL strings in [`MIGRATIONS`]; `PRAGMA user_version` is the
//! number applied. Opening applies the missing ones in one transaction, so a database is
//! either wholly at the old version or wholly at the new one. The SQL text of a released
//! migration never changes: databases that applied it must still open.

use rusqlite::{Connection, TransactionBehavior};

use super::driver::db_error;
use crate::store::error::StoreError;

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
    // 3: the fleet view (see super::fleet).
    MIGRATION_FLEET,
    // 4: agent polling (see super::statements).
    MIGRATION_POLLING,
    // 5: enrollment epochs and rejected batches.
    MIGRATION_EPOCHS,
    // 6: operation bounds and shared GPU-seconds of each window.
    MIGRATION_OPS_BOUNDS,
    // 7: GPU-seconds of each window in which a VM's guest sent no telemetry.
    MIGRATION_GUEST_GAP,
    // 8: the finding lifecycle (acknowledged, filed, dismissed, due_at) and the audit log.
    MIGRATION_LIFECYCLE,
    // 9: the regulatory record's history tables (identities, statements).
    MIGRATION_RECORDS,
    // 10: hosts' placement (site and network fabric) for co-located cluster capacity.
    MIGRATION_PLACEMENT,
    // 11: usage roll-ups maintained at ingest (see crate::fleet::rollup).
    MIGRATION_ROLLUPS,
    // 12: nothing on SQLite; PostgreSQL partitions `records` by month (see super::partitions).
    super::partitions::MIGRATION_PARTITIONS,
];

/// Step 3 ([`super::fleet`]): the fleet view — published policies, tenant identities from host statements,
/// findings (at most one open per kind and subject), and the per-host report time index
/// dark-host detection reads.
pub const MIGRATION_FLEET: &str = r#"
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
    "#;

/// The schema of agent polling, appended to [`super::MIGRATIONS`].
pub const MIGRATION_POLLING: &str = r#"
    CREATE TABLE host_agents (
        host_id   TEXT PRIMARY KEY NOT NULL,
        agent_url TEXT NOT NULL
    ) STRICT;
    CREATE TABLE poll_status (
        host_id              TEXT PRIMARY KEY NOT NULL,
        attempts             INTEGER NOT NULL,
        last_attempt_at      INTEGER NOT NULL,
        last_ok_at           INTEGER,
        consecutive_failures INTEGER NOT NULL,
        last_error           TEXT
    ) STRICT;
    CREATE TABLE poll_history (
        host_id   TEXT NOT NULL,
        n         INTEGER NOT NULL,
        polled_at INTEGER NOT NULL,
        kind      TEXT NOT NULL,
        detail    TEXT NOT NULL,
        PRIMARY KEY (host_id, n)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE poll_latest (
        host_id     TEXT PRIMARY KEY NOT NULL,
        polled_at   INTEGER NOT NULL,
        claims_json TEXT NOT NULL,
        token       TEXT NOT NULL
    ) STRICT;
    CREATE TRIGGER hosts_removed_polling AFTER DELETE ON hosts BEGIN
        DELETE FROM host_agents WHERE host_id = OLD.host_id;
        DELETE FROM poll_status WHERE host_id = OLD.host_id;
        DELETE FROM poll_history WHERE host_id = OLD.host_id;
    END;
"#;

/// Step 5: enrollment epochs (see [`crate::store::reports`]) and rejected batches.
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

/// Step 6: the bounds of a window's operations (`ops_lower`, `ops_upper`) beside its point
/// estimate, and its GPU-seconds shared without isolation (`shared_gpu_seconds`), as agents
/// from 0.17 send them. Records stored before were sent without bounds, which means "the
/// estimate" (`UsageWindow::lower_ops`), so they are backfilled with it; they shared nothing
/// the agent could tell. SQLite adds a NOT NULL column only with a constant default: the
/// default 0 is what the backfill overwrites (one pass over `records`, inside the
/// migration's transaction), and every insert names the columns.
pub const MIGRATION_OPS_BOUNDS: &str = r#"
    ALTER TABLE records ADD COLUMN ops_lower REAL NOT NULL DEFAULT 0;
    ALTER TABLE records ADD COLUMN ops_upper REAL NOT NULL DEFAULT 0;
    ALTER TABLE records ADD COLUMN shared_gpu_seconds REAL NOT NULL DEFAULT 0;
    UPDATE records SET ops_lower = estimated_ops, ops_upper = estimated_ops;
"#;

/// Step 7: the GPU-seconds of a window in which a VM held passed-through GPUs while its guest
/// sent no telemetry (`guest_gap_gpu_seconds`, agents from issue 18 on). Records stored
/// before had no such seconds (their agents could not see into a guest at all), so the
/// default 0 is their value and no backfill is needed; every insert names the column.
pub const MIGRATION_GUEST_GAP: &str = r#"
    ALTER TABLE records ADD COLUMN guest_gap_gpu_seconds REAL NOT NULL DEFAULT 0;
"#;

// ---------------------------------------------------------------------------------------------
// Migration 9 (issue 19, retention): the history tables.
// ---------------------------------------------------------------------------------------------

/// Step 9 ([`crate::records`]): the append-only history of tenant identities and of distinct
/// verified host statements. Rows are inserted once; afterwards only `last_seen` advances;
/// only `records prune` deletes them. An identity is keyed by the SHA-256 of its JSON
/// (`identity_digest`; the JSON itself may be longer than an index entry allows on
/// PostgreSQL). Both start empty: what was overwritten before this
/// migration is gone, the current identities and latest statements are recorded again at the
/// next evaluation and poll.
pub const MIGRATION_RECORDS: &str = r#"
    CREATE TABLE identity_history (
        tenant             TEXT NOT NULL,
        attestation_digest TEXT NOT NULL,
        identity_digest    TEXT NOT NULL,
        identity_json      TEXT NOT NULL,
        first_seen         INTEGER NOT NULL,
        last_seen          INTEGER NOT NULL,
        PRIMARY KEY (tenant, attestation_digest, identity_digest)
    ) STRICT;
    CREATE INDEX identity_history_last_seen ON identity_history (last_seen);
    CREATE TABLE statement_history (
        host_id        TEXT NOT NULL,
        content_digest TEXT NOT NULL,
        first_seen     INTEGER NOT NULL,
        last_seen      INTEGER NOT NULL,
        claims_json    TEXT NOT NULL,
        token          TEXT NOT NULL,
        PRIMARY KEY (host_id, content_digest)
    ) STRICT;
    CREATE INDEX statement_history_last_seen ON statement_history (last_seen);
    CREATE INDEX records_end ON records ("end");
"#;

/// Applies the missing migrations of [`MIGRATIONS`] up to `target` in one transaction.
pub(super) fn migrate(conn: &mut Connection, target: usize) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_error)?;
    let pending = crate::store::schema::pending_migrations(MIGRATIONS, version, target)?;
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

/// Step 8: the finding lifecycle. Findings gain `due_at` and who
/// acknowledged, filed (with the reference) or dismissed (with the reason) them, when;
/// tenant identities keep the whole statement entry they came from (`detail_json`); the
/// raise-once index covers every state but `resolved`, so a filed or dismissed crossing is
/// not raised again; `audit_log` is the collector's hash-chained audit log (one record per
/// line in the agent's format, [`kycd_protocol::audit_chain`]), appended in the transaction
/// of the change it records and never updated.
pub const MIGRATION_LIFECYCLE: &str = r#"
    ALTER TABLE findings ADD COLUMN due_at INTEGER;
    ALTER TABLE findings ADD COLUMN acknowledged_by TEXT;
    ALTER TABLE findings ADD COLUMN acknowledged_at INTEGER;
    ALTER TABLE findings ADD COLUMN filed_reference TEXT;
    ALTER TABLE findings ADD COLUMN filed_by TEXT;
    ALTER TABLE findings ADD COLUMN filed_at INTEGER;
    ALTER TABLE findings ADD COLUMN dismissed_reason TEXT;
    ALTER TABLE findings ADD COLUMN dismissed_by TEXT;
    ALTER TABLE findings ADD COLUMN dismissed_at INTEGER;
    ALTER TABLE tenant_identities ADD COLUMN detail_json TEXT;
    DROP INDEX findings_open;
    CREATE UNIQUE INDEX findings_active ON findings (kind, subject) WHERE state <> 'resolved';
    CREATE TABLE audit_log (
        seq  INTEGER PRIMARY KEY NOT NULL,
        ts   INTEGER NOT NULL,
        hash TEXT NOT NULL,
        line TEXT NOT NULL
    ) STRICT;
"#;

/// Step 10: where enrolled hosts stand: a site and the network fabric within it
/// (`hosts add --site --fabric`, `hosts place`), so a tenant's concurrent capacity is also
/// computed per co-located cluster. A host without a row is unplaced. Kept apart from
/// `hosts` so a re-enrollment (`hosts remove` + `hosts add`) keeps the placement.
pub const MIGRATION_PLACEMENT: &str = r#"
    CREATE TABLE host_placement (
        host_id TEXT PRIMARY KEY NOT NULL,
        site    TEXT NOT NULL,
        fabric  TEXT NOT NULL,
        set_at  INTEGER NOT NULL
    ) STRICT;
"#;

/// Step 11 ([`crate::fleet::rollup`]): the usage roll-ups, maintained at ingest. A subject is
/// `(tenant, subject_host, subject_workload)`: a tenant with empty host and workload, or a
/// workload without a tenant (empty tenant). `rollup_state.built_at` is NULL while the
/// roll-ups of windows stored before this migration are still to be computed, and
/// `pruned_before` the latest cut-off of a `records prune` that deleted windows since the
/// roll-ups were last computed from all of them (they keep those windows' usage): opening the
/// store computes them ([`super::rollups`]).
pub const MIGRATION_ROLLUPS: &str = r#"
    CREATE TABLE rollup_subjects (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        windows INTEGER NOT NULL, ops_lower REAL NOT NULL, estimated_ops REAL NOT NULL,
        ops_upper REAL NOT NULL, gpu_seconds REAL NOT NULL, shared_gpu_seconds REAL NOT NULL,
        guest_gap_gpu_seconds REAL NOT NULL, first_start INTEGER NOT NULL, last_end INTEGER NOT NULL,
        foreign_person INTEGER NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_methods (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        method TEXT NOT NULL, estimated_ops REAL NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, method)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_days (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        day INTEGER NOT NULL,
        windows INTEGER NOT NULL, ops_lower REAL NOT NULL, estimated_ops REAL NOT NULL,
        ops_upper REAL NOT NULL, gpu_seconds REAL NOT NULL, shared_gpu_seconds REAL NOT NULL,
        guest_gap_gpu_seconds REAL NOT NULL, first_start INTEGER NOT NULL, last_end INTEGER NOT NULL,
        foreign_person INTEGER NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, day)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_day_methods (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        day INTEGER NOT NULL, method TEXT NOT NULL, estimated_ops REAL NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, day, method)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_day_hosts (
        tenant TEXT NOT NULL, day INTEGER NOT NULL, host TEXT NOT NULL,
        PRIMARY KEY (tenant, day, host)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_hosts (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        host TEXT NOT NULL, gpus INTEGER NOT NULL, shared_gpu_seconds REAL NOT NULL,
        guest_gap_gpu_seconds REAL NOT NULL, cluster TEXT NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, host)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_gap_workloads (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        host TEXT NOT NULL, workload TEXT NOT NULL, seconds REAL NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, host, workload)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_capacity (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        cluster TEXT NOT NULL, hour INTEGER NOT NULL, flops BLOB NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, cluster, hour)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_peaks (
        tenant TEXT NOT NULL, subject_host TEXT NOT NULL, subject_workload TEXT NOT NULL,
        cluster TEXT NOT NULL, peak_flops REAL NOT NULL, peak_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, subject_host, subject_workload, cluster)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_segments (
        tenant TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
        windows INTEGER NOT NULL, ops_lower REAL NOT NULL, estimated_ops REAL NOT NULL,
        ops_upper REAL NOT NULL, gpu_seconds REAL NOT NULL, ops_by_method TEXT NOT NULL,
        peak_flops REAL NOT NULL, peak_at INTEGER NOT NULL, changed_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, start)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX rollup_segments_changed ON rollup_segments (changed_at);
    CREATE TABLE rollup_segment_hosts (
        tenant TEXT NOT NULL, start INTEGER NOT NULL, host TEXT NOT NULL,
        PRIMARY KEY (tenant, start, host)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE rollup_state (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        built_at      INTEGER,
        pruned_before INTEGER
    ) STRICT;
    INSERT INTO rollup_state (id, built_at)
        SELECT 1, CASE WHEN EXISTS (SELECT 1 FROM records) THEN NULL ELSE 0 END;
"#;

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::*;
    use crate::store::reports::ReportStore as _;
    use crate::store::sqlite::SqliteStore;
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
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        crate::store::test_support::check_migrated_to_epochs(&store, &a1, key, || {
            store.lock().unwrap().query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0)).unwrap()
        });
    }

    /// A version-5 database (no operation bounds) opens at the current version: its records'
    /// bounds are their estimate and they shared nothing; new records keep their own bounds.
    #[test]
    fn a_version_5_database_gets_operation_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        {
            let old = SqliteStore::open_at_version(&path, 5).unwrap();
            let conn = old.lock().unwrap();
            for (seq, ops) in [(1, 2.5e15), (2, 4.0e15)] {
                conn.execute(
                    r#"INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at)
                       VALUES ('a', 1, ?1, ?1, 't', 'w', 0, 60, 60.0, 1, 1, ?2, 1e15, 'gpm_tensor', 0, 1, 1, '{}', 0)"#,
                    params![seq, ops],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        crate::store::test_support::check_migrated_to_bounds(&store, 6.5e15);
    }

    /// A version-6 database (no guest gap) opens at the current version: its records had no
    /// gap; new records keep theirs.
    #[test]
    fn a_version_6_database_gets_guest_gap_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v6.db");
        {
            let old = SqliteStore::open_at_version(&path, 6).unwrap();
            let conn = old.lock().unwrap();
            for seq in [1, 2] {
                conn.execute(
                    r#"INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at,
                        ops_lower, ops_upper, shared_gpu_seconds)
                       VALUES ('a', 1, ?1, ?1, 't', 'w', 0, 60, 60.0, 1, 1, 1e15, 1e15, 'gpm_tensor', 0, 1, 1, '{}', 0,
                               1e15, 1e15, 0)"#,
                    params![seq],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        crate::store::test_support::check_migrated_to_guest_gap(&store);
    }

    /// A version-7 database (findings open or resolved, identities without detail) opens at
    /// the current version: see [`crate::store::test_support::check_migrated_to_lifecycle`].
    #[test]
    fn a_version_7_database_gets_the_finding_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v7.db");
        {
            let old = SqliteStore::open_at_version(&path, 7).unwrap();
            let conn = old.lock().unwrap();
            conn.execute_batch(crate::store::test_support::VERSION_7_FINDINGS).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        crate::store::test_support::check_migrated_to_lifecycle(&store);
    }

    /// A version-8 database (no history tables) opens at the current version with them.
    #[test]
    fn a_version_8_database_gets_the_history_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v8.db");
        {
            let old = SqliteStore::open_at_version(&path, 8).unwrap();
            assert_eq!(old.schema_version().unwrap(), 8);
            assert_eq!(old.insert_batch("a", 1, &[record(1, None)], 0).unwrap(), 1);
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        crate::store::test_support::check_migrated_to_records(&store);
    }

    /// A version-10 database (windows, no roll-ups) gets its roll-ups computed on opening.
    #[test]
    fn a_version_10_database_gets_its_rollups_built() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v10.db");
        {
            let old = SqliteStore::open_at_version(&path, 10).unwrap();
            assert_eq!(old.insert_batch("a", 1, &[record(1, None), record(2, Some(3))], 0).unwrap(), 3);
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(MIGRATIONS.len()).unwrap());
        crate::store::test_support::check_migrated_to_rollups(&store);
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
}
