//! The SQLite backend of [`PolicyStore`] and [`FleetStore`] (schema: [`super::schema::MIGRATION_FLEET`],
//! step 3 of [`super::MIGRATIONS`]).
//!
//! Aggregation and listings read on a fresh read-only connection of their own: in WAL mode it
//! sees the last committed state without taking the writer's mutex, so a multi-second
//! aggregation over millions of windows never stalls report ingest. Opening one costs well
//! under a millisecond, noise next to the queries it serves.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::driver::{db_error, to_i64, BUSY_TIMEOUT};
use super::SqliteStore;
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

impl SqliteStore {
    pub(super) fn reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            self.path(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
        Ok(conn)
    }
}

impl PolicyStore for SqliteStore {
    fn current_policy(&self) -> Result<Option<PublishedPolicy>, StoreError> {
        let conn = self.reader()?;
        let row: Option<(i64, String, String, i64)> = conn
            .query_row(
                "SELECT version, token, claims_json, published_at FROM policies ORDER BY version DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db_error)?;
        row.map(|(version, token, claims, published_at)| {
            Ok(PublishedPolicy {
                version: to_u64(version)?,
                token,
                published_at,
                claims: serde_json::from_str(&claims).map_err(|e| corrupt("stored policy claims", e))?,
            })
        })
        .transpose()
    }

    fn publish_policy(&self, policy: &PublishedPolicy) -> Result<(), StoreError> {
        let claims = serde_json::to_string(&policy.claims).map_err(|e| corrupt("policy claims", e))?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        let current: Option<i64> =
            tx.query_row("SELECT MAX(version) FROM policies", [], |r| r.get(0)).map_err(db_error)?;
        if let Some(current) = current {
            let current = to_u64(current)?;
            if policy.version <= current {
                return Err(StoreError::PolicyNotNewer { offered: policy.version, current });
            }
        }
        tx.execute(
            "INSERT INTO policies (version, token, claims_json, published_at) VALUES (?1, ?2, ?3, ?4)",
            params![to_i64(policy.version)?, policy.token, claims, policy.published_at],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    }
}

/// Every window of the aggregation, one table scan (the `NOT INDEXED` variant: reading the
/// whole table in rowid order beats walking the tenant index into random row lookups). Windows
/// without a tenant are aggregated per (host, workload), so their workload is read too.
pub(super) const WINDOWS_SQL: &str = r#"
    SELECT tenant, host_id, start, "end", gpu_seconds, MAX(max_concurrent_gpus, gpus), estimated_ops,
           peak_flops, method, foreign_person, ops_lower, ops_upper, shared_gpu_seconds,
           guest_gap_gpu_seconds, CASE WHEN guest_gap_gpu_seconds > 0 OR tenant IS NULL THEN workload END
    FROM records NOT INDEXED WHERE (?2 IS NULL OR "end" > ?2) AND (?3 IS NULL OR start < ?3)"#;

/// The windows of one tenant, through the tenant index.
const TENANT_WINDOWS_SQL: &str = r#"
    SELECT tenant, host_id, start, "end", gpu_seconds, MAX(max_concurrent_gpus, gpus), estimated_ops,
           peak_flops, method, foreign_person, ops_lower, ops_upper, shared_gpu_seconds,
           guest_gap_gpu_seconds, CASE WHEN guest_gap_gpu_seconds > 0 THEN workload END
    FROM records WHERE tenant = ?1 AND (?2 IS NULL OR "end" > ?2) AND (?3 IS NULL OR start < ?3)"#;

/// Evidence windows: `?1`/`?2` select them, `?3` is the limit.
const EVIDENCE_COLUMNS: &str = r#"SELECT host_id, seq, start, "end", estimated_ops, peak_flops, gpus, method, epoch,
    ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds FROM records"#;

/// Hands the window of row `r` (as [`WINDOWS_SQL`] selects it) to `f`.
pub(super) fn read_window<T>(
    r: &rusqlite::Row<'_>,
    f: impl FnOnce(&WindowRow<'_>) -> T,
) -> rusqlite::Result<T> {
    use rusqlite::types::ValueRef;
    let text = |i: usize| -> rusqlite::Result<&str> {
        match r.get_ref(i)? {
            ValueRef::Text(t) => std::str::from_utf8(t).map_err(rusqlite::Error::Utf8Error),
            other => Err(rusqlite::Error::InvalidColumnType(i, String::new(), other.data_type())),
        }
    };
    let optional_text = |i: usize| -> rusqlite::Result<Option<&str>> {
        match r.get_ref(i)? {
            ValueRef::Null => Ok(None),
            _ => text(i).map(Some),
        }
    };
    Ok(f(&WindowRow {
        tenant: optional_text(0)?,
        host_id: text(1)?,
        start: r.get(2)?,
        end: r.get(3)?,
        gpu_seconds: r.get(4)?,
        gpus: count_u32(r.get(5)?),
        estimated_ops: r.get(6)?,
        peak_flops: r.get(7)?,
        method: text(8)?,
        foreign_person: r.get::<_, i64>(9)? != 0,
        ops_lower: r.get(10)?,
        ops_upper: r.get(11)?,
        shared_gpu_seconds: r.get(12)?,
        guest_gap_gpu_seconds: r.get(13)?,
        workload: optional_text(14)?,
    }))
}

impl SqliteStore {
    /// Streams the windows `sql` selects (with `tenant` and `since` as `?1`, `?2`) through
    /// one accumulator.
    fn aggregate(&self, sql: &str, tenant: Option<&str>, period: Period) -> Result<FleetUsage, StoreError> {
        let conn = self.reader()?;
        let mut acc = UsageAccumulator::with_placements(placements_on(&conn)?);
        let mut stmt = conn.prepare(sql).map_err(db_error)?;
        let mut rows = stmt.query(params![tenant, period.since, period.until]).map_err(db_error)?;
        while let Some(r) = rows.next().map_err(db_error)? {
            read_window(r, |w| acc.add(w)).map_err(db_error)?;
        }
        Ok(acc.finish_fleet())
    }

    /// The evidence windows `filter` (a WHERE clause over `?1`, `?2`) selects that overlap
    /// `span`, most estimated operations first, at most `limit`.
    fn evidence(
        &self,
        filter: &str,
        key: (&str, Option<&str>),
        span: (i64, i64),
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(&format!(
                r#"{EVIDENCE_COLUMNS} WHERE {filter} AND "end" > ?4 AND start < ?5
                   ORDER BY estimated_ops DESC, host_id, epoch, seq LIMIT ?3"#
            ))
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![key.0, key.1, limit, span.0, span.1], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get::<_, i64>(6)?,
                    r.get(7)?,
                    r.get::<_, i64>(8)?,
                    (r.get(9)?, r.get(10)?, r.get(11)?, r.get(12)?),
                ))
            })
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (host_id, seq, start, end, estimated_ops, peak_flops, gpus, method, epoch, bounds) =
                row.map_err(db_error)?;
            let (ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds) = bounds;
            out.push(WindowEvidence {
                host_id,
                epoch: to_u64(epoch)?,
                seq: to_u64(seq)?,
                start,
                end,
                ops_lower,
                estimated_ops,
                ops_upper,
                shared_gpu_seconds,
                guest_gap_gpu_seconds,
                peak_flops,
                gpus: count_u32(gpus),
                method,
            });
        }
        Ok(out)
    }
}

