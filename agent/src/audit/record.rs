//! One audit record: its line format (compact JSON `seq`, `ts`, `prev`, `event`, in that
//! order), its hash, and the link that chains it to the record before it.

use serde::Serialize;
use serde_json::Value;

use super::{AuditError, MAX_RECORD_BYTES};

/// `prev` of the very first record: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The record's hash: hex SHA-256 of its line without the `\n`.
pub(super) fn line_hash(line: &[u8]) -> String {
    kycd_protocol::token_digest(line)
}

/// The parts of a valid record that the chain needs.
#[derive(Debug)]
pub(super) struct Parsed {
    pub(super) seq: u64,
    pub(super) prev: String,
}

/// Why a line is not a valid record; `seq` if it could still be read.
#[derive(Debug)]
pub(super) struct BadRecord {
    pub(super) seq: Option<u64>,
    pub(super) reason: String,
}

pub(super) fn is_hash_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks one record line (without `\n`): strict JSON, exactly the four fields with the right
/// types, and canonical form (field order, no whitespace around them), so that a record has
/// one byte representation and its hash is unambiguous.
pub(super) fn parse_record(line: &[u8]) -> Result<Parsed, BadRecord> {
    let value = kycd_protocol::json::parse_strict(line)
        .map_err(|e| BadRecord { seq: None, reason: format!("not strict JSON: {e}") })?;
    let Value::Object(fields) = &value else {
        return Err(BadRecord { seq: None, reason: "not a JSON object".into() });
    };
    let seq = fields.get("seq").and_then(Value::as_u64);
    let bad = |reason: String| Err(BadRecord { seq, reason });
    if let Some(key) = fields.keys().find(|k| !matches!(k.as_str(), "seq" | "ts" | "prev" | "event")) {
        return bad(format!("unexpected field {key:?}"));
    }
    let Some(seq) = seq else {
        return bad("seq missing or not an unsigned integer".into());
    };
    let Some(ts) = fields.get("ts").and_then(Value::as_i64) else {
        return bad("ts missing or not an integer".into());
    };
    let Some(prev) = fields.get("prev").and_then(Value::as_str) else {
        return bad("prev missing or not a string".into());
    };
    if !is_hash_hex(prev) {
        return bad("prev is not 64 lowercase hex digits".into());
    }
    if !matches!(fields.get("event"), Some(Value::Object(_))) {
        return bad("event missing or not a JSON object".into());
    }
    let header = format!("{{\"seq\":{seq},\"ts\":{ts},\"prev\":\"{prev}\",\"event\":");
    if !line.starts_with(header.as_bytes()) || !line.ends_with(b"}") {
        return bad("not in canonical form (field order or whitespace)".into());
    }
    Ok(Parsed { seq, prev: prev.to_owned() })
}

/// Encodes one record line, with its `\n`, and its hash. Refuses anything the verifier would
/// refuse, so the log never holds a record of its own making that reads as broken.
pub(super) fn encode_record<E: Serialize + ?Sized>(
    seq: u64,
    ts: i64,
    prev: &str,
    event: &E,
) -> Result<(Vec<u8>, String), AuditError> {
    let mut line = format!("{{\"seq\":{seq},\"ts\":{ts},\"prev\":\"{prev}\",\"event\":").into_bytes();
    serde_json::to_writer(&mut line, event)
        .map_err(|e| AuditError::Event(format!("does not serialize: {e}")))?;
    line.push(b'}');
    if line.len() > MAX_RECORD_BYTES {
        return Err(AuditError::RecordTooLarge { bytes: line.len(), max: MAX_RECORD_BYTES });
    }
    if line.contains(&b'\n') {
        return Err(AuditError::Event("record contains a raw newline".into()));
    }
    parse_record(&line).map_err(|e| AuditError::Event(e.reason))?;
    let hash = line_hash(&line);
    line.push(b'\n');
    Ok((line, hash))
}

/// Checks that `record` directly follows the record `(prev_seq, prev_hash)`.
pub(super) fn check_link(record: &Parsed, prev_seq: u64, prev_hash: &str) -> Result<(), String> {
    if prev_seq.checked_add(1) != Some(record.seq) {
        return Err(format!("seq {} does not follow seq {prev_seq}", record.seq));
    }
    if record.prev != prev_hash {
        return Err("prev does not match the hash of the previous record".into());
    }
    Ok(())
}
