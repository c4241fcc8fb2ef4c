//! The compliance console in a real browser: a collector (real ingest of signed batches over
//! TCP, the real evaluator, SQLite) serves the console, and headless Chromium, driven through
//! WebDriver by Selenium (`browser/console.py`), logs in with a write token and walks the
//! overview, a tenant, the hosts and a finding:
//! - every page loads with no browser console error (no script, no blocked resource);
//! - the chart's lower-to-upper band contains every plotted point (SVG coordinates read
//!   through the DOM), with the three thresholds and the tenant's three runs drawn;
//! - acknowledging and filing the finding with a reference changes its state on the page;
//!   this test then checks the store (state, reference, actor) and the audit log.
//!
//! Around it, over plain HTTP: an unauthenticated POST of an action is refused (403), so is
//! one with a session but without its CSRF token, and one from a read-only session; none of
//! them moves the finding. `KYCD_SCREENSHOTS=docs/img` keeps a screenshot of each page.
//!
//! Also, on both backends: the per-day roll-ups the chart reads (`tenant_rollups`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use kycd_collector::findings::{evaluate, EvaluationSettings};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::statements::PollOutcome;
use kycd_collector::{Ingestor, Limits, Storage};
use kycd_protocol::{EstimationMethod, HostStatementClaims, Jwks, PrivateJwk, UsageRecord, UsageWindow};
use serde_json::json;

backend_tests! { the_chart_reads_the_tenants_days }

const READ_TOKEN: &str = "console-read-token-0123456789";
const WRITE_TOKEN: &str = "alice-console-write-token-0123";
const SETTINGS: EvaluationSettings =
    EvaluationSettings { dark_after_s: 1_000_000_000, policy_grace_s: 0, rejected_window_s: 3600 };

fn policy_token(issuer: &PrivateJwk) -> String {
    let now = kycd_protocol::clock::unix_now();
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now - 10, "exp": now + 86_400, "version": 2,
        "measures": [{"id": "m-cn", "match": {"countries": ["CN"]},
                      "roles": ["customer", "beneficial_owner", "reseller", "payment_source"],
                      "action": "prohibit", "citation": "EO 13984 sec. 2"}],
        "unverified": {"action": "allow"},
        "thresholds": {"training_ops": 2e19, "bio_training_ops": 4e19, "cluster_flops": 1e30,
                       "early_warning_fraction": 0.25, "run_gap_s": 3600}
    }))
    .unwrap();
    kycd_protocol::sign(&claims, issuer).unwrap()
}

/// A window of `tenant` at `minute` after `origin`: 1.5e17 operations, bounds 0.6× and 2×.
fn at(origin: i64, tenant: &str, foreign: bool, minute: i64, method: EstimationMethod) -> UsageWindow {
    UsageWindow {
        tenant: Some(tenant.into()),
        workload: format!("libvirt_domain:{tenant}"),
        foreign_person: foreign,
        ops_lower: Some(0.9e17),
        ops_upper: Some(3e17),
        method,
        ..window(origin + 60 * minute)
    }
}

/// Three runs of `f` a day apart on h1 and h2 (two methods), a small domestic tenant `d`
/// (144 GPU-seconds), and on h2 tenant `x` whose beneficial owner is in CN; from `origin`.
fn windows(origin: i64) -> (Vec<UsageWindow>, Vec<UsageWindow>) {
    let at = |tenant, foreign, minute, method| at(origin, tenant, foreign, minute, method);
    let mut h1 = Vec::new();
    let mut h2 = Vec::new();
    for day_start in [0, 1440, 2880] {
        for m in 0..30 {
            h1.push(at("f", true, day_start + m, EstimationMethod::GpmTensor));
            h2.push(at("f", true, day_start + m, EstimationMethod::GpmPipes));
        }
    }
    h1.push(UsageWindow {
        gpu_seconds: 144.0,
        gpus: 4,
        max_concurrent_gpus: 4,
        ops_lower: Some(1e14),
        estimated_ops: 3e14,
        ops_upper: Some(1e15),
        ..at("d", false, 100, EstimationMethod::GpmTensor)
    });
    h2.push(at("x", true, 200, EstimationMethod::GpmTensor));
    (h1, h2)
}

fn statement(host: &str, policy_version: Option<u64>) -> HostStatementClaims {
    let now = kycd_protocol::clock::unix_now();
    serde_json::from_value(json!({
        "iss": host, "iat": now, "exp": now + 60, "nonce": "n0nce-n0nce-n0nce-1", "agent_version": "0.9.1",
        "policy_version": policy_version, "gpus": [],
        "workloads": [
            {"workload": "libvirt_domain:f", "tenant": "f", "verdict": "allow", "attestation_digest": "ab".repeat(32),
             "subject": {"legal_name": "F <Holdings> GmbH", "countries": ["DE"], "foreign_person": true}},
            {"workload": "libvirt_domain:d", "tenant": "d", "verdict": "allow",
             "subject": {"legal_name": "D Inc", "countries": ["US"], "foreign_person": false}},
            {"workload": "libvirt_domain:x", "tenant": "x", "verdict": "allow",
             "subject": {"legal_name": "X Trading Ltd", "countries": ["HK"], "beneficial_owner_countries": ["CN"],
                         "foreign_person": true}}
        ]
    }))
    .unwrap()
}

