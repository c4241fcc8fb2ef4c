//! Shared helpers of the collector's integration tests: a collector served in-process on
//! 127.0.0.1:0 over a real database (a SQLite file, or a PostgreSQL database on the test
//! cluster of `kycd_test_support::pg`), a minimal hyper HTTP/1.1 client, and signed batches.
//!
//! Tests that must hold on both backends are written once, as `async fn name(db: TestDb)`,
//! and listed in [`backend_tests!`], which makes a `sqlite::name` and a `postgres::name` test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use kycd_collector::{Ingestor, Limits, ReportStore};
use kycd_protocol::{
    Algorithm, EstimationMethod, PrivateJwk, ReportBatch, UsageRecord, UsageWindow, REPORT_SIGNATURE_TYP,
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use kycd_test_support::pg;

pub use pg::off_runtime;

/// Makes, for each listed `async fn name(db: TestDb)`, the tests `sqlite::name` and
/// `postgres::name` (the latter skips loudly where no PostgreSQL can be had).
#[allow(unused_macros)]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::common::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = crate::common::TestDb::postgres(stringify!($name)) else { return };
                    super::$name(db).await;
                }
            )*
        }
    };
}

/// The database of one test: a SQLite file in a temp dir, or a fresh PostgreSQL database.
#[derive(Debug)]
pub struct TestDb {
    /// The URL `open_store` and `--db` take.
    pub url: String,
    dir: tempfile::TempDir,
    pg: Option<pg::PgDb>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kycd.db").display());
        TestDb { url, dir, pg: None }
    }

    /// `None` (the test skips) when no PostgreSQL server can be had.
    pub fn postgres(test: &str) -> Option<TestDb> {
        let pg = pg::fresh_database(test)?;
        Some(TestDb { url: pg.url.clone(), dir: tempfile::tempdir().unwrap(), pg: Some(pg) })
    }

    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    /// The SQLite file (SQLite only).
    pub fn sqlite_path(&self) -> PathBuf {
        assert!(self.pg.is_none());
        self.dir.path().join("kycd.db")
    }

    /// The PostgreSQL database (PostgreSQL only).
    pub fn pg(&self) -> &pg::PgDb {
        self.pg.as_ref().unwrap()
    }

    /// A scratch directory that lives as long as the database.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Opens the store (off the async runtime).
    pub fn open(&self) -> Arc<dyn ReportStore> {
        off_runtime(|| kycd_collector::open_store(&self.url).unwrap())
    }

    /// Opens the store with every storage trait (off the async runtime).
    pub fn storage(&self) -> Arc<dyn kycd_collector::Storage> {
        off_runtime(|| kycd_collector::open_store(&self.url).unwrap())
    }
}

/// A collector running in this process.
pub struct Collector {
    pub addr: SocketAddr,
    pub store: Arc<dyn ReportStore>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), kycd_collector::http::ServerError>>,
}

impl Collector {
    pub async fn start(db: &TestDb, limits: Limits) -> Collector {
        let store = db.open();
        let ingestor = Arc::new(Ingestor::new(store.clone(), limits));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kycd_collector::http::run(listener, ingestor, shutdown.clone()));
        Collector { addr, store, shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    pub fn enroll(&self, key: &PrivateJwk) {
        off_runtime(|| self.store.enroll_host(key.kid(), &key.public_key(), 0).unwrap());
    }

    /// The stored ranges of the host's first enrollment epoch.
    pub fn ranges(&self, host: &str) -> Vec<(u64, u64)> {
        self.ranges_in(host, 1)
    }

    pub fn ranges_in(&self, host: &str, epoch: u64) -> Vec<(u64, u64)> {
        off_runtime(|| self.store.stored_ranges(host, epoch).unwrap())
    }

    /// The acked seq of the host's first enrollment epoch.
    pub fn acked(&self, host: &str) -> u64 {
        self.acked_in(host, 1)
    }

    pub fn acked_in(&self, host: &str, epoch: u64) -> u64 {
        off_runtime(|| self.store.acked_seq(host, epoch).unwrap())
    }
}

pub fn host_key(host: &str) -> PrivateJwk {
    PrivateJwk::generate(Algorithm::EdDSA, host).unwrap()
}

pub fn window(start: i64) -> UsageWindow {
    UsageWindow {
        tenant: Some("tenant-a".into()),
        workload: "cgroup:/machine.slice/vm-1.scope".into(),
        foreign_person: true,
        foreign_status: None,
        start,
        end: start + 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops: 1.5e17,
        ops_lower: None,
        ops_upper: None,
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: 7.9e15,
        method: EstimationMethod::GpmTensor,
        training_like: true,
        merged_windows: 1,
    }
}

/// Where the windows of [`record`] start: three days ago (minute-aligned, fixed for the test
/// process so a resent record is the same record). Ingest accepts windows that end by the
/// receive time (plus skew) and start at most a week before the host's enrollment, which the
/// tests do now or at time 0.
pub fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| (kycd_protocol::clock::unix_now() - 3 * 86_400) / 60 * 60)
}

/// The earliest prune cut-off that takes the windows ending by `t`: `t` on SQLite; on
/// PostgreSQL, which drops whole months of records, the first second (UTC) of the month
/// after the one `t` falls in.
pub fn cutoff_after(db: &TestDb, t: i64) -> i64 {
    if !db.is_postgres() {
        return t;
    }
    let date = time::OffsetDateTime::from_unix_timestamp(t).unwrap().date();
    let (year, month) = match date.month() {
        time::Month::December => (date.year() + 1, time::Month::January),
        month => (date.year(), month.next()),
    };
    time::Date::from_calendar_date(year, month, 1).unwrap().midnight().assume_utc().unix_timestamp()
}

/// Record `seq`: the window of minute `seq` after [`base`].
pub fn record(seq: u64) -> UsageRecord {
    UsageRecord { seq, last_seq: None, window: window(base() + 60 * i64::try_from(seq).unwrap()) }
}

pub fn batch(host: &str, records: Vec<UsageRecord>) -> ReportBatch {
    ReportBatch { host_id: host.into(), sent_at: base(), records }
}

/// Stores `windows` as host `host`'s records 1.. through ingest validation (admitted at a
/// fixed time from a host enrolled at 0).
pub fn store_windows(store: &dyn kycd_collector::Storage, host: &str, windows: Vec<UsageWindow>) {
    let records: Vec<UsageRecord> = windows
        .into_iter()
        .zip(1..)
        .map(|(window, seq)| UsageRecord { seq, last_seq: None, window })
        .collect();
    let admission = kycd_collector::ingest::Admission { received_at: 2_000_000_000, enrolled_at: 0 };
    let valid =
        kycd_collector::ingest::validate_batch(batch(host, records), &Limits::default(), admission).unwrap();
    store.insert_batch(host, 1, &valid, 0).unwrap();
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

/// The SQLite file of a test that manages its own store.
pub fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("kycd.db")
}

/// The agent's binaries (`kycd`, `kycctl`), built once per test binary: they belong to
/// another package of the workspace, which `cargo test -p kycd-collector` alone would not
/// build.
pub fn agent_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "kycd", "--bin", "kycd", "--bin", "kycctl"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p kycd failed");
    });
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_kycd-collector")).with_file_name(name);
    assert!(path.exists(), "{} missing", path.display());
    path
}
