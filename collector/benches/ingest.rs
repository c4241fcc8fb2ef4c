//! Ingest throughput of signed 1,000-record gzip batches into SQLite, end to end, against a
//! raw batched SQLite insert of the same rows in the same run.
//!
//!     cargo bench -p kycd-collector --bench ingest
//!
//! - `pipeline`: `Ingestor::ingest` (what the HTTP handler runs on the blocking pool):
//!   signature verification over the gzip body, capped inflate, strict JSON parse,
//!   validation, idempotent insert and ack advance, one transaction per batch.
//! - `http`: the same through the real server over loopback TCP (hyper client, one
//!   connection per batch as the agent's uploader opens them).
//! - `raw`: a prepared INSERT of the same rows (all columns, body_json included), one
//!   transaction per 1,000 rows, on the same schema and pragmas (WAL, synchronous=FULL).
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
use kycd_collector::{Ingestor, Limits, ReportStore as _, SqliteStore, ValidRecord};
use kycd_protocol::{
    Algorithm, EstimationMethod, PrivateJwk, ReportBatch, UsageRecord, UsageWindow, REPORT_SIGNATURE_TYP,
};

const RECORDS_PER_BATCH: u64 = 1_000;
const BATCHES: u64 = 30;
const ROUNDS: usize = 5;
const HOST: &str = "bench-host";

