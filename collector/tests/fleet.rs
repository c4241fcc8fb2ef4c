//! The fleet view end to end on each backend (a SQLite file, a PostgreSQL database): 50
//! simulated hosts' signed usage reports
//! for 5 tenants go through the real ingest pipeline, hosts' statements name who runs where,
//! and the findings are exactly what a reader of the regulation expects; then the read API
//! over real TCP, the policy endpoint's ETag, and the export round trip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use kycd_collector::findings::{evaluate, EvaluationSettings, HostView};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::{Ingestor, Limits, Storage};
use kycd_protocol::{
    Algorithm, EstimationMethod, HostStatementClaims, Jwks, PrivateJwk, UsageRecord, UsageWindow,
};
use serde_json::json;

backend_tests!(
    a_simulated_fleet_raises_exactly_the_expected_findings_once,
    export_round_trips_through_csv_and_json,
    the_read_api_serves_pages_the_policy_with_etags_and_needs_its_token,
);

// No policy grace: the statements below are taken right after publication (the grace rule
// has its own unit test).
const SETTINGS: EvaluationSettings =
    EvaluationSettings { dark_after_s: 180, policy_grace_s: 0, rejected_window_s: 3600 };

fn now() -> i64 {
    kycd_protocol::clock::unix_now()
}

/// A policy scaled down to simulation size (thresholds are policy data): training at 2e19
/// operations, early warning at half of it, cluster capacity at 1e17 FLOP/s; tenants with a
/// beneficial owner in CN are prohibited.
fn policy_token(issuer: &PrivateJwk, version: u64) -> String {
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now() - 10, "exp": now() + 86_400, "version": version,
        "measures": [{"id": "m-cn", "match": {"countries": ["CN"]},
                      "roles": ["customer", "beneficial_owner", "reseller", "payment_source"],
                      "action": "prohibit", "citation": "EO 13984 sec. 2"}],
        "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 2e19, "bio_training_ops": 1e19, "cluster_flops": 1e17,
                       "early_warning_fraction": 0.5}
    }))
    .unwrap();
    kycd_protocol::sign(&claims, issuer).unwrap()
}

fn usage(tenant: &str, foreign: bool, start: i64, ops: f64, peak_flops: f64) -> UsageWindow {
    UsageWindow {
        tenant: Some(tenant.into()),
        workload: format!("libvirt_domain:{tenant}"),
        foreign_person: foreign,
        foreign_status: None,
        start,
        end: start + 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops: ops,
        ops_lower: None,
        ops_upper: None,
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops,
        method: EstimationMethod::GpmTensor,
        training_like: true,
        merged_windows: 1,
    }
}

fn host_name(i: usize) -> String {
    format!("h{i:02}")
}

struct Fleet {
    store: Arc<dyn Storage>,
    ingestor: Ingestor,
    keys: Vec<PrivateJwk>,
    issuer: PrivateJwk,
    base: i64,
}

impl Fleet {
    /// Opens the test's database by URL (call off the async runtime).
    fn new(db: &TestDb) -> Fleet {
        let store = kycd_collector::open_store(&db.url).unwrap();
        let ingestor = Ingestor::new(store.clone(), Limits::default());
        let keys: Vec<PrivateJwk> = (1..=50).map(|i| host_key(&host_name(i))).collect();
        for key in &keys {
            store.enroll_host(key.kid(), &key.public_key(), now() - 30).unwrap();
        }
        let issuer = PrivateJwk::generate(Algorithm::EdDSA, "authority").unwrap();
        // Windows aligned to minutes, within the last four hours (ingest takes none that
        // ends after the receive time).
        let base = (now() - 4 * 3600) / 60 * 60;
        Fleet { store, ingestor, keys, issuer, base }
    }

