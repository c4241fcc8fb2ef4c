//! Bounded HTTP/1.1 serving for every listener kycd opens: the agent's operator socket, the
//! agent's collector-facing HTTPS API and the collector's ingest/read API.
//!
//! An open connection costs a file descriptor and a task, whoever holds it. Without bounds a
//! client that opens connections and sends nothing (or half a request, or half a body) holds
//! those for as long as it likes, and ~1,000 of them exhaust the process's descriptors — on the
//! agent that made the next attestation rescan fail and withdraw every attestation. So each
//! listener served here has:
//!
//! - **a connection cap** ([`Limits::max_connections`]): past it, new connections are accepted
//!   and closed at once (refused, counted in [`ConnStats::refused`]), never queued — a queue
//!   would only move the exhaustion into the kernel's backlog while legitimate callers wait;
//! - **a cap per peer** ([`Limits::max_per_peer`], by IP address or by uid): one client alone
//!   cannot fill the whole cap, so others (a health check, root's `kycctl`) still get in;
//! - **a header-read timeout** ([`Limits::header_read_timeout`]): a connection that does not
//!   deliver a complete request head in time — a fresh idle one, or one trickling its
//!   headers, counted from the head's first byte on a keep-alive connection — is closed;
//! - **a keep-alive timeout** ([`Limits::keep_alive_timeout`]): a connection that completed a
//!   request and waits idle for its next one (no byte of it yet) is closed after that long.
//!   It may exceed the idle timeout, so a client that polls every minute can keep its
//!   connection (and skip a TLS handshake) between polls; it still holds one place under the
//!   caps above, so the caps, not this timeout, bound what idle clients can hold;
//! - **an idle timeout** ([`Limits::idle_timeout`]): a connection on which no byte moved in
//!   either direction for that long — a stalled request body, a client that stopped reading
//!   its response — is closed. It must exceed the longest time a handler computes an answer
//!   without I/O.
//!
//! The caller passes the listener and the shutdown token in (tests bind `127.0.0.1:0` or a
//! temporary socket and stop the server deterministically); [`serve`] returns once the
//! listener stopped and every connection drained or was closed.

mod connection;
pub mod prometheus;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use connection::serve_connection;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once; more are refused.
    pub max_connections: usize,
    /// Most connections open at once from one peer (the key `serve`'s `peer` gives); more
    /// from that peer are refused. 0: no per-peer cap.
    pub max_per_peer: usize,
    /// Longest wait for a complete request head (also bounds a TLS handshake).
    pub header_read_timeout: Duration,
    /// Longest time with no byte read or written on a connection while a request is in
    /// flight (being read, computed or answered).
    pub idle_timeout: Duration,
    /// Longest an answered keep-alive connection waits idle for its next request (no byte of
    /// it yet); once one arrives, the header-read timeout runs from it. Set it to the
    /// header-read timeout for the classic behaviour (an idle keep-alive connection lasts as
    /// long as a fresh one).
    pub keep_alive_timeout: Duration,
}

/// Counters of one listener, for `/metrics` and status.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections accepted and served since start.
    pub accepted: AtomicU64,
    /// Connections refused at the cap since start.
    pub refused: AtomicU64,
    /// Connections closed for not sending a request head in time (or failing the handshake
    /// in time).
    pub header_timeouts: AtomicU64,
    /// Connections closed after [`Limits::idle_timeout`] without I/O, or after
    /// [`Limits::keep_alive_timeout`] idle between requests.
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    /// A snapshot: (open, accepted, refused, header timeouts, idle closed).
    pub fn snapshot(&self) -> ConnSnapshot {
        ConnSnapshot {
            open: self.open.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            refused: self.refused.load(Relaxed),
            header_timeouts: self.header_timeouts.load(Relaxed),
            idle_closed: self.idle_closed.load(Relaxed),
        }
    }
}

/// A copy of [`ConnStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnSnapshot {
    /// Connections open.
    pub open: u64,
    /// Accepted since start.
    pub accepted: u64,
    /// Refused at the cap since start.
    pub refused: u64,
    /// Closed by the header-read timeout since start.
    pub header_timeouts: u64,
    /// Closed by the idle timeout since start.
    pub idle_closed: u64,
}

