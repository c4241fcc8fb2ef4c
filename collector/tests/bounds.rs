//! Issue 17 on each backend (a SQLite file, a PostgreSQL database): operation bounds and
//! shared GPU-seconds from ingest to findings and exports. Windows of old agents (no bounds)
//! and of new ones aggregate side by side, the training threshold is held against the figure
//! the policy's `threshold_basis` names, the early warning against the upper bound, and a
//! foreign tenant that shared a GPU without isolation gets a `shared_gpu` finding.
//!
//! Issue 18 the same way: windows of VMs with passed-through GPUs, measured by their guest
//! (`guest_reported`) or, while it is silent, only by their allocation
//! (`guest_gap_gpu_seconds`): the point estimate is the guest's, the upper bound the
//! allocation, and a foreign tenant's silent guest gets a `guest_telemetry_gap` finding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::*;
use kycd_collector::export::{self, Format};
use kycd_collector::findings::{evaluate, EvaluationSettings};
use kycd_collector::fleet::{FindingKind, FindingQuery, FindingState};
use kycd_collector::ingest::Admission;
use kycd_collector::ingest::IngestError;
use kycd_collector::policy::PublishedPolicy;
use kycd_collector::{Limits, Storage};
use kycd_protocol::{EstimationMethod, UsageRecord, UsageWindow};
use serde_json::json;

