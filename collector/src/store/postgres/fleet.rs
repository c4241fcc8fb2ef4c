//! The PostgreSQL backend of [`PolicyStore`] and [`FleetStore`], with the meaning of the SQLite
//! one (`store/sqlite/fleet.rs`); schema: [`super::schema::MIGRATION_FLEET`],
//! step 3 of [`super::MIGRATIONS`].
//!
//! Across collector processes:
//! - `publish_policy` takes an EXCLUSIVE lock on `policies` (readers proceed) before reading
//!   the current version, so of two concurrent publishers only one can win a version;
//! - findings and the audit log: see `findings.rs`;
//! - aggregation streams the windows from the server through [`UsageAccumulator`], the same
//!   code as SQLite's, so both backends compute identical numbers.
//!
//! Text ordering is by byte (`COLLATE "C"`), as SQLite orders, whatever the database's locale.

use std::collections::BTreeMap;

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::types::ToSql;

use super::driver::{get, pg_error, to_i64, Failed};
use super::PgStore;
use crate::fleet::rollup::check::TableCheck;
use crate::fleet::rollup::{Rollups, Segments, Tables};
use crate::fleet::{
    AuditRow, Finding, FindingAction, FindingQuery, FleetStore, FleetUsage, NewFinding, Period, Placement,
    RejectionCount, TenantIdentity, TenantUsage, UsageAccumulator, WindowEvidence, WindowRow,
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
    FROM records WHERE ($2::bigint IS NULL OR "end" > $2::bigint) AND ($3::bigint IS NULL OR start < $3::bigint)
      AND $1::text IS NULL"#;

/// The windows of one tenant, through the tenant index.
const TENANT_WINDOWS_SQL: &str = r#"
    SELECT tenant, host_id, start, "end", gpu_seconds, GREATEST(max_concurrent_gpus, gpus), estimated_ops,
           peak_flops, method, foreign_person, ops_lower, ops_upper, shared_gpu_seconds,
           guest_gap_gpu_seconds, CASE WHEN guest_gap_gpu_seconds > 0 THEN workload END
    FROM records WHERE tenant = $1::text AND ($2::bigint IS NULL OR "end" > $2::bigint)
      AND ($3::bigint IS NULL OR start < $3::bigint)"#;

/// Evidence windows: `$1`/`$2` select them, `$3` is the limit.
const EVIDENCE_COLUMNS: &str = r#"SELECT host_id, seq, start, "end", estimated_ops, peak_flops, gpus, method, epoch,
    ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds FROM records"#;

/// A window as the window queries select it (the columns of [`TENANT_WINDOWS_SQL`]),
/// borrowed from the row: for the raw aggregation and the roll-ups' rebuild alike.
pub(in crate::store::postgres) fn read_window(r: &postgres::Row) -> Result<WindowRow<'_>, StoreError> {
    Ok(WindowRow {
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
    })
}

