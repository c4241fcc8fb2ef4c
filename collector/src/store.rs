//! The storage boundary of the collector: what ingest and the `hosts` commands need from a
//! database, as one object-safe trait ([`ReportStore`]) with two implementations: SQLite
//! ([`crate::sqlite::SqliteStore`], the default) and PostgreSQL for fleets
//! ([`crate::postgres::PgStore`]), chosen by the database URL ([`open_store`]); nothing above
//! this module knows which database it talks to.
//!
//! Calls are blocking: async callers run them on the blocking pool (`spawn_blocking`), never
//! on the reactor.
//!
//! **Enrollment epochs.** A host id is enrolled with one key at a time, and each enrollment
//! with a key the host id never had starts a new *epoch* (1 for the first; the highest epoch
//! the host id ever had + 1 after that). A re-imaged host gets a new key and an agent that
//! numbers its records from 1 again: its records are stored under the new epoch, so they
//! neither collide with the old agent's `(host_id, seq)` nor get mistaken for resends of them.
//! Records are unique on `(host_id, epoch, seq)`, and idempotency and the acked seq are per
//! `(host_id, epoch)`. The epoch of a batch is that of the key that verified it; the agent's
//! wire format does not carry it. Re-enrolling a key the host id had before (say, after an
//! accidental `hosts remove`) continues that key's epoch: the same agent is still numbering
//! the same sequence, and a resend of what it sent before must stay a no-op, not be counted a
//! second time. Removing a host keeps its records and its enrollment history.

use kycd_protocol::{PublicKey, UsageRecord};

/// An enrolled host, as listed by `kycd-collector hosts list`.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// The host id (the `kid` of its report signatures).
    pub host_id: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// When it was enrolled (Unix seconds).
    pub enrolled_at: i64,
    /// Its enrollment epoch (see the module docs).
    pub epoch: u64,
    /// Highest contiguous stored sequence number of the current epoch.
    pub acked_seq: u64,
}

/// The current enrollment of a host id: what its batches are verified against and stored
/// under.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The enrolled public key.
    pub public_key: PublicKey,
    /// The enrollment epoch of that key (see the module docs).
    pub epoch: u64,
    /// When the epoch began: the first `hosts add` of this key for this host id (Unix
    /// seconds). Windows may not start long before it (see [`crate::ingest::Limits`]).
    pub enrolled_at: i64,
}

/// A batch of an authenticated host that was refused for good (the agent sets such a batch
/// aside and does not send it again): recorded so that the loss is visible at the collector
/// (the `report_rejected` finding), not only in the agent's `rejected/` directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// The host (the signing key's host id).
    pub host_id: String,
    /// The epoch of the key that signed the batch.
    pub epoch: u64,
    /// The error kind answered (`SeqConflict`, `InvalidRecord`, `HostMismatch`, `Malformed`).
    pub kind: String,
    /// The error text answered (cut to [`MAX_DETAIL`] bytes).
    pub detail: String,
    /// The batch's sequence numbers, first to last, when it could be parsed.
    pub seqs: Option<(u64, u64)>,
    /// When (Unix seconds).
    pub rejected_at: i64,
}

/// Rejections kept per host (the newest); older ones are deleted as new ones are recorded,
/// so an authenticated host that keeps sending bad batches cannot grow the table without
/// bound. The finding quotes the newest; the agent keeps every rejected batch itself.
pub const REJECTIONS_PER_HOST: u32 = 1000;

