//! The reporting pipeline over loopback: spool → uploader → a scripted in-test collector that
//! checks every request the way the real one must (detached signature over the exact gzip
//! body, host id, increasing seqs), answers 503 + Retry-After, partial acks, a permanent 400,
//! a lagging ack and a permanent 409; then the cursor, segments, `rejected/`, what the
//! rejections left for `kycctl status` and the audit log, and the modes of every state file
//! (0600) and directory (0700) are checked. And the spool on a tiny full tmpfs (root only).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use kycd::reporting::spool::{SharedSpool, Spool, SpoolError, SpoolOptions};
use kycd::reporting::upload::{UploadCounters, UploaderOptions};
use kycd_protocol::clock::{unix_now, SystemClock};
use kycd_protocol::{
    verify_detached, Algorithm, EstimationMethod, Jwks, PrivateJwk, ReportBatch, UsageWindow,
    REPORT_SIGNATURE_TYP,
};
use tokio_util::sync::CancellationToken;

fn window(workload: &str, start: i64) -> UsageWindow {
    UsageWindow {
        tenant: Some("tenant-1".into()),
        workload: workload.into(),
        foreign_person: true,
        foreign_status: None,
        start,
        end: start + 60,
        gpu_seconds: 120.0,
        gpus: 2,
        max_concurrent_gpus: 2,
        estimated_ops: 1e18,
        ops_lower: None,
        ops_upper: None,
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: 2e15,
        method: EstimationMethod::GpmTensor,
        training_like: false,
        merged_windows: 1,
    }
}

#[derive(Debug)]
struct Received {
    at: Instant,
    seqs: Vec<u64>,
}

#[derive(Clone)]
struct Collector {
    jwks: Arc<Jwks>,
    log: Arc<Mutex<Vec<Received>>>,
}

async fn reports(State(c): State<Collector>, headers: HeaderMap, body: Bytes) -> Response {
    let bad = |why: &str| (StatusCode::IM_A_TEAPOT, why.to_owned()).into_response();
    if headers.get("content-encoding").and_then(|v| v.to_str().ok()) != Some("gzip")
        || headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json")
    {
        return bad("headers");
    }
    let Some(sig) = headers.get("x-kycd-signature") else { return bad("no signature") };
    let header = match verify_detached(sig.as_bytes(), &body, &c.jwks, REPORT_SIGNATURE_TYP) {
        Ok(h) => h,
        Err(e) => return bad(&format!("signature: {e}")),
    };
    let mut json = Vec::new();
    if flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut json).is_err() {
        return bad("gzip");
    }
    let Ok(batch) = serde_json::from_slice::<ReportBatch>(&json) else { return bad("json") };
    if header.kid != batch.host_id || batch.host_id != "node-7" {
        return bad("host id");
    }
    let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
    if seqs.windows(2).any(|w| w[0] >= w[1]) || seqs.is_empty() {
        return bad("seqs not increasing");
    }
    let (first, last) = (seqs[0], seqs[seqs.len() - 1]);
    let n = {
        let mut log = c.log.lock().unwrap();
        log.push(Received { at: kycd_protocol::clock::monotonic(), seqs });
        log.len()
    };
    let ack = |acked_seq: u64| {
        (StatusCode::OK, axum::Json(serde_json::json!({"acked_seq": acked_seq}))).into_response()
    };
    match n {
        1 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], "busy").into_response(),
        // Stored all, but the contiguous count lags (acks out of order): the rest is resent.
        2 => ack(first + 4),
        3 => ack(last),
        4 => (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": "gpu_seconds out of range", "kind": "InvalidRecord"})),
        )
            .into_response(),
        // The collector never got the rejected seqs: its contiguous count stays below them.
        5 => ack(15),
        // A seq the collector holds with other content (e.g. a host re-enrolled without its
        // spool): permanent, like the 400.
        _ => (
            StatusCode::CONFLICT,
            axum::Json(
                serde_json::json!({"error": "seq 31 differs from the stored record", "kind": "SeqConflict"}),
            ),
        )
            .into_response(),
    }
}

