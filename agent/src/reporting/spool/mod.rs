//! The reporting spool: usage windows waiting for the collector's acknowledgement, on disk.
//!
//! Layout of `<state_dir>/spool/` (directories 0700 and files 0600, set explicitly when they
//! are created, whatever the umask; an older spool's wider modes are narrowed on open):
//! - `<first_seq:020>.seg`: append-only segments, in name order. Each record is framed as
//!   `len: u32 LE | crc32c(payload): u32 LE | payload`, the payload a JSON
//!   [`UsageRecord`]. A segment is sealed when it reaches `segment_max_bytes` (at a batch
//!   boundary); the next batch starts a new one named after its first sequence number.
//! - `cursor`: `{"acked_seq": N}` — every record covering only seqs `<= N` is acknowledged by
//!   the collector (or was rejected by it, see [`crate::reporting::upload`]). Written durably before any
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
//!
//! Files: [`frame`] (the record framing and the resynchronising decoder), `state` (the
//! cursor and highwater files), `recovery` (open, damage, quarantine), `append` (group
//! commit), `merge` (the size cap), [`inspect`] (`kycctl spool`, read-only).

mod append;
pub mod frame;
mod inspect;
mod merge;
mod recovery;
mod state;
#[cfg(test)]
pub(crate) mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kycd_protocol::UsageRecord;
use serde::Serialize;
use tracing::warn;

pub use frame::{covered, encode_frame};
pub use inspect::{inspect, Inspection, SegmentInspection};
pub use merge::merge_records;
use state::{sync_dir, write_json, CursorFile, HighwaterFile};

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
        let errno = source.raw_os_error().map(nix::errno::Errno::from_raw);
        if matches!(errno, Some(nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT))
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

    /// Segment file names, oldest first (tests, diagnostics).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// The first seq of each segment's name (tests, diagnostics).
    pub fn segment_names(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.name_seq).collect()
    }
}
