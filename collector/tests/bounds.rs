//! Issue 17 on each backend (a SQLite file, a PostgreSQL database): operation bounds and
//! shared GPU-seconds from ingest to findings and exports. Windows of old agents (no bounds)
//! and of new ones aggregate side by side, the training threshold is held against the figure
//! the policy's `threshold_basis` names, the early warning against the upper bound, and a
//! foreign tenant that shared a GPU without isolation gets a `shared_gpu` finding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::*;
use kycd_collector::export::{self, Format};
use kycd_collector::findings::{evaluate, EvaluationSettings};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::ingest::Admission;
use kycd_collector::policy::PublishedPolicy;
use kycd_collector::{Limits, Storage, ValidRecord};
use kycd_protocol::{EstimationMethod, UsageRecord, UsageWindow};
use serde_json::json;

backend_tests!(
    old_and_new_windows_aggregate_three_figures_side_by_side,
    threshold_basis_upper_crosses_where_point_does_not_and_early_warning_uses_upper,
    shared_gpu_opens_for_a_foreign_tenant_only,
    allocation_alone_raises_capacity_and_early_warning_but_not_training,
);

const T0: i64 = 1_800_000_000 / 60 * 60;
const NOW: i64 = T0 + 3600;
const SETTINGS: EvaluationSettings =
    EvaluationSettings { dark_after_s: 180, policy_grace_s: 0, rejected_window_s: 3600 };

/// A 60 s window of `tenant` at minute `minute` after [`T0`] on 8 GPUs (peak 8e15 FLOP/s:
/// ops up to 8e15 × 65 s × 5 = 2.6e18 pass ingest), with the bounds given (`None`: an old
/// agent's window).
fn w(
    tenant: &str,
    foreign: bool,
    minute: i64,
    bounds: (Option<f64>, f64, Option<f64>),
    shared: f64,
) -> UsageWindow {
    let (ops_lower, estimated_ops, ops_upper) = bounds;
    UsageWindow {
        tenant: Some(tenant.into()),
        workload: format!("cgroup:/{tenant}"),
        foreign_person: foreign,
        start: T0 + 60 * minute,
        end: T0 + 60 * minute + 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops,
        ops_lower,
        ops_upper,
        shared_gpu_seconds: shared,
        peak_flops: 8e15,
        method: if ops_lower.is_some() { EstimationMethod::GpmPipes } else { EstimationMethod::GpmTensor },
        training_like: true,
        merged_windows: 1,
    }
}

/// Stores `windows` as host `host`'s records 1.. through ingest validation.
fn store_windows(store: &dyn Storage, host: &str, windows: Vec<UsageWindow>) {
    let records =
        windows.into_iter().zip(1..).map(|(window, seq)| UsageRecord { seq, last_seq: None, window });
    let admission = Admission { received_at: 2_000_000_000, enrolled_at: 0 };
    let valid: Vec<ValidRecord> =
        kycd_collector::ingest::validate_batch(batch(host, records.collect()), &Limits::default(), admission)
            .unwrap();
    store.insert_batch(host, 1, &valid, 0).unwrap();
}

/// A policy: training at 1e18 operations, early warning at half of it, on `basis`;
/// `measures` as given.
fn policy(version: u64, basis: &str, measures: serde_json::Value) -> PublishedPolicy {
    let claims = serde_json::from_value(json!({
        "iss": "authority", "iat": 1_800_000_000, "exp": 1_900_000_000, "version": version,
        "measures": measures, "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 1e18, "bio_training_ops": 1e17, "cluster_flops": 1e20,
                       "early_warning_fraction": 0.5},
        "threshold_basis": basis
    }))
    .unwrap();
    PublishedPolicy { version, token: format!("token-{version}"), published_at: 1_800_000_000, claims }
}

fn open_finding(
    store: &dyn Storage,
    kind: FindingKind,
    tenant: &str,
) -> Option<kycd_collector::fleet::Finding> {
    let query = FindingQuery {
        state: Some(FindingState::Open),
        kind: Some(kind),
        tenant: Some(tenant.into()),
        limit: 10,
        ..FindingQuery::default()
    };
    let mut found = store.list_findings(&query).unwrap();
    assert!(found.len() <= 1, "{found:?}");
    found.pop()
}

