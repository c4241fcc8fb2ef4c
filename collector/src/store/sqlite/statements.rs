//! The SQLite backend of [`StatementStore`], on the same connection as the report store.
//!
//! Tables (migration [`super::schema::MIGRATION_POLLING`]):
//! - `host_agents`: the agent URL of an enrolled host.
//! - `poll_status`: per host, last attempt / last success, consecutive failures, last error,
//!   and `attempts`, the number of attempts ever recorded, which numbers history rows.
//! - `poll_history`: one row per attempt keyed `(host_id, n)`; recording attempt `n` deletes
//!   rows `≤ n − POLL_HISTORY_PER_HOST` of that host, one index range delete, so history stays
//!   bounded per host without counting rows.
//! - `poll_latest`: the latest verified statement (claims JSON and the token as received).
//! - `statement_history` (migration 9, [`super::records`]): every distinct verified
//!   statement, written beside `poll_latest` in the same transaction.
//!
//! Removing a host's enrollment (a trigger on `hosts`) drops its agent URL, status and
//! history, so a later re-enrollment starts from a clean slate and is not polled until an
//! operator sets its URL again; its latest statement is kept as evidence but no longer
//! listed.

use rusqlite::{params, OptionalExtension as _, TransactionBehavior};

use super::driver::db_error;
use super::SqliteStore;
use crate::statements::{
    HostPollStatus, PollAttempt, PollOutcome, PollRecord, PollTarget, StatementStore, StoredStatement,
    POLL_HISTORY_PER_HOST,
};
use crate::store::error::StoreError;
use crate::store::schema::{
    count_u32, parse_key, parse_statement, statement_json, stored_outcome, StoredOutcome,
};

