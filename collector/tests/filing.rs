//! From a finding to the filed record, on both backends, with real ingest (signed batches
//! over TCP), the real evaluator, the API's finding actions and the `report` command:
//! - a foreign tenant's two training runs are evaluated separately (the second crosses only
//!   once more windows arrive), beside the all-time finding;
//! - a run finding stays open when a newer policy raises the threshold;
//! - filing it through the API (named write token) records the reference and actor and
//!   leaves an audit record; the chain verifies; a second filing is refused;
//! - an overdue finding appears once the deadline passes (manual clock) and resolves when the
//!   finding is filed; domestic tenants get no deadline;
//! - a tenant declaring biological sequence data is held against `bio_training_ops` per
//!   run; another tenant's run past it raises the second early-warning tier;
//! - an unverified workload training at scale raises `unattributed_training_scale`, and its
//!   finding is due like a foreign tenant's (unknown status counts as foreign);
//! - `kycd-collector report` prints the filing record as JSON and HTML.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use kycd_collector::findings::{evaluate, EvaluationSettings, HostView};
use kycd_collector::fleet::{Finding, FindingKind, FindingQuery, FindingState};
use kycd_collector::{Ingestor, Limits, Storage};
use kycd_protocol::{HostStatementClaims, Jwks, PrivateJwk, UsageRecord, UsageWindow};
use serde_json::json;

backend_tests! {
    runs_are_held_separately_filed_through_the_api_and_fall_overdue,
    cluster_capacity_is_held_per_site_and_fabric,
    measures_reach_foreign_persons_and_the_record_outlives_them,
}

const SETTINGS: EvaluationSettings =
    EvaluationSettings { dark_after_s: 1_000_000_000, policy_grace_s: 0, rejected_window_s: 3600 };
const WRITE_TOKEN: &str = "alice-write-token-0123456789";
/// The policy's reporting deadline in this test: one hour.
const DEADLINE_S: i64 = 3600;

/// Training at 2.5e18 (bio 1e18) per run or all-time; runs pause at most an hour.
fn policy_token(issuer: &PrivateJwk, version: u64, training_ops: f64) -> String {
    let now = kycd_protocol::clock::unix_now();
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now - 10, "exp": now + 86_400, "version": version,
        "measures": [], "unverified": {"action": "allow"},
        "thresholds": {"training_ops": training_ops, "bio_training_ops": 1e18, "cluster_flops": 1e30,
                       "early_warning_fraction": 0.99, "report_deadline_s": DEADLINE_S, "run_gap_s": 3600}
    }))
    .unwrap();
    kycd_protocol::sign(&claims, issuer).unwrap()
}

/// A window of `tenant` (none: unverified) at minute `minute` after [`base`], 1.5e17 ops.
fn at(tenant: Option<&str>, foreign: bool, minute: i64) -> UsageWindow {
    UsageWindow {
        tenant: tenant.map(Into::into),
        workload: tenant.map_or_else(|| "cgroup:/unverified.scope".into(), |t| format!("libvirt_domain:{t}")),
        foreign_person: foreign,
        ..window(base() + 60 * minute)
    }
}

/// A statement naming tenants `f` (foreign, owner in SG) and `b` (foreign, declares
/// biological sequence data) and `d` (domestic).
fn statement(host: &str) -> HostStatementClaims {
    let now = kycd_protocol::clock::unix_now();
    serde_json::from_value(json!({
        "iss": host, "iat": now, "exp": now + 60, "nonce": "n0nce-n0nce-n0nce-1", "agent_version": "0.1.0",
        "policy_version": 1, "gpus": [],
        "workloads": [
            {"workload": "libvirt_domain:f", "tenant": "f", "verdict": "allow", "attestation_digest": "ab".repeat(32),
             "subject": {"legal_name": "F <Holdings> GmbH", "countries": ["DE"], "beneficial_owner_countries": ["SG"],
                         "payment_source_country": "CH", "foreign_person": true,
                         "person_status": {"status": "foreign_person", "basis": "foreign_organized_entity"},
                         "beneficial_owners": [{"name": "Owner One", "countries": ["SG"]}],
                         "resellers": [{"name": "Resell AG", "country": "CH", "foreign_person": true}],
                         "kyc": {"issuer": "https://kyc.example", "jti": "att-f-1", "verified_at": 1700000000,
                                 "method": "document+registry"}}},
            {"workload": "libvirt_domain:b", "tenant": "b", "verdict": "allow",
             "subject": {"legal_name": "B Bio Ltd", "countries": ["GB"], "foreign_person": true,
                         "purposes": ["biological_sequence_data"]}},
            {"workload": "libvirt_domain:d", "tenant": "d", "verdict": "allow",
             "subject": {"legal_name": "D Inc", "countries": ["US"], "foreign_person": false}}
        ]
    }))
    .unwrap()
}

