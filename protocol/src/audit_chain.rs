//! The hash-chained audit record format, shared by the agent's audit log (`kycd`) and the
//! collector's audit log (filing actions), so one verifier reads both.
//!
//! A record is one line of compact JSON with exactly the fields `seq`, `ts`, `prev`, `event`,
//! in that order: `seq` counts from 0 without gaps, `ts` is Unix seconds, `prev` is the hash
//! of the record before ([`GENESIS_PREV`] for the first) and `event` a JSON object. A
//! record's hash is the hex SHA-256 of its line without the `\n`. Lines have one canonical
//! byte form ([`parse_record`] refuses any other), so a hash is unambiguous.

use serde::Serialize;
use serde_json::Value;

/// `prev` of the very first record: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The record's hash: hex SHA-256 of its line without the `\n`.
pub fn line_hash(line: &[u8]) -> String {
    crate::token_digest(line)
}

/// The parts of a valid record that the chain needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// Sequence number.
    pub seq: u64,
    /// Unix seconds.
    pub ts: i64,
    /// Hash of the record before.
    pub prev: String,
}

/// Why a line is not a valid record; `seq` if it could still be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The record's sequence number, when readable.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// Why a record could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The event does not serialize to a JSON object the verifier would accept.
    #[error("event rejected: {0}")]
    Event(String),
    /// The record would be longer than the caller's limit.
    #[error("record of {bytes} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// Length of the record line.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// Whether `s` is 64 lowercase hex digits (a record hash).
pub fn is_hash_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks one record line (without `\n`): strict JSON, exactly the four fields with the right
/// types, and canonical form (field order, no whitespace around them), so that a record has
/// one byte representation and its hash is unambiguous.
pub fn parse_record(line: &[u8]) -> Result<ChainLink, BadRecord> {
    let value = crate::json::parse_strict(line)
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
    Ok(ChainLink { seq, ts, prev: prev.to_owned() })
}

/// Encodes one record line, with its `\n`, and its hash. Refuses anything the verifier would
/// refuse (and lines over `max_bytes`), so a log never holds a record of its own making that
/// reads as broken.
pub fn encode_record<E: Serialize + ?Sized>(
    seq: u64,
    ts: i64,
    prev: &str,
    event: &E,
    max_bytes: usize,
) -> Result<(Vec<u8>, String), ChainError> {
    let mut line = format!("{{\"seq\":{seq},\"ts\":{ts},\"prev\":\"{prev}\",\"event\":").into_bytes();
    serde_json::to_writer(&mut line, event)
        .map_err(|e| ChainError::Event(format!("does not serialize: {e}")))?;
    line.push(b'}');
    if line.len() > max_bytes {
        return Err(ChainError::RecordTooLarge { bytes: line.len(), max: max_bytes });
    }
    if line.contains(&b'\n') {
        return Err(ChainError::Event("record contains a raw newline".into()));
    }
    parse_record(&line).map_err(|e| ChainError::Event(e.reason))?;
    let hash = line_hash(&line);
    line.push(b'\n');
    Ok((line, hash))
}

/// Checks that `record` directly follows the record `(prev_seq, prev_hash)`.
pub fn check_link(record: &ChainLink, prev_seq: u64, prev_hash: &str) -> Result<(), String> {
    if prev_seq.checked_add(1) != Some(record.seq) {
        return Err(format!("seq {} does not follow seq {prev_seq}", record.seq));
    }
    if record.prev != prev_hash {
        return Err("prev does not match the hash of the previous record".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_chain_and_refuse_non_canonical_lines() {
        let (first, h0) = encode_record(0, 10, GENESIS_PREV, &json!({"a": 1}), 1024).unwrap();
        let link = parse_record(&first[..first.len() - 1]).unwrap();
        assert_eq!((link.seq, link.ts, link.prev.as_str()), (0, 10, GENESIS_PREV));
        assert_eq!(h0, line_hash(&first[..first.len() - 1]));
        let (second, _) = encode_record(1, 11, &h0, &json!({"b": 2}), 1024).unwrap();
        let link = parse_record(&second[..second.len() - 1]).unwrap();
        assert!(check_link(&link, 0, &h0).is_ok());
        assert!(check_link(&link, 1, &h0).is_err());
        assert!(check_link(&link, 0, GENESIS_PREV).is_err());
        let spaced = format!("{{\"seq\": 0,\"ts\":10,\"prev\":\"{GENESIS_PREV}\",\"event\":{{}}}}");
        assert!(parse_record(spaced.as_bytes()).is_err());
        assert!(matches!(encode_record(0, 0, GENESIS_PREV, &json!([1]), 1024), Err(ChainError::Event(_))));
        assert!(matches!(
            encode_record(0, 0, GENESIS_PREV, &json!({"x": "y".repeat(100)}), 64),
            Err(ChainError::RecordTooLarge { .. })
        ));
    }
}
