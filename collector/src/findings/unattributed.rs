//! `unattributed_training_scale`: usage no tenant is known for, held against the training
//! thresholds.
//!
//! A workload without a valid, verified attestation is "unverified" (REGULATION.md, what
//! follows for the agent, 1): under the policy's `unverified: allow` or `grace` it runs, and
//! its windows reach the collector with no tenant. Without this rule a customer could train at
//! any scale that way and never cross a tenant threshold. Its usage is aggregated per (host,
//! workload) ([`UnattributedUsage`]): nothing ties it to a customer across hosts. Whether the
//! customer is a foreign person is unknown, so it is treated as one (the finding's
//! `foreign_person` is true and its summary says why): the thresholds are the published
//! policy's, the training one held against the figure its `threshold_basis` names, the cluster
//! one against the workload's per-minute peak capacity. Without a published policy the rule is
//! not evaluated (like the tenants' threshold rules).

use kycd_protocol::{PolicyClaims, ThresholdBasis};
use serde_json::json;

use crate::fleet::{FindingKind, NewFinding, UnattributedUsage};

/// Appends an `unattributed_training_scale` finding for each unattributed workload whose
/// usage crosses `policy`'s training threshold (on its basis) or cluster threshold.
pub fn unattributed_findings(policy: &PolicyClaims, usage: &[UnattributedUsage], out: &mut Vec<NewFinding>) {
    let t = &policy.thresholds;
    for u in usage {
        let (figure, figure_name) = match policy.threshold_basis {
            ThresholdBasis::Point => (u.estimated_ops, "estimated operations"),
            ThresholdBasis::Upper => (u.ops_upper, "operations (upper bound)"),
        };
        let training = figure >= t.training_ops;
        let cluster = u.peak_flops >= t.cluster_flops;
        if !training && !cluster {
            continue;
        }
        let mut crossed = Vec::new();
        let mut what = Vec::new();
        if training {
            crossed.push("training_ops");
            what.push(format!("{figure:.3e} {figure_name} ≥ training threshold {:.3e}", t.training_ops));
        }
        if cluster {
            crossed.push("cluster_flops");
            what.push(format!(
                "{:.3e} FLOP/s capacity ≥ cluster threshold {:.3e}",
                u.peak_flops, t.cluster_flops
            ));
        }
        let subject = u.subject();
        out.push(NewFinding {
            kind: FindingKind::UnattributedTrainingScale,
            summary: format!(
                "unattributed workload {subject} (no verified tenant; foreign status unknown, treated as foreign): {}",
                what.join("; ")
            ),
            evidence: json!({
                "host_id": u.host_id,
                "workload": u.workload,
                "ops_lower": u.ops_lower,
                "estimated_ops": u.estimated_ops,
                "ops_upper": u.ops_upper,
                "threshold_basis": policy.threshold_basis.as_str(),
                "gpu_hours": u.gpu_hours(),
                "shared_gpu_seconds": u.shared_gpu_seconds,
                "guest_gap_gpu_seconds": u.guest_gap_gpu_seconds,
                "peak_flops": u.peak_flops,
                "peak_at": u.peak_at,
                "gpus": u.gpus,
                "windows": u.windows,
                "ops_by_method": u.ops_by_method,
                "first_seen": u.first_seen,
                "last_seen": u.last_seen,
                "threshold": {"training_ops": t.training_ops, "cluster_flops": t.cluster_flops},
                "crossed": crossed,
                "foreign_status": "unknown, treated as foreign",
                "policy_version": policy.version,
            }),
            due_at: None,
            subject,
            tenant: None,
            host_id: Some(u.host_id.clone()),
            foreign_person: Some(true),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(basis: &str) -> PolicyClaims {
        serde_json::from_value(json!({
            "iss": "authority", "iat": 0, "exp": 10_000_000, "version": 4, "measures": [],
            "unverified": {"action": "allow"},
            "thresholds": {"training_ops": 1e18, "bio_training_ops": 1e17, "cluster_flops": 1e16,
                           "early_warning_fraction": 0.5},
            "threshold_basis": basis
        }))
        .unwrap()
    }

    fn usage(workload: &str, ops: (f64, f64, f64), peak_flops: f64) -> UnattributedUsage {
        UnattributedUsage {
            host_id: "h".into(),
            workload: workload.into(),
            ops_lower: ops.0,
            estimated_ops: ops.1,
            ops_upper: ops.2,
            gpu_seconds: 3600.0,
            shared_gpu_seconds: 0.0,
            guest_gap_gpu_seconds: 0.0,
            peak_flops,
            peak_at: 60,
            gpus: 8,
            windows: 60,
            ops_by_method: Default::default(),
            first_seen: 0,
            last_seen: 3600,
        }
    }

    #[test]
    fn crosses_on_the_policy_basis_or_the_cluster_capacity() {
        let fleet = [
            usage("point", (5e17, 1e18, 2e18), 1e15),
            usage("upper-only", (1e17, 5e17, 1e18), 1e15),
            usage("capacity", (0.0, 1e15, 1e15), 1e16),
            usage("below", (1e17, 2e17, 9e17), 9.9e15),
        ];
        let subjects = |basis| {
            let mut out = Vec::new();
            unattributed_findings(&policy(basis), &fleet, &mut out);
            out
        };
        let point = subjects("point");
        assert_eq!(point.iter().map(|f| f.subject.as_str()).collect::<Vec<_>>(), ["h/point", "h/capacity"]);
        let f = &point[0];
        assert_eq!(
            (f.kind, f.tenant.as_deref(), f.host_id.as_deref()),
            (FindingKind::UnattributedTrainingScale, None, Some("h"))
        );
        assert_eq!(f.foreign_person, Some(true));
        assert!(
            f.summary.contains("treated as foreign") && f.summary.contains("estimated operations"),
            "{}",
            f.summary
        );
        assert_eq!(f.evidence["crossed"], json!(["training_ops"]));
        assert_eq!(
            (f.evidence["workload"].as_str(), f.evidence["policy_version"].as_u64()),
            (Some("point"), Some(4))
        );
        assert_eq!(point[1].evidence["crossed"], json!(["cluster_flops"]));
        let upper = subjects("upper");
        assert_eq!(
            upper.iter().map(|f| f.subject.as_str()).collect::<Vec<_>>(),
            ["h/point", "h/upper-only", "h/capacity"]
        );
        assert_eq!(upper[1].evidence["threshold_basis"], "upper");
    }
}
