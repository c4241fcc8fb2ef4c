//! `POST /v1/reports` end to end: real TCP on 127.0.0.1, a real database: each test runs on
//! SQLite (a file in a tempdir) and on PostgreSQL (a fresh database on the test cluster).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::*;
use kycd_collector::findings::{evaluate_store, EvaluationSettings};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::Limits;
use kycd_protocol::{UsageRecord, REPORT_SIGNATURE_TYP};

const HOST: &str = "host-1";

backend_tests!(
    a_signed_batch_is_stored_and_acked_and_a_resend_is_a_no_op,
    out_of_order_batches_ack_only_the_contiguous_prefix,
    a_merged_record_covers_its_whole_range,
    same_seq_with_different_content_is_a_permanent_conflict,
    signatures_are_checked_before_anything_else,
    one_bad_record_rejects_the_whole_batch,
    malformed_bodies_are_rejected,
    oversized_bodies_and_zip_bombs_are_refused,
    acks_survive_a_restart_on_the_same_database,
    healthz_answers_ok,
    a_reimaged_host_reenrolled_with_a_new_key_reports_from_seq_1_again,
    refused_batches_of_authenticated_hosts_are_recorded_and_raise_report_rejected,
    unbounded_window_values_are_refused_naming_the_field,
);

async fn started(db: &TestDb) -> (Collector, kycd_protocol::PrivateJwk) {
    let collector = Collector::start(db, Limits::default()).await;
    let key = host_key(HOST);
    collector.enroll(&key);
    (collector, key)
}

async fn a_signed_batch_is_stored_and_acked_and_a_resend_is_a_no_op(db: TestDb) {
    let (c, key) = started(&db).await;
    let b = batch(HOST, (1..=3).map(record).collect());
    assert_eq!(send(c.addr, &b, &key).await.acked(), 3);
    assert_eq!(c.ranges(HOST), [(1, 1), (2, 2), (3, 3)]);
    let again = send(c.addr, &b, &key).await;
    assert_eq!(again.acked(), 3);
    assert_eq!(c.ranges(HOST), [(1, 1), (2, 2), (3, 3)], "no duplicate rows");
    // A resend that overlaps the stored part and adds a new record.
    assert_eq!(send(c.addr, &batch(HOST, (2..=4).map(record).collect()), &key).await.acked(), 4);
    assert_eq!(c.ranges(HOST).len(), 4);
    c.stop().await;
}

async fn out_of_order_batches_ack_only_the_contiguous_prefix(db: TestDb) {
    let (c, key) = started(&db).await;
    assert_eq!(send(c.addr, &batch(HOST, vec![record(4), record(5)]), &key).await.acked(), 0);
    assert_eq!(send(c.addr, &batch(HOST, (1..=3).map(record).collect()), &key).await.acked(), 5);
    c.stop().await;
}

async fn a_merged_record_covers_its_whole_range(db: TestDb) {
    let (c, key) = started(&db).await;
    let mut merged = record(6);
    merged.last_seq = Some(9);
    merged.window.merged_windows = 4;
    assert_eq!(send(c.addr, &batch(HOST, vec![merged]), &key).await.acked(), 0);
    assert_eq!(send(c.addr, &batch(HOST, (1..=5).map(record).collect()), &key).await.acked(), 9);
    assert_eq!(send(c.addr, &batch(HOST, vec![record(10)]), &key).await.acked(), 10);
    assert_eq!(c.ranges(HOST), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 9), (10, 10)]);
    c.stop().await;
}

