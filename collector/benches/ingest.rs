//! Ingest throughput of signed 1,000-record gzip batches into SQLite, end to end, against a
//! raw batched SQLite insert of the same rows in the same run — and the same on PostgreSQL.
//!
//!     cargo bench -p kycd-collector --bench ingest
//!
//! PostgreSQL: `KYCD_BENCH_POSTGRES_URL` (a role that may `CREATE DATABASE`), else a private
//! cluster started for the run (kycd-test-support `pg`: initdb in /tmp, loopback, PostgreSQL's
//! default durability, i.e. fsync at every commit like SQLite's `synchronous=FULL`), else the
//! PostgreSQL rows are skipped. `KYCD_BENCH_POSTGRES=0` skips them too.
//!
//! - `pipeline`: `Ingestor::ingest` (what the HTTP handler runs on the blocking pool):
//!   signature verification over the gzip body, capped inflate, strict JSON parse,
//!   validation, idempotent insert and ack advance, one transaction per batch.
//! - `http`: the same through the real server over loopback TCP (hyper client, one
//!   connection per batch as the agent's uploader opens them).
//! - `raw`: a prepared INSERT of the same rows (all columns, body_json included), one
//!   transaction per 1,000 rows, on the same schema and pragmas (WAL, synchronous=FULL). On
//!   PostgreSQL one `INSERT … SELECT FROM UNNEST(arrays)` per 1,000 rows (a per-row INSERT
//!   would measure loopback round trips), one transaction each.
//!
//! Batches are built, serialized, compressed and signed before timing (that is the agent's
//! work). Each mode runs on a fresh database file under the target directory, not /tmp
//! (often tmpfs, where fsync costs nothing). Targets (issue): ≥ 100,000 records/s end to
//! end and ≥ 0.3× raw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use kycd_collector::{Ingestor, Limits, ReportStore, SqliteStore, ValidRecord};
use kycd_protocol::{
    Algorithm, EstimationMethod, PrivateJwk, ReportBatch, UsageRecord, UsageWindow, REPORT_SIGNATURE_TYP,
};

const RECORDS_PER_BATCH: u64 = 1_000;
const BATCHES: u64 = 30;
/// The windows are from 2023 (1.7e9 on), the host enrolled at 0: received at 1.8e9 (as the
/// pipeline is called) or now (over HTTP), every window passes the time bounds.
const ADMISSION: kycd_collector::ingest::Admission =
    kycd_collector::ingest::Admission { received_at: 1_800_000_000, enrolled_at: 0 };
const ROUNDS: usize = 5;
const HOST: &str = "bench-host";

use kycd_test_support::bench_stats::median;
use kycd_test_support::pg;

/// Where a mode's fresh database goes.
enum Backend {
    Sqlite(std::path::PathBuf),
    /// The admin URL of a PostgreSQL server.
    Postgres(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "pg",
        }
    }

    /// A fresh store named `name`, with the bench host enrolled.
    fn store(&self, name: &str, key: &PrivateJwk) -> Arc<dyn ReportStore> {
        let store: Arc<dyn ReportStore> = match self {
            Backend::Sqlite(dir) => Arc::new(SqliteStore::open(dir.join(format!("{name}.db"))).unwrap()),
            Backend::Postgres(admin) => {
                Arc::new(kycd_collector::PgStore::open(&self.pg_database(admin, name)).unwrap())
            }
        };
        store.enroll_host(HOST, &key.public_key(), 0).unwrap();
        store
    }

    /// Creates database `name` (dropping an old one) and returns its URL.
    fn pg_database(&self, admin: &str, name: &str) -> String {
        let name = name.replace('-', "_");
        let mut client = postgres::Client::connect(admin, postgres::NoTls).unwrap();
        // Two statements: DROP DATABASE cannot run in the implicit transaction of a
        // multi-statement query.
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
        client.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        pg::with_dbname(admin, &name)
    }
}

