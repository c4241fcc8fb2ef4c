//! The PostgreSQL backend of [`StatementStore`], with the meaning of the SQLite one
//! ([`crate::store::sqlite::statements`]); schema: [`super::schema::MIGRATION_POLLING`], step 4 of
//! [`super::MIGRATIONS`], the same tables as SQLite's step 4.
//!
//! Removing a host's enrollment drops its agent URL, poll status and history in the same
//! transaction (a trigger on `hosts`, as on SQLite, so a removal by any collector process or
//! by hand is covered). Writers that depend on the host being enrolled (`set_agent_url`, each
//! recorded poll) take a `FOR KEY SHARE` lock on its `hosts` row first, so a concurrent removal
//! waits for them and then clears what they wrote: nothing of a removed host survives.

use super::driver::{get, pg_error, Failed};
use super::PgStore;
use crate::statements::{
    HostPollStatus, PollAttempt, PollOutcome, PollRecord, PollTarget, StatementStore, StoredStatement,
    POLL_HISTORY_PER_HOST,
};
use crate::store::error::StoreError;
use crate::store::schema::{
    count_u32, parse_key, parse_statement, statement_json, stored_outcome, StoredOutcome,
};

/// The statements of [`StatementStore::record_polls`], prepared once per transaction.
struct RecordStatements {
    status: postgres::Statement,
    history: postgres::Statement,
    latest: postgres::Statement,
    /// The statement history (migration 9, [`super::records`]).
    history_statement: postgres::Statement,
}

impl RecordStatements {
    fn prepare(tx: &mut postgres::Transaction<'_>) -> Result<Self, postgres::Error> {
        Ok(RecordStatements {
            // Only enrolled hosts get a status (no row otherwise): a host removed while its
            // poll was in flight leaves nothing behind. The row lock holds a removal off
            // until this transaction ends.
            status: tx.prepare(
                "WITH h AS (SELECT host_id FROM hosts WHERE host_id = $1::text FOR KEY SHARE)
                 INSERT INTO poll_status AS s
                     (host_id, attempts, last_attempt_at, last_ok_at, consecutive_failures, last_error)
                 SELECT host_id, 1, $2::bigint, CASE WHEN $3::bool THEN $2::bigint END,
                        CASE WHEN $3::bool THEN 0 ELSE 1 END, $4::text
                 FROM h
                 ON CONFLICT (host_id) DO UPDATE SET
                     attempts = s.attempts + 1,
                     last_attempt_at = excluded.last_attempt_at,
                     last_ok_at = CASE WHEN $3::bool THEN excluded.last_attempt_at ELSE s.last_ok_at END,
                     consecutive_failures = CASE WHEN $3::bool THEN 0 ELSE s.consecutive_failures + 1 END,
                     last_error = excluded.last_error
                 RETURNING attempts",
            )?,
            // Attempt n, and the history pruned to the last POLL_HISTORY_PER_HOST attempts
            // ($6: the oldest n kept).
            history: tx.prepare(
                "WITH ins AS (
                     INSERT INTO poll_history (host_id, n, polled_at, kind, detail)
                     VALUES ($1::text, $2::bigint, $3::bigint, $4::text, $5::text)
                 )
                 DELETE FROM poll_history WHERE host_id = $1::text AND n < $6::bigint",
            )?,
            latest: tx.prepare(
                "INSERT INTO poll_latest (host_id, polled_at, claims_json, token) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (host_id) DO UPDATE SET polled_at = excluded.polled_at,
                     claims_json = excluded.claims_json, token = excluded.token",
            )?,
            history_statement: tx.prepare(super::records::RECORD_STATEMENT)?,
        })
    }
}

fn record_one(
    tx: &mut postgres::Transaction<'_>,
    stmts: &RecordStatements,
    poll: &PollRecord,
) -> Result<(), Failed> {
    let StoredOutcome { ok, kind, detail, last_error } = stored_outcome(&poll.outcome);
    let row = tx.query_opt(&stmts.status, &[&poll.host_id, &poll.polled_at, &ok, &last_error])?;
    let Some(row) = row else {
        tracing::debug!(host_id = %poll.host_id, "poll of a host no longer enrolled: not recorded");
        return Ok(());
    };
    let n: i64 = get(&row, 0)?;
    let oldest_kept = n - i64::from(POLL_HISTORY_PER_HOST) + 1;
    tx.execute(&stmts.history, &[&poll.host_id, &n, &poll.polled_at, &kind, &detail, &oldest_kept])?;
    if let PollOutcome::Ok { claims, token } = &poll.outcome {
        let claims_json = statement_json(claims)?;
        tx.execute(&stmts.latest, &[&poll.host_id, &poll.polled_at, &claims_json, token])?;
        let digest = crate::records::statement_content_digest(claims)?;
        tx.execute(
            &stmts.history_statement,
            &[&poll.host_id, &digest, &poll.polled_at, &claims_json, token],
        )?;
    }
    Ok(())
}

