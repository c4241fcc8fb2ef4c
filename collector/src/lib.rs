//! kycd's collector: receives the usage reports hosts upload (`POST /v1/reports`), checks
//! that each batch is signed by the enrolled key of the host it names, and stores its
//! records idempotently on `(host_id, seq)`, answering the highest contiguous stored seq so
//! the host's agent can trim its spool.
//!
//! - [`ingest`]: the verify → decompress → parse → validate → store pipeline.
//! - [`server`]: the HTTP server ([`server::run`] takes the listener and shutdown token).
//! - [`store`]: the storage trait ([`store::ReportStore`]); [`sqlite`]: its SQLite backend.
//! - [`hosts`]: host enrollment, and why there is no trust-on-first-use.
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
pub mod server;
pub mod sqlite;
mod sqlite_fleet;
pub mod store;

pub use ingest::{IngestError, Ingested, Ingestor, Limits};
pub use sqlite::SqliteStore;
pub use store::{open_store, HostEntry, ReportStore, Storage, StoreError, ValidRecord};
