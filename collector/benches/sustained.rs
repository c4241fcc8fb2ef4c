//! Sustained ingest of a 100,000-GPU fleet (12,500 hosts × one 8-GPU VM, one signed batch
//! of one 60 s window per host per minute), time compressed, into two `kycd-collector serve`
//! processes on one PostgreSQL database (issue 20 item 3).
//!
//!     cargo build --release -p kycd-collector
//!     cargo bench -p kycd-collector --bench sustained
//!
//! - PostgreSQL: `KYCD_BENCH_POSTGRES_URL` (a role that may `CREATE DATABASE`, on this
//!   machine: its processes' CPU is read from /proc), else a private cluster (kycd-test-support
//!   `pg`, PostgreSQL's default durability: fsync at every commit).
//! - The collectors: the release binary next to this bench's directory
//!   (`target/release/kycd-collector`, or `KYCD_COLLECTOR_BIN`), started with findings
//!   evaluation and agent polling off, each on its own loopback port.
//! - The fleet: 12,500 hosts enrolled with their own Ed25519 keys, 200 tenants (host `h` runs
//!   tenant `h % 200`). Every host's batches for `1 + KYCD_BENCH_MINUTES` (default 10)
//!   simulated minutes are built, gzip'd and signed before timing (the agents' work), placed
//!   in the past (ingest refuses windows that end in the future).
//! - The load: `KYCD_BENCH_CONNECTIONS` (default 64) senders, half on each collector, each
//!   opening one HTTP/1.1 connection per batch as the agent's uploader does; batches go in
//!   simulated-minute order (every host's minute k is started before any minute k+1). The
//!   first minute is a warm-up (connections, caches, first rows), not timed.
//!
//! Reported: batches/s over the timed minutes against the real-time need (12,500 / 60 s =
//! 208.3 batches/s), so the headroom factor; request latency p50/p99; CPU seconds of each
//! collector, of PostgreSQL (postmaster and every backend, exited ones included) and of this
//! load generator, which say where the ceiling is. Then the checks (one row per batch sent,
//! `rollups check` without differences) and the database bytes per window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use kycd_collector::fleet::FleetStore as _;
use kycd_collector::ReportStore as _;
use kycd_protocol::{
    Algorithm, EstimationMethod, PrivateJwk, ReportBatch, UsageRecord, UsageWindow, REPORT_SIGNATURE_TYP,
};
use kycd_test_support::pg;

const HOSTS: usize = 12_500;
const TENANTS: usize = 200;
const MINUTE_S: i64 = 60;
/// Batches per second the fleet sends in real time.
const REAL_TIME: f64 = HOSTS as f64 / MINUTE_S as f64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn host_id(h: usize) -> String {
    format!("gpu-host-{h:05}")
}

/// Host `h`'s window of simulated minute `minute` (seq `minute + 1`): one 8-GPU VM of tenant
/// `h % 200`, busy all minute, with per-pipe estimates as an H100 host's agent sends them.
fn record(h: usize, minute: u64, base: i64) -> UsageRecord {
    let start = base + i64::try_from(minute).unwrap() * MINUTE_S;
    let busy = 0.35 + (h % 7) as f64 * 0.05;
    let peak = 8.0 * 989e12;
    let ops = peak * 60.0 * busy;
    UsageRecord {
        seq: minute + 1,
        last_seq: None,
        window: UsageWindow {
            tenant: Some(format!("tenant-{:03}", h % TENANTS)),
            workload: format!("cgroup:/machine.slice/machine-qemu-vm-{h:05}.scope"),
            foreign_person: h % TENANTS % 10 == 0,
            foreign_status: None,
            start,
            end: start + MINUTE_S,
            gpu_seconds: 480.0,
            gpus: 8,
            max_concurrent_gpus: 8,
            estimated_ops: ops,
            ops_lower: Some(ops * 0.5),
            ops_upper: Some(ops * 2.0),
            shared_gpu_seconds: 0.0,
            guest_gap_gpu_seconds: 0.0,
            peak_flops: peak,
            method: EstimationMethod::GpmPipes,
            training_like: h % 3 != 0,
            merged_windows: 1,
        },
    }
}

