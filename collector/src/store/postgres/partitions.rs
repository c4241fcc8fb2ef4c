//! `records` on PostgreSQL as a table partitioned by month (native declarative
//! partitioning, migration 12: [`MIGRATION_PARTITIONS`]), so that a fleet's years of usage
//! windows are kept as one table per month and retention drops whole months
//! (`prune_partitions`) instead of deleting billions of rows one by one.
//!
//! **Partition key: the window's `"end"`**, by calendar month in UTC (`records_YYYY_MM`
//! holds the windows that end in `[first second of the month, first second of the next)`).
//! - It is part of the record the agent signed, so a re-sent record (at-least-once delivery)
//!   has the same `end` and lands in the same partition as its first copy. PostgreSQL only
//!   allows unique indexes that contain the partition key, so the unique key becomes
//!   `(host_id, epoch, seq, "end")`: an identical re-send still collides with what is
//!   stored. What guarantees *one window per sequence number* is, as before, the per-host
//!   advisory lock and the overlap check under it ([`super::reports`]: a stored range that
//!   intersects a new record is either the same record, skipped, or a
//!   [`StoreError::SeqConflict`]); the unique key is the second guard it always was, for an
//!   identical row, and the insert counts what it stored. A record with the same seq but a
//!   different `end` is a different record: the overlap check refuses it before any insert.
//! - It is what retention already reads: a usage record is prunable when it *ended* by the
//!   cut-off (`"end" <= before`), so a partition whose whole range ends at or before the
//!   cut-off holds only prunable rows. `start` would not do (a window starting in March may
//!   end in April), nor `received_at` (not part of the record: a re-send received later
//!   would go elsewhere and the unique key would no longer catch it).
//!
//! **Partitions are made on demand.** There is no DEFAULT partition (a default holding rows
//! of a month would stop that month's partition from being attached, and could never be
//! dropped by month). An insert whose window falls in a month without a partition fails with
//! "no partition found" (`no_partition`); the batch's transaction is rolled back, the
//! months its windows end in are created (`ensure_partitions`, in a transaction of its own,
//! under `PARTITION_LOCK` so that two collector processes create a month once), and the
//! batch is retried. A partition is created as a plain table and then attached: `ATTACH
//! PARTITION` takes only a SHARE UPDATE EXCLUSIVE lock on `records`, so it neither waits for
//! nor blocks ingest and reads running meanwhile (`CREATE TABLE … PARTITION OF` would take
//! ACCESS EXCLUSIVE). The month's bounds and name are computed in one place, the SQL function
//! `kycd_records_partition(end)` the migration creates, which the migration itself and
//! `ensure_partitions` call.
//!
//! **Retention** (`prune_partitions`): a partition is dropped only when its whole range
//! ends at or before the cut-off (the caller has checked the cut-off against the effective
//! `retention.min_s`, [`crate::records::prune`]) and no unfiled finding ties any row in it
//! (the same "tied" condition as row-by-row retention). A tied partition is kept whole, and
//! all its rows are counted as refused; a partition that reaches past the cut-off is kept
//! whole and counted in neither (its rows are not due yet at the granularity of a month; a
//! later prune takes them), and logged with how many of its rows ended by the cut-off.
//!
//! **Cost.** Ingest's per-host lookups (the host's highest stored seq, the overlap check, the
//! acked-seq walk) select by host, epoch and seq, not by `end`, so they probe each month's
//! index (60 of them after 5 years) instead of one; reads by time (`"end"`) skip the months
//! outside their range.

use postgres::error::SqlState;
use postgres::{Client, GenericClient};

use super::driver::{get, Failed};
use crate::store::error::StoreError;
use crate::store::schema::to_u64;

/// Advisory lock taken while partitions of `records` are created or dropped (the
/// single-bigint key space; "kycdpart").
pub(super) const PARTITION_LOCK: i64 = 0x6b79_6364_7061_7274;