fn record(seq: u64) -> UsageRecord {
    UsageRecord {
        seq,
        last_seq: None,
        window: UsageWindow {
            tenant: Some(format!("tenant-{}", seq % 97)),
            workload: format!("cgroup:/machine.slice/vm-{}.scope", seq % 13),
            foreign_person: seq % 3 == 0,
            start: 1_800_000_000 + i64::try_from(seq).unwrap() * 60,
            end: 1_800_000_060 + i64::try_from(seq).unwrap() * 60,
            gpu_seconds: 480.0,
            gpus: 8,
            max_concurrent_gpus: 8,
            estimated_ops: 1.234_567e17 + seq as f64,
            peak_flops: 7.9e15,
            method: EstimationMethod::GpmTensor,
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

fn store(dir: &Path, name: &str, key: &PrivateJwk) -> Arc<SqliteStore> {
    let store = Arc::new(SqliteStore::open(dir.join(name)).unwrap());
    store.enroll_host(HOST, &key.public_key(), 0).unwrap();
    store
}

fn pipeline(dir: &Path, round: usize, key: &PrivateJwk, uploads: &[(Vec<u8>, String)]) -> Duration {
    let store = store(dir, &format!("pipeline-{round}.db"), key);
    let ingestor = Ingestor::new(store.clone(), Limits::default());
    let t = Instant::now();
    for (body, sig) in uploads {
        ingestor.ingest(sig.as_bytes(), body, 1_800_000_000).unwrap();
    }
    let elapsed = t.elapsed();
    assert_eq!(store.acked_seq(HOST).unwrap(), BATCHES * RECORDS_PER_BATCH);
    elapsed
}

fn http(dir: &Path, round: usize, key: &PrivateJwk, uploads: &[(Vec<u8>, String)]) -> Duration {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = store(dir, &format!("http-{round}.db"), key);
        let ingestor = Arc::new(Ingestor::new(store.clone(), Limits::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(kycd_collector::server::run(listener, ingestor, shutdown.clone()));
        let t = Instant::now();
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
        assert_eq!(store.acked_seq(HOST).unwrap(), BATCHES * RECORDS_PER_BATCH);
        shutdown.cancel();
        server.await.unwrap().unwrap();
        elapsed
    })
}

fn raw(dir: &Path, round: usize, rows: &[Vec<ValidRecord>]) -> Duration {
    let mut conn = rusqlite::Connection::open(dir.join(format!("raw-{round}.db"))).unwrap();
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "cache_size", -65536).unwrap();
    for sql in kycd_collector::sqlite::MIGRATIONS {
        conn.execute_batch(sql).unwrap();
    }
    let t = Instant::now();
    for batch in rows {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    r#"INSERT INTO records (host_id, seq, last_seq, tenant, workload, start, "end",
                        gpu_seconds, gpus, max_concurrent_gpus, estimated_ops, peak_flops, method,
                        training_like, foreign_person, merged_windows, body_json, received_at)
                       VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"#,
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
                        kycd_collector::sqlite::method_name(w.method),
                        w.training_like,
                        w.foreign_person,
                        w.merged_windows,
                        v.body_json,
                        1_800_000_000i64,
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    t.elapsed()
}

/// Where the pipeline's time goes: each stage alone over the same uploads (ms per batch).
fn stages(dir: &Path, key: &PrivateJwk, uploads: &[(Vec<u8>, String)]) {
    let jwks = kycd_protocol::Jwks::from_keys([key.public_key()]).unwrap();
    let per_batch = |t: Instant| t.elapsed().as_secs_f64() * 1e3 / uploads.len() as f64;
    let t = Instant::now();
    for (body, sig) in uploads {
        kycd_protocol::verify_detached(sig.as_bytes(), body, &jwks, REPORT_SIGNATURE_TYP).unwrap();
    }
    let verify = per_batch(t);
    let t = Instant::now();
    let json: Vec<Vec<u8>> =
        uploads.iter().map(|(b, _)| kycd_collector::ingest::gunzip_capped(b, 16 << 20).unwrap()).collect();
    let gunzip = per_batch(t);
    let t = Instant::now();
    let parsed: Vec<ReportBatch> =
        json.iter().map(|j| kycd_collector::ingest::parse_batch(j).unwrap()).collect();
    let parse = per_batch(t);
    let t = Instant::now();
    let valid: Vec<Vec<ValidRecord>> = parsed
        .into_iter()
        .map(|b| kycd_collector::ingest::validate_batch(b, &Limits::default()).unwrap())
        .collect();
    let validate = per_batch(t);
    let store = store(dir, "stages.db", key);
    let t = Instant::now();
    for v in &valid {
        store.insert_batch(HOST, v, 0).unwrap();
    }
    let insert = per_batch(t);
    println!(
        "   stages: verify {verify:.2} + gunzip {gunzip:.2} + parse {parse:.2} + validate {validate:.2} + insert {insert:.2} ms per batch"
    );
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

fn main() {
    let key = PrivateJwk::generate(Algorithm::EdDSA, HOST).unwrap();
    let batches = batches();
    let uploads: Vec<_> = batches.iter().map(|b| signed(b, &key)).collect();
    let rows: Vec<Vec<ValidRecord>> = batches
        .iter()
        .map(|b| kycd_collector::ingest::validate_batch(b.clone(), &Limits::default()).unwrap())
        .collect();
    let compressed: usize = uploads.iter().map(|(b, _)| b.len()).sum();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let total = (BATCHES * RECORDS_PER_BATCH) as f64;
    println!(
        "{BATCHES} batches x {RECORDS_PER_BATCH} records, {:.0} KiB gzip per batch, median of {ROUNDS} rounds, db in {}",
        compressed as f64 / BATCHES as f64 / 1024.0,
        dir.path().display()
    );
    // Modes interleaved round by round, so that load from other processes on a shared
    // machine falls on all three alike; the ratios are medians of per-round ratios.
    let mut times: [Vec<Duration>; 3] = Default::default();
    for r in 0..ROUNDS {
        times[0].push(raw(dir.path(), r, &rows));
        times[1].push(pipeline(dir.path(), r, &key, &uploads));
        times[2].push(http(dir.path(), r, &key, &uploads));
    }
    for (name, t) in ["raw", "pipeline", "http"].iter().zip(&times) {
        let t = median(t.clone());
        let rate = total / t.as_secs_f64();
        let per_batch = t.as_secs_f64() * 1e3 / BATCHES as f64;
        println!("{name:>9}: {rate:>10.0} records/s  ({per_batch:.2} ms per 1,000-record batch)");
    }
    for (name, t) in ["pipeline", "http"].iter().zip(&times[1..]) {
        let mut ratios: Vec<f64> =
            times[0].iter().zip(t).map(|(raw, mode)| raw.as_secs_f64() / mode.as_secs_f64()).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "{name:>9} / raw = {:.2} (median of {ROUNDS} rounds; per round {ratios:.2?})",
            ratios[ratios.len() / 2]
        );
    }
    stages(dir.path(), &key, &uploads);
}
