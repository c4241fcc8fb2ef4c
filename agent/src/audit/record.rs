//! One audit record: the line format and chain link are [`kycd_protocol::audit_chain`]'s
//! (shared with the collector's audit log); this maps its errors into [`AuditError`] and
//! applies the agent's record size limit.

use serde::Serialize;

use super::{AuditError, MAX_RECORD_BYTES};
pub use kycd_protocol::audit_chain::GENESIS_PREV;
pub(super) use kycd_protocol::audit_chain::{check_link, line_hash, parse_record};

/// Encodes one record line, with its `\n`, and its hash (see
/// [`kycd_protocol::audit_chain::encode_record`]), at most [`MAX_RECORD_BYTES`] long.
pub(super) fn encode_record<E: Serialize + ?Sized>(
    seq: u64,
    ts: i64,
    prev: &str,
    event: &E,
) -> Result<(Vec<u8>, String), AuditError> {
    use kycd_protocol::audit_chain::ChainError;
    kycd_protocol::audit_chain::encode_record(seq, ts, prev, event, MAX_RECORD_BYTES).map_err(|e| match e {
        ChainError::Event(reason) => AuditError::Event(reason),
        ChainError::RecordTooLarge { bytes, max } => AuditError::RecordTooLarge { bytes, max },
    })
}
