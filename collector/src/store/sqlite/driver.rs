//! How the SQLite driver (rusqlite) meets the store: its errors mapped to [`StoreError`]
//! kinds, integers converted, and a connection opened with the settings every connection of
//! this backend has (busy timeout, WAL, `synchronous=FULL`). A leaf of the backend: the other
//! files import it, it imports none of them.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use crate::store::error::StoreError;

/// How long a writer waits for another process's lock before the call fails as busy.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn db_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy,
        Some(
            code @ (ErrorCode::CannotOpen
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::ReadOnly
            | ErrorCode::OutOfMemory),
        ) => StoreError::Unavailable(format!("{code:?}")),
        _ => StoreError::Database(Box::new(e)),
    }
}

pub(super) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{value} does not fit in an SQLite integer")))
}

pub(super) fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(db_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "cannot switch {} to WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(db_error)?;
    conn.pragma_update(None, "cache_size", -65536).map_err(db_error)?;
    Ok(conn)
}