backend_tests!(
    old_and_new_windows_aggregate_three_figures_side_by_side,
    threshold_basis_upper_crosses_where_point_does_not_and_early_warning_uses_upper,
    shared_gpu_opens_for_a_foreign_tenant_only,
    allocation_alone_raises_capacity_and_early_warning_but_not_training,
    guest_telemetry_gap_opens_for_a_foreign_tenant_only,
    guest_reported_point_estimate_crosses_training_while_upper_is_the_allocation,
    guest_gap_beyond_gpu_seconds_or_not_a_number_is_refused,
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
        foreign_status: None,
        start: T0 + 60 * minute,
        end: T0 + 60 * minute + 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops,
        ops_lower,
        ops_upper,
        shared_gpu_seconds: shared,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: 8e15,
        method: if ops_lower.is_some() { EstimationMethod::GpmPipes } else { EstimationMethod::GpmTensor },
        training_like: true,
        merged_windows: 1,
    }
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
        assert!(
            lines[0].contains(",findings,ops_lower,ops_upper,shared_gpu_hours,guest_gap_gpu_hours,"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains(",9e17,0.400,"), "{}", lines[1]);
        assert!(
            lines[1].contains(",5e17,2.5e18,0.033,0.000,gpm_pipes=5e17 gpm_tensor=4e17,a b,"),
            "{}",
            lines[1]
        );
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

        // Back to point (a newer policy): the training threshold no longer holds on the new
        // basis, but a crossing is a fact to file: the finding stays open.
        store.publish_policy(&policy(3, "point", json!([]))).unwrap();
        let report = evaluate(store, &[], SETTINGS, NOW + 120).unwrap();
        assert!(report.resolved.iter().all(|(_, kind, _)| !kind.is_threshold()), "{report:?}");
        assert!(open_finding(store, FindingKind::TrainingThresholdCrossed, "t").is_some());
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

/// The fastest peak of an H100 SXM (FP8 dense, FLOP/s): what the agent books per GPU for a
/// VM's allocation bound.
const FASTEST_PEAK: f64 = 1.9789e15;
/// One 60 s window's allocation bound on 8 GPUs: fastest peak × time held.
const ALLOCATION: f64 = 8.0 * FASTEST_PEAK * 60.0;

/// A 60 s window of a VM of `tenant` with 8 passed-through GPUs (see [`w`]): measured by its
/// guest (`guest_reported`, point and lower bound the guest's) except for `gap` GPU-seconds
/// in which the guest was silent; a window silent throughout carries the weaker method,
/// `allocation` (point and lower bound 0). The upper bound is always the allocation.
fn vm(tenant: &str, foreign: bool, minute: i64, guest: (f64, f64), gap: f64) -> UsageWindow {
    let (lower, point) = guest;
    let method = if gap >= 480.0 { EstimationMethod::Allocation } else { EstimationMethod::GuestReported };
    UsageWindow {
        workload: format!("libvirt_domain:vm-{tenant}"),
        method,
        guest_gap_gpu_seconds: gap,
        ..w(tenant, foreign, minute, (Some(lower), point, Some(ALLOCATION)), 0.0)
    }
}

/// (a) A foreign tenant whose guest went silent on two hosts gets one `guest_telemetry_gap`
/// finding (without a policy: it is about the measurement) naming the gap GPU-seconds, the
/// hosts and the VMs; a domestic tenant's silent guest and a foreign tenant whose guest kept
/// reporting do not; the gap shows in the usage, the evidence windows and both exports.
async fn guest_telemetry_gap_opens_for_a_foreign_tenant_only(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        store_windows(
            store,
            "a",
            vec![
                vm("f", true, 0, (0.0, 0.0), 480.0),
                vm("f", true, 1, (1e17, 2e17), 0.0),
                vm("d", false, 0, (0.0, 0.0), 480.0),
                vm("g", true, 0, (1e17, 2e17), 0.0),
            ],
        );
        store_windows(store, "b", vec![vm("f", true, 0, (5e16, 1e17), 120.0)]);
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        assert_eq!(report.policy_version, None);
        let raised: Vec<(FindingKind, &str)> =
            report.raised.iter().map(|(_, k, s)| (*k, s.as_str())).collect();
        assert_eq!(raised, [(FindingKind::GuestTelemetryGap, "f")]);
        let f = open_finding(store, FindingKind::GuestTelemetryGap, "f").unwrap();
        assert_eq!((f.finding.tenant.as_deref(), f.finding.foreign_person), (Some("f"), Some(true)));
        let e = &f.finding.evidence;
        assert_eq!(e["guest_gap_gpu_seconds"].as_f64(), Some(600.0));
        assert_eq!(e["gpu_seconds"].as_f64(), Some(3.0 * 480.0));
        assert_eq!(e["guest_gap_hosts"], json!(["a", "b"]));
        assert_eq!(e["guest_gap_workloads"], json!(["a/libvirt_domain:vm-f", "b/libvirt_domain:vm-f"]));
        assert_eq!(
            (e["ops_lower"].as_f64(), e["estimated_ops"].as_f64()),
            (Some(1.5e17), Some(3e17)),
            "the guest's figures, 0 while it was silent"
        );
        assert!((e["ops_upper"].as_f64().unwrap() / (3.0 * ALLOCATION) - 1.0).abs() < 1e-12, "{e}");
        assert_eq!(e["host_ids"], json!(["a", "b"]));
        let gaps: Vec<f64> = e["top_windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["guest_gap_gpu_seconds"].as_f64().unwrap())
            .collect();
        assert_eq!(gaps, [0.0, 120.0, 480.0], "by estimated ops, most first");
        assert!(
            f.finding.summary.contains("600 GPU-seconds") && f.finding.summary.contains("2 host(s)"),
            "{}",
            f.finding.summary
        );
        assert!(open_finding(store, FindingKind::GuestTelemetryGap, "d").is_none(), "domestic");
        assert!(open_finding(store, FindingKind::GuestTelemetryGap, "g").is_none(), "guest reported");

        // The usage: d's gap is counted (and shown) though no finding is raised for it.
        let usage = store.tenant_usage(None, None).unwrap();
        let by = |t: &str| usage.iter().find(|u| u.tenant == t).unwrap();
        assert_eq!(
            (by("d").guest_gap_gpu_seconds, by("d").guest_gap_hosts.as_slice()),
            (480.0, ["a".to_owned()].as_slice())
        );
        assert_eq!((by("g").guest_gap_gpu_seconds, by("g").guest_gap_workloads.len()), (0.0, 0));
        assert_eq!(by("f").ops_by_method.get("guest_reported").copied(), Some(3e17));

        // Exports: the new column last, in hours.
        let rows = export::rows(store, 0).unwrap();
        let f_row = rows.iter().find(|r| r.tenant == "f").unwrap();
        assert!((f_row.guest_gap_gpu_hours - 600.0 / 3600.0).abs() < 1e-12, "{f_row:?}");
        let csv = export::render(&rows, Format::Csv).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert!(lines[0].contains(",shared_gpu_hours,guest_gap_gpu_hours,ops_by_method,"), "{}", lines[0]);
        let f_line = lines.iter().find(|l| l.starts_with("f,")).unwrap();
        assert!(f_line.contains(",0.000,0.167,guest_reported=3e17,"), "{f_line}");
        assert!(f_line.contains("guest_telemetry_gap#"), "{f_line}");
        let parsed: serde_json::Value =
            serde_json::from_str(&export::render(&rows, Format::Json).unwrap()).unwrap();
        let d_json = parsed.as_array().unwrap().iter().find(|r| r["tenant"] == "d").unwrap();
        assert_eq!(d_json["guest_gap_gpu_hours"].as_f64(), Some(480.0 / 3600.0));

        // Raised once: a later evaluation with more silence does not raise it again.
        store_windows(store, "c", vec![vm("f", true, 2, (0.0, 0.0), 480.0)]);
        let report = evaluate(store, &[], SETTINGS, NOW + 60).unwrap();
        assert!(report.raised.is_empty() && report.resolved.is_empty(), "{report:?}");
    });
}

