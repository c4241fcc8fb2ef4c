//! The PostgreSQL backend of [`ReportStore`], for fleets: several collector processes (on one
//! or many machines) ingesting into one database.
//!
//! Connection: a `postgres://` / `postgresql://` URL (libpq URL syntax; `?host=/run/postgresql`
//! for a unix socket). **No TLS**: the connection is plaintext, and `sslmode=require` is
//! refused rather than silently downgraded. Password authentication with SCRAM does not
//! expose the password on the wire, but report data does: reach a remote server over a trusted
//! network or a local tunnel (unix socket, stunnel, WireGuard). A non-loopback TCP host is
//! logged as a warning when the store opens.
//!
//! Pool: at most [`POOL_SIZE`] connections per store (per process), opened on demand and
//! reused; a caller waits up to [`POOL_WAIT`] for a free one, then fails as busy. A closed
//! connection (server restart, network loss) is discarded and replaced on the next call.
//!
//! Layout: this file holds the URL and the connection pool; [`driver`] maps the driver's
//! errors, [`schema`]
//! the migrations, [`reports`] implements [`ReportStore`], [`fleet`] the fleet view and
//! policy, [`statements`] agent polling, [`partitions`] the monthly partitions of `records`
//! and their retention (the same files as the SQLite backend's).
//!
//! Scope: everything the collector stores ([`crate::Storage`]): reports and hosts
//! ([`ReportStore`], in [`reports`]), the fleet view and the published policy
//! ([`crate::fleet::FleetStore`], [`crate::policy::PolicyStore`], in [`fleet`]) and agent
//! polling ([`crate::statements::StatementStore`], in [`statements`]).
//!
//! Schema: the same tables and migration steps as the SQLite backend (see
//! [`crate::store::sqlite::MIGRATIONS`]; version N means the same schema on both), with PostgreSQL
//! types: `BIGINT` for integers, `DOUBLE PRECISION` for reals, `BOOLEAN` for the 0/1 flags.
//! The applied version is kept in `schema_version`. Opening applies the missing migrations in
//! one transaction under an advisory lock, so collectors starting at once migrate once.
//!
//! Concurrency across processes: one host's batches (an agent's retries reaching several
//! collectors) are serialised by a transaction-scoped advisory lock keyed by the host id,
//! taken before anything is read. Under READ COMMITTED every statement after the lock sees
//! what the previous holder committed, so the overlap check, the insert
//! (`ON CONFLICT DO NOTHING` on the unique key, a second guard: `(host_id, epoch, seq, "end")`
//! since `records` is partitioned by month of `"end"`, [`partitions`]) and the acked-seq advance run
//! exactly as on SQLite, where the single writer serialises everything. Different hosts
//! proceed in parallel. Waits for any lock end after [`LOCK_TIMEOUT`] as [`StoreError::Busy`];
//! serialization failures and deadlocks are retried inside, then reported as busy.

use std::net::IpAddr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kycd_protocol::clock::{Clock as _, SystemClock};
use postgres::{Client, Config, NoTls, Statement};

use crate::store::error::StoreError;
#[cfg(doc)]
use crate::store::reports::ReportStore;

pub mod driver;
pub mod findings;
pub mod fleet;
pub mod partitions;
pub mod records;
pub mod reports;
mod rollups;
pub mod schema;
pub mod statements;

use driver::{get, pg_error, retryable, Failed};
use schema::migrate;
pub use schema::{
    MIGRATIONS, MIGRATION_EPOCHS, MIGRATION_FLEET, MIGRATION_GUEST_GAP, MIGRATION_OPS_BOUNDS,
    MIGRATION_POLLING, MIGRATION_RECORDS,
};

/// Connections per store (per collector process).
pub const POOL_SIZE: usize = 8;
/// How long a call waits for a free pooled connection before failing as busy.
pub const POOL_WAIT: Duration = Duration::from_secs(5);
/// How long a statement waits for a lock (another collector ingesting the same host, a
/// migration) before failing as busy; the same bound as SQLite's busy timeout.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a transaction that failed with a serialization failure or deadlock.
const ATTEMPTS: usize = 3;

