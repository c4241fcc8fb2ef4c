//! The reporting spool: usage windows waiting for the collector's acknowledgement, on disk.
//!
//! Layout of `<state_dir>/spool/`:
//! - `<first_seq:020>.seg`: append-only segments, in name order. Each record is framed as
//!   `len: u32 LE | crc32c(payload): u32 LE | payload`, the payload a JSON
//!   [`UsageRecord`]. A segment is sealed when it reaches `segment_max_bytes` (at a batch
//!   boundary); the next batch starts a new one named after its first sequence number.
//! - `cursor`: `{"acked_seq": N}` — every record covering only seqs `<= N` is acknowledged by
//!   the collector (or was rejected by it, see [`crate::upload`]). Written durably before any
//!   segment is deleted.
//! - `highwater`: `{"assigned_seq": N}` — the highest sequence number ever made durable,
//!   written durably before segments are deleted, so `seq` never goes backwards even when
//!   every segment is gone.
//!
//! **Sequence numbers** start at 1, increase strictly and are never reused once *visible*: a
//! record is visible (to [`Spool::read_from`], hence to the uploader, and to the producer as
//! "appended") only after the fsync of its batch succeeded. Group commit: [`Spool::append_batch`]
//! writes a whole batch with one `write` and one `fdatasync`.
//!
//! **Torn tails.** On open, each segment is scanned; a frame that is incomplete, fails its CRC
//! or does not parse ends the segment: the rest is truncated (the byte count is logged) and
//! counted. Such a record was never fsync'd successfully, so it was never acknowledged to the
//! producer nor sent to the collector: nobody outside this process ever saw its seq, and the
//! next append numbers from the last intact record + 1 (and never below `highwater` or
//! `cursor`). Reusing that *invisible* number is deliberate: skipping it would leave a gap
//! that the collector's contiguous `acked_seq` could never pass. The same holds for a batch
//! whose write or fsync fails at run time: the segment is truncated back and the numbers are
//! not consumed (if even the truncation fails, appends keep failing until it succeeds).
//!
//! **Size cap.** When the segments would grow past 80 % of `max_bytes`, the oldest sealed
//! segments (up to half of the spool) are *merged*: their unacknowledged records are folded
//! per (tenant, workload) into one record each (GPU-seconds and estimated ops summed,
//! `max_concurrent_gpus`/`gpus`/`peak_flops` the max, start the min, end the max,
//! `merged_windows` summed, method the weakest, `training_like`/`foreign_person` or'ed). The
//! merged records partition the merged seq span: each takes `seq` = the first seq of its
//! group and `last_seq` = the seq before the next merged record's (the last one: the end of
//! the span), so every original seq is covered by exactly one record and the collector's
//! contiguity still holds. The merged segment atomically replaces the oldest one (same
//! name); the others are then deleted. A crash in between leaves records whose seq is already
//! covered by an earlier segment: they are skipped (and the segment removed) on open.
//! Nothing is dropped silently: when even merging cannot make room, [`Spool::append_batch`]
//! fails with [`SpoolError::Full`], or [`SpoolError::NoSpace`] when the file system is full.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kycd_protocol::{EstimationMethod, UsageRecord, UsageWindow};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// Frame header: payload length and CRC32C, both u32 little-endian.
const HEADER: usize = 8;
/// Largest payload accepted when reading (a usage record is well under 1 KiB).
const MAX_PAYLOAD: usize = 1 << 20;
const CURSOR_FILE: &str = "cursor";
const HIGHWATER_FILE: &str = "highwater";
const SEGMENT_EXT: &str = "seg";

/// Sizes of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// A segment is sealed once it reaches this size (at a batch boundary).
    pub segment_max_bytes: u64,
    /// Cap on all segments together; merging starts at 80 % of it.
    pub max_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions { segment_max_bytes: 4 << 20, max_bytes: 256 << 20 }
    }
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing a spool file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file system is full (ENOSPC/EDQUOT), even after merging.
    #[error("{path}: no space left for usage windows")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The spool is at its size cap and merging cannot make room.
    #[error("spool full: {used} of {max} bytes are unacknowledged windows that merging cannot shrink")]
    Full {
        /// Bytes in segments.
        used: u64,
        /// `reporting.spool_max_bytes`.
        max: u64,
    },
    /// A state file (cursor, highwater) does not parse.
    #[error("{path}: corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A previous failed write could not be undone; appends wait until it can.
    #[error("{path}: an earlier failed write could not be truncated yet")]
    TailPending {
        /// The segment.
        path: PathBuf,
    },
}