/// Host a: an old agent's window of t (4e17, no bounds) and a new one (1e17 … 3e17 … 9e17,
/// 120 of its 480 GPU-seconds shared); host b: a new window of t (0 … 2e17 … 1.2e18) and an
/// old window of u.
fn mixed_fleet(store: &dyn Storage) {
    store_windows(
        store,
        "a",
        vec![
            w("t", true, 0, (None, 4e17, None), 0.0),
            w("t", true, 1, (Some(1e17), 3e17, Some(9e17)), 120.0),
        ],
    );
    store_windows(
        store,
        "b",
        vec![
            w("t", true, 0, (Some(0.0), 2e17, Some(1.2e18)), 0.0),
            w("u", false, 0, (None, 5e16, None), 0.0),
        ],
    );
}

async fn old_and_new_windows_aggregate_three_figures_side_by_side(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        mixed_fleet(store.as_ref());
        let usage = store.tenant_usage(None, None).unwrap();
        let (t, u) = (&usage[0], &usage[1]);
        assert_eq!((t.tenant.as_str(), u.tenant.as_str()), ("t", "u"));
        // Old windows count their estimate for both bounds.
        assert_eq!((t.ops_lower, t.estimated_ops, t.ops_upper), (5e17, 9e17, 2.5e18), "{t:?}");
        assert_eq!(
            (t.shared_gpu_seconds, t.shared_gpu_hosts.as_slice()),
            (120.0, ["a".to_owned()].as_slice())
        );
        assert_eq!(
            (u.ops_lower, u.estimated_ops, u.ops_upper, u.shared_gpu_seconds),
            (5e16, 5e16, 5e16, 0.0)
        );
        assert!(u.shared_gpu_hosts.is_empty());
        // The point estimate by method, as before.
        assert_eq!(t.ops_by_method["gpm_tensor"], 4e17);
        assert_eq!(t.ops_by_method["gpm_pipes"], 5e17);

        // Evidence windows carry the three figures (an old one: its estimate thrice).
        let evidence = store.usage_evidence("t", 10).unwrap();
        let figures: Vec<(f64, f64, f64, f64)> = evidence
            .iter()
            .map(|e| (e.ops_lower, e.estimated_ops, e.ops_upper, e.shared_gpu_seconds))
            .collect();
        assert_eq!(figures, [(4e17, 4e17, 4e17, 0.0), (1e17, 3e17, 9e17, 120.0), (0.0, 2e17, 1.2e18, 0.0)]);

        // Exports: side by side, in both formats.
        let rows = export::rows(store.as_ref(), 0).unwrap();
        assert_eq!((rows[0].ops_lower, rows[0].estimated_ops, rows[0].ops_upper), (5e17, 9e17, 2.5e18));
        assert!((rows[0].shared_gpu_hours - 120.0 / 3600.0).abs() < 1e-12, "{:?}", rows[0]);
        let csv = export::render(&rows, Format::Csv).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        // The columns added with the bounds come last, so readers by position keep working.
        assert!(lines[0].contains(",estimated_ops,gpu_hours,peak_flops,"), "{}", lines[0]);
        assert!(lines[0].ends_with(",findings,ops_lower,ops_upper,shared_gpu_hours"), "{}", lines[0]);
        assert!(lines[1].contains(",9e17,0.400,"), "{}", lines[1]);
        assert!(lines[1].ends_with(",5e17,2.5e18,0.033"), "{}", lines[1]);
        let parsed: serde_json::Value =
            serde_json::from_str(&export::render(&rows, Format::Json).unwrap()).unwrap();
        assert_eq!(
            (
                parsed[1]["ops_lower"].as_f64(),
                parsed[1]["ops_upper"].as_f64(),
                parsed[1]["shared_gpu_hours"].as_f64()
            ),
            (Some(5e16), Some(5e16), Some(0.0))
        );
    });
}

