//! The PostgreSQL backend of the findings part of [`crate::fleet::FleetStore`], with the
//! meaning of the SQLite one (`store/sqlite/findings.rs`).
//!
//! Across collector processes: raising relies on the partial unique index on active (kind,
//! subject) (a racing second insert waits for the first, then does nothing); an action locks
//! its finding's row (`FOR UPDATE`) and the audit log (`SHARE ROW EXCLUSIVE`, one appender
//! at a time, readers proceed), so two operators acting at once are serialised, the second
//! sees the first's state, and the chain never forks.

use postgres::types::ToSql;

use super::driver::{get, pg_error, to_i64, Failed};
use super::PgStore;
use crate::fleet::lifecycle::next_audit_record;
use crate::fleet::{AuditRow, Finding, FindingAction, FindingKind, FindingQuery, FindingState, NewFinding};
use crate::store::error::StoreError;
use crate::store::schema::{action_columns, corrupt, to_u64, StoredFinding, FINDING_COLUMNS};

fn stored_finding(r: &postgres::Row) -> Result<StoredFinding, StoreError> {
    Ok(StoredFinding {
        id: get(r, 0)?,
        kind: get(r, 1)?,
        subject: get(r, 2)?,
        tenant: get(r, 3)?,
        host_id: get(r, 4)?,
        foreign_person: get(r, 5)?,
        summary: get(r, 6)?,
        evidence_json: get(r, 7)?,
        state: get(r, 8)?,
        raised_at: get(r, 9)?,
        resolved_at: get(r, 10)?,
        due_at: get(r, 11)?,
        acknowledged: (get(r, 12)?, get(r, 13)?),
        filed: (get(r, 14)?, get(r, 15)?, get(r, 16)?),
        dismissed: (get(r, 17)?, get(r, 18)?, get(r, 19)?),
    })
}

/// Appends `event` to the audit log inside `tx`; returns its seq.
fn append_in(tx: &mut postgres::Transaction<'_>, at: i64, event: &serde_json::Value) -> Result<u64, Failed> {
    tx.batch_execute("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")?;
    let last = tx.query_opt("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", &[])?;
    let last = match last {
        Some(row) => Some((to_u64(get(&row, 0)?)?, get::<String>(&row, 1)?)),
        None => None,
    };
    let (seq, line, hash) = next_audit_record(last, at, event)?;
    tx.execute(
        "INSERT INTO audit_log (seq, ts, hash, line) VALUES ($1, $2, $3, $4)",
        &[&to_i64(seq)?, &at, &hash, &line],
    )?;
    Ok(seq)
}

impl PgStore {
    pub(super) fn insert_finding(&self, finding: &NewFinding, at: i64) -> Result<Option<i64>, StoreError> {
        let evidence = serde_json::to_string(&finding.evidence).map_err(|e| corrupt("evidence", e))?;
        let mut conn = self.checkout()?;
        let row = conn
            .client()?
            .query_opt(
                "INSERT INTO findings (kind, subject, tenant, host_id, foreign_person, summary,
                                       evidence_json, state, raised_at, due_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8, $9)
                 ON CONFLICT (kind, subject) WHERE state <> 'resolved' DO NOTHING
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
                    &finding.due_at,
                ],
            )
            .map_err(pg_error)?;
        row.map(|r| get(&r, 0)).transpose()
    }

    pub(super) fn mark_resolved(&self, id: i64, at: i64) -> Result<bool, StoreError> {
        let mut conn = self.checkout()?;
        let updated = conn
            .client()?
            .execute(
                "UPDATE findings SET state = 'resolved', resolved_at = $2 WHERE id = $1 AND state <> 'resolved'",
                &[&id, &at],
            )
            .map_err(pg_error)?;
        Ok(updated > 0)
    }

    pub(super) fn select_findings(&self, query: &FindingQuery) -> Result<Vec<Finding>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                &format!(
                    "SELECT {FINDING_COLUMNS} FROM findings
                     WHERE id > $1 AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR kind = $3)
                       AND ($4::text IS NULL OR tenant = $4) AND ($5::text IS NULL OR host_id = $5)
                       AND (NOT $7 OR state <> 'resolved') AND ($8::bigint IS NULL OR id = $8)
                     ORDER BY id LIMIT $6"
                ),
                &[
                    &query.after_id,
                    &query.state.map(FindingState::as_str),
                    &query.kind.map(FindingKind::as_str),
                    &query.tenant,
                    &query.host_id,
                    &i64::from(query.limit),
                    &query.active,
                    &query.id,
                ],
            )
            .map_err(pg_error)?;
        rows.iter().map(|r| stored_finding(r)?.decode()).collect()
    }

    pub(super) fn take_action(
        &self,
        id: i64,
        action: &FindingAction,
        actor: &str,
        at: i64,
    ) -> Result<Finding, StoreError> {
        action.validate(actor)?;
        self.in_transaction("finding action", |tx| {
            let row = tx
                .query_opt("SELECT state, kind, subject FROM findings WHERE id = $1 FOR UPDATE", &[&id])?
                .ok_or(StoreError::FindingNotFound(id))?;
            let (state, kind, subject): (String, String, String) =
                (get(&row, 0)?, get(&row, 1)?, get(&row, 2)?);
            let from = FindingState::parse(&state).ok_or_else(|| corrupt("stored finding state", &state))?;
            let kind = FindingKind::parse(&kind).ok_or_else(|| corrupt("stored finding kind", &kind))?;
            let to = action.transition(id, from)?;
            let (by, when, text) = action_columns(action);
            let set_text = text.map(|(column, _)| format!(", {column} = $5")).unwrap_or_default();
            let value = text.map(|(_, value)| value);
            let to_name = to.as_str();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &to_name, &actor, &at];
            if value.is_some() {
                params.push(&value);
            }
            tx.execute(
                &format!("UPDATE findings SET state = $2, {by} = $3, {when} = $4{set_text} WHERE id = $1"),
                &params,
            )?;
            append_in(tx, at, &action.audit_event(id, kind, &subject, from, to, actor))?;
            Ok(())
        })?;
        let query = FindingQuery { id: Some(id), limit: 1, ..FindingQuery::default() };
        self.select_findings(&query)?.pop().ok_or(StoreError::FindingNotFound(id))
    }

    pub(super) fn append_audit_event(&self, at: i64, event: &serde_json::Value) -> Result<u64, StoreError> {
        self.in_transaction("audit append", |tx| append_in(tx, at, event))
    }

    pub(super) fn read_audit(&self, from_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                "SELECT seq, line, hash FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2",
                &[&to_i64(from_seq)?, &i64::from(limit)],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| Ok(AuditRow { seq: to_u64(get(r, 0)?)?, line: get(r, 1)?, hash: get(r, 2)? }))
            .collect()
    }
}
