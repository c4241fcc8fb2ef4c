//! The SQLite backend of the findings part of [`crate::fleet::FleetStore`]: raising once per
//! active (kind, subject), resolving, listing, the lifecycle actions and the collector's
//! audit log (schema: [`super::schema::MIGRATION_FLEET`] and
//! [`super::schema::MIGRATION_LIFECYCLE`]).
//!
//! An action and its audit record commit in one IMMEDIATE transaction under the writer's
//! mutex, so no two actions interleave and the chain never forks.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::driver::{db_error, to_i64};
use super::SqliteStore;
use crate::fleet::lifecycle::next_audit_record;
use crate::fleet::{AuditRow, Finding, FindingAction, FindingQuery, FindingState, NewFinding};
use crate::store::error::StoreError;
use crate::store::schema::{action_columns, corrupt, to_u64, StoredFinding, FINDING_COLUMNS};

fn stored_finding(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredFinding> {
    Ok(StoredFinding {
        id: r.get(0)?,
        kind: r.get(1)?,
        subject: r.get(2)?,
        tenant: r.get(3)?,
        host_id: r.get(4)?,
        foreign_person: r.get::<_, Option<i64>>(5)?.map(|v| v != 0),
        summary: r.get(6)?,
        evidence_json: r.get(7)?,
        state: r.get(8)?,
        raised_at: r.get(9)?,
        resolved_at: r.get(10)?,
        due_at: r.get(11)?,
        acknowledged: (r.get(12)?, r.get(13)?),
        filed: (r.get(14)?, r.get(15)?, r.get(16)?),
        dismissed: (r.get(17)?, r.get(18)?, r.get(19)?),
    })
}

/// Appends `event` to the audit log inside `tx`; returns its seq.
fn append_in(tx: &rusqlite::Transaction<'_>, at: i64, event: &serde_json::Value) -> Result<u64, StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(db_error)?;
    let last = last.map(|(seq, hash)| Ok::<_, StoreError>((to_u64(seq)?, hash))).transpose()?;
    let (seq, line, hash) = next_audit_record(last, at, event)?;
    tx.execute(
        "INSERT INTO audit_log (seq, ts, hash, line) VALUES (?1, ?2, ?3, ?4)",
        params![to_i64(seq)?, at, hash, line],
    )
    .map_err(db_error)?;
    Ok(seq)
}

impl SqliteStore {
    pub(super) fn insert_finding(&self, finding: &NewFinding, at: i64) -> Result<Option<i64>, StoreError> {
        let evidence = serde_json::to_string(&finding.evidence).map_err(|e| corrupt("evidence", e))?;
        let conn = self.lock()?;
        // The partial unique index on active (kind, subject) makes this raise-once even across
        // collector processes sharing the database.
        let inserted = conn
            .prepare_cached(
                "INSERT INTO findings (kind, subject, tenant, host_id, foreign_person, summary,
                                       evidence_json, state, raised_at, due_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'open', ?8, ?9)
                 ON CONFLICT (kind, subject) WHERE state <> 'resolved' DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    finding.kind.as_str(),
                    finding.subject,
                    finding.tenant,
                    finding.host_id,
                    finding.foreign_person,
                    finding.summary,
                    evidence,
                    at,
                    finding.due_at
                ])
            })
            .map_err(db_error)?;
        Ok((inserted > 0).then(|| conn.last_insert_rowid()))
    }

    pub(super) fn mark_resolved(&self, id: i64, at: i64) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        let updated = conn
            .execute(
                "UPDATE findings SET state = 'resolved', resolved_at = ?2 WHERE id = ?1 AND state <> 'resolved'",
                params![id, at],
            )
            .map_err(db_error)?;
        Ok(updated > 0)
    }

    pub(super) fn select_findings(&self, query: &FindingQuery) -> Result<Vec<Finding>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {FINDING_COLUMNS} FROM findings
                 WHERE id > ?1 AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR kind = ?3)
                   AND (?4 IS NULL OR tenant = ?4) AND (?5 IS NULL OR host_id = ?5)
                   AND (?7 = 0 OR state <> 'resolved') AND (?8 IS NULL OR id = ?8)
                 ORDER BY id LIMIT ?6"
            ))
            .map_err(db_error)?;
        let rows = stmt
            .query_map(
                params![
                    query.after_id,
                    query.state.map(FindingState::as_str),
                    query.kind.map(crate::fleet::FindingKind::as_str),
                    query.tenant,
                    query.host_id,
                    query.limit,
                    query.active,
                    query.id
                ],
                stored_finding,
            )
            .map_err(db_error)?;
        rows.map(|row| row.map_err(db_error)?.decode()).collect()
    }

    pub(super) fn take_action(
        &self,
        id: i64,
        action: &FindingAction,
        actor: &str,
        at: i64,
    ) -> Result<Finding, StoreError> {
        action.validate(actor)?;
        {
            let mut conn = self.lock()?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
            let row: Option<(String, String, String)> = tx
                .query_row("SELECT state, kind, subject FROM findings WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(db_error)?;
            let (state, kind, subject) = row.ok_or(StoreError::FindingNotFound(id))?;
            let from = FindingState::parse(&state).ok_or_else(|| corrupt("stored finding state", &state))?;
            let kind = crate::fleet::FindingKind::parse(&kind)
                .ok_or_else(|| corrupt("stored finding kind", &kind))?;
            let to = action.transition(id, from)?;
            let (by, when, text) = action_columns(action);
            let updated = match text {
                Some((column, value)) => tx.execute(
                    &format!(
                        "UPDATE findings SET state = ?2, {by} = ?3, {when} = ?4, {column} = ?5 WHERE id = ?1"
                    ),
                    params![id, to.as_str(), actor, at, value],
                ),
                None => tx.execute(
                    &format!("UPDATE findings SET state = ?2, {by} = ?3, {when} = ?4 WHERE id = ?1"),
                    params![id, to.as_str(), actor, at],
                ),
            };
            updated.map_err(db_error)?;
            append_in(&tx, at, &action.audit_event(id, kind, &subject, from, to, actor))?;
            tx.commit().map_err(db_error)?;
        }
        let query = FindingQuery { id: Some(id), limit: 1, ..FindingQuery::default() };
        self.select_findings(&query)?.pop().ok_or(StoreError::FindingNotFound(id))
    }

    pub(super) fn append_audit_event(&self, at: i64, event: &serde_json::Value) -> Result<u64, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        let seq = append_in(&tx, at, event)?;
        tx.commit().map_err(db_error)?;
        Ok(seq)
    }

    pub(super) fn read_audit(&self, from_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare("SELECT seq, line, hash FROM audit_log WHERE seq >= ?1 ORDER BY seq LIMIT ?2")
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![to_i64(from_seq)?, limit], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .map_err(db_error)?;
        rows.map(|row| {
            let (seq, line, hash) = row.map_err(db_error)?;
            Ok(AuditRow { seq: to_u64(seq)?, line, hash })
        })
        .collect()
    }
}