impl StatementStore for PgStore {
    fn set_agent_url(&self, host_id: &str, url: Option<&str>) -> Result<bool, StoreError> {
        self.in_transaction("set agent URL", |tx| {
            let enrolled =
                tx.query_opt("SELECT 1 FROM hosts WHERE host_id = $1 FOR KEY SHARE", &[&host_id])?.is_some();
            if !enrolled {
                return Ok(false);
            }
            match url {
                Some(url) => tx.execute(
                    "INSERT INTO host_agents (host_id, agent_url) VALUES ($1, $2)
                     ON CONFLICT (host_id) DO UPDATE SET agent_url = excluded.agent_url",
                    &[&host_id, &url],
                )?,
                None => tx.execute("DELETE FROM host_agents WHERE host_id = $1", &[&host_id])?,
            };
            Ok(true)
        })
    }

    fn poll_targets(&self) -> Result<Vec<PollTarget>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT h.host_id, a.agent_url, h.public_jwk FROM hosts h JOIN host_agents a USING (host_id)
                   ORDER BY h.host_id COLLATE "C""#,
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let host_id: String = get(r, 0)?;
                let jwk: String = get(r, 2)?;
                let public_key = parse_key(&host_id, &jwk)?;
                Ok(PollTarget { host_id, agent_url: get(r, 1)?, public_key })
            })
            .collect()
    }

    fn record_polls(&self, polls: &[PollRecord]) -> Result<(), StoreError> {
        if polls.is_empty() {
            return Ok(());
        }
        self.in_transaction("record polls", |tx| {
            let stmts = RecordStatements::prepare(tx)?;
            for poll in polls {
                record_one(tx, &stmts, poll)?;
            }
            Ok(())
        })
    }

    fn latest_statements(&self) -> Result<Vec<StoredStatement>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT l.host_id, l.polled_at, l.claims_json FROM poll_latest l JOIN hosts h USING (host_id)
                   ORDER BY l.host_id COLLATE "C""#,
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let host_id: String = get(r, 0)?;
                let json: String = get(r, 2)?;
                let claims = parse_statement(&host_id, &json)?;
                Ok(StoredStatement { host_id, polled_at: get(r, 1)?, claims })
            })
            .collect()
    }

    fn latest_token(&self, host_id: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.checkout()?;
        let row = conn
            .client()?
            .query_opt("SELECT token FROM poll_latest WHERE host_id = $1", &[&host_id])
            .map_err(pg_error)?;
        row.map(|r| get(&r, 0)).transpose()
    }

    fn host_poll_status(&self) -> Result<Vec<HostPollStatus>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT h.host_id, s.last_attempt_at, s.last_ok_at, COALESCE(s.consecutive_failures, 0),
                          s.last_error
                   FROM hosts h LEFT JOIN poll_status s USING (host_id) ORDER BY h.host_id COLLATE "C""#,
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                Ok(HostPollStatus {
                    host_id: get(r, 0)?,
                    last_attempt_at: get(r, 1)?,
                    last_ok_at: get(r, 2)?,
                    consecutive_failures: count_u32(get(r, 3)?),
                    last_error: get(r, 4)?,
                })
            })
            .collect()
    }

    fn poll_history(&self, host_id: &str, limit: u32) -> Result<Vec<PollAttempt>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                "SELECT polled_at, kind, detail FROM poll_history WHERE host_id = $1 ORDER BY n DESC LIMIT $2",
                &[&host_id, &i64::from(limit)],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let (at, kind, detail): (i64, String, String) = (get(r, 0)?, get(r, 1)?, get(r, 2)?);
                Ok((at, if kind == "ok" { Ok(detail) } else { Err(format!("{kind}: {detail}")) }))
            })
            .collect()
    }

    fn agent_urls(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.checkout()?;
        let rows = conn
            .client()?
            .query(
                r#"SELECT host_id, agent_url FROM host_agents JOIN hosts USING (host_id)
                   ORDER BY host_id COLLATE "C""#,
                &[],
            )
            .map_err(pg_error)?;
        rows.iter().map(|r| Ok((get(r, 0)?, get(r, 1)?))).collect()
    }
}
