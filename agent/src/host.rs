//! The host's identity: its id (configured, else `/etc/machine-id`) and its Ed25519 signing
//! key, `<state_dir>/host.key`, a private JWK whose `kid` is the host id.
//!
//! The key signs report uploads (`X-Kycd-Signature`); the collector knows it by its public
//! half (`kycctl host-key --public`, registered with `kycd-collector hosts add`). It is
//! created on first start (mode 0600, written durably, never overwritten) and the agent
//! refuses to start when the file is readable by group or others, or names another host.
//!
//! It also gathers the host facts a host statement carries ([`host_facts`]: CPU, memory,
//! kernel, uptime, boot id), so a collector can tell the machine and its boots apart.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use kycd_protocol::{Algorithm, HostFacts, KeyError, PrivateJwk};

use crate::config::Config;

/// File name of the host key in the state directory.
pub const HOST_KEY_FILE: &str = "host.key";

/// Where the host id comes from when the configuration has none.
pub const MACHINE_ID_FILE: &str = "/etc/machine-id";

/// This boot's random id (a UUID), new at every boot: a statement's boot id changing while
/// its uptime did not fall means the host was not rebooted but replaced.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// Why the host identity cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No host id configured and none in the machine-id file.
    #[error("cannot determine the host id: set host_id in the configuration ({0})")]
    HostId(String),
    /// The key file is readable by group or others.
    #[error(
        "{path}: mode {mode:04o} is unsafe for a private key (must not be group/world accessible; chmod 600)"
    )]
    UnsafeMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading, creating or writing the key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a usable private JWK.
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// The key was made for another host id (the configured `host_id` changed).
    #[error("{path}: key id {kid:?} is not this host's id {host_id:?} (remove the file to make a new key and re-register it with the collector)")]
    WrongHost {
        /// The key file.
        path: PathBuf,
        /// The key's `kid`.
        kid: String,
        /// This host's id.
        host_id: String,
    },
}

/// This host's id: `host_id` from the configuration, else the machine-id file.
pub fn host_id(config: &Config) -> Result<String, HostError> {
    host_id_from(config, Path::new(MACHINE_ID_FILE))
}

fn host_id_from(config: &Config, machine_id: &Path) -> Result<String, HostError> {
    if let Some(id) = &config.host_id {
        return Ok(id.clone());
    }
    let id = std::fs::read_to_string(machine_id).map_err(|e| HostError::HostId(e.to_string()))?;
    let id = id.trim();
    if id.is_empty() {
        return Err(HostError::HostId(format!("{} is empty", machine_id.display())));
    }
    Ok(id.to_owned())
}

/// Facts about this machine for the host statement: CPU model and counts, memory, kernel
/// release, uptime and boot id. Read fresh on each call (a few small /proc and /sys files;
/// sysinfo reads no per-process data here). A fact that cannot be read is empty or 0 rather
/// than an error: the statement is still worth sending without it.
pub fn host_facts() -> HostFacts {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    let system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let cpu_threads = u32::try_from(system.cpus().len()).unwrap_or(u32::MAX);
    HostFacts {
        cpu_model: system.cpus().first().map(|c| c.brand().trim().to_owned()).unwrap_or_default(),
        cpu_cores: System::physical_core_count().and_then(|n| u32::try_from(n).ok()).unwrap_or(cpu_threads),
        cpu_threads,
        memory_bytes: system.total_memory(),
        kernel: System::kernel_version().unwrap_or_default(),
        uptime_s: System::uptime(),
        boot_id: read_boot_id(Path::new(BOOT_ID_FILE)).unwrap_or_default(),
    }
}

/// Seconds since boot (`/proc/uptime`), for stamping a statement with it.
pub fn uptime_s() -> u64 {
    sysinfo::System::uptime()
}

/// The boot id in `path`, trimmed; `None` when unreadable or empty.
fn read_boot_id(path: &Path) -> Option<String> {
    let bytes = crate::fsutil::read_regular_file(path, 64).ok()?;
    let id = String::from_utf8(bytes).ok()?.trim().to_owned();
    (!id.is_empty() && id.len() <= 64).then_some(id)
}

/// `<state_dir>/host.key`.
pub fn host_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(HOST_KEY_FILE)
}

