//! The SQLite backend of [`ReportStore`]: one database file in WAL mode.
//!
//! Durability: `synchronous=FULL`. An ack tells the agent it may delete the acked records
//! from its spool, so a committed batch must survive a power loss, not only a crash of the
//! collector process; with `NORMAL` in WAL mode the last commits can roll back on power loss
//! after they were acked, and those records would be lost on both sides. FULL costs one
//! fsync of the WAL per commit, i.e. per batch, which batching amortises.
//!
//! Concurrency: one connection behind a mutex. SQLite has one writer at a time anyway; the
//! mutex keeps this process's writers from contending on the file lock, and the busy
//! timeout covers other processes (e.g. `kycd-collector hosts add` while `serve` runs).
//! Callers run these blocking calls off the async reactor.
//!
//! Layout: this file opens the store; [`driver`] maps the driver's errors and opens
//! connections, [`schema`] holds the migrations, [`reports`]
//! implements [`ReportStore`], [`fleet`] the fleet view and policy, [`statements`] agent
//! polling (the same files as the PostgreSQL backend's).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

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

pub use driver::BUSY_TIMEOUT;
use driver::{db_error, open_connection};
use schema::migrate;
pub use schema::{
    MIGRATIONS, MIGRATION_EPOCHS, MIGRATION_FLEET, MIGRATION_GUEST_GAP, MIGRATION_OPS_BOUNDS,
    MIGRATION_POLLING, MIGRATION_RECORDS,
};

/// The schema version that introduced the roll-ups ([`schema::MIGRATION_ROLLUPS`]).
const ROLLUP_VERSION: usize = 11;

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Whether the schema has the roll-ups (false only for a database opened at an older
    /// version, in tests).
    rollups: bool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode, and migrates it
    /// to the current schema.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_at_version(path, MIGRATIONS.len())
    }

    fn open_at_version(path: impl Into<PathBuf>, version: usize) -> Result<Self, StoreError> {
        let path = path.into();
        let mut conn = open_connection(&path)?;
        migrate(&mut conn, version)?;
        if version >= ROLLUP_VERSION {
            rollups::build_if_needed(&mut conn, kycd_protocol::clock::unix_now())?;
        }
        Ok(SqliteStore { path, conn: Mutex::new(conn), rollups: version >= ROLLUP_VERSION })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.lock()?.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_error)
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Unavailable("a database call panicked".into()))
    }
}
