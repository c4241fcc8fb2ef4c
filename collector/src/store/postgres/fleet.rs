//! The PostgreSQL backend of [`PolicyStore`] and [`FleetStore`], with the meaning of the SQLite
//! one (`store/sqlite/fleet.rs`); schema: [`super::schema::MIGRATION_FLEET`],
//! step 3 of [`super::MIGRATIONS`].
//!
//! Across collector processes:
//! - `publish_policy` takes an EXCLUSIVE lock on `policies` (readers proceed) before reading
//!   the current version, so of two concurrent publishers only one can win a version;
//! - `raise_finding` relies on the partial unique index on open (kind, subject): a concurrent
//!   second raise waits for the first and then does nothing (raised once);
//! - aggregation streams the windows from the server through [`UsageAccumulator`], the same
//!   code as SQLite's, so both backends compute identical numbers.
//!
//! Text ordering is by byte (`COLLATE "C"`), as SQLite orders, whatever the database's locale.

use std::collections::BTreeMap;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;

use super::driver::{get, pg_error, to_i64};
use super::PgStore;
use crate::fleet::{
    Finding, FindingKind, FindingQuery, FindingState, FleetStore, FleetUsage, NewFinding, RejectionCount,
    TenantIdentity, TenantUsage, UsageAccumulator, WindowEvidence, WindowRow,
};
use crate::policy::{PolicyStore, PublishedPolicy};
use crate::store::error::StoreError;
use crate::store::reports::Rejection;
use crate::store::schema::{corrupt, count_u32, to_u64};

/// Every window of the aggregation (a sequential scan; the tenant index does not help when
/// every tenant is wanted). Windows without a tenant are aggregated per (host, workload), so
/// their workload is read too. `$1` (no tenant) is named only so both queries take the same
/// parameters.
const WINDOWS_SQL: &str = r#"
    SELECT tenant, host_id, start, "end", gpu_seconds, GREATEST(max_concurrent_gpus, gpus), estimated_ops,
           peak_flops, method, foreign_person, ops_lower, ops_upper, shared_gpu_seconds,
           guest_gap_gpu_seconds, CASE WHEN guest_gap_gpu_seconds > 0 OR tenant IS NULL THEN workload END
    FROM records WHERE ($2::bigint IS NULL OR "end" > $2::bigint) AND $1::text IS NULL"#;

/// The windows of one tenant, through the tenant index.
const TENANT_WINDOWS_SQL: &str = r#"
    SELECT tenant, host_id, start, "end", gpu_seconds, GREATEST(max_concurrent_gpus, gpus), estimated_ops,
           peak_flops, method, foreign_person, ops_lower, ops_upper, shared_gpu_seconds,
           guest_gap_gpu_seconds, CASE WHEN guest_gap_gpu_seconds > 0 THEN workload END
    FROM records WHERE tenant = $1::text AND ($2::bigint IS NULL OR "end" > $2::bigint)"#;

/// Evidence windows: `$1`/`$2` select them, `$3` is the limit.
const EVIDENCE_COLUMNS: &str = r#"SELECT host_id, seq, start, "end", estimated_ops, peak_flops, gpus, method, epoch,
    ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds FROM records"#;

fn add_window(acc: &mut UsageAccumulator, r: &postgres::Row) -> Result<(), StoreError> {
    acc.add(&WindowRow {
        tenant: get(r, 0)?,
        host_id: get(r, 1)?,
        start: get(r, 2)?,
        end: get(r, 3)?,
        gpu_seconds: get(r, 4)?,
        gpus: count_u32(get(r, 5)?),
        estimated_ops: get(r, 6)?,
        peak_flops: get(r, 7)?,
        method: get(r, 8)?,
        foreign_person: get(r, 9)?,
        ops_lower: get(r, 10)?,
        ops_upper: get(r, 11)?,
        shared_gpu_seconds: get(r, 12)?,
        guest_gap_gpu_seconds: get(r, 13)?,
        workload: get(r, 14)?,
    });
    Ok(())
}