    /// Uploads `windows` for host `i` (1-based) as one signed batch through the ingest
    /// pipeline, continuing the host's sequence numbers.
    fn report(&self, i: usize, windows: Vec<UsageWindow>) {
        let key = &self.keys[i - 1];
        let first = self.store.acked_seq(key.kid(), 1).unwrap() + 1;
        let records = windows
            .into_iter()
            .zip(first..)
            .map(|(window, seq)| UsageRecord { seq, last_seq: None, window })
            .collect();
        let (body, sig) = signed(&batch(key.kid(), records), key);
        self.ingestor.ingest(sig.as_bytes(), &body, now()).unwrap();
    }

    fn publish(&self, version: u64) {
        let trust = Jwks::from_keys([self.issuer.public_key()]).unwrap();
        kycd_collector::policy::publish(
            self.store.as_ref(),
            &policy_token(&self.issuer, version),
            &trust,
            now(),
        )
        .unwrap();
    }
}

/// 5 tenants over 50 hosts, each window's operations at most its peak FLOP/s over its 60 s
/// (what ingest accepts):
/// - `t-foreign-spread`: foreign, 20 hosts × 10 windows × 6e16 (1e15 FLOP/s) = 1.2e19 ops
///   (early warning at 1e19, below training at 2e19), 2e16 FLOP/s concurrent: early warning
///   only;
/// - `t-foreign-cluster`: foreign, 30 hosts × 2 simultaneous windows at 4e15 FLOP/s = 1.2e17
///   concurrent (≥ 1e17), 6e18 ops: cluster capacity only;
/// - `t-domestic-large`: domestic, 10 hosts × 2 × 1.2e18 (2e16 FLOP/s, each host in minutes
///   of its own: 2e16 concurrent) = 2.4e19 ops: early warning and training threshold, flagged
///   domestic;
/// - `t-foreign-small`: foreign, 5 hosts, tiny: nothing;
/// - `t-prohibited`: beneficial owner in CN, running on h03 whose statement says `allow`:
///   enforcement mismatch.
fn simulate(fleet: &Fleet) {
    let b = fleet.base;
    for i in 1..=50 {
        let mut windows = Vec::new();
        if i <= 20 {
            windows.extend((0..10).map(|k| usage("t-foreign-spread", true, b + 60 * k, 6e16, 1e15)));
        }
        if i > 20 {
            windows.extend((0..2).map(|k| usage("t-foreign-cluster", true, b + 60 * (20 + k), 1e17, 4e15)));
        }
        if i <= 10 {
            let minute = |k| b + 60 * (40 + 2 * i64::try_from(i).unwrap() + k);
            windows.extend((0..2).map(|k| usage("t-domestic-large", false, minute(k), 1.2e18, 2e16)));
        }
        if (41..=45).contains(&i) {
            windows.push(usage("t-foreign-small", true, b + 60 * 50, 1e15, 1e14));
        }
        if i == 3 {
            windows.push(usage("t-prohibited", true, b + 60 * 60, 1e15, 1e14));
        }
        fleet.report(i, windows);
    }
}

fn statement(host: &str, policy_version: u64, workloads: serde_json::Value) -> HostStatementClaims {
    serde_json::from_value(json!({
        "iss": host, "iat": now(), "exp": now() + 60, "nonce": "n0nce-n0nce-n0nce-1",
        "agent_version": "0.1.0", "policy_version": policy_version, "workloads": workloads, "gpus": []
    }))
    .unwrap()
}

/// The hosts as the rules see them: reports from the store, statements for h02 (still on
/// policy 1 after the grace period) and h03 (allows the prohibited tenant), `dark` enrolled
/// long ago and never heard from.
fn hosts(fleet: &Fleet) -> Vec<HostView> {
    let mut views = kycd_collector::findings::host_views(fleet.store.as_ref(), SETTINGS, now()).unwrap();
    for view in &mut views {
        match view.host_id.as_str() {
            "h02" => view.statement = Some(statement("h02", 1, json!([]))),
            "h03" => {
                view.statement = Some(statement(
                    "h03",
                    2,
                    json!([{"workload": "libvirt_domain:t-prohibited", "tenant": "t-prohibited",
                            "attestation_digest": "ab".repeat(32), "attestation_exp": now() + 3600,
                            "verdict": "allow",
                            "subject": {"legal_name": "Shell Holding Ltd", "countries": ["SG"],
                                        "beneficial_owner_countries": ["CN"], "foreign_person": true}}]),
                ))
            }
            _ => {}
        }
    }
    views
}

