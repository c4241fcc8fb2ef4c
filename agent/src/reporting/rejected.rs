//! Batches the collector refused for good (400/409/413): the files they are kept in under
//! `<state_dir>/rejected/`, and what is remembered of each for `kycctl status` and the audit
//! log.

use std::path::{Path, PathBuf};

use kycd_protocol::UsageRecord;

use super::spool::covered;

/// A batch the collector refused for good (400/409/413), kept in `rejected/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// When (Unix seconds).
    pub at: i64,
    /// The HTTP status.
    pub status: u16,
    /// The collector's error kind (`kind` in its answer, e.g. `SeqConflict`), else
    /// `http_<status>`.
    pub kind: String,
    /// The collector's message (`error` in its answer), if any, at most 256 characters.
    pub error: Option<String>,
    /// The batch's first seq.
    pub first_seq: u64,
    /// The last seq it covers.
    pub last_seq: u64,
    /// Records in it.
    pub records: u64,
    /// Where it was saved.
    pub file: PathBuf,
}

impl Rejection {
    /// The kind and message from the collector's answer `{"error", "kind"}` (or a bare
    /// string).
    pub(super) fn describe(status: u16, answer: &serde_json::Value) -> (String, Option<String>) {
        let kind = answer
            .get("kind")
            .and_then(|k| k.as_str())
            .filter(|k| !k.is_empty())
            .map_or_else(|| format!("http_{status}"), |k| k.chars().take(64).collect());
        let error = answer
            .get("error")
            .and_then(|e| e.as_str())
            .or_else(|| answer.as_str())
            .map(|e| e.chars().take(256).collect());
        (kind, error)
    }
}

/// Writes a rejected batch to `<dir>/<first>-<last>.json` durably (0600, in a 0700
/// directory); also says whether the file is new.
pub(super) fn save_rejected(
    dir: &Path,
    host_id: &str,
    rejected_at: i64,
    status: u16,
    answer: &serde_json::Value,
    records: &[UsageRecord],
) -> std::io::Result<(PathBuf, bool)> {
    let first = records.first().map_or(0, |r| r.seq);
    let last = records.iter().map(covered).max().unwrap_or(0);
    crate::fsutil::create_dir_durably(dir)?;
    // The same batch saved again (a retry) replaces its own file; a different batch whose
    // seqs happen to match (a spool wiped and renumbered) gets a file of its own, so the
    // only copy of an earlier rejected batch is never overwritten.
    let wanted = serde_json::to_value(records)?;
    let same_batch = |path: &Path| {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|doc| doc["records"] == wanted)
    };
    let mut path = dir.join(format!("{first}-{last}.json"));
    let mut n = 1u32;
    while path.exists() && !same_batch(&path) {
        if n > 10_000 {
            return Err(std::io::Error::other(format!("too many rejected batches named {first}-{last}")));
        }
        path = dir.join(format!("{first}-{last}.{n}.json"));
        n += 1;
    }
    let new_file = !path.exists();
    let doc = serde_json::json!({
        "host_id": host_id,
        "rejected_at": rejected_at,
        "status": status,
        "reason": answer,
        "records": records,
    });
    crate::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&doc)?)?;
    Ok((path, new_file))
}

/// Batch files (`*.json`) in the rejected directory (0 when there is none).
pub(super) fn count_rejected_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "json")).count() as u64
    })
}
