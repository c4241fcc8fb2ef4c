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
//!
//! # Files
//!
//! [`record`] (the line format and the chain link), `segment` (the directory, its file
//! names and reading a segment's end), [`verify`] (`kycctl audit verify`) and [`repair`](mod@repair)
//! (`kycctl audit repair`); this file holds the writer, [`AuditLog`].

mod event;
pub mod record;
pub mod repair;
mod segment;
pub mod verify;

pub use event::AuditEvent;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use record::GENESIS_PREV;
use record::{check_link, encode_record, line_hash, parse_record};
pub use repair::{repair, repair_command, Repair};
use segment::{create_segment, last_record_of, line_number_at, list_dir, read_tail, sync_dir, tighten_modes};
pub use verify::{verify_dir, VerifyReport};

/// Longest record line accepted, in bytes (without the `\n`). Bounds what `open` and `verify`
/// read into memory for one line, whatever the files contain.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Default size at which a segment is rotated: 64 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;

/// Where `kycctl audit verify` looks by default (`<state_dir>/audit` with the default state
/// directory).
pub const DEFAULT_DIR: &str = "/var/lib/kycd/audit";

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

#[cfg(test)]
mod tests {
    use super::segment::segment_name;
    use super::*;
    use serde_json::json;
    use serde_json::Value;
    use std::os::unix::fs::PermissionsExt as _;

    pub(super) fn opts(max_file_bytes: u64) -> AuditOptions {
        AuditOptions { max_file_bytes }
    }

    pub(super) fn event(i: u64) -> Value {
        json!({"workload": format!("unix_user:{}", 1000 + i), "verdict": "allow", "policy_version": 3})
    }

    /// A log of `n` records; returns the infos.
    pub(super) fn write_log(dir: &Path, n: u64, max_file_bytes: u64) -> Vec<RecordInfo> {
        let mut log = AuditLog::open(dir, opts(max_file_bytes)).unwrap();
        (0..n).map(|i| log.append(1_700_000_000 + i as i64, &event(i)).unwrap()).collect()
    }

    pub(super) fn segments(dir: &Path) -> Vec<PathBuf> {
        list_dir(dir).unwrap().segments.into_iter().map(|s| s.path).collect()
    }

    pub(super) fn lines(path: &Path) -> Vec<Vec<u8>> {
        let bytes = fs::read(path).unwrap();
        bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    pub(super) fn write_lines(path: &Path, lines: &[Vec<u8>]) {
        fs::write(path, lines.concat()).unwrap();
    }

    pub(super) fn assert_intact(dir: &Path, records: u64) -> VerifyReport {
        let report = verify_dir(dir).unwrap();
        match &report {
            VerifyReport::Intact { records: r, .. } => assert_eq!(*r, records, "{report:?}"),
            VerifyReport::Broken { .. } => panic!("expected intact: {report:?}"),
        }
        report
    }

    pub(super) fn assert_broken(dir: &Path) -> (PathBuf, u64, Option<u64>, String) {
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
