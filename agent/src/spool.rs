//! The reporting spool: usage windows waiting for the collector's acknowledgement, on disk.
//!
//! Layout of `<state_dir>/spool/` (directories 0700 and files 0600, set explicitly when they
//! are created, whatever the umask; an older spool's wider modes are narrowed on open):
//! - `<first_seq:020>.seg`: append-only segments, in name order. Each record is framed as
//!   `len: u32 LE | crc32c(payload): u32 LE | payload`, the payload a JSON
//!   [`UsageRecord`]. A segment is sealed when it reaches `segment_max_bytes` (at a batch
//!   boundary); the next batch starts a new one named after its first sequence number.
//! - `cursor`: `{"acked_seq": N}` — every record covering only seqs `<= N` is acknowledged by
//!   the collector (or was rejected by it, see [`crate::upload`]). Written durably before any
//!   segment is deleted.
//! - `highwater`: `{"assigned_seq": N}` — every seq ever made *visible* is `<= N`. Written
//!   durably after a batch's frames are fsync'd and before the batch counts as appended (and
//!   on open, when intact records above it are found), so `seq` never goes backwards, even
//!   when every segment is gone or the newest records are damaged.
//! - `quarantine/<segment stem>-<offset>.bad`: damaged bytes cut out of a segment (below).
//!
//! **Sequence numbers** start at 1, increase strictly and are never reused once *visible*: a
//! record is visible (to [`Spool::read_from`], hence to the uploader, and to the producer as
//! "appended") only after the fsync of its batch and of the highwater succeeded. Numbering
//! never goes below `highwater` (nor the cursor, nor any record on disk). Group commit:
//! [`Spool::append_batch`] writes a whole batch with one `write` and one `fdatasync`, then
//! the highwater.
//!
//! **Damage.** On open, and whenever a segment is read, its frames are checked: length within
//! bounds, CRC32C, a payload that parses, a seq above the previous record's. At a frame that
//! fails, the reader *resynchronises*: it scans forward byte by byte for the next position
//! where a whole frame passes all four checks and reads on from there, so a damaged record
//! costs that record only, never the ones after it. The damaged bytes are copied to
//! `quarantine/` (fsync'd) before the segment is rewritten without them, and reported: an
//! error log line, [`SpoolStats`] (`/metrics`, `kycctl status`) and [`Spool::take_damage`]
//! (the daemon records each in the audit log). Kinds:
//! - `torn_tail`: invalid bytes at the end of the newest segment, found on open, after a
//!   record at or above `highwater`: a batch write that a crash interrupted. It was never
//!   visible (its highwater was not written), so nobody outside this process ever saw its
//!   seqs and the next append numbers from `highwater + 1`, reusing them. Skipping them
//!   would leave a gap that the collector's contiguous `acked_seq` could never pass.
//! - `corrupt`: everything else (damage between intact frames, in a sealed segment, found
//!   while running, or costing a record at or below `highwater`). Its seqs were visible and
//!   are never handed out again.
//!
//! If the quarantine cannot be written (a full disk), the damaged bytes stay where they are:
//! the segment is read around them and is never appended to, merged or deleted until a later
//! read manages to quarantine them. A batch whose write or fsync fails at run time is undone
//! (the segment truncated back) and its numbers are not consumed: they were never visible
//! (if even the truncation fails, appends keep failing until it succeeds).
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
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
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
/// Where damaged bytes are kept, under the spool directory.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Mode of every file in the spool (segments, cursor, highwater, quarantine).
const FILE_MODE: u32 = 0o600;
/// Mode of the spool directory and `quarantine/`.
const DIR_MODE: u32 = 0o700;
/// Most damage reports kept for [`Spool::take_damage`]; beyond it they are counted only.
const MAX_PENDING_DAMAGE: usize = 1024;

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

/// Counters, for logs, `/metrics` and `kycctl status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpoolStats {
    /// Windows appended (durably).
    pub appended: u64,
    /// Merge passes run because the spool neared its cap.
    pub merges: u64,
    /// Records folded away by merging (records in − records out).
    pub merged_away: u64,
    /// Torn tails (kind `torn_tail`) quarantined and truncated.
    pub torn_tails: u64,
    /// Bytes of those torn tails.
    pub truncated_bytes: u64,
    /// Damaged regions (kind `corrupt`) quarantined and cut out.
    pub damaged_regions: u64,
    /// Bytes of those regions.
    pub damaged_bytes: u64,
    /// Attempts to quarantine damaged bytes that failed (the bytes stay in their segment).
    pub quarantine_failures: u64,
    /// When damage of either kind was last found (Unix seconds; 0: never).
    pub last_damage_at: i64,
    /// Failed appends.
    pub append_failures: u64,
}

/// What kind of damage a [`SpoolDamage`] is; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DamageKind {
    /// Damaged bytes that cost visible records.
    Corrupt,
    /// The end of a write a crash interrupted (never visible).
    TornTail,
}

impl DamageKind {
    /// The label in logs, metrics and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            DamageKind::Corrupt => "corrupt",
            DamageKind::TornTail => "torn_tail",
        }
    }
}