fn views(store: &dyn Storage, now: i64) -> Vec<HostView> {
    let mut views = kycd_collector::findings::host_views(store, SETTINGS, now).unwrap();
    for v in &mut views {
        v.statement = Some(statement(&v.host_id));
    }
    views
}

fn active(store: &dyn Storage, kind: FindingKind) -> Vec<Finding> {
    store
        .list_findings(&FindingQuery {
            kind: Some(kind),
            active: true,
            limit: 100,
            ..FindingQuery::default()
        })
        .unwrap()
}

fn subjects(findings: &[Finding]) -> Vec<String> {
    findings.iter().map(|f| f.finding.subject.clone()).collect()
}

async fn runs_are_held_separately_filed_through_the_api_and_fall_overdue(db: TestDb) {
    let collector = Collector::start(&db, Limits::default()).await;
    let (h1, h2) = (host_key("h1"), host_key("h2"));
    collector.enroll(&h1);
    collector.enroll(&h2);
    // f: run A on h1 and h2 at once (minutes 0..10, 20 windows = 3e18), then after 3 hours
    // run B on h1 (minutes 190..200, 10 windows = 1.5e18, below 2.5e18).
    // b (bio): 8 windows = 1.2e18 ≥ bio 1e18. d (domestic): 20 windows. Unverified: 20 windows.
    let mut h1_windows: Vec<UsageWindow> = (0..10).map(|m| at(Some("f"), true, m)).collect();
    h1_windows.extend((190..200).map(|m| at(Some("f"), true, m)));
    h1_windows.extend((0..8).map(|m| at(Some("b"), true, 300 + m)));
    h1_windows.extend((0..20).map(|m| at(Some("d"), false, 400 + m)));
    h1_windows.extend((0..20).map(|m| at(None, false, 500 + m)));
    let h2_windows: Vec<UsageWindow> = (0..10).map(|m| at(Some("f"), true, m)).collect();
    let records = |windows: Vec<UsageWindow>, from: u64| -> Vec<UsageRecord> {
        windows
            .into_iter()
            .zip(from..)
            .map(|(window, seq)| UsageRecord { seq, last_seq: None, window })
            .collect()
    };
    let h1_count = h1_windows.len() as u64;
    assert_eq!(send(collector.addr, &batch("h1", records(h1_windows, 1)), &h1).await.acked(), h1_count);
    assert_eq!(send(collector.addr, &batch("h2", records(h2_windows, 1)), &h2).await.acked(), 10);

    let store = db.storage();
    let issuer = PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "authority").unwrap();
    let trust = Jwks::from_keys([issuer.public_key()]).unwrap();
    let t0 = kycd_protocol::clock::unix_now();
    let run_a = format!("f/run/{}", base());
    let run_b = format!("f/run/{}", base() + 190 * 60);
    off_runtime(|| {
        kycd_collector::policy::publish(store.as_ref(), &policy_token(&issuer, 1, 2.5e18), &trust, t0)
            .unwrap();
        evaluate(store.as_ref(), &views(store.as_ref(), t0), SETTINGS, t0).unwrap();
        // Run A crossed, run B did not; all-time (4.5e18) crossed too.
        let runs = active(store.as_ref(), FindingKind::RunThresholdCrossed);
        let mut expected = vec![
            run_a.clone(),
            format!("b/run/{}", base() + 300 * 60),
            format!("d/run/{}", base() + 400 * 60),
        ];
        expected.sort();
        let mut got = subjects(&runs);
        got.sort();
        assert_eq!(got, expected, "{runs:?}");
        let a = runs.iter().find(|f| f.finding.subject == run_a).unwrap();
        assert_eq!(a.finding.due_at, Some(a.raised_at + DEADLINE_S), "foreign: due within the deadline");
        assert_eq!(a.finding.evidence["run"]["windows"], 20);
        assert_eq!(a.finding.evidence["run"]["hosts"], json!(["h1", "h2"]));
        assert_eq!(a.finding.evidence["threshold_name"], "training_ops");
        assert_eq!(a.finding.evidence["top_windows"].as_array().unwrap().len(), 20, "the run's windows only");
        let bio = runs.iter().find(|f| f.finding.tenant.as_deref() == Some("b")).unwrap();
        assert_eq!(bio.finding.evidence["threshold_name"], "bio_training_ops");
        let d = runs.iter().find(|f| f.finding.tenant.as_deref() == Some("d")).unwrap();
        assert_eq!(
            (d.finding.foreign_person, d.finding.due_at),
            (Some(false), None),
            "domestic: no deadline"
        );
        // f's runs (3e18, 1.5e18) reached bio_training_ops without declaring it: second tier.
        let mut tier2 = subjects(&active(store.as_ref(), FindingKind::BioEarlyWarning));
        tier2.retain(|s| s.starts_with("f/"));
        tier2.sort();
        assert_eq!(tier2, [run_a.clone(), run_b.clone()]);
        assert_eq!(subjects(&active(store.as_ref(), FindingKind::TrainingThresholdCrossed)), ["d", "f"]);
        let unverified = active(store.as_ref(), FindingKind::UnattributedTrainingScale);
        assert_eq!(subjects(&unverified), ["h1/cgroup:/unverified.scope"]);
        assert!(unverified[0].finding.due_at.is_some(), "unknown status is treated as foreign");
    });

    // Run B continues: 10 more windows make it cross on its own, as a second run finding.
    let more: Vec<UsageWindow> = (200..210).map(|m| at(Some("f"), true, m)).collect();
    assert_eq!(
        send(collector.addr, &batch("h1", records(more, h1_count + 1)), &h1).await.acked(),
        h1_count + 10
    );
    let t1 = t0 + 60;
    off_runtime(|| {
        evaluate(store.as_ref(), &views(store.as_ref(), t1), SETTINGS, t1).unwrap();
        let f_runs: Vec<String> = subjects(&active(store.as_ref(), FindingKind::RunThresholdCrossed))
            .into_iter()
            .filter(|s| s.starts_with("f/"))
            .collect();
        assert_eq!(f_runs, [run_a.clone(), run_b.clone()]);
        // A newer policy raises the threshold above every run: the crossings stay open.
        kycd_collector::policy::publish(store.as_ref(), &policy_token(&issuer, 2, 1e20), &trust, t1).unwrap();
        let report = evaluate(store.as_ref(), &views(store.as_ref(), t1), SETTINGS, t1).unwrap();
        assert!(report.resolved.is_empty(), "{report:?}");
        assert_eq!(active(store.as_ref(), FindingKind::RunThresholdCrossed).len(), 4);
    });

    // File run A through the API, as the named writer alice.
    let run_a_id = off_runtime(|| {
        active(store.as_ref(), FindingKind::RunThresholdCrossed)
            .iter()
            .find(|f| f.finding.subject == run_a)
            .unwrap()
            .id
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = kycd_collector::http::ApiState::new(
        Arc::clone(&store),
        kycd_collector::http::ReadAccess::loopback_only(),
        kycd_collector::http::WriteAccess::parse(&format!(
            "alice {WRITE_TOKEN}\nbob bob-token-0123456789abc"
        ))
        .unwrap(),
    );
    let app =
        kycd_collector::http::app(Arc::new(Ingestor::new(Arc::clone(&store) as _, Limits::default())), api);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(kycd_collector::http::serve(listener, app, shutdown.clone()));
    let path = |action: &str| format!("/v1/findings/{run_a_id}/{action}");
    let bearer = format!("Bearer {WRITE_TOKEN}");
    let auth = [("authorization", bearer.as_str()), ("content-type", "application/json")];
    let body = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let wrong = [("authorization", "Bearer not-a-write-token-000000")];
    assert_eq!(request(addr, "POST", &path("acknowledge"), &wrong, vec![]).await.status, 401);
    let acked = request(addr, "POST", &path("acknowledge"), &auth, vec![]).await;
    assert_eq!((acked.status, acked.body["state"].as_str()), (200, Some("acknowledged")), "{:?}", acked.body);
    assert_eq!(acked.body["acknowledged"]["by"], "alice");
    let bad =
        request(addr, "POST", &path("file"), &auth, body(json!({"reference": "x", "by": "mallory"}))).await;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    let filed =
        request(addr, "POST", &path("file"), &auth, body(json!({"reference": "BIS-2026-0042"}))).await;
    assert_eq!((filed.status, filed.body["state"].as_str()), (200, Some("filed")), "{:?}", filed.body);
    assert_eq!(
        (filed.body["filed"]["reference"].as_str(), filed.body["filed"]["by"].as_str()),
        (Some("BIS-2026-0042"), Some("alice"))
    );
    let again = request(addr, "POST", &path("dismiss"), &auth, body(json!({"reason": "late"}))).await;
    assert_eq!((again.status, again.body["kind"].as_str()), (409, Some("Conflict")));
    assert_eq!(request(addr, "POST", "/v1/findings/999999/acknowledge", &auth, vec![]).await.status, 404);
    shutdown.cancel();
    server.await.unwrap().unwrap();

    // The deadline passes (manual clock): every pending finding due by then is overdue, the
    // filed one is not; filing one resolves its overdue finding.
    let late = t1 + DEADLINE_S + 1;
    off_runtime(|| {
        let chain = kycd_collector::findings::audit_rows(store.as_ref(), 0).unwrap();
        let events: Vec<serde_json::Value> = chain
            .iter()
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.line).unwrap()["event"].clone())
            .collect();
        assert_eq!(
            events.iter().map(|e| e["type"].as_str().unwrap()).collect::<Vec<_>>(),
            ["finding_acknowledged", "finding_filed"]
        );
        assert_eq!(
            (events[1]["reference"].as_str(), events[1]["by"].as_str()),
            (Some("BIS-2026-0042"), Some("alice"))
        );
        assert_eq!(kycd_collector::fleet::lifecycle::verify_audit_log(chain).unwrap().records, 2);

        evaluate(store.as_ref(), &views(store.as_ref(), late), SETTINGS, late).unwrap();
        let overdue = active(store.as_ref(), FindingKind::ReportOverdue);
        let overdue_of: Vec<i64> =
            overdue.iter().map(|f| f.finding.evidence["finding_id"].as_i64().unwrap()).collect();
        assert!(!overdue_of.contains(&run_a_id), "filed in time: {overdue:?}");
        let b_id = active(store.as_ref(), FindingKind::RunThresholdCrossed)
            .iter()
            .find(|f| f.finding.subject == run_b)
            .unwrap()
            .id;
        assert!(overdue_of.contains(&b_id), "{overdue:?}");
        let d_run = active(store.as_ref(), FindingKind::RunThresholdCrossed)
            .into_iter()
            .find(|f| f.finding.tenant.as_deref() == Some("d"))
            .unwrap();
        assert!(!overdue_of.contains(&d_run.id), "domestic findings have no deadline");
        store
            .act_on_finding(
                b_id,
                &kycd_collector::fleet::FindingAction::File { reference: "BIS-2026-0043".into() },
                "bob",
                late + 5,
            )
            .unwrap();
        let report =
            evaluate(store.as_ref(), &views(store.as_ref(), late + 10), SETTINGS, late + 10).unwrap();
        assert!(
            report.resolved.iter().any(|(_, kind, subject)| *kind == FindingKind::ReportOverdue
                && subject == &format!("finding/{b_id}")),
            "{report:?}"
        );
        let filed = store
            .list_findings(&FindingQuery { id: Some(run_a_id), limit: 1, ..FindingQuery::default() })
            .unwrap();
        assert_eq!(filed[0].state, FindingState::Filed);
    });

    // The filing record of run A, through the command line.
    let report = std::process::Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
        .args(["report", &run_a_id.to_string(), "--db", &db.url])
        .output()
        .unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let record: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(record["finding"]["filed"]["reference"], "BIS-2026-0042");
    assert_eq!(record["customer"]["foreign_status"], "foreign");
    assert_eq!(record["customer"]["identity"]["legal_name"], "F <Holdings> GmbH");
    assert_eq!(record["customer"]["identity"]["detail"]["attestation_digest"], "ab".repeat(32));
    let subject = &record["customer"]["identity"]["detail"]["subject"];
    assert_eq!(subject["payment_source_country"], "CH");
    assert_eq!(
        (subject["kyc"]["issuer"].as_str(), subject["kyc"]["jti"].as_str()),
        (Some("https://kyc.example"), Some("att-f-1"))
    );
    assert_eq!(subject["beneficial_owners"][0]["name"], "Owner One");
    assert_eq!(
        subject["resellers"][0],
        json!({"name": "Resell AG", "country": "CH", "foreign_person": true})
    );
    let usage = &record["usage"];
    assert_eq!(
        (usage["scope"].as_str(), usage["first_start"].as_i64(), usage["last_end"].as_i64()),
        (Some("run"), Some(base()), Some(base() + 600))
    );
    assert_eq!((usage["windows"].as_u64(), usage["estimated_ops"].as_f64()), (Some(20), Some(3e18)));
    assert_eq!(usage["still_running"], false);
    assert!(usage["peak_flops"].as_f64().unwrap() > 1.5e16, "two hosts at once: {usage}");
    assert_eq!(record["hosts"], json!([{"host_id": "h1"}, {"host_id": "h2"}]), "unplaced hosts");
    assert_eq!(
        (record["policy"]["version"].as_u64(), record["policy"]["current_version"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(record["policy"]["threshold"]["training_ops"], 2.5e18);
    assert_eq!(record["evidence_windows"].as_array().unwrap().len(), 20);
    assert_eq!(record["audit"].as_array().unwrap().len(), 2);
    let html = std::process::Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
        .args(["report", &run_a_id.to_string(), "--format", "html", "--db", &db.url])
        .output()
        .unwrap();
    assert!(html.status.success());
    let html = String::from_utf8(html.stdout).unwrap();
    assert!(html.contains("F &lt;Holdings&gt; GmbH") && !html.contains("F <Holdings>"), "escaped");
    assert!(html.contains("BIS-2026-0042") && html.contains("@page"));
    assert!(
        html.contains("Resell AG (CH, foreign)") && html.contains("att-f-1") && html.contains("Owner One"),
        "{html}"
    );
    // The period export, foreign tenants only, then one tenant: the filing columns.
    let export = |extra: &[&str]| -> serde_json::Value {
        let since = base().to_string();
        let mut args = vec!["export", "--since", since.as_str(), "--format", "json", "--db", db.url.as_str()];
        args.extend_from_slice(extra);
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let foreign = export(&["--foreign-only"]);
    let tenants: Vec<&str> =
        foreign.as_array().unwrap().iter().map(|r| r["tenant"].as_str().unwrap()).collect();
    assert_eq!(tenants, ["b", "f"], "d is domestic");
    let f = &export(&["--tenant", "f"])[0];
    assert_eq!(
        (f["kyc_issuer"].as_str(), f["kyc_jti"].as_str()),
        (Some("https://kyc.example"), Some("att-f-1"))
    );
    assert_eq!((&f["attestation_digest"], &f["host_ids"]), (&json!("ab".repeat(32)), &json!(["h1", "h2"])));
    assert_eq!((f["payment_source_country"].as_str(), f["policy_version"].as_u64()), (Some("CH"), Some(2)));
    assert_eq!(f["ops_by_method"], json!({"gpm_tensor": 6e18}), "runs A and B, 40 windows");
    // --until cuts the period: run A's first minute only, on both hosts.
    let until = (base() + 60).to_string();
    let first = &export(&["--tenant", "f", "--until", until.as_str()])[0];
    assert_eq!(first["estimated_ops"].as_f64(), Some(3e17));
    collector.stop().await;
}

/// Four hosts of tenant `f` busy in the same minute (7.9e15 FLOP/s each): h1 and h2 in
/// fra/ib-1, h3 in fra/ib-2, h4 unplaced. Against 1.5e16 FLOP/s the fleet-wide figure
/// (3.16e16) crosses, and of the co-located clusters only fra/ib-1 (1.58e16): that finding is
/// the one due for filing. Placements are set with `hosts place`, which refuses unknown hosts
/// and bad names; `hosts list` shows them.
async fn cluster_capacity_is_held_per_site_and_fabric(db: TestDb) {
    let collector = Collector::start(&db, Limits::default()).await;
    let keys: Vec<PrivateJwk> = ["h1", "h2", "h3", "h4"].iter().map(|h| host_key(h)).collect();
    for key in &keys {
        collector.enroll(key);
    }
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--db", &db.url]);
        std::process::Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(&all).output().unwrap()
    };
    for (host, site, fabric) in [("h1", "fra", "ib-1"), ("h2", "fra", "ib-1"), ("h3", "fra", "ib-2")] {
        let out = cli(&["hosts", "place", "--host-id", host, "--site", site, "--fabric", fabric]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let unknown = cli(&["hosts", "place", "--host-id", "nobody", "--site", "fra", "--fabric", "ib-1"]);
    assert!(!unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("not enrolled"));
    let bad = cli(&["hosts", "place", "--host-id", "h4", "--site", "fra/1", "--fabric", "ib-1"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("site must be"));
    let listed = String::from_utf8(cli(&["hosts", "list"]).stdout).unwrap();
    assert!(listed.contains("placement=fra/ib-1") && listed.contains("placement=unplaced"), "{listed}");

    for key in &keys {
        let b =
            batch(key.kid(), vec![UsageRecord { seq: 1, last_seq: None, window: at(Some("f"), true, 0) }]);
        assert_eq!(send(collector.addr, &b, key).await.acked(), 1);
    }
    let store = db.storage();
    let issuer = PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "authority").unwrap();
    let trust = Jwks::from_keys([issuer.public_key()]).unwrap();
    let now = kycd_protocol::clock::unix_now();
    let id = off_runtime(|| {
        let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
            "iss": "authority", "iat": now - 10, "exp": now + 86_400, "version": 1,
            "measures": [], "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e30, "bio_training_ops": 1e30, "cluster_flops": 1.5e16,
                           "early_warning_fraction": 1.0}
        }))
        .unwrap();
        let token = kycd_protocol::sign(&claims, &issuer).unwrap();
        kycd_collector::policy::publish(store.as_ref(), &token, &trust, now).unwrap();
        evaluate(store.as_ref(), &views(store.as_ref(), now), SETTINGS, now).unwrap();
        let fleet_wide = active(store.as_ref(), FindingKind::ClusterCapacityCrossed);
        assert_eq!(subjects(&fleet_wide), ["f"]);
        assert_eq!(fleet_wide[0].finding.due_at, None, "the fleet-wide figure is not the rule's cluster");
        let colocated = active(store.as_ref(), FindingKind::ColocatedCapacityCrossed);
        assert_eq!(subjects(&colocated), ["f/cluster/fra/ib-1"]);
        assert!(colocated[0].finding.due_at.is_some());
        let cluster = &colocated[0].finding.evidence["cluster"];
        assert_eq!(
            (cluster["site"].as_str(), cluster["fabric"].as_str(), cluster["hosts"].as_u64()),
            (Some("fra"), Some("ib-1"), Some(2))
        );
        assert!((cluster["peak_flops"].as_f64().unwrap() / 1.58e16 - 1.0).abs() < 1e-9, "{cluster}");
        let usage = store.tenant_usage(Some("f"), None).unwrap();
        let names: Vec<String> = usage[0].clusters.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["fra/ib-1", "fra/ib-2", "unplaced"]);
        colocated[0].id
    });
    let id = id.to_string();
    let out = cli(&["report", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["hosts"][0], json!({"host_id": "h1", "site": "fra", "fabric": "ib-1"}));
    assert_eq!(record["hosts"][3], json!({"host_id": "h4"}));
    assert_eq!(record["usage"]["scope"], "tenant");
    assert_eq!(record["usage"]["clusters"][0]["fabric"], "ib-1");
    collector.stop().await;
}