impl SpoolError {
    /// Short kind for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SpoolError::Io { .. } => "io",
            SpoolError::NoSpace { .. } => "no_space",
            SpoolError::Full { .. } => "full",
            SpoolError::Corrupt { .. } => "corrupt",
            SpoolError::TailPending { .. } => "tail_pending",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| {
        if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            SpoolError::NoSpace { path: path.to_owned(), source }
        } else {
            SpoolError::Io { path: path.to_owned(), source }
        }
    }
}

/// Counters, for logs and `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpoolStats {
    /// Windows appended (durably).
    pub appended: u64,
    /// Merge passes run because the spool neared its cap.
    pub merges: u64,
    /// Records folded away by merging (records in − records out).
    pub merged_away: u64,
    /// Bytes of torn or corrupt tails truncated on open.
    pub truncated_bytes: u64,
    /// Failed appends.
    pub append_failures: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CursorFile {
    acked_seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct HighwaterFile {
    assigned_seq: u64,
}

#[derive(Debug)]
struct Segment {
    /// From the file name: orders segments.
    name_seq: u64,
    path: PathBuf,
    /// Durable length (bytes of whole, fsync'd frames).
    len: u64,
    /// Highest seq covered by a record in it (`max(seq, last_seq)`), 0 when empty.
    covered: u64,
    records: usize,
}

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

/// Decodes frames from `bytes`: the records and the length of the intact prefix.
fn decode_frames(bytes: &[u8]) -> (Vec<UsageRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut last_seq = 0u64;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let mut len = [0u8; 4];
        let mut crc = [0u8; 4];
        len.copy_from_slice(&header[..4]);
        crc.copy_from_slice(&header[4..]);
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_PAYLOAD {
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        if crc32c::crc32c(payload) != u32::from_le_bytes(crc) {
            break;
        }
        let Ok(record) = serde_json::from_slice::<UsageRecord>(payload) else { break };
        if record.seq <= last_seq {
            break;
        }
        last_seq = record.seq;
        records.push(record);
        at += HEADER + len;
    }
    (records, at)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, SpoolError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SpoolError::Corrupt { path: path.to_owned(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SpoolError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| SpoolError::Corrupt { path: path.to_owned(), reason: e.to_string() })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// The spool; see the module docs. Not thread-safe by itself: share it as [`SharedSpool`].
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    options: SpoolOptions,
    segments: Vec<Segment>,
    /// The last segment, open for appending (None: the next batch starts a new segment).
    active: Option<File>,
    /// Next seq to assign.
    next_seq: u64,
    cursor: u64,
    /// A failed write left bytes past the active segment's durable length.
    tail_dirty: bool,
    stats: SpoolStats,
}

/// A spool shared by the writer task and the uploader (blocking I/O under the lock: call it
/// from `spawn_blocking`).
pub type SharedSpool = Arc<Mutex<Spool>>;

impl Spool {
    /// Opens (creating) the spool in `dir` and recovers it: torn tails truncated, duplicates
    /// of an interrupted merge removed, the next seq above everything ever made durable.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        crate::fsutil::create_dir_durably(dir).map_err(io_err(dir))?;
        let cursor = read_json::<CursorFile>(&dir.join(CURSOR_FILE))?.map_or(0, |c| c.acked_seq);
        let highwater = read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE))?.map_or(0, |h| h.assigned_seq);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
                continue;
            }
            let Some(seq) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok())
            else {
                warn!(path = %path.display(), "ignoring a file in the spool that is not a segment");
                continue;
            };
            names.push((seq, path));
        }
        names.sort();
        let mut stats = SpoolStats::default();
        let mut segments = Vec::new();
        let mut covered_so_far = 0u64;
        for (name_seq, path) in names {
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let (records, intact) = decode_frames(&bytes);
            if intact < bytes.len() {
                let torn = bytes.len() - intact;
                warn!(path = %path.display(), bytes = torn, kept_records = records.len(),
                      "spool segment has a torn or corrupt tail: truncated (those windows were never acknowledged)");
                let file = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                file.set_len(intact as u64).map_err(io_err(&path))?;
                file.sync_all().map_err(io_err(&path))?;
                stats.truncated_bytes += torn as u64;
            }
            let fresh: Vec<&UsageRecord> = records.iter().filter(|r| r.seq > covered_so_far).collect();
            if fresh.len() < records.len() {
                // Left over from a merge interrupted before it deleted the merged segments.
                if fresh.is_empty() {
                    info!(path = %path.display(), "removing a spool segment already merged into an earlier one");
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                return Err(SpoolError::Corrupt {
                    path,
                    reason: format!("records overlap seqs up to {covered_so_far} of an earlier segment"),
                });
            }
            let seg_covered = records.iter().map(covered).max().unwrap_or(0);
            covered_so_far = covered_so_far.max(seg_covered);
            segments.push(Segment {
                name_seq,
                path,
                len: intact as u64,
                covered: seg_covered,
                records: records.len(),
            });
        }
        sync_dir(dir)?;
        let next_seq = covered_so_far.max(highwater).max(cursor).saturating_add(1);
        let mut spool = Spool {
            dir: dir.to_owned(),
            options,
            segments,
            active: None,
            next_seq,
            cursor,
            tail_dirty: false,
            stats,
        };
        spool.delete_acked()?;
        info!(dir = %dir.display(), next_seq, acked_seq = cursor, segments = spool.segments.len(),
              bytes = spool.used_bytes(), "spool opened");
        Ok(spool)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The next seq to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest seq durably appended (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The durable cursor: every seq `<=` it is acknowledged.
    pub fn acked_seq(&self) -> u64 {
        self.cursor
    }

    /// Counters.
    pub fn stats(&self) -> SpoolStats {
        self.stats
    }

    /// Bytes in segments.
    pub fn used_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Seqs appended but not yet acknowledged (an upper bound when records were merged).
    pub fn pending(&self) -> u64 {
        self.last_seq().saturating_sub(self.cursor)
    }

    /// Appends one window; see [`Spool::append_batch`].
    pub fn append(&mut self, window: UsageWindow) -> Result<u64, SpoolError> {
        self.append_batch(std::slice::from_ref(&window)).map(|(first, _)| first)
    }

    /// Appends `windows` with one write and one fsync, returning the first and last seq
    /// assigned. On error nothing was appended and no seq was consumed; the caller keeps the
    /// windows and retries.
    pub fn append_batch(&mut self, windows: &[UsageWindow]) -> Result<(u64, u64), SpoolError> {
        let result = self.try_append(windows);
        if let Err(e) = &result {
            self.stats.append_failures += 1;
            if matches!(e, SpoolError::NoSpace { .. }) && !self.tail_dirty {
                // Merging may free space (it also needs some, so it may fail too).
                match self.merge_oldest(true) {
                    Ok(true) => {
                        return self.try_append(windows).inspect_err(|_| self.stats.append_failures += 1)
                    }
                    Ok(false) => {}
                    Err(merge) => warn!(error = %merge, "merging the spool to free space failed"),
                }
            }
        }
        result
    }

    fn try_append(&mut self, windows: &[UsageWindow]) -> Result<(u64, u64), SpoolError> {
        if windows.is_empty() {
            return Ok((self.next_seq, self.next_seq - 1));
        }
        self.repair_tail()?;
        let first = self.next_seq;
        let mut buf = Vec::with_capacity(windows.len() * 512);
        for (i, window) in windows.iter().enumerate() {
            let record = UsageRecord { seq: first + i as u64, last_seq: None, window: window.clone() };
            encode_frame(&record, &mut buf)
                .map_err(|e| SpoolError::Corrupt { path: self.dir.clone(), reason: e.to_string() })?;
        }
        let incoming = buf.len() as u64;
        if self.used_bytes() + incoming > self.options.max_bytes / 10 * 8 {
            while self.used_bytes() + incoming > self.options.max_bytes / 10 * 8 {
                if !self.merge_oldest(false)? {
                    break;
                }
            }
            if self.used_bytes() + incoming > self.options.max_bytes {
                return Err(SpoolError::Full { used: self.used_bytes(), max: self.options.max_bytes });
            }
        }
        let rotate = self.segments.last().is_none_or(|s| s.len >= self.options.segment_max_bytes);
        if self.active.is_none() || rotate {
            self.open_segment(first, rotate)?;
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(SpoolError::TailPending { path: self.dir.clone() });
        };
        let Some(file) = self.active.as_mut() else {
            return Err(SpoolError::TailPending { path: seg.path.clone() });
        };
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        if let Err(e) = written {
            let path = seg.path.clone();
            let len = seg.len;
            let undone = file
                .set_len(len)
                .and_then(|()| file.seek(SeekFrom::Start(len)))
                .and_then(|_| file.sync_data());
            if undone.is_err() {
                self.tail_dirty = true;
            }
            return Err(io_err(&path)(e));
        }
        seg.len += incoming;
        seg.covered = first + windows.len() as u64 - 1;
        seg.records += windows.len();
        self.next_seq += windows.len() as u64;
        self.stats.appended += windows.len() as u64;
        Ok((first, self.next_seq - 1))
    }

    fn repair_tail(&mut self) -> Result<(), SpoolError> {
        if !self.tail_dirty {
            return Ok(());
        }
        let (Some(file), Some(seg)) = (self.active.as_mut(), self.segments.last()) else {
            self.tail_dirty = false;
            return Ok(());
        };
        let len = seg.len;
        file.set_len(len)
            .and_then(|()| file.seek(SeekFrom::Start(len)))
            .and_then(|_| file.sync_data())
            .map_err(|_| SpoolError::TailPending { path: seg.path.clone() })?;
        self.tail_dirty = false;
        Ok(())
    }

    /// Opens the last segment for appending, or starts a new one named `first`.
    fn open_segment(&mut self, first: u64, new: bool) -> Result<(), SpoolError> {
        if !new {
            if let Some(seg) = self.segments.last() {
                let mut file = OpenOptions::new().write(true).open(&seg.path).map_err(io_err(&seg.path))?;
                file.seek(SeekFrom::Start(seg.len)).map_err(io_err(&seg.path))?;
                self.active = Some(file);
                return Ok(());
            }
        }
        self.active = None;
        let path = self.dir.join(format!("{first:020}.{SEGMENT_EXT}"));
        let file =
            OpenOptions::new().write(true).create(true).truncate(true).open(&path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment { name_seq: first, path, len: 0, covered: 0, records: 0 });
        self.active = Some(file);
        Ok(())
    }

    /// Up to `max` records with a seq `>= from` (or covering it), in seq order.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<UsageRecord>, SpoolError> {
        let mut out = Vec::new();
        for seg in &self.segments {
            if out.len() >= max {
                break;
            }
            if seg.records == 0 || seg.covered < from {
                continue;
            }
            let mut bytes = Vec::with_capacity(usize::try_from(seg.len).unwrap_or(0));
            File::open(&seg.path)
                .and_then(|f| f.take(seg.len).read_to_end(&mut bytes))
                .map_err(io_err(&seg.path))?;
            let (records, _) = decode_frames(&bytes);
            out.extend(records.into_iter().filter(|r| covered(r) >= from).take(max - out.len()));
        }
        Ok(out)
    }

    /// Records that every seq `<= acked` is acknowledged: the cursor is written durably, then
    /// segments whose records are all covered are deleted. Returns whether the cursor moved.
    /// An `acked` beyond the last seq assigned (the collector knows this host id from an
    /// earlier life, e.g. a wiped state directory) moves the next seq above it.
    pub fn ack(&mut self, acked: u64) -> Result<bool, SpoolError> {
        if acked <= self.cursor {
            return Ok(false);
        }
        if acked >= self.next_seq {
            warn!(acked_seq = acked, last_seq = self.last_seq(),
                  "the collector acknowledged seqs this spool never assigned (state lost?): numbering continues above them");
            self.next_seq = acked + 1;
        }
        write_json(&self.dir.join(CURSOR_FILE), &CursorFile { acked_seq: acked })?;
        self.cursor = acked;
        self.delete_acked()?;
        Ok(true)
    }

    fn delete_acked(&mut self) -> Result<(), SpoolError> {
        let count = self.segments.len();
        let deletable: Vec<usize> = (0..count)
            .filter(|&i| {
                let s = &self.segments[i];
                if s.records == 0 {
                    i + 1 < count || self.active.is_none()
                } else {
                    s.covered <= self.cursor
                }
            })
            .collect();
        if deletable.is_empty() {
            return Ok(());
        }
        // The highwater first: with the segments gone it is what keeps seq from going back.
        write_json(&self.dir.join(HIGHWATER_FILE), &HighwaterFile { assigned_seq: self.last_seq() })?;
        for &i in deletable.iter().rev() {
            let seg = self.segments.remove(i);
            if i + 1 == count {
                self.active = None;
            }
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        sync_dir(&self.dir)
    }

    /// Merges the oldest sealed segments (about half of the spool, at least two; with `seal`,
    /// a lone active segment is sealed first). Returns whether the spool shrank.
    fn merge_oldest(&mut self, seal: bool) -> Result<bool, SpoolError> {
        if seal && self.segments.len() == 1 {
            // Seal the active segment so there is something to merge.
            self.active = None;
        }
        let sealed =
            if self.active.is_some() { self.segments.len().saturating_sub(1) } else { self.segments.len() };
        let half = self.used_bytes() / 2;
        let mut take = 0;
        let mut bytes = 0;
        while take < sealed && (bytes < half || take < 2) {
            bytes += self.segments[take].len;
            take += 1;
        }
        if take == 0 {
            return Ok(false);
        }
        let mut records = Vec::new();
        for seg in &self.segments[..take] {
            records.extend(self.read_segment(seg)?.into_iter().filter(|r| covered(r) > self.cursor));
        }
        let records_in = records.len();
        let merged = merge_records(records);
        let mut buf = Vec::new();
        for r in &merged {
            encode_frame(r, &mut buf)
                .map_err(|e| SpoolError::Corrupt { path: self.dir.clone(), reason: e.to_string() })?;
        }
        if buf.len() as u64 >= bytes {
            return Ok(false);
        }
        let target = self.segments[0].path.clone();
        crate::fsutil::write_atomic(&target, &buf).map_err(io_err(&target))?;
        let covered_max = merged.iter().map(covered).max().unwrap_or(0);
        for seg in self.segments.drain(1..take) {
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        if take == self.segments.len() {
            // The active segment was merged too.
            self.active = None;
        }
        let first = &mut self.segments[0];
        first.len = buf.len() as u64;
        first.records = merged.len();
        first.covered = covered_max;
        sync_dir(&self.dir)?;
        self.stats.merges += 1;
        self.stats.merged_away += (records_in - merged.len()) as u64;
        warn!(
            segments = take,
            records_in,
            records_out = merged.len(),
            bytes_before = bytes,
            bytes_after = buf.len(),
            "spool near its size cap: merged the oldest unacknowledged windows per (tenant, workload)"
        );
        Ok(true)
    }

    fn read_segment(&self, seg: &Segment) -> Result<Vec<UsageRecord>, SpoolError> {
        let mut bytes = Vec::new();
        File::open(&seg.path)
            .and_then(|f| f.take(seg.len).read_to_end(&mut bytes))
            .map_err(io_err(&seg.path))?;
        Ok(decode_frames(&bytes).0)
    }

    /// Segment file names, oldest first (tests, diagnostics).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// The first seq of each segment's name (tests, diagnostics).
    pub fn segment_names(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.name_seq).collect()
    }
}

/// One segment as [`inspect`] sees it.
#[derive(Debug, Serialize)]
pub struct SegmentInspection {
    /// File name.
    pub file: String,
    /// Size on disk.
    pub bytes: u64,
    /// Bytes past the last intact frame (a torn tail that opening the spool would truncate).
    pub torn_bytes: u64,
    /// `[seq, last_seq]` of each intact record (`last_seq` = seq unless merged).
    pub records: Vec<[u64; 2]>,
}

/// What a spool directory holds, read without changing anything (safe while kycd runs).
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The durable cursor.
    pub acked_seq: u64,
    /// The highwater file (0: none yet).
    pub highwater_seq: u64,
    /// Segments, oldest first.
    pub segments: Vec<SegmentInspection>,
}

