//! A read-only look at a spool directory (`kycctl spool`), safe while kycd runs.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::frame::{covered, decode_frames, BadRun};
use super::state::{read_json, CursorFile, HighwaterFile};
use super::{io_err, SpoolError, CURSOR_FILE, HIGHWATER_FILE, QUARANTINE_DIR, SEGMENT_EXT};

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
