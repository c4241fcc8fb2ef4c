//! The storage trait's contract, on each backend (SQLite file, PostgreSQL database): what
//! ingest and the `hosts` commands rely on, independent of HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use kycd_collector::{Limits, ReportStore, StoreError, ValidRecord};
use kycd_protocol::UsageRecord;

backend_tests!(
    overlap_with_a_stored_merged_record_conflicts,
    enrollment_is_explicit_and_never_replaces_a_key,
    acks_advance_over_out_of_order_and_merged_ranges,
    concurrent_writers_on_two_stores_store_each_seq_once,
    racing_conflicting_writers_never_store_overlapping_ranges,
);

fn valid(records: Vec<UsageRecord>) -> Vec<ValidRecord> {
    let batch = batch("h", records);
    kycd_collector::ingest::validate_batch(batch, &Limits::default()).unwrap()
}

fn merged(seq: u64, last: u64) -> UsageRecord {
    UsageRecord { last_seq: Some(last), ..record(seq) }
}

async fn overlap_with_a_stored_merged_record_conflicts(db: TestDb) {
    let store = db.open();
    off_runtime(|| {
        assert_eq!(store.insert_batch("h", &valid(vec![merged(2, 4)]), 0).unwrap(), 0);
        for overlapping in [record(3), record(4), merged(1, 2), merged(2, 3)] {
            assert!(matches!(
                store.insert_batch("h", &valid(vec![overlapping]), 0),
                Err(StoreError::SeqConflict { .. })
            ));
        }
        assert_eq!(store.insert_batch("h", &valid(vec![merged(2, 4)]), 0).unwrap(), 0, "identical re-send");
        assert_eq!(store.insert_batch("h", &valid(vec![record(1), record(5)]), 0).unwrap(), 5);
        assert_eq!(store.stored_ranges("h").unwrap(), [(1, 1), (2, 4), (5, 5)]);
        // A conflict anywhere in a batch stores nothing of it.
        let mut changed = record(5);
        changed.window.gpus = 1;
        assert!(matches!(
            store.insert_batch("h", &valid(vec![changed, record(6)]), 0),
            Err(StoreError::SeqConflict { seq: 5 })
        ));
        assert_eq!(store.stored_ranges("h").unwrap(), [(1, 1), (2, 4), (5, 5)]);
        assert_eq!(store.acked_seq("h").unwrap(), 5);
    });
}

async fn enrollment_is_explicit_and_never_replaces_a_key(db: TestDb) {
    let store = db.open();
    let (a, b) = (host_key("host-a"), host_key("host-b"));
    off_runtime(|| {
        assert!(store.host_key("host-a").unwrap().is_none());
        store.enroll_host("host-a", &a.public_key(), 100).unwrap();
        store.enroll_host("host-b", &b.public_key(), 200).unwrap();
        let other = host_key("host-a");
        assert!(matches!(
            store.enroll_host("host-a", &other.public_key(), 300),
            Err(StoreError::AlreadyEnrolled(h)) if h == "host-a"
        ));
        assert_eq!(store.host_key("host-a").unwrap().unwrap().to_jwk(), a.public_key().to_jwk());
        store.insert_batch("host-b", &valid(vec![record(1), record(2)]), 0).unwrap();
        let hosts = store.list_hosts().unwrap();
        let listed: Vec<(&str, i64, u64)> =
            hosts.iter().map(|h| (h.host_id.as_str(), h.enrolled_at, h.acked_seq)).collect();
        assert_eq!(listed, [("host-a", 100, 0), ("host-b", 200, 2)]);
        assert!(store.remove_host("host-b").unwrap());
        assert!(!store.remove_host("host-b").unwrap());
        assert_eq!(store.stored_ranges("host-b").unwrap().len(), 2, "records outlive the enrollment");
        assert_eq!(store.list_hosts().unwrap().len(), 1);
    });
}

async fn acks_advance_over_out_of_order_and_merged_ranges(db: TestDb) {
    let store = db.open();
    off_runtime(|| {
        assert_eq!(store.insert_batch("h", &valid(vec![record(8), record(9)]), 0).unwrap(), 0);
        assert_eq!(store.insert_batch("h", &valid(vec![merged(4, 7)]), 0).unwrap(), 0);
        assert_eq!(store.insert_batch("h", &valid(vec![record(2), record(3)]), 0).unwrap(), 0);
        assert_eq!(store.acked_seq("other").unwrap(), 0);
        // Filling the one gap walks over everything stored out of order.
        assert_eq!(store.insert_batch("h", &valid(vec![record(1)]), 0).unwrap(), 9);
        assert_eq!(store.acked_seq("h").unwrap(), 9);
        assert_eq!(store.insert_batch("h", &valid(vec![record(9), record(10)]), 0).unwrap(), 10);
        assert_eq!(store.insert_batch("h", &valid(vec![]), 0).unwrap(), 10);
    });
}