fn open_set(fleet: &Fleet) -> BTreeSet<(String, String, Option<bool>)> {
    fleet
        .store
        .list_findings(&FindingQuery {
            state: Some(FindingState::Open),
            limit: 1000,
            ..FindingQuery::default()
        })
        .unwrap()
        .into_iter()
        .filter(|f| !is_run_kind(f.finding.kind))
        .map(|f| (f.finding.kind.as_str().to_owned(), f.finding.subject, f.finding.foreign_person))
        .collect()
}

/// The per-run kinds (tests/filing.rs covers them): this simulation checks the all-time and
/// host rules.
fn is_run_kind(kind: FindingKind) -> bool {
    matches!(kind, FindingKind::RunThresholdCrossed | FindingKind::BioEarlyWarning)
}

/// What `report` raised, run kinds left out.
fn raised(report: &kycd_collector::findings::EvaluationReport) -> Vec<(FindingKind, &str)> {
    report.raised.iter().filter(|r| !is_run_kind(r.1)).map(|r| (r.1, r.2.as_str())).collect()
}

fn expected(rows: &[(&str, &str, Option<bool>)]) -> BTreeSet<(String, String, Option<bool>)> {
    rows.iter().map(|(k, s, f)| ((*k).to_owned(), (*s).to_owned(), *f)).collect()
}

async fn a_simulated_fleet_raises_exactly_the_expected_findings_once(db: TestDb) {
    off_runtime(|| simulated_fleet_findings(&db));
}