async fn same_seq_with_different_content_is_a_permanent_conflict(db: TestDb) {
    let (c, key) = started(&db).await;
    assert_eq!(send(c.addr, &batch(HOST, vec![record(1), record(2), record(5)]), &key).await.acked(), 2);
    let mut changed = record(5);
    changed.window.estimated_ops *= 2.0;
    let reply = send(c.addr, &batch(HOST, vec![record(3), changed]), &key).await;
    assert_eq!((reply.status, reply.kind()), (409, "SeqConflict"), "{:?}", reply.body);
    assert!(reply.body["error"].as_str().is_some());
    assert_eq!(c.ranges(HOST), [(1, 1), (2, 2), (5, 5)], "the batch's new record 3 was rolled back");
    assert_eq!(c.acked(HOST), 2);
    // A record overlapping a stored merged range conflicts too.
    let mut merged = record(3);
    merged.last_seq = Some(4);
    assert_eq!(send(c.addr, &batch(HOST, vec![merged]), &key).await.acked(), 5);
    let reply = send(c.addr, &batch(HOST, vec![record(4)]), &key).await;
    assert_eq!((reply.status, reply.kind()), (409, "SeqConflict"));
    let text = reply.body["error"].as_str().unwrap();
    assert!(text.contains("seq 4 conflicts with stored seq 3..=4"), "{text}");
    // A merged record that partly overlaps: the text names the stored range, not seq 2
    // (stored, but not in conflict) nor seq 1 of the incoming record alone.
    let mut partly = record(5);
    partly.last_seq = Some(6);
    let reply = send(c.addr, &batch(HOST, vec![partly]), &key).await;
    assert_eq!((reply.status, reply.kind()), (409, "SeqConflict"));
    let text = reply.body["error"].as_str().unwrap();
    assert!(text.contains("seq 5..=6 conflicts with stored seq 5 "), "{text}");
    c.stop().await;
}

async fn signatures_are_checked_before_anything_else(db: TestDb) {
    let (c, key) = started(&db).await;
    let b = batch(HOST, vec![record(1)]);

    // Signed by another key that claims the enrolled host's id.
    let reply = send(c.addr, &b, &host_key(HOST)).await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"), "{:?}", reply.body);

    // Signed by a host that is not enrolled.
    let stranger = host_key("host-2");
    let reply = send(c.addr, &batch("host-2", vec![record(1)]), &stranger).await;
    assert_eq!((reply.status, reply.kind()), (401, "UnknownHost"));

    // Body changed after signing.
    let (mut body, sig) = signed(&b, &key);
    let last = body.len() - 9;
    body[last] ^= 1;
    let reply = upload(c.addr, body, &sig).await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"));

    // No signature, garbage signature, wrong typ.
    let (body, _) = signed(&b, &key);
    let reply = request(c.addr, "POST", "/v1/reports", &[("content-encoding", "gzip")], body.clone()).await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"));
    let reply = upload(c.addr, body.clone(), "not-a-jws").await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"));
    let wrong_typ = kycd_protocol::sign_detached(&body, "kyc-host-statement+jwt", &key);
    let reply = upload(c.addr, body.clone(), &wrong_typ).await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"));

    // The enrolled host signs a batch naming another host.
    let reply = send(c.addr, &batch("host-2", vec![record(1)]), &key).await;
    assert_eq!((reply.status, reply.kind()), (400, "HostMismatch"));

    assert!(c.ranges(HOST).is_empty());
    assert!(c.ranges("host-2").is_empty());
    c.stop().await;
}

async fn one_bad_record_rejects_the_whole_batch(db: TestDb) {
    let (c, key) = started(&db).await;
    let mut bad = record(3);
    bad.window.end = bad.window.start;
    let reply = send(c.addr, &batch(HOST, vec![record(1), record(2), bad, record(4)]), &key).await;
    assert_eq!((reply.status, reply.kind()), (400, "InvalidRecord"), "{:?}", reply.body);
    assert!(c.ranges(HOST).is_empty(), "nothing of the batch is stored");

    let cases: Vec<(&str, Vec<UsageRecord>)> = vec![
        ("seq 0", vec![record(0)]),
        ("decreasing", vec![record(2), record(1)]),
        ("duplicate", vec![record(1), record(1)]),
        ("overlapping merged", vec![UsageRecord { last_seq: Some(3), ..record(1) }, record(2)]),
        ("last_seq < seq", vec![UsageRecord { last_seq: Some(1), ..record(2) }]),
        ("NaN is not JSON but negative is", {
            let mut r = record(1);
            r.window.gpu_seconds = -1.0;
            vec![r]
        }),
        ("empty workload", {
            let mut r = record(1);
            r.window.workload.clear();
            vec![r]
        }),
    ];
    for (what, records) in cases {
        let reply = send(c.addr, &batch(HOST, records), &key).await;
        assert_eq!((reply.status, reply.kind()), (400, "InvalidRecord"), "{what}: {:?}", reply.body);
    }
    assert!(c.ranges(HOST).is_empty());
    assert_eq!(c.acked(HOST), 0);
    c.stop().await;
}