/// Loads the host key at `path`, checking its mode and `kid`.
pub fn load_host_key(path: &Path, host_id: &str) -> Result<PrivateJwk, HostError> {
    let io = |source| HostError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(HostError::UnsafeMode { path: path.to_owned(), mode });
    }
    let bytes = zeroize::Zeroizing::new(crate::fsutil::read_regular_file(path, 64 * 1024).map_err(io)?);
    let key =
        PrivateJwk::from_json(&bytes).map_err(|source| HostError::Key { path: path.to_owned(), source })?;
    if key.kid() != host_id {
        return Err(HostError::WrongHost {
            path: path.to_owned(),
            kid: key.kid().to_owned(),
            host_id: host_id.to_owned(),
        });
    }
    Ok(key)
}

/// Loads the host key at `path`, or creates it (Ed25519, `kid` = `host_id`, mode 0600,
/// durably, never replacing an existing file) when there is none.
pub fn load_or_create_host_key(path: &Path, host_id: &str) -> Result<PrivateJwk, HostError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return load_host_key(path, host_id),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(HostError::Io { path: path.to_owned(), source }),
    }
    let key = PrivateJwk::generate(Algorithm::EdDSA, host_id)
        .map_err(|source| HostError::Key { path: path.to_owned(), source })?;
    if let Some(dir) = path.parent() {
        crate::fsutil::create_dir_durably(dir)
            .map_err(|source| HostError::Io { path: dir.to_owned(), source })?;
    }
    match crate::fsutil::write_durably(path, key.to_json().as_bytes(), crate::fsutil::Existing::Keep) {
        Ok(()) => {
            tracing::info!(path = %path.display(), kid = host_id, "created the host key");
            Ok(key)
        }
        // Another process created it first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_host_key(path, host_id),
        Err(source) => Err(HostError::Io { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = host_key_path(&dir.path().join("state"));
        let a = load_or_create_host_key(&path, "node-1").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_host_key(&path, "node-1").unwrap();
        assert_eq!(a.public_key().to_jwk(), b.public_key().to_jwk());
        assert_eq!(b.kid(), "node-1");
        assert_eq!(b.algorithm(), Algorithm::EdDSA);
        let err = load_or_create_host_key(&path, "node-2").unwrap_err();
        assert!(matches!(err, HostError::WrongHost { .. }), "{err}");
    }

    #[test]
    fn refuses_group_or_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = host_key_path(dir.path());
        load_or_create_host_key(&path, "h").unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_or_create_host_key(&path, "h").unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, HostError::UnsafeMode { mode: m, .. } if m == mode), "{text}");
            assert!(
                text.contains(&path.display().to_string()) && text.contains(&format!("{mode:04o}")),
                "{text}"
            );
        }
        let before = std::fs::read(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        load_or_create_host_key(&path, "h").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before, "never overwritten");
    }

    #[test]
    fn host_facts_are_plausible_on_linux() {
        let f = host_facts();
        assert!(f.cpu_threads >= 1 && f.cpu_cores >= 1, "{f:?}");
        assert!(f.memory_bytes >= 64 << 20, "{f:?}");
        assert!(f.kernel.chars().next().is_some_and(|c| c.is_ascii_digit()), "{f:?}");
        assert!(f.uptime_s > 0, "{f:?}");
        // A UUID: 8-4-4-4-12 hex digits.
        let groups: Vec<usize> = f.boot_id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{f:?}");
        assert!(f.boot_id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{f:?}");
        if cfg!(target_arch = "x86_64") {
            assert!(!f.cpu_model.is_empty(), "{f:?}");
        }
        assert_eq!(host_facts().boot_id, f.boot_id, "the same boot");
    }

    #[test]
    fn boot_id_is_trimmed_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot_id");
        std::fs::write(&path, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
        assert_eq!(read_boot_id(&path).as_deref(), Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(read_boot_id(&path), None);
        assert_eq!(read_boot_id(&dir.path().join("missing")), None);
    }

    #[test]
    fn host_id_from_config_or_machine_id() {
        let dir = tempfile::tempdir().unwrap();
        let mid = dir.path().join("machine-id");
        std::fs::write(&mid, "abc123\n").unwrap();
        let mut config = Config::default();
        assert_eq!(host_id_from(&config, &mid).unwrap(), "abc123");
        config.host_id = Some("node-9".into());
        assert_eq!(host_id_from(&config, &mid).unwrap(), "node-9");
        config.host_id = None;
        std::fs::write(&mid, "\n").unwrap();
        assert!(host_id_from(&config, &mid).is_err());
    }
}