async fn wait_for(spool: &SharedSpool, acked: u64) {
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(30);
    while spool.lock().unwrap().acked_seq() < acked {
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "cursor stuck at {}",
            spool.lock().unwrap().acked_seq()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_signed_batches_retries_rejects_and_acks() {
    let state = tempfile::tempdir().unwrap();
    let key = PrivateJwk::generate(Algorithm::EdDSA, "node-7").unwrap();
    let collector =
        Collector { jwks: Arc::new(Jwks::from_keys([key.public_key()]).unwrap()), log: Arc::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/v1/reports", post(reports)).with_state(collector.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let spool_dir = state.path().join("spool");
    let mut spool =
        Spool::open(&spool_dir, SpoolOptions { segment_max_bytes: 4096, max_bytes: 1 << 30 }).unwrap();
    for i in 0..25 {
        spool.append(window("cgroup:/a", i * 60)).unwrap();
    }
    let spool = Arc::new(Mutex::new(spool));
    let options = UploaderOptions {
        collector_url: format!("http://{addr}/"),
        ca_file: None,
        host_id: "node-7".into(),
        rejected_dir: state.path().join("rejected"),
        batch_max_records: 10,
        batch_max: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
    };
    let client = kycd::reporting::client::build_client(&options).unwrap();
    let committed = Arc::new(tokio::sync::Notify::new());
    let counters = Arc::new(UploadCounters::default());
    let stop = CancellationToken::new();
    let uploader = tokio::spawn(kycd::reporting::upload::run(
        Arc::clone(&spool),
        Arc::new(key),
        options,
        client,
        Arc::clone(&committed),
        Arc::clone(&counters),
        Arc::new(SystemClock),
        stop.clone(),
    ));
    wait_for(&spool, 25).await;
    for i in 25..30 {
        spool.lock().unwrap().append(window("cgroup:/a", i * 60)).unwrap();
    }
    committed.notify_one();
    wait_for(&spool, 30).await;
    for i in 30..35 {
        spool.lock().unwrap().append(window("cgroup:/a", i * 60)).unwrap();
    }
    committed.notify_one();
    wait_for(&spool, 35).await;
    stop.cancel();
    uploader.await.unwrap();
    server.abort();

    let log = collector.log.lock().unwrap();
    let batches: Vec<(u64, u64)> = log.iter().map(|r| (r.seqs[0], *r.seqs.last().unwrap())).collect();
    assert_eq!(batches, [(1, 10), (1, 10), (6, 15), (16, 25), (26, 30), (31, 35)]);
    assert!(log[1].at - log[0].at >= Duration::from_millis(950), "Retry-After honoured");
    drop(log);

    let rejected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("rejected/16-25.json")).unwrap()).unwrap();
    assert_eq!(rejected["status"], 400);
    assert_eq!(rejected["reason"]["kind"], "InvalidRecord");
    assert_eq!(rejected["records"].as_array().unwrap().len(), 10);
    assert_eq!(rejected["records"][0]["seq"], 16);
    let conflict: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("rejected/31-35.json")).unwrap()).unwrap();
    assert_eq!(
        (conflict["status"].as_u64(), conflict["reason"]["kind"].as_str()),
        (Some(409), Some("SeqConflict"))
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(counters.batches_rejected.load(Relaxed), 2);
    assert_eq!(counters.records_rejected.load(Relaxed), 15);
    assert_eq!(counters.rejected_files.load(Relaxed), 2);
    assert_eq!(counters.retries.load(Relaxed), 1);
    // Visible: the last rejection (for `kycctl status`) and one audit event per batch.
    let last = counters.last_rejection.lock().unwrap().clone().unwrap();
    assert_eq!(
        (last.status, last.kind.as_str(), last.first_seq, last.last_seq),
        (409, "SeqConflict", 31, 35)
    );
    assert!(last.at > 0 && last.at <= unix_now());
    let queued: Vec<(u16, String, u64, u64, u64)> = counters
        .unrecorded_rejections
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.status, r.kind.clone(), r.first_seq, r.last_seq, r.records))
        .collect();
    assert_eq!(queued, [(400, "InvalidRecord".into(), 16, 25, 10), (409, "SeqConflict".into(), 31, 35, 5)]);
    // By kind: the 503 is `throttled`, the 400 and 409 `rejected`; nothing else failed.
    let failures = counters.failures.lock().unwrap().clone();
    assert_eq!(failures, [("rejected", 2), ("throttled", 1)].into_iter().collect());
    assert!(failures.keys().all(|k| kycd::reporting::upload::FAILURE_KINDS.contains(k)));
    assert_eq!(counters.records_ok.load(Relaxed), 10 + 10 + 5, "records in stored batches (resends count)");
    let last = counters.last_success_at.load(Relaxed);
    assert!(last > 0 && last <= unix_now(), "{last}");

    let cursor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spool_dir.join("cursor")).unwrap()).unwrap();
    assert_eq!(cursor["acked_seq"], 35);
    let mut spool = spool.lock().unwrap();
    assert_eq!(spool.segment_count(), 0, "every segment acknowledged and deleted");
    assert!(spool.read_from(1, 100).unwrap().is_empty());
    assert_eq!(spool.next_seq(), 36);
    drop(spool);
    assert_private(state.path());
}