/// Damaged bytes found in a segment, quarantined and cut out of it (for the audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpoolDamage {
    /// `corrupt` or `torn_tail`.
    pub kind: DamageKind,
    /// The segment they were in.
    pub segment: PathBuf,
    /// Their offset in the segment as it was found.
    pub offset: u64,
    /// Their length.
    pub len: u64,
    /// The seq of the last intact record before them, in this segment or an earlier one (0:
    /// none).
    pub seq_before: u64,
    /// The seq of the first intact record after them (absent: none in the segment).
    pub seq_after: Option<u64>,
    /// The quarantine file holding a copy of them.
    pub quarantined: PathBuf,
    /// When they were found (Unix seconds).
    pub found_at: i64,
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
    /// Durable length (bytes of whole, fsync'd frames; the whole file while `unrepaired`).
    len: u64,
    /// Highest seq covered by a record in it (`max(seq, last_seq)`), 0 when empty.
    covered: u64,
    records: usize,
    /// It holds damaged bytes that could not be quarantined yet: read around them, never
    /// appended to, merged or deleted.
    unrepaired: bool,
    /// Set for the newest segment found on open, until repaired: invalid bytes at its end,
    /// after a record with a seq `>=` this (the highwater on disk), are a torn tail.
    torn_tail_after: Option<u64>,
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

/// A run of bytes that are not valid frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadRun {
    start: usize,
    end: usize,
    /// The seq of the last intact record before it (0: none).
    seq_before: u64,
    /// The seq of the first intact record after it (None: it runs to the end).
    seq_after: Option<u64>,
}

/// What [`decode_frames`] found.
#[derive(Debug, Default)]
struct Decoded {
    records: Vec<UsageRecord>,
    /// In offset order; only the last can have `seq_after: None`.
    bad: Vec<BadRun>,
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
fn decode_frames(bytes: &[u8]) -> Decoded {
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

/// Narrows what an older version left wider than 0700 (directories) / 0600 (files) in the
/// spool directory. Best effort: a failure is logged, not fatal.
fn restrict_modes(dir: &Path) {
    let restrict = |path: &Path| {
        let Ok(meta) = std::fs::symlink_metadata(path) else { return };
        let want = if meta.is_dir() {
            DIR_MODE
        } else if meta.is_file() {
            FILE_MODE
        } else {
            return;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & !want != 0 {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & want)) {
                Ok(()) => {
                    info!(path = %path.display(), from = format!("{mode:04o}"), to = format!("{:04o}", mode & want),
                                "narrowed the mode of a spool file")
                }
                Err(e) => warn!(path = %path.display(), error = %e, "cannot narrow the mode of a spool file"),
            }
        }
    };
    restrict(dir);
    for sub in [dir.to_owned(), dir.join(QUARANTINE_DIR)] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for entry in entries.flatten() {
                restrict(&entry.path());
            }
        }
    }
}

