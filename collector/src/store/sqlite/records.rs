//! The SQLite backend of [`RecordStore`] (schema: [`super::schema::MIGRATION_RECORDS`]), the
//! statement history's write (called from [`super::statements`] in the poll's transaction),
//! and online backup and restore of the whole database file.

use std::path::Path;

use rusqlite::{params, TransactionBehavior};

use super::driver::db_error;
use super::SqliteStore;
use crate::records::{
    identity_json, parse_identity, IdentityObservation, IdentityRecord, PruneCounts, RecordStore,
    StatementRecord,
};
use crate::store::error::StoreError;
use crate::store::schema::to_u64;

/// Unfiled findings (see [`crate::records`]): the state list is written out so it reads the
/// same before and after the findings lifecycle gains states.
const UNFILED: &str = "f.state NOT IN ('resolved', 'filed', 'dismissed')";

/// Records a verified statement in the history: a new content digest is a new row, a known
/// one only advances `last_seen`.
pub(super) fn record_statement(
    tx: &rusqlite::Transaction<'_>,
    host_id: &str,
    polled_at: i64,
    digest: &str,
    claims_json: &str,
    token: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO statement_history (host_id, content_digest, first_seen, last_seen, claims_json, token)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5)
         ON CONFLICT (host_id, content_digest) DO UPDATE
             SET last_seen = MAX(last_seen, excluded.last_seen)",
    )
    .and_then(|mut s| s.execute(params![host_id, digest, polled_at, claims_json, token]))
    .map_err(db_error)?;
    Ok(())
}

/// The WHERE condition of a usage record `r` tied to an unfiled finding.
fn record_tied() -> String {
    format!(
        "EXISTS (SELECT 1 FROM findings f WHERE {UNFILED} AND (f.tenant = r.tenant OR f.host_id = r.host_id
                 OR f.subject = r.host_id || '/' || r.workload))"
    )
}

/// … of an identity history row `i`.
fn identity_tied() -> String {
    format!("EXISTS (SELECT 1 FROM findings f WHERE {UNFILED} AND f.tenant = i.tenant)")
}

/// … of a statement history row `s`: a finding about its host, or about a tenant with usage
/// on its host.
fn statement_tied() -> String {
    format!(
        "EXISTS (SELECT 1 FROM findings f WHERE {UNFILED} AND (f.host_id = s.host_id
                 OR EXISTS (SELECT 1 FROM records r WHERE r.tenant = f.tenant AND r.host_id = s.host_id)))"
    )
}

fn count(tx: &rusqlite::Transaction<'_>, sql: &str, before: i64) -> Result<u64, StoreError> {
    let n: i64 = tx.query_row(sql, [before], |r| r.get(0)).map_err(db_error)?;
    to_u64(n)
}

