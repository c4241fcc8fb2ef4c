//! The usage roll-ups on each backend (issue 20): kept at ingest in the batch's transaction,
//! they equal what the raw windows give (`rollups check` finds no difference, and the fleet
//! view read from them equals the one aggregated from the windows), whatever order batches
//! arrive in, with re-sent batches, merged records, late windows joining two busy segments,
//! windows without a tenant and placed hosts; a tampered row is found, named, and fixed by
//! `rollups rebuild`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::process::Command;

use common::*;
use kycd_collector::fleet::{FleetUsage, Period, Placement};
use kycd_collector::ingest::{validate_batch, Admission};
use kycd_collector::{Limits, Storage};
use kycd_protocol::{UsageRecord, UsageWindow};

backend_tests!(
    ingest_keeps_the_rollups_equal_to_the_windows,
    the_check_names_a_tampered_table_and_rebuild_fixes_it,
    an_incremental_evaluation_reads_only_the_runs_changed_since_the_last,
);

fn at(tenant: Option<&str>, workload: &str, start: i64, len: i64) -> UsageWindow {
    let mut w = window(base() + start);
    w.tenant = tenant.map(Into::into);
    w.foreign_person = tenant == Some("t-foreign");
    w.workload = workload.into();
    w.end = w.start + len;
    w.gpu_seconds = 8.0 * len as f64;
    w.estimated_ops = 2.5e15 * len as f64;
    w
}

/// Stores records `first..` of `host` holding `windows` (one record each; `merged`: the
/// first record stands for two seqs).
fn store(storage: &dyn Storage, host: &str, first: u64, windows: Vec<UsageWindow>, merged: bool) {
    let mut seq = first;
    let records: Vec<UsageRecord> = windows
        .into_iter()
        .map(|window| {
            let last = if merged && seq == first { seq + 1 } else { seq };
            let record = UsageRecord { seq, last_seq: (last != seq).then_some(last), window };
            seq = last + 1;
            record
        })
        .collect();
    let admission = Admission { received_at: 2_000_000_000, enrolled_at: 0 };
    let valid = validate_batch(batch(host, records), &Limits::default(), admission).unwrap();
    storage.insert_batch(host, 1, &valid, base() + 86_400).unwrap();
}

/// A fleet's batches, out of order and re-sent: two tenants over four hosts (two of them in
/// one placed cluster), pauses, a late window bridging two segments, a silent guest, a shared
/// GPU, 10 s windows, work without a tenant.
fn populate(storage: &dyn Storage) {
    for host in ["h-a", "h-b", "h-c", "h-d"] {
        let key = host_key(host);
        storage.enroll_host(host, &key.public_key(), 0).unwrap();
    }
    let fra = Placement { site: "fra".into(), fabric: "ib-1".into() };
    for host in ["h-a", "h-b"] {
        assert!(storage.set_host_placement(host, Some(&fra), 0).unwrap());
    }
    let t = Some("t-domestic");
    let f = Some("t-foreign");
    let vm = "libvirt_domain:vm-1";
    // h-a: minutes 0..9 of t, then (seqs 20..) a second run hours later; a merged record first.
    store(storage, "h-a", 1, (0..10).map(|m| at(t, vm, 60 * m, 60)).collect(), true);
    store(storage, "h-a", 20, (0..5).map(|m| at(t, vm, 20_000 + 60 * m, 60)).collect(), false);
    // h-b: t at the same minutes (concurrent capacity across hosts), one on a shared GPU.
    let mut shared = at(t, vm, 120, 60);
    shared.shared_gpu_seconds = 120.0;
    store(storage, "h-b", 1, vec![at(t, vm, 60, 60), shared, at(t, vm, 180, 60)], false);
    // h-c: f in two segments 4 minutes apart, 10 s windows, a silent guest; without a tenant.
    let mut silent = at(f, "libvirt_domain:vm-silent", 3_000, 60);
    silent.guest_gap_gpu_seconds = 480.0;
    silent.estimated_ops = 0.0;
    silent.method = kycd_protocol::EstimationMethod::Allocation;
    let mut c: Vec<UsageWindow> = (0..6).map(|k| at(f, vm, 1_000 + 10 * k, 10)).collect();
    c.push(at(f, vm, 1_300, 60));
    c.push(silent);
    c.push(at(None, "cgroup:/unverified", 600, 60));
    c.push(at(None, "cgroup:/unverified", 660, 60));
    store(storage, "h-c", 1, c.clone(), false);
    // Re-sent: already stored, counts once.
    store(storage, "h-c", 1, c, false);
    // h-d, late and earlier seqs last: a window bridging f's two segments on h-c.
    store(storage, "h-d", 5, vec![at(f, vm, 1_100, 180)], false);
    store(storage, "h-d", 1, vec![at(f, vm, 1_000, 60), at(None, "cgroup:/other", 0, 60)], false);
}