/// A record that passed validation, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRecord {
    /// The record as received.
    pub record: UsageRecord,
    /// The last sequence number it stands for (`last_seq`, or `seq` when absent).
    pub last_seq: u64,
    /// Its canonical JSON (re-serialized), stored and compared to decide whether a re-sent
    /// record is the same record.
    pub body_json: String,
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is locked by another writer beyond the busy timeout; retry later.
    #[error("database busy")]
    Busy,
    /// The database cannot be used right now (cannot be opened, disk full or I/O error, a
    /// writer thread panicked); retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A record's sequence numbers are already stored with different content, or overlap a
    /// stored record of another range (a merged one, or one inside the incoming merged
    /// range); permanent. The message names the stored ranges, not only the incoming one.
    #[error("{}", seq_conflict_message(*first, *last, stored))]
    SeqConflict {
        /// The conflicting incoming record's first sequence number.
        first: u64,
        /// Its last sequence number (`last_seq`, or `first`).
        last: u64,
        /// The stored records `(seq, last_seq)` it conflicts with, by seq.
        stored: Vec<(u64, u64)>,
    },
    /// `hosts add` for a host id that is already enrolled.
    #[error("host {0:?} is already enrolled (remove it first to change its key)")]
    AlreadyEnrolled(String),
    /// The database was written by a newer collector (schema version above this build's).
    #[error("database schema version {found} is newer than this collector's {supported}")]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// Stored data this build cannot read (e.g. a stored JWK that no longer parses).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// `policy publish` of a version that is not above the published one.
    #[error("policy version {offered} is not newer than the published version {current}")]
    PolicyNotNewer {
        /// The offered version.
        offered: u64,
        /// The published version.
        current: u64,
    },
    /// The database URL names a backend this build does not have.
    #[error("unsupported database URL {0:?} (sqlite://…, a plain path, or postgres://…)")]
    UnsupportedUrl(String),
    /// A database URL of a known backend that cannot be used (unparsable, or asking for
    /// something this build does not do, such as TLS to PostgreSQL); the password is redacted.
    #[error("invalid database URL {0}")]
    InvalidUrl(String),
    /// What a database backend does not support.
    #[error("not supported by this database backend yet: {0}")]
    Unsupported(String),
    /// Any other database error.
    #[error("database error")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `a` or `a..=b`.
fn seq_range(first: u64, last: u64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}..={last}")
    }
}

/// The text of [`StoreError::SeqConflict`]: the incoming range and the stored ones it hits.
fn seq_conflict_message(first: u64, last: u64, stored: &[(u64, u64)]) -> String {
    let stored: Vec<String> = stored.iter().map(|(s, l)| seq_range(*s, *l)).collect();
    format!(
        "seq {} conflicts with stored seq {} (another range, or the same seqs with other content)",
        seq_range(first, last),
        if stored.is_empty() { "(unknown)".to_owned() } else { stored.join(", ") }
    )
}

impl StoreError {
    /// Whether the failure is transient (answer 503 + `Retry-After`).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Busy | StoreError::Unavailable(_))
    }
}

/// What the collector stores. Implementations are internally synchronised (`&self`).
pub trait ReportStore: Send + Sync + std::fmt::Debug + 'static {
    /// The current enrollment of `host_id`, if the host is enrolled.
    fn enrollment(&self, host_id: &str) -> Result<Option<Enrollment>, StoreError>;

    /// The enrolled public key of `host_id`, if the host is enrolled.
    fn host_key(&self, host_id: &str) -> Result<Option<PublicKey>, StoreError> {
        Ok(self.enrollment(host_id)?.map(|e| e.public_key))
    }

    /// Enrolls a host with its public key and returns the enrollment's epoch: the epoch this
    /// key had before for this host id, else a new one (see the module docs). Fails with
    /// [`StoreError::AlreadyEnrolled`] if the host id is enrolled: a key is never replaced
    /// silently.
    fn enroll_host(&self, host_id: &str, key: &PublicKey, enrolled_at: i64) -> Result<u64, StoreError>;

    /// Removes a host's enrollment (its stored records stay: they are regulatory data; so
    /// does its enrollment history). Returns whether it was enrolled.
    fn remove_host(&self, host_id: &str) -> Result<bool, StoreError>;

    /// Every enrolled host, by host id.
    fn list_hosts(&self) -> Result<Vec<HostEntry>, StoreError>;

    /// Stores `records` (validated, increasing, non-overlapping) of `host_id`'s `epoch` in
    /// one transaction: a record already stored with identical content is skipped, one whose
    /// sequence numbers are stored with different content fails the whole batch with
    /// [`StoreError::SeqConflict`]. Returns the acked seq of `(host_id, epoch)` after the
    /// insert.
    fn insert_batch(
        &self,
        host_id: &str,
        epoch: u64,
        records: &[ValidRecord],
        received_at: i64,
    ) -> Result<u64, StoreError>;

    /// The highest N such that every seq in `1..=N` of the host's `epoch` is stored (0: none).
    fn acked_seq(&self, host_id: &str, epoch: u64) -> Result<u64, StoreError>;

    /// The stored records of a host's `epoch` as `(seq, last_seq)` ranges, by seq.
    fn stored_ranges(&self, host_id: &str, epoch: u64) -> Result<Vec<(u64, u64)>, StoreError>;

    /// Records a permanently refused batch of an authenticated host, keeping the newest
    /// [`REJECTIONS_PER_HOST`] of the host.
    fn record_rejection(&self, rejection: &Rejection) -> Result<(), StoreError>;
}

