//! The real `kycd-collector serve` under clients that never finish: an idle flood, partial
//! headers and a stalled body from one address. `/healthz` (asked from another address)
//! answers throughout; the stalled sockets are closed within the header-read and idle
//! timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

struct Collector(Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A connection from 127.0.0.2, the attacker's address (all of 127/8 is loopback).
async fn from_attacker(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.2:0".parse().unwrap())?;
    socket.connect(addr).await
}

/// `GET /healthz` from 127.0.0.1 on a fresh connection: whether it answered 200 in time.
async fn healthz(addr: SocketAddr) -> bool {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: c\r\nconnection: close\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        std::io::Result::Ok(out.starts_with("HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), exchange).await, Ok(Ok(true)))
}

/// Waits until the peer closes `s`; returns how long that took from `since`.
async fn closed_after(mut s: TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the collector never closed a stalled connection"),
        }
    }
}

#[tokio::test]
async fn healthz_answers_through_an_idle_flood_and_stalled_requests_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
        .args(["serve", "--listen", &format!("0.0.0.0:{port}"), "--db"])
        .arg(dir.path().join("c.db"))
        .args(["--evaluate-interval-s", "0", "--max-connections", "64", "--max-connections-per-ip", "32"])
        .args(["--header-read-timeout-s", "2", "--idle-timeout-s", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _collector = Collector(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !healthz(addr).await {
        assert!(Instant::now() < deadline, "the collector never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // From the attacker's address: a half-sent request head, a stalled body, then an idle
    // flood of 1,100 connections (most refused at the per-IP cap of 32).
    let started = Instant::now();
    let mut partial = from_attacker(addr).await.unwrap();
    partial.write_all(b"POST /v1/reports HTTP/1.1\r\nhost: c\r\n").await.unwrap();
    let mut stalled = from_attacker(addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/reports HTTP/1.1\r\nhost: c\r\ncontent-encoding: gzip\r\ncontent-length: 1000\r\n\r\nabc")
        .await
        .unwrap();
    let partial = tokio::spawn(closed_after(partial, started));
    let stalled = tokio::spawn(closed_after(stalled, started));
    let mut flood = Vec::new();
    for _ in 0..1_100 {
        if let Ok(s) = from_attacker(addr).await {
            flood.push(s);
        }
    }
    // /healthz answers throughout, while the flood is held and as it is timed out.
    for _ in 0..12 {
        assert!(healthz(addr).await, "/healthz did not answer during the flood");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let partial = partial.await.unwrap();
    let stalled = stalled.await.unwrap();
    assert!(partial < Duration::from_millis(3000), "partial headers closed after {partial:?} (timeout 2 s)");
    assert!(stalled >= Duration::from_secs(4), "the stalled body was closed early: {stalled:?}");
    assert!(stalled < Duration::from_millis(5500), "the stalled body closed after {stalled:?} (idle 4 s)");
    // Six seconds on, every flood connection was either refused at once or closed by the
    // 2 s header-read timeout: each reads as closed at once.
    assert!(flood.len() > 32, "the flood connected");
    for mut s in flood {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a flood connection is still open: {read:?}");
    }
}
