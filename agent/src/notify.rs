//! systemd's notification protocol (`sd_notify(3)`): `READY=1` once the agent has loaded its
//! state and reconciled enforcement, `WATCHDOG=1` at half of `WATCHDOG_USEC`, `STATUS=` lines,
//! `STOPPING=1`. A datagram to the socket named by `NOTIFY_SOCKET` (a path, or `@name` for
//! the abstract namespace). Without `NOTIFY_SOCKET` (not started by systemd) every call is a
//! no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            use std::os::unix::ffi::OsStrExt as _;
            let bytes = path.as_bytes();
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt as _;
                    std::os::unix::net::SocketAddr::from_abstract_name(name).ok()?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(&path)).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        // The watchdog is ours only if WATCHDOG_PID is unset or names this process.
        let ours = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the configured watchdog interval.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends one notification (e.g. `"READY=1\nSTATUS=…"`). Failures are logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, "sd_notify failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                std::os::unix::net::SocketAddr::from_pathname(&path).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(30)),
        };
        n.notify("READY=1\nSTATUS=ok");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let silent = Notifier { socket: None, watchdog: None };
        silent.notify("READY=1");
        assert_eq!(silent.watchdog_interval(), None);
    }
}