fn records(windows: Vec<UsageWindow>) -> Vec<UsageRecord> {
    windows.into_iter().zip(1..).map(|(window, seq)| UsageRecord { seq, last_seq: None, window }).collect()
}

/// Enrolls h1 and h2, ingests their windows over TCP into the collector at `addr`, publishes
/// the policy, records a poll of each (h1 answers, h2 times out) and evaluates.
async fn seed(addr: std::net::SocketAddr, store: &Arc<dyn Storage>) {
    let (k1, k2) = (host_key("h1"), host_key("h2"));
    off_runtime(|| {
        for k in [&k1, &k2] {
            store.enroll_host(k.kid(), &k.public_key(), 0).unwrap();
        }
        let placement = kycd_collector::hosts::parse_placement("fra-1", "ib-a").unwrap();
        assert!(store.set_host_placement("h1", Some(&placement), 0).unwrap());
    });
    let (w1, w2) = windows(base());
    let n1 = w1.len() as u64;
    assert_eq!(send(addr, &batch("h1", records(w1)), &k1).await.acked(), n1);
    let n2 = w2.len() as u64;
    assert_eq!(send(addr, &batch("h2", records(w2)), &k2).await.acked(), n2);
    let issuer = PrivateJwk::generate(kycd_protocol::Algorithm::EdDSA, "authority").unwrap();
    let trust = Jwks::from_keys([issuer.public_key()]).unwrap();
    off_runtime(|| {
        let now = kycd_protocol::clock::unix_now();
        kycd_collector::policy::publish(store.as_ref(), &policy_token(&issuer), &trust, now - 5).unwrap();
        let ok =
            PollOutcome::Ok { claims: Box::new(statement("h1", Some(2))), token: "h1.statement.jws".into() };
        store.record_poll("h1", now, &ok).unwrap();
        let failed = PollOutcome::Failed { kind: "timeout".into(), detail: "no answer in 10s".into() };
        store.record_poll("h2", now, &failed).unwrap();
        let mut views = kycd_collector::findings::host_views(store.as_ref(), SETTINGS, now).unwrap();
        for v in &mut views {
            v.statement = Some(statement(&v.host_id, if v.host_id == "h1" { Some(2) } else { Some(1) }));
        }
        evaluate(store.as_ref(), &views, SETTINGS, now).unwrap();
    });
}

fn finding_of(store: &dyn Storage, kind: FindingKind) -> kycd_collector::fleet::Finding {
    let query = FindingQuery { kind: Some(kind), limit: 10, ..FindingQuery::default() };
    store.list_findings(&query).unwrap().pop().unwrap_or_else(|| panic!("no {kind:?} finding"))
}

