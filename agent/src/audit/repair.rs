//! `kycctl audit repair`: cuts a broken log back to its last good record so the daemon can
//! start again, keeping what it cuts.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::record::parse_record;
use super::segment::{list_dir, sync_dir};
use super::verify::{verify_chain, verify_dir, VerifyReport};
use super::{io_err, AuditError, FILE_MODE, MAX_RECORD_BYTES};

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