/// Step 12: `records` becomes a table partitioned by month of `"end"` (see the module
/// docs). The rows of the unpartitioned table move into one partition per month within the
/// migration's transaction (one copy of the table: a large `records` takes a while, under
/// ACCESS EXCLUSIVE), and the indexes and the unique key are built afterwards on the
/// partitioned table. `LIKE` keeps every column the earlier steps added, in order, but no
/// index, trigger or foreign key: one added to `records` by an earlier step must be made
/// again below. The
/// unique key is a unique index, not a constraint: `pg_restore --clean` of a dump
/// ([`crate::cli::backup`]) tries to drop each partition's share of a unique *constraint*,
/// which PostgreSQL refuses, while a partitioned index is dropped once, with its parts.
pub const MIGRATION_PARTITIONS: &str = r#"
    CREATE FUNCTION kycd_records_partition(at BIGINT) RETURNS TEXT LANGUAGE plpgsql AS $$
    DECLARE
        first_day TIMESTAMP := date_trunc('month', to_timestamp(at) AT TIME ZONE 'UTC');
        lo BIGINT := extract(epoch FROM first_day)::bigint;
        hi BIGINT := extract(epoch FROM first_day + interval '1 month')::bigint;
        part TEXT := 'records_' || to_char(first_day, 'YYYY_MM');
    BEGIN
        IF to_regclass(quote_ident(part)) IS NOT NULL THEN
            RETURN NULL;
        END IF;
        EXECUTE format('CREATE TABLE %I (LIKE records)', part);
        EXECUTE format('ALTER TABLE records ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', part, lo, hi);
        RETURN part;
    END
    $$;
    COMMENT ON FUNCTION kycd_records_partition(BIGINT) IS
        'kycd: creates and attaches the partition of records for the month (UTC) of the window end $1; its name, or NULL if it existed';

    ALTER TABLE records RENAME TO records_unpartitioned;
    ALTER TABLE records_unpartitioned DROP CONSTRAINT records_host_id_epoch_seq_key;
    DROP INDEX records_tenant_start;
    DROP INDEX records_host_received;
    DROP INDEX records_end;
    CREATE TABLE records (LIKE records_unpartitioned) PARTITION BY RANGE ("end");
    SELECT kycd_records_partition(min("end")) FROM records_unpartitioned
        GROUP BY date_trunc('month', to_timestamp("end") AT TIME ZONE 'UTC');
    INSERT INTO records SELECT * FROM records_unpartitioned;
    DROP TABLE records_unpartitioned;
    CREATE UNIQUE INDEX records_host_id_epoch_seq_end_key ON records (host_id, epoch, seq, "end");
    CREATE INDEX records_tenant_start ON records (tenant, start);
    CREATE INDEX records_host_received ON records (host_id, received_at);
    CREATE INDEX records_end ON records ("end");
    ANALYZE records;
"#;

/// Whether `e` is an insert into `records` that found no partition for a row (SQLSTATE
/// 23514 on `records`, which has no CHECK constraint of its own).
pub(super) fn no_partition(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        *d.code() == SqlState::CHECK_VIOLATION
            && (d.table() == Some("records") || d.message().starts_with("no partition"))
    })
}

/// Creates the partitions of the months the windows ending at `ends` fall in, where missing,
/// in a transaction of its own under [`PARTITION_LOCK`]; returns the names of those it
/// created.
pub(super) fn ensure_partitions(client: &mut Client, ends: &[i64]) -> Result<Vec<String>, Failed> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])?;
    let rows = tx.query(
        "SELECT kycd_records_partition(min(e)) FROM unnest($1::bigint[]) e
         GROUP BY date_trunc('month', to_timestamp(e) AT TIME ZONE 'UTC')",
        &[&ends],
    )?;
    let created = rows.iter().map(|r| get::<Option<String>>(r, 0)).collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    let created: Vec<String> = created.into_iter().flatten().collect();
    if !created.is_empty() {
        tracing::info!(partitions = ?created, "created partitions of records");
    }
    Ok(created)
}

/// Rows of `records` a prune deleted, and rows it kept because an unfiled finding ties
/// their partition.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct PartitionCounts {
    /// Rows of the partitions dropped (or, dry, that would be).
    pub deleted: u64,
    /// Rows of the partitions past the cut-off kept because a row in them is tied.
    pub refused: u64,
}