/// Class of the per-host advisory locks (the two-int4 key space, the second key being
/// `hashtext(host_id)`); a hash collision only serialises two hosts' batches.
const HOST_LOCK_CLASS: i32 = 0x6b79_6364;

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with the password (if any) replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{hosts}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The statements of the hot path, prepared once per connection.
struct Statements {
    lock_host: Statement,
    state: Statement,
    stored_around: Statement,
    insert: Statement,
    walk: Statement,
    set_acked: Statement,
    rollups: Option<rollups::RollupStatements>,
}

const INSERT_RECORDS: &str = r#"
    INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end", gpu_seconds,
        gpus, max_concurrent_gpus, estimated_ops, peak_flops, method, training_like, foreign_person,
        merged_windows, body_json, ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds,
        received_at)
    SELECT $1::text, $19::bigint, u.*, $18::bigint FROM UNNEST($2::bigint[], $3::bigint[], $4::text[],
        $5::text[], $6::bigint[], $7::bigint[], $8::float8[], $9::bigint[], $10::bigint[],
        $11::float8[], $12::float8[], $13::text[], $14::bool[], $15::bool[], $16::bigint[],
        $17::text[], $20::float8[], $21::float8[], $22::float8[], $23::float8[]) AS u
    ON CONFLICT DO NOTHING"#;

impl Statements {
    fn prepare(client: &mut Client) -> Result<Self, postgres::Error> {
        Ok(Statements {
            lock_host: client.prepare("SELECT pg_advisory_xact_lock($1::int4, hashtext($2::text))")?,
            state: client.prepare(
                "SELECT (SELECT acked_seq FROM host_progress WHERE host_id = $1 AND epoch = $2),
                        (SELECT last_seq FROM records WHERE host_id = $1 AND epoch = $2
                         ORDER BY seq DESC LIMIT 1)",
            )?,
            // Every stored record of epoch $4 that can intersect [$2, $3]: from the greatest
            // seq at or below $2 (ranges never overlap, so no earlier one reaches $2) up to $3.
            stored_around: client.prepare(
                "SELECT seq, last_seq, body_json FROM records
                 WHERE host_id = $1 AND epoch = $4 AND seq <= $3 AND seq >= COALESCE(
                     (SELECT max(seq) FROM records WHERE host_id = $1 AND epoch = $4 AND seq <= $2), $2)
                 ORDER BY seq",
            )?,
            insert: client.prepare(INSERT_RECORDS)?,
            // The end of the contiguous run of stored ranges of epoch $3 starting right
            // after $2.
            walk: client.prepare(
                "WITH RECURSIVE walk (acked) AS (
                     SELECT $2::bigint
                     UNION ALL
                     SELECT r.last_seq FROM walk w
                     JOIN records r ON r.host_id = $1 AND r.epoch = $3 AND r.seq = w.acked + 1
                 )
                 SELECT max(acked) FROM walk",
            )?,
            set_acked: client.prepare(
                "INSERT INTO host_progress (host_id, epoch, acked_seq) VALUES ($1, $3, $2)
                 ON CONFLICT (host_id, epoch) DO UPDATE SET acked_seq = excluded.acked_seq",
            )?,
            // None only for a database opened at a version before the roll-ups (tests).
            rollups: match client.query_one("SELECT to_regclass('rollup_state') IS NOT NULL", &[])?.get(0) {
                true => Some(rollups::RollupStatements::prepare(client)?),
                false => None,
            },
        })
    }
}

/// The schema version that introduced the roll-ups ([`schema::MIGRATION_ROLLUPS`]).
const ROLLUP_VERSION: usize = 11;

/// Builds the roll-ups of a database migrated from before them, once (however many
/// collectors open it at once); a no-op otherwise.
fn build_rollups_if_needed(client: &mut Client) -> Result<(), StoreError> {
    let unbuilt = client
        .query_opt("SELECT 1 FROM rollup_state WHERE built_at IS NULL", &[])
        .map_err(pg_error)?
        .is_some();
    if !unbuilt {
        return Ok(());
    }
    tracing::info!("computing usage roll-ups of the windows stored before them (once)");
    let st = rollups::RollupStatements::prepare(client).map_err(pg_error)?;
    let done = (|| {
        let mut tx = client.transaction()?;
        let windows = rollups::rebuild(&mut tx, &st, SystemClock.unix_now(), true)?;
        tx.commit()?;
        Ok::<_, Failed>(windows)
    })();
    match done {
        Ok(windows) => {
            tracing::info!(windows = ?windows, "usage roll-ups computed");
            Ok(())
        }
        Err(Failed::Pg(e)) => Err(pg_error(e)),
        Err(Failed::Store(e)) => Err(e),
    }
}