async fn malformed_bodies_are_rejected(db: TestDb) {
    let (c, key) = started(&db).await;
    let sign = |body: &[u8]| kycd_protocol::sign_detached(body, REPORT_SIGNATURE_TYP, &key);

    // Signed, but not gzip.
    let plain = serde_json::to_vec(&batch(HOST, vec![record(1)])).unwrap();
    let reply = upload(c.addr, plain.clone(), &sign(&plain)).await;
    assert_eq!((reply.status, reply.kind()), (400, "Malformed"), "{:?}", reply.body);

    // Gzip of something that is not a batch; of JSON with a duplicate key.
    for json in [&b"[1, 2, 3]"[..], br#"{"host_id":"host-1","host_id":"x","sent_at":1,"records":[]}"#, b"{"] {
        let body = gzip(json);
        let reply = upload(c.addr, body.clone(), &sign(&body)).await;
        assert_eq!((reply.status, reply.kind()), (400, "Malformed"), "{:?}", reply.body);
    }

    // Not declared as gzip.
    let (body, sig) = signed(&batch(HOST, vec![record(1)]), &key);
    let headers = [("content-type", "application/json"), ("x-kycd-signature", sig.as_str())];
    let reply = request(c.addr, "POST", "/v1/reports", &headers, body).await;
    assert_eq!((reply.status, reply.kind()), (415, "UnsupportedEncoding"));
    assert!(c.ranges(HOST).is_empty());
    c.stop().await;
}

async fn oversized_bodies_and_zip_bombs_are_refused(db: TestDb) {
    let limits = Limits { max_body_bytes: 64 * 1024, ..Limits::default() };
    let c = Collector::start(&db, limits).await;
    let key = host_key(HOST);
    c.enroll(&key);
    let sign = |body: &[u8]| kycd_protocol::sign_detached(body, REPORT_SIGNATURE_TYP, &key);

    // Compressed body over the limit (incompressible bytes).
    let mut noise = vec![0u8; 100 * 1024];
    let mut x: u32 = 0x1234_5678;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x.to_le_bytes()[0];
    }
    let reply = upload(c.addr, noise.clone(), &sign(&noise)).await;
    assert_eq!((reply.status, reply.kind()), (413, "TooLarge"), "{:?}", reply.body);

    // 17 MiB of zeros, about 17 KiB gzipped, over the 16 MiB decompressed cap.
    let bomb = gzip_best(&vec![0u8; 17 << 20]);
    assert!(bomb.len() < 64 * 1024);
    let reply = upload(c.addr, bomb.clone(), &sign(&bomb)).await;
    assert_eq!((reply.status, reply.kind()), (413, "TooLarge"), "{:?}", reply.body);
    assert!(c.ranges(HOST).is_empty());
    c.stop().await;
}

async fn acks_survive_a_restart_on_the_same_database(db: TestDb) {
    let (c, key) = started(&db).await;
    assert_eq!(send(c.addr, &batch(HOST, (1..=3).map(record).collect()), &key).await.acked(), 3);
    assert_eq!(send(c.addr, &batch(HOST, vec![record(5)]), &key).await.acked(), 3);
    c.stop().await;

    let c = Collector::start(&db, Limits::default()).await;
    assert_eq!(c.acked(HOST), 3);
    assert_eq!(
        send(c.addr, &batch(HOST, (1..=3).map(record).collect()), &key).await.acked(),
        3,
        "still enrolled"
    );
    assert_eq!(send(c.addr, &batch(HOST, vec![record(4)]), &key).await.acked(), 5);
    c.stop().await;
}

