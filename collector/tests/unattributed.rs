//! Issue 19 item 5 on each backend (a SQLite file, a PostgreSQL database): usage no tenant is
//! known for. A workload without a valid attestation (the policy's `unverified: allow` or
//! `grace`) reports windows with `tenant: None`; the collector aggregates them per (host,
//! workload) in the same pass as the tenants, raises `unattributed_training_scale` when one
//! crosses the training threshold (on the policy's `threshold_basis`) or the cluster capacity
//! threshold, and shows them in `/v1/unattributed` and `export --unattributed`. Tenants'
//! usage is unchanged by them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::*;
use kycd_collector::export::{self, Format};
use kycd_collector::findings::{evaluate, EvaluationSettings};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::policy::PublishedPolicy;
use kycd_collector::{Limits, Storage};
use kycd_protocol::{EstimationMethod, UsageWindow};
use serde_json::json;

backend_tests!(
    unverified_workload_training_at_scale_raises_unattributed_training_scale,
    below_the_thresholds_nothing_is_raised_and_the_basis_and_capacity_decide,
    tenant_usage_is_unchanged_by_unattributed_windows,
);

const T0: i64 = 1_800_000_000 / 60 * 60;
const NOW: i64 = T0 + 3600;
const SETTINGS: EvaluationSettings =
    EvaluationSettings { dark_after_s: 180, policy_grace_s: 0, rejected_window_s: 3600 };

/// A 60 s window at minute `minute` after [`T0`] on 8 GPUs (peak 8e15 FLOP/s) of `workload`,
/// attributed to `tenant` or (`None`) to no one, with operations lower … point … upper.
fn w(tenant: Option<&str>, workload: &str, minute: i64, ops: (f64, f64, f64)) -> UsageWindow {
    UsageWindow {
        tenant: tenant.map(str::to_owned),
        workload: workload.into(),
        foreign_person: false,
        foreign_status: None,
        start: T0 + 60 * minute,
        end: T0 + 60 * minute + 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops: ops.1,
        ops_lower: Some(ops.0),
        ops_upper: Some(ops.2),
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: 8e15,
        method: EstimationMethod::GpmPipes,
        training_like: true,
        merged_windows: 1,
    }
}

/// `n` windows of the unverified workload `workload`, minutes 0.., each 2e17 … 3e17 … 6e17.
fn anon(workload: &str, n: i64) -> Vec<UsageWindow> {
    (0..n).map(|minute| w(None, workload, minute, (2e17, 3e17, 6e17))).collect()
}

/// A policy letting unverified workloads run: training at 1e18 operations on `basis`, early
/// warning at half of it, cluster capacity at `cluster_flops`.
fn policy(version: u64, basis: &str, cluster_flops: f64) -> PublishedPolicy {
    let claims = serde_json::from_value(json!({
        "iss": "authority", "iat": 1_800_000_000, "exp": 1_900_000_000, "version": version,
        "measures": [], "unverified": {"action": "allow"},
        "thresholds": {"training_ops": 1e18, "bio_training_ops": 1e17, "cluster_flops": cluster_flops,
                       "early_warning_fraction": 0.5},
        "threshold_basis": basis
    }))
    .unwrap();
    PublishedPolicy { version, token: format!("token-{version}"), published_at: 1_800_000_000, claims }
}

fn open_unattributed(store: &dyn Storage) -> Vec<kycd_collector::fleet::Finding> {
    let query = FindingQuery {
        state: Some(FindingState::Open),
        kind: Some(FindingKind::UnattributedTrainingScale),
        limit: 100,
        ..FindingQuery::default()
    };
    store.list_findings(&query).unwrap()
}