/// Copies `bytes` (damaged, from `segment` at `offset`) to a new file in `qdir` named by the
/// segment and the offset, mode 0600, fsync'd. A file of that name with the same content
/// (an earlier attempt that crashed before the segment was rewritten) is reused.
fn quarantine(qdir: &Path, segment: &Path, offset: usize, bytes: &[u8]) -> Result<PathBuf, SpoolError> {
    let stem = segment.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    for n in 0..1000u32 {
        let name = if n == 0 { format!("{stem}-{offset}.bad") } else { format!("{stem}-{offset}.{n}.bad") };
        let path = qdir.join(name);
        match OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&path) {
            Ok(mut file) => {
                return match file.write_all(bytes).and_then(|()| file.sync_all()) {
                    Ok(()) => Ok(path),
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        Err(io_err(&path)(e))
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
                    return Ok(path);
                }
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Err(SpoolError::Corrupt { path: qdir.to_owned(), reason: format!("no free name for {stem}-{offset}") })
}

/// The spool; see the module docs. Not thread-safe by itself: share it as [`SharedSpool`].
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    options: SpoolOptions,
    segments: Vec<Segment>,
    /// The last segment, open for appending (None: the next batch reopens it or starts a new one).
    active: Option<File>,
    /// Next seq to assign.
    next_seq: u64,
    cursor: u64,
    /// The durable highwater: every visible seq is `<=` it.
    highwater: u64,
    /// A failed write left bytes past the active segment's durable length.
    tail_dirty: bool,
    stats: SpoolStats,
    /// Damage found and not yet taken by [`Spool::take_damage`].
    damage: Vec<SpoolDamage>,
}

/// A spool shared by the writer task and the uploader (blocking I/O under the lock: call it
/// from `spawn_blocking`).
pub type SharedSpool = Arc<Mutex<Spool>>;

impl Spool {
    /// Opens (creating) the spool in `dir` and recovers it: damage quarantined and cut out,
    /// torn tails truncated, duplicates of an interrupted merge removed, the next seq above
    /// everything ever visible.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        crate::fsutil::create_dir_durably(dir).map_err(io_err(dir))?;
        restrict_modes(dir);
        let cursor = read_json::<CursorFile>(&dir.join(CURSOR_FILE))?.map_or(0, |c| c.acked_seq);
        let highwater = read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE))?.map_or(0, |h| h.assigned_seq);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(crate::fsutil::TEMP_PREFIX) {
                // A durable write (highwater, cursor, merged segment) a crash interrupted
                // before its rename: never referenced.
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        info!(path = %path.display(), "removed an interrupted write's temp file from the spool")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot remove a temp file from the spool")
                    }
                }
                continue;
            }
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
        let mut spool = Spool {
            dir: dir.to_owned(),
            options,
            segments: Vec::new(),
            active: None,
            next_seq: 0,
            cursor,
            highwater,
            tail_dirty: false,
            stats: SpoolStats::default(),
            damage: Vec::new(),
        };
        let newest = names.len();
        let mut covered_so_far = 0u64;
        for (i, (name_seq, path)) in names.into_iter().enumerate() {
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let mut seg = Segment {
                name_seq,
                path,
                len: bytes.len() as u64,
                covered: 0,
                records: 0,
                unrepaired: false,
                torn_tail_after: (i + 1 == newest).then_some(highwater),
            };
            let decoded = decode_frames(&bytes);
            if !decoded.bad.is_empty() {
                spool.cut_out(&mut seg, &bytes, &decoded, covered_so_far);
            }
            let records = decoded.records;
            let fresh = records.iter().filter(|r| r.seq > covered_so_far).count();
            if fresh < records.len() {
                // Left over from a merge interrupted before it deleted the merged segments.
                if fresh == 0 {
                    info!(path = %seg.path.display(), "removing a spool segment already merged into an earlier one");
                    std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
                    continue;
                }
                return Err(SpoolError::Corrupt {
                    path: seg.path,
                    reason: format!("records overlap seqs up to {covered_so_far} of an earlier segment"),
                });
            }
            seg.covered = records.iter().map(covered).max().unwrap_or(0);
            seg.records = records.len();
            covered_so_far = covered_so_far.max(seg.covered);
            spool.segments.push(seg);
        }
        sync_dir(dir)?;
        if covered_so_far > highwater {
            // Intact records above the mark: written before a crash that came before their
            // highwater (or by a version that wrote it later). Make them durable, then cover
            // them, before anything can see them.
            for seg in spool.segments.iter().filter(|s| s.covered > highwater) {
                File::open(&seg.path).and_then(|f| f.sync_all()).map_err(io_err(&seg.path))?;
            }
            spool.persist_highwater(covered_so_far)?;
        }
        spool.next_seq = covered_so_far.max(spool.highwater).max(cursor).saturating_add(1);
        spool.delete_acked()?;
        info!(dir = %dir.display(), next_seq = spool.next_seq, acked_seq = cursor, segments = spool.segments.len(),
              bytes = spool.used_bytes(), "spool opened");
        Ok(spool)
    }

    /// Quarantines the damaged bytes of `seg` (whose content is `bytes`, decoded as
    /// `decoded`; `floor`: the highest seq in earlier segments), then cuts them out of the
    /// file and reports them. When the quarantine cannot be written, the segment is left as
    /// it is and marked unrepaired.
    fn cut_out(&mut self, seg: &mut Segment, bytes: &[u8], decoded: &Decoded, floor: u64) {
        match self.try_cut_out(seg, bytes, decoded, floor) {
            Ok(found) => {
                seg.len = (bytes.len() - decoded.bad.iter().map(|b| b.end - b.start).sum::<usize>()) as u64;
                seg.unrepaired = false;
                seg.torn_tail_after = None;
                for d in found {
                    self.report(d);
                }
            }
            Err(e) => {
                self.stats.quarantine_failures += 1;
                seg.unrepaired = true;
                seg.len = bytes.len() as u64;
                let bad: usize = decoded.bad.iter().map(|b| b.end - b.start).sum();
                error!(path = %seg.path.display(), error = %e, damaged_bytes = bad,
                       "spool segment is damaged and the damaged bytes cannot be quarantined: left in place, read around them, retried later");
            }
        }
    }

    fn try_cut_out(
        &self,
        seg: &Segment,
        bytes: &[u8],
        decoded: &Decoded,
        floor: u64,
    ) -> Result<Vec<SpoolDamage>, SpoolError> {
        let qdir = self.dir.join(QUARANTINE_DIR);
        crate::fsutil::create_dir_durably(&qdir).map_err(io_err(&qdir))?;
        let now = crate::tokens::unix_now();
        let mut found = Vec::with_capacity(decoded.bad.len());
        for run in &decoded.bad {
            // The last intact seq before the run, in this segment or an earlier one.
            let before = run.seq_before.max(floor);
            let torn = run.seq_after.is_none() && seg.torn_tail_after.is_some_and(|hw| before >= hw);
            let quarantined = quarantine(&qdir, &seg.path, run.start, &bytes[run.start..run.end])?;
            found.push(SpoolDamage {
                kind: if torn { DamageKind::TornTail } else { DamageKind::Corrupt },
                segment: seg.path.clone(),
                offset: run.start as u64,
                len: (run.end - run.start) as u64,
                seq_before: before,
                seq_after: run.seq_after,
                quarantined,
                found_at: now,
            });
        }
        sync_dir(&qdir)?;
        match decoded.bad.as_slice() {
            [only] if only.seq_after.is_none() => {
                // Only a bad tail: truncate.
                let file = OpenOptions::new().write(true).open(&seg.path).map_err(io_err(&seg.path))?;
                file.set_len(only.start as u64).and_then(|()| file.sync_all()).map_err(io_err(&seg.path))?;
            }
            runs => {
                let mut clean = Vec::with_capacity(bytes.len());
                let mut from = 0;
                for run in runs {
                    clean.extend_from_slice(&bytes[from..run.start]);
                    from = run.end;
                }
                clean.extend_from_slice(&bytes[from..]);
                crate::fsutil::write_atomic(&seg.path, &clean).map_err(io_err(&seg.path))?;
            }
        }
        Ok(found)
    }

    /// Logs, counts and queues one damage report.
    fn report(&mut self, d: SpoolDamage) {
        let (segment, quarantined) = (d.segment.display(), d.quarantined.display());
        match d.kind {
            DamageKind::Corrupt => {
                self.stats.damaged_regions += 1;
                self.stats.damaged_bytes += d.len;
                error!(%segment, offset = d.offset, bytes = d.len, seq_before = d.seq_before, seq_after = ?d.seq_after,
                       %quarantined, "spool segment damaged: the damaged bytes were quarantined and cut out; the records after them are kept");
            }
            DamageKind::TornTail => {
                self.stats.torn_tails += 1;
                self.stats.truncated_bytes += d.len;
                warn!(%segment, offset = d.offset, bytes = d.len, last_seq = d.seq_before, %quarantined,
                      "spool segment has a torn tail (a write a crash interrupted; never acknowledged): quarantined and truncated");
            }
        }
        self.stats.last_damage_at = d.found_at;
        if self.damage.len() < MAX_PENDING_DAMAGE {
            self.damage.push(d);
        } else {
            warn!("too many spool damage reports pending: this one is counted and logged only");
        }
    }

    /// Damage found since the last call (on open and on reads), oldest first: for the audit
    /// log.
    pub fn take_damage(&mut self) -> Vec<SpoolDamage> {
        std::mem::take(&mut self.damage)
    }

    /// Writes the highwater durably when `seq` is above it.
    fn persist_highwater(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.highwater {
            return Ok(());
        }
        write_json(&self.dir.join(HIGHWATER_FILE), &HighwaterFile { assigned_seq: seq })?;
        self.highwater = seq;
        Ok(())
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

    /// The durable highwater: no seq at or below it is ever assigned again.
    pub fn highwater(&self) -> u64 {
        self.highwater
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

    /// Appends `windows` with one write and one fsync (then the highwater), returning the
    /// first and last seq assigned. On error nothing was appended and no seq was consumed;
    /// the caller keeps the windows and retries.
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
        let last = first + windows.len() as u64 - 1;
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
        let rotate =
            self.segments.last().is_none_or(|s| s.len >= self.options.segment_max_bytes || s.unrepaired);
        if self.active.is_none() || rotate {
            self.open_segment(first, rotate)?;
        }
        let Some((path, len)) = self.segments.last().map(|s| (s.path.clone(), s.len)) else {
            return Err(SpoolError::TailPending { path: self.dir.clone() });
        };
        let Some(file) = self.active.as_mut() else {
            return Err(SpoolError::TailPending { path });
        };
        let mut written = file.write_all(&buf).and_then(|()| file.sync_data()).map_err(io_err(&path));
        if written.is_ok() {
            // Durable frames first, then the mark that makes them visible for good.
            written = self.persist_highwater(last);
        }
        if let Err(e) = written {
            self.undo_write(len);
            return Err(e);
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.len += incoming;
            seg.covered = last;
            seg.records += windows.len();
        }
        self.next_seq = last + 1;
        self.stats.appended += windows.len() as u64;
        Ok((first, last))
    }

    /// Truncates the active segment back to `len` after a failed batch.
    fn undo_write(&mut self, len: u64) {
        let undone = match self.active.as_mut() {
            Some(file) => file
                .set_len(len)
                .and_then(|()| file.seek(SeekFrom::Start(len)))
                .and_then(|_| file.sync_data())
                .is_ok(),
            None => false,
        };
        if !undone {
            self.tail_dirty = true;
        }
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
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            name_seq: first,
            path,
            len: 0,
            covered: 0,
            records: 0,
            unrepaired: false,
            torn_tail_after: None,
        });
        self.active = Some(file);
        Ok(())
    }

    /// The records of segment `i`, read around any damage; damage found is quarantined, cut
    /// out and reported (or, when that fails, the segment is marked unrepaired).
    fn load_segment(&mut self, i: usize) -> Result<Vec<UsageRecord>, SpoolError> {
        let Some(seg) = self.segments.get(i) else { return Ok(Vec::new()) };
        let mut bytes = Vec::with_capacity(usize::try_from(seg.len).unwrap_or(0));
        File::open(&seg.path)
            .and_then(|f| f.take(seg.len).read_to_end(&mut bytes))
            .map_err(io_err(&seg.path))?;
        let decoded = decode_frames(&bytes);
        if decoded.bad.is_empty() {
            return Ok(decoded.records);
        }
        let last = i + 1 == self.segments.len();
        let floor = self.segments[..i].iter().map(|s| s.covered).max().unwrap_or(0);
        let mut seg = self.segments.remove(i);
        self.cut_out(&mut seg, &bytes, &decoded, floor);
        if !seg.unrepaired {
            seg.records = decoded.records.len();
            seg.covered = decoded.records.iter().map(covered).max().unwrap_or(0);
            if last {
                // Rewritten or truncated under the append handle: reopen before appending.
                self.active = None;
                self.tail_dirty = false;
            }
        }
        self.segments.insert(i, seg);
        Ok(decoded.records)
    }

    /// Up to `max` records with a seq `>= from` (or covering it), in seq order. Damage found
    /// on the way is handled as on open (see the module docs).
    pub fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<UsageRecord>, SpoolError> {
        let mut out = Vec::new();
        for i in 0..self.segments.len() {
            if out.len() >= max {
                break;
            }
            let seg = &self.segments[i];
            if seg.records == 0 || seg.covered < from {
                continue;
            }
            let records = self.load_segment(i)?;
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
        let mut deletable: Vec<usize> = (0..count)
            .filter(|&i| {
                let s = &self.segments[i];
                if s.records == 0 {
                    i + 1 < count || self.active.is_none()
                } else {
                    s.covered <= self.cursor
                }
            })
            .collect();
        // Damaged bytes are deleted only once they are in quarantine.
        for &i in &deletable {
            if self.segments[i].unrepaired {
                let _ = self.load_segment(i);
            }
        }
        deletable.retain(|&i| !self.segments[i].unrepaired);
        if deletable.is_empty() {
            return Ok(());
        }
        // The highwater first: with the segments gone it is what keeps seq from going back.
        self.persist_highwater(self.last_seq())?;
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
        for i in 0..take {
            let loaded = self.load_segment(i)?;
            if self.segments[i].unrepaired {
                // Its damaged bytes are not in quarantine yet: do not rewrite or delete it.
                return Ok(false);
            }
            records.extend(loaded.into_iter().filter(|r| covered(r) > self.cursor));
        }
        // Loading may have cut damage out.
        let bytes: u64 = self.segments[..take].iter().map(|s| s.len).sum();
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
    /// Bytes past the last intact frame (what opening the spool would quarantine and
    /// truncate).
    pub torn_bytes: u64,
    /// Bytes between intact frames that are not valid frames (what opening the spool would
    /// quarantine and cut out; the records after them are kept).
    pub damaged_bytes: u64,
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
    /// Files in `quarantine/` (damaged bytes cut out of segments), by name.
    pub quarantine: Vec<String>,
}

/// Reads the spool in `dir` without recovering or changing it (`kycctl spool`).
pub fn inspect(dir: &Path) -> Result<Inspection, SpoolError> {
    let acked_seq = read_json::<CursorFile>(&dir.join(CURSOR_FILE))?.map_or(0, |c| c.acked_seq);
    let highwater_seq = read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE))?.map_or(0, |h| h.assigned_seq);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Inspection { acked_seq, highwater_seq, segments: Vec::new(), quarantine: Vec::new() })
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
        let decoded = decode_frames(&bytes);
        let run_len = |b: &BadRun| (b.end - b.start) as u64;
        segments.push(SegmentInspection {
            file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            bytes: bytes.len() as u64,
            torn_bytes: decoded.bad.iter().filter(|b| b.seq_after.is_none()).map(run_len).sum(),
            damaged_bytes: decoded.bad.iter().filter(|b| b.seq_after.is_some()).map(run_len).sum(),
            records: decoded.records.iter().map(|r| [r.seq, covered(r)]).collect(),
        });
    }
    let mut quarantine: Vec<String> = std::fs::read_dir(dir.join(QUARANTINE_DIR))
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    quarantine.sort();
    Ok(Inspection { acked_seq, highwater_seq, segments, quarantine })
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
pub(crate) mod tests {
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
        assert_eq!(inspection.segments[0].damaged_bytes, 0);
        assert!(inspection.quarantine.is_empty());
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
        // A durable write a crash interrupted before its rename leaves a temp file: removed.
        let temp = dir.path().join(format!("{}abc123", crate::fsutil::TEMP_PREFIX));
        std::fs::write(&temp, b"{\"assigned_seq\":").unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert!(!temp.exists());
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

