//! Creating the operator socket file: its directory, the stale socket of an earlier run,
//! its mode and group.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use tokio::net::UnixListener;

use super::ApiError;

/// Creates the socket: its directory (0755), a stale socket from a previous run removed
/// (only if it is a socket), mode 0600, or 0660 with group `socket_group`.
pub fn bind(path: &Path, socket_group: Option<&str>) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::FileTypeExt as _;
    let err = |source| ApiError::Socket { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let gid =
        socket_group.map(|g| group_id(g).ok_or_else(|| ApiError::UnknownGroup(g.to_owned()))).transpose()?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// The gid of `name` from /etc/group (NSS groups are not consulted: the socket's group is a
/// local system group created by the package).
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}