/// The interpreter with Selenium, Chromium and its WebDriver, or why the test cannot run.
fn browser_tools() -> Result<String, String> {
    let python = std::env::var("KYCD_CONSOLE_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !Path::new(tool).exists() {
            return Err(format!("{tool} missing (apt-get install chromium chromium-driver)"));
        }
    }
    let probe = std::process::Command::new(&python).args(["-c", "import selenium"]).output();
    match probe {
        Ok(out) if out.status.success() => Ok(python),
        _ => Err(format!("{python} cannot import selenium (apt-get install python3-selenium)")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let python = match browser_tools() {
        Ok(p) => p,
        Err(why) => {
            kycd_test_support::skip!("SKIP console browser test: {why}");
            return;
        }
    };
    let db = TestDb::sqlite();
    let store = db.storage();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let writers = kycd_collector::http::WriteAccess::parse(&format!("alice {WRITE_TOKEN}")).unwrap();
    let api = kycd_collector::http::ApiState::new(
        Arc::clone(&store),
        kycd_collector::http::ReadAccess::token(READ_TOKEN),
        writers,
    );
    let ingestor = Arc::new(Ingestor::new(Arc::clone(&store) as _, Limits::default()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(kycd_collector::http::serve(
        listener,
        kycd_collector::http::app(ingestor, api),
        shutdown.clone(),
    ));
    seed(addr, &store).await;
    let finding = off_runtime(|| finding_of(store.as_ref(), FindingKind::TrainingThresholdCrossed));
    assert_eq!(finding.state, FindingState::Open);
    assert!(off_runtime(|| finding_of(store.as_ref(), FindingKind::EnforcementMismatch))
        .finding
        .subject
        .starts_with("h2/"));
    let path = format!("/console/findings/{}", finding.id);
    let form = [("content-type", "application/x-www-form-urlencoded")];

    // Refused over plain HTTP, before the browser acts: no session; a session without the
    // CSRF token; a read-only session with its CSRF token.
    let anonymous = request(addr, "POST", &path, &form, b"action=acknowledge".to_vec()).await;
    assert_eq!(anonymous.status, 403, "{:?}", anonymous.body);
    let login = |token: &str| format!("token={token}").into_bytes();
    let writer = request(addr, "POST", "/console/login", &form, login(WRITE_TOKEN)).await;
    assert_eq!(writer.status, 303);
    let cookie = writer.headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    assert!(writer.headers["set-cookie"].to_str().unwrap().contains("HttpOnly; SameSite=Strict"));
    let with_cookie = [form[0], ("cookie", cookie.as_str())];
    let no_csrf = request(addr, "POST", &path, &with_cookie, b"action=acknowledge".to_vec()).await;
    assert_eq!(no_csrf.status, 403, "{:?}", no_csrf.body);
    let wrong_csrf = request(addr, "POST", &path, &with_cookie, b"action=acknowledge&csrf=00".to_vec()).await;
    assert_eq!(wrong_csrf.status, 403);
    let reader = request(addr, "POST", "/console/login", &form, login(READ_TOKEN)).await;
    let reader_cookie = reader.headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let page = request(addr, "GET", &path, &[("cookie", reader_cookie.as_str())], vec![]).await;
    let text = page.body.as_str().unwrap().to_owned();
    let csrf = text.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let read_only = [form[0], ("cookie", reader_cookie.as_str())];
    let body = format!("action=acknowledge&csrf={csrf}").into_bytes();
    assert_eq!(
        request(addr, "POST", &path, &read_only, body).await.status,
        403,
        "a read-only session cannot act"
    );
    assert_eq!(
        request(addr, "POST", "/console/login", &form, login("wrong-token-0123456789")).await.status,
        401
    );
    assert_eq!(request(addr, "GET", "/console/hosts", &[], vec![]).await.status, 303, "to the login page");
    let unchanged = off_runtime(|| finding_of(store.as_ref(), FindingKind::TrainingThresholdCrossed));
    assert_eq!(unchanged.state, FindingState::Open, "no refused POST moved it");

    // The browser.
    let shots = std::env::var_os("KYCD_SCREENSHOTS").map(|d| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/console.py");
    let args = [
        script.display().to_string(),
        format!("http://{addr}"),
        WRITE_TOKEN.to_owned(),
        finding.id.to_string(),
        shots.map(|d| d.display().to_string()).unwrap_or_default(),
    ];
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output().unwrap())
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser script failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("console ok"), "{stdout}");

    // What the browser did is in the store and the audit log, under the writer's name.
    off_runtime(|| {
        let filed = finding_of(store.as_ref(), FindingKind::TrainingThresholdCrossed);
        assert_eq!(filed.state, FindingState::Filed);
        let record = filed.filed.unwrap();
        assert_eq!((record.reference.as_str(), record.by.as_str()), ("BIS-2026-0042", "alice"));
        assert_eq!(filed.acknowledged.unwrap().by, "alice");
        let chain = kycd_collector::findings::audit_rows(store.as_ref(), 0).unwrap();
        let events: Vec<serde_json::Value> = chain
            .iter()
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.line).unwrap()["event"].clone())
            .filter(|e| e["finding_id"].as_i64() == Some(filed.id))
            .collect();
        let steps: Vec<(&str, &str)> =
            events.iter().map(|e| (e["type"].as_str().unwrap(), e["by"].as_str().unwrap())).collect();
        assert_eq!(steps, [("finding_acknowledged", "alice"), ("finding_filed", "alice")]);
        assert_eq!(events[1]["reference"], "BIS-2026-0042");
        kycd_collector::fleet::lifecycle::verify_audit_log(chain).unwrap();
    });
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// The per-day roll-ups of one tenant, as the chart reads them, on both backends.
async fn the_chart_reads_the_tenants_days(db: TestDb) {
    let store = db.storage();
    // Midnight UTC (2023-11-15), so each run falls in one day.
    let (h1, h2) = windows(1_700_006_400);
    off_runtime(|| {
        store_windows(store.as_ref(), "h1", h1);
        store_windows(store.as_ref(), "h2", h2);
        let r = store.tenant_rollups("f").unwrap();
        let days: Vec<i64> = r.days.keys().map(|(_, day)| *day).collect();
        assert_eq!(days.len(), 3, "{days:?}");
        assert!(r.days.keys().all(|(s, _)| s.tenant == "f"), "only the tenant's rows");
        for sums in r.days.values() {
            assert_eq!(sums.windows, 60);
            assert!((sums.estimated_ops - 60.0 * 1.5e17).abs() < 1e9);
            assert!(
                (sums.ops_lower - 60.0 * 0.9e17).abs() < 1e9 && (sums.ops_upper - 60.0 * 3e17).abs() < 1e9
            );
        }
        assert_eq!(r.day_hosts.len(), 6, "both hosts on each day");
        assert_eq!(r.day_methods.len(), 6, "two methods on each day");
        let hosts: Vec<&str> = r.hosts.keys().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hosts, ["h1", "h2"]);
        assert!(r.capacity.is_empty() && r.segments.is_empty(), "no minute buckets, no segments");
    });
}