async fn healthz_answers_ok(db: TestDb) {
    let (c, _) = started(&db).await;
    let reply = request(c.addr, "GET", "/healthz", &[], Vec::new()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("ok")));
    c.stop().await;
}

#[tokio::test]
async fn a_locked_database_answers_503_with_retry_after() {
    let db = TestDb::sqlite();
    let (c, key) = started(&db).await;
    // Another process holds the write lock past the busy timeout.
    let other = rusqlite::Connection::open(db.sqlite_path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let reply = send(c.addr, &batch(HOST, vec![record(1)]), &key).await;
    assert_eq!((reply.status, reply.kind()), (503, "Unavailable"), "{:?}", reply.body);
    assert_eq!(reply.headers.get("retry-after").unwrap(), "5");
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(send(c.addr, &batch(HOST, vec![record(1)]), &key).await.acked(), 1);
    c.stop().await;
}

#[tokio::test]
async fn a_locked_postgres_table_answers_503_with_retry_after() {
    let Some(db) = TestDb::postgres("a_locked_postgres_table_answers_503_with_retry_after") else { return };
    let (c, key) = started(&db).await;
    // Another session holds the records table past the lock timeout (e.g. a long migration
    // or maintenance by hand).
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let mut other = off_runtime(|| db.pg().client());
    let holder = std::thread::spawn(move || {
        let mut tx = other.transaction().unwrap();
        tx.batch_execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE").unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        tx.rollback().unwrap();
        other
    });
    locked_rx.recv().unwrap();
    let reply = send(c.addr, &batch(HOST, vec![record(1)]), &key).await;
    assert_eq!((reply.status, reply.kind()), (503, "Unavailable"), "{:?}", reply.body);
    assert_eq!(reply.headers.get("retry-after").unwrap(), "5");
    release_tx.send(()).unwrap();
    let other = holder.join().unwrap();
    std::thread::spawn(move || drop(other)).join().unwrap();
    assert_eq!(send(c.addr, &batch(HOST, vec![record(1)]), &key).await.acked(), 1);
    c.stop().await;
}

#[tokio::test]
async fn a_stopped_postgres_answers_503_and_the_collector_recovers() {
    let Some(db) = TestDb::postgres("a_stopped_postgres_answers_503_and_the_collector_recovers") else {
        return;
    };
    let (c, key) = started(&db).await;
    assert_eq!(send(c.addr, &batch(HOST, vec![record(1)]), &key).await.acked(), 1);
    // Terminate every connection of the collector (as pg_terminate_backend or a server
    // restart would): the pool notices, and the next call reconnects.
    let url = db.url.clone();
    off_runtime(move || {
        let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        admin
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .unwrap();
    });
    let mut acked = None;
    for _ in 0..3 {
        let reply = send(c.addr, &batch(HOST, vec![record(2)]), &key).await;
        if reply.status == 200 {
            acked = Some(reply.acked());
            break;
        }
        assert_eq!((reply.status, reply.kind()), (503, "Unavailable"), "{:?}", reply.body);
    }
    assert_eq!(
        acked,
        Some(2),
        "a terminated connection costs at most a transient error per pooled connection"
    );
    c.stop().await;
}

/// A record of the re-imaged host's new agent: seq from 1 again, windows after the old ones.
fn reimaged(seq: u64) -> UsageRecord {
    let mut r = record(seq);
    r.window = window(r.window.start + 60 * 1000);
    r.window.gpus = 4;
    r
}

fn report_rejected_findings(db: &TestDb) -> Vec<kycd_collector::fleet::Finding> {
    let store = db.storage();
    off_runtime(move || {
        store
            .list_findings(&FindingQuery {
                kind: Some(FindingKind::ReportRejected),
                limit: 100,
                ..FindingQuery::default()
            })
            .unwrap()
    })
}

fn evaluate(db: &TestDb) -> kycd_collector::findings::EvaluationReport {
    let store = db.storage();
    off_runtime(move || {
        evaluate_store(store.as_ref(), EvaluationSettings::default(), kycd_protocol::clock::unix_now())
            .unwrap()
    })
}

/// Issue 15 item 3: the documented re-key (`hosts remove`, `hosts add` with the new key, same
/// host id) of a re-imaged host whose new agent numbers from seq 1 again. Before enrollment
/// epochs every batch of the new agent was a 409 SeqConflict and its usage never arrived.
async fn a_reimaged_host_reenrolled_with_a_new_key_reports_from_seq_1_again(db: TestDb) {
    let c = Collector::start(&db, Limits::default()).await;
    let store = db.storage();
    let key1 = host_key(HOST);
    let s = store.clone();
    let public1 = key1.public_key();
    assert_eq!(off_runtime(move || s.enroll_host(HOST, &public1, 0).unwrap()), 1);
    assert_eq!(send(c.addr, &batch(HOST, (1..=3).map(record).collect()), &key1).await.acked(), 3);
    assert_eq!(send(c.addr, &batch(HOST, (4..=5).map(record).collect()), &key1).await.acked(), 5);

    // Re-imaged: a new key; until the operator re-enrolls the host, it is refused as badly
    // signed (the agent keeps its records and retries 401s).
    let key2 = host_key(HOST);
    let first = batch(HOST, (1..=3).map(reimaged).collect());
    let reply = send(c.addr, &first, &key2).await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"));
    let (s, public2) = (store.clone(), key2.public_key());
    let epoch = off_runtime(move || {
        assert!(s.remove_host(HOST).unwrap());
        s.enroll_host(HOST, &public2, 0).unwrap()
    });
    assert_eq!(epoch, 2);
    assert_eq!(send(c.addr, &first, &key2).await.acked(), 3, "stored, not a SeqConflict");
    assert_eq!(send(c.addr, &first, &key2).await.acked(), 3, "a replay is idempotent");
    assert_eq!(send(c.addr, &batch(HOST, vec![reimaged(4)]), &key2).await.acked(), 4);
    assert_eq!(c.ranges_in(HOST, 2), [(1, 1), (2, 2), (3, 3), (4, 4)], "stored once each");
    assert_eq!(c.ranges_in(HOST, 1), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], "the old ones stay");
    assert_eq!(c.acked_in(HOST, 1), 5);
    // The old key is not enrolled any more.
    let reply = send(c.addr, &batch(HOST, vec![record(6)]), &key1).await;
    assert_eq!((reply.status, reply.kind()), (401, "BadSignature"));
    // Both epochs' windows count, each once.
    let s = store.clone();
    let usage = off_runtime(move || s.tenant_usage(None, None).unwrap());
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].windows, 9);
    assert!((usage[0].gpu_seconds - 9.0 * 480.0).abs() < 1e-6);
    assert!(report_rejected_findings(&db).is_empty(), "nothing was refused");

    // A conflicting batch of the new agent is refused, recorded and raised once.
    let mut changed = reimaged(2);
    changed.window.gpus = 1;
    let reply = send(c.addr, &batch(HOST, vec![changed]), &key2).await;
    assert_eq!((reply.status, reply.kind()), (409, "SeqConflict"), "{:?}", reply.body);
    let report = evaluate(&db);
    assert_eq!(
        report.raised.iter().filter(|(_, k, _)| *k == FindingKind::ReportRejected).count(),
        1,
        "{report:?}"
    );
    let found = report_rejected_findings(&db);
    assert_eq!(found.len(), 1);
    let f = &found[0];
    assert_eq!(
        (f.state, f.finding.subject.as_str(), f.finding.host_id.as_deref()),
        (FindingState::Open, HOST, Some(HOST))
    );
    let rejection = &f.finding.evidence["rejections"][0];
    assert_eq!(rejection["kind"], "SeqConflict");
    assert_eq!(rejection["epoch"], 2);
    assert_eq!(rejection["seqs"], serde_json::json!([2, 2]));
    assert_eq!(f.finding.evidence["rejected_batches"], 1);
    let again = evaluate(&db);
    assert!(again.raised.is_empty(), "raised once while it holds: {again:?}");
    c.stop().await;
}