impl PolicyStore for PgStore {
    fn current_policy(&self) -> Result<Option<PublishedPolicy>, StoreError> {
        let mut conn = self.checkout()?;
        let row = conn
            .client()?
            .query_opt(
                "SELECT version, token, claims_json, published_at FROM policies ORDER BY version DESC LIMIT 1",
                &[],
            )
            .map_err(pg_error)?;
        row.map(|row| {
            let claims: String = get(&row, 2)?;
            Ok(PublishedPolicy {
                version: to_u64(get(&row, 0)?)?,
                token: get(&row, 1)?,
                published_at: get(&row, 3)?,
                claims: serde_json::from_str(&claims).map_err(|e| corrupt("stored policy claims", e))?,
            })
        })
        .transpose()
    }

    fn publish_policy(&self, policy: &PublishedPolicy) -> Result<(), StoreError> {
        let claims = serde_json::to_string(&policy.claims).map_err(|e| corrupt("policy claims", e))?;
        let version = to_i64(policy.version)?;
        self.in_transaction("publish policy", |tx| {
            // EXCLUSIVE: one publisher at a time reads the current version and inserts;
            // readers of the current policy are not blocked.
            tx.batch_execute("LOCK TABLE policies IN EXCLUSIVE MODE")?;
            let row = tx.query_one("SELECT max(version) FROM policies", &[])?;
            if let Some(current) = get::<Option<i64>>(&row, 0)? {
                let current = to_u64(current)?;
                if policy.version <= current {
                    return Err(StoreError::PolicyNotNewer { offered: policy.version, current }.into());
                }
            }
            tx.execute(
                "INSERT INTO policies (version, token, claims_json, published_at) VALUES ($1, $2, $3, $4)",
                &[&version, &policy.token, &claims, &policy.published_at],
            )?;
            Ok(())
        })
    }
}

impl PgStore {
    /// Streams the windows `sql` selects (with `tenant` and `since` as `$1`, `$2`) through one
    /// accumulator.
    fn aggregate(
        &self,
        sql: &str,
        tenant: Option<&str>,
        since: Option<i64>,
    ) -> Result<FleetUsage, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let params: [&(dyn ToSql + Sync); 2] = [&tenant, &since];
        // Rows are read from the connection as they arrive, not collected first: memory
        // stays with the accumulator's maps, not with the number of windows.
        let mut rows = client.query_raw(sql, params).map_err(pg_error)?;
        let mut acc = UsageAccumulator::default();
        while let Some(row) = rows.next().map_err(pg_error)? {
            add_window(&mut acc, &row)?;
        }
        Ok(acc.finish_fleet())
    }

    /// The evidence windows `filter` (a WHERE clause over `$1`, `$2`) selects, most estimated
    /// operations first, at most `limit`.
    fn evidence(
        &self,
        filter: &str,
        key: (&str, Option<&str>),
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                &format!(
                    r#"{EVIDENCE_COLUMNS} WHERE {filter}
                       ORDER BY estimated_ops DESC, host_id COLLATE "C", epoch, seq LIMIT $3"#
                ),
                &[&key.0, &key.1, &i64::from(limit)],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                Ok(WindowEvidence {
                    host_id: get(r, 0)?,
                    epoch: to_u64(get(r, 8)?)?,
                    seq: to_u64(get(r, 1)?)?,
                    start: get(r, 2)?,
                    end: get(r, 3)?,
                    ops_lower: get(r, 9)?,
                    estimated_ops: get(r, 4)?,
                    ops_upper: get(r, 10)?,
                    shared_gpu_seconds: get(r, 11)?,
                    guest_gap_gpu_seconds: get(r, 12)?,
                    peak_flops: get(r, 5)?,
                    gpus: count_u32(get(r, 6)?),
                    method: get(r, 7)?,
                })
            })
            .collect()
    }
}

impl FleetStore for PgStore {
    fn tenant_usage(&self, tenant: Option<&str>, since: Option<i64>) -> Result<Vec<TenantUsage>, StoreError> {
        let sql = if tenant.is_some() { TENANT_WINDOWS_SQL } else { WINDOWS_SQL };
        Ok(self.aggregate(sql, tenant, since)?.tenants)
    }