/// The gzip'd, signed upload of host `h`'s batch of `minute`.
fn upload(h: usize, key: &PrivateJwk, minute: u64, base: i64) -> (Bytes, String) {
    let record = record(h, minute, base);
    let batch = ReportBatch { host_id: host_id(h), sent_at: record.window.end + 2, records: vec![record] };
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&serde_json::to_vec(&batch).unwrap()).unwrap();
    let body = enc.finish().unwrap();
    let sig = kycd_protocol::sign_detached(&body, REPORT_SIGNATURE_TYP, key);
    (Bytes::from(body), sig)
}

/// Clock ticks per second of /proc's CPU times.
fn clk_tck() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(100.0)
}

/// Fields of /proc/PID/stat after the command name and state: [0] ppid, [10] utime,
/// [11] stime, [12] cutime, [13] cstime (clock ticks).
fn stat(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect())
}

/// CPU ticks of process `pid` (all its threads), with `children` those of its exited
/// children it has waited for.
fn ticks(pid: u32, children: bool) -> u64 {
    let Some(s) = stat(pid) else { return 0 };
    let own = s[10] + s[11];
    if children {
        own + s[12] + s[13]
    } else {
        own
    }
}

/// CPU ticks of the PostgreSQL server: the postmaster, its exited children, its live ones.
fn pg_ticks(postmaster: u32) -> u64 {
    let mut total = ticks(postmaster, true);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some(s) = stat(pid) {
            if s[0] == u64::from(postmaster) {
                total += s[10] + s[11];
            }
        }
    }
    total
}

/// The postmaster of the server behind `client`: the parent of its backend.
fn postmaster(client: &mut postgres::Client) -> u32 {
    let backend: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let s = stat(u32::try_from(backend).unwrap()).expect("the PostgreSQL server runs on this machine");
    u32::try_from(s[0]).unwrap()
}