/// Every placed host's placement, read on `conn`.
pub(super) fn placements_on(conn: &Connection) -> Result<Vec<(String, Placement)>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT host_id, site, fabric FROM host_placement ORDER BY host_id")
        .map_err(db_error)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, Placement { site: r.get(1)?, fabric: r.get(2)? })))
        .map_err(db_error)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_error)
}

impl FleetStore for SqliteStore {
    fn set_host_placement(
        &self,
        host_id: &str,
        placement: Option<&Placement>,
        at: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        let enrolled = tx
            .query_row("SELECT 1 FROM hosts WHERE host_id = ?1", [host_id], |_| Ok(()))
            .optional()
            .map_err(db_error)?;
        if enrolled.is_none() {
            return Ok(false);
        }
        match placement {
            Some(p) => tx.execute(
                "INSERT INTO host_placement (host_id, site, fabric, set_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (host_id) DO UPDATE SET site = excluded.site, fabric = excluded.fabric,
                                                     set_at = excluded.set_at",
                params![host_id, p.site, p.fabric, at],
            ),
            None => tx.execute("DELETE FROM host_placement WHERE host_id = ?1", [host_id]),
        }
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(true)
    }

    fn host_placements(&self) -> Result<Vec<(String, Placement)>, StoreError> {
        placements_on(&self.reader()?)
    }

    fn tenant_usage_in(&self, tenant: Option<&str>, period: Period) -> Result<Vec<TenantUsage>, StoreError> {
        if period == Period::default() {
            return Ok(super::rollups::usage(&self.reader()?, tenant, Segments::All)?.tenants);
        }
        let sql = if tenant.is_some() { TENANT_WINDOWS_SQL } else { WINDOWS_SQL };
        Ok(self.aggregate(sql, tenant, period)?.tenants)
    }

    fn fleet_usage_in(&self, period: Period) -> Result<FleetUsage, StoreError> {
        if period == Period::default() {
            return super::rollups::usage(&self.reader()?, None, Segments::All);
        }
        self.aggregate(WINDOWS_SQL, None, period)
    }

    fn rollup_usage(&self, segments: Segments) -> Result<FleetUsage, StoreError> {
        super::rollups::usage(&self.reader()?, None, segments)
    }