    fn fleet_usage(&self, since: Option<i64>) -> Result<FleetUsage, StoreError> {
        self.aggregate(WINDOWS_SQL, None, since)
    }

    fn usage_evidence(&self, tenant: &str, limit: u32) -> Result<Vec<WindowEvidence>, StoreError> {
        self.evidence("tenant = $1 AND $2::text IS NULL", (tenant, None), limit)
    }

    fn unattributed_evidence(
        &self,
        host_id: &str,
        workload: &str,
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        self.evidence(
            "host_id = $1 AND workload = $2::text AND tenant IS NULL",
            (host_id, Some(workload)),
            limit,
        )
    }

    fn tenant_hosts(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT DISTINCT host_id COLLATE "C" AS h FROM records WHERE tenant = $1 ORDER BY h"#,
                &[&tenant],
            )
            .map_err(pg_error)?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    fn last_report_at(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut conn = self.checkout()?;
        // Per host one probe of the (host_id, received_at) index, not a scan of all records.
        let rows = conn
            .client()?
            .query(
                "SELECT h.host_id, (SELECT max(received_at) FROM records r WHERE r.host_id = h.host_id)
                 FROM (SELECT host_id FROM hosts UNION SELECT host_id FROM host_progress) h",
                &[],
            )
            .map_err(pg_error)?;
        let mut out = BTreeMap::new();
        for row in &rows {
            if let Some(at) = get::<Option<i64>>(row, 1)? {
                out.insert(get(row, 0)?, at);
            }
        }
        Ok(out)
    }

    fn upsert_tenant_identities(&self, identities: &[TenantIdentity]) -> Result<(), StoreError> {
        let mut rows = Vec::with_capacity(identities.len());
        for id in identities {
            let countries = serde_json::to_string(&id.countries).map_err(|e| corrupt("countries", e))?;
            let owners = serde_json::to_string(&id.beneficial_owner_countries)
                .map_err(|e| corrupt("owner countries", e))?;
            rows.push((id, countries, owners));
        }
        self.in_transaction("upsert tenant identities", |tx| {
            let upsert = tx.prepare(
                "INSERT INTO tenant_identities
                     (tenant, legal_name, countries, owner_countries, foreign_person, seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant) DO UPDATE SET
                     legal_name = excluded.legal_name, countries = excluded.countries,
                     owner_countries = excluded.owner_countries,
                     foreign_person = excluded.foreign_person, seen_at = excluded.seen_at
                 WHERE excluded.seen_at >= tenant_identities.seen_at",
            )?;
            for (id, countries, owners) in &rows {
                tx.execute(
                    &upsert,
                    &[&id.tenant, &id.legal_name, countries, owners, &id.foreign_person, &id.seen_at],
                )?;
            }
            Ok(())
        })
    }

