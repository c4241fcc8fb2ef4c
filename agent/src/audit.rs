//! The hash-chained, append-only audit log: `<state>/audit/audit-<first seq>.log`.
//!
//! This module owns the on-disk record format, the chain, segment rotation, crash recovery and
//! the verifier behind `kycctl audit verify`. What goes *into* an event (workload, verdict,
//! policy version, the measure applied) is the caller's; the record adds when (`ts`) and where
//! in the chain (`seq`, `prev`).
//!
//! # Format
//!
//! One record per line, compact JSON with the fields in this order and nothing else:
//!
//! ```text
//! {"seq":7,"ts":1767225600,"prev":"<64 hex>","event":{...}}
//! ```
//!
//! `seq` counts up by exactly one from 0, across files. `prev` is the lowercase hex SHA-256 of
//! the previous record's exact line bytes (without its `\n`); the very first record has 64
//! zeros. A record's hash is likewise the SHA-256 of its own line. Segments are named
//! `audit-<seq of their first record, 20 digits>.log`, so lexical order is chain order, and
//! the chain runs on from the last record of one segment into the first of the next. If
//! old segments were pruned, the oldest remaining record's `prev` is the anchor.
//!
//! # Durability before enforcement
//!
//! [`AuditLog::append`] returns only after the record is written with one `write_all` and
//! `fdatasync`ed. The daemon must wait for that `Ok` before it acts on the decision, and must
//! not act if it gets an error: otherwise a crash or power cut could leave a host enforcing
//! (or lifting) a measure that the audit log never records, which is exactly the history an
//! auditor asks for. Records that were written but not yet acknowledged when a crash hit may
//! survive; a record therefore attests that a decision was made, not that it was enforced.
//! After a failed write or fsync the in-memory chain state is not trusted again (after a
//! failed fsync the kernel may have dropped the data): the next append first reopens the log,
//! re-deriving the chain from the disk exactly as [`AuditLog::open`] does, so a caller that
//! retries gets a fresh, checked continuation point or an error.
//!
//! # What the chain proves
//!
//! Any change to a record other than the newest breaks the link to the next one, and gaps,
//! reordering, insertions, torn lines and missing middle segments break `seq` or `prev`.
//! The chain is unkeyed: someone who can write the directory can drop records from the end,
//! or rewrite the tail into a new consistent chain. The last hash that [`verify_dir`] reports
//! is what to keep off the host to detect that.
//!
//! Only one [`AuditLog`] may append to a directory at a time, or the chain forks. Nothing here
//! locks the directory (std's `File::lock` is newer than the workspace's minimum Rust), so the
//! caller must make sure of it (a single daemon instance).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// `prev` of the very first record: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest record line accepted, in bytes (without the `\n`). Bounds what `open` and `verify`
/// read into memory for one line, whatever the files contain.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Default size at which a segment is rotated: 64 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;

/// Where `kycctl audit verify` looks by default (`<state_dir>/audit` with the default state
/// directory).
pub const DEFAULT_DIR: &str = "/var/lib/kycd/audit";