/// Drops (unless `dry_run`) every partition of `records` whose whole range ends at or
/// before `before` and in which no row is `tied` (an SQL condition on the row `r`), under
/// [`PARTITION_LOCK`], in the caller's transaction. See the module docs for what is counted.
pub(super) fn prune_partitions(
    tx: &mut impl GenericClient,
    before: i64,
    dry_run: bool,
    tied: &str,
) -> Result<PartitionCounts, Failed> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])?;
    let partitions = tx.query(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'records'::regclass ORDER BY 1",
        &[],
    )?;
    let mut counts = PartitionCounts::default();
    for row in &partitions {
        let name: String = get(row, 0)?;
        let bound: String = get(row, 1)?;
        let Some((lo, hi)) = range_bounds(&bound) else {
            tracing::warn!(partition = %name, bound = %bound, "not a month of records: never pruned");
            continue;
        };
        let table = quote_ident(&name);
        if hi > before {
            if lo < before {
                let due = tx.query_one(
                    &format!(r#"SELECT count(*) FROM {table} r WHERE r."end" <= $1"#),
                    &[&before],
                )?;
                tracing::info!(
                    partition = %name,
                    ended_by_cutoff = get::<i64>(&due, 0)?,
                    "partition reaches past the cut-off: kept whole"
                );
            }
            continue;
        }
        let row =
            tx.query_one(&format!("SELECT count(*), count(*) FILTER (WHERE {tied}) FROM {table} r"), &[])?;
        let (rows, tied_rows) = (to_u64(get(&row, 0)?)?, to_u64(get(&row, 1)?)?);
        if tied_rows > 0 {
            tracing::info!(partition = %name, rows, tied_rows, "partition tied to unfiled findings: kept whole");
            counts.refused = counts.refused.saturating_add(rows);
            continue;
        }
        if !dry_run {
            tx.batch_execute(&format!("DROP TABLE {table}"))?;
            tracing::info!(partition = %name, rows, "dropped partition of records");
        }
        counts.deleted = counts.deleted.saturating_add(rows);
    }
    Ok(counts)
}

/// `name` as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The bounds of a range partition of one integer column, from `pg_get_expr(relpartbound)`
/// (`FOR VALUES FROM ('lo') TO ('hi')`); `None` for anything else (a DEFAULT partition,
/// MINVALUE/MAXVALUE).
fn range_bounds(expr: &str) -> Option<(i64, i64)> {
    let rest = expr.trim().strip_prefix("FOR VALUES FROM (")?;
    let (lo, hi) = rest.strip_suffix(')')?.split_once(") TO (")?;
    let value = |s: &str| s.trim().trim_matches('\'').parse::<i64>().ok();
    Some((value(lo)?, value(hi)?))
}

