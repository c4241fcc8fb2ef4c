//! The archive of expired admitted attestations (`<state_dir>/admitted-expired/`): an expired
//! attestation leaves the admitted directory (so intake withdraws it) but is kept, as
//! `<exp>.<name>`, until `attestations.expired_retention_s` after its expiry; the name carries
//! the expiry so pruning needs no parsing of the token. Files that do not follow the naming
//! are left alone.

use std::path::Path;

use crate::fsutil::{create_dir_durably, sync_dir};

/// Seconds between prunes of the archive (a directory listing; the tick runs every few
/// seconds).
pub(super) const PRUNE_INTERVAL_S: i64 = 3600;

/// Moves `path` (an attestation that expired at `exp`) into `archive` as `<exp>.<name>`,
/// durably (both directories fsync'd).
pub(super) fn archive(path: &Path, archive: &Path, exp: i64) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other("no file name"))?;
    create_dir_durably(archive)?;
    let mut archived = std::ffi::OsString::from(format!("{exp}."));
    archived.push(name);
    std::fs::rename(path, archive.join(archived))?;
    sync_dir(archive)?;
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// The expiry an archived file's name carries.
fn archived_exp(name: &str) -> Option<i64> {
    let (exp, rest) = name.split_once('.')?;
    (!rest.is_empty()).then_some(())?;
    exp.parse().ok()
}

/// Deletes the archived attestations whose expiry is `retention_s` or more before `now`;
/// returns how many. A missing archive is empty.
pub(super) fn prune(archive: &Path, now: i64, retention_s: u64) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(archive) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let limit = now.saturating_sub(i64::try_from(retention_s).unwrap_or(i64::MAX));
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let Some(exp) = entry.file_name().to_str().and_then(archived_exp) else { continue };
        if exp <= limit {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(archive)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archived_attestations_are_kept_until_their_retention_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let admitted = dir.path().join("admitted");
        let expired = dir.path().join("admitted-expired");
        std::fs::create_dir(&admitted).unwrap();
        for (name, exp) in [("a.jws", 1_000), ("b.jws", 2_000)] {
            std::fs::write(admitted.join(name), name).unwrap();
            archive(&admitted.join(name), &expired, exp).unwrap();
        }
        std::fs::write(expired.join("notes.txt"), "operator's").unwrap();
        assert_eq!(std::fs::read_dir(&admitted).unwrap().count(), 0, "gone from the admitted dir");
        assert_eq!(std::fs::read_to_string(expired.join("1000.a.jws")).unwrap(), "a.jws");

        assert_eq!(prune(&expired, 1_000 + 499, 500).unwrap(), 0, "inside retention");
        assert_eq!(prune(&expired, 1_000 + 500, 500).unwrap(), 1);
        assert!(!expired.join("1000.a.jws").exists() && expired.join("2000.b.jws").exists());
        assert_eq!(prune(&expired, i64::MAX, 500).unwrap(), 1);
        assert!(expired.join("notes.txt").exists(), "files not named <exp>.<name> are left alone");
        assert_eq!(prune(&dir.path().join("missing"), 0, 1).unwrap(), 0);
        assert_eq!(archived_exp("12.x.jws"), Some(12));
        assert_eq!((archived_exp("12."), archived_exp("x.jws")), (None, None));
    }
}