    fn fleet_usage_from_windows(&self, period: Period) -> Result<FleetUsage, StoreError> {
        self.aggregate(WINDOWS_SQL, None, period)
    }

    fn rollup_check(&self) -> Result<Vec<TableCheck>, StoreError> {
        super::rollups::check(&mut self.reader()?)
    }

    fn rollup_rebuild(&self, now: i64) -> Result<u64, StoreError> {
        super::rollups::rebuild(&mut *self.lock()?, now)
    }

    fn run_evidence(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        self.evidence("tenant = ?1 AND ?2 IS NULL", (tenant, None), (from, to), limit)
    }

    fn unattributed_evidence(
        &self,
        host_id: &str,
        workload: &str,
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError> {
        self.evidence(
            "host_id = ?1 AND workload = ?2 AND tenant IS NULL",
            (host_id, Some(workload)),
            (i64::MIN, i64::MAX),
            limit,
        )
    }

    fn run_hosts(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, StoreError> {
        super::rollups::hosts(
            &self.reader()?,
            "SELECT DISTINCT host FROM rollup_segment_hosts WHERE tenant = ?1 AND start >= ?2 AND start <= ?3
             ORDER BY host",
            &[&tenant, &from, &to],
        )
    }

    fn tenant_hosts(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        super::rollups::tenant_hosts(&self.reader()?, tenant)
    }

    fn tenant_rollups(&self, tenant: &str) -> Result<Rollups, StoreError> {
        super::rollups::read_rollups(&self.reader()?, Some(tenant), Tables::History, Segments::None)
    }

    fn last_report_at(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.reader()?;
        // Per host one probe of the (host_id, received_at) index, not a scan of all records.
        let mut stmt = conn
            .prepare(
                "SELECT h.host_id, (SELECT MAX(received_at) FROM records r WHERE r.host_id = h.host_id)
                 FROM (SELECT host_id FROM hosts UNION SELECT host_id FROM host_progress) h",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)))
            .map_err(db_error)?;
        let mut out = BTreeMap::new();
        for row in rows {
            if let (host, Some(at)) = row.map_err(db_error)? {
                out.insert(host, at);
            }
        }
        Ok(out)
    }

    fn upsert_tenant_identities(&self, identities: &[TenantIdentity]) -> Result<(), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO tenant_identities
                         (tenant, legal_name, countries, owner_countries, foreign_person, seen_at, detail_json)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tenant) DO UPDATE SET
                         legal_name = excluded.legal_name, countries = excluded.countries,
                         owner_countries = excluded.owner_countries,
                         foreign_person = excluded.foreign_person, seen_at = excluded.seen_at,
                         detail_json = excluded.detail_json
                     WHERE excluded.seen_at >= tenant_identities.seen_at",
                )
                .map_err(db_error)?;
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
                upsert
                    .execute(params![
                        id.tenant,
                        id.legal_name,
                        countries,
                        owners,
                        id.foreign_person,
                        id.seen_at,
                        detail
                    ])
                    .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }

    fn tenant_identities(&self) -> Result<Vec<TenantIdentity>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(
                "SELECT tenant, legal_name, countries, owner_countries, foreign_person, seen_at, detail_json
                 FROM tenant_identities ORDER BY tenant",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (tenant, legal_name, countries, owners, foreign, seen_at, detail) = row.map_err(db_error)?;
            out.push(TenantIdentity {
                detail: detail
                    .map(|d| serde_json::from_str(&d))
                    .transpose()
                    .map_err(|e| corrupt("stored identity detail", e))?,
                countries: serde_json::from_str(&countries).map_err(|e| corrupt("stored countries", e))?,
                beneficial_owner_countries: serde_json::from_str(&owners)
                    .map_err(|e| corrupt("stored owner countries", e))?,
                tenant,
                legal_name,
                foreign_person: foreign != 0,
                seen_at,
            });
        }
        Ok(out)
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
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(
                "SELECT host_id, COUNT(*), MAX(rejected_at) FROM rejections WHERE rejected_at >= ?1
                 GROUP BY host_id ORDER BY host_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([since], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (host_id, count, last_at) = row.map_err(db_error)?;
            out.push(RejectionCount { host_id, count: to_u64(count)?, last_at });
        }
        Ok(out)
    }

    fn rejections(&self, host_id: &str, limit: u32) -> Result<Vec<Rejection>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(
                "SELECT epoch, kind, detail, first_seq, last_seq, rejected_at FROM rejections
                 WHERE host_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![host_id, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (epoch, kind, detail, first, last, rejected_at) = row.map_err(db_error)?;
            let seqs = match (first, last) {
                (Some(first), Some(last)) => Some((to_u64(first)?, to_u64(last)?)),
                _ => None,
            };
            out.push(Rejection {
                host_id: host_id.to_owned(),
                epoch: to_u64(epoch)?,
                kind,
                detail,
                seqs,
                rejected_at,
            });
        }
        Ok(out)
    }
}