/// (b) A VM's guest reports: the tenant's point estimate is the guest's and crosses the
/// training threshold (basis `point`) by it alone, while the upper bound stays the sum of the
/// allocations; with one window fewer only the upper bound is past the threshold, which
/// raises the early warning and not the training finding.
async fn guest_reported_point_estimate_crosses_training_while_upper_is_the_allocation(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        store_windows(
            store,
            "a",
            vec![vm("f", true, 0, (3e17, 4e17), 0.0), vm("f", true, 1, (3e17, 4e17), 0.0)],
        );
        store.publish_policy(&policy(1, "point", json!([]))).unwrap();
        // Point 8e17 < 1e18 ≤ upper 1.9e18.
        // The all-time kinds (the run of the same windows is held alike: see runs.rs).
        let all_time = |report: &kycd_collector::findings::EvaluationReport| -> Vec<FindingKind> {
            report
                .raised
                .iter()
                .map(|(_, k, _)| *k)
                .filter(|k| !matches!(k, FindingKind::RunThresholdCrossed | FindingKind::BioEarlyWarning))
                .collect()
        };
        let report = evaluate(store, &[], SETTINGS, NOW).unwrap();
        assert_eq!(all_time(&report), [FindingKind::EarlyWarning], "{report:?}");

        store_windows(store, "b", vec![vm("f", true, 0, (3e17, 4e17), 0.0)]);
        let report = evaluate(store, &[], SETTINGS, NOW + 60).unwrap();
        assert_eq!(all_time(&report), [FindingKind::TrainingThresholdCrossed], "{report:?}");
        let crossed = open_finding(store, FindingKind::TrainingThresholdCrossed, "f").unwrap();
        let e = &crossed.finding.evidence;
        assert_eq!((e["basis"].as_str(), e["threshold_basis"].as_str()), (Some("point"), Some("point")));
        assert_eq!((e["ops_lower"].as_f64(), e["estimated_ops"].as_f64()), (Some(9e17), Some(1.2e18)));
        assert_eq!(e["ops_by_method"], json!({"guest_reported": 1.2e18}));
        assert_eq!(e["guest_gap_gpu_seconds"].as_f64(), Some(0.0));
        assert!(crossed.finding.summary.contains("estimated operations"), "{}", crossed.finding.summary);

        // The tenant's upper bound is exactly its allocation: 3 windows × 8 GPUs × fastest
        // peak × 60 s, whatever the guest said.
        let usage = store.tenant_usage(Some("f"), None).unwrap();
        let f = &usage[0];
        assert!((f.ops_upper / (3.0 * ALLOCATION) - 1.0).abs() < 1e-12, "{f:?}");
        assert!((e["ops_upper"].as_f64().unwrap() / (3.0 * ALLOCATION) - 1.0).abs() < 1e-12, "{e}");
        assert_eq!((f.estimated_ops, f.guest_gap_gpu_seconds), (1.2e18, 0.0));
        assert!(open_finding(store, FindingKind::GuestTelemetryGap, "f").is_none());
    });
}

/// (c) Ingest refuses a window whose gap is more than its GPU-seconds or not a finite amount
/// (NaN cannot come over JSON, but a negative or oversized one can): the whole batch is
/// refused, naming the record and the bound; at the edge the window is stored.
async fn guest_gap_beyond_gpu_seconds_or_not_a_number_is_refused(db: TestDb) {
    let store = db.storage();
    off_runtime(|| {
        let store = store.as_ref();
        let admission = Admission { received_at: 2_000_000_000, enrolled_at: 0 };
        for (gap, reason) in [
            (481.0, "guest_gap_gpu_seconds 481 exceeds gpu_seconds 480"),
            (f64::NAN, "guest_gap_gpu_seconds must be a finite number >= 0"),
            (f64::INFINITY, "guest_gap_gpu_seconds must be a finite number >= 0"),
            (-1.0, "guest_gap_gpu_seconds must be a finite number >= 0"),
        ] {
            let good = vm("f", true, 0, (1e17, 2e17), 0.0);
            let bad = UsageWindow { guest_gap_gpu_seconds: gap, ..vm("f", true, 1, (1e17, 2e17), 0.0) };
            let records = vec![
                UsageRecord { seq: 1, last_seq: None, window: good },
                UsageRecord { seq: 2, last_seq: None, window: bad },
            ];
            match kycd_collector::ingest::validate_batch(batch("a", records), &Limits::default(), admission) {
                Err(IngestError::InvalidRecord { index: 1, seq: 2, reason: got }) => {
                    assert_eq!(got, reason, "{gap}");
                }
                other => panic!("{gap}: {other:?}"),
            }
        }
        // The same window at the edge (silent the whole window) is accepted and stored.
        store_windows(store, "a", vec![vm("f", true, 0, (0.0, 0.0), 480.0)]);
        let usage = store.tenant_usage(None, None).unwrap();
        assert_eq!(usage.len(), 1);
        assert_eq!((usage[0].guest_gap_gpu_seconds, usage[0].windows), (480.0, 1));
    });
}
