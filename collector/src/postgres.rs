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
//! Scope: everything the collector stores ([`crate::Storage`]): reports and hosts
//! ([`ReportStore`], here), the fleet view and the published policy
//! ([`crate::fleet::FleetStore`], [`crate::policy::PolicyStore`], in [`fleet`]) and agent
//! polling ([`crate::statements::StatementStore`], in [`statements`]).
//!
//! Schema: the same tables and migration steps as the SQLite backend (see
//! [`crate::sqlite::MIGRATIONS`]; version N means the same schema on both), with PostgreSQL
//! types: `BIGINT` for integers, `DOUBLE PRECISION` for reals, `BOOLEAN` for the 0/1 flags.
//! The applied version is kept in `schema_version`. Opening applies the missing migrations in
//! one transaction under an advisory lock, so collectors starting at once migrate once.
//!
//! Concurrency across processes: one host's batches (an agent's retries reaching several
//! collectors) are serialised by a transaction-scoped advisory lock keyed by the host id,
//! taken before anything is read. Under READ COMMITTED every statement after the lock sees
//! what the previous holder committed, so the overlap check, the insert
//! (`ON CONFLICT (host_id, epoch, seq) DO NOTHING`, a second guard) and the acked-seq advance run
//! exactly as on SQLite, where the single writer serialises everything. Different hosts
//! proceed in parallel. Waits for any lock end after [`LOCK_TIMEOUT`] as [`StoreError::Busy`];
//! serialization failures and deadlocks are retried inside, then reported as busy.

use std::net::IpAddr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kycd_protocol::PublicKey;
use postgres::error::SqlState;
use postgres::{Client, Config, NoTls, Statement};

use crate::sqlite::method_name;