/// Two store instances (two pools, as two collector processes would have) and several
/// threads each, all storing overlapping batches of one host at once.
async fn concurrent_writers_on_two_stores_store_each_seq_once(db: TestDb) {
    const N: u64 = 200;
    let stores: [Arc<dyn ReportStore>; 2] = [db.open(), db.open()];
    // Batches of 10 starting every 5: each seq is in two batches; sent in a scrambled order.
    let mut batches: Vec<Vec<ValidRecord>> =
        (0..N / 5).map(|i| valid(((i * 5 + 1)..=(i * 5 + 10).min(N)).map(record).collect())).collect();
    let len = batches.len();
    for i in 0..len {
        batches.swap(i, (i * 7 + 3) % len);
    }
    let writing = std::sync::atomic::AtomicBool::new(true);
    let acks: Vec<u64> = off_runtime(|| {
        std::thread::scope(|s| {
            // The stored acked seq never goes back (no lost update between writers that
            // advanced it from different snapshots).
            let watcher = s.spawn(|| {
                let mut seen = 0;
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let acked = stores[0].acked_seq("h").unwrap();
                    assert!(acked >= seen, "the acked seq went back from {seen} to {acked}");
                    seen = acked;
                }
            });
            let handles: Vec<_> = (0..6)
                .map(|t| {
                    let store = Arc::clone(&stores[t % 2]);
                    let batches = &batches;
                    s.spawn(move || {
                        let mut acks = Vec::new();
                        for b in batches.iter().skip(t).step_by(2).chain(batches.iter().rev().skip(t % 3)) {
                            loop {
                                match store.insert_batch("h", b, 0) {
                                    Ok(acked) => {
                                        // Stored when answered: an ack reaching the batch covers it.
                                        let (first, last) = (b[0].record.seq, b[b.len() - 1].last_seq);
                                        assert!(
                                            acked + 1 < first || acked >= last,
                                            "{first}..={last}: {acked}"
                                        );
                                        break acks.push(acked);
                                    }
                                    Err(e) if e.is_transient() => std::thread::yield_now(),
                                    Err(e) => panic!("{e:?}"),
                                }
                            }
                        }
                        acks
                    })
                })
                .collect();
            let acks = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
            watcher.join().unwrap();
            acks
        })
    });
    assert!(acks.iter().all(|a| *a <= N), "{acks:?}");
    let stored = off_runtime(|| stores[0].stored_ranges("h").unwrap());
    assert_eq!(stored, (1..=N).map(|s| (s, s)).collect::<Vec<_>>());
    assert_eq!(off_runtime(|| stores[1].acked_seq("h").unwrap()), N);
}

/// A merged record and a single record inside its range, stored at the same moment through
/// two stores: exactly one wins, the other is a conflict, and the stored ranges never overlap
/// (their seqs differ, so only the per-host serialisation can see the overlap).
async fn racing_conflicting_writers_never_store_overlapping_ranges(db: TestDb) {
    let stores: [Arc<dyn ReportStore>; 2] = [db.open(), db.open()];
    let contenders = [valid(vec![merged(2, 6)]), valid(vec![record(4)])];
    off_runtime(|| {
        for round in 0..40 {
            let host = format!("h{round}");
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<Result<u64, StoreError>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|i| {
                        let (store, batch, host, barrier) = (&stores[i], &contenders[i], &host, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            loop {
                                match store.insert_batch(host, batch, 0) {
                                    Err(e) if e.is_transient() => std::thread::yield_now(),
                                    other => break other,
                                }
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won = results.iter().filter(|r| r.is_ok()).count();
            let lost = results.iter().filter(|r| matches!(r, Err(StoreError::SeqConflict { .. }))).count();
            assert_eq!((won, lost), (1, 1), "round {round}: {results:?}");
            let ranges = stores[0].stored_ranges(&host).unwrap();
            assert!(ranges == [(2, 6)] || ranges == [(4, 4)], "round {round}: {ranges:?}");
        }
    });
}