/// Every file under `dir` is 0600 and every directory 0700 (the test runs under the usual
/// umask 022: modes left to it would be 0644/0755). `dir` itself is the test's.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut stack: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    let mut files = 0;
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
            files += 1;
        }
    }
    assert!(files >= 4, "rejected batches, cursor, highwater: {files} files");
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    if !is_root() {
        kycd_test_support::skip!("SKIPPED spool_on_a_full_filesystem: needs root to mount a tmpfs");
        return None;
    }
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        kycd_test_support::skip!(
            "SKIPPED spool_on_a_full_filesystem: mount -t tmpfs failed (no CAP_SYS_ADMIN?)"
        );
        return None;
    }
    Some(Mount(dir.to_owned()))
}

#[test]
fn spool_on_a_full_filesystem() {
    let state = tempfile::tempdir().unwrap();
    let mnt = state.path().join("spool");
    std::fs::create_dir(&mnt).unwrap();
    let Some(_mount) = mount_tmpfs(&mnt, "64k") else { return };
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 32 * 1024]).unwrap();
    let options = SpoolOptions { segment_max_bytes: 8192, max_bytes: 1 << 30 };
    let mut spool = Spool::open(&mnt, options).unwrap();
    let mut appended = 0u64;
    let err = loop {
        // Distinct workloads: merging cannot fold anything.
        match spool.append(window(&format!("cgroup:/w{appended}"), 0)) {
            Ok(seq) => {
                appended += 1;
                assert_eq!(seq, appended);
                assert!(appended < 10_000, "a 64k file system never filled up");
            }
            Err(e) => break e,
        }
    };
    assert!(appended > 5, "some windows fit first");
    assert!(matches!(err, SpoolError::NoSpace { .. }), "{err}");
    assert_eq!(err.kind(), "no_space");
    let again = spool.append(window("cgroup:/x", 0)).unwrap_err();
    assert!(matches!(again, SpoolError::NoSpace { .. }), "{again}");
    assert_eq!(spool.next_seq(), appended + 1, "failed appends consume no seq");
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        spool.append(window("cgroup:/x", 0)).unwrap(),
        appended + 1,
        "works again once space is freed"
    );
    drop(spool);
    let mut spool = Spool::open(&mnt, options).unwrap();
    let seqs: Vec<u64> = spool.read_from(1, 100_000).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=appended + 1).collect::<Vec<_>>(), "nothing torn, nothing lost");
}