/// A pooled connection.
struct Conn {
    client: Client,
    /// Prepared on first use (a database opened at an old schema version, in tests, has not
    /// the tables they name).
    stmts: Option<Statements>,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections in existence (idle + checked out + being opened).
    open: usize,
}

/// The PostgreSQL store.
pub struct PgStore {
    config: Config,
    url: String,
    state: Mutex<PoolState>,
    freed: Condvar,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.url).finish_non_exhaustive()
    }
}

/// A connection checked out of the pool; goes back on drop unless it is closed.
struct Checkout<'a> {
    store: &'a PgStore,
    conn: Option<Conn>,
}

impl Checkout<'_> {
    fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        self.conn.as_mut().ok_or_else(|| StoreError::Unavailable("no connection".into()))
    }

    fn client(&mut self) -> Result<&mut Client, StoreError> {
        Ok(&mut self.conn()?.client)
    }

    /// The client and the prepared statements of the hot path.
    fn parts(&mut self) -> Result<(&mut Client, &Statements), StoreError> {
        let conn = self.conn()?;
        if conn.stmts.is_none() {
            conn.stmts = Some(Statements::prepare(&mut conn.client).map_err(pg_error)?);
        }
        match &conn.stmts {
            Some(stmts) => Ok((&mut conn.client, stmts)),
            None => Err(StoreError::Unavailable("statements not prepared".into())),
        }
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let mut state = self.store.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.client.is_closed() {
            state.open = state.open.saturating_sub(1);
        } else {
            state.idle.push(conn);
        }
        drop(state);
        self.store.freed.notify_one();
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a connection blocks on the driver's own runtime, which panics on an async
        // thread (a store's last reference may go there, e.g. at the end of `serve`): close
        // them on a thread of their own then.
        let state = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let idle = std::mem::take(&mut state.idle);
        if idle.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let Err(e) = std::thread::Builder::new().name("pg-close".into()).spawn(move || drop(idle)) {
            tracing::warn!(error = %e, "cannot close PostgreSQL connections on a thread; leaking them");
        }
    }
}

fn connect(config: &Config) -> Result<Client, StoreError> {
    let mut client = config.connect(NoTls).map_err(pg_error)?;
    // Lock waits end as errors (-> busy) instead of holding a request for ever.
    client.batch_execute(&format!("SET lock_timeout = {}", LOCK_TIMEOUT.as_millis())).map_err(pg_error)?;
    Ok(client)
}