const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".log";
const SEQ_DIGITS: usize = 20;
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Tuning for [`AuditLog::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditOptions {
    /// Start a new segment when appending would make the current one larger than this. A
    /// segment exceeds it only when it holds a single record or batch larger than this.
    pub max_file_bytes: u64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions { max_file_bytes: DEFAULT_MAX_FILE_BYTES }
    }
}

/// What [`AuditLog::open`] repaired: a torn final line (a crash mid-write) cut off the newest
/// segment. The daemon should log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The segment that was truncated.
    pub file: PathBuf,
    /// How many bytes after the last complete record were removed.
    pub truncated_bytes: u64,
}

/// A record as appended: its position and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// Sequence number.
    pub seq: u64,
    /// Lowercase hex SHA-256 of the record line (what the next record's `prev` holds).
    pub hash: String,
}

/// Why the audit log could not be opened or appended to, or could not be read to verify.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The end of the log is not a valid continuation point, so appending would fork or
    /// break the chain. `line` is 1-based; 0 means the file as a whole.
    #[error("{}:{line}: {reason}; refusing to continue the chain", file.display())]
    Corrupt {
        /// The segment.
        file: PathBuf,
        /// The line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The event does not serialize to a JSON object that the verifier would accept.
    #[error("event rejected: {0}")]
    Event(String),
    /// The record would be longer than [`MAX_RECORD_BYTES`].
    #[error("record of {bytes} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// Length of the record line.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The sequence number cannot go any higher.
    #[error("sequence numbers exhausted")]
    SeqExhausted,
    /// `kycctl audit repair` cannot cut the log where asked.
    #[error("repair: {0}")]
    Repair(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io { path: path.to_owned(), source }
}

fn corrupt(file: &Path, line: u64, reason: impl Into<String>) -> AuditError {
    AuditError::Corrupt { file: file.to_owned(), line, reason: reason.into() }
}

/// The record's hash: hex SHA-256 of its line without the `\n`.
fn line_hash(line: &[u8]) -> String {
    kycd_protocol::token_digest(line)
}

fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

/// The first seq named by a segment file name, or `None` if it is not one.
fn parse_segment_name(name: &OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Records

/// The parts of a valid record that the chain needs.
#[derive(Debug)]
struct Parsed {
    seq: u64,
    prev: String,
}

/// Why a line is not a valid record; `seq` if it could still be read.
#[derive(Debug)]
struct BadRecord {
    seq: Option<u64>,
    reason: String,
}

fn is_hash_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks one record line (without `\n`): strict JSON, exactly the four fields with the right
/// types, and canonical form (field order, no whitespace around them), so that a record has
/// one byte representation and its hash is unambiguous.
fn parse_record(line: &[u8]) -> Result<Parsed, BadRecord> {
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
fn encode_record<E: Serialize + ?Sized>(
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

// ---------------------------------------------------------------------------------------------
// Directory listing

/// A file named like a segment.
#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    regular: bool,
}

#[derive(Debug)]
struct Listing {
    /// In chain order.
    segments: Vec<Segment>,
    /// `*.log` files whose names are not segment names.
    strays: Vec<PathBuf>,
}

fn list_dir(dir: &Path) -> Result<Listing, AuditError> {
    let mut segments = Vec::new();
    let mut strays = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let path = entry.path();
        if let Some(first_seq) = parse_segment_name(&name) {
            let regular = entry.file_type().map_err(io_err(&path))?.is_file();
            segments.push(Segment { first_seq, path, regular });
        } else if name.as_bytes().ends_with(SEGMENT_SUFFIX.as_bytes()) {
            strays.push(path);
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    strays.sort();
    Ok(Listing { segments, strays })
}

/// Brings a log written by an older agent (directory 0750, segments 0640) to the modes of
/// all agent state: 0700 and 0600. Only ever removes permission bits. Best effort: a file
/// system that refuses `chmod` (a root-squashed mount) must not keep the agent from starting,
/// so a failure is logged and the log opened as it is.
fn tighten_modes(dir: &Path, listing: &Listing) {
    use std::os::unix::fs::PermissionsExt as _;
    let tighten = |path: &Path, mode: u32| {
        let Ok(meta) = fs::symlink_metadata(path) else { return };
        let current = meta.permissions().mode() & 0o7777;
        if current & !mode != 0 {
            if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(current & mode)) {
                tracing::warn!(path = %path.display(), error = %e, "cannot narrow the audit log's mode");
            }
        }
    };
    tighten(dir, DIR_MODE);
    for segment in listing.segments.iter().filter(|s| s.regular) {
        tighten(&segment.path, FILE_MODE);
    }
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Creates a new, empty segment and makes its directory entry durable.
fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf), AuditError> {
    let path = dir.join(segment_name(first_seq));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(io_err(&path))?;
    Ok((file, path))
}

// ---------------------------------------------------------------------------------------------
// Reading the end of a segment

/// One complete line found at the end of a segment.
#[derive(Debug)]
struct TailLine {
    /// Byte offset of its first byte in the file.
    offset: u64,
    /// The line without `\n`.
    bytes: Vec<u8>,
}

/// The end of a segment, as `open` needs it.
#[derive(Debug)]
struct Tail {
    /// File length.
    len: u64,
    /// Offset just past the last `\n` (0 if none): where a torn line starts.
    complete_end: u64,
    /// The last complete line.
    last: Option<TailLine>,
    /// The complete line before it.
    before_last: Option<TailLine>,
}

/// Reads the last two complete lines of `file` and where the complete lines end, reading at
/// most three maximal lines' worth of bytes from the end.
fn read_tail(mut file: &File, path: &Path) -> Result<Tail, AuditError> {
    let len = file.metadata().map_err(io_err(path))?.len();
    let window = u64::try_from(3 * (MAX_RECORD_BYTES + 1)).unwrap_or(u64::MAX);
    let start = len.saturating_sub(window);
    file.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
    let mut buf = Vec::new();
    file.take(len - start).read_to_end(&mut buf).map_err(io_err(path))?;
    let len = start + buf.len() as u64;
    let offset = |i: usize| start + i as u64;
    let last_nl = |upto: usize| buf.get(..upto).and_then(|b| b.iter().rposition(|&c| c == b'\n'));

    let Some(end1) = last_nl(buf.len()) else {
        if start > 0 || buf.len() > MAX_RECORD_BYTES {
            return Err(corrupt(path, 0, "unterminated data at the end is longer than any record"));
        }
        return Ok(Tail { len, complete_end: start, last: None, before_last: None });
    };
    if buf.len() - (end1 + 1) > MAX_RECORD_BYTES {
        return Err(corrupt(path, 0, "unterminated data at the end is longer than any record"));
    }
    // Finds the complete line ending at the '\n' at `end` (exclusive of it).
    let line_ending_at = |end: usize| -> Result<(Option<usize>, TailLine), AuditError> {
        let prev_nl = last_nl(end);
        let begin = prev_nl.map_or(0, |i| i + 1);
        if (prev_nl.is_none() && start > 0) || end - begin > MAX_RECORD_BYTES {
            return Err(corrupt(
                path,
                line_number_at(path, offset(begin)),
                format!("line longer than {MAX_RECORD_BYTES} bytes"),
            ));
        }
        let bytes = buf.get(begin..end).unwrap_or_default().to_vec();
        Ok((prev_nl, TailLine { offset: offset(begin), bytes }))
    };
    let (end2, last) = line_ending_at(end1)?;
    let before_last = match end2 {
        Some(end2) => Some(line_ending_at(end2)?.1),
        None => None,
    };
    Ok(Tail { len, complete_end: offset(end1 + 1), last: Some(last), before_last })
}

/// The 1-based number of the line starting at byte `offset` (error reporting only; 0 if the
/// file cannot be read).
fn line_number_at(path: &Path, offset: u64) -> u64 {
    let count = File::open(path).and_then(|f| {
        let mut reader = BufReader::new(f.take(offset));
        let mut newlines = 0u64;
        loop {
            let chunk = reader.fill_buf()?;
            if chunk.is_empty() {
                return Ok(newlines);
            }
            newlines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            let n = chunk.len();
            reader.consume(n);
        }
    });
    count.map_or(0, |n| n + 1)
}

/// The last record of a segment that is not the newest: it must end cleanly with a valid
/// record. Returns the record's seq and hash.
fn last_record_of(segment: &Segment) -> Result<(u64, String), AuditError> {
    let path = &segment.path;
    if !segment.regular {
        return Err(corrupt(path, 0, "not a regular file"));
    }
    let file = File::open(path).map_err(io_err(path))?;
    let tail = read_tail(&file, path)?;
    if tail.complete_end != tail.len {
        return Err(corrupt(path, 0, "an earlier segment does not end with a complete record"));
    }
    let Some(last) = tail.last else {
        return Err(corrupt(path, 0, "an earlier segment is empty"));
    };
    let record =
        parse_record(&last.bytes).map_err(|e| corrupt(path, line_number_at(path, last.offset), e.reason))?;
    Ok((record.seq, line_hash(&last.bytes)))
}

/// Checks that `record` directly follows the record `(prev_seq, prev_hash)`.
fn check_link(record: &Parsed, prev_seq: u64, prev_hash: &str) -> Result<(), String> {
    if prev_seq.checked_add(1) != Some(record.seq) {
        return Err(format!("seq {} does not follow seq {prev_seq}", record.seq));
    }
    if record.prev != prev_hash {
        return Err("prev does not match the hash of the previous record".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writer

/// The audit log, open for appending. One per process.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    options: AuditOptions,
    file: File,
    path: PathBuf,
    len: u64,
    next_seq: u64,
    prev_hash: String,
    recovery: Option<Recovery>,
    poisoned: bool,
    health: WriteHealth,
}

/// How the log's writes have gone, for `kycctl status` and `/metrics`: a status that said
/// "ok" while every write failed with ENOSPC would hide exactly what an operator must see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteHealth {
    /// Appends that failed since the log was opened (counted across reopenings).
    pub failures: u64,
    /// The last append's error; `None` when the last append succeeded (or none was made).
    pub last_error: Option<String>,
}

impl AuditLog {
    /// Opens the log in `dir` (created 0700 if missing; segments are 0600, like all agent state) to continue its chain.
    ///
    /// A torn final line in the newest segment (a crash mid-write; never acknowledged, so
    /// never acted on) is truncated away and reported by [`AuditLog::recovery`]. The last
    /// complete record must be valid and must link to the record before it (in the previous
    /// segment if it is the first of its own), otherwise this fails with
    /// [`AuditError::Corrupt`] rather than start a fork of the chain. Older records are not
    /// read; [`verify_dir`] checks those.
    pub fn open(dir: &Path, options: AuditOptions) -> Result<AuditLog, AuditError> {
        fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(io_err(dir))?;
        let listing = list_dir(dir)?;
        tighten_modes(dir, &listing);
        if let Some(odd) = listing.segments.iter().find(|s| !s.regular) {
            return Err(corrupt(&odd.path, 0, "not a regular file"));
        }
        let Some((newest, earlier)) = listing.segments.split_last() else {
            let (file, path) = create_segment(dir, 0)?;
            sync_dir(dir)?;
            return Ok(AuditLog {
                dir: dir.to_owned(),
                options,
                file,
                path,
                len: 0,
                next_seq: 0,
                prev_hash: GENESIS_PREV.to_owned(),
                recovery: None,
                poisoned: false,
                health: WriteHealth::default(),
            });
        };
        let path = newest.path.clone();
        let file = OpenOptions::new().read(true).append(true).open(&path).map_err(io_err(&path))?;
        let tail = read_tail(&file, &path)?;
        let mut recovery = None;
        if tail.complete_end < tail.len {
            file.set_len(tail.complete_end).and_then(|()| file.sync_data()).map_err(io_err(&path))?;
            recovery = Some(Recovery { file: path.clone(), truncated_bytes: tail.len - tail.complete_end });
        }
        let first_seq = newest.first_seq;
        let predecessor = earlier.last();
        let (last_seq, prev_hash) = match &tail.last {
            Some(last) => {
                let at = |reason: String| corrupt(&path, line_number_at(&path, last.offset), reason);
                let record = parse_record(&last.bytes).map_err(|e| at(e.reason))?;
                if last.offset == 0 && record.seq != first_seq {
                    return Err(at(format!(
                        "first record has seq {} but the file name says {first_seq}",
                        record.seq
                    )));
                }
                if last.offset > 0 && record.seq <= first_seq {
                    return Err(at(format!(
                        "seq {} is not after the segment's first seq {first_seq}",
                        record.seq
                    )));
                }
                match (&tail.before_last, predecessor) {
                    (Some(before), _) => {
                        let previous = parse_record(&before.bytes).map_err(|e| {
                            corrupt(
                                &path,
                                line_number_at(&path, before.offset),
                                format!("record before the last is invalid: {}", e.reason),
                            )
                        })?;
                        check_link(&record, previous.seq, &line_hash(&before.bytes)).map_err(at)?;
                    }
                    (None, _) if first_seq == 0 => {
                        if record.prev != GENESIS_PREV {
                            return Err(at("first record's prev is not 64 zeros".into()));
                        }
                    }
                    (None, Some(predecessor)) => {
                        let (prev_seq, prev_hash) = last_record_of(predecessor)?;
                        check_link(&record, prev_seq, &prev_hash)
                            .map_err(|e| at(format!("{e} (end of {})", predecessor.path.display())))?;
                    }
                    // Older segments were pruned: this record's prev is the anchor.
                    (None, None) => {}
                }
                (Some(record.seq), line_hash(&last.bytes))
            }
            None => match predecessor {
                _ if first_seq == 0 => (None, GENESIS_PREV.to_owned()),
                Some(predecessor) => {
                    let (prev_seq, prev_hash) = last_record_of(predecessor)?;
                    if prev_seq.checked_add(1) != Some(first_seq) {
                        return Err(corrupt(
                            &path,
                            0,
                            format!(
                                "empty segment named seq {first_seq} but {} ends at seq {prev_seq}",
                                predecessor.path.display()
                            ),
                        ));
                    }
                    (Some(prev_seq), prev_hash)
                }
                None => {
                    return Err(corrupt(
                        &path,
                        0,
                        "segment is empty and no earlier segment holds the previous record",
                    ))
                }
            },
        };
        let next_seq = match last_seq {
            Some(seq) => seq.checked_add(1).ok_or(AuditError::SeqExhausted)?,
            None => first_seq,
        };
        Ok(AuditLog {
            dir: dir.to_owned(),
            options,
            file,
            path,
            len: tail.complete_end,
            next_seq,
            prev_hash,
            recovery,
            poisoned: false,
            health: WriteHealth::default(),
        })
    }

    /// How the writes have gone so far.
    pub fn health(&self) -> &WriteHealth {
        &self.health
    }

    /// Notes an append's outcome in [`AuditLog::health`].
    fn note<T>(&mut self, outcome: Result<T, AuditError>) -> Result<T, AuditError> {
        match &outcome {
            Ok(_) => self.health.last_error = None,
            Err(e) => {
                self.health.failures = self.health.failures.saturating_add(1);
                self.health.last_error = Some(e.to_string());
            }
        }
        outcome
    }

    /// What `open` repaired, if anything.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hash of the last record (64 zeros before the first): the next record's `prev`.
    pub fn last_hash(&self) -> &str {
        &self.prev_hash
    }

    /// The segment being appended to.
    pub fn segment_path(&self) -> &Path {
        &self.path
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record with Unix time `ts` and returns once it is durable (written with one
    /// `write_all`, then `fdatasync`). Act on the decision only after this returns `Ok`.
    ///
    /// `event` must serialize to a JSON object without duplicate keys; a rejected event
    /// writes nothing and leaves the log usable. After an I/O error, the next call reopens
    /// the log first (see the module documentation).
    pub fn append<E: Serialize + ?Sized>(&mut self, ts: i64, event: &E) -> Result<RecordInfo, AuditError> {
        let outcome = self.append_one(ts, event);
        self.note(outcome)
    }

    fn append_one<E: Serialize + ?Sized>(&mut self, ts: i64, event: &E) -> Result<RecordInfo, AuditError> {
        self.check_usable()?;
        let seq = self.next_seq;
        let next_seq = seq.checked_add(1).ok_or(AuditError::SeqExhausted)?;
        let (line, hash) = encode_record(seq, ts, &self.prev_hash, event)?;
        self.commit(&line, seq)?;
        self.next_seq = next_seq;
        self.prev_hash.clone_from(&hash);
        Ok(RecordInfo { seq, hash })
    }

    /// Appends several `(ts, event)` records with a single write and a single `fdatasync`
    /// (group commit), returning once all are durable. Either every event is accepted and
    /// written or (if one is rejected) none is. A batch is never split across segments.
    pub fn append_batch<I, E>(&mut self, events: I) -> Result<Vec<RecordInfo>, AuditError>
    where
        I: IntoIterator<Item = (i64, E)>,
        E: Serialize,
    {
        let outcome = self.append_many(events);
        self.note(outcome)
    }

    fn append_many<I, E>(&mut self, events: I) -> Result<Vec<RecordInfo>, AuditError>
    where
        I: IntoIterator<Item = (i64, E)>,
        E: Serialize,
    {
        self.check_usable()?;
        let first_seq = self.next_seq;
        let mut seq = first_seq;
        let mut prev = self.prev_hash.clone();
        let mut buf = Vec::new();
        let mut infos = Vec::new();
        for (ts, event) in events {
            let next = seq.checked_add(1).ok_or(AuditError::SeqExhausted)?;
            let (line, hash) = encode_record(seq, ts, &prev, &event)?;
            buf.extend_from_slice(&line);
            infos.push(RecordInfo { seq, hash: hash.clone() });
            prev = hash;
            seq = next;
        }
        if infos.is_empty() {
            return Ok(infos);
        }
        self.commit(&buf, first_seq)?;
        self.next_seq = seq;
        self.prev_hash = prev;
        Ok(infos)
    }

    /// After a failed write or fsync, reopens the log (re-reading its end from the disk)
    /// before anything else is appended.
    fn check_usable(&mut self) -> Result<(), AuditError> {
        if self.poisoned {
            let health = std::mem::take(&mut self.health);
            let reopened = AuditLog::open(&self.dir, self.options);
            self.health = health;
            let mut reopened = reopened?;
            reopened.health = std::mem::take(&mut self.health);
            *self = reopened;
        }
        Ok(())
    }

    /// Writes complete lines whose first record is `first_seq`, rotating first if they would
    /// not fit, and makes them durable.
    fn commit(&mut self, bytes: &[u8], first_seq: u64) -> Result<(), AuditError> {
        let size = bytes.len() as u64;
        if self.len > 0 && self.len.saturating_add(size) > self.options.max_file_bytes {
            self.rotate(first_seq)?;
        }
        let start = self.len;
        if let Err(source) = self.file.write_all(bytes).and_then(|()| self.file.sync_data()) {
            self.poisoned = true;
            // Best effort: do not leave records behind that the caller was told failed.
            let _ = self.file.set_len(start);
            return Err(AuditError::Io { path: self.path.clone(), source });
        }
        self.len = start + size;
        Ok(())
    }

    fn rotate(&mut self, first_seq: u64) -> Result<(), AuditError> {
        let (file, path) = create_segment(&self.dir, first_seq)?;
        self.file = file;
        self.path = path;
        self.len = 0;
        sync_dir(&self.dir).inspect_err(|_| self.poisoned = true)
    }
}

// ---------------------------------------------------------------------------------------------
// Verifier

/// The outcome of [`verify_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every record is valid and chained.
    Intact {
        /// Records checked.
        records: u64,
        /// Segment files checked.
        files: u64,
        /// Hash of the last record (64 zeros if there is none). Keep it off the host to
        /// detect later truncation or rewriting of the tail.
        last_hash: String,
        /// Seq of the last record, if any.
        last_seq: Option<u64>,
        /// Set when the oldest record's seq is not 0 (older segments were pruned): its seq.
        /// Its `prev` was taken as given.
        anchored_at_seq: Option<u64>,
    },
    /// The first problem found.
    Broken {
        /// The file.
        file: PathBuf,
        /// 1-based line; 0 means the file as a whole.
        line_number: u64,
        /// The record's seq, if it could be read.
        seq: Option<u64>,
        /// What is wrong.
        reason: String,
    },
}