/// Reads the spool in `dir` without recovering or changing it (`kycctl spool`).
pub fn inspect(dir: &Path) -> Result<Inspection, SpoolError> {
    let acked_seq = read_json::<CursorFile>(&dir.join(CURSOR_FILE))?.map_or(0, |c| c.acked_seq);
    let highwater_seq = read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE))?.map_or(0, |h| h.assigned_seq);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Inspection { acked_seq, highwater_seq, segments: Vec::new() })
        }
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(SEGMENT_EXT))
        .collect();
    files.sort();
    let mut segments = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let (records, intact) = decode_frames(&bytes);
        segments.push(SegmentInspection {
            file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            bytes: bytes.len() as u64,
            torn_bytes: (bytes.len() - intact) as u64,
            records: records.iter().map(|r| [r.seq, covered(r)]).collect(),
        });
    }
    Ok(Inspection { acked_seq, highwater_seq, segments })
}

fn method_rank(m: EstimationMethod) -> u8 {
    match m {
        EstimationMethod::Unknown => 0,
        EstimationMethod::UtilizationUpperBound => 1,
        EstimationMethod::GpmTensor => 2,
    }
}

/// Folds `records` (in seq order) per (tenant, workload); see the module docs for the rules.
pub fn merge_records(records: Vec<UsageRecord>) -> Vec<UsageRecord> {
    let Some(span_end) = records.iter().map(covered).max() else { return Vec::new() };
    let mut groups: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
    let mut out: Vec<UsageRecord> = Vec::new();
    for r in records {
        let key = (r.window.tenant.clone(), r.window.workload.clone());
        match groups.get(&key) {
            Some(&i) => {
                let m = &mut out[i].window;
                let w = &r.window;
                m.gpu_seconds += w.gpu_seconds;
                m.estimated_ops += w.estimated_ops;
                m.gpus = m.gpus.max(w.gpus);
                m.max_concurrent_gpus = m.max_concurrent_gpus.max(w.max_concurrent_gpus);
                m.peak_flops = m.peak_flops.max(w.peak_flops);
                m.start = m.start.min(w.start);
                m.end = m.end.max(w.end);
                m.merged_windows = m.merged_windows.saturating_add(w.merged_windows.max(1));
                if method_rank(w.method) < method_rank(m.method) {
                    m.method = w.method;
                }
                m.training_like |= w.training_like;
                m.foreign_person |= w.foreign_person;
            }
            None => {
                groups.insert(key, out.len());
                out.push(r);
            }
        }
    }
    // Partition the span: each record stands for its seq up to the next record's seq − 1.
    let starts: Vec<u64> = out.iter().map(|r| r.seq).collect();
    for (i, r) in out.iter_mut().enumerate() {
        let end = starts.get(i + 1).map_or(span_end, |next| next - 1);
        r.last_seq = (end > r.seq).then_some(end);
    }
    out
}