/// Host a runs an unverified workload for 4 minutes (point 1.2e18 ≥ 1e18) and a small one;
/// host b runs a workload of the same name for 1 minute (another workload: per host); tenant
/// t runs a little on a. One finding, about `a/cgroup:/anon`, with the figures, the host, the
/// workload, the threshold, the policy version and the top windows.
async fn unverified_workload_training_at_scale_raises_unattributed_training_scale(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        let mut on_a = anon("cgroup:/anon", 4);
        on_a.push(w(None, "cgroup:/small", 0, (1e16, 1e16, 1e16)));
        on_a.push(w(Some("t"), "cgroup:/t", 0, (1e16, 1e16, 1e16)));
        store_windows(store, "a", on_a);
        store_windows(store, "b", anon("cgroup:/anon", 1));

        // The aggregation: per (host, workload), the tenants' rules.
        let fleet = store.fleet_usage(None).unwrap();
        let subjects: Vec<String> = fleet.unattributed.iter().map(|u| u.subject()).collect();
        assert_eq!(subjects, ["a/cgroup:/anon", "a/cgroup:/small", "b/cgroup:/anon"]);
        let u = &fleet.unattributed[0];
        assert_eq!((u.ops_lower, u.estimated_ops, u.ops_upper), (8e17, 1.2e18, 2.4e18), "{u:?}");
        assert_eq!((u.gpu_seconds, u.windows, u.gpus), (4.0 * 480.0, 4, 8));
        assert_eq!((u.peak_flops, u.peak_at), (8e15, T0));
        assert_eq!((u.first_seen, u.last_seen), (T0, T0 + 240));
        assert_eq!(u.ops_by_method.get("gpm_pipes").copied(), Some(1.2e18));
        assert_eq!(fleet.unattributed[2].estimated_ops, 3e17);
        assert_eq!(fleet.tenants.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>(), ["t"]);
        assert_eq!(fleet.tenants, store.tenant_usage(None, None).unwrap());

        // No policy: threshold rules are not evaluated.
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        assert!(report.raised.is_empty(), "{report:?}");

        store.publish_policy(&policy(1, "point", 1e20)).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 60).unwrap();
        let raised: Vec<(FindingKind, &str)> =
            report.raised.iter().map(|(_, k, s)| (*k, s.as_str())).collect();
        assert_eq!(raised, [(FindingKind::UnattributedTrainingScale, "a/cgroup:/anon")]);
        let found = open_unattributed(store);
        assert_eq!(found.len(), 1);
        let f = &found[0].finding;
        assert_eq!(
            (f.tenant.as_deref(), f.host_id.as_deref(), f.foreign_person),
            (None, Some("a"), Some(true))
        );
        assert!(f.summary.contains("treated as foreign"), "{}", f.summary);
        assert!(
            f.summary.contains("a/cgroup:/anon") && f.summary.contains("estimated operations"),
            "{}",
            f.summary
        );
        let e = &f.evidence;
        assert_eq!((e["host_id"].as_str(), e["workload"].as_str()), (Some("a"), Some("cgroup:/anon")));
        assert_eq!(
            (e["ops_lower"].as_f64(), e["estimated_ops"].as_f64(), e["ops_upper"].as_f64()),
            (Some(8e17), Some(1.2e18), Some(2.4e18))
        );
        assert_eq!(e["threshold"]["training_ops"].as_f64(), Some(1e18));
        assert_eq!(
            (e["crossed"].clone(), e["threshold_basis"].as_str()),
            (json!(["training_ops"]), Some("point"))
        );
        assert_eq!((e["policy_version"].as_u64(), e["windows"].as_u64()), (Some(1), Some(4)));
        assert!((e["gpu_hours"].as_f64().unwrap() - 4.0 * 480.0 / 3600.0).abs() < 1e-12, "{e}");
        let top = e["top_windows"].as_array().unwrap();
        assert_eq!(top.len(), 4, "{e}");
        assert!(top.iter().all(|w| w["host_id"] == "a" && w["estimated_ops"].as_f64() == Some(3e17)), "{e}");
        // Found by host, like the other host findings.
        let by_host = store
            .list_findings(&FindingQuery { host_id: Some("a".into()), limit: 10, ..FindingQuery::default() })
            .unwrap();
        assert_eq!(by_host.len(), 1);

        // The read API lists it with its open finding.
        let listed = kycd_collector::http::read_api::unattributed_summaries(store).unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0].open_findings, [FindingKind::UnattributedTrainingScale]);
        let as_json = serde_json::to_value(&listed[0]).unwrap();
        assert_eq!(
            (as_json["subject"].as_str(), as_json["estimated_ops"].as_f64()),
            (Some("a/cgroup:/anon"), Some(1.2e18))
        );

        // `export --unattributed`: a table of its own; the tenants' export has t alone.
        let rows = export::unattributed_rows(store, 0).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].findings, [format!("unattributed_training_scale#{}", found[0].id)]);
        let csv = export::render_unattributed(&rows, Format::Csv).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], export::UNATTRIBUTED_CSV_HEADER.join(","));
        assert!(
            lines[1].starts_with("a,cgroup:/anon,8e17,1.2e18,2.4e18,0.533,0.000,0.000,8e15,8,"),
            "{}",
            lines[1]
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&export::render_unattributed(&rows, Format::Json).unwrap()).unwrap();
        assert_eq!(parsed[2]["host_id"], "b");
        let tenants = export::rows(store, 0).unwrap();
        assert_eq!(tenants.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>(), ["t"]);

        // Raised once: more windows later do not raise it again.
        store_windows(store, "c", anon("cgroup:/anon", 1));
        let report = evaluate(store, &[], SETTINGS, NOW + 120).unwrap();
        assert!(report.raised.is_empty() && report.resolved.is_empty(), "{report:?}");
    });

    // Over HTTP: `/v1/unattributed`, behind the read token, two per page to the end; the
    // HTML overview lists them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = kycd_collector::http::ApiState::new(
        store.clone(),
        kycd_collector::http::ReadAccess::token("read-token-0123456789"),
        kycd_collector::http::WriteAccess::none(),
    );
    let ingestor = kycd_collector::ingest::Ingestor::new(store.clone(), Limits::default());
    let app = kycd_collector::http::app(std::sync::Arc::new(ingestor), api);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(kycd_collector::http::serve(listener, app, shutdown.clone()));
    let auth = [("authorization", "Bearer read-token-0123456789")];
    assert_eq!(request(addr, "GET", "/v1/unattributed", &[], vec![]).await.status, 401);
    let first = request(addr, "GET", "/v1/unattributed?limit=2", &auth, vec![]).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let items = first.body["items"].as_array().unwrap();
    assert_eq!(
        (items[0]["subject"].as_str(), items[0]["host_id"].as_str()),
        (Some("a/cgroup:/anon"), Some("a"))
    );
    assert_eq!(items[0]["open_findings"], json!(["unattributed_training_scale"]));
    assert_eq!(first.body["next"], "a/cgroup:/small");
    let rest = request(addr, "GET", "/v1/unattributed?after=a/cgroup:/small", &auth, vec![]).await;
    let subjects: Vec<&str> =
        rest.body["items"].as_array().unwrap().iter().map(|u| u["subject"].as_str().unwrap()).collect();
    assert_eq!(subjects, ["b/cgroup:/anon", "c/cgroup:/anon"]);
    let html = request(addr, "GET", "/", &auth, vec![]).await;
    let page = html.body.as_str().unwrap();
    assert!(page.contains("Usage without a tenant") && page.contains("<td>cgroup:/small</td>"), "{page}");
    assert!(page.contains("unattributed_training_scale"), "{page}");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// 3 minutes of the unverified workload: point 9e17 < 1e18 ≤ upper 1.8e18. On basis `point`