    /// Frame boundaries `(start, end)` of an intact segment.
    fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + HEADER <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            out.push((at, at + HEADER + len));
            at += HEADER + len;
        }
        out
    }

    fn quarantine_files(spool_dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(spool_dir.join(QUARANTINE_DIR)) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn highwater_on_disk(dir: &Path) -> Option<u64> {
        read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE)).unwrap().map(|h| h.assigned_seq)
    }

    #[test]
    fn highwater_is_durable_when_an_append_returns() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(highwater_on_disk(dir.path()), None);
        let batch = [window("t", "w", 0), window("t", "w", 60), window("t", "w", 120)];
        assert_eq!(spool.append_batch(&batch).unwrap(), (1, 3));
        assert_eq!(highwater_on_disk(dir.path()), Some(3), "written before the batch counts as appended");
        assert_eq!(spool.append(window("t", "w", 180)).unwrap(), 4);
        assert_eq!(highwater_on_disk(dir.path()), Some(4));
        assert_eq!(spool.highwater(), 4);
    }

    /// Formerly `torn_tail_is_truncated_and_its_invisible_seq_reused`. Cutting an appended
    /// record short is damage to a *visible* record (its append returned, the uploader may
    /// have sent it): the highwater covers it, so its seq is never handed out again. Only a
    /// write above the highwater is a torn tail whose seqs come back (next test).
    #[test]
    fn a_damaged_last_record_is_quarantined_and_its_seq_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool =
            Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
        for i in 0..5 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        let seg = last_segment(dir.path());
        let bytes = std::fs::read(&seg).unwrap();
        let (start, end) = *frames(&bytes).last().unwrap();
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(end as u64 - 20).unwrap();
        drop(file);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        let stats = spool.stats();
        assert_eq!((stats.damaged_regions, stats.damaged_bytes), (1, (end - start - 20) as u64));
        assert_eq!(stats.torn_tails, 0, "seq 5 was visible: not a torn write");
        let damage = spool.take_damage();
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].kind, DamageKind::Corrupt);
        assert_eq!((damage[0].offset, damage[0].seq_before, damage[0].seq_after), (start as u64, 4, None));
        assert_eq!(std::fs::read(&damage[0].quarantined).unwrap(), &bytes[start..end - 20]);
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4]);
        assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 6, "seq 5 was visible: never reused");
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4, 6]);
        assert!(spool.take_damage().is_empty(), "reported once");
    }

    #[test]
    fn a_torn_write_above_the_highwater_is_truncated_and_its_seq_handed_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool =
            Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
        for i in 0..5 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        assert_eq!(highwater_on_disk(dir.path()), Some(5));
        // A crash while writing the batch 6..=7, before its highwater: frame 6 whole, 7 cut.
        let mut frames67 = Vec::new();
        for seq in [6, 7] {
            let record = UsageRecord { seq, last_seq: None, window: window("t", "w", 0) };
            encode_frame(&record, &mut frames67).unwrap();
        }
        let cut = frames67.len() - 30;
        let seg = last_segment(dir.path());
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&frames67[..cut]).unwrap();
        drop(f);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4, 5, 6], "the whole frame is kept");
        assert_eq!(highwater_on_disk(dir.path()), Some(6), "and covered before anyone sees it");
        let damage = spool.take_damage();
        assert_eq!(damage.len(), 1);
        assert_eq!((damage[0].kind, damage[0].seq_before), (DamageKind::TornTail, 6));
        let frame7 = frames(&frames67[..]).first().map(|&(_, end)| end).unwrap();
        assert_eq!(std::fs::read(&damage[0].quarantined).unwrap(), &frames67[frame7..cut]);
        assert_eq!((spool.stats().torn_tails, spool.stats().truncated_bytes), (1, (cut - frame7) as u64));
        assert_eq!(spool.stats().damaged_regions, 0);
        assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 7, "seq 7 was never visible");
        assert_eq!(spool.read_from(7, 1).unwrap()[0].window.start, 999);
        // A header cut short is a torn tail too.
        drop(spool);
        let seg = last_segment(dir.path());
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[7, 0, 0]).unwrap();
        drop(f);
        let spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(spool.stats().truncated_bytes, 3);
        assert_eq!(spool.next_seq(), 8);
        assert_eq!(quarantine_files(dir.path()).len(), 2);
    }

    #[test]
    fn a_torn_first_write_of_a_new_segment_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        for i in 0..3 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        // The crash came while the first batch of a new segment was being written.
        let mut frame = Vec::new();
        encode_frame(&UsageRecord { seq: 4, last_seq: None, window: window("t", "w", 0) }, &mut frame)
            .unwrap();
        let seg = dir.path().join(format!("{:020}.{SEGMENT_EXT}", 4));
        std::fs::write(&seg, &frame[..frame.len() / 2]).unwrap();
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        let damage = spool.take_damage();
        assert_eq!(damage.len(), 1);
        assert_eq!((damage[0].kind, damage[0].seq_before), (DamageKind::TornTail, 3));
        assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 4, "seq 4 was never visible");
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4]);
    }

    /// Formerly `crc_corruption_ends_the_segment`, which truncated records 3 *and 4* and
    /// numbered the next append 3 again.
    #[test]
    fn a_damaged_record_costs_only_itself_and_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool =
            Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
        for i in 0..4 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        let seg = last_segment(dir.path());
        let mut bytes = std::fs::read(&seg).unwrap();
        let (start, end) = frames(&bytes)[2];
        // Flip a byte inside record 3's payload.
        bytes[start + HEADER + 3] ^= 0x20;
        std::fs::write(&seg, &bytes).unwrap();
        let inspection = inspect(dir.path()).unwrap();
        assert_eq!(inspection.segments[0].damaged_bytes, (end - start) as u64);
        assert_eq!(inspection.segments[0].records, vec![[1, 1], [2, 2], [4, 4]]);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 4]);
        let mut expected = bytes[..start].to_vec();
        expected.extend_from_slice(&bytes[end..]);
        assert_eq!(std::fs::read(&seg).unwrap(), expected, "cut out of the segment");
        let damage = spool.take_damage();
        assert_eq!(damage.len(), 1);
        let d = &damage[0];
        assert_eq!(d.kind, DamageKind::Corrupt);
        assert_eq!((d.segment.clone(), d.offset, d.len), (seg.clone(), start as u64, (end - start) as u64));
        assert_eq!((d.seq_before, d.seq_after), (2, Some(4)));
        let stem = seg.file_stem().unwrap().to_string_lossy().into_owned();
        assert_eq!(d.quarantined, dir.path().join(QUARANTINE_DIR).join(format!("{stem}-{start}.bad")));
        assert_eq!(std::fs::read(&d.quarantined).unwrap(), &bytes[start..end], "nothing destroyed");
        assert_eq!(mode(&d.quarantined), 0o600);
        assert_eq!((spool.stats().damaged_regions, spool.stats().damaged_bytes), (1, (end - start) as u64));
        assert!(spool.stats().last_damage_at > 0);
        assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 5, "seq 3 is never reused");
        drop(spool);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert!(spool.take_damage().is_empty(), "repaired for good");
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 4, 5]);
        assert_eq!(inspect(dir.path()).unwrap().quarantine, vec![format!("{stem}-{start}.bad")]);
    }

    #[test]
    fn damage_found_while_running_is_cut_out_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool =
            Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
        for i in 0..10 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        let seg = last_segment(dir.path());
        let bytes = std::fs::read(&seg).unwrap();
        let (start, end) = frames(&bytes)[4];
        // Bit rot in record 5's CRC while the spool is open.
        let mut f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.seek(SeekFrom::Start(start as u64 + 5)).unwrap();
        f.write_all(&[bytes[start + 5] ^ 0xff]).unwrap();
        drop(f);
        assert_eq!(seqs(&spool.read_from(1, 100).unwrap()), vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
        let damage = spool.take_damage();
        assert_eq!(damage.len(), 1);
        assert_eq!(
            (damage[0].kind, damage[0].seq_before, damage[0].seq_after),
            (DamageKind::Corrupt, 4, Some(6))
        );
        assert_eq!(damage[0].len, (end - start) as u64);
        // Appending goes on after the rewrite, in the same segment.
        assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 11);
        assert_eq!(spool.segment_count(), 1);
        let all = seqs(&spool.read_from(1, 100).unwrap());
        assert_eq!(all, vec![1, 2, 3, 4, 6, 7, 8, 9, 10, 11]);
        drop(spool);
        let mut spool = Spool::open(dir.path(), opts()).unwrap();
        assert_eq!(seqs(&spool.read_from(1, 100).unwrap()), all);
        assert!(spool.take_damage().is_empty());
    }

    #[test]
    fn damage_that_cannot_be_quarantined_stays_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { segment_max_bytes: 1 << 20, ..opts() };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        for i in 0..6 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        drop(spool);
        let seg = last_segment(dir.path());
        let mut bytes = std::fs::read(&seg).unwrap();
        let (start, _) = frames(&bytes)[2];
        bytes[start + HEADER + 1] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        // A file where the quarantine directory should be: the quarantine cannot be written.
        let blocker = dir.path().join(QUARANTINE_DIR);
        std::fs::write(&blocker, b"in the way").unwrap();
        let mut spool = Spool::open(dir.path(), options).unwrap();
        assert_eq!(spool.stats().quarantine_failures, 1);
        assert!(spool.take_damage().is_empty(), "not cut out, so not reported as handled");
        assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 4, 5, 6], "read around the damage");
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "the damaged bytes stay where they are");
        assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 7);
        assert_eq!(spool.segment_count(), 2, "never appended to: a new segment");
        spool.ack(7).unwrap();
        assert!(seg.exists(), "never deleted before its damage is in quarantine");
        std::fs::remove_file(&blocker).unwrap();
        spool.append(window("t", "w", 60)).unwrap();
        spool.ack(8).unwrap();
        assert!(!seg.exists(), "deleted once quarantined");
        let damage = spool.take_damage();
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].seq_before, 2);
        assert_eq!(quarantine_files(dir.path()), vec![damage[0].quarantined.clone()]);
    }

    /// Every file the spool writes is 0600 and every directory 0700, set at creation (not
    /// left to the umask: the test process's 022 would give 0644/0755), and an older spool's
    /// wider modes are narrowed on open.
    #[test]
    fn spool_files_are_0600_and_directories_0700() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("state/spool");
        let mut spool = Spool::open(&dir, opts()).unwrap();
        for i in 0..20 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        assert!(spool.segment_count() > 2);
        spool.ack(3).unwrap();
        drop(spool);
        let seg = last_segment(&dir);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[HEADER + 2] ^= 4;
        std::fs::write(&seg, &bytes).unwrap();
        std::fs::set_permissions(&seg, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut spool = Spool::open(&dir, opts()).unwrap();
        assert_eq!(spool.take_damage().len(), 1);
        spool.append(window("t", "w", 0)).unwrap();
        let mut checked = 0;
        let mut stack = vec![state.path().join("state")];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            } else {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
            checked += 1;
        }
        assert!(checked > 6, "state, spool, quarantine, segments, cursor, highwater: {checked}");
    }

    /// One spool of 1,000 records in several segments, built once; each case copies it,
    /// XORs bytes at random positions, reopens it and checks that the damage cost exactly the
    /// damaged records, that their bytes are in quarantine, and that later appends number
    /// above every seq ever assigned.
    struct Template {
        dir: tempfile::TempDir,
        records: Vec<UsageRecord>,
        segments: Vec<TemplateSegment>,
    }

    struct TemplateSegment {
        name: String,
        bytes: Vec<u8>,
        /// Frame boundaries.
        frames: Vec<(usize, usize)>,
    }

    fn template() -> Template {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { segment_max_bytes: 64 << 10, max_bytes: 1 << 30 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        for batch in 0..40i64 {
            let windows: Vec<UsageWindow> =
                (0..25).map(|i| window(&format!("t{}", i % 7), "cgroup:/w", (batch * 25 + i) * 60)).collect();
            spool.append_batch(&windows).unwrap();
        }
        let records = spool.read_from(1, 2000).unwrap();
        assert_eq!(seqs(&records), (1..=1000).collect::<Vec<_>>());
        let segments: Vec<_> = spool
            .segment_paths()
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).unwrap();
                let f = frames(&bytes);
                TemplateSegment {
                    name: p.file_name().unwrap().to_string_lossy().into_owned(),
                    bytes,
                    frames: f,
                }
            })
            .collect();
        assert!(segments.len() >= 4, "several segments: {}", segments.len());
        assert_eq!(segments.iter().map(|s| s.frames.len()).sum::<usize>(), 1000);
        Template { dir, records, segments }
    }

    fn check_damage(t: &Template, hits: &[(usize, u8)]) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prop_assert;
        use proptest::prop_assert_eq;
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(t.dir.path().join(HIGHWATER_FILE), dir.join(HIGHWATER_FILE)).unwrap();
        // Corrupt: a position counts over all segments' bytes together.
        let mut files: Vec<Vec<u8>> = t.segments.iter().map(|s| s.bytes.clone()).collect();
        let mut damaged_frames = std::collections::BTreeSet::new(); // (segment, frame index)
        for &(pos, mask) in hits {
            let mut at = pos;
            let mut s = 0;
            while at >= files[s].len() {
                at -= files[s].len();
                s += 1;
            }
            files[s][at] ^= mask;
            let f = t.segments[s].frames.iter().position(|&(a, b)| a <= at && at < b).unwrap();
            damaged_frames.insert((s, f));
        }
        for (seg, bytes) in t.segments.iter().zip(&files) {
            std::fs::write(dir.join(&seg.name), bytes).unwrap();
        }
        let options = SpoolOptions { segment_max_bytes: 64 << 10, max_bytes: 1 << 30 };
        let mut spool = Spool::open(&dir, options).unwrap();
        let got = spool.read_from(1, 5000).unwrap();
        // The records that survive are exactly the undamaged ones, unchanged.
        let mut lost = std::collections::BTreeSet::new();
        let mut k = 0;
        for (s, seg) in t.segments.iter().enumerate() {
            for f in 0..seg.frames.len() {
                if damaged_frames.contains(&(s, f)) {
                    lost.insert(t.records[k].seq);
                }
                k += 1;
            }
        }
        let expected: Vec<&UsageRecord> = t.records.iter().filter(|r| !lost.contains(&r.seq)).collect();
        prop_assert_eq!(got.iter().collect::<Vec<_>>(), expected.clone());
        // Reported: exactly the damaged frames' bytes, as corrupt (every seq was visible).
        let damage = spool.take_damage();
        let damaged_len: usize =
            damaged_frames.iter().map(|&(s, f)| t.segments[s].frames[f].1 - t.segments[s].frames[f].0).sum();
        prop_assert_eq!(damage.iter().map(|d| d.len).sum::<u64>(), damaged_len as u64);
        prop_assert!(damage.iter().all(|d| d.kind == DamageKind::Corrupt), "{damage:?}");
        prop_assert_eq!(spool.stats().damaged_bytes, damaged_len as u64);
        // Quarantined: each damaged frame's bytes (as found) are in a quarantine file named
        // after its segment and an offset at or before it.
        let quarantined: Vec<(String, usize, Vec<u8>)> = quarantine_files(&dir)
            .iter()
            .map(|p| {
                assert_eq!(mode(p), 0o600);
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let (stem, rest) = name.split_once('-').unwrap();
                let offset: usize = rest.split('.').next().unwrap().parse().unwrap();
                (stem.to_owned(), offset, std::fs::read(p).unwrap())
            })
            .collect();
        for &(s, f) in &damaged_frames {
            let (a, b) = t.segments[s].frames[f];
            let stem = t.segments[s].name.trim_end_matches(".seg");
            let found = quarantined.iter().any(|(qs, o, bytes)| {
                qs == stem && *o <= a && b <= o + bytes.len() && bytes[a - o..b - o] == files[s][a..b]
            });
            prop_assert!(found, "segment {} frame {}..{} not in quarantine", stem, a, b);
        }
        // No seq is ever reused: appends number above every seq ever assigned.
        let batch = [window("new", "w", 0), window("new", "w", 60), window("new", "w", 120)];
        prop_assert_eq!(spool.append_batch(&batch).unwrap(), (1001, 1003));
        drop(spool);
        let mut spool = Spool::open(&dir, options).unwrap();
        prop_assert!(spool.take_damage().is_empty(), "repaired on the first open");
        let after = spool.read_from(1, 5000).unwrap();
        prop_assert_eq!(&after[..expected.len()], &got[..]);
        prop_assert_eq!(seqs(&after[expected.len()..]), vec![1001, 1002, 1003]);
        prop_assert_eq!(spool.append(window("new", "w", 180)).unwrap(), 1004);
        Ok(())
    }

    #[test]
    fn property_damage_costs_only_the_damaged_records_and_no_seq_is_reused() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let t = template();
        let total: usize = t.segments.iter().map(|s| s.bytes.len()).sum();
        let config = |cases| Config { cases, failure_persistence: None, ..Config::default() };
        // One flipped byte anywhere.
        TestRunner::new(config(24))
            .run(&(0..total, 1u8..=255), |(pos, mask)| check_damage(&t, &[(pos, mask)]))
            .unwrap();
        // A few bytes at several positions.
        TestRunner::new(config(12))
            .run(&prop::collection::vec((0..total, 1u8..=255), 2..=6), |hits| check_damage(&t, &hits))
            .unwrap();
        // A burst of consecutive bytes (may span frames and segment boundaries).
        TestRunner::new(config(8))
            .run(&(0..total, prop::collection::vec(1u8..=255, 2..64)), |(pos, masks)| {
                let hits: Vec<(usize, u8)> = masks
                    .iter()
                    .enumerate()
                    .map(|(i, &m)| (pos + i, m))
                    .filter(|&(p, _)| p < total)
                    .collect();
                check_damage(&t, &hits)
            })
            .unwrap();
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
        let mut spool = Spool::open(dir.path(), options).unwrap();
        let after = spool.read_from(1, 100).unwrap();
        assert!(!paths[1].exists(), "leftover removed");
        assert_eq!(after.iter().map(|r| r.window.merged_windows).sum::<u32>(), 20);
        assert!(after.len() < before.len());
        assert_eq!(spool.next_seq(), 21);
    }
}