fn simulated_fleet_findings(db: &TestDb) {
    let fleet = Fleet::new(db);
    simulate(&fleet);
    let dark_key = host_key("dark");
    fleet.store.enroll_host("dark", &dark_key.public_key(), now() - 10_000).unwrap();

    // No policy yet: thresholds are policy data, so only host rules run.
    let report = evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap();
    assert_eq!(report.policy_version, None);
    assert_eq!(open_set(&fleet), expected(&[("host_dark", "dark", None)]));

    fleet.publish(1);
    fleet.publish(2);
    let report = evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap();
    assert_eq!(report.policy_version, Some(2));
    assert_eq!(raised(&report).len(), 7, "{report:?}");
    assert_eq!(
        open_set(&fleet),
        expected(&[
            ("cluster_capacity_crossed", "t-foreign-cluster", Some(true)),
            // No host is placed in a site: they are one (unplaced) cluster, the fleet-wide figure.
            ("colocated_capacity_crossed", "t-foreign-cluster/cluster/unplaced", Some(true)),
            ("early_warning", "t-domestic-large", Some(false)),
            ("early_warning", "t-foreign-spread", Some(true)),
            ("enforcement_mismatch", "h03/libvirt_domain:t-prohibited", Some(true)),
            ("host_dark", "dark", None),
            ("policy_stale", "h02", None),
            ("training_threshold_crossed", "t-domestic-large", Some(false)),
        ])
    );

    // Evidence: totals, thresholds, the windows that weigh most and every host involved.
    let spread = fleet
        .store
        .list_findings(&FindingQuery {
            kind: Some(FindingKind::EarlyWarning),
            tenant: Some("t-foreign-spread".into()),
            limit: 10,
            ..FindingQuery::default()
        })
        .unwrap();
    let evidence = &spread[0].finding.evidence;
    assert!((evidence["estimated_ops"].as_f64().unwrap() - 1.2e19).abs() < 1e9, "{evidence}");
    assert_eq!(evidence["hosts"], 20);
    assert_eq!(evidence["host_ids"].as_array().unwrap().len(), 20);
    assert_eq!(evidence["top_windows"].as_array().unwrap().len(), 20);
    assert_eq!(evidence["threshold"]["early_warning_ops"], 1e19);
    let cluster = fleet.store.tenant_usage(Some("t-foreign-cluster"), None).unwrap();
    assert!(
        (cluster[0].peak_flops - 1.2e17).abs() < 1e6 && cluster[0].peak_at == fleet.base + 60 * 20,
        "{cluster:?}"
    );
    assert_eq!((cluster[0].hosts, cluster[0].gpus, cluster[0].windows), (30, 240, 60));
    let identity = fleet.store.tenant_identities().unwrap();
    assert_eq!(identity.len(), 1);
    assert_eq!(
        (identity[0].tenant.as_str(), identity[0].legal_name.as_str()),
        ("t-prohibited", "Shell Holding Ltd")
    );

    // Holding conditions are raised once.
    let again = evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap();
    assert!(again.raised.is_empty() && again.resolved.is_empty(), "{again:?}");
    assert_eq!(again.open, report.open);

    // The dark host reports: resolved; more usage does not re-raise what is open.
    let dark_batch = batch(
        "dark",
        vec![UsageRecord {
            seq: 1,
            last_seq: None,
            window: usage("t-foreign-small", true, fleet.base, 1e15, 1e14),
        }],
    );
    let (body, sig) = signed(&dark_batch, &dark_key);
    fleet.ingestor.ingest(sig.as_bytes(), &body, now()).unwrap();
    fleet.report(5, vec![usage("t-foreign-spread", true, fleet.base + 3600, 6e16, 1e15)]);
    let after = evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap();
    assert_eq!(raised(&after), []);
    assert_eq!(
        after.resolved.iter().map(|r| (r.1, r.2.as_str())).collect::<Vec<_>>(),
        [(FindingKind::HostDark, "dark")]
    );
    assert_eq!(open_set(&fleet).len(), 7);
    let resolved = fleet
        .store
        .list_findings(&FindingQuery {
            state: Some(FindingState::Resolved),
            limit: 10,
            ..FindingQuery::default()
        })
        .unwrap();
    assert_eq!(resolved.len(), 1);
    assert!(resolved[0].resolved_at.is_some());

    // The foreign spread tenant keeps training and crosses the training threshold: raised
    // as a new state change, the early warning stays the one raised before. 20 hosts × 3
    // windows × 3e17 (5e15 FLOP/s, each host in minutes of its own: no cluster capacity).
    for i in 1..=20 {
        let minute = |k: i64| fleet.base + 4020 + 60 * (3 * i64::try_from(i).unwrap() + k);
        fleet.report(i, (0..3).map(|k| usage("t-foreign-spread", true, minute(k), 3e17, 5e15)).collect());
    }
    let crossed = evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap();
    assert_eq!(raised(&crossed), [(FindingKind::TrainingThresholdCrossed, "t-foreign-spread")]);
}

async fn export_round_trips_through_csv_and_json(db: TestDb) {
    off_runtime(|| export_round_trip(&db));
}