/// A `kycd-collector serve` process on `port`.
fn collector(bin: &std::path::Path, db: &str, port: u16, log: PathBuf) -> Child {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db", db])
        .args(["--evaluate-interval-s", "0", "--poll-interval-s", "0", "--max-connections-per-ip", "0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --release -p kycd-collector)", bin.display()));
    pg::wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    child
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What the senders measured.
#[derive(Default)]
struct Sent {
    latencies_us: Vec<u64>,
    retries: u64,
}

/// One upload over a new connection; the status.
async fn post(addr: std::net::SocketAddr, body: &Bytes, sig: &str) -> u16 {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/reports")
        .header("host", "collector")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("x-kycd-signature", sig)
        .body(Full::new(body.clone()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// Sends `uploads` (in order; each sender takes the next one) over `connections` senders
/// spread over `addrs`; a 503 (database busy) is retried as the agent would.
fn send(
    runtime: &tokio::runtime::Runtime,
    addrs: &[std::net::SocketAddr],
    connections: usize,
    uploads: &Arc<Vec<(Bytes, String)>>,
) -> Sent {
    let next = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Mutex::new(Sent::default()));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..connections {
            let (addr, next, uploads, sent) =
                (addrs[c % addrs.len()], next.clone(), uploads.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Sent::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((body, sig)) = uploads.get(i) else { break };
                    let t = kycd_protocol::clock::monotonic();
                    loop {
                        match post(addr, body, sig).await {
                            200 => break,
                            503 => {
                                mine.retries += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            other => panic!("upload {i}: HTTP {other}"),
                        }
                    }
                    mine.latencies_us.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                let mut all = sent.lock().unwrap();
                all.latencies_us.extend(mine.latencies_us);
                all.retries += mine.retries;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    Arc::try_unwrap(sent).ok().unwrap().into_inner().unwrap()
}

/// Creates database `name` (dropping an old one) on the server of `admin`; its URL.
fn database(admin: &str, name: &str) -> String {
    let mut client = postgres::Client::connect(admin, postgres::NoTls).unwrap();
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    client.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    pg::with_dbname(admin, name)
}

fn collector_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("KYCD_COLLECTOR_BIN") {
        return PathBuf::from(bin);
    }
    // This bench is target/release/deps/sustained-HASH.
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|deps| deps.parent()).unwrap().join("kycd-collector")
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e3
}

fn main() {
    let minutes = env_usize("KYCD_BENCH_MINUTES", 10) as u64;
    let connections = env_usize("KYCD_BENCH_CONNECTIONS", 64).max(2);
    let bin = collector_bin();
    assert!(bin.exists(), "{} missing: cargo build --release -p kycd-collector first", bin.display());
    let mut _cluster = None;
    let admin = match std::env::var("KYCD_BENCH_POSTGRES_URL") {
        Ok(url) => url,
        Err(_) => {
            let cluster = pg::Cluster::start(true).expect("a private PostgreSQL cluster");
            println!("PostgreSQL: private cluster in {} (fsync per commit)", cluster.dir.display());
            let url = cluster.url("postgres");
            _cluster = Some(cluster);
            url
        }
    };
    let url = database(&admin, "sustained");
    let now = kycd_protocol::clock::unix_now();
    // Minute 0 (warm-up) to `minutes`, ending at least two minutes before now.
    let base = (now / MINUTE_S - i64::try_from(minutes).unwrap() - 3) * MINUTE_S;
    let enrolled_at = base - 3600;

    let t = kycd_protocol::clock::monotonic();
    let keys: Vec<PrivateJwk> =
        (0..HOSTS).map(|h| PrivateJwk::generate(Algorithm::EdDSA, &host_id(h)).unwrap()).collect();
    {
        let store = kycd_collector::PgStore::open(&url).unwrap();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| loop {
                    let h = next.fetch_add(1, Ordering::Relaxed);
                    let Some(key) = keys.get(h) else { break };
                    store.enroll_host(&host_id(h), &key.public_key(), enrolled_at).unwrap();
                });
            }
        });
    }
    println!("{HOSTS} hosts enrolled in {:.1} s", t.elapsed().as_secs_f64());

    let t = kycd_protocol::clock::monotonic();
    let build = |minute: u64| -> Arc<Vec<(Bytes, String)>> {
        let half = HOSTS / 2;
        let (a, b) = std::thread::scope(|s| {
            let first = s.spawn(|| (0..half).map(|h| upload(h, &keys[h], minute, base)).collect::<Vec<_>>());
            let second: Vec<_> = (half..HOSTS).map(|h| upload(h, &keys[h], minute, base)).collect();
            (first.join().unwrap(), second)
        });
        Arc::new(a.into_iter().chain(b).collect())
    };
    let warmup = build(0);
    let timed: Arc<Vec<(Bytes, String)>> = Arc::new((1..=minutes).flat_map(|m| build(m).to_vec()).collect());
    let gzip: usize = timed.iter().map(|(b, _)| b.len()).sum();
    println!(
        "{} batches built and signed in {:.1} s ({} B gzip each on average)",
        warmup.len() + timed.len(),
        t.elapsed().as_secs_f64(),
        gzip / timed.len().max(1)
    );

    let logs = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ports = [free_port(), free_port()];
    let mut collectors: Vec<Child> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| collector(&bin, &url, *port, logs.path().join(format!("collector-{i}.log"))))
        .collect();
    let addrs: Vec<std::net::SocketAddr> =
        ports.iter().map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p))).collect();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let postmaster = postmaster(&mut client);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    let warm = send(&runtime, &addrs, connections, &warmup);
    let tck = clk_tck();
    let cpu = |collectors: &[Child]| -> Vec<f64> {
        let mut v: Vec<f64> = collectors.iter().map(|c| ticks(c.id(), false) as f64 / tck).collect();
        v.push(pg_ticks(postmaster) as f64 / tck);
        v.push(ticks(std::process::id(), false) as f64 / tck);
        v
    };
    let before = cpu(&collectors);
    let t = kycd_protocol::clock::monotonic();
    let mut sent = send(&runtime, &addrs, connections, &timed);
    let wall = t.elapsed().as_secs_f64();
    let after = cpu(&collectors);
    let used: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();

    let batches = timed.len() as f64;
    let rate = batches / wall;
    sent.latencies_us.sort_unstable();
    println!(
        "warm-up: {} batches ({} retried); timed: {} simulated minutes, {} batches over {connections} connections in {wall:.1} s",
        warmup.len(),
        warm.retries,
        minutes,
        timed.len()
    );
    println!(
        "achieved {rate:.0} batches/s; real time needs {REAL_TIME:.1}/s: headroom factor {:.2}x",
        rate / REAL_TIME
    );
    println!(
        "latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} retries (503)",
        percentile(&sent.latencies_us, 0.5),
        percentile(&sent.latencies_us, 0.99),
        percentile(&sent.latencies_us, 1.0),
        sent.retries
    );
    let names = ["collector A", "collector B", "PostgreSQL", "load generator"];
    let total: f64 = used.iter().sum();
    for (name, s) in names.iter().zip(&used) {
        println!(
            "CPU {name:>14}: {s:7.1} s = {:.2} cores, {:4.1} % of the CPU used, {:.0} us per batch",
            s / wall,
            100.0 * s / total,
            s * 1e6 / batches
        );
    }
    println!(
        "CPU all: {total:.1} s over {wall:.1} s = {:.2} of {} cores",
        total / wall,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let collectors_s = used[0] + used[1];
    println!(
        "sizing: {:.0} batches per collector CPU-second, {:.0} per PostgreSQL CPU-second ({:.2} ms PG CPU per batch)",
        batches / collectors_s,
        batches / used[2],
        used[2] * 1e3 / batches
    );

    for c in &mut collectors {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let windows: i64 = client.query_one("SELECT count(*) FROM records", &[]).unwrap().get(0);
    let expected = warmup.len() + timed.len();
    println!("records: {windows} rows, {expected} batches sent");
    assert_eq!(usize::try_from(windows).unwrap(), expected, "one window per batch sent");
    let store = kycd_collector::PgStore::open(&url).unwrap();
    let checks = store.rollup_check().unwrap();
    let differences: usize = checks.iter().map(|c| c.differences).sum();
    println!("rollups check: {} tables, {differences} differences", checks.len());
    assert_eq!(differences, 0, "{checks:#?}");
    sizes(&mut client, windows);
}

/// Database bytes per window: raw windows (every partition of `records`, indexes and TOAST
/// included), the roll-up tables, and the whole database.
fn sizes(client: &mut postgres::Client, windows: i64) {
    client.batch_execute("VACUUM ANALYZE").unwrap();
    let records: i64 = client
        .query_one(
            "SELECT (pg_total_relation_size('records') + COALESCE((SELECT sum(pg_total_relation_size(inhrelid))
                 FROM pg_inherits WHERE inhparent = 'records'::regclass), 0))::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    let rollups: Vec<(String, i64, i64)> = client
        .query(
            "SELECT c.relname, pg_total_relation_size(c.oid), c.reltuples::bigint FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND c.relname LIKE 'rollup\\_%' AND n.nspname = current_schema()
             ORDER BY 2 DESC",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let database: i64 = client.query_one("SELECT pg_database_size(current_database())", &[]).unwrap().get(0);
    let per = |b: i64| b as f64 / windows as f64;
    let rollup_total: i64 = rollups.iter().map(|r| r.1).sum();
    println!(
        "bytes per window: records {:.0}, roll-ups {:.0}, database {:.0}",
        per(records),
        per(rollup_total),
        per(database)
    );
    for (name, bytes, rows) in rollups {
        println!("   {name:>22}: {bytes:>11} B, ~{rows} rows");
    }
}
