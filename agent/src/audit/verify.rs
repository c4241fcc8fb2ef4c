//! The verifier behind `kycctl audit verify`: walks every segment and record and reports the
//! first break in the chain, or the last hash to keep off the host.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::record::{line_hash, parse_record};
use super::segment::{list_dir, Segment};
use super::{io_err, AuditError, GENESIS_PREV, MAX_RECORD_BYTES};

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
pub(super) fn verify_chain(dir: &Path) -> Result<(VerifyReport, Option<u64>), AuditError> {
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::record::encode_record;
    use super::super::segment::segment_name;
    use super::super::tests::{
        assert_broken, assert_intact, event, lines, opts, segments, write_lines, write_log,
    };
    use super::super::{AuditLog, AuditOptions, DEFAULT_MAX_FILE_BYTES};
    use super::*;
    use serde_json::json;

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
}