async fn threshold_basis_upper_crosses_where_point_does_not_and_early_warning_uses_upper(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        mixed_fleet(store.as_ref());
        // v: point estimate 1e17 (below the early warning at 5e17), upper bound 6e17.
        store_windows(store.as_ref(), "c", vec![w("v", true, 0, (Some(0.0), 1e17, Some(6e17)), 0.0)]);
        let store = store.as_ref();

        // Basis point: t (point 9e17, upper 2.5e18) has not crossed 1e18; the early warnings
        // of t and v hold by their upper bounds.
        store.publish_policy(&policy(1, "point", json!([]))).unwrap();
        evaluate(store, &[], SETTINGS, NOW).unwrap();
        assert!(open_finding(store, FindingKind::TrainingThresholdCrossed, "t").is_none());
        for tenant in ["t", "v"] {
            let early = open_finding(store, FindingKind::EarlyWarning, tenant).expect(tenant);
            assert_eq!(early.finding.evidence["basis"], "upper", "{tenant}");
            assert_eq!(early.finding.evidence["threshold_basis"], "point", "{tenant}");
        }
        let early = open_finding(store, FindingKind::EarlyWarning, "v").unwrap();
        assert_eq!(
            (
                &early.finding.evidence["ops_lower"],
                &early.finding.evidence["estimated_ops"],
                &early.finding.evidence["ops_upper"]
            ),
            (&json!(0.0), &json!(1e17), &json!(6e17))
        );
        assert!(early.finding.summary.contains("upper bound"), "{}", early.finding.summary);
        assert!(open_finding(store, FindingKind::EarlyWarning, "u").is_none(), "5e16 everywhere");

        // Basis upper: t crosses by its upper bound; the evidence says which figure did.
        store.publish_policy(&policy(2, "upper", json!([]))).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 60).unwrap();
        assert_eq!(report.policy_version, Some(2));
        let crossed =
            open_finding(store, FindingKind::TrainingThresholdCrossed, "t").expect("crossed on upper");
        let e = &crossed.finding.evidence;
        assert_eq!((e["basis"].as_str(), e["threshold_basis"].as_str()), (Some("upper"), Some("upper")));
        assert_eq!(
            (e["ops_lower"].as_f64(), e["estimated_ops"].as_f64(), e["ops_upper"].as_f64()),
            (Some(5e17), Some(9e17), Some(2.5e18))
        );
        assert_eq!(crossed.finding.foreign_person, Some(true));
        assert!(crossed.finding.summary.contains("upper bound"), "{}", crossed.finding.summary);
        assert!(open_finding(store, FindingKind::TrainingThresholdCrossed, "v").is_none(), "6e17 < 1e18");

        // Back to point (a newer policy): the training finding stops holding and resolves.
        store.publish_policy(&policy(3, "point", json!([]))).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 120).unwrap();
        assert!(report
            .resolved
            .iter()
            .any(|(_, kind, subject)| *kind == FindingKind::TrainingThresholdCrossed && subject == "t"));
    });
}