/// nothing is raised; on `upper` it is; a cluster threshold at its peak (8e15) raises it on
/// capacity whatever the operations.
async fn below_the_thresholds_nothing_is_raised_and_the_basis_and_capacity_decide(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        store_windows(store, "a", anon("cgroup:/anon", 3));
        store_windows(store, "b", vec![w(None, "vm", 0, (1e15, 1e15, 1e15))]);
        store.publish_policy(&policy(1, "point", 1e20)).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        assert!(report.raised.is_empty(), "{report:?}");
        assert!(open_unattributed(store).is_empty());

        store.publish_policy(&policy(2, "upper", 1e20)).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 60).unwrap();
        let raised: Vec<&str> = report.raised.iter().map(|(_, _, s)| s.as_str()).collect();
        assert_eq!(raised, ["a/cgroup:/anon"]);
        let e = &open_unattributed(store)[0].finding.evidence;
        assert_eq!((e["threshold_basis"].as_str(), e["policy_version"].as_u64()), (Some("upper"), Some(2)));
        assert_eq!(e["ops_upper"].as_f64(), Some(1.8e18));

        // Back to point: no longer past the threshold, but a crossing is a fact to file: it
        // stays open. Then capacity alone raises the other workload.
        store.publish_policy(&policy(3, "point", 1e20)).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 120).unwrap();
        assert!(report.resolved.is_empty(), "{report:?}");
        assert_eq!(open_unattributed(store).len(), 1);
        store.publish_policy(&policy(4, "point", 8e15)).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 180).unwrap();
        let raised: Vec<&str> = report.raised.iter().map(|(_, _, s)| s.as_str()).collect();
        assert_eq!(raised, ["b/vm"]);
        let open = open_unattributed(store);
        assert_eq!(open.len(), 2);
        let b = open.iter().find(|f| f.finding.subject == "b/vm").unwrap();
        assert_eq!(b.finding.evidence["crossed"], json!(["cluster_flops"]), "{b:?}");
        assert!(b.finding.summary.contains("FLOP/s capacity"), "{}", b.finding.summary);
    });
}