/// Applies the missing migrations of [`MIGRATIONS`] up to `target` in one transaction, under
fn local_only(config: &Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        postgres::config::Host::Unix(_) => true,
        postgres::config::Host::Tcp(name) => {
            name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
    })
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…`) and migrates it to the current
    /// schema.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_at_version(url, MIGRATIONS.len())
    }

    pub(crate) fn open_at_version(url: &str, version: usize) -> Result<Self, StoreError> {
        let redacted = redact_url(url);
        let mut config: Config =
            url.parse().map_err(|e| StoreError::InvalidUrl(format!("{redacted}: {e}")))?;
        if config.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err(StoreError::InvalidUrl(format!(
                "{redacted}: sslmode=require, but this collector connects to PostgreSQL without TLS"
            )));
        }
        config.ssl_mode(postgres::config::SslMode::Disable);
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("kycd-collector");
        }
        if !local_only(&config) {
            tracing::warn!(db = %redacted, "the connection to PostgreSQL is not encrypted (no TLS support)");
        }
        let mut client = connect(&config)?;
        migrate(&mut client, version)?;
        if version >= ROLLUP_VERSION {
            build_rollups_if_needed(&mut client)?;
        }
        Ok(PgStore {
            config,
            url: redacted,
            state: Mutex::new(PoolState { idle: vec![Conn { client, stmts: None }], open: 1 }),
            freed: Condvar::new(),
        })
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let row = client.query_one("SELECT version FROM schema_version", &[]).map_err(pg_error)?;
        get(&row, 0)
    }

    fn lock_state(&self) -> Result<MutexGuard<'_, PoolState>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Unavailable("a database call panicked".into()))
    }

    /// A connection: an idle one, a new one while fewer than [`POOL_SIZE`] exist, or the
    /// next one freed within [`POOL_WAIT`].
    fn checkout(&self) -> Result<Checkout<'_>, StoreError> {
        let deadline = SystemClock.instant() + POOL_WAIT;
        let mut state = self.lock_state()?;
        loop {
            if let Some(conn) = state.idle.pop() {
                if conn.client.is_closed() {
                    state.open = state.open.saturating_sub(1);
                    continue;
                }
                return Ok(Checkout { store: self, conn: Some(conn) });
            }
            if state.open < POOL_SIZE {
                state.open += 1;
                drop(state);
                let opened = connect(&self.config).map(|client| Conn { client, stmts: None });
                return match opened {
                    Ok(conn) => Ok(Checkout { store: self, conn: Some(conn) }),
                    Err(e) => {
                        self.lock_state()?.open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(SystemClock.instant());
            if left.is_zero() {
                return Err(StoreError::Busy);
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .map_err(|_| StoreError::Unavailable("a database call panicked".into()))?
                .0;
        }
    }

    /// Runs `f` in a transaction on a pooled connection and commits it; a serialization
    /// failure or deadlock runs it again (up to [`ATTEMPTS`] times), then fails as busy.
    fn in_transaction<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut postgres::Transaction<'_>) -> Result<T, Failed>,
    ) -> Result<T, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let mut attempt = 1;
        loop {
            let result = (|| {
                let mut tx = client.transaction()?;
                let value = f(&mut tx)?;
                tx.commit()?;
                Ok(value)
            })();
            match result {
                Ok(value) => return Ok(value),
                Err(Failed::Pg(e)) if retryable(&e) && attempt < ATTEMPTS => {
                    tracing::debug!(what, attempt, error = %e, "retrying transaction");
                    attempt += 1;
                }
                Err(Failed::Pg(e)) => return Err(pg_error(e)),
                Err(Failed::Store(e)) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::reports::ReportStore as _;
    use crate::store::test_support::record;
    use kycd_test_support::pg::fresh_database;

    #[test]
    fn urls() {
        assert!(is_postgres_url("postgres://u@h/db"));
        assert!(is_postgres_url("postgresql://h/db"));
        assert!(!is_postgres_url("sqlite:///x.db"));
        assert_eq!(redact_url("postgres://kycd:s3cret@db:5432/kycd"), "postgres://kycd:***@db:5432/kycd");
        assert_eq!(redact_url("postgres://kycd@db/kycd?x=1"), "postgres://kycd@db/kycd?x=1");
        assert_eq!(redact_url("postgresql://db/kycd"), "postgresql://db/kycd");
        assert!(matches!(PgStore::open("postgres://h/db?sslmode=require"), Err(StoreError::InvalidUrl(_))));
        assert!(matches!(PgStore::open("postgres://h:notaport/db"), Err(StoreError::InvalidUrl(_))));
        let e = PgStore::open("postgres://u:pw@h:notaport/db").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn connection_refused_is_transient() {
        // A loopback port with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = PgStore::open(&format!("postgres://kycd@127.0.0.1:{port}/kycd")).unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(e.is_transient());
    }

    #[test]
    fn the_pool_reuses_connections_and_bounds_them() {
        let Some(db) = fresh_database("the_pool_reuses_connections_and_bounds_them") else { return };
        let store = PgStore::open(&db.url).unwrap();
        let store = &store;
        std::thread::scope(|s| {
            for t in 0..(POOL_SIZE * 2) {
                s.spawn(move || {
                    let host = format!("h{}", t % 3);
                    for seq in 1..=20u64 {
                        store.insert_batch(&host, 1, &[record(seq, None)], 0).unwrap();
                    }
                });
            }
        });
        for h in 0..3 {
            assert_eq!(store.acked_seq(&format!("h{h}"), 1).unwrap(), 20);
        }
        let open = store.state.lock().unwrap().open;
        assert!((1..=POOL_SIZE).contains(&open), "{open} connections");
        let sessions: i64 = db
            .client()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND application_name = 'kycd-collector'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(usize::try_from(sessions).unwrap(), open);
    }
}