fn export_round_trip(db: &TestDb) {
    let fleet = Fleet::new(db);
    simulate(&fleet);
    fleet.publish(2);
    evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap();

    let rows = kycd_collector::export::rows(fleet.store.as_ref(), fleet.base - 60).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>(),
        ["t-domestic-large", "t-foreign-cluster", "t-foreign-small", "t-foreign-spread", "t-prohibited"]
    );
    let json = kycd_collector::export::render(&rows, kycd_collector::export::Format::Json).unwrap();
    let parsed: Vec<kycd_collector::export::ExportRow> = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, rows);

    let csv = kycd_collector::export::render(&rows, kycd_collector::export::Format::Csv).unwrap();
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[0], kycd_collector::export::CSV_HEADER.join(","));
    assert_eq!(lines.len(), 6);
    // Columns by header name (the three operation figures sit side by side).
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let large: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(large[col("tenant")], "t-domestic-large");
    assert_eq!(large[col("foreign_person")], "false");
    // Old-agent windows (no bounds): all three figures are the estimate.
    for figure in ["ops_lower", "estimated_ops", "ops_upper"] {
        let value = large[col(figure)].parse::<f64>().unwrap();
        assert!((value - 2.4e19).abs() < 1e9, "{figure} = {value}");
    }
    assert_eq!(large[col("shared_gpu_hours")], "0.000");
    assert_eq!(large[col("guest_gap_gpu_hours")], "0.000");
    assert_eq!(large[col("hosts")], "10");
    let found: BTreeSet<&str> =
        large[col("findings")].split(' ').map(|f| f.split('#').next().unwrap()).collect();
    assert_eq!(
        found,
        BTreeSet::from([
            "bio_early_warning",
            "early_warning",
            "run_threshold_crossed",
            "training_threshold_crossed"
        ])
    );
    let prohibited: Vec<&str> = lines[5].split(',').collect();
    assert_eq!(
        (
            prohibited[col("legal_name")],
            prohibited[col("beneficial_owner_countries")],
            prohibited[col("foreign_person")]
        ),
        ("Shell Holding Ltd", "CN", "true")
    );
    // The host's mismatch names the tenant: it belongs in the tenant's filing too.
    assert!(
        prohibited[col("findings")].starts_with("enforcement_mismatch#"),
        "{}",
        prohibited[col("findings")]
    );

    // A period that starts after every window exports nothing.
    assert!(kycd_collector::export::rows(fleet.store.as_ref(), now() + 60).unwrap().is_empty());
}

