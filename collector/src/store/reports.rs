//! The reports-and-hosts contract of the store ([`ReportStore`]) and the values it moves:
//! enrollments, validated records, rejected batches.
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

use super::error::StoreError;

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
    /// The error text answered (cut to [`super::schema::MAX_DETAIL`] bytes).
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