/// Every permanent refusal after the signature verified is recorded with host, epoch, kind,
/// detail and seq range; unauthenticated requests are not.
async fn refused_batches_of_authenticated_hosts_are_recorded_and_raise_report_rejected(db: TestDb) {
    let (c, key) = started(&db).await;
    let store = db.storage();
    let rejections = |store: &std::sync::Arc<dyn kycd_collector::Storage>| {
        let s = store.clone();
        off_runtime(move || s.rejections(HOST, 100).unwrap())
    };
    // Unauthenticated: neither a stranger's key nor an unknown host leaves a trace.
    let reply = send(c.addr, &batch(HOST, vec![record(1)]), &host_key(HOST)).await;
    assert_eq!(reply.status, 401);
    assert!(rejections(&store).is_empty());

    let mut bad = record(7);
    bad.window.end = bad.window.start;
    let reply = send(c.addr, &batch(HOST, vec![record(5), bad]), &key).await;
    assert_eq!((reply.status, reply.kind()), (400, "InvalidRecord"));
    let reply = send(c.addr, &batch("host-2", vec![record(1)]), &key).await;
    assert_eq!((reply.status, reply.kind()), (400, "HostMismatch"));
    let body = gzip(b"{");
    let sig = kycd_protocol::sign_detached(&body, REPORT_SIGNATURE_TYP, &key);
    let reply = upload(c.addr, body, &sig).await;
    assert_eq!((reply.status, reply.kind()), (400, "Malformed"));

    let listed = rejections(&store);
    let seen: Vec<_> = listed.iter().map(|r| (r.kind.as_str(), r.seqs, r.epoch)).collect();
    assert_eq!(
        seen,
        [("Malformed", None, 1), ("HostMismatch", Some((1, 1)), 1), ("InvalidRecord", Some((5, 7)), 1)]
    );
    assert!(listed[2].detail.contains("end must be after start"), "{:?}", listed[2].detail);
    assert!(listed.iter().all(|r| r.host_id == HOST));
    let now = kycd_protocol::clock::unix_now();
    assert!(listed.iter().all(|r| (now - r.rejected_at).abs() < 60));

    let report = evaluate(&db);
    let raised: Vec<&str> = report
        .raised
        .iter()
        .filter(|(_, k, _)| *k == FindingKind::ReportRejected)
        .map(|(_, _, subject)| subject.as_str())
        .collect();
    assert_eq!(raised, [HOST]);
    let f = &report_rejected_findings(&db)[0];
    assert_eq!(f.finding.evidence["rejected_batches"], 3);
    assert_eq!(f.finding.evidence["rejections"].as_array().unwrap().len(), 3);
    // Once refusals are older than the window, the finding resolves.
    let s = store.clone();
    let later = off_runtime(move || {
        let settings = EvaluationSettings { rejected_window_s: 60, ..EvaluationSettings::default() };
        evaluate_store(s.as_ref(), settings, now + 3600).unwrap()
    });
    assert!(later.resolved.iter().any(|(_, k, _)| *k == FindingKind::ReportRejected), "{later:?}");
    c.stop().await;
}