impl VerifyReport {
    /// Whether the chain is intact.
    pub fn is_intact(&self) -> bool {
        matches!(self, VerifyReport::Intact { .. })
    }

    /// Machine-readable form: `{"status":"intact",…}` or `{"status":"broken",…}`.
    pub fn to_json(&self) -> Value {
        match self {
            VerifyReport::Intact { records, files, last_hash, last_seq, anchored_at_seq } => {
                serde_json::json!({
                    "status": "intact",
                    "records": records,
                    "files": files,
                    "last_hash": last_hash,
                    "last_seq": last_seq,
                    "anchored_at_seq": anchored_at_seq,
                })
            }
            VerifyReport::Broken { file, line_number, seq, reason } => serde_json::json!({
                "status": "broken",
                "file": file.to_string_lossy(),
                "line": line_number,
                "seq": seq,
                "reason": reason,
            }),
        }
    }
}

/// Chain state while verifying.
#[derive(Debug, Default)]
struct Chain {
    records: u64,
    /// Seq and hash of the last record seen.
    last: Option<(u64, String)>,
    anchored_at_seq: Option<u64>,
}

/// Checks the whole log in `dir`: every line a canonical record, `seq` up by one across files,
/// each `prev` the hash of the line before, segment names matching their first records, no
/// torn or oversized lines, no stray `*.log` files. The oldest record must have seq 0 and a
/// zero `prev`, unless its seq is higher (pruned log): then its `prev` is accepted as the
/// anchor and reported. Returns `Err` only when the directory or a file cannot be read.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport, AuditError> {
    verify_chain(dir).map(|(report, _)| report)
}