fn assert_all_match(storage: &dyn Storage) {
    let checks = storage.rollup_check().unwrap();
    assert_eq!(checks.len(), 10);
    for c in &checks {
        assert_eq!(c.differences, 0, "{c:#?}");
        assert!(c.expected_rows > 0, "every table has rows in this fleet: {c:?}");
    }
}

fn assert_same_view(rolled: &FleetUsage, raw: &FleetUsage) {
    assert_eq!(serde_json::to_value(rolled).unwrap(), serde_json::to_value(raw).unwrap());
    for (a, b) in rolled.tenants.iter().zip(&raw.tenants) {
        for gap in [60, 600, 3_600] {
            assert_eq!(a.runs(gap, 0), b.runs(gap, 0), "{} at gap {gap}", a.tenant);
        }
    }
}

async fn ingest_keeps_the_rollups_equal_to_the_windows(db: TestDb) {
    off_runtime(|| {
        let storage = kycd_collector::open_store(&db.url).unwrap();
        populate(storage.as_ref());
        assert_all_match(storage.as_ref());
        let rolled = storage.fleet_usage(None).unwrap();
        let raw = storage.fleet_usage_from_windows(Period::default()).unwrap();
        assert_same_view(&rolled, &raw);
        // What the fixture is meant to hold, read from the roll-ups.
        let f = rolled.tenants.iter().find(|t| t.tenant == "t-foreign").unwrap();
        assert_eq!(f.windows, 10, "the re-sent batch counts once: {f:?}");
        assert_eq!(f.runs(60, 0).len(), 2, "the late window joined two segments; the silent VM is apart");
        assert_eq!((f.guest_gap_gpu_seconds, f.guest_gap_workloads.len()), (480.0, 1));
        let t = rolled.tenants.iter().find(|t| t.tenant == "t-domestic").unwrap();
        assert_eq!((t.windows, t.runs(3_600, 0).len(), t.shared_gpu_hosts.len()), (18, 2, 1));
        assert_eq!(t.clusters.len(), 1, "{:?}", t.clusters);
        assert_eq!(rolled.unattributed.len(), 2);
        // One tenant alone reads the same.
        let one = storage.tenant_usage(Some("t-foreign"), None).unwrap();
        assert_eq!(serde_json::to_value(&one[0]).unwrap(), serde_json::to_value(f).unwrap());
    });
}

fn collector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(args).output().unwrap()
}

/// Doubles one tenant's all-time point estimate behind the collector's back.
fn tamper(db: &TestDb) {
    let sql = "UPDATE rollup_subjects SET estimated_ops = estimated_ops * 2 WHERE tenant = 't-foreign'";
    if db.is_postgres() {
        let mut client = ::postgres::Client::connect(&db.url, ::postgres::NoTls).unwrap();
        assert_eq!(client.execute(sql, &[]).unwrap(), 1);
    } else {
        let conn = rusqlite::Connection::open(db.sqlite_path()).unwrap();
        assert_eq!(conn.execute(sql, []).unwrap(), 1);
    }
}