/// The migrations (1-based version, SQL) a database at schema `version` still needs to reach
/// `target`, in order; empty when it is there already. A database written by a newer
/// collector (a version above `migrations.len()`) is refused, never downgraded.
pub(crate) fn pending_migrations<'m>(
    migrations: &[&'m str],
    version: i64,
    target: usize,
) -> Result<Vec<(usize, &'m str)>, StoreError> {
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    if version > supported {
        return Err(StoreError::SchemaTooNew { found: version, supported });
    }
    let applied = usize::try_from(version).unwrap_or(0);
    Ok(migrations.iter().enumerate().take(target).skip(applied).map(|(i, sql)| (i + 1, *sql)).collect())
}

/// A stored count as `u32`: negative (corrupt) reads as 0, too large saturates. Counts the
/// backends read back (GPUs, hosts, failures) are bounded far below either limit.
pub(crate) fn count_u32(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

/// Longest stored poll failure detail: an error chain is useful, a hostile agent's novel is not.
pub(crate) const MAX_DETAIL: usize = 1024;

/// `detail` cut to [`MAX_DETAIL`] bytes at a character boundary.
pub(crate) fn truncate_detail(detail: &str) -> &str {
    if detail.len() <= MAX_DETAIL {
        return detail;
    }
    let mut end = MAX_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    &detail[..end]
}

/// Everything the collector stores, as one trait object: reports and hosts ([`ReportStore`]),
/// the fleet view ([`crate::fleet::FleetStore`]) and the published policy
/// ([`crate::policy::PolicyStore`]) and the agents' statements
/// ([`crate::statements::StatementStore`]).
pub trait Storage:
    ReportStore + crate::fleet::FleetStore + crate::policy::PolicyStore + crate::statements::StatementStore
{
}

impl<
        T: ReportStore
            + crate::fleet::FleetStore
            + crate::policy::PolicyStore
            + crate::statements::StatementStore
            + ?Sized,
    > Storage for T
{
}

/// Opens the store named by a database URL: `postgres://…` or `postgresql://…` (see
/// [`crate::postgres`]), else SQLite: `sqlite:///abs/path`, `sqlite://rel/path`,
/// `sqlite:path` or a plain path.
pub fn open_store(url: &str) -> Result<std::sync::Arc<dyn Storage>, StoreError> {
    if crate::postgres::is_postgres_url(url) {
        return Ok(std::sync::Arc::new(crate::postgres::PgStore::open(url)?));
    }
    Ok(std::sync::Arc::new(crate::sqlite::SqliteStore::open(sqlite_path(url)?)?))
}

/// The file path of a SQLite database URL (see [`open_store`]).
pub fn sqlite_path(url: &str) -> Result<std::path::PathBuf, StoreError> {
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if url.contains("://") {
        return Err(StoreError::UnsupportedUrl(crate::postgres::redact_url(url)));
    } else {
        url
    };
    if path.is_empty() {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    }
    Ok(path.into())
}

/// What the unit tests of both backends share.
#[cfg(test)]
pub(crate) mod test_support {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A valid record of `seq` (covering `seq..=last_seq` when merged): one 60 s window.
    pub(crate) fn record(seq: u64, last_seq: Option<u64>) -> ValidRecord {
        let record = kycd_protocol::UsageRecord {
            seq,
            last_seq,
            window: kycd_protocol::UsageWindow {
                tenant: Some("t".into()),
                workload: "host:h".into(),
                foreign_person: false,
                start: 0,
                end: 60,
                gpu_seconds: 60.0,
                gpus: 1,
                max_concurrent_gpus: 1,
                estimated_ops: 1e15,
                peak_flops: 1e15,
                method: kycd_protocol::EstimationMethod::GpmTensor,
                training_like: false,
                merged_windows: 1,
            },
        };
        let body_json = serde_json::to_string(&record).unwrap();
        ValidRecord { last_seq: last_seq.unwrap_or(seq), record, body_json }
    }

    /// After migration 5 of a version-4 database holding host `a` (key `a1`, enrolled at 100,
    /// records 1 and 2..=3) and the records of a removed host `b` (record 1): everything is in
    /// epoch 1, and new keys start epoch 2 beside the old records. `new_key` makes a key;
    /// `rows` counts the stored records.
    pub(crate) fn check_migrated_to_epochs(
        store: &dyn ReportStore,
        a1: &kycd_protocol::PublicKey,
        new_key: impl Fn(&str) -> kycd_protocol::PublicKey,
        rows: impl Fn() -> i64,
    ) {
        let a = store.enrollment("a").unwrap().unwrap();
        assert_eq!((a.epoch, a.enrolled_at, a.public_key.to_jwk()), (1, 100, a1.to_jwk()));
        assert!(store.enrollment("b").unwrap().is_none(), "removed before the migration");
        assert_eq!(store.stored_ranges("a", 1).unwrap(), [(1, 1), (2, 3)]);
        assert_eq!(store.stored_ranges("b", 1).unwrap(), [(1, 1)]);
        assert_eq!((store.acked_seq("a", 1).unwrap(), store.acked_seq("b", 1).unwrap()), (3, 1));
        let listed = store.list_hosts().unwrap();
        assert_eq!(
            listed.iter().map(|h| (h.host_id.as_str(), h.epoch, h.acked_seq)).collect::<Vec<_>>(),
            [("a", 1, 3)]
        );
        // b's old records are epoch 1 (its key is not known): a new key is epoch 2, and its
        // seq 1 is a new record, not a conflict with the old one.
        assert_eq!(store.enroll_host("b", &new_key("b"), 300).unwrap(), 2);
        assert_eq!(store.insert_batch("b", 2, &[record(1, None)], 0).unwrap(), 1);
        assert_eq!(store.stored_ranges("b", 1).unwrap(), [(1, 1)]);
        // a: removed and re-enrolled with a new key, epoch 2; the old records stay.
        assert!(store.remove_host("a").unwrap());
        assert_eq!(store.enroll_host("a", &new_key("a"), 400).unwrap(), 2);
        assert_eq!(store.insert_batch("a", 2, &[record(1, None), record(2, None)], 0).unwrap(), 2);
        assert_eq!(store.stored_ranges("a", 1).unwrap(), [(1, 1), (2, 3)]);
        assert_eq!(rows(), 6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(sqlite_path("sqlite:///var/lib/x.db").unwrap(), std::path::Path::new("/var/lib/x.db"));
        assert_eq!(sqlite_path("sqlite://rel.db").unwrap(), std::path::Path::new("rel.db"));
        assert_eq!(sqlite_path("sqlite:rel.db").unwrap(), std::path::Path::new("rel.db"));
        assert_eq!(sqlite_path("/tmp/a.db").unwrap(), std::path::Path::new("/tmp/a.db"));
        assert!(matches!(sqlite_path("postgres://db/kycd"), Err(StoreError::UnsupportedUrl(_))));
        assert!(matches!(sqlite_path("sqlite://"), Err(StoreError::UnsupportedUrl(_))));
    }
}