/// Counters of the writer task.
#[derive(Debug, Default)]
pub struct WriterCounters {
    /// Failed append attempts (each retried).
    pub append_errors: std::sync::atomic::AtomicU64,
    /// Windows lost because appends still failed at shutdown.
    pub lost_at_shutdown: std::sync::atomic::AtomicU64,
}

/// Most windows held in memory while appends fail; beyond it the channel back-pressures.
const PENDING_MAX: usize = 4096;
/// Most windows in one group commit.
const BATCH_MAX: usize = 1024;

/// The spool writer: windows from `windows` into `spool`, one fsync per group commit (the
/// first window of a group waits at most `group_commit` for others). After each commit it
/// logs the seqs assigned (`usage windows spooled`, `first_seq`..=`last_seq`) and notifies
/// `committed` (the uploader). A failed append is logged, counted and retried with backoff;
/// windows keep being read (up to a bound) meanwhile. Ends when the channel closes, after
/// committing what it holds.
pub async fn run_writer(
    spool: SharedSpool,
    mut windows: crate::gpu::usage::WindowReceiver,
    group_commit: Duration,
    committed: Arc<tokio::sync::Notify>,
    counters: Arc<WriterCounters>,
    mut observe: impl FnMut(&UsageWindow) + Send,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut pending: Vec<UsageWindow> = Vec::new();
    let mut closed = false;
    let mut failures = 0u32;
    loop {
        if pending.is_empty() {
            match windows.recv().await {
                Some(w) => {
                    observe(&w);
                    pending.push(w);
                }
                None => break,
            }
            if !group_commit.is_zero() {
                let deadline = tokio::time::Instant::now() + group_commit;
                while pending.len() < BATCH_MAX {
                    match tokio::time::timeout_at(deadline, windows.recv()).await {
                        Ok(Some(w)) => {
                            observe(&w);
                            pending.push(w);
                        }
                        Ok(None) => {
                            closed = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        while pending.len() < BATCH_MAX && !closed {
            match windows.try_recv() {
                Ok(w) => {
                    observe(&w);
                    pending.push(w);
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        let n = pending.len().min(BATCH_MAX);
        let batch: Vec<UsageWindow> = pending[..n].to_vec();
        let s = Arc::clone(&spool);
        let result = tokio::task::spawn_blocking(move || match s.lock() {
            Ok(mut spool) => spool.append_batch(&batch),
            Err(_) => Err(SpoolError::TailPending { path: PathBuf::from("<poisoned spool lock>") }),
        })
        .await;
        match result {
            Ok(Ok((first, last))) => {
                failures = 0;
                pending.drain(..n);
                info!(first_seq = first, last_seq = last, windows = n, "usage windows spooled");
                committed.notify_one();
            }
            Ok(Err(e)) => {
                failures += 1;
                counters.append_errors.fetch_add(1, Relaxed);
                error!(error = %e, kind = e.kind(), windows = pending.len(), attempt = failures,
                       "cannot spool usage windows; keeping them in memory and retrying");
                if closed && failures >= 3 {
                    counters.lost_at_shutdown.fetch_add(pending.len() as u64, Relaxed);
                    error!(
                        windows = pending.len(),
                        "shutting down with usage windows that could not be spooled"
                    );
                    return;
                }
                let delay = Duration::from_millis(500u64 << failures.min(6));
                let until = tokio::time::Instant::now() + delay;
                // Keep draining the producer meanwhile, up to a bound.
                while !closed && pending.len() < PENDING_MAX {
                    match tokio::time::timeout_at(until, windows.recv()).await {
                        Ok(Some(w)) => {
                            observe(&w);
                            pending.push(w);
                        }
                        Ok(None) => closed = true,
                        Err(_) => break,
                    }
                }
                tokio::time::sleep_until(until).await;
            }
            Err(join) => {
                error!(error = %join, "spool writer task failed");
                return;
            }
        }
        if closed && pending.is_empty() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn window(tenant: &str, workload: &str, start: i64) -> UsageWindow {
        UsageWindow {
            tenant: Some(tenant.into()),
            workload: workload.into(),
            foreign_person: false,
            start,
            end: start + 60,
            gpu_seconds: 60.0,
            gpus: 1,
            max_concurrent_gpus: 1,
            estimated_ops: 1e15,
            peak_flops: 1e15,
            method: EstimationMethod::GpmTensor,
            training_like: false,
            merged_windows: 1,
        }
    }

    fn opts() -> SpoolOptions {
        SpoolOptions { segment_max_bytes: 2048, max_bytes: 1 << 30 }
    }

    fn seqs(records: &[UsageRecord]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn append_read_ack_delete() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        for i in 0..40 {
            assert_eq!(spool.append(window("t", "cgroup:/a", i * 60)).unwrap(), i as u64 + 1);
        }
        assert!(spool.segment_count() > 3, "rotated by size");
        let all = spool.read_from(1, 1000).unwrap();
        assert_eq!(seqs(&all), (1..=40).collect::<Vec<_>>());
        assert_eq!(seqs(&spool.read_from(11, 5).unwrap()), vec![11, 12, 13, 14, 15]);
        let before = spool.segment_count();
        assert!(spool.ack(20).unwrap());
        assert!(!spool.ack(10).unwrap(), "the cursor never goes back");
        assert!(spool.segment_count() < before, "acked segments deleted");
        assert_eq!(spool.read_from(21, 1000).unwrap().first().map(|r| r.seq), Some(21));
        spool.ack(40).unwrap();
        assert_eq!(spool.segment_count(), 0, "everything acked: no segment left");
        drop(spool);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(spool.acked_seq(), 40);
        assert_eq!(
            spool.append(window("t", "w", 0)).unwrap(),
            41,
            "seq continues after deleting every segment"
        );
    }

    #[test]
    fn inspect_lists_records_without_changing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        spool.append_batch(&[window("t", "w", 0), window("t", "w", 60), window("t", "w", 120)]).unwrap();
        spool.ack(1).unwrap();
        drop(spool);
        let seg = last_segment(dir.path());
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"torn").unwrap();
        drop(f);
        let before = std::fs::read(&seg).unwrap();
        let inspection = inspect(dir.path()).unwrap();
        assert_eq!(inspection.acked_seq, 1);
        assert_eq!(inspection.segments.len(), 1);
        assert_eq!(inspection.segments[0].records, vec![[1, 1], [2, 2], [3, 3]]);
        assert_eq!(inspection.segments[0].torn_bytes, 4);
        assert_eq!(std::fs::read(&seg).unwrap(), before, "read-only");
    }

    #[test]
    fn restart_continues_seq_and_keeps_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        let (a, b) = spool.append_batch(&[window("t", "w", 0), window("t", "w", 60)]).unwrap();
        assert_eq!((a, b), (1, 2));
        drop(spool);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(spool.append(window("t", "w", 120)).unwrap(), 3);
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3]);
        // The highwater file alone keeps the numbering when segments are gone.
        spool.ack(3).unwrap();
        drop(spool);
        std::fs::remove_file(dir.path().join(CURSOR_FILE)).unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(spool.append(window("t", "w", 180)).unwrap(), 4);
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut segs: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        segs.pop().unwrap()
    }

    #[test]
    fn torn_tail_is_truncated_and_its_invisible_seq_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool =
            Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
        for i in 0..5 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        let seg = last_segment(dir.path());
        let len = std::fs::metadata(&seg).unwrap().len();
        // Cut the last record in the middle of its payload (a crash during the write).
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(len - 20).unwrap();
        drop(file);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert!(spool.stats().truncated_bytes > 0);
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4]);
        assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 5, "seq 5 was never visible");
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4, 5]);
        assert_eq!(spool.read_from(5, 1).unwrap()[0].window.start, 999);
        // A header cut short is a torn tail too.
        drop(spool);
        let seg = last_segment(dir.path());
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[7, 0, 0]).unwrap();
        drop(f);
        let spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(spool.stats().truncated_bytes, 3);
        assert_eq!(spool.next_seq(), 6);
    }

    #[test]
    fn crc_corruption_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool =
            Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
        for i in 0..4 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        let seg = last_segment(dir.path());
        let mut bytes = std::fs::read(&seg).unwrap();
        // Flip a byte inside record 3's payload.
        let mut at = 0;
        for _ in 0..2 {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            at += HEADER + len;
        }
        bytes[at + HEADER + 3] ^= 0x20;
        std::fs::write(&seg, &bytes).unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2]);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), at as u64, "truncated at the bad frame");
        assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 3);
    }

    #[test]
    fn merge_under_cap_keeps_totals_and_covers_every_seq() {
        let dir = tempfile::tempdir().unwrap();
        // ~400 bytes a record: the cap holds about 25 of them.
        let options = SpoolOptions { segment_max_bytes: 2000, max_bytes: 10_000 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        let mut total_ops = 0.0;
        let mut total_gpu_s = 0.0;
        for i in 0..200i64 {
            let mut w = window(if i % 2 == 0 { "a" } else { "b" }, "cgroup:/x", i * 60);
            w.estimated_ops = (i + 1) as f64;
            w.max_concurrent_gpus = u32::try_from(i % 7).unwrap();
            if i == 3 {
                w.method = EstimationMethod::UtilizationUpperBound;
            }
            total_ops += w.estimated_ops;
            total_gpu_s += w.gpu_seconds;
            spool.append(w).unwrap();
        }
        assert!(spool.stats().merges > 0, "merged near the cap");
        assert!(spool.used_bytes() <= options.max_bytes);
        let records = spool.read_from(1, 10_000).unwrap();
        // Every seq 1..=200 is covered by exactly one record.
        let mut next = 1;
        for r in &records {
            assert_eq!(r.seq, next, "records partition the seqs");
            next = covered(r) + 1;
        }
        assert_eq!(next, 201);
        let ops: f64 = records.iter().map(|r| r.window.estimated_ops).sum();
        let gpu_s: f64 = records.iter().map(|r| r.window.gpu_seconds).sum();
        let windows: u32 = records.iter().map(|r| r.window.merged_windows).sum();
        assert_eq!((ops, gpu_s, windows), (total_ops, total_gpu_s, 200));
        let merged_a = records
            .iter()
            .find(|r| r.window.merged_windows > 1 && r.window.tenant.as_deref() == Some("a"))
            .unwrap();
        assert!(records.iter().any(|r| r.last_seq.is_some()), "merged records cover ranges");
        assert!(merged_a.window.start < merged_a.window.end - 60);
        assert_eq!(merged_a.window.max_concurrent_gpus, 6);
        assert_eq!(merged_a.window.method, EstimationMethod::GpmTensor);
        assert!(records.iter().any(|r| r.window.method == EstimationMethod::UtilizationUpperBound));
        // The merged state survives a restart and numbering continues.
        drop(spool);
        let mut spool = Spool::open(dir.path(), options).unwrap();
        assert_eq!(spool.read_from(1, 10_000).unwrap(), records);
        assert_eq!(spool.append(window("a", "w", 0)).unwrap(), 201);
    }

    #[test]
    fn full_when_merging_cannot_help() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { segment_max_bytes: 1000, max_bytes: 4000 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        let mut err = None;
        for i in 0..100 {
            // Every window its own workload: nothing to fold.
            match spool.append(window("t", &format!("cgroup:/w{i}"), 0)) {
                Ok(_) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = err.expect("the cap is hit");
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        let next = spool.next_seq();
        spool.ack(next - 1).unwrap();
        assert_eq!(spool.append(window("t", "w", 0)).unwrap(), next, "room again once acked; no seq lost");
    }

    #[test]
    fn interrupted_merge_leftovers_are_skipped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { segment_max_bytes: 1000, max_bytes: 1 << 30 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        for i in 0..20 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        let paths = spool.segment_paths();
        let second = std::fs::read(&paths[1]).unwrap();
        let before = spool.read_from(1, 100).unwrap();
        assert!(spool.merge_oldest(false).unwrap());
        drop(spool);
        // Resurrect a merged-away segment, as if the crash came before its deletion.
        std::fs::write(&paths[1], second).unwrap();
        let spool = Spool::open(dir.path(), options).unwrap();
        let after = spool.read_from(1, 100).unwrap();
        assert!(!paths[1].exists(), "leftover removed");
        assert_eq!(after.iter().map(|r| r.window.merged_windows).sum::<u32>(), 20);
        assert!(after.len() < before.len());
        assert_eq!(spool.next_seq(), 21);
    }
}