fn add_window(acc: &mut UsageAccumulator, r: &postgres::Row) -> Result<(), StoreError> {
    acc.add(&read_window(r)?);
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
    fn aggregate(&self, sql: &str, tenant: Option<&str>, period: Period) -> Result<FleetUsage, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let mut acc = UsageAccumulator::with_placements(placements_on(client)?);
        let params: [&(dyn ToSql + Sync); 3] = [&tenant, &period.since, &period.until];
        // Rows are read from the connection as they arrive, not collected first: memory
        // stays with the accumulator's maps, not with the number of windows.
        let mut rows = client.query_raw(sql, params).map_err(pg_error)?;
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
        span: (i64, i64),
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                &format!(
                    r#"{EVIDENCE_COLUMNS} WHERE {filter} AND "end" > $4 AND start < $5
                       ORDER BY estimated_ops DESC, host_id COLLATE "C", epoch, seq LIMIT $3"#
                ),
                &[&key.0, &key.1, &i64::from(limit), &span.0, &span.1],
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

/// Every placed host's placement, read on `client`.
fn placements_on(client: &mut postgres::Client) -> Result<Vec<(String, Placement)>, StoreError> {
    let rows = client
        .query(r#"SELECT host_id, site, fabric FROM host_placement ORDER BY host_id COLLATE "C""#, &[])
        .map_err(pg_error)?;
    rows.iter().map(|r| Ok((get(r, 0)?, Placement { site: get(r, 1)?, fabric: get(r, 2)? }))).collect()
}

impl FleetStore for PgStore {
    fn set_host_placement(
        &self,
        host_id: &str,
        placement: Option<&Placement>,
        at: i64,
    ) -> Result<bool, StoreError> {
        self.in_transaction("set host placement", |tx| {
            if tx.query_opt("SELECT 1 FROM hosts WHERE host_id = $1", &[&host_id])?.is_none() {
                return Ok(false);
            }
            match placement {
                Some(p) => tx.execute(
                    "INSERT INTO host_placement (host_id, site, fabric, set_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (host_id) DO UPDATE SET site = excluded.site, fabric = excluded.fabric,
                                                         set_at = excluded.set_at",
                    &[&host_id, &p.site, &p.fabric, &at],
                )?,
                None => tx.execute("DELETE FROM host_placement WHERE host_id = $1", &[&host_id])?,
            };
            Ok(true)
        })
    }

    fn host_placements(&self) -> Result<Vec<(String, Placement)>, StoreError> {
        let mut conn = self.checkout()?;
        placements_on(conn.client()?)
    }

    fn tenant_usage_in(&self, tenant: Option<&str>, period: Period) -> Result<Vec<TenantUsage>, StoreError> {
        if period == Period::default() {
            let mut conn = self.checkout()?;
            let rollups = super::rollups::read_rollups(conn.client()?, tenant, Tables::View, Segments::All)?;
            return Ok(crate::fleet::rollup::assemble::assemble(&rollups).tenants);
        }
        let sql = if tenant.is_some() { TENANT_WINDOWS_SQL } else { WINDOWS_SQL };
        Ok(self.aggregate(sql, tenant, period)?.tenants)
    }

    fn rollup_usage(&self, segments: Segments) -> Result<FleetUsage, StoreError> {
        let mut conn = self.checkout()?;
        let rollups = super::rollups::read_rollups(conn.client()?, None, Tables::View, segments)?;
        Ok(crate::fleet::rollup::assemble::assemble(&rollups))
    }

    fn fleet_usage_from_windows(&self, period: Period) -> Result<FleetUsage, StoreError> {
        self.aggregate(WINDOWS_SQL, None, period)
    }

    fn rollup_check(&self) -> Result<Vec<TableCheck>, StoreError> {
        let mut conn = self.checkout()?;
        super::rollups::check(conn.client()?)
    }

    fn rollup_rebuild(&self, now: i64) -> Result<u64, StoreError> {
        let mut conn = self.checkout()?;
        let (client, stmts) = conn.parts()?;
        let Some(st) = &stmts.rollups else {
            return Err(StoreError::Unsupported("this database has no roll-up tables".into()));
        };
        let done = (|| {
            let mut tx = client.transaction()?;
            let windows = super::rollups::rebuild(&mut tx, st, now, false)?;
            tx.commit()?;
            Ok::<_, Failed>(windows.unwrap_or(0))
        })();
        match done {
            Ok(windows) => Ok(windows),
            Err(Failed::Pg(e)) => Err(pg_error(e)),
            Err(Failed::Store(e)) => Err(e),
        }
    }

    fn fleet_usage_in(&self, period: Period) -> Result<FleetUsage, StoreError> {
        if period == Period::default() {
            let mut conn = self.checkout()?;
            let rollups = super::rollups::read_rollups(conn.client()?, None, Tables::View, Segments::All)?;
            return Ok(crate::fleet::rollup::assemble::assemble(&rollups));
        }
        self.aggregate(WINDOWS_SQL, None, period)
    }

    fn run_evidence(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        self.evidence("tenant = $1 AND $2::text IS NULL", (tenant, None), (from, to), limit)
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
            (i64::MIN, i64::MAX),
            limit,
        )
    }

    fn run_hosts(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT DISTINCT host COLLATE "C" AS h FROM rollup_segment_hosts
                   WHERE tenant = $1 AND start >= $2 AND start <= $3 ORDER BY h"#,
                &[&tenant, &from, &to],
            )
            .map_err(pg_error)?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    fn tenant_hosts(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT host COLLATE "C" AS h FROM rollup_hosts
                   WHERE tenant = $1 AND subject_host = '' AND subject_workload = '' ORDER BY h"#,
                &[&tenant],
            )
            .map_err(pg_error)?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    fn tenant_rollups(&self, tenant: &str) -> Result<Rollups, StoreError> {
        let mut conn = self.checkout()?;
        super::rollups::read_rollups(conn.client()?, Some(tenant), Tables::History, Segments::None)
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
            let detail = id
                .detail
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| corrupt("identity detail", e))?;
            rows.push((id, countries, owners, detail));
        }
        self.in_transaction("upsert tenant identities", |tx| {
            let upsert = tx.prepare(
                "INSERT INTO tenant_identities
                     (tenant, legal_name, countries, owner_countries, foreign_person, seen_at, detail_json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (tenant) DO UPDATE SET
                     legal_name = excluded.legal_name, countries = excluded.countries,
                     owner_countries = excluded.owner_countries,
                     foreign_person = excluded.foreign_person, seen_at = excluded.seen_at,
                     detail_json = excluded.detail_json
                 WHERE excluded.seen_at >= tenant_identities.seen_at",
            )?;
            for (id, countries, owners, detail) in &rows {
                tx.execute(
                    &upsert,
                    &[&id.tenant, &id.legal_name, countries, owners, &id.foreign_person, &id.seen_at, detail],
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
                r#"SELECT tenant, legal_name, countries, owner_countries, foreign_person, seen_at, detail_json
                   FROM tenant_identities ORDER BY tenant COLLATE "C""#,
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let countries: String = get(r, 2)?;
                let owners: String = get(r, 3)?;
                let detail: Option<String> = get(r, 6)?;
                Ok(TenantIdentity {
                    detail: detail
                        .map(|d| serde_json::from_str(&d))
                        .transpose()
                        .map_err(|e| corrupt("stored identity detail", e))?,
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
        self.insert_finding(finding, at)
    }

    fn resolve_finding(&self, id: i64, at: i64) -> Result<bool, StoreError> {
        self.mark_resolved(id, at)
    }

    fn list_findings(&self, query: &FindingQuery) -> Result<Vec<Finding>, StoreError> {
        self.select_findings(query)
    }

    fn act_on_finding(
        &self,
        id: i64,
        action: &FindingAction,
        actor: &str,
        at: i64,
    ) -> Result<Finding, StoreError> {
        self.take_action(id, action, actor, at)
    }

    fn append_audit(&self, at: i64, event: &serde_json::Value) -> Result<u64, StoreError> {
        self.append_audit_event(at, event)
    }

    fn audit_records(&self, from_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        self.read_audit(from_seq, limit)
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