/// The host's tenants and whether they run side by side. By default 97 tenants take turns, a
/// minute each: every window is a busy segment and a capacity bucket of its own (the
/// roll-ups' worst case). `KYCD_BENCH_TENANTS=N`: N VMs running without pause, one window
/// of each every minute (a host's spool after an outage).
fn tenants() -> (u64, bool) {
    static TENANTS: std::sync::OnceLock<(u64, bool)> = std::sync::OnceLock::new();
    *TENANTS.get_or_init(|| {
        match std::env::var("KYCD_BENCH_TENANTS").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0) {
            Some(n) => (n, true),
            None => (97, false),
        }
    })
}

/// The minute of record `seq`.
fn minute(seq: u64) -> i64 {
    let (n, side_by_side) = tenants();
    i64::try_from(if side_by_side { seq / n } else { seq }).unwrap()
}

fn record(seq: u64) -> UsageRecord {
    UsageRecord {
        seq,
        last_seq: None,
        window: UsageWindow {
            tenant: Some(format!("tenant-{}", seq % tenants().0)),
            workload: format!("cgroup:/machine.slice/vm-{}.scope", seq % 13),
            foreign_person: seq % 3 == 0,
            foreign_status: None,
            start: 1_700_000_000 + minute(seq) * 60,
            end: 1_700_000_060 + minute(seq) * 60,
            gpu_seconds: 480.0,
            gpus: 8,
            max_concurrent_gpus: 8,
            estimated_ops: 1.234_567e17 + seq as f64,
            // What an agent with per-pipe sampling sends: all three figures.
            ops_lower: Some(0.617e17),
            ops_upper: Some(2.469e17),
            shared_gpu_seconds: if seq % 5 == 0 { 60.0 } else { 0.0 },
            guest_gap_gpu_seconds: 0.0,
            peak_flops: 7.9e15,
            method: EstimationMethod::GpmPipes,
            training_like: seq % 2 == 0,
            merged_windows: 1,
        },
    }
}

fn batches() -> Vec<ReportBatch> {
    (0..BATCHES)
        .map(|b| ReportBatch {
            host_id: HOST.into(),
            sent_at: 1_800_000_000,
            records: (1..=RECORDS_PER_BATCH).map(|i| record(b * RECORDS_PER_BATCH + i)).collect(),
        })
        .collect()
}

fn signed(batch: &ReportBatch, key: &PrivateJwk) -> (Vec<u8>, String) {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&serde_json::to_vec(batch).unwrap()).unwrap();
    let body = enc.finish().unwrap();
    let sig = kycd_protocol::sign_detached(&body, REPORT_SIGNATURE_TYP, key);
    (body, sig)
}

fn pipeline(backend: &Backend, round: usize, key: &PrivateJwk, uploads: &[(Vec<u8>, String)]) -> Duration {
    let store = backend.store(&format!("pipeline-{round}"), key);
    let ingestor = Ingestor::new(store.clone(), Limits::default());
    let t = kycd_protocol::clock::monotonic();
    for (body, sig) in uploads {
        ingestor.ingest(sig.as_bytes(), body, 1_800_000_000).unwrap();
    }
    let elapsed = t.elapsed();
    assert_eq!(store.acked_seq(HOST, 1).unwrap(), BATCHES * RECORDS_PER_BATCH);
    elapsed
}