/// [`verify_dir`], also returning the seq of the last record that verified before the first
/// break (or the last record of an intact log).
fn verify_chain(dir: &Path) -> Result<(VerifyReport, Option<u64>), AuditError> {
    let mut chain = Chain::default();
    let report = verify_into(dir, &mut chain)?;
    Ok((report, chain.last.map(|(seq, _)| seq)))
}

fn verify_into(dir: &Path, chain: &mut Chain) -> Result<VerifyReport, AuditError> {
    let listing = list_dir(dir)?;
    let broken = |file: &Path, line_number: u64, seq: Option<u64>, reason: String| {
        Ok(VerifyReport::Broken { file: file.to_owned(), line_number, seq, reason })
    };
    if let Some(stray) = listing.strays.first() {
        return broken(stray, 0, None, "not an audit segment name (expected audit-<20 digits>.log)".into());
    }
    let count = listing.segments.len();
    for (index, segment) in listing.segments.iter().enumerate() {
        let newest = index + 1 == count;
        if !segment.regular {
            return broken(&segment.path, 0, None, "not a regular file".into());
        }
        if let Some(report) = verify_segment(segment, newest, chain)? {
            return Ok(report);
        }
    }
    let (last_seq, last_hash) = match chain.last.clone() {
        Some((seq, hash)) => (Some(seq), hash),
        None => (None, GENESIS_PREV.to_owned()),
    };
    Ok(VerifyReport::Intact {
        records: chain.records,
        files: count as u64,
        last_hash,
        last_seq,
        anchored_at_seq: chain.anchored_at_seq,
    })
}

