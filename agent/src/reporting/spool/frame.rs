//! The on-disk framing of spool records and the decoder that reads around damage.
//!
//! A frame is `len: u32 LE | crc32c(payload): u32 LE | payload` (a JSON [`UsageRecord`]);
//! the format has no magic and no version: these bytes are what every spool on disk holds.

use kycd_protocol::UsageRecord;

/// Frame header: payload length and CRC32C, both u32 little-endian.
pub(super) const HEADER: usize = 8;
/// Largest payload accepted when reading (a usage record is well under 1 KiB).
const MAX_PAYLOAD: usize = 1 << 20;

/// The highest seq a record stands for.
pub fn covered(record: &UsageRecord) -> u64 {
    record.last_seq.unwrap_or(record.seq).max(record.seq)
}

/// Encodes one frame.
pub fn encode_frame(record: &UsageRecord, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let payload = serde_json::to_vec(record)?;
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// A run of bytes that are not valid frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BadRun {
    pub(super) start: usize,
    pub(super) end: usize,
    /// The seq of the last intact record before it (0: none).
    pub(super) seq_before: u64,
    /// The seq of the first intact record after it (None: it runs to the end).
    pub(super) seq_after: Option<u64>,
}

/// What [`decode_frames`] found.
#[derive(Debug, Default)]
pub(super) struct Decoded {
    pub(super) records: Vec<UsageRecord>,
    /// In offset order; only the last can have `seq_after: None`.
    pub(super) bad: Vec<BadRun>,
}

/// The frame at `at` when it is whole, its CRC matches and it holds a record with a seq
/// above `after`: the record and the frame's length. This is also the resynchronisation
/// test (the format has no magic; a false match needs a CRC32C collision *and* a payload
/// that parses as a usage record with a plausible seq).
fn frame_at(bytes: &[u8], at: usize, after: u64) -> Option<(UsageRecord, usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 || len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(at + HEADER..at + HEADER + len)?;
    if crc32c::crc32c(payload) != u32::from_le_bytes([header[4], header[5], header[6], header[7]]) {
        return None;
    }
    let record = serde_json::from_slice::<UsageRecord>(payload).ok()?;
    (record.seq > after).then_some((record, HEADER + len))
}

/// Decodes frames from `bytes`, resynchronising after damage (see the module docs).
pub(super) fn decode_frames(bytes: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    let mut at = 0usize;
    let mut last_seq = 0u64;
    while at < bytes.len() {
        if let Some((record, n)) = frame_at(bytes, at, last_seq) {
            last_seq = record.seq;
            out.records.push(record);
            at += n;
            continue;
        }
        let start = at;
        match (start + 1..bytes.len()).find_map(|p| frame_at(bytes, p, last_seq).map(|f| (p, f))) {
            Some((p, (record, n))) => {
                out.bad.push(BadRun { start, end: p, seq_before: last_seq, seq_after: Some(record.seq) });
                last_seq = record.seq;
                out.records.push(record);
                at = p + n;
            }
            None => {
                out.bad.push(BadRun { start, end: bytes.len(), seq_before: last_seq, seq_after: None });
                break;
            }
        }
    }
    out
}