pub mod fleet;
pub mod statements;
use crate::store::{
    Enrollment, HostEntry, Rejection, ReportStore, StoreError, ValidRecord, REJECTIONS_PER_HOST,
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

/// Advisory lock taken while migrating (the single-bigint key space; "kycdschm").
const SCHEMA_LOCK: i64 = 0x6b79_6364_7363_686d;
/// Class of the per-host advisory locks (the two-int4 key space, the second key being
/// `hashtext(host_id)`); a hash collision only serialises two hosts' batches.
const HOST_LOCK_CLASS: i32 = 0x6b79_6364;

/// Schema migrations, in order; `schema_version.version` = how many are applied. Step N has
/// the meaning of step N of [`crate::sqlite::MIGRATIONS`].
pub const MIGRATIONS: &[&str] = &[
    // 1: hosts and records.
    r#"
    CREATE TABLE hosts (
        host_id     TEXT PRIMARY KEY NOT NULL,
        public_jwk  TEXT NOT NULL,
        enrolled_at BIGINT NOT NULL
    );
    CREATE TABLE records (
        host_id             TEXT NOT NULL,
        seq                 BIGINT NOT NULL,
        last_seq            BIGINT NOT NULL,
        tenant              TEXT,
        workload            TEXT NOT NULL,
        start               BIGINT NOT NULL,
        "end"               BIGINT NOT NULL,
        gpu_seconds         DOUBLE PRECISION NOT NULL,
        gpus                BIGINT NOT NULL,
        max_concurrent_gpus BIGINT NOT NULL,
        estimated_ops       DOUBLE PRECISION NOT NULL,
        peak_flops          DOUBLE PRECISION NOT NULL,
        method              TEXT NOT NULL,
        training_like       BOOLEAN NOT NULL,
        foreign_person      BOOLEAN NOT NULL,
        merged_windows      BIGINT NOT NULL,
        body_json           TEXT NOT NULL,
        received_at         BIGINT NOT NULL,
        UNIQUE (host_id, seq)
    );
    CREATE INDEX records_tenant_start ON records (tenant, start);
    "#,
    // 2: the per-host acked-seq cache, backfilled from the records already stored.
    r#"
    CREATE TABLE host_progress (
        host_id   TEXT PRIMARY KEY NOT NULL,
        acked_seq BIGINT NOT NULL DEFAULT 0
    );
    WITH RECURSIVE walk (host_id, acked) AS (
        SELECT DISTINCT host_id, 0::bigint FROM records
        UNION ALL
        SELECT w.host_id, r.last_seq FROM walk w
        JOIN records r ON r.host_id = w.host_id AND r.seq = w.acked + 1
    )
    INSERT INTO host_progress (host_id, acked_seq)
    SELECT host_id, MAX(acked) FROM walk GROUP BY host_id;
    "#,
    // 3: the fleet view (policies, tenant identities, findings).
    fleet::MIGRATION_FLEET,
    // 4: agent polling.
    statements::MIGRATION_POLLING,
    // 5: enrollment epochs and rejected batches.
    MIGRATION_EPOCHS,
];

/// Step 5: enrollment epochs (see [`crate::store`]) and rejected batches; the same tables and
/// keys as SQLite's step 5 ([`crate::sqlite::MIGRATION_EPOCHS`]). Existing enrollments,
/// records and acked seqs become epoch 1. `ADD COLUMN … DEFAULT 1` does not rewrite the
/// table; the new unique index on `records` is built once, inside the migration.
pub const MIGRATION_EPOCHS: &str = r#"
    ALTER TABLE hosts ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
    CREATE TABLE enrollments (
        host_id     TEXT NOT NULL,
        epoch       BIGINT NOT NULL,
        public_jwk  TEXT NOT NULL,
        enrolled_at BIGINT NOT NULL,
        PRIMARY KEY (host_id, epoch)
    );
    INSERT INTO enrollments (host_id, epoch, public_jwk, enrolled_at)
        SELECT host_id, 1, public_jwk, enrolled_at FROM hosts;

    ALTER TABLE records ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE records DROP CONSTRAINT records_host_id_seq_key;
    ALTER TABLE records ADD CONSTRAINT records_host_id_epoch_seq_key UNIQUE (host_id, epoch, seq);
    ALTER TABLE records ALTER COLUMN epoch DROP DEFAULT;

    ALTER TABLE host_progress ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE host_progress DROP CONSTRAINT host_progress_pkey;
    ALTER TABLE host_progress ADD PRIMARY KEY (host_id, epoch);
    ALTER TABLE host_progress ALTER COLUMN epoch DROP DEFAULT;

    CREATE TABLE rejections (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        host_id     TEXT NOT NULL,
        epoch       BIGINT NOT NULL,
        kind        TEXT NOT NULL,
        detail      TEXT NOT NULL,
        first_seq   BIGINT,
        last_seq    BIGINT,
        rejected_at BIGINT NOT NULL
    );
    CREATE INDEX rejections_host ON rejections (host_id, id);
    CREATE INDEX rejections_at ON rejections (rejected_at);
"#;

/// Whether `url` names a PostgreSQL database.
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

/// Maps a driver error to the store's error kinds.
fn pg_error(e: postgres::Error) -> StoreError {
    if let Some(code) = e.code() {
        let c = code.code();
        if [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
        ]
        .contains(code)
        {
            return StoreError::Busy;
        }
        // Connection exceptions (08), insufficient resources (53: disk full, out of memory,
        // too many connections), operator intervention (57P: shutdown, recovery), a read-only
        // server (a standby after failover).
        if c.starts_with("08")
            || c.starts_with("53")
            || c.starts_with("57P")
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        {
            let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
            return StoreError::Unavailable(format!("PostgreSQL {c}: {message}"));
        }
        return StoreError::Database(Box::new(e));
    }
    // No SQLSTATE: the server was never reached or the connection broke (an I/O error, the
    // connect timeout included, or a closed connection), or a client-side conversion failed.
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if io || e.is_closed() {
        return StoreError::Unavailable(e.to_string());
    }
    StoreError::Database(Box::new(e))
}

/// Whether a failed transaction is worth running again.
fn retryable(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// A failed attempt of a transaction: a driver error (maybe retryable) or a final answer.
enum Failed {
    Pg(postgres::Error),
    Store(StoreError),
}

impl From<postgres::Error> for Failed {
    fn from(e: postgres::Error) -> Self {
        Failed::Pg(e)
    }
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Failed::Store(e)
    }
}

fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{value} does not fit in a BIGINT")))
}

fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative sequence number {value} stored")))
}

fn get<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx).map_err(pg_error)
}

