//! The PostgreSQL backend of [`RecordStore`], with the meaning of the SQLite one
//! ([`crate::store::sqlite::records`]) but for usage records, which a prune drops by whole
//! months (partitions, see [`super::partitions`]: a month is dropped once it ended by the
//! cut-off and nothing in it is tied); schema: [`super::schema::MIGRATION_RECORDS`]. Backup
//! and restore of a PostgreSQL database are `pg_dump` / `pg_restore`'s (see
//! [`crate::cli::backup`]).

use super::driver::get;
use super::PgStore;
use crate::records::{
    identity_json, parse_identity, IdentityObservation, IdentityRecord, PruneCounts, RecordStore,
    StatementRecord,
};
use crate::store::error::StoreError;
use crate::store::schema::to_u64;

/// Records a verified statement in the history (`$1` host, `$2` content digest, `$3` polled
/// at, `$4` claims JSON, `$5` token): prepared with the poll's other statements.
pub(super) const RECORD_STATEMENT: &str =
    "INSERT INTO statement_history AS h (host_id, content_digest, first_seen, last_seen, claims_json, token)
     VALUES ($1::text, $2::text, $3::bigint, $3::bigint, $4::text, $5::text)
     ON CONFLICT (host_id, content_digest) DO UPDATE SET last_seen = GREATEST(h.last_seen, excluded.last_seen)";

/// Unfiled findings (see [`crate::records`]), written out as in the SQLite backend.
const UNFILED: &str = "f.state NOT IN ('resolved', 'filed', 'dismissed')";

impl RecordStore for PgStore {
    fn record_identities(&self, seen: &[IdentityObservation]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(seen.len());
        for o in seen {
            let json = identity_json(&o.identity)?;
            let digest = kycd_protocol::token_digest(json.as_bytes());
            rows.push((o, digest, json));
        }
        self.in_transaction("record identities", |tx| {
            let upsert = tx.prepare(
                "INSERT INTO identity_history AS h
                     (tenant, attestation_digest, identity_digest, identity_json, first_seen, last_seen)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (tenant, attestation_digest, identity_digest) DO UPDATE
                     SET last_seen = GREATEST(h.last_seen, excluded.last_seen)",
            )?;
            for (o, digest, json) in &rows {
                tx.execute(&upsert, &[&o.tenant, &o.attestation_digest, digest, json, &o.seen_at])?;
            }
            Ok(())
        })
    }

    fn identity_history(&self, tenant: Option<&str>) -> Result<Vec<IdentityRecord>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT tenant, attestation_digest, identity_json, first_seen, last_seen FROM identity_history
                   WHERE $1::text IS NULL OR tenant = $1
                   ORDER BY tenant COLLATE "C", first_seen, attestation_digest, identity_digest"#,
                &[&tenant],
            )
            .map_err(super::driver::pg_error)?;
        rows.iter()
            .map(|r| {
                let json: String = get(r, 2)?;
                Ok(IdentityRecord {
                    tenant: get(r, 0)?,
                    attestation_digest: get(r, 1)?,
                    identity: parse_identity(&json)?,
                    first_seen: get(r, 3)?,
                    last_seen: get(r, 4)?,
                })
            })
            .collect()
    }

    fn statement_history(&self, host_id: Option<&str>) -> Result<Vec<StatementRecord>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT host_id, content_digest, first_seen, last_seen, token FROM statement_history
                   WHERE $1::text IS NULL OR host_id = $1
                   ORDER BY host_id COLLATE "C", first_seen, content_digest"#,
                &[&host_id],
            )
            .map_err(super::driver::pg_error)?;
        rows.iter()
            .map(|r| {
                Ok(StatementRecord {
                    host_id: get(r, 0)?,
                    content_digest: get(r, 1)?,
                    first_seen: get(r, 2)?,
                    last_seen: get(r, 3)?,
                    token: get(r, 4)?,
                })
            })
            .collect()
    }

    fn prune(&self, before: i64, dry_run: bool) -> Result<PruneCounts, StoreError> {
        let record_tied = format!(
            "EXISTS (SELECT 1 FROM findings f WHERE {UNFILED} AND (f.tenant = r.tenant OR f.host_id = r.host_id
                     OR f.subject = r.host_id || '/' || r.workload))"
        );
        let identity_tied =
            format!("EXISTS (SELECT 1 FROM findings f WHERE {UNFILED} AND f.tenant = i.tenant)");
        let statement_tied = format!(
            "EXISTS (SELECT 1 FROM findings f WHERE {UNFILED} AND (f.host_id = s.host_id
                     OR EXISTS (SELECT 1 FROM records r WHERE r.tenant = f.tenant AND r.host_id = s.host_id)))"
        );
        // Statements first: whether one is tied reads the records. Usage records go by whole
        // partitions (months, [`super::partitions`]), not row by row.
        let tables = [
            ("statement_history s WHERE s.last_seen < $1", statement_tied),
            ("identity_history i WHERE i.last_seen < $1", identity_tied),
        ];
        let ([statements, identities], records) = self.in_transaction("prune records", |tx| {
            // Before anything reads `records`: two prunes (or a prune and a new month's
            // partition) queue here instead of deadlocking on the table's locks.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&super::partitions::PARTITION_LOCK])?;
            let mut out = [(0, 0); 2];
            for ((from, tied), slot) in tables.iter().zip(out.iter_mut()) {
                let refused = count(tx, &format!("SELECT COUNT(*) FROM {from} AND {tied}"), before)?;
                let deleted = if dry_run {
                    count(tx, &format!("SELECT COUNT(*) FROM {from} AND NOT {tied}"), before)?
                } else {
                    tx.execute(&format!("DELETE FROM {from} AND NOT {tied}"), &[&before])?
                };
                *slot = (deleted, refused);
            }
            let records = super::partitions::prune_partitions(tx, before, dry_run, &record_tied)?;
            if !dry_run && records.deleted > 0 {
                // The roll-ups keep the pruned windows' usage; a check compares them only
                // after the cut-off from now on (crate::fleet::rollup).
                tx.execute(
                    "UPDATE rollup_state SET pruned_before = GREATEST(COALESCE(pruned_before, $1), $1)",
                    &[&before],
                )?;
            }
            Ok((out, records))
        })?;
        Ok(PruneCounts {
            records: records.deleted,
            identities: identities.0,
            statements: statements.0,
            refused_records: records.refused,
            refused_identities: identities.1,
            refused_statements: statements.1,
        })
    }
}

/// The `COUNT(*)` `sql` reads with `$1 = before`.
fn count(client: &mut impl postgres::GenericClient, sql: &str, before: i64) -> Result<u64, StoreError> {
    let row = client.query_one(sql, &[&before]).map_err(super::driver::pg_error)?;
    to_u64(get(&row, 0)?)
}
