//! Durable file replacement, shared by everything that keeps state across restarts.

use std::io::Write as _;
use std::path::Path;

/// How [`write_durably`] treats an existing file at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it atomically.
    Replace,
    /// Fail with `ErrorKind::AlreadyExists` and leave it untouched (key files).
    Keep,
}

/// Writes `contents` to `path` atomically and durably: a temp file in the same directory
/// (mode 0600, so a secret is never readable by others, even briefly), fsync, rename or
/// link into place, fsync the directory. A crash leaves either the old or the new file,
/// never a mix.
pub fn write_durably(path: &Path, contents: &[u8], existing: Existing) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".kycd-").tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    match existing {
        Existing::Replace => tmp.persist(path).map_err(|e| e.error)?,
        Existing::Keep => tmp.persist_noclobber(path).map_err(|e| e.error)?,
    };
    std::fs::File::open(dir)?.sync_all()
}

/// [`write_durably`], replacing any existing file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_durably(path, contents, Existing::Replace)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_contents_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        super::write_atomic(&path, b"one").unwrap();
        super::write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = super::write_durably(&path, b"three", super::Existing::Keep).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
    }
}