/// The statements of the hot path, prepared once per connection.
struct Statements {
    lock_host: Statement,
    state: Statement,
    stored_around: Statement,
    insert: Statement,
    walk: Statement,
    set_acked: Statement,
}

const INSERT_RECORDS: &str = r#"
    INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end", gpu_seconds,
        gpus, max_concurrent_gpus, estimated_ops, peak_flops, method, training_like, foreign_person,
        merged_windows, body_json, received_at)
    SELECT $1::text, $19::bigint, u.*, $18::bigint FROM UNNEST($2::bigint[], $3::bigint[], $4::text[],
        $5::text[], $6::bigint[], $7::bigint[], $8::float8[], $9::bigint[], $10::bigint[],
        $11::float8[], $12::float8[], $13::text[], $14::bool[], $15::bool[], $16::bigint[],
        $17::text[]) AS u
    ON CONFLICT (host_id, epoch, seq) DO NOTHING"#;

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
        })
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
/// the schema advisory lock.
fn migrate(client: &mut Client, target: usize) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(pg_error)?;
    // A migration may rebuild a large table under ACCESS EXCLUSIVE (migration 5 re-keys
    // `records`), and a second collector starting meanwhile waits on the schema lock: neither
    // wait is a request to fail fast, so the 5 s request lock timeout does not apply here.
    tx.batch_execute("SET LOCAL lock_timeout = 0").map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).map_err(pg_error)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
             version   BIGINT NOT NULL
         )",
    )
    .map_err(pg_error)?;
    let version: i64 = match tx.query_opt("SELECT version FROM schema_version", &[]).map_err(pg_error)? {
        Some(row) => get(&row, 0)?,
        None => 0,
    };
    let pending = crate::store::pending_migrations(MIGRATIONS, version, target)?;
    if pending.is_empty() {
        return Ok(());
    }
    for (version, sql) in pending {
        tx.batch_execute(sql).map_err(pg_error)?;
        tracing::info!(version, "applied schema migration");
    }
    let target = i64::try_from(target).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO schema_version (singleton, version) VALUES (TRUE, $1)
         ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
        &[&target],
    )
    .map_err(pg_error)?;
    tx.commit().map_err(pg_error)
}

/// Whether every host of `config` is loopback or a unix socket.
fn local_only(config: &Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        postgres::config::Host::Unix(_) => true,
        postgres::config::Host::Tcp(name) => {
            name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
    })
}