/// A store error of a failed partition step.
pub(super) fn store_error(failed: Failed) -> StoreError {
    match failed {
        Failed::Pg(e) => super::driver::pg_error(e),
        Failed::Store(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RecordStore as _;
    use crate::store::postgres::PgStore;
    use crate::store::reports::{ReportStore as _, ValidRecord};
    use kycd_test_support::pg::fresh_database;

    /// 2026-01-01, 2026-02-01, 2026-03-01, 2026-04-01 00:00 UTC.
    const JAN: i64 = 1_767_225_600;
    const FEB: i64 = 1_769_904_000;
    const MAR: i64 = 1_772_323_200;
    const APR: i64 = 1_775_001_600;

    /// Record `seq` of tenant `tenant`: a 60 s window ending at `end`.
    fn ending_at(seq: u64, tenant: &str, end: i64) -> ValidRecord {
        let mut v = crate::store::test_support::record(seq, None);
        v.record.window.tenant = Some(tenant.into());
        v.record.window.start = end - 60;
        v.record.window.end = end;
        v.body_json = serde_json::to_string(&v.record).unwrap();
        v
    }

    /// The partitions of `records` and their row counts, by name.
    fn partitions(client: &mut Client) -> Vec<(String, i64)> {
        let names: Vec<String> = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'records'::regclass ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        names
            .into_iter()
            .map(|n| {
                let rows: i64 = client.query_one(&format!("SELECT count(*) FROM {n}"), &[]).unwrap().get(0);
                (n, rows)
            })
            .collect()
    }

    fn owned(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect()
    }

    #[test]
    fn range_bounds_read_what_postgres_prints() {
        assert_eq!(range_bounds("FOR VALUES FROM ('1767225600') TO ('1769904000')"), Some((JAN, FEB)));
        assert_eq!(range_bounds("FOR VALUES FROM (0) TO (2678400)"), Some((0, 2_678_400)));
        assert_eq!(range_bounds("DEFAULT"), None);
        assert_eq!(range_bounds("FOR VALUES FROM (MINVALUE) TO ('5')"), None);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
    }

    /// A version-10 database (today's unpartitioned `records`) with windows ending in two
    /// months opens at the current version: its rows are in one partition per month, the
    /// indexes are back, a stored record sent again is still stored once, a conflicting one
    /// is refused, and a window of a month without a partition gets one.
    #[test]
    fn a_version_10_database_moves_its_records_into_monthly_partitions() {
        let Some(db) = fresh_database("a_version_10_database_moves_its_records_into_monthly_partitions")
        else {
            return;
        };
        let stored = [ending_at(1, "t", JAN + 60), ending_at(2, "t", FEB - 1), ending_at(3, "t", FEB)];
        {
            let old = PgStore::open_at_version(&db.url, 10).unwrap();
            assert_eq!(old.schema_version().unwrap(), 10);
            assert_eq!(old.insert_batch("a", 1, &stored, 100).unwrap(), 3);
            let kind: i8 = db
                .client()
                .query_one("SELECT relkind::\"char\" FROM pg_class WHERE relname = 'records'", &[])
                .unwrap()
                .get(0);
            assert_eq!(kind, b'r' as i8, "version 10: a plain table");
        }
        let store = PgStore::open(&db.url).unwrap();
        assert_eq!(store.schema_version().unwrap(), i64::try_from(super::super::MIGRATIONS.len()).unwrap());
        let mut client = db.client();
        assert_eq!(partitions(&mut client), owned(&[("records_2026_01", 2), ("records_2026_02", 1)]));
        let mut indexes: Vec<String> = client
            .query("SELECT indexname::text FROM pg_indexes WHERE tablename = 'records'", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        indexes.sort();
        assert_eq!(
            indexes,
            [
                "records_end",
                "records_host_id_epoch_seq_end_key",
                "records_host_received",
                "records_tenant_start"
            ]
        );
        // The rows kept every column.
        let row = client
            .query_one(r#"SELECT start, "end", body_json, received_at FROM records WHERE seq = 2"#, &[])
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, String>(2), row.get::<_, i64>(3)),
            (FEB - 61, FEB - 1, stored[1].body_json.clone(), 100)
        );

        // At-least-once delivery, exactly-once effect: the same records again change nothing.
        assert_eq!(store.insert_batch("a", 1, &stored, 200).unwrap(), 3);
        assert_eq!(store.stored_ranges("a", 1).unwrap(), [(1, 1), (2, 2), (3, 3)]);
        // The same seq with another window is another record: refused, whatever its month.
        let other = ending_at(2, "t", MAR + 60);
        assert!(matches!(store.insert_batch("a", 1, &[other], 200), Err(StoreError::SeqConflict { .. })));
        // The unique key still catches an identical row written past the host lock.
        let copy =
            client.execute("INSERT INTO records SELECT * FROM records WHERE host_id = 'a' AND seq = 1", &[]);
        assert_eq!(copy.unwrap_err().code(), Some(&SqlState::UNIQUE_VIOLATION));

        // A month without a partition: made on demand, in the batch's retry.
        assert_eq!(store.insert_batch("a", 1, &[ending_at(4, "t", MAR + 120)], 300).unwrap(), 4);
        assert_eq!(
            partitions(&mut client),
            owned(&[("records_2026_01", 2), ("records_2026_02", 1), ("records_2026_03", 1)])
        );
        let bound: String = client
            .query_one(
                "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'records_2026_03'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(range_bounds(&bound), Some((MAR, APR)));
    }

    /// Two collectors ingesting windows of a month without a partition at once: both
    /// batches are stored, the month's partition is created once.
    #[test]
    fn collectors_create_a_new_month_once() {
        let Some(db) = fresh_database("collectors_create_a_new_month_once") else { return };
        let stores = [PgStore::open(&db.url).unwrap(), PgStore::open(&db.url).unwrap()];
        std::thread::scope(|s| {
            for (i, store) in stores.iter().enumerate() {
                s.spawn(move || {
                    let host = format!("h{i}");
                    for seq in 1..=5u64 {
                        let end = JAN + 60 * i64::try_from(seq).unwrap();
                        assert_eq!(
                            store.insert_batch(&host, 1, &[ending_at(seq, "t", end)], 0).unwrap(),
                            seq
                        );
                    }
                });
            }
        });
        assert_eq!(partitions(&mut db.client()), owned(&[("records_2026_01", 10)]));
    }

    /// A new month's partition is attached while another transaction holds an uncommitted
    /// insert into `records`: ATTACH PARTITION does not wait for it (a wait would end as
    /// busy after the 5 s lock timeout), and both rows are stored.
    #[test]
    fn a_new_month_does_not_wait_for_ingest_in_flight() {
        let Some(db) = fresh_database("a_new_month_does_not_wait_for_ingest_in_flight") else { return };
        let store = PgStore::open(&db.url).unwrap();
        assert_eq!(store.insert_batch("a", 1, &[ending_at(1, "t", JAN + 60)], 0).unwrap(), 1);
        let mut other = db.client();
        let mut open = other.transaction().unwrap();
        open.execute(
            "INSERT INTO records SELECT host_id, seq + 1, last_seq + 1, tenant, workload, start, \"end\",
                 gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                 training_like, foreign_person, merged_windows, body_json, received_at, epoch,
                 ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds
             FROM records WHERE seq = 1",
            &[],
        )
        .unwrap();
        let started = kycd_protocol::clock::monotonic();
        assert_eq!(store.insert_batch("b", 1, &[ending_at(1, "t", FEB + 60)], 0).unwrap(), 1);
        assert!(started.elapsed() < super::super::LOCK_TIMEOUT, "{:?}", started.elapsed());
        open.commit().unwrap();
        assert_eq!(partitions(&mut db.client()), owned(&[("records_2026_01", 2), ("records_2026_02", 1)]));
    }

    /// Windows in three months, an unfiled finding tying the second's tenant, a cut-off
    /// inside the third: a dry run drops nothing; a prune drops exactly the first month;
    /// once the finding is filed, the second goes too; the third stays until a cut-off
    /// past its end.
    #[test]
    fn prune_drops_only_untied_months_wholly_past_the_cutoff() {
        let Some(db) = fresh_database("prune_drops_only_untied_months_wholly_past_the_cutoff") else {
            return;
        };
        let store = PgStore::open(&db.url).unwrap();
        let batches = [
            ("a", "t-jan", JAN + 3_600, 3u64),
            ("b", "t-feb", FEB + 3_600, 2),
            ("c", "t-mar", MAR + 3_600, 4),
        ];
        for (host, tenant, end, n) in batches {
            let records: Vec<ValidRecord> =
                (1..=n).map(|seq| ending_at(seq, tenant, end + 60 * i64::try_from(seq).unwrap())).collect();
            assert_eq!(store.insert_batch(host, 1, &records, 0).unwrap(), n);
        }
        let mut client = db.client();
        client
            .execute(
                "INSERT INTO findings (kind, subject, tenant, summary, evidence_json, state, raised_at)
                 VALUES ('training_threshold_crossed', 't-feb', 't-feb', 's', '{}', 'acknowledged', 0)",
                &[],
            )
            .unwrap();
        let all = owned(&[("records_2026_01", 3), ("records_2026_02", 2), ("records_2026_03", 4)]);
        assert_eq!(partitions(&mut client), all);
        // Mid-March: January and February are wholly past it, March is not.
        let before = MAR + 86_400;

        let dry = store.prune(before, true).unwrap();
        assert_eq!((dry.records, dry.refused_records), (3, 2), "{dry:?}");
        assert_eq!(partitions(&mut client), all, "a dry run drops nothing");

        let pruned = store.prune(before, false).unwrap();
        assert_eq!((pruned.records, pruned.refused_records), (3, 2), "{pruned:?}");
        assert_eq!(partitions(&mut client), owned(&[("records_2026_02", 2), ("records_2026_03", 4)]));
        assert!(store.stored_ranges("a", 1).unwrap().is_empty());
        assert_eq!(store.stored_ranges("c", 1).unwrap().len(), 4);

        client.execute("UPDATE findings SET state = 'filed'", &[]).unwrap();
        let released = store.prune(before, false).unwrap();
        assert_eq!((released.records, released.refused_records), (2, 0), "{released:?}");
        assert_eq!(partitions(&mut client), owned(&[("records_2026_03", 4)]));
        // A cut-off at the end of March takes it.
        assert_eq!(store.prune(APR, false).unwrap().records, 4);
        assert!(partitions(&mut client).is_empty());
        // A late window of a dropped month is stored again (in a new partition).
        assert_eq!(store.insert_batch("a", 1, &[ending_at(4, "t-jan", JAN + 60)], 0).unwrap(), 4);
        assert_eq!(partitions(&mut client), owned(&[("records_2026_01", 1)]));
    }
}