async fn shared_gpu_opens_for_a_foreign_tenant_only(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        // f (foreign) and d (domestic) both shared a GPU; g (foreign) did not.
        store_windows(
            store,
            "a",
            vec![
                w("f", true, 0, (Some(0.0), 1e15, Some(8e15)), 300.0),
                w("d", false, 0, (Some(0.0), 1e15, Some(8e15)), 480.0),
                w("g", true, 0, (Some(1e15), 1e15, Some(2e15)), 0.0),
            ],
        );
        store_windows(store, "b", vec![w("f", true, 0, (Some(0.0), 1e15, Some(8e15)), 60.0)]);
        // Raised without a policy too: it is about the measurement, not a threshold.
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        assert_eq!(report.policy_version, None);
        let raised: Vec<(FindingKind, &str)> =
            report.raised.iter().map(|(_, k, s)| (*k, s.as_str())).collect();
        assert_eq!(raised, [(FindingKind::SharedGpu, "f")]);
        let f = open_finding(store, FindingKind::SharedGpu, "f").unwrap();
        assert_eq!(f.finding.foreign_person, Some(true));
        let e = &f.finding.evidence;
        assert_eq!(e["shared_gpu_seconds"].as_f64(), Some(360.0));
        assert_eq!(e["shared_gpu_hosts"], json!(["a", "b"]));
        assert_eq!(
            (e["exclusive_gpu_required"].as_bool(), e["condition_violated"].as_bool()),
            (Some(false), Some(false))
        );
        assert!(!f.finding.summary.contains("violated"), "{}", f.finding.summary);
        assert!(open_finding(store, FindingKind::SharedGpu, "d").is_none(), "domestic");
        assert!(open_finding(store, FindingKind::SharedGpu, "g").is_none(), "did not share");

        // A policy conditioning GPU use on exclusive GPUs: a newly sharing foreign tenant's
        // finding says the condition was violated.
        let measures = json!([{"id": "m-excl", "match": {"countries": ["SG"]}, "roles": ["customer"],
                               "action": "condition", "conditions": {"exclusive_gpu": true}, "citation": "c"}]);
        store.publish_policy(&policy(1, "point", measures)).unwrap();
        store_windows(store, "c", vec![w("g", true, 1, (Some(0.0), 1e15, Some(8e15)), 30.0)]);
        let report = evaluate(store, &[], SETTINGS, NOW + 60).unwrap();
        assert!(report.raised.iter().any(|(_, k, s)| *k == FindingKind::SharedGpu && s == "g"), "{report:?}");
        let g = open_finding(store, FindingKind::SharedGpu, "g").unwrap();
        let e = &g.finding.evidence;
        assert_eq!(
            (e["exclusive_gpu_required"].as_bool(), e["condition_violated"].as_bool()),
            (Some(true), Some(true))
        );
        assert_eq!(e["exclusive_gpu_measures"], json!(["m-excl"]));
        assert_eq!(e["shared_gpu_hosts"], json!(["c"]));
        assert!(
            g.finding.summary.contains("exclusive_gpu condition of measure(s) m-excl was violated"),
            "{}",
            g.finding.summary
        );
        // f's finding stays open, raised once.
        assert!(open_finding(store, FindingKind::SharedGpu, "f").is_some());
        assert!(open_finding(store, FindingKind::SharedGpu, "d").is_none());
    });
}

/// Issue 18, GPUs passed through to a VM: the host knows only the allocation (method
/// `allocation`: point and lower 0, upper the GPUs' fastest peak × time). A foreign tenant's
/// VM holding 8 GPUs on each of 4 hosts crosses the cluster-capacity threshold (allocated peak)
/// and the early warning (upper bound) from allocation alone, and not the training threshold
/// held against the point estimate.
async fn allocation_alone_raises_capacity_and_early_warning_but_not_training(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        for host in ["a", "b", "c", "d"] {
            let windows = (0..10)
                .map(|minute| UsageWindow {
                    workload: "libvirt_domain:vm-f".into(),
                    method: EstimationMethod::Allocation,
                    training_like: false,
                    ..w("f", true, minute, (Some(0.0), 0.0, Some(8.0 * 1.9789e15 * 60.0)), 0.0)
                })
                .collect();
            store_windows(store, host, windows);
        }
        let claims = serde_json::from_value(json!({
            "iss": "authority", "iat": 1_800_000_000, "exp": 1_900_000_000, "version": 1,
            "measures": [], "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e19, "bio_training_ops": 1e17, "cluster_flops": 3e16,
                           "early_warning_fraction": 0.5}
        }))
        .unwrap();
        let published =
            PublishedPolicy { version: 1, token: "token-1".into(), published_at: 1_800_000_000, claims };
        store.publish_policy(&published).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        let raised: Vec<FindingKind> =
            report.raised.iter().filter(|(_, _, t)| t == "f").map(|(_, k, _)| *k).collect();
        // 4 hosts × 8e15 allocated = 3.2e16 FLOP/s ≥ 3e16; upper 4 × 10 min × 9.5e17 = 3.8e19
        // ≥ half of 1e19; point 0.
        assert!(raised.contains(&FindingKind::ClusterCapacityCrossed), "{raised:?}");
        assert!(raised.contains(&FindingKind::EarlyWarning), "{raised:?}");
        assert!(!raised.contains(&FindingKind::TrainingThresholdCrossed), "{raised:?}");
        let usage = export::rows(store, 0).unwrap();
        let f = usage.iter().find(|r| r.tenant == "f").unwrap();
        assert_eq!((f.ops_lower, f.estimated_ops), (0.0, 0.0));
        assert!((f.ops_upper - 4.0 * 10.0 * 8.0 * 1.9789e15 * 60.0).abs() < 1e9, "{f:?}");
    });
}