/// The batch's records as UNNEST columns.
#[derive(Default)]
struct Columns<'a> {
    seq: Vec<i64>,
    last_seq: Vec<i64>,
    tenant: Vec<Option<&'a str>>,
    workload: Vec<&'a str>,
    start: Vec<i64>,
    end: Vec<i64>,
    gpu_seconds: Vec<f64>,
    gpus: Vec<i64>,
    max_concurrent_gpus: Vec<i64>,
    estimated_ops: Vec<f64>,
    peak_flops: Vec<f64>,
    method: Vec<&'static str>,
    training_like: Vec<bool>,
    foreign_person: Vec<bool>,
    merged_windows: Vec<i64>,
    body_json: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, valid: &'a ValidRecord) -> Result<(), StoreError> {
        let w = &valid.record.window;
        self.seq.push(to_i64(valid.record.seq)?);
        self.last_seq.push(to_i64(valid.last_seq)?);
        self.tenant.push(w.tenant.as_deref());
        self.workload.push(&w.workload);
        self.start.push(w.start);
        self.end.push(w.end);
        self.gpu_seconds.push(w.gpu_seconds);
        self.gpus.push(i64::from(w.gpus));
        self.max_concurrent_gpus.push(i64::from(w.max_concurrent_gpus));
        self.estimated_ops.push(w.estimated_ops);
        self.peak_flops.push(w.peak_flops);
        self.method.push(method_name(w.method));
        self.training_like.push(w.training_like);
        self.foreign_person.push(w.foreign_person);
        self.merged_windows.push(i64::from(w.merged_windows));
        self.body_json.push(&valid.body_json);
        Ok(())
    }
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
        let deadline = Instant::now() + POOL_WAIT;
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
            let left = deadline.saturating_duration_since(Instant::now());
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

    fn insert_once(
        client: &mut Client,
        stmts: &Statements,
        host_id: &str,
        epoch: i64,
        records: &[ValidRecord],
        received_at: i64,
    ) -> Result<u64, Failed> {
        let mut tx = client.transaction()?;
        tx.execute(&stmts.lock_host, &[&HOST_LOCK_CLASS, &host_id])?;
        let state = tx.query_one(&stmts.state, &[&host_id, &epoch])?;
        let cached: Option<i64> = get(&state, 0)?;
        // The end of the host's highest stored range: records above it (the common case, a
        // batch of new records) cannot collide and need no lookup.
        let stored_end: i64 = get::<Option<i64>>(&state, 1)?.unwrap_or(0);

        let mut new = Columns::default();
        // Records at or below the stored end (re-sent or filling gaps) are compared with
        // what is stored around them, fetched in one query.
        let old: Vec<&ValidRecord> =
            records.iter().filter(|v| to_i64(v.record.seq).is_ok_and(|s| s <= stored_end)).collect();
        let stored: Vec<(i64, i64, String)> = match (old.first(), old.iter().map(|v| v.last_seq).max()) {
            (Some(lo), Some(hi)) => tx
                .query(&stmts.stored_around, &[&host_id, &to_i64(lo.record.seq)?, &to_i64(hi)?, &epoch])?
                .iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
                .collect::<Result<_, StoreError>>()?,
            _ => Vec::new(),
        };
        for valid in records {
            let seq = to_i64(valid.record.seq)?;
            let last_seq = to_i64(valid.last_seq)?;
            if seq <= stored_end {
                // Stored ranges never overlap, so the stored record with the greatest seq at
                // or below our last seq is the only one that can intersect our range.
                let below = stored.partition_point(|(s, _, _)| *s <= last_seq);
                if let Some((stored_seq, stored_last, body)) =
                    below.checked_sub(1).and_then(|i| stored.get(i))
                {
                    if *stored_seq == seq && *stored_last == last_seq && *body == valid.body_json {
                        continue; // re-sent, identical: already stored
                    }
                    if *stored_last >= seq {
                        // `stored` holds every stored record that can intersect this one.
                        let hit = stored
                            .iter()
                            .filter(|(s, l, _)| *s <= last_seq && *l >= seq)
                            .map(|(s, l, _)| Ok((to_u64(*s)?, to_u64(*l)?)))
                            .collect::<Result<Vec<_>, StoreError>>()?;
                        return Err(StoreError::SeqConflict {
                            first: valid.record.seq,
                            last: valid.last_seq,
                            stored: hit,
                        }
                        .into());
                    }
                }
            }
            new.push(valid)?;
        }
        if !new.seq.is_empty() {
            let inserted = tx.execute(
                &stmts.insert,
                &[
                    &host_id,
                    &new.seq,
                    &new.last_seq,
                    &new.tenant,
                    &new.workload,
                    &new.start,
                    &new.end,
                    &new.gpu_seconds,
                    &new.gpus,
                    &new.max_concurrent_gpus,
                    &new.estimated_ops,
                    &new.peak_flops,
                    &new.method,
                    &new.training_like,
                    &new.foreign_person,
                    &new.merged_windows,
                    &new.body_json,
                    &received_at,
                    &epoch,
                ],
            )?;
            if usize::try_from(inserted).ok() != Some(new.seq.len()) {
                // Only a writer that bypasses the host lock can get here; the rows it stored
                // are compared on the next attempt.
                return Err(Failed::Store(StoreError::Busy));
            }
        }
        // Advance the acked seq: first across the batch in memory, then on in the table
        // (where earlier out-of-order batches may continue it).
        let mut acked = cached.unwrap_or(0);
        for valid in records {
            let seq = to_i64(valid.record.seq)?;
            if seq > acked.saturating_add(1) {
                break;
            }
            acked = acked.max(to_i64(valid.last_seq)?);
        }
        let walked = tx.query_one(&stmts.walk, &[&host_id, &acked, &epoch])?;
        let acked: i64 = get::<Option<i64>>(&walked, 0)?.unwrap_or(acked);
        if cached != Some(acked) {
            tx.execute(&stmts.set_acked, &[&host_id, &acked, &epoch])?;
        }
        tx.commit()?;
        Ok(to_u64(acked)?)
    }
}