impl ConnSnapshot {
    /// Prometheus text for these counters, each metric named `{prefix}_connections_…` and
    /// labelled `listener="{listener}"`. HELP/TYPE lines are written when `header` is set (once
    /// per metric family when several listeners share the prefix).
    pub fn write_prometheus(
        &self,
        out: &mut prometheus::Exposition,
        prefix: &str,
        listener: &str,
        header: bool,
    ) {
        use prometheus::Kind;
        let families: [(&str, Kind, &str, u64); 5] = [
            ("open", Kind::Gauge, "Connections open now.", self.open),
            ("accepted_total", Kind::Counter, "Connections accepted.", self.accepted),
            ("refused_total", Kind::Counter, "Connections refused at the connection cap.", self.refused),
            (
                "header_timeouts_total",
                Kind::Counter,
                "Connections closed for not sending a request head in time.",
                self.header_timeouts,
            ),
            (
                "idle_closed_total",
                Kind::Counter,
                "Connections closed after the idle timeout.",
                self.idle_closed,
            ),
        ];
        for (name, kind, help, value) in families {
            let metric = format!("{prefix}_connections_{name}");
            if header {
                out.family(&metric, kind, help);
            }
            out.sample(&metric, &[("listener", listener)], value);
        }
    }
}

/// Connections open per peer key.
type PeerCounts<K> = Arc<std::sync::Mutex<std::collections::HashMap<K, usize>>>;

/// Gives back the connection's places (in [`ConnStats::open`] and its peer's count) when its
/// task ends, however it ends.
struct OpenSlot<K: std::hash::Hash + Eq> {
    stats: Arc<ConnStats>,
    peer: Option<(K, PeerCounts<K>)>,
}

impl<K: std::hash::Hash + Eq> Drop for OpenSlot<K> {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Relaxed);
        if let Some((key, counts)) = &self.peer {
            let mut counts = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = counts.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(key);
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, within `limits`.
///
/// `peer` names who a connection comes from, for [`Limits::max_per_peer`] (`None`: counted
/// against the global cap only, e.g. root on the operator socket). `prepare` turns an accepted connection into the stream to speak HTTP on (a TLS handshake,
/// or the connection as it is) and the value handlers see as `ConnectInfo<Info>`; `None`
/// drops the connection. It runs in the connection's own task, bounded by the header-read
/// timeout. On shutdown the listener stops at once, open connections finish their request in
/// flight and close; the caller bounds that wait with its grace timeout.
pub async fn serve<L, K, P, F, S, Info>(
    mut listener: L,
    app: Router,
    limits: Limits,
    stats: Arc<ConnStats>,
    shutdown: CancellationToken,
    peer: impl Fn(&L::Io, &L::Addr) -> Option<K>,
    prepare: P,
) where
    L: Listener,
    K: std::hash::Hash + Eq + Clone + Send + 'static,
    P: Fn(L::Io, L::Addr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Option<(S, Info)>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Info: Clone + Send + Sync + 'static,
{
    let connections = TaskTracker::new();
    let per_peer: PeerCounts<K> = Arc::default();
    loop {
        let (io, addr) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let key = peer(&io, &addr).filter(|_| limits.max_per_peer > 0);
        let full = stats.open.load(Relaxed) >= limits.max_connections as u64;
        let peer_full = !full
            && key.as_ref().is_some_and(|k| {
                let mut counts = per_peer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let n = counts.entry(k.clone()).or_insert(0);
                if *n >= limits.max_per_peer {
                    true
                } else {
                    *n += 1;
                    false
                }
            });
        if full || peer_full {
            drop(io);
            let refused = stats.refused.fetch_add(1, Relaxed) + 1;
            // Logged at 1, 2, 4, 8, … refusals: a flood cannot flood the log; the counter
            // has the exact number.
            if refused.is_power_of_two() {
                let why = if full { "too many open connections" } else { "too many from one peer" };
                warn!(
                    refused,
                    cap = limits.max_connections,
                    per_peer = limits.max_per_peer,
                    "connection refused: {why}"
                );
            }
            continue;
        }
        stats.open.fetch_add(1, Relaxed);
        stats.accepted.fetch_add(1, Relaxed);
        let slot = OpenSlot { stats: Arc::clone(&stats), peer: key.map(|k| (k, Arc::clone(&per_peer))) };
        let app = app.clone();
        let prepare = prepare.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let stats = Arc::clone(&slot.stats);
            let _slot = slot;
            let prepared = tokio::time::timeout(limits.header_read_timeout, prepare(io, addr)).await;
            let Ok(Some((stream, info))) = prepared else {
                if prepared.is_err() {
                    stats.header_timeouts.fetch_add(1, Relaxed);
                }
                return;
            };
            serve_connection(stream, info, app, limits, &stats, stop).await;
        });
    }
    connections.close();
    connections.wait().await;
}

