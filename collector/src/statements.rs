//! The storage boundary of agent polling: each enrolled host's agent URL, the latest host
//! statement that verified, the bounded history of poll attempts and each host's poll status
//! ([`StatementStore`]). SQLite implements it in [`crate::store::sqlite::statements`], PostgreSQL in
//! [`crate::store::postgres::statements`]; the poller ([`crate::poll`]) and the findings read and
//! write only through it.
//!
//! Calls are blocking, like [`crate::ReportStore`]'s: async callers use `spawn_blocking`.

use kycd_protocol::{HostStatementClaims, PublicKey};

use crate::store::error::StoreError;

/// How many poll attempts of one host are kept (newest first); older ones are pruned as new
/// ones are recorded. Poll history is a diagnostic (when did this host stop answering, and
/// why); the regulatory record is the usage reports and the latest statement. At a 60 s
/// interval this is 4 hours, and 10,000 hosts keep 2.4 M small rows instead of growing by
/// 14 M rows a day.
pub const POLL_HISTORY_PER_HOST: u32 = 240;

/// A host to poll: enrolled, with an agent URL.
#[derive(Debug, Clone)]
pub struct PollTarget {
    /// The host id (the statement's `iss` and the key's `kid`).
    pub host_id: String,
    /// Base URL of its agent's collector API, e.g. `https://node-1.example:9477`.
    pub agent_url: String,
    /// Its enrolled public key (the one its reports are signed with).
    pub public_key: PublicKey,
}

/// The latest verified statement of a host.
#[derive(Debug, Clone)]
pub struct StoredStatement {
    /// The host id.
    pub host_id: String,
    /// When the collector received it (Unix seconds, the collector's clock).
    pub polled_at: i64,
    /// The verified claims.
    pub claims: HostStatementClaims,
}

/// A host's poll status, as `hosts list` and the dark-host finding read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPollStatus {
    /// The host id.
    pub host_id: String,
    /// Last poll attempt (Unix seconds), if any.
    pub last_attempt_at: Option<i64>,
    /// Last poll that returned a verified statement, if any.
    pub last_ok_at: Option<i64>,
    /// Failed attempts since the last success (drives the poller's backoff).
    pub consecutive_failures: u32,
    /// `kind: detail` of the last failure, cleared by a success.
    pub last_error: Option<String>,
}

/// The outcome of one poll attempt.
#[derive(Debug, Clone)]
pub enum PollOutcome {
    /// A statement that passed every check.
    Ok {
        /// Its claims (boxed: they dwarf a failure).
        claims: Box<HostStatementClaims>,
        /// The compact JWS as received (kept with the latest statement as evidence).
        token: String,
    },
    /// The attempt failed.
    Failed {
        /// Machine-readable kind ([`crate::poll::PollErrorKind::as_str`]), e.g. `timeout`.
        kind: String,
        /// Human-readable detail.
        detail: String,
    },
}

/// One recorded attempt, as [`StatementStore::poll_history`] lists it: when, and
/// `Ok(token digest)` or `Err("kind: detail")`.
pub type PollAttempt = (i64, Result<String, String>);

/// One attempt to record, for [`StatementStore::record_polls`].
#[derive(Debug, Clone)]
pub struct PollRecord {
    /// The host polled.
    pub host_id: String,
    /// When (Unix seconds).
    pub polled_at: i64,
    /// What came of it.
    pub outcome: PollOutcome,
}

/// What the poller stores. Implementations are internally synchronised (`&self`).
pub trait StatementStore: Send + Sync + std::fmt::Debug + 'static {
    /// Sets (Some) or clears (None) the agent URL of an enrolled host; false if not enrolled.
    fn set_agent_url(&self, host_id: &str, url: Option<&str>) -> Result<bool, StoreError>;
    /// Enrolled hosts with an agent URL.
    fn poll_targets(&self) -> Result<Vec<PollTarget>, StoreError>;
    /// Records one poll attempt (history row + status + latest statement when Ok): a batch of
    /// one ([`StatementStore::record_polls`]).
    fn record_poll(&self, host_id: &str, polled_at: i64, outcome: &PollOutcome) -> Result<(), StoreError> {
        self.record_polls(&[PollRecord { host_id: host_id.to_owned(), polled_at, outcome: outcome.clone() }])
    }
    /// Records many attempts in one transaction (one fsync for a whole batch: a round over
    /// 10,000 hosts would otherwise cost 10,000 commits).
    fn record_polls(&self, polls: &[PollRecord]) -> Result<(), StoreError>;
    /// The latest successfully verified statement of each host that has one.
    fn latest_statements(&self) -> Result<Vec<StoredStatement>, StoreError>;
    /// The latest verified token (compact JWS) of a host, as received: the evidence behind
    /// its [`StoredStatement`].
    fn latest_token(&self, host_id: &str) -> Result<Option<String>, StoreError>;
    /// Poll status of every enrolled host (also those never polled).
    fn host_poll_status(&self) -> Result<Vec<HostPollStatus>, StoreError>;
    /// The last `limit` poll attempts of a host, newest first: `Ok(token digest)` (SHA-256
    /// hex of the verified JWS) or `Err("kind: detail")`.
    fn poll_history(&self, host_id: &str, limit: u32) -> Result<Vec<PollAttempt>, StoreError>;
    /// The agent URL of every enrolled host that has one, by host id.
    fn agent_urls(&self) -> Result<Vec<(String, String)>, StoreError>;
}