/// Checks one segment, continuing `chain`; `Some` is the first break found.
fn verify_segment(
    segment: &Segment,
    newest: bool,
    chain: &mut Chain,
) -> Result<Option<VerifyReport>, AuditError> {
    let path = &segment.path;
    let broken = |line_number: u64, seq: Option<u64>, reason: String| {
        Ok(Some(VerifyReport::Broken { file: path.clone(), line_number, seq, reason }))
    };
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_number = 0u64;
    let limit = MAX_RECORD_BYTES as u64 + 1;
    loop {
        buf.clear();
        let n = (&mut reader).take(limit).read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        line_number += 1;
        let Some(line) = buf.strip_suffix(b"\n") else {
            if n as u64 >= limit {
                return broken(line_number, None, format!("line longer than {MAX_RECORD_BYTES} bytes"));
            }
            let mut reason = String::from("torn line (no trailing newline)");
            if newest {
                reason.push_str("; an interrupted write, which kycd truncates when it next opens the log");
            }
            return broken(line_number, None, reason);
        };
        let record = match parse_record(line) {
            Ok(record) => record,
            Err(bad) => return broken(line_number, bad.seq, bad.reason),
        };
        let seq = Some(record.seq);
        if line_number == 1 && record.seq != segment.first_seq {
            return broken(
                line_number,
                seq,
                format!("first record has seq {} but the file name says {}", record.seq, segment.first_seq),
            );
        }
        match &chain.last {
            None if record.seq == 0 => {
                if record.prev != GENESIS_PREV {
                    return broken(line_number, seq, "first record's prev is not 64 zeros".into());
                }
            }
            None => chain.anchored_at_seq = Some(record.seq),
            Some((last_seq, last_hash)) => {
                let expected = last_seq.checked_add(1);
                if expected != Some(record.seq) {
                    let reason = match expected {
                        Some(e) if record.seq > e => {
                            format!("seq {}, expected {e}: {} record(s) missing", record.seq, record.seq - e)
                        }
                        Some(e) => format!("seq {}, expected {e}: repeated or out of order", record.seq),
                        None => format!("seq {} after the largest possible seq", record.seq),
                    };
                    return broken(line_number, seq, reason);
                }
                if record.prev != *last_hash {
                    let reason =
                        "prev does not match the previous record's hash (one of the two was altered)";
                    return broken(line_number, seq, reason.into());
                }
            }
        }
        chain.last = Some((record.seq, line_hash(line)));
        chain.records += 1;
    }
    if line_number == 0 {
        // Only the newest segment may be empty (a crash right after rotation), and its name
        // must be where the chain continues.
        if !newest {
            return broken(0, None, "empty segment that is not the newest".into());
        }
        match &chain.last {
            Some((last_seq, _)) if last_seq.checked_add(1) != Some(segment.first_seq) => {
                return broken(
                    0,
                    None,
                    format!(
                        "empty segment named seq {} but the chain ends at seq {last_seq}",
                        segment.first_seq
                    ),
                );
            }
            None if segment.first_seq != 0 => {
                return broken(0, None, "segment is empty and no earlier segment holds the chain".into());
            }
            _ => {}
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Repair

/// What [`repair`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The file holding every removed byte, in log order (the tail of the segment that holds
    /// the kept last record, then each later segment whole).
    pub removed_to: PathBuf,
    /// Bytes removed from the log (and kept in `removed_to`).
    pub removed_bytes: u64,
    /// Later segments removed whole.
    pub removed_segments: Vec<PathBuf>,
    /// The log as verified after the cut.
    pub after: VerifyReport,
}

/// The operator's command that cuts a log whose end is corrupt back to its last record that
/// verifies, or `None` when no record verifies (then the directory must be moved aside).
pub fn repair_command(dir: &Path) -> Option<String> {
    let (report, last_good) = verify_chain(dir).ok()?;
    if report.is_intact() {
        return None;
    }
    last_good.map(|seq| format!("kycctl audit repair --truncate-after {seq} {}", dir.display()))
}

/// Cuts the log in `dir` after the record with seq `truncate_after`: everything after that
/// record's line is moved, byte for byte, into `repair-<now>-after-<seq>.removed` beside the
/// segments (made durable first), then the segment is truncated and later segments are
/// deleted. The kept part must verify up to `truncate_after`, or nothing is changed.
///
/// The agent must not be running (it is the log's only writer): a log with a corrupt end
/// keeps it from starting anyway.
pub fn repair(dir: &Path, truncate_after: u64, now: i64) -> Result<Repair, AuditError> {
    let listing = list_dir(dir)?;
    let Some(index) = listing.segments.iter().rposition(|s| s.first_seq <= truncate_after) else {
        return Err(AuditError::Repair(format!("no segment holds seq {truncate_after}")));
    };
    let (report, last_good) = verify_chain(dir)?;
    // An intact log needs no repair; cutting one would only lose records (and, with the agent
    // running, break the chain it goes on writing).
    if report.is_intact() {
        return Err(AuditError::Repair("the log verifies: nothing to repair".into()));
    }
    let verified_through = last_good;
    if verified_through.is_none_or(|last| last < truncate_after) {
        return Err(AuditError::Repair(format!(
            "the log does not verify up to seq {truncate_after} (last verified record: {}); \
             choose a seq at or before it",
            verified_through.map_or("none".to_owned(), |s| s.to_string())
        )));
    }
    let segment = &listing.segments[index];
    let keep = end_of_record(&segment.path, truncate_after)?;
    let mut removed = fs::read(&segment.path)
        .map_err(io_err(&segment.path))?
        .split_off(usize::try_from(keep).map_err(|_| AuditError::Repair("segment too large".into()))?);
    let later = &listing.segments[index + 1..];
    for s in later {
        removed.extend(fs::read(&s.path).map_err(io_err(&s.path))?);
    }
    let removed_to = dir.join(format!("repair-{now}-after-{truncate_after}.removed"));
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&removed_to)
        .map_err(io_err(&removed_to))?;
    out.write_all(&removed).and_then(|()| out.sync_all()).map_err(io_err(&removed_to))?;
    sync_dir(dir)?;
    let file = OpenOptions::new().write(true).open(&segment.path).map_err(io_err(&segment.path))?;
    file.set_len(keep).and_then(|()| file.sync_all()).map_err(io_err(&segment.path))?;
    for s in later {
        fs::remove_file(&s.path).map_err(io_err(&s.path))?;
    }
    sync_dir(dir)?;
    Ok(Repair {
        removed_to,
        removed_bytes: removed.len() as u64,
        removed_segments: later.iter().map(|s| s.path.clone()).collect(),
        after: verify_dir(dir)?,
    })
}

/// The byte offset just past the line of the record with seq `seq` in `path`.
fn end_of_record(path: &Path, seq: u64) -> Result<u64, AuditError> {
    let mut reader = BufReader::new(File::open(path).map_err(io_err(path))?);
    let mut buf = Vec::new();
    let mut offset = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io_err(path))?;
        let Some(line) = buf.strip_suffix(b"\n") else {
            return Err(AuditError::Repair(format!(
                "seq {seq} is not a complete record in {}",
                path.display()
            )));
        };
        offset += n as u64;
        if parse_record(line).is_ok_and(|r| r.seq == seq) {
            return Ok(offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt as _;

    fn opts(max_file_bytes: u64) -> AuditOptions {
        AuditOptions { max_file_bytes }
    }

    fn event(i: u64) -> Value {
        json!({"workload": format!("unix_user:{}", 1000 + i), "verdict": "allow", "policy_version": 3})
    }

    /// A log of `n` records; returns the infos.
    fn write_log(dir: &Path, n: u64, max_file_bytes: u64) -> Vec<RecordInfo> {
        let mut log = AuditLog::open(dir, opts(max_file_bytes)).unwrap();
        (0..n).map(|i| log.append(1_700_000_000 + i as i64, &event(i)).unwrap()).collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        list_dir(dir).unwrap().segments.into_iter().map(|s| s.path).collect()
    }

    fn lines(path: &Path) -> Vec<Vec<u8>> {
        let bytes = fs::read(path).unwrap();
        bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn write_lines(path: &Path, lines: &[Vec<u8>]) {
        fs::write(path, lines.concat()).unwrap();
    }

    fn assert_intact(dir: &Path, records: u64) -> VerifyReport {
        let report = verify_dir(dir).unwrap();
        match &report {
            VerifyReport::Intact { records: r, .. } => assert_eq!(*r, records, "{report:?}"),
            VerifyReport::Broken { .. } => panic!("expected intact: {report:?}"),
        }
        report
    }

    fn assert_broken(dir: &Path) -> (PathBuf, u64, Option<u64>, String) {
        match verify_dir(dir).unwrap() {
            VerifyReport::Broken { file, line_number, seq, reason } => (file, line_number, seq, reason),
            other => panic!("expected broken: {other:?}"),
        }
    }

    #[test]
    fn records_have_the_documented_format_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let infos = write_log(dir.path(), 3, DEFAULT_MAX_FILE_BYTES);
        let files = segments(dir.path());
        assert_eq!(files.len(), 1);
        assert!(files[0].ends_with("audit-00000000000000000000.log"));
        let lines = lines(&files[0]);
        let first = String::from_utf8(lines[0].clone()).unwrap();
        assert_eq!(
            first,
            format!("{{\"seq\":0,\"ts\":1700000000,\"prev\":\"{GENESIS_PREV}\",\"event\":{}}}\n", event(0))
        );
        for (i, line) in lines.iter().enumerate() {
            let body = &line[..line.len() - 1];
            assert_eq!(infos[i].seq, i as u64);
            assert_eq!(infos[i].hash, kycd_protocol::token_digest(body));
            if i > 0 {
                let v: Value = serde_json::from_slice(body).unwrap();
                assert_eq!(v["prev"], infos[i - 1].hash.as_str());
            }
        }
        let report = assert_intact(dir.path(), 3);
        assert_eq!(
            report,
            VerifyReport::Intact {
                records: 3,
                files: 1,
                last_hash: infos[2].hash.clone(),
                last_seq: Some(2),
                anchored_at_seq: None
            }
        );
    }

    #[test]
    fn dir_and_files_are_not_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("state/audit");
        write_log(&audit, 1, DEFAULT_MAX_FILE_BYTES);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&audit), 0o700);
        assert_eq!(mode(&segments(&audit)[0]), 0o600);
        // A log left by an older agent (0750 / 0640) is tightened when opened.
        fs::set_permissions(&audit, fs::Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(&segments(&audit)[0], fs::Permissions::from_mode(0o640)).unwrap();
        AuditLog::open(&audit, AuditOptions::default()).unwrap();
        assert_eq!((mode(&audit), mode(&segments(&audit)[0])), (0o700, 0o600));
    }

    #[test]
    fn chain_continues_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let infos = write_log(dir.path(), 20, 300);
        let files = segments(dir.path());
        assert!(files.len() >= 5, "{files:?}");
        let mut seq = 0u64;
        let mut prev = GENESIS_PREV.to_owned();
        for file in &files {
            let name = file.file_name().unwrap().to_str().unwrap().to_owned();
            assert_eq!(name, segment_name(seq));
            assert!(fs::metadata(file).unwrap().len() <= 300);
            for line in lines(file) {
                let v: Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(v["seq"], seq);
                assert_eq!(v["prev"], prev.as_str());
                prev = line_hash(&line[..line.len() - 1]);
                assert_eq!(prev, infos[seq as usize].hash);
                seq += 1;
            }
        }
        assert_eq!(seq, 20);
        let report = assert_intact(dir.path(), 20);
        let VerifyReport::Intact { files: n, last_hash, .. } = report else { unreachable!() };
        assert_eq!(n, files.len() as u64);
        assert_eq!(last_hash, infos[19].hash);
    }

    #[test]
    fn a_record_larger_than_max_file_bytes_gets_a_segment_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), opts(50)).unwrap();
        for i in 0..3 {
            log.append(i, &event(0)).unwrap();
        }
        assert_eq!(segments(dir.path()).len(), 3);
        assert_intact(dir.path(), 3);
    }

    #[test]
    fn reopen_continues_seq_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_log(dir.path(), 3, 400);
        let mut log = AuditLog::open(dir.path(), opts(400)).unwrap();
        assert!(log.recovery().is_none());
        assert_eq!(log.next_seq(), 3);
        assert_eq!(log.last_hash(), first[2].hash);
        let info = log.append(5, &event(3)).unwrap();
        assert_eq!(info.seq, 3);
        drop(log);
        // Reopen again, across a rotation.
        let mut log = AuditLog::open(dir.path(), opts(400)).unwrap();
        for i in 4..12 {
            assert_eq!(log.append(i, &event(i as u64)).unwrap().seq, i as u64);
            drop(log);
            log = AuditLog::open(dir.path(), opts(400)).unwrap();
        }
        assert!(segments(dir.path()).len() > 1);
        assert_intact(dir.path(), 12);
    }

    #[test]
    fn reopen_after_a_crash_right_after_rotation_continues_from_the_previous_segment() {
        let dir = tempfile::tempdir().unwrap();
        let infos = write_log(dir.path(), 3, DEFAULT_MAX_FILE_BYTES);
        // The new segment was created, but no record reached it.
        fs::write(dir.path().join(segment_name(3)), b"").unwrap();
        assert_intact(dir.path(), 3);
        let mut log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        assert_eq!(log.next_seq(), 3);
        assert_eq!(log.last_hash(), infos[2].hash);
        log.append(9, &event(3)).unwrap();
        assert_eq!(log.segment_path(), dir.path().join(segment_name(3)));
        assert_intact(dir.path(), 4);

        // An empty newest segment whose name does not continue the chain is refused.
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 3, DEFAULT_MAX_FILE_BYTES);
        fs::write(dir.path().join(segment_name(5)), b"").unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), AuditOptions::default()),
            Err(AuditError::Corrupt { line: 0, .. })
        ));
        assert_broken(dir.path());
    }

    #[test]
    fn recovery_truncates_a_torn_tail_and_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let infos = write_log(dir.path(), 3, DEFAULT_MAX_FILE_BYTES);
        let path = segments(dir.path())[0].clone();
        let intact_len = fs::metadata(&path).unwrap().len();
        let torn = b"{\"seq\":3,\"ts\":17000";
        fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(torn).unwrap();

        let (file, line, _, reason) = assert_broken(dir.path());
        assert_eq!((file, line), (path.clone(), 4));
        assert!(reason.contains("torn"), "{reason}");

        let mut log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        assert_eq!(
            log.recovery(),
            Some(&Recovery { file: path.clone(), truncated_bytes: torn.len() as u64 })
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), intact_len);
        let info = log.append(1, &event(3)).unwrap();
        assert_eq!(info.seq, 3);
        let last: Value = serde_json::from_slice(lines(&path).last().unwrap()).unwrap();
        assert_eq!(last["prev"], infos[2].hash.as_str());
        assert_intact(dir.path(), 4);
    }

    #[test]
    fn recovery_of_a_segment_holding_only_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let infos = write_log(dir.path(), 2, DEFAULT_MAX_FILE_BYTES);
        fs::write(dir.path().join(segment_name(2)), b"{\"seq\":2,\"ts\"").unwrap();
        let mut log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        assert_eq!(log.recovery().map(|r| r.truncated_bytes), Some(13));
        assert_eq!(log.last_hash(), infos[1].hash);
        log.append(1, &event(2)).unwrap();
        assert_intact(dir.path(), 3);
    }

    #[test]
    fn open_fails_closed_on_a_corrupt_last_record() {
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 4] = [
            ("bad json", |l| l[1] = b'x'),
            ("bad prev hash", |l| {
                let at = l.windows(8).position(|w| w == b"\"prev\":\"").unwrap() + 8;
                l[at] = if l[at] == b'0' { b'1' } else { b'0' };
            }),
            ("seq does not follow", |l| {
                assert!(l.starts_with(b"{\"seq\":2,"));
                l[7] = b'7';
            }),
            ("not canonical", |l| l.insert(1, b' ')),
        ];
        for (name, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            write_log(dir.path(), 3, DEFAULT_MAX_FILE_BYTES);
            let path = segments(dir.path())[0].clone();
            let mut all = lines(&path);
            damage(&mut all[2]);
            write_lines(&path, &all);
            let before = fs::read(&path).unwrap();
            let err = AuditLog::open(dir.path(), AuditOptions::default()).unwrap_err();
            let AuditError::Corrupt { file, line, .. } = &err else { panic!("{name}: {err}") };
            assert_eq!((file, *line), (&path, 3), "{name}: {err}");
            assert_eq!(fs::read(&path).unwrap(), before, "{name}: open must not modify the log");
        }
    }

    #[test]
    fn open_fails_closed_when_the_first_record_of_the_newest_segment_does_not_link() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 10, 300);
        let files = segments(dir.path());
        let newest = files.last().unwrap();
        // Make the newest segment hold a single record, then damage the end of the one before.
        let first = lines(newest)[0].clone();
        write_lines(newest, &[first]);
        let previous = &files[files.len() - 2];
        let mut prev_lines = lines(previous);
        let last = prev_lines.last_mut().unwrap();
        let at = last.windows(5).position(|w| w == b"allow").unwrap();
        last[at] = b'A';
        write_lines(previous, &prev_lines);
        let err = AuditLog::open(dir.path(), opts(300)).unwrap_err();
        assert!(matches!(&err, AuditError::Corrupt { file, line: 1, .. } if file == newest), "{err}");
    }

    #[test]
    fn verify_detects_every_single_byte_flip() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 6, 400);
        let files = segments(dir.path());
        assert!(files.len() >= 2, "the flip test should span a rotation");
        let original = assert_intact(dir.path(), 6);
        let newest = files.last().unwrap().clone();
        let mut flips = 0;
        for file in &files {
            let all = lines(file);
            let mut offset = 0;
            for (index, line) in all.iter().enumerate() {
                let is_last_record = *file == newest && index + 1 == all.len();
                for pos in 0..line.len() {
                    for mask in [0x01u8, 0x20, 0x80] {
                        let mut bytes = all.concat();
                        bytes[offset + pos] ^= mask;
                        fs::write(file, &bytes).unwrap();
                        let report = verify_dir(dir.path()).unwrap();
                        flips += 1;
                        match &report {
                            VerifyReport::Broken { file: f, line_number, .. } => {
                                let at = index as u64 + 1;
                                let ok = (f == file && (*line_number == at || *line_number == at + 1))
                                    || (f != file && *line_number == 1);
                                assert!(
                                    ok,
                                    "flip {mask:#x} at {}:{at} byte {pos}: {report:?}",
                                    file.display()
                                );
                            }
                            // The newest record has no successor: its change shows only in the
                            // last hash, which is why operators keep it off the host.
                            VerifyReport::Intact { last_hash, .. } => {
                                let VerifyReport::Intact { last_hash: before, .. } = &original else {
                                    unreachable!()
                                };
                                assert!(
                                    is_last_record && last_hash != before,
                                    "undetected flip {mask:#x} at {}:{} byte {pos}",
                                    file.display(),
                                    index + 1
                                );
                            }
                        }
                    }
                }
                offset += line.len();
            }
            fs::write(file, all.concat()).unwrap();
        }
        assert!(flips > 1000, "{flips}");
        assert_eq!(verify_dir(dir.path()).unwrap(), original);
    }

    #[test]
    fn verify_detects_a_deleted_middle_record() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 5, DEFAULT_MAX_FILE_BYTES);
        let path = segments(dir.path())[0].clone();
        let mut all = lines(&path);
        all.remove(2);
        write_lines(&path, &all);
        let (file, line, seq, reason) = assert_broken(dir.path());
        assert_eq!((file, line, seq), (path, 3, Some(3)));
        assert!(reason.contains("missing"), "{reason}");
    }

    #[test]
    fn verify_detects_swapped_records() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 5, DEFAULT_MAX_FILE_BYTES);
        let path = segments(dir.path())[0].clone();
        let mut all = lines(&path);
        all.swap(1, 3);
        write_lines(&path, &all);
        let (file, line, seq, _) = assert_broken(dir.path());
        assert_eq!((file, line, seq), (path, 2, Some(3)));
    }

    #[test]
    fn verify_detects_inserted_records() {
        let dir = tempfile::tempdir().unwrap();
        let infos = write_log(dir.path(), 4, DEFAULT_MAX_FILE_BYTES);
        let path = segments(dir.path())[0].clone();
        let original = lines(&path);

        // A duplicated record.
        let mut all = original.clone();
        all.insert(2, all[1].clone());
        write_lines(&path, &all);
        let (_, line, _, reason) = assert_broken(dir.path());
        assert_eq!(line, 3);
        assert!(reason.contains("repeated"), "{reason}");

        // A forged record that links to its predecessor: the one after it no longer does.
        let (forged, _) = encode_record(2, 5, &infos[1].hash, &json!({"verdict": "allow"})).unwrap();
        let mut all = original.clone();
        all.insert(2, forged);
        write_lines(&path, &all);
        let (_, line, _, _) = assert_broken(dir.path());
        assert_eq!(line, 4);

        // A blank line.
        let mut all = original;
        all.insert(2, b"\n".to_vec());
        write_lines(&path, &all);
        let (_, line, seq, _) = assert_broken(dir.path());
        assert_eq!((line, seq), (3, None));
    }

    #[test]
    fn verify_detects_a_deleted_middle_segment() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 12, 300);
        let files = segments(dir.path());
        assert!(files.len() >= 3);
        fs::remove_file(&files[1]).unwrap();
        let (file, line, _, reason) = assert_broken(dir.path());
        assert_eq!((&file, line), (&files[2], 1));
        assert!(reason.contains("missing"), "{reason}");
    }

    #[test]
    fn a_pruned_log_is_intact_but_reports_its_anchor() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 12, 300);
        let files = segments(dir.path());
        let pruned = lines(&files[0]).len() as u64;
        fs::remove_file(&files[0]).unwrap();
        let report = assert_intact(dir.path(), 12 - pruned);
        let VerifyReport::Intact { anchored_at_seq, .. } = report else { unreachable!() };
        assert_eq!(anchored_at_seq, Some(pruned));
        // And the writer carries on.
        let mut log = AuditLog::open(dir.path(), opts(300)).unwrap();
        assert_eq!(log.append(1, &event(12)).unwrap().seq, 12);
        assert_intact(dir.path(), 13 - pruned);
    }

    #[test]
    fn verify_detects_a_torn_line_in_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 5, DEFAULT_MAX_FILE_BYTES);
        let path = segments(dir.path())[0].clone();
        let mut all = lines(&path);
        let half = all[2].len() / 2;
        all[2].truncate(half);
        all[2].push(b'\n');
        write_lines(&path, &all);
        let (file, line, _, _) = assert_broken(dir.path());
        assert_eq!((file, line), (path.clone(), 3));

        // A torn line at the end of an older segment.
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 10, 300);
        let files = segments(dir.path());
        let mut bytes = fs::read(&files[0]).unwrap();
        bytes.truncate(bytes.len() - 5);
        fs::write(&files[0], bytes).unwrap();
        let (file, _, _, reason) = assert_broken(dir.path());
        assert_eq!(file, files[0]);
        assert!(reason.contains("torn") && !reason.contains("truncates"), "{reason}");
    }

    #[test]
    fn verify_checks_segment_names() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 10, 300);
        let files = segments(dir.path());
        // A segment renamed so that its name no longer matches its first record.
        let renamed = dir.path().join(segment_name(1_000));
        fs::rename(files.last().unwrap(), &renamed).unwrap();
        let (file, line, _, reason) = assert_broken(dir.path());
        assert_eq!((file, line), (renamed.clone(), 1));
        assert!(reason.contains("file name"), "{reason}");
        fs::rename(&renamed, files.last().unwrap()).unwrap();
        assert_intact(dir.path(), 10);

        // A stray *.log file.
        fs::write(dir.path().join("audit-1.log"), b"").unwrap();
        let (file, line, _, _) = assert_broken(dir.path());
        assert_eq!((file, line), (dir.path().join("audit-1.log"), 0));
        // The writer ignores it; other files are ignored by both.
        fs::remove_file(dir.path().join("audit-1.log")).unwrap();
        fs::write(dir.path().join("README"), b"hi").unwrap();
        assert_intact(dir.path(), 10);
    }

    #[test]
    fn verify_of_an_empty_or_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            verify_dir(dir.path()).unwrap(),
            VerifyReport::Intact {
                records: 0,
                files: 0,
                last_hash: GENESIS_PREV.into(),
                last_seq: None,
                anchored_at_seq: None
            }
        );
        let err = verify_dir(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        // A freshly opened log has an empty first segment and is intact.
        AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        assert_intact(dir.path(), 0);
    }

    #[test]
    fn group_commit_produces_a_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), opts(4096)).unwrap();
        let single = log.append(1, &event(0)).unwrap();
        let batch = log.append_batch((1..=40u64).map(|i| (i as i64, event(i)))).unwrap();
        assert_eq!(batch.len(), 40);
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
        assert_eq!(log.last_hash(), batch[39].hash);
        assert!(log.append_batch(Vec::<(i64, Value)>::new()).unwrap().is_empty());
        let after = log.append(2, &event(41)).unwrap();
        assert_eq!(after.seq, 41);
        let files = segments(dir.path());
        // The batch did not fit after the first record, so it went whole into a new segment.
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(lines(&files[1]).len(), 40);
        let first_of_batch: Value = serde_json::from_slice(&lines(&files[1])[0]).unwrap();
        assert_eq!(first_of_batch["prev"], single.hash.as_str());
        assert_intact(dir.path(), 42);
    }

    #[test]
    fn rejected_events_write_nothing_and_leave_the_log_usable() {
        struct DuplicateKeys;
        impl Serialize for DuplicateKeys {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap as _;
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("verdict", "allow")?;
                map.serialize_entry("verdict", "block")?;
                map.end()
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.append(1, &event(0)).unwrap();
        let err = log.append(2, &json!("not an object")).unwrap_err();
        assert!(matches!(err, AuditError::Event(_)), "{err}");
        let err = log.append(2, &DuplicateKeys).unwrap_err();
        assert!(matches!(&err, AuditError::Event(m) if m.contains("duplicate")), "{err}");
        let err = log.append(2, &json!({"blob": "x".repeat(MAX_RECORD_BYTES)})).unwrap_err();
        assert!(matches!(err, AuditError::RecordTooLarge { .. }), "{err}");
        let err = log.append_batch([(3, event(1)), (4, json!([1]))]).unwrap_err();
        assert!(matches!(err, AuditError::Event(_)), "{err}");
        assert_eq!(log.append(5, &event(1)).unwrap().seq, 1);
        assert_intact(dir.path(), 2);
    }

    #[test]
    fn after_a_failed_write_the_next_append_reopens_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.append(1, &event(0)).unwrap();
        let second = log.append(2, &event(1)).unwrap();
        // As if a write had failed halfway and the truncation back had failed too.
        fs::OpenOptions::new().append(true).open(log.segment_path()).unwrap().write_all(b"{\"se").unwrap();
        log.poisoned = true;
        log.prev_hash = "junk".into();
        let info = log.append(3, &event(2)).unwrap();
        assert_eq!(info.seq, 2);
        assert_eq!(log.recovery().map(|r| r.truncated_bytes), Some(4));
        let last: Value = serde_json::from_slice(lines(log.segment_path()).last().unwrap()).unwrap();
        assert_eq!(last["prev"], second.hash.as_str());
        assert_intact(dir.path(), 3);
    }

    #[test]
    fn open_refuses_a_segment_that_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 1, DEFAULT_MAX_FILE_BYTES);
        fs::create_dir(dir.path().join(segment_name(1))).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), AuditOptions::default()),
            Err(AuditError::Corrupt { line: 0, .. })
        ));
        let (_, line, _, reason) = assert_broken(dir.path());
        assert_eq!(line, 0);
        assert!(reason.contains("regular"), "{reason}");
    }
}