/// `prepare` for connections served as they are, with the peer address as connect info.
pub async fn plain<Io, Addr>(io: Io, addr: Addr) -> Option<(Io, Addr)> {
    Some((io, addr))
}

/// `peer` for TCP listeners: the client's IPv4 address, or the /64 network of its IPv6
/// address (one host commonly holds a whole /64, so a per-address cap would not bind it).
pub fn peer_ip<Io>(_: &Io, addr: &std::net::SocketAddr) -> Option<std::net::IpAddr> {
    Some(match addr.ip() {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            std::net::IpAddr::V6(segments.into())
        }
        std::net::IpAddr::V6(v6) => {
            v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
        }
        v4 => v4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::connect_info::ConnectInfo;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::Instant;

    const LIMITS: Limits = Limits {
        max_connections: 4,
        max_per_peer: 0,
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        keep_alive_timeout: Duration::from_millis(300),
    };

    async fn start(
        limits: Limits,
    ) -> (std::net::SocketAddr, Arc<ConnStats>, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| async move { peer.to_string() }),
            )
            .route("/echo", post(|body: axum::body::Bytes| async move { body }));
        let stats = Arc::new(ConnStats::default());
        let shutdown = CancellationToken::new();
        let server =
            tokio::spawn(serve(listener, app, limits, Arc::clone(&stats), shutdown.clone(), peer_ip, plain));
        (addr, stats, shutdown, server)
    }

    /// One request on a fresh connection; the status line.
    async fn get_status(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.unwrap().unwrap();
        out
    }

    /// Waits (virtual time) until `cond` holds, at most `limit`.
    async fn until(limit: Duration, cond: impl Fn() -> bool) {
        let end = Instant::now() + limit;
        while !cond() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_refused_and_healthz_answers_after_the_timeout() {
        let (addr, stats, shutdown, server) = start(LIMITS).await;
        // Fill the cap with idle connections, then two more: refused (closed at once).
        let mut idle = Vec::new();
        for _ in 0..LIMITS.max_connections {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        until(Duration::from_secs(1), || stats.open.load(Relaxed) == 4).await;
        for _ in 0..2 {
            let mut extra = TcpStream::connect(addr).await.unwrap();
            let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut buf = Vec::new();
            // Refused: the server closes without an answer.
            let n = tokio::time::timeout(Duration::from_secs(1), extra.read_to_end(&mut buf)).await;
            assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a connection past the cap got {n:?} {buf:?}");
        }
        assert_eq!(stats.refused.load(Relaxed), 2);
        // The idle ones are closed by the header-read timeout, and the listener serves again.
        until(Duration::from_secs(4), || stats.open.load(Relaxed) == 0).await;
        assert_eq!(stats.header_timeouts.load(Relaxed), 4, "{:?}", stats.snapshot());
        for mut s in idle {
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            assert_eq!(read.expect("the server closes the idle connection").unwrap_or(0), 0);
        }
        assert!(get_status(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn partial_headers_and_a_stalled_body_are_closed() {
        let (addr, stats, shutdown, server) = start(LIMITS).await;
        let started = Instant::now();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly part")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), partial.read_to_end(&mut buf)).await;
        assert_eq!(read.expect("partial headers are closed").unwrap_or(0), 0);
        let partial_closed = started.elapsed();
        assert!(
            partial_closed < LIMITS.header_read_timeout + Duration::from_millis(250),
            "{partial_closed:?}"
        );
        // The stalled body is past the head, so only the idle timeout ends it.
        let _ = tokio::time::timeout(Duration::from_secs(2), stalled.read_to_end(&mut buf))
            .await
            .expect("a stalled body is closed");
        let stalled_closed = started.elapsed();
        assert!(stalled_closed >= LIMITS.idle_timeout, "{stalled_closed:?}");
        assert!(stalled_closed < LIMITS.idle_timeout + Duration::from_millis(250), "{stalled_closed:?}");
        let snap = stats.snapshot();
        assert_eq!((snap.header_timeouts, snap.idle_closed), (1, 1), "{snap:?}");
        // A complete request with its body works, and handlers see the peer address.
        let peer = get_status(addr, "/peer").await;
        assert!(peer.starts_with("HTTP/1.1 200") && peer.contains("127.0.0.1:"), "{peer}");
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn keep_alive_connections_serve_several_requests_and_shutdown_drains() {
        let (addr, stats, shutdown, server) = start(LIMITS).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello").await.unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("hello"), "{text}");
        }
        assert_eq!(stats.accepted.load(Relaxed), 1);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), server).await.unwrap().unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        assert_eq!(read.expect("closed on shutdown").unwrap_or(0), 0);
    }

    /// One request on an open keep-alive connection; the whole answer.
    async fn ask(s: &mut TcpStream) -> String {
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        while !out.ends_with(b"\r\n\r\nok") {
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed mid-answer: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn an_answered_connection_waits_for_the_next_request_until_the_keep_alive_timeout() {
        let limits = Limits { keep_alive_timeout: Duration::from_millis(1500), ..LIMITS };
        let (addr, stats, shutdown, server) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(ask(&mut s).await.starts_with("HTTP/1.1 200"));
        // Idle past the header-read (300 ms) and idle (600 ms) timeouts: still served.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(ask(&mut s).await.starts_with("HTTP/1.1 200"));
        assert_eq!(stats.accepted.load(Relaxed), 1, "the same connection");
        // The next head starts and stalls: the header-read timeout runs from its first byte.
        let started = Instant::now();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
        assert_eq!(read.expect("a stalled head is closed").unwrap_or(0), 0);
        let closed = started.elapsed();
        assert!(closed >= LIMITS.header_read_timeout && closed < Duration::from_millis(1000), "{closed:?}");
        assert_eq!(stats.snapshot().header_timeouts, 1, "{:?}", stats.snapshot());
        // Answered and then idle: closed once the keep-alive timeout passed, not before.
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(ask(&mut s).await.starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut buf)).await;
        assert_eq!(read.expect("an idle keep-alive connection is closed").unwrap_or(0), 0);
        let closed = started.elapsed();
        assert!(closed >= Duration::from_millis(1400) && closed < Duration::from_millis(2200), "{closed:?}");
        let snap = stats.snapshot();
        assert_eq!((snap.idle_closed, snap.open), (1, 0), "{snap:?}");
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn one_peer_cannot_fill_the_cap() {
        let limits = Limits { max_connections: 8, max_per_peer: 3, ..LIMITS };
        let (addr, stats, shutdown, server) = start(limits).await;
        // 127.0.0.2 holds its 3 places; its fourth is refused; 127.0.0.1 still gets in.
        let mut flood = Vec::new();
        for _ in 0..4 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            flood.push(socket.connect(addr).await.unwrap());
        }
        until(Duration::from_secs(1), || stats.refused.load(Relaxed) == 1).await;
        assert_eq!(stats.snapshot().open, 3, "{:?}", stats.snapshot());
        assert!(get_status(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        drop(flood);
        // Places are given back: the same peer gets in again.
        until(Duration::from_secs(1), || stats.open.load(Relaxed) == 0).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut again = socket.connect(addr).await.unwrap();
        again.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), again.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        shutdown.cancel();
        server.await.unwrap();
    }

    #[test]
    fn ipv6_peers_count_by_their_64_network() {
        let key = |a: &str| peer_ip(&(), &a.parse().unwrap());
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:1"), key("[2001:db8:1:2:bbbb::2]:9"));
        assert_ne!(key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:3::1]:1"));
        assert_eq!(key("[::ffff:192.0.2.7]:1"), key("192.0.2.7:2"));
        assert_ne!(key("192.0.2.7:1"), key("192.0.2.8:1"));
    }

    #[test]
    fn prometheus_text_names_every_counter() {
        let snap = ConnSnapshot { open: 1, accepted: 2, refused: 3, header_timeouts: 4, idle_closed: 5 };
        let mut exposition = prometheus::Exposition::new();
        snap.write_prometheus(&mut exposition, "kycd_api", "socket", true);
        let out = exposition.finish();
        assert!(out.contains("kycd_api_connections_refused_total{listener=\"socket\"} 3\n"), "{out}");
        assert!(out.contains("# TYPE kycd_api_connections_open gauge\n"), "{out}");
        assert_eq!(out.lines().filter(|l| !l.starts_with('#')).count(), 5);
    }
}