fn http(backend: &Backend, round: usize, key: &PrivateJwk, uploads: &[(Vec<u8>, String)]) -> Duration {
    // The store is opened and checked off the runtime: the PostgreSQL client blocks on a
    // runtime of its own.
    let store = backend.store(&format!("http-{round}"), key);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let elapsed = runtime.block_on(async {
        let ingestor = Arc::new(Ingestor::new(store.clone(), Limits::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(kycd_collector::http::run(listener, ingestor, shutdown.clone()));
        let t = kycd_protocol::clock::monotonic();
        for (body, sig) in uploads {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::post("/v1/reports")
                .header("host", "collector")
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .header("x-kycd-signature", sig.as_str())
                .body(Full::new(hyper::body::Bytes::from(body.clone())))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        }
        let elapsed = t.elapsed();
        shutdown.cancel();
        server.await.unwrap().unwrap();
        elapsed
    });
    drop(runtime);
    assert_eq!(store.acked_seq(HOST, 1).unwrap(), BATCHES * RECORDS_PER_BATCH);
    elapsed
}

fn raw(backend: &Backend, round: usize, rows: &[Vec<ValidRecord>]) -> Duration {
    match backend {
        Backend::Sqlite(dir) => raw_sqlite(dir, round, rows),
        Backend::Postgres(admin) => raw_pg(&backend.pg_database(admin, &format!("raw_{round}")), rows),
    }
}

fn raw_pg(url: &str, rows: &[Vec<ValidRecord>]) -> Duration {
    drop(kycd_collector::PgStore::open(url).unwrap()); // the schema
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let insert = client
        .prepare(
            r#"INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end",
                gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                training_like, foreign_person, merged_windows, body_json, ops_lower, ops_upper,
                shared_gpu_seconds, guest_gap_gpu_seconds, received_at)
            SELECT $1::text, 1, u.*, $22::bigint FROM UNNEST($2::bigint[], $3::bigint[], $4::text[],
                $5::text[], $6::bigint[], $7::bigint[], $8::float8[], $9::bigint[], $10::bigint[],
                $11::float8[], $12::float8[], $13::text[], $14::bool[], $15::bool[], $16::bigint[],
                $17::text[], $18::float8[], $19::float8[], $20::float8[], $21::float8[]) AS u"#,
        )
        .unwrap();
    // `records` is partitioned by month of "end" (migration 12) and the store makes a month's
    // partition when a batch first needs it; the raw insert gets its months made untimed.
    let ends: Vec<i64> = rows.iter().flatten().map(|v| v.record.window.end).collect();
    for row in client
        .query(
            "SELECT DISTINCT extract(epoch FROM m)::bigint, extract(epoch FROM m + interval '1 month')::bigint
             FROM (SELECT date_trunc('month', to_timestamp(e) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS m
                   FROM unnest($1::bigint[]) AS e) AS months",
            &[&ends],
        )
        .unwrap()
    {
        let (from, to): (i64, i64) = (row.get(0), row.get(1));
        client
            .batch_execute(&format!("CREATE TABLE raw_{from} PARTITION OF records FOR VALUES FROM ({from}) TO ({to})"))
            .unwrap();
    }
    let t = kycd_protocol::clock::monotonic();
    for batch in rows {
        let col = |f: &dyn Fn(&ValidRecord) -> i64| batch.iter().map(f).collect::<Vec<i64>>();
        let colf = |f: &dyn Fn(&ValidRecord) -> f64| batch.iter().map(f).collect::<Vec<f64>>();
        let seq = col(&|v| i64::try_from(v.record.seq).unwrap());
        let last = col(&|v| i64::try_from(v.last_seq).unwrap());
        let tenant: Vec<Option<&str>> = batch.iter().map(|v| v.record.window.tenant.as_deref()).collect();
        let workload: Vec<&str> = batch.iter().map(|v| v.record.window.workload.as_str()).collect();
        let start = col(&|v| v.record.window.start);
        let end = col(&|v| v.record.window.end);
        let gpu_seconds = colf(&|v| v.record.window.gpu_seconds);
        let gpus = col(&|v| i64::from(v.record.window.gpus));
        let max_gpus = col(&|v| i64::from(v.record.window.max_concurrent_gpus));
        let ops = colf(&|v| v.record.window.estimated_ops);
        let peak = colf(&|v| v.record.window.peak_flops);
        let method: Vec<&str> = batch.iter().map(|v| v.record.window.method.as_str()).collect();
        let training: Vec<bool> = batch.iter().map(|v| v.record.window.training_like).collect();
        let foreign: Vec<bool> = batch.iter().map(|v| v.record.window.foreign_person).collect();
        let merged = col(&|v| i64::from(v.record.window.merged_windows));
        let body: Vec<&str> = batch.iter().map(|v| v.body_json.as_str()).collect();
        let lower = colf(&|v| v.record.window.lower_ops());
        let upper = colf(&|v| v.record.window.upper_ops());
        let shared = colf(&|v| v.record.window.shared_gpu_seconds);
        let guest_gap = colf(&|v| v.record.window.guest_gap_gpu_seconds);
        let mut tx = client.transaction().unwrap();
        tx.execute(
            &insert,
            &[
                &HOST,
                &seq,
                &last,
                &tenant,
                &workload,
                &start,
                &end,
                &gpu_seconds,
                &gpus,
                &max_gpus,
                &ops,
                &peak,
                &method,
                &training,
                &foreign,
                &merged,
                &body,
                &lower,
                &upper,
                &shared,
                &guest_gap,
                &1_800_000_000i64,
            ],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    t.elapsed()
}

fn raw_sqlite(dir: &Path, round: usize, rows: &[Vec<ValidRecord>]) -> Duration {
    let mut conn = rusqlite::Connection::open(dir.join(format!("raw-{round}.db"))).unwrap();
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "cache_size", -65536).unwrap();
    for sql in kycd_collector::store::sqlite::MIGRATIONS {
        conn.execute_batch(sql).unwrap();
    }
    let t = kycd_protocol::clock::monotonic();
    for batch in rows {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    r#"INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at,
                        ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds)
                       VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                               ?19, ?20, ?21, ?22)"#,
                )
                .unwrap();
            for v in batch {
                let w = &v.record.window;
                insert
                    .execute(rusqlite::params![
                        HOST,
                        i64::try_from(v.record.seq).unwrap(),
                        i64::try_from(v.last_seq).unwrap(),
                        w.tenant,
                        w.workload,
                        w.start,
                        w.end,
                        w.gpu_seconds,
                        w.gpus,
                        w.max_concurrent_gpus,
                        w.estimated_ops,
                        w.peak_flops,
                        w.method.as_str(),
                        w.training_like,
                        w.foreign_person,
                        w.merged_windows,
                        v.body_json,
                        1_800_000_000i64,
                        w.lower_ops(),
                        w.upper_ops(),
                        w.shared_gpu_seconds,
                        w.guest_gap_gpu_seconds,
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    t.elapsed()
}

/// Where the pipeline's time goes: each stage alone over the same uploads (ms per batch).
fn stages(backend: &Backend, key: &PrivateJwk, uploads: &[(Vec<u8>, String)]) {
    let jwks = kycd_protocol::Jwks::from_keys([key.public_key()]).unwrap();
    let per_batch = |t: Instant| t.elapsed().as_secs_f64() * 1e3 / uploads.len() as f64;
    let t = kycd_protocol::clock::monotonic();
    for (body, sig) in uploads {
        kycd_protocol::verify_detached(sig.as_bytes(), body, &jwks, REPORT_SIGNATURE_TYP).unwrap();
    }
    let verify = per_batch(t);
    let t = kycd_protocol::clock::monotonic();
    let json: Vec<Vec<u8>> =
        uploads.iter().map(|(b, _)| kycd_collector::ingest::gunzip_capped(b, 16 << 20).unwrap()).collect();
    let gunzip = per_batch(t);
    let t = kycd_protocol::clock::monotonic();
    let parsed: Vec<ReportBatch> =
        json.iter().map(|j| kycd_collector::ingest::parse_batch(j).unwrap()).collect();
    let parse = per_batch(t);
    let t = kycd_protocol::clock::monotonic();
    let valid: Vec<Vec<ValidRecord>> = parsed
        .into_iter()
        .map(|b| kycd_collector::ingest::validate_batch(b, &Limits::default(), ADMISSION).unwrap())
        .collect();
    let validate = per_batch(t);
    let store = backend.store("stages", key);
    let t = kycd_protocol::clock::monotonic();
    for v in &valid {
        store.insert_batch(HOST, 1, v, 0).unwrap();
    }
    let insert = per_batch(t);
    println!(
        "   {} stages: verify {verify:.2} + gunzip {gunzip:.2} + parse {parse:.2} + validate {validate:.2} + insert {insert:.2} ms per batch",
        backend.name()
    );
}

fn main() {
    let key = PrivateJwk::generate(Algorithm::EdDSA, HOST).unwrap();
    let batches = batches();
    let uploads: Vec<_> = batches.iter().map(|b| signed(b, &key)).collect();
    let rows: Vec<Vec<ValidRecord>> = batches
        .iter()
        .map(|b| kycd_collector::ingest::validate_batch(b.clone(), &Limits::default(), ADMISSION).unwrap())
        .collect();
    let compressed: usize = uploads.iter().map(|(b, _)| b.len()).sum();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let total = (BATCHES * RECORDS_PER_BATCH) as f64;
    println!(
        "{BATCHES} batches x {RECORDS_PER_BATCH} records, {:.0} KiB gzip per batch, median of {ROUNDS} rounds, db in {}",
        compressed as f64 / BATCHES as f64 / 1024.0,
        dir.path().display()
    );
    let mut backends = vec![Backend::Sqlite(dir.path().to_path_buf())];
    let mut _cluster = None;
    if std::env::var("KYCD_BENCH_POSTGRES").as_deref() == Ok("0") {
        println!("PostgreSQL: skipped (KYCD_BENCH_POSTGRES=0)");
    } else if let Ok(url) = std::env::var("KYCD_BENCH_POSTGRES_URL") {
        println!("PostgreSQL: {}", kycd_collector::store::postgres::redact_url(&url));
        backends.push(Backend::Postgres(url));
    } else {
        match pg::Cluster::start(true) {
            Ok(cluster) => {
                println!(
                    "PostgreSQL: private cluster in {} (default durability: fsync per commit)",
                    cluster.dir.display()
                );
                backends.push(Backend::Postgres(cluster.url("postgres")));
                _cluster = Some(cluster);
            }
            Err(why) => println!("SKIP PostgreSQL: {why}"),
        }
    }
    // Modes and backends interleaved round by round, so that load from other processes on a
    // shared machine falls on all alike; the ratios are medians of per-round ratios.
    let modes = ["raw", "pipeline", "http"];
    let mut times: Vec<[Vec<Duration>; 3]> = backends.iter().map(|_| Default::default()).collect();
    for r in 0..ROUNDS {
        for (b, backend) in backends.iter().enumerate() {
            times[b][0].push(raw(backend, r, &rows));
            times[b][1].push(pipeline(backend, r, &key, &uploads));
            times[b][2].push(http(backend, r, &key, &uploads));
        }
    }
    for (backend, times) in backends.iter().zip(&times) {
        for (name, t) in modes.iter().zip(times) {
            let t = median(t.clone());
            let rate = total / t.as_secs_f64();
            let per_batch = t.as_secs_f64() * 1e3 / BATCHES as f64;
            println!(
                "{:>6} {name:>9}: {rate:>10.0} records/s  ({per_batch:.2} ms per 1,000-record batch)",
                backend.name()
            );
        }
        for (name, t) in modes[1..].iter().zip(&times[1..]) {
            let ratios = ratios(&times[0], t);
            println!(
                "{:>6} {name:>9} / raw = {:.2} (median of {ROUNDS} rounds; per round {ratios:.2?})",
                backend.name(),
                ratios[ratios.len() / 2]
            );
        }
    }
    if times.len() == 2 {
        for (m, name) in modes.iter().enumerate() {
            // PostgreSQL's rate over SQLite's = SQLite's time over PostgreSQL's.
            let ratios = ratios(&times[0][m], &times[1][m]);
            println!(
                "pg / sqlite {name:>9} = {:.2} (records/s ratio, median of {ROUNDS} rounds; per round {ratios:.2?})",
                ratios[ratios.len() / 2]
            );
        }
    }
    for backend in &backends {
        stages(backend, &key, &uploads);
    }
}

/// Per-round `a / b`, sorted.
fn ratios(a: &[Duration], b: &[Duration]) -> Vec<f64> {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a.as_secs_f64() / b.as_secs_f64()).collect();
    r.sort_by(f64::total_cmp);
    r
}
