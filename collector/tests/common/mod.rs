//! Shared helpers of the collector's integration tests: a collector served in-process on
//! 127.0.0.1:0 over a real SQLite file, a minimal hyper HTTP/1.1 client, and signed batches.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use kycd_collector::{Ingestor, Limits, ReportStore as _, SqliteStore};
use kycd_protocol::{
    Algorithm, EstimationMethod, PrivateJwk, ReportBatch, UsageRecord, UsageWindow, REPORT_SIGNATURE_TYP,
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A collector running in this process.
pub struct Collector {
    pub addr: SocketAddr,
    pub store: Arc<SqliteStore>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), kycd_collector::server::ServerError>>,
}

impl Collector {
    pub async fn start(db: &Path, limits: Limits) -> Collector {
        let store = Arc::new(SqliteStore::open(db).unwrap());
        let ingestor = Arc::new(Ingestor::new(store.clone(), limits));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kycd_collector::server::run(listener, ingestor, shutdown.clone()));
        Collector { addr, store, shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    pub fn enroll(&self, key: &PrivateJwk) {
        self.store.enroll_host(key.kid(), &key.public_key(), 0).unwrap();
    }

    pub fn ranges(&self, host: &str) -> Vec<(u64, u64)> {
        self.store.stored_ranges(host).unwrap()
    }
}

pub fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("kycd.db")
}

pub fn host_key(host: &str) -> PrivateJwk {
    PrivateJwk::generate(Algorithm::EdDSA, host).unwrap()
}

pub fn window(start: i64) -> UsageWindow {
    UsageWindow {
        tenant: Some("tenant-a".into()),
        workload: "cgroup:/machine.slice/vm-1.scope".into(),
        foreign_person: true,
        start,
        end: start + 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops: 1.5e17,
        peak_flops: 7.9e15,
        method: EstimationMethod::GpmTensor,
        training_like: true,
        merged_windows: 1,
    }
}

pub fn record(seq: u64) -> UsageRecord {
    UsageRecord { seq, last_seq: None, window: window(1_800_000_000 + 60 * i64::try_from(seq).unwrap()) }
}

pub fn batch(host: &str, records: Vec<UsageRecord>) -> ReportBatch {
    ReportBatch { host_id: host.into(), sent_at: 1_800_000_000, records }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub fn gzip_best(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The (gzip body, signature) of an upload of `batch` signed with `key`.
pub fn signed(batch: &ReportBatch, key: &PrivateJwk) -> (Vec<u8>, String) {
    let body = gzip(&serde_json::to_vec(batch).unwrap());
    let sig = kycd_protocol::sign_detached(&body, REPORT_SIGNATURE_TYP, key);
    (body, sig)
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or("")
    }
    pub fn acked(&self) -> u64 {
        assert_eq!(self.status, 200, "{:?}", self.body);
        self.body["acked_seq"].as_u64().unwrap()
    }
}

/// Sends one HTTP/1.1 request; `headers` are added as given.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", "collector");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Reply { status, headers, body }
}

/// POSTs a report body with its signature, as the agent's uploader does.
pub async fn upload(addr: SocketAddr, body: Vec<u8>, signature: &str) -> Reply {
    let headers =
        [("content-type", "application/json"), ("content-encoding", "gzip"), ("x-kycd-signature", signature)];
    request(addr, "POST", "/v1/reports", &headers, body).await
}

/// Signs and uploads `batch`.
pub async fn send(addr: SocketAddr, batch: &ReportBatch, key: &PrivateJwk) -> Reply {
    let (body, sig) = signed(batch, key);
    upload(addr, body, &sig).await
}
