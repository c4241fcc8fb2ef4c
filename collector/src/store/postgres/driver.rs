//! How the PostgreSQL driver meets the store: its errors mapped to [`StoreError`] kinds
//! (and which are worth a retry), integers converted, columns read. A leaf of the backend:
//! the other files import it, it imports none of them.

use postgres::error::SqlState;

use crate::store::error::StoreError;

/// Maps a driver error to the store's error kinds.
pub(super) fn pg_error(e: postgres::Error) -> StoreError {
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
pub(super) fn retryable(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// A failed attempt of a transaction: a driver error (maybe retryable) or a final answer.
pub(super) enum Failed {
    /// A driver error (maybe retryable).
    Pg(postgres::Error),
    /// A final answer.
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

pub(super) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{value} does not fit in a BIGINT")))
}

pub(super) fn get<'a, T: postgres::types::FromSql<'a>>(
    row: &'a postgres::Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(pg_error)
}