fn parse_key(host_id: &str, jwk: &str) -> Result<PublicKey, StoreError> {
    PublicKey::from_jwk_json(jwk.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("stored key of host {host_id:?}: {e}")))
}

impl ReportStore for PgStore {
    fn enrollment(&self, host_id: &str) -> Result<Option<Enrollment>, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let row = client
            .query_opt(
                "SELECT h.public_jwk, h.epoch, COALESCE(e.enrolled_at, h.enrolled_at)
                 FROM hosts h LEFT JOIN enrollments e USING (host_id, epoch) WHERE h.host_id = $1",
                &[&host_id],
            )
            .map_err(pg_error)?;
        row.map(|row| {
            let jwk: String = get(&row, 0)?;
            Ok(Enrollment {
                public_key: parse_key(host_id, &jwk)?,
                epoch: to_u64(get(&row, 1)?)?,
                enrolled_at: get(&row, 2)?,
            })
        })
        .transpose()
    }

    fn enroll_host(&self, host_id: &str, key: &PublicKey, enrolled_at: i64) -> Result<u64, StoreError> {
        let jwk = key.to_jwk();
        let text = jwk.to_string();
        let epoch = self.in_transaction("enroll host", |tx| {
            // Serialised with this host's ingest and other enrollments of it.
            tx.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2::text))", &[&HOST_LOCK_CLASS, &host_id])?;
            if tx.query_opt("SELECT 1 FROM hosts WHERE host_id = $1", &[&host_id])?.is_some() {
                return Err(StoreError::AlreadyEnrolled(host_id.to_owned()).into());
            }
            // The epoch this key had (re-enrolling the same agent continues its numbering),
            // else one above every epoch the host id had, enrolled or only seen in records.
            let mut known = None;
            for row in tx.query("SELECT epoch, public_jwk FROM enrollments WHERE host_id = $1", &[&host_id])? {
                let stored: String = get(&row, 1)?;
                if parse_key(host_id, &stored)?.to_jwk() == jwk {
                    known = Some(get::<i64>(&row, 0)?);
                }
            }
            let epoch = match known {
                Some(epoch) => epoch,
                None => {
                    let row = tx.query_one(
                        "SELECT GREATEST(
                             COALESCE((SELECT max(epoch) FROM enrollments WHERE host_id = $1), 0),
                             COALESCE((SELECT max(epoch) FROM host_progress WHERE host_id = $1), 0))",
                        &[&host_id],
                    )?;
                    let epoch = get::<i64>(&row, 0)?.saturating_add(1);
                    tx.execute(
                        "INSERT INTO enrollments (host_id, epoch, public_jwk, enrolled_at) VALUES ($1, $2, $3, $4)",
                        &[&host_id, &epoch, &text, &enrolled_at],
                    )?;
                    epoch
                }
            };
            tx.execute(
                "INSERT INTO hosts (host_id, public_jwk, enrolled_at, epoch) VALUES ($1, $2, $3, $4)",
                &[&host_id, &text, &enrolled_at, &epoch],
            )?;
            Ok(epoch)
        });
        match epoch {
            Err(StoreError::Database(e))
                if e.downcast_ref::<postgres::Error>().and_then(postgres::Error::code)
                    == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                Err(StoreError::AlreadyEnrolled(host_id.to_owned()))
            }
            other => to_u64(other?),
        }
    }

    fn remove_host(&self, host_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let removed =
            client.execute("DELETE FROM hosts WHERE host_id = $1", &[&host_id]).map_err(pg_error)?;
        Ok(removed > 0)
    }

    fn list_hosts(&self) -> Result<Vec<HostEntry>, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let rows = client
            .query(
                "SELECT h.host_id, h.public_jwk, h.enrolled_at, h.epoch, COALESCE(p.acked_seq, 0)
                 FROM hosts h LEFT JOIN host_progress p USING (host_id, epoch) ORDER BY h.host_id",
                &[],
            )
            .map_err(pg_error)?;
        rows.iter()
            .map(|row| {
                let host_id: String = get(row, 0)?;
                let jwk: String = get(row, 1)?;
                let public_key = parse_key(&host_id, &jwk)?;
                Ok(HostEntry {
                    host_id,
                    public_key,
                    enrolled_at: get(row, 2)?,
                    epoch: to_u64(get(row, 3)?)?,
                    acked_seq: to_u64(get(row, 4)?)?,
                })
            })
            .collect()
    }

    fn insert_batch(
        &self,
        host_id: &str,
        epoch: u64,
        records: &[ValidRecord],
        received_at: i64,
    ) -> Result<u64, StoreError> {
        let epoch = to_i64(epoch)?;
        let mut conn = self.checkout()?;
        let (client, stmts) = conn.parts()?;
        let mut attempt = 1;
        loop {
            match Self::insert_once(client, stmts, host_id, epoch, records, received_at) {
                Ok(acked) => return Ok(acked),
                Err(Failed::Pg(e)) if retryable(&e) && attempt < ATTEMPTS => {
                    tracing::debug!(host = host_id, attempt, error = %e, "retrying batch insert");
                    attempt += 1;
                }
                Err(Failed::Store(StoreError::Busy)) if attempt < ATTEMPTS => attempt += 1,
                Err(Failed::Pg(e)) => return Err(pg_error(e)),
                Err(Failed::Store(e)) => return Err(e),
            }
        }
    }

    fn acked_seq(&self, host_id: &str, epoch: u64) -> Result<u64, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let row = client
            .query_opt(
                "SELECT acked_seq FROM host_progress WHERE host_id = $1 AND epoch = $2",
                &[&host_id, &to_i64(epoch)?],
            )
            .map_err(pg_error)?;
        match row {
            Some(row) => to_u64(get(&row, 0)?),
            None => Ok(0),
        }
    }

    fn stored_ranges(&self, host_id: &str, epoch: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut conn = self.checkout()?;
        let client = conn.client()?;
        let rows = client
            .query(
                "SELECT seq, last_seq FROM records WHERE host_id = $1 AND epoch = $2 ORDER BY seq",
                &[&host_id, &to_i64(epoch)?],
            )
            .map_err(pg_error)?;
        rows.iter().map(|row| Ok((to_u64(get(row, 0)?)?, to_u64(get(row, 1)?)?))).collect()
    }

    fn record_rejection(&self, rejection: &Rejection) -> Result<(), StoreError> {
        let epoch = to_i64(rejection.epoch)?;
        let (first, last) = match rejection.seqs {
            Some((first, last)) => (Some(to_i64(first)?), Some(to_i64(last)?)),
            None => (None, None),
        };
        let detail = crate::store::truncate_detail(&rejection.detail);
        let keep = i64::from(REJECTIONS_PER_HOST);
        self.in_transaction("record rejection", |tx| {
            tx.execute(
                "INSERT INTO rejections (host_id, epoch, kind, detail, first_seq, last_seq, rejected_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &rejection.host_id,
                    &epoch,
                    &rejection.kind,
                    &detail,
                    &first,
                    &last,
                    &rejection.rejected_at,
                ],
            )?;
            // Keep the newest REJECTIONS_PER_HOST of the host: one index range delete.
            tx.execute(
                "DELETE FROM rejections WHERE host_id = $1 AND id <=
                     (SELECT id FROM rejections WHERE host_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
                &[&rejection.host_id, &keep],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg_support::fresh_database;
    use crate::store::test_support::record;

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
    fn opening_an_old_version_database_migrates_it_and_backfills_acks() {
        let Some(db) = fresh_database("opening_an_old_version_database_migrates_it_and_backfills_acks")
        else {
            return;
        };
        {
            let old = PgStore::open_at_version(&db.url, 1).unwrap();
            assert_eq!(old.schema_version().unwrap(), 1);
            let mut client = db.client();
            for (host, seq, last) in [("a", 1i64, 1i64), ("a", 2, 5), ("a", 7, 7), ("b", 2, 2)] {
                client
                    .execute(
                        r#"INSERT INTO records (host_id, seq, last_seq, tenant, workload, start, "end",
                            gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                            training_like, foreign_person, merged_windows, body_json, received_at)
                           VALUES ($1, $2, $3, 't', 'w', 0, 60, 1.0, 1, 1, 1.0, 1.0, 'unknown', false, false, 1, '{}', 0)"#,
                        &[&host, &seq, &last],
                    )
                    .unwrap();
            }
            let row = client.query_one("SELECT to_regclass('host_progress') IS NULL", &[]).unwrap();
            assert!(row.get::<_, bool>(0), "version 1 has no host_progress");
        }
        let store = PgStore::open(&db.url).unwrap();
        assert_eq!(store.schema_version().unwrap(), 5);
        assert_eq!(store.acked_seq("a", 1).unwrap(), 5);
        assert_eq!(store.acked_seq("b", 1).unwrap(), 0);
        // The cache keeps advancing from the backfilled value.
        assert_eq!(store.insert_batch("a", 1, &[record(6, None)], 0).unwrap(), 7);
        assert_eq!(store.insert_batch("b", 1, &[record(1, None)], 0).unwrap(), 2);
    }

    /// A database of the last schema before enrollment epochs (version 4), with an enrolled
    /// host, a removed one and their records, opens at the current version: everything is
    /// epoch 1, and a new key for either host id starts epoch 2 beside it.
    #[test]
    fn a_version_4_database_migrates_to_enrollment_epochs() {
        let Some(db) = fresh_database("a_version_4_database_migrates_to_enrollment_epochs") else {
            return;
        };
        let key = |host: &str| {
            kycd_protocol::PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, host).unwrap().public_key()
        };
        let (a1, b1) = (key("a"), key("b"));
        {
            let old = PgStore::open_at_version(&db.url, 4).unwrap();
            assert_eq!(old.schema_version().unwrap(), 4);
            let mut client = db.client();
            // As version 4 wrote them: hosts without an epoch, records unique on (host_id, seq).
            for (host, jwk, at) in
                [("a", a1.to_jwk().to_string(), 100i64), ("b", b1.to_jwk().to_string(), 200)]
            {
                client
                    .execute(
                        "INSERT INTO hosts (host_id, public_jwk, enrolled_at) VALUES ($1, $2, $3)",
                        &[&host, &jwk, &at],
                    )
                    .unwrap();
            }
            let insert = r#"INSERT INTO records (host_id, seq, last_seq, tenant, workload, start, "end",
                gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                training_like, foreign_person, merged_windows, body_json, received_at)
               VALUES ($1, $2, $3, 't', 'w', 0, 60, 1.0, 1, 1, 1.0, 1.0, 'unknown', false, false, 1, '{}', 0)"#;
            for (host, seq, last) in [("a", 1i64, 1i64), ("a", 2, 3), ("b", 1, 1)] {
                client.execute(insert, &[&host, &seq, &last]).unwrap();
                client
                    .execute(
                        "INSERT INTO host_progress (host_id, acked_seq) VALUES ($1, $2)
                         ON CONFLICT (host_id) DO UPDATE SET acked_seq = excluded.acked_seq",
                        &[&host, &last],
                    )
                    .unwrap();
            }
            client.execute("DELETE FROM hosts WHERE host_id = 'b'", &[]).unwrap();
            assert!(
                client.execute(insert, &[&"a", &1i64, &1i64]).is_err(),
                "version 4: one record per (host_id, seq)"
            );
        }
        let store = PgStore::open(&db.url).unwrap();
        assert_eq!(store.schema_version().unwrap(), 5);
        crate::store::test_support::check_migrated_to_epochs(&store, &a1, key, || {
            db.client().query_one("SELECT count(*) FROM records", &[]).unwrap().get::<_, i64>(0)
        });
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let Some(db) = fresh_database("a_newer_schema_is_refused") else { return };
        drop(PgStore::open(&db.url).unwrap());
        db.client().execute("UPDATE schema_version SET version = 99", &[]).unwrap();
        assert!(matches!(PgStore::open(&db.url), Err(StoreError::SchemaTooNew { found: 99, .. })));
    }

    #[test]
    fn collectors_starting_at_once_migrate_once() {
        let Some(db) = fresh_database("collectors_starting_at_once_migrate_once") else { return };
        let opened: Vec<Result<PgStore, StoreError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6).map(|_| s.spawn(|| PgStore::open(&db.url))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for store in opened {
            assert_eq!(store.unwrap().schema_version().unwrap(), 5);
        }
        let rows = db.client().query("SELECT version FROM schema_version", &[]).unwrap();
        assert_eq!(rows.len(), 1);
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
