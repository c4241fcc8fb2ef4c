//! The documented way to scale past one machine: several `kycd-collector serve` processes on
//! one PostgreSQL database. One host's batches — retried, overlapping, out of order — reach
//! all of them at once; afterwards every seq is stored exactly once, every ack was a true
//! contiguous prefix, and the stored ack never went back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;

const HOST: &str = "host-1";
const COLLECTORS: usize = 3;
/// Records 1..=N.
const N: u64 = 600;
/// Batches of 25 records starting every 10: each seq is in two or three batches.
const BATCH: u64 = 25;
const STRIDE: u64 = 10;

/// A child process, killed when dropped (also when the test fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_collectors_on_one_postgres_store_a_hosts_retries_once() {
    let Some(db) = TestDb::postgres("three_collectors_on_one_postgres_store_a_hosts_retries_once") else {
        return;
    };
    let key = host_key(HOST);
    let jwk = db.dir().join("host-1.jwk");
    std::fs::write(&jwk, key.public_key().to_jwk().to_string()).unwrap();

    // The collectors start at once (each migrating the empty database under the advisory
    // lock), then the host is enrolled through one of them's CLI.
    let mut procs = Vec::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for i in 0..COLLECTORS {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(db.dir().join(format!("collector-{i}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args(["serve", "--listen", &addr.to_string(), "--db", &db.url])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        procs.push(Killed(child));
        addrs.push(addr);
    }
    for addr in &addrs {
        let addr = *addr;
        tokio::task::spawn_blocking(move || pg::wait_for_port(addr)).await.unwrap();
    }
    let out =
        cli(&["hosts", "add", "--host-id", HOST, "--public-jwk", jwk.to_str().unwrap(), "--db", &db.url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Every batch goes to every collector, twice (a retry after a lost answer), in an order
    // of its own per collector; at most 24 requests in flight.
    let mut uploads = Vec::new();
    let mut start = 1;
    while start <= N {
        let end = (start + BATCH - 1).min(N);
        let (body, sig) = signed(&batch(HOST, (start..=end).map(record).collect()), &key);
        uploads.push((start, end, body, sig));
        start += STRIDE;
    }
    let uploads = Arc::new(uploads);
    let limit = Arc::new(tokio::sync::Semaphore::new(24));
    let mut tasks = tokio::task::JoinSet::new();
    let n = uploads.len();
    for (c, addr) in addrs.iter().enumerate() {
        for k in 0..2 * n {
            // A different permutation per collector and round (stride coprime with n).
            let i = (k * (2 * c + 7) + c * 13) % n;
            let (uploads, limit, addr) = (Arc::clone(&uploads), Arc::clone(&limit), *addr);
            tasks.spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let (first, last, body, sig) = &uploads[i];
                let mut busy = 0;
                loop {
                    let reply = upload(addr, body.clone(), sig).await;
                    if reply.status == 503 {
                        busy += 1;
                        assert!(busy < 50, "still 503 after {busy} tries: {:?}", reply.body);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                    return (*first, *last, reply.acked(), busy);
                }
            });
        }
    }
    // Meanwhile, the stored acked seq must never go back (a lost update between two
    // collectors advancing it from different snapshots would).
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (store, watching) = (db.open(), Arc::clone(&watching));
        std::thread::spawn(move || {
            let (mut seen, mut samples) = (0, 0);
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let acked = store.acked_seq(HOST, 1).unwrap();
                assert!(acked >= seen, "the acked seq went back from {seen} to {acked}");
                (seen, samples) = (acked, samples + 1);
            }
            samples
        })
    };
    let mut answers = 0;
    let mut retried = 0;
    while let Some(joined) = tasks.join_next().await {
        let (first, last, acked, busy) = joined.unwrap();
        answers += 1;
        retried += busy;
        assert!(acked <= N, "ack {acked} beyond the last seq sent");
        // The batch is stored when answered: an ack that reaches its start covers all of it.
        assert!(acked + 1 < first || acked >= last, "batch {first}..={last} answered with ack {acked}");
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = watcher.join().unwrap();
    assert_eq!(answers, COLLECTORS * 2 * n);
    eprintln!("{answers} uploads answered, {retried} 503 retries, acked seq sampled {samples} times");

    // The last committed batch saw everything stored before it: the stored ack is N without
    // any further upload (writers that each missed the other's rows would leave it short).
    let store = db.open();
    assert_eq!(off_runtime(|| store.acked_seq(HOST, 1).unwrap()), N);
    // Each collector acks everything.
    let last = signed(&batch(HOST, vec![record(N)]), &key);
    for addr in &addrs {
        assert_eq!(upload(*addr, last.0.clone(), &last.1).await.acked(), N);
    }
    let (ranges, acked) =
        off_runtime(|| (store.stored_ranges(HOST, 1).unwrap(), store.acked_seq(HOST, 1).unwrap()));
    assert_eq!(ranges, (1..=N).map(|s| (s, s)).collect::<Vec<_>>(), "each seq stored exactly once");
    assert_eq!(acked, N);
    let listed = String::from_utf8(cli(&["hosts", "list", "--db", &db.url]).stdout).unwrap();
    assert!(
        listed.starts_with(&format!("{HOST}\t")) && listed.contains(&format!("acked_seq={N}\t")),
        "{listed}"
    );
    for (i, mut proc) in procs.into_iter().enumerate() {
        assert!(proc.0.try_wait().unwrap().is_none(), "collector {i} died");
    }
}