    fn tenant_identities(&self) -> Result<Vec<TenantIdentity>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT tenant, legal_name, countries, owner_countries, foreign_person, seen_at
                   FROM tenant_identities ORDER BY tenant COLLATE "C""#,
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let countries: String = get(r, 2)?;
                let owners: String = get(r, 3)?;
                Ok(TenantIdentity {
                    tenant: get(r, 0)?,
                    legal_name: get(r, 1)?,
                    countries: serde_json::from_str(&countries)
                        .map_err(|e| corrupt("stored countries", e))?,
                    beneficial_owner_countries: serde_json::from_str(&owners)
                        .map_err(|e| corrupt("stored owner countries", e))?,
                    foreign_person: get(r, 4)?,
                    seen_at: get(r, 5)?,
                })
            })
            .collect()
    }

    fn raise_finding(&self, finding: &NewFinding, at: i64) -> Result<Option<i64>, StoreError> {
        let evidence = serde_json::to_string(&finding.evidence).map_err(|e| corrupt("evidence", e))?;
        let mut conn = self.checkout()?;
        // The partial unique index on open (kind, subject) makes this raise-once across
        // collector processes: a racing second insert waits for the first, then does nothing.
        let row = conn
            .client()?
            .query_opt(
                "INSERT INTO findings (kind, subject, tenant, host_id, foreign_person, summary,
                                       evidence_json, state, raised_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8)
                 ON CONFLICT (kind, subject) WHERE state = 'open' DO NOTHING
                 RETURNING id",
                &[
                    &finding.kind.as_str(),
                    &finding.subject,
                    &finding.tenant,
                    &finding.host_id,
                    &finding.foreign_person,
                    &finding.summary,
                    &evidence,
                    &at,
                ],
            )
            .map_err(pg_error)?;
        row.map(|r| get(&r, 0)).transpose()
    }

    fn resolve_finding(&self, id: i64, at: i64) -> Result<bool, StoreError> {
        let mut conn = self.checkout()?;
        let updated = conn
            .client()?
            .execute(
                "UPDATE findings SET state = 'resolved', resolved_at = $2 WHERE id = $1 AND state = 'open'",
                &[&id, &at],
            )
            .map_err(pg_error)?;
        Ok(updated > 0)
    }

    fn list_findings(&self, query: &FindingQuery) -> Result<Vec<Finding>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                "SELECT id, kind, subject, tenant, host_id, foreign_person, summary, evidence_json,
                        state, raised_at, resolved_at
                 FROM findings
                 WHERE id > $1 AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR kind = $3)
                   AND ($4::text IS NULL OR tenant = $4) AND ($5::text IS NULL OR host_id = $5)
                 ORDER BY id LIMIT $6",
                &[
                    &query.after_id,
                    &query.state.map(FindingState::as_str),
                    &query.kind.map(FindingKind::as_str),
                    &query.tenant,
                    &query.host_id,
                    &i64::from(query.limit),
                ],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let kind: String = get(r, 1)?;
                let evidence: String = get(r, 7)?;
                let state: String = get(r, 8)?;
                Ok(Finding {
                    id: get(r, 0)?,
                    finding: NewFinding {
                        kind: FindingKind::parse(&kind)
                            .ok_or_else(|| corrupt("stored finding kind", &kind))?,
                        subject: get(r, 2)?,
                        tenant: get(r, 3)?,
                        host_id: get(r, 4)?,
                        foreign_person: get(r, 5)?,
                        summary: get(r, 6)?,
                        evidence: serde_json::from_str(&evidence)
                            .map_err(|e| corrupt("stored finding evidence", e))?,
                    },
                    state: FindingState::parse(&state)
                        .ok_or_else(|| corrupt("stored finding state", &state))?,
                    raised_at: get(r, 9)?,
                    resolved_at: get(r, 10)?,
                })
            })
            .collect()
    }

    fn rejection_counts(&self, since: i64) -> Result<Vec<RejectionCount>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT host_id, count(*), max(rejected_at) FROM rejections WHERE rejected_at >= $1
                   GROUP BY host_id ORDER BY host_id COLLATE "C""#,
                &[&since],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                Ok(RejectionCount { host_id: get(r, 0)?, count: to_u64(get(r, 1)?)?, last_at: get(r, 2)? })
            })
            .collect()
    }

    fn rejections(&self, host_id: &str, limit: u32) -> Result<Vec<Rejection>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                "SELECT epoch, kind, detail, first_seq, last_seq, rejected_at FROM rejections
                 WHERE host_id = $1 ORDER BY id DESC LIMIT $2",
                &[&host_id, &i64::from(limit)],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let seqs = match (get::<Option<i64>>(r, 3)?, get::<Option<i64>>(r, 4)?) {
                    (Some(first), Some(last)) => Some((to_u64(first)?, to_u64(last)?)),
                    _ => None,
                };
                Ok(Rejection {
                    host_id: host_id.to_owned(),
                    epoch: to_u64(get(r, 0)?)?,
                    kind: get(r, 1)?,
                    detail: get(r, 2)?,
                    seqs,
                    rejected_at: get(r, 5)?,
                })
            })
            .collect()
    }
}
