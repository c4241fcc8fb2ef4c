//! kycd's collector: receives the usage reports hosts upload (`POST /v1/reports`), checks
//! that each batch is signed by the enrolled key of the host it names, and stores its
//! records idempotently on `(host_id, epoch, seq)` (the epoch: which enrolled key of the host
//! id signed it, see [`store`]), answering the highest contiguous stored seq so the host's
//! agent can trim its spool.
//!
//! - [`ingest`]: the verify → decompress → parse → validate → store pipeline.
//! - [`server`]: the HTTP server ([`server::run`] takes the listener and shutdown token).
//! - [`store`]: the storage trait ([`store::ReportStore`]) and [`store::open_store`], which
//!   picks the backend by URL: [`sqlite`] (default) or [`postgres`] (several collectors on one
//!   database).
//! - [`hosts`]: host enrollment, and why there is no trust-on-first-use.
//! - [`poll`]: the agent poller (signed host statements); [`statements`]: its storage trait,
//!   [`sqlite_statements`]: its SQLite backend.
//!
//! In-process use (as the tests do):
//!
//! ```ignore
//! let store = Arc::new(kycd_collector::sqlite::SqliteStore::open(path)?);
//! store.enroll_host("host-1", &public_key, now)?;
//! let ingestor = Arc::new(Ingestor::new(store.clone(), Limits::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! tokio::spawn(kycd_collector::server::run(listener, ingestor, shutdown.clone()));
//! ```

pub mod api;
pub mod cli;
pub mod export;
pub mod findings;
pub mod fleet;
pub mod hosts;
pub mod ingest;
pub mod policy;
pub mod poll;
pub mod postgres;
pub mod server;
pub mod sqlite;
mod sqlite_fleet;
pub mod sqlite_statements;
pub mod statements;
pub mod store;

pub use ingest::{IngestError, Ingested, Ingestor, Limits};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use statements::{
    HostPollStatus, PollAttempt, PollOutcome, PollRecord, PollTarget, StatementStore, StoredStatement,
};
pub use store::{
    open_store, Enrollment, HostEntry, Rejection, ReportStore, Storage, StoreError, ValidRecord,
};

/// The PostgreSQL test cluster of the integration tests, for the unit tests too.
#[cfg(test)]
#[path = "../tests/pg_support/mod.rs"]
mod pg_support;