/// Tenants' aggregation, findings and export are the same with or without unattributed
/// windows beside them.
async fn tenant_usage_is_unchanged_by_unattributed_windows(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        store_windows(
            store,
            "a",
            vec![
                w(Some("t"), "cgroup:/t", 0, (1e17, 2e17, 4e17)),
                w(Some("t"), "cgroup:/t", 1, (1e17, 2e17, 4e17)),
                w(Some("u"), "cgroup:/u", 0, (1e15, 1e15, 1e15)),
            ],
        );
        let before = store.tenant_usage(None, None).unwrap();
        let export_before = export::render(&export::rows(store, 0).unwrap(), Format::Csv).unwrap();
        store_windows(store, "b", anon("cgroup:/anon", 4));
        assert_eq!(store.tenant_usage(None, None).unwrap(), before);
        assert_eq!(store.fleet_usage(None).unwrap().tenants, before);
        assert_eq!(export::render(&export::rows(store, 0).unwrap(), Format::Csv).unwrap(), export_before);
        // A tenant's window on another host still counts as before.
        store_windows(store, "c", vec![w(Some("t"), "cgroup:/t", 5, (1e17, 2e17, 4e17))]);
        let after = store.tenant_usage(None, None).unwrap();
        assert_eq!(after.len(), 2);
        assert_eq!((after[0].estimated_ops, after[0].windows, after[0].hosts), (6e17, 3, 2));
        assert_eq!(after[1], before[1]);
        assert_eq!(store.fleet_usage(None).unwrap().tenants, after);
        assert_eq!(store.tenant_usage(Some("t"), None).unwrap()[0], after[0]);
        store.publish_policy(&policy(1, "point", 1e20)).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        let raised: Vec<(FindingKind, &str)> =
            report.raised.iter().map(|(_, k, s)| (*k, s.as_str())).collect();
        // t: upper 1.2e18 ≥ the early warning and training on point 6e17 not (its run's upper
        // bound passes bio_training_ops: the second tier); the workload without a tenant: its
        // own finding, never folded into a tenant's.
        assert_eq!(
            raised,
            [
                (FindingKind::EarlyWarning, "t"),
                (FindingKind::UnattributedTrainingScale, "b/cgroup:/anon"),
                (FindingKind::BioEarlyWarning, "t/run/1800000000")
            ]
        );
    });
}
