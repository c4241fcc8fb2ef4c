//! kycd's collector: receives the usage reports hosts upload (`POST /v1/reports`), checks
//! that each batch is signed by the enrolled key of the host it names, and stores its
//! records idempotently on `(host_id, epoch, seq)` (the epoch: which enrolled key of the host
//! id signed it, see [`store`]), answering the highest contiguous stored seq so the host's
//! agent can trim its spool.
//!
//! - [`ingest`]: the verify → decompress → parse → validate → store pipeline.
//! - [`http`]: the HTTP server ([`http::run`] takes the listener and shutdown token): ingest,
//!   the JSON read API and the HTML console.
//! - [`store`]: the storage traits ([`store::Storage`]) and [`store::open_store`], which
//!   picks the backend by URL: [`store::sqlite`] (default) or [`store::postgres`] (several
//!   collectors on one database).
//! - [`hosts`]: host enrollment, and why there is no trust-on-first-use.
//! - [`poll`]: the agent poller (signed host statements); [`statements`]: its storage trait.
//! - [`fleet`], [`findings`], [`policy`], [`export`]: the fleet view, the findings rules, the
//!   published policy and the filings export.
//! - [`cli`]: the command line and what each command does (`main` only parses and runs it).
//!
//! In-process use (as the tests do):
//!
//! ```ignore
//! let store = Arc::new(kycd_collector::SqliteStore::open(path)?);
//! store.enroll_host("host-1", &public_key, now)?;
//! let ingestor = Arc::new(Ingestor::new(store.clone(), Limits::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! tokio::spawn(kycd_collector::http::run(listener, ingestor, shutdown.clone()));
//! ```

pub mod cli;
pub mod dates;
pub mod export;
pub mod filing;
pub mod findings;
pub mod fleet;
pub mod hosts;
pub mod http;
pub mod ingest;
pub mod policy;
pub mod poll;
pub mod records;
pub mod statements;
pub mod store;

pub use ingest::{IngestError, Ingested, Ingestor, Limits};
pub use statements::{
    HostPollStatus, PollAttempt, PollOutcome, PollRecord, PollTarget, StatementStore, StoredStatement,
};
pub use store::postgres::PgStore;
pub use store::sqlite::SqliteStore;
pub use store::{
    open_store, Enrollment, HostEntry, Rejection, ReportStore, Storage, StoreError, ValidRecord,
};
