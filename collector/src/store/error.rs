//! [`StoreError`]: why a storage call failed, for every backend and every storage trait
//! (reports, fleet, policy, statements). A leaf module, so the traits' own modules can
//! name it without importing the store that implements them.

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
    /// An action does not apply to the finding's state (filing a dismissed finding, …).
    #[error("finding {id} is {from}: it cannot be given the action {action:?}")]
    InvalidTransition {
        /// The finding.
        id: i64,
        /// Its state.
        from: &'static str,
        /// The action refused.
        action: &'static str,
    },
    /// No finding has this id.
    #[error("no finding with id {0}")]
    FindingNotFound(i64),
    /// An action's actor, reference or reason is not acceptable text.
    #[error("invalid action: {0}")]
    InvalidAction(String),
    /// The collector's audit log does not verify.
    #[error("audit log broken at record {seq}: {reason}")]
    AuditBroken {
        /// The first record that does not verify.
        seq: u64,
        /// Why.
        reason: String,
    },
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