/// Issue 15 item 6: windows a host cannot have measured are refused with 400 InvalidRecord
/// naming the field, and nothing of their batch is stored; merged records with valid values
/// pass.
async fn unbounded_window_values_are_refused_naming_the_field(db: TestDb) {
    let (c, key) = started(&db).await;
    let now = kycd_protocol::clock::unix_now();
    let case = |f: fn(&mut UsageRecord)| {
        let mut r = record(1);
        f(&mut r);
        vec![r]
    };
    let cases: Vec<(&str, Vec<UsageRecord>)> = vec![
        ("estimated_ops 1e308", case(|r| r.window.estimated_ops = 1e308)),
        ("peak_flops 1e308", case(|r| (r.window.peak_flops, r.window.estimated_ops) = (1e308, 1e308))),
        ("end 16725225600", case(|r| (r.window.start, r.window.end) = (16_725_225_540, 16_725_225_600))),
        ("end 9223372036854775807", case(|r| (r.window.start, r.window.end) = (i64::MAX - 60, i64::MAX))),
        ("gpu_seconds 100000", case(|r| r.window.gpu_seconds = 1e5)),
        ("gpu_seconds must be a finite number", case(|r| r.window.gpu_seconds = -1.0)),
        ("estimated_ops must be a finite number", case(|r| r.window.estimated_ops = -1.0)),
        ("peak_flops must be a finite number", case(|r| r.window.peak_flops = -1.0)),
    ];
    for (what, records) in cases {
        let mut records = records;
        records.push(record(2));
        let reply = send(c.addr, &batch(HOST, records), &key).await;
        assert_eq!((reply.status, reply.kind()), (400, "InvalidRecord"), "{what}: {:?}", reply.body);
        let text = reply.body["error"].as_str().unwrap();
        assert!(text.starts_with("record 0 (seq 1): ") && text.contains(what), "{what}: {text}");
    }
    assert!(c.ranges(HOST).is_empty(), "nothing of those batches is stored");

    // A window ending an hour from now: a clock running ahead, answered "retry later" (503 with
    // Retry-After until it is no longer ahead), not refused for good; nothing stored.
    let mut fast = record(1);
    (fast.window.start, fast.window.end) = (now + 3540, now + 3600);
    let reply = send(c.addr, &batch(HOST, vec![fast]), &key).await;
    assert_eq!((reply.status, reply.kind()), (503, "ClockAhead"), "{:?}", reply.body);
    assert!(c.ranges(HOST).is_empty());
    // A window ending a minute from now is a clock slightly ahead: taken.
    let mut ahead = record(1);
    (ahead.window.start, ahead.window.end) = (now, now + 60);
    assert_eq!(send(c.addr, &batch(HOST, vec![ahead]), &key).await.acked(), 1);
    // A merged record (the agent's spool near its cap) with valid values: taken.
    let mut merged = record(2);
    merged.last_seq = Some(31);
    merged.window.start = base();
    merged.window.end = base() + 30 * 60;
    merged.window.merged_windows = 30;
    merged.window.gpu_seconds = 30.0 * 480.0;
    merged.window.estimated_ops = 30.0 * 1.5e17;
    assert_eq!(send(c.addr, &batch(HOST, vec![merged]), &key).await.acked(), 31);

    // Starts more than a week before its epoch's enrollment (the agent spools before the
    // operator enrolls it: less than that is taken).
    let late = host_key("host-late");
    let (s, public) = (db.storage(), late.public_key());
    off_runtime(move || s.enroll_host("host-late", &public, now).unwrap());
    let mut spooled = record(1);
    (spooled.window.start, spooled.window.end) = (now - 86_400, now - 86_400 + 60);
    assert_eq!(send(c.addr, &batch("host-late", vec![spooled]), &late).await.acked(), 1);
    let mut ancient = record(2);
    (ancient.window.start, ancient.window.end) = (now - 8 * 86_400, now - 8 * 86_400 + 60);
    let reply = send(c.addr, &batch("host-late", vec![ancient]), &late).await;
    assert_eq!((reply.status, reply.kind()), (400, "InvalidRecord"));
    let text = reply.body["error"].as_str().unwrap();
    assert!(text.contains("start ") && text.contains("before the host's enrollment"), "{text}");
    c.stop().await;
}