async fn the_check_names_a_tampered_table_and_rebuild_fixes_it(db: TestDb) {
    off_runtime(|| {
        let storage = kycd_collector::open_store(&db.url).unwrap();
        populate(storage.as_ref());
        let out = collector(&["rollups", "check", "--db", &db.url]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("roll-ups match the windows"), "{stdout}");

        tamper(&db);
        let out = collector(&["rollups", "check", "--db", &db.url]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        let line = stdout.lines().find(|l| l.starts_with("rollup_subjects")).unwrap();
        assert!(line.ends_with("1 differ"), "{stdout}");
        assert!(stderr.contains("1 roll-up rows differ"), "{stderr}");
        let json = collector(&["rollups", "check", "--json", "--db", &db.url]);
        let checks: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(checks[0]["table"], "rollup_subjects");
        assert_eq!(checks[0]["differences"], 1);

        // Re-placing a host: its history counts in the old cluster until a rebuild.
        let other = Placement { site: "ams".into(), fabric: "ib-9".into() };
        assert!(storage.set_host_placement("h-b", Some(&other), 1).unwrap());
        let differing: Vec<&'static str> = storage
            .rollup_check()
            .unwrap()
            .into_iter()
            .filter(|c| c.differences > 0)
            .map(|c| c.table)
            .collect();
        assert_eq!(differing, ["rollup_subjects", "rollup_hosts", "rollup_capacity", "rollup_peaks"]);

        let out = collector(&["rollups", "rebuild", "--db", &db.url]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("recomputed from 31 windows"));
        assert_all_match(storage.as_ref());
        let t = storage.tenant_usage(Some("t-domestic"), None).unwrap();
        assert_eq!(t[0].clusters.len(), 2, "h-b now counts in ams/ib-9: {:?}", t[0].clusters);
    });
}

fn policy(version: u64) -> kycd_collector::policy::PublishedPolicy {
    let claims = serde_json::from_value(serde_json::json!({
        "iss": "authority", "iat": 1_800_000_000, "exp": 1_900_000_000, "version": version,
        "measures": [], "unverified": {"action": "allow"},
        "thresholds": {"training_ops": 1e15, "bio_training_ops": 1e30, "cluster_flops": 1e30,
                       "early_warning_fraction": 0.5}
    }))
    .unwrap();
    kycd_collector::policy::PublishedPolicy { version, token: format!("t{version}"), published_at: 0, claims }
}

fn run_findings(storage: &dyn Storage) -> Vec<kycd_collector::fleet::Finding> {
    let query = kycd_collector::fleet::FindingQuery {
        kind: Some(kycd_collector::fleet::FindingKind::RunThresholdCrossed),
        limit: 100,
        ..Default::default()
    };
    storage.list_findings(&query).unwrap()
}

/// Segments are marked changed at their batch's receive time: an evaluation covering what
/// came before reads no run (and raises no run finding); one covering less reads every run
/// grown since, and its findings name the runs' hosts (read for the evidence only).
async fn an_incremental_evaluation_reads_only_the_runs_changed_since_the_last(db: TestDb) {
    use kycd_collector::findings::{evaluate_incremental, Covered, EvaluationSettings};
    off_runtime(|| {
        let storage = kycd_collector::open_store(&db.url).unwrap();
        populate(storage.as_ref());
        storage.publish_policy(&policy(1)).unwrap();
        let received = base() + 86_400;
        let now = received + 60;
        let settings = EvaluationSettings::default();
        let after = Covered { since: received + 1, policy_version: Some(1) };
        evaluate_incremental(storage.as_ref(), &[], settings, now, Some(after)).unwrap();
        assert!(run_findings(storage.as_ref()).is_empty(), "no run changed since");
        // The same point under another policy version: every run is read again.
        let stale = Covered { policy_version: None, ..after };
        evaluate_incremental(storage.as_ref(), &[], settings, now, Some(stale)).unwrap();
        let all = run_findings(storage.as_ref());
        assert_eq!(all.len(), 3, "two runs of t-domestic, one of t-foreign: {all:#?}");
        for f in &all {
            let hosts = f.finding.evidence["run"]["hosts"].as_array().unwrap();
            assert!(!hosts.is_empty(), "{}: {:#}", f.finding.subject, f.finding.evidence);
        }
        let t = all.iter().find(|f| f.finding.subject.starts_with("t-domestic/run/")).unwrap();
        assert_eq!(t.finding.evidence["run"]["hosts"], serde_json::json!(["h-a", "h-b"]));

        // A new batch grows one run of t-domestic: read (and found) from its receive time.
        let late = vec![at(Some("t-domestic"), "libvirt_domain:vm-1", 20_300, 60)];
        let admission = Admission { received_at: 2_000_000_000, enrolled_at: 0 };
        let records = vec![UsageRecord { seq: 25, last_seq: None, window: late.into_iter().next().unwrap() }];
        let valid = validate_batch(batch("h-a", records), &Limits::default(), admission).unwrap();
        storage.insert_batch("h-a", 1, &valid, received + 600).unwrap();
        let usage = storage
            .rollup_usage(kycd_collector::fleet::rollup::Segments::ChangedSince {
                since: received + 600,
                gap_s: 3_600,
            })
            .unwrap();
        let runs: Vec<usize> = usage.tenants.iter().map(|t| t.runs(3_600, now).len()).collect();
        assert_eq!(runs, [1, 0], "only t-domestic's grown run: {runs:?}");
    });
}
