//! Durable file replacement, shared by everything that keeps state across restarts, and
//! bounded reads of files whose content comes from outside (drop directories).
//!
//! Agent state is private: files are created 0600 and directories 0700, with the mode given
//! explicitly at creation (the umask can only narrow it further, never widen it).

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;

/// Name prefix of [`write_durably`]'s temp files (a crash before the rename leaves one).
pub const TEMP_PREFIX: &str = ".kycd-";

/// Mode of every state file the agent creates.
pub const STATE_FILE_MODE: u32 = 0o600;
/// Mode of every state directory the agent creates.
pub const STATE_DIR_MODE: u32 = 0o700;

/// `mkdir -p` with mode 0700 for each directory it creates (existing ones are left as they
/// are).
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(STATE_DIR_MODE).create(dir)
}

/// How [`write_durably`] treats an existing file at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it atomically.
    Replace,
    /// Fail with `ErrorKind::AlreadyExists` and leave it untouched (key files).
    Keep,
}

/// Writes `contents` to `path` atomically and durably: a temp file in the same directory
/// (mode 0600, so a secret is never readable by others, even briefly; the file keeps that
/// mode), fsync, rename or link into place, fsync the directory. A missing directory is
/// created 0700. A crash leaves either the old or the new file, never a mix.
pub fn write_durably(path: &Path, contents: &[u8], existing: Existing) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_private_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .permissions(std::fs::Permissions::from_mode(STATE_FILE_MODE))
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    match existing {
        Existing::Replace => tmp.persist(path).map_err(|e| e.error)?,
        Existing::Keep => tmp.persist_noclobber(path).map_err(|e| e.error)?,
    };
    sync_dir(dir)
}

/// [`write_durably`], replacing any existing file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_durably(path, contents, Existing::Replace)
}

/// Creates `dir` (and missing parents, each mode 0700) and fsyncs it and its parent, so the
/// new directory entry survives a crash (files later made durable in it are otherwise
/// orphaned).
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    create_private_dir_all(dir)?;
    sync_dir(dir)?;
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// fsyncs the directory `dir`, so the entries created, renamed or removed in it survive a
/// crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Narrows the permission bits of `path` (whose metadata is `meta`) to those in `allowed`:
/// it only ever removes bits. Returns the mode before and after when it changed it. For
/// state left wider by an older agent; callers decide whether a failure matters.
pub fn narrow_mode(
    path: &Path,
    meta: &std::fs::Metadata,
    allowed: u32,
) -> std::io::Result<Option<(u32, u32)>> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !allowed == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & allowed))?;
    Ok(Some((mode, mode & allowed)))
}

/// Whether an error reading an input says nothing about the input itself: the agent is
/// short of descriptors or memory, or the disk failed. Readers keep what they knew before
/// on such an error — an attestation stays in force, a VM keeps its UUID and its tap
/// interfaces — rather than act as if the input were gone: otherwise anyone able to exhaust
/// the agent's descriptors could withdraw attestations (every workload denied) or lift
/// network blocks.
pub fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(
            Errno::EMFILE
                | Errno::ENFILE
                | Errno::EIO
                | Errno::ENOMEM
                | Errno::ENOBUFS
                | Errno::EAGAIN
                | Errno::EINTR
        )
    )
}

/// Reads at most `limit + 1` bytes of the regular file at `path` (the caller detects
/// "too large" from the length). Opens with `O_NONBLOCK` and refuses anything but a regular
/// file, so a FIFO or device planted under an expected name cannot block or flood the agent.
pub fn read_regular_file(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(OFlag::O_NONBLOCK.bits()).open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut buf = Vec::new();
    file.take(cap).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_regular_files_only_and_never_blocks_on_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.jws");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(super::read_regular_file(&file, 4).unwrap(), b"01234", "limit + 1 bytes");
        assert_eq!(super::read_regular_file(&file, 100).unwrap(), b"0123456789");
        let fifo = dir.path().join("f.jws");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let err = super::read_regular_file(&fifo, 10).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(super::read_regular_file(dir.path(), 10).is_err(), "a directory is refused");
    }

    fn mode(path: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_nested_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        super::create_dir_durably(&nested).unwrap();
        assert!(nested.is_dir());
        super::create_dir_durably(&nested).unwrap();
    }

    /// Explicit modes at creation: under the usual umask 022, `create_dir_all` gave 0755.
    #[test]
    fn state_files_are_0600_and_directories_0700() {
        let dir = tempfile::tempdir().unwrap();
        super::create_dir_durably(&dir.path().join("a/b")).unwrap();
        super::write_atomic(&dir.path().join("c/d/state.json"), b"{}").unwrap();
        super::write_durably(&dir.path().join("a/key"), b"k", super::Existing::Keep).unwrap();
        for d in ["a", "a/b", "c", "c/d"] {
            assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
        }
        for f in ["c/d/state.json", "a/key"] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
    }

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
