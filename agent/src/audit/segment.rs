//! The audit directory: segment file names, listing them, their modes, creating one, and
//! reading the end of one (the last complete record, a torn tail).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::record::{line_hash, parse_record};
use super::{corrupt, io_err, AuditError, DIR_MODE, FILE_MODE, MAX_RECORD_BYTES};

const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".log";
const SEQ_DIGITS: usize = 20;

pub(super) fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

/// The first seq named by a segment file name, or `None` if it is not one.
pub(super) fn parse_segment_name(name: &OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A file named like a segment.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) first_seq: u64,
    pub(super) path: PathBuf,
    pub(super) regular: bool,
}

#[derive(Debug)]
pub(super) struct Listing {
    /// In chain order.
    pub(super) segments: Vec<Segment>,
    /// `*.log` files whose names are not segment names.
    pub(super) strays: Vec<PathBuf>,
}

pub(super) fn list_dir(dir: &Path) -> Result<Listing, AuditError> {
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
pub(super) fn tighten_modes(dir: &Path, listing: &Listing) {
    let tighten = |path: &Path, mode: u32| {
        let Ok(meta) = fs::symlink_metadata(path) else { return };
        if let Err(e) = crate::fsutil::narrow_mode(path, &meta, mode) {
            tracing::warn!(path = %path.display(), error = %e, "cannot narrow the audit log's mode");
        }
    };
    tighten(dir, DIR_MODE);
    for segment in listing.segments.iter().filter(|s| s.regular) {
        tighten(&segment.path, FILE_MODE);
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    crate::fsutil::sync_dir(dir).map_err(io_err(dir))
}

/// Creates a new, empty segment and makes its directory entry durable.
pub(super) fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf), AuditError> {
    let path = dir.join(segment_name(first_seq));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(io_err(&path))?;
    Ok((file, path))
}

/// One complete line found at the end of a segment.
#[derive(Debug)]
pub(super) struct TailLine {
    /// Byte offset of its first byte in the file.
    pub(super) offset: u64,
    /// The line without `\n`.
    pub(super) bytes: Vec<u8>,
}

/// The end of a segment, as `open` needs it.
#[derive(Debug)]
pub(super) struct Tail {
    /// File length.
    pub(super) len: u64,
    /// Offset just past the last `\n` (0 if none): where a torn line starts.
    pub(super) complete_end: u64,
    /// The last complete line.
    pub(super) last: Option<TailLine>,
    /// The complete line before it.
    pub(super) before_last: Option<TailLine>,
}

/// Reads the last two complete lines of `file` and where the complete lines end, reading at
/// most three maximal lines' worth of bytes from the end.
pub(super) fn read_tail(mut file: &File, path: &Path) -> Result<Tail, AuditError> {
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
pub(super) fn line_number_at(path: &Path, offset: u64) -> u64 {
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
pub(super) fn last_record_of(segment: &Segment) -> Result<(u64, String), AuditError> {
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
