//! The spool's two small state files, `cursor` and `highwater` (JSON, written atomically),
//! and the directory fsync every durable step ends with.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_err, SpoolError};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CursorFile {
    pub(super) acked_seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HighwaterFile {
    pub(super) assigned_seq: u64,
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, SpoolError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SpoolError::Corrupt { path: path.to_owned(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SpoolError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| SpoolError::Corrupt { path: path.to_owned(), reason: e.to_string() })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(io_err(path))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    crate::fsutil::sync_dir(dir).map_err(io_err(dir))
}