fn record_one(tx: &rusqlite::Transaction<'_>, poll: &PollRecord) -> Result<(), StoreError> {
    let StoredOutcome { ok, kind, detail, last_error } = stored_outcome(&poll.outcome);
    // Only enrolled hosts get a status (the SELECT yields no row otherwise): a host removed
    // while its poll was in flight leaves nothing behind.
    let attempts: Option<i64> = tx
        .prepare_cached(
            "INSERT INTO poll_status
                 (host_id, attempts, last_attempt_at, last_ok_at, consecutive_failures, last_error)
             SELECT host_id, 1, ?2, CASE WHEN ?3 THEN ?2 END, CASE WHEN ?3 THEN 0 ELSE 1 END, ?4
             FROM hosts WHERE host_id = ?1
             ON CONFLICT (host_id) DO UPDATE SET
                 attempts = attempts + 1,
                 last_attempt_at = excluded.last_attempt_at,
                 last_ok_at = CASE WHEN ?3 THEN excluded.last_attempt_at ELSE last_ok_at END,
                 consecutive_failures = CASE WHEN ?3 THEN 0 ELSE consecutive_failures + 1 END,
                 last_error = excluded.last_error
             RETURNING attempts",
        )
        .and_then(|mut s| {
            s.query_row(params![poll.host_id, poll.polled_at, ok, last_error], |r| r.get(0)).optional()
        })
        .map_err(db_error)?;
    let Some(n) = attempts else {
        tracing::debug!(host_id = %poll.host_id, "poll of a host no longer enrolled: not recorded");
        return Ok(());
    };
    tx.prepare_cached(
        "INSERT INTO poll_history (host_id, n, polled_at, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| s.execute(params![poll.host_id, n, poll.polled_at, kind, detail]))
    .map_err(db_error)?;
    let oldest_kept = n - i64::from(POLL_HISTORY_PER_HOST) + 1;
    if oldest_kept > 1 {
        tx.prepare_cached("DELETE FROM poll_history WHERE host_id = ?1 AND n < ?2")
            .and_then(|mut s| s.execute(params![poll.host_id, oldest_kept]))
            .map_err(db_error)?;
    }
    if let PollOutcome::Ok { claims, token } = &poll.outcome {
        let claims_json = statement_json(claims)?;
        tx.prepare_cached(
            "INSERT INTO poll_latest (host_id, polled_at, claims_json, token) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (host_id) DO UPDATE SET polled_at = excluded.polled_at,
                 claims_json = excluded.claims_json, token = excluded.token",
        )
        .and_then(|mut s| s.execute(params![poll.host_id, poll.polled_at, claims_json, token]))
        .map_err(db_error)?;
        let digest = crate::records::statement_content_digest(claims)?;
        super::records::record_statement(tx, &poll.host_id, poll.polled_at, &digest, &claims_json, token)?;
    }
    Ok(())
}

impl StatementStore for SqliteStore {
    fn set_agent_url(&self, host_id: &str, url: Option<&str>) -> Result<bool, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        let enrolled = tx
            .query_row("SELECT 1 FROM hosts WHERE host_id = ?1", [host_id], |_| Ok(()))
            .optional()
            .map_err(db_error)?
            .is_some();
        if !enrolled {
            return Ok(false);
        }
        match url {
            Some(url) => tx.execute(
                "INSERT INTO host_agents (host_id, agent_url) VALUES (?1, ?2)
                 ON CONFLICT (host_id) DO UPDATE SET agent_url = excluded.agent_url",
                params![host_id, url],
            ),
            None => tx.execute("DELETE FROM host_agents WHERE host_id = ?1", [host_id]),
        }
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(true)
    }

    fn poll_targets(&self) -> Result<Vec<PollTarget>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT h.host_id, a.agent_url, h.public_jwk FROM hosts h JOIN host_agents a USING (host_id)
                 ORDER BY h.host_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (host_id, agent_url, jwk) = row.map_err(db_error)?;
            let public_key = parse_key(&host_id, &jwk)?;
            out.push(PollTarget { host_id, agent_url, public_key });
        }
        Ok(out)
    }

    fn record_polls(&self, polls: &[PollRecord]) -> Result<(), StoreError> {
        if polls.is_empty() {
            return Ok(());
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_error)?;
        for poll in polls {
            record_one(&tx, poll)?;
        }
        tx.commit().map_err(db_error)
    }

    fn latest_statements(&self) -> Result<Vec<StoredStatement>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT l.host_id, l.polled_at, l.claims_json FROM poll_latest l JOIN hosts h USING (host_id)
                 ORDER BY l.host_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))
            .map_err(db_error)?;
        let mut out = Vec::new();
        for row in rows {
            let (host_id, polled_at, json) = row.map_err(db_error)?;
            let claims = parse_statement(&host_id, &json)?;
            out.push(StoredStatement { host_id, polled_at, claims });
        }
        Ok(out)
    }

    fn latest_token(&self, host_id: &str) -> Result<Option<String>, StoreError> {
        let conn = self.lock()?;
        conn.prepare_cached("SELECT token FROM poll_latest WHERE host_id = ?1")
            .and_then(|mut s| s.query_row([host_id], |r| r.get(0)).optional())
            .map_err(db_error)
    }

    fn host_poll_status(&self) -> Result<Vec<HostPollStatus>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare(
                "SELECT h.host_id, s.last_attempt_at, s.last_ok_at, COALESCE(s.consecutive_failures, 0),
                        s.last_error
                 FROM hosts h LEFT JOIN poll_status s USING (host_id) ORDER BY h.host_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(HostPollStatus {
                    host_id: r.get(0)?,
                    last_attempt_at: r.get(1)?,
                    last_ok_at: r.get(2)?,
                    consecutive_failures: count_u32(r.get(3)?),
                    last_error: r.get(4)?,
                })
            })
            .map_err(db_error)?;
        rows.collect::<Result<_, _>>().map_err(db_error)
    }

    fn poll_history(&self, host_id: &str, limit: u32) -> Result<Vec<PollAttempt>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT polled_at, kind, detail FROM poll_history WHERE host_id = ?1 ORDER BY n DESC LIMIT ?2",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![host_id, limit], |r| {
                let (at, kind, detail): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                Ok((at, if kind == "ok" { Ok(detail) } else { Err(format!("{kind}: {detail}")) }))
            })
            .map_err(db_error)?;
        rows.collect::<Result<_, _>>().map_err(db_error)
    }

    fn agent_urls(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare("SELECT host_id, agent_url FROM host_agents JOIN hosts USING (host_id) ORDER BY host_id")
            .map_err(db_error)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_error)?;
        rows.collect::<Result<_, _>>().map_err(db_error)
    }
}