async fn the_read_api_serves_pages_the_policy_with_etags_and_needs_its_token(db: TestDb) {
    // Store calls run off the runtime (the PostgreSQL client blocks on a runtime of its own).
    let fleet = off_runtime(|| {
        let fleet = Fleet::new(&db);
        simulate(&fleet);
        fleet
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Arc<dyn Storage> = fleet.store.clone();
    let api = kycd_collector::http::ApiState::new(
        store.clone(),
        kycd_collector::http::ReadAccess::token("read-token-0123456789"),
        kycd_collector::http::WriteAccess::none(),
    );
    let app = kycd_collector::http::app(Arc::new(Ingestor::new(store, Limits::default())), api);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(kycd_collector::http::serve(listener, app, shutdown.clone()));
    let auth = [("authorization", "Bearer read-token-0123456789")];

    // Policy: 404 before publication, then the token with an ETag, then 304 on a match.
    assert_eq!(request(addr, "GET", "/v1/policy", &[], vec![]).await.status, 404);
    off_runtime(|| fleet.publish(2));
    let served = request(addr, "GET", "/v1/policy", &[], vec![]).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.headers["content-type"], "application/jose");
    assert_eq!(served.body.as_str().unwrap(), off_runtime(|| policy_token_of(&fleet)));
    let etag = served.headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with("\"2-"), "{etag}");
    let cached = request(addr, "GET", "/v1/policy", &[("if-none-match", &etag)], vec![]).await;
    assert_eq!(cached.status, 304);
    let stale =
        request(addr, "GET", "/v1/policy", &[("if-none-match", "\"1-0000000000000000\"")], vec![]).await;
    assert_eq!(stale.status, 200);

    // Reads need the token.
    let refused = request(addr, "GET", "/v1/tenants", &[], vec![]).await;
    assert_eq!((refused.status, refused.kind()), (401, "Unauthorized"));
    let wrong = request(addr, "GET", "/v1/findings", &[("authorization", "Bearer nope")], vec![]).await;
    assert_eq!(wrong.status, 401);
    let console = request(addr, "GET", "/", &[], vec![]).await;
    assert_eq!((console.status, console.headers["location"].to_str().unwrap()), (303, "/console/login"));

    off_runtime(|| evaluate(fleet.store.as_ref(), &hosts(&fleet), SETTINGS, now()).unwrap());
    // Findings, two per page, followed to the end.
    let mut seen = Vec::new();
    let mut path = "/v1/findings?state=open&limit=2".to_owned();
    loop {
        let page = request(addr, "GET", &path, &auth, vec![]).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|f| f["kind"].as_str().unwrap().to_owned()));
        match page.body["next"].as_str() {
            Some(next) => path = format!("/v1/findings?state=open&limit=2&after={next}"),
            None => break,
        }
    }
    // The seven of the simulation, and the three per-run findings (see tests/filing.rs).
    assert_eq!(seen.len(), 10, "{seen:?}");
    assert_eq!(seen.iter().filter(|k| k.contains("run_") || k.starts_with("bio_")).count(), 3, "{seen:?}");
    let filtered = request(addr, "GET", "/v1/findings?kind=early_warning", &auth, vec![]).await;
    assert_eq!(filtered.body["items"].as_array().unwrap().len(), 2);
    for bad in [
        "/v1/findings?kind=bogus",
        "/v1/findings?limit=0",
        "/v1/findings?limit=5000",
        "/v1/tenants?color=red",
    ] {
        let r = request(addr, "GET", bad, &auth, vec![]).await;
        assert_eq!((r.status, r.kind()), (400, "BadRequest"), "{bad}: {:?}", r.body);
    }

    let tenants = request(addr, "GET", "/v1/tenants?limit=3", &auth, vec![]).await;
    assert_eq!(tenants.body["items"].as_array().unwrap().len(), 3);
    assert_eq!(tenants.body["next"], "t-foreign-small");
    let rest = request(addr, "GET", "/v1/tenants?after=t-foreign-small", &auth, vec![]).await;
    let names: Vec<&str> =
        rest.body["items"].as_array().unwrap().iter().map(|t| t["tenant"].as_str().unwrap()).collect();
    assert_eq!(names, ["t-foreign-spread", "t-prohibited"]);
    let one = request(addr, "GET", "/v1/tenants/t-prohibited", &auth, vec![]).await;
    assert_eq!(one.body["identity"]["legal_name"], "Shell Holding Ltd");
    assert_eq!(one.body["findings"][0]["kind"], "enforcement_mismatch");
    // The three operation figures side by side (old-agent windows: the estimate thrice), and
    // the shared GPU-seconds, in the usage and in each evidence window.
    let usage = &one.body["usage"];
    assert!(usage["estimated_ops"].as_f64().unwrap() > 0.0, "{usage}");
    assert_eq!(
        (&usage["ops_lower"], &usage["ops_upper"]),
        (&usage["estimated_ops"], &usage["estimated_ops"])
    );
    assert_eq!((&usage["shared_gpu_seconds"], &usage["shared_gpu_hosts"]), (&json!(0.0), &json!([])));
    assert_eq!(
        (&usage["guest_gap_gpu_seconds"], &usage["guest_gap_hosts"], &usage["guest_gap_workloads"]),
        (&json!(0.0), &json!([]), &json!([]))
    );
    let top = &one.body["top_windows"][0];
    assert_eq!((&top["ops_lower"], &top["ops_upper"]), (&top["estimated_ops"], &top["estimated_ops"]));
    assert_eq!((&top["shared_gpu_seconds"], &top["guest_gap_gpu_seconds"]), (&json!(0.0), &json!(0.0)));
    assert_eq!(request(addr, "GET", "/v1/tenants/nobody", &auth, vec![]).await.status, 404);
    let hosts = request(addr, "GET", "/v1/hosts?limit=1000", &auth, vec![]).await;
    assert_eq!(hosts.body["items"].as_array().unwrap().len(), 50);

    let html = request(addr, "GET", "/", &auth, vec![]).await;
    assert_eq!(html.status, 200);
    assert_eq!(html.headers["content-type"], "text/html; charset=utf-8");
    let page = html.body.as_str().unwrap();
    assert!(
        page.contains("Published policy<b>version 2</b>") && page.contains("t-foreign-cluster"),
        "{page}"
    );
    assert!(page.contains("Shell Holding Ltd") && page.contains("cluster_capacity_crossed"));
    assert!(
        page.contains("<th>operations (lower · point · upper)</th>")
            && page.contains("<th>shared GPU-hours</th><th>GPU-hours without guest telemetry</th>"),
        "{page}"
    );

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

fn policy_token_of(fleet: &Fleet) -> String {
    fleet.store.current_policy().unwrap().unwrap().token
}