/// A statement in which host h1 allows `f` (foreign) and `u` (a U.S. person) whose
/// beneficial owner is in KP.
fn kp_owned_statement(host: &str) -> HostStatementClaims {
    let now = kycd_protocol::clock::unix_now();
    let subject = |name: &str, foreign: bool| {
        json!({"legal_name": name, "countries": [if foreign { "DE" } else { "US" }],
               "beneficial_owner_countries": ["KP"], "foreign_person": foreign,
               "beneficial_owners": [{"name": "Owner", "countries": ["KP"]}]})
    };
    serde_json::from_value(json!({
        "iss": host, "iat": now, "exp": now + 60, "nonce": "n0nce-n0nce-n0nce-2", "agent_version": "0.1.0",
        "policy_version": 2, "gpus": [],
        "workloads": [
            {"workload": "libvirt_domain:f", "tenant": "f", "verdict": "allow", "subject": subject("F GmbH", true)},
            {"workload": "libvirt_domain:u", "tenant": "u", "verdict": "allow", "subject": subject("U Inc", false)}
        ]
    }))
    .unwrap()
}

/// Under a `foreign_persons` measure on KP-owned customers, a host allowing the U.S. person is
/// consistent and one allowing the foreign person is not (`enforcement_mismatch` for `f`
/// only); under `applies_to: all` both are mismatches. Then the record: pruning windows inside
/// the retention minimum is refused as a whole; past it, rows tied to findings not yet filed
/// are kept; once every finding is filed or dismissed they go, and the findings, the audit log
/// and the current identities stay.
async fn measures_reach_foreign_persons_and_the_record_outlives_them(db: TestDb) {
    let collector = Collector::start(&db, Limits::default()).await;
    let h1 = host_key("h1");
    collector.enroll(&h1);
    let windows: Vec<UsageRecord> = [("f", true), ("u", false)]
        .iter()
        .flat_map(|(t, foreign)| (0..5).map(move |m| at(Some(t), *foreign, m)))
        .zip(1..)
        .map(|(window, seq)| UsageRecord { seq, last_seq: None, window })
        .collect();
    assert_eq!(send(collector.addr, &batch("h1", windows), &h1).await.acked(), 10);
    let store = db.storage();
    let issuer = PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "authority").unwrap();
    let trust = Jwks::from_keys([issuer.public_key()]).unwrap();
    let now = kycd_protocol::clock::unix_now();
    let publish = |version: u64, applies_to: Option<&str>| {
        let mut measure = json!({"id": "m-kp", "match": {"countries": ["KP"]}, "roles": ["beneficial_owner"],
                                 "action": "prohibit", "citation": "EO 13984"});
        if let Some(scope) = applies_to {
            measure["applies_to"] = json!(scope);
        }
        let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
            "iss": "authority", "iat": now - 10, "exp": now + 86_400, "version": version,
            "measures": [measure], "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e30, "bio_training_ops": 1e30, "cluster_flops": 1e30,
                           "early_warning_fraction": 1.0}
        }))
        .unwrap();
        let token = kycd_protocol::sign(&claims, &issuer).unwrap();
        kycd_collector::policy::publish(store.as_ref(), &token, &trust, now).unwrap();
    };
    let views = |store: &dyn Storage| {
        let mut views = kycd_collector::findings::host_views(store, SETTINGS, now).unwrap();
        for v in &mut views {
            v.statement = Some(kp_owned_statement(&v.host_id));
        }
        views
    };
    off_runtime(|| {
        publish(1, None);
        evaluate(store.as_ref(), &views(store.as_ref()), SETTINGS, now).unwrap();
        let mismatches = active(store.as_ref(), FindingKind::EnforcementMismatch);
        assert_eq!(subjects(&mismatches), ["h1/libvirt_domain:f"], "the U.S. person is allowed");
        publish(2, Some("all"));
        evaluate(store.as_ref(), &views(store.as_ref()), SETTINGS, now).unwrap();
        let mut mismatches = subjects(&active(store.as_ref(), FindingKind::EnforcementMismatch));
        mismatches.sort();
        assert_eq!(mismatches, ["h1/libvirt_domain:f", "h1/libvirt_domain:u"], "applies_to all");

        // The windows are three days old: inside the 5-year default, refused as a whole.
        // (On PostgreSQL: the end of their month, which may be ahead of `now`; the prunes
        // below then pretend to run just after it.)
        let before = cutoff_after(&db, base() + 86_400);
        let young = kycd_collector::records::prune(store.as_ref(), before, now, 157_680_000, false);
        let now = now.max(before + 1);
        assert!(
            matches!(young, Err(kycd_collector::records::RetentionError::InsideRetention { .. })),
            "{young:?}"
        );
        // With a one-second minimum they are old enough, but the open mismatches (about h1)
        // tie them all.
        let tied = kycd_collector::records::prune(store.as_ref(), before, now, 1, false).unwrap();
        assert_eq!((tied.records, tied.refused_records), (0, 10), "{tied:?}");
        for finding in store
            .list_findings(&FindingQuery { active: true, limit: 100, ..FindingQuery::default() })
            .unwrap()
        {
            let reason = kycd_collector::fleet::FindingAction::Dismiss { reason: "test fleet".into() };
            store.act_on_finding(finding.id, &reason, "carol", now).unwrap();
        }
        let totals = store.tenant_usage(None, None).unwrap();
        let pruned = kycd_collector::records::prune(store.as_ref(), before, now, 1, false).unwrap();
        assert_eq!((pruned.records, pruned.refused()), (10, 0), "{pruned:?}");
        // The windows are gone; the roll-ups keep the tenants' usage (detail aged out, not
        // the totals), and the check says it can no longer compare them.
        let windows = store.fleet_usage_from_windows(kycd_collector::fleet::Period::default()).unwrap();
        assert!(windows.tenants.is_empty());
        assert_eq!(
            serde_json::to_value(store.tenant_usage(None, None).unwrap()).unwrap(),
            serde_json::to_value(&totals).unwrap()
        );
        let checks = store.rollup_check().unwrap();
        assert!(checks.iter().all(|c| c.differences == 0), "{checks:#?}");
        assert!(checks.iter().any(|c| c.table == "rollup_subjects" && c.not_compared.is_some()));
        assert_eq!(
            store.list_findings(&FindingQuery { limit: 100, ..FindingQuery::default() }).unwrap().len(),
            2
        );
        assert_eq!(kycd_collector::findings::audit_rows(store.as_ref(), 0).unwrap().len(), 2);
        assert_eq!(store.tenant_identities().unwrap().len(), 2);
    });
    // The same refusal from the command line: a non-zero exit naming the retention.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
        .args(["records", "prune", "--before", &base().to_string(), "--db", &db.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("retention"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    collector.stop().await;
}