impl RecordStore for SqliteStore {
    fn record_identities(&self, seen: &[IdentityObservation]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO identity_history
                         (tenant, attestation_digest, identity_digest, identity_json, first_seen, last_seen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                     ON CONFLICT (tenant, attestation_digest, identity_digest) DO UPDATE
                         SET last_seen = MAX(last_seen, excluded.last_seen)",
                )
                .map_err(db_error)?;
            for o in seen {
                let json = identity_json(&o.identity)?;
                let digest = kycd_protocol::token_digest(json.as_bytes());
                upsert
                    .execute(params![o.tenant, o.attestation_digest, digest, json, o.seen_at])
                    .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }

    fn identity_history(&self, tenant: Option<&str>) -> Result<Vec<IdentityRecord>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT tenant, attestation_digest, identity_json, first_seen, last_seen FROM identity_history
                 WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant, first_seen, attestation_digest, identity_digest",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([tenant], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (tenant, attestation_digest, json, first_seen, last_seen) = row.map_err(db_error)?;
            out.push(IdentityRecord {
                tenant,
                attestation_digest,
                identity: parse_identity(&json)?,
                first_seen,
                last_seen,
            });
        }
        Ok(out)
    }

    fn statement_history(&self, host_id: Option<&str>) -> Result<Vec<StatementRecord>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT host_id, content_digest, first_seen, last_seen, token FROM statement_history
                 WHERE ?1 IS NULL OR host_id = ?1 ORDER BY host_id, first_seen, content_digest",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([host_id], |r| {
                Ok(StatementRecord {
                    host_id: r.get(0)?,
                    content_digest: r.get(1)?,
                    first_seen: r.get(2)?,
                    last_seen: r.get(3)?,
                    token: r.get(4)?,
                })
            })
            .map_err(db_error)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_error)
    }

    fn prune(&self, before: i64, dry_run: bool) -> Result<PruneCounts, StoreError> {
        let (records, identities, statements) = (
            (r#"FROM records r WHERE r."end" <= ?1"#, record_tied()),
            ("FROM identity_history i WHERE i.last_seen < ?1", identity_tied()),
            ("FROM statement_history s WHERE s.last_seen < ?1", statement_tied()),
        );
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        let mut counts = PruneCounts::default();
        // Statements first: whether one is tied reads the records.
        for ((from, tied), (deleted, refused), table) in [
            (&statements, (&mut counts.statements, &mut counts.refused_statements), "statement_history s"),
            (&identities, (&mut counts.identities, &mut counts.refused_identities), "identity_history i"),
            (&records, (&mut counts.records, &mut counts.refused_records), "records r"),
        ] {
            *refused = count(&tx, &format!("SELECT COUNT(*) {from} AND {tied}"), before)?;
            *deleted = if dry_run {
                count(&tx, &format!("SELECT COUNT(*) {from} AND NOT {tied}"), before)?
            } else {
                // SQLite's DELETE takes no alias: the condition names the table by rowid.
                let (name, alias) = table.split_once(' ').unwrap_or((table, table));
                let n = tx
                    .execute(
                        &format!(
                            "DELETE FROM {name} WHERE rowid IN (SELECT {alias}.rowid {from} AND NOT {tied})"
                        ),
                        [before],
                    )
                    .map_err(db_error)?;
                u64::try_from(n).unwrap_or(u64::MAX)
            };
        }
        if dry_run {
            return Ok(counts);
        }
        if self.rollups && counts.records > 0 {
            // The roll-ups keep the pruned windows' usage; a check compares them only after
            // the cut-off from now on (crate::fleet::rollup).
            tx.execute(
                "UPDATE rollup_state SET pruned_before = max(coalesce(pruned_before, ?1), ?1)",
                [before],
            )
            .map_err(db_error)?;
        }
        tx.commit().map_err(db_error)?;
        Ok(counts)
    }
}

impl SqliteStore {
    /// An online, consistent copy of the whole database into the new file `to` (SQLite's
    /// backup API: writers may go on meanwhile; the copy is one committed state).
    pub fn backup_to(&self, to: &Path) -> Result<(), StoreError> {
        if to.exists() {
            return Err(StoreError::Unsupported(format!("{} exists: back up into a new file", to.display())));
        }
        let conn = self.lock()?;
        conn.backup(rusqlite::MAIN_DB, to, None).map_err(db_error)
    }

    /// Replaces the whole database by the backup in `from` (stop every collector on it first:
    /// their connections would see the database change under them), then migrates it to this
    /// build's schema, as opening an old database does.
    pub fn restore_from(&self, from: &Path) -> Result<(), StoreError> {
        let source = rusqlite::Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(db_error)?;
        let check: String = source.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(db_error)?;
        if check != "ok" {
            return Err(StoreError::Corrupt(format!("backup {}: {check}", from.display())));
        }
        drop(source);
        let mut conn = self.lock()?;
        conn.restore(rusqlite::MAIN_DB, from, None::<fn(rusqlite::backup::Progress)>).map_err(db_error)?;
        super::schema::migrate(&mut conn, super::MIGRATIONS.len())?;
        super::rollups::build_if_needed(&mut conn, kycd_protocol::clock::unix_now())
    }
}
