//! The per-run threshold rules: `run_threshold_crossed` and `bio_early_warning`.
//!
//! The all-time rules ([`super::rules`]) hold a tenant's cumulative operations against the
//! thresholds; the orders speak of a *training run*, so each run ([`crate::fleet::runs`],
//! cut at pauses longer than the policy's `run_gap_s`) is held against them as well:
//! - a run of a tenant whose attestation declares `biological_sequence_data` is held against
//!   `bio_training_ops` (10^23 by default), any other run against `training_ops`, each on the
//!   figure the policy's `threshold_basis` names → `run_threshold_crossed`;
//! - a run not so declared whose upper bound reaches `bio_training_ops` raises
//!   `bio_early_warning`, the second early-warning tier: the provider learns early of a run
//!   that would be reportable had its data been biological sequences.
//!
//! Subjects are `tenant/run/START` (the start of the run's first window); the evidence carries
//! the run's span, whether it still runs, its three figures by method, GPU-hours, peak
//! concurrent capacity, hosts, the threshold applied and why, and the policy version.

use std::collections::BTreeMap;

use kycd_protocol::{PolicyClaims, ThresholdBasis};
use serde_json::json;

use crate::fleet::{FindingKind, NewFinding, Run, TenantIdentity, TenantUsage};

/// Appends the run findings of every tenant in `usage` at `now`.
pub fn run_findings(
    policy: &PolicyClaims,
    usage: &[TenantUsage],
    identities: &BTreeMap<String, TenantIdentity>,
    now: i64,
    out: &mut Vec<NewFinding>,
) {
    let t = &policy.thresholds;
    let gap = i64::try_from(t.run_gap_s).unwrap_or(i64::MAX);
    for tenant in usage {
        let identity = identities.get(&tenant.tenant);
        let foreign = identity.map_or(tenant.foreign_person, |i| i.foreign_person);
        let bio = identity.is_some_and(TenantIdentity::declares_bio);
        let origin = if foreign { "foreign" } else { "domestic" };
        for run in tenant.runs(gap, now) {
            let (figure, figure_name) = match policy.threshold_basis {
                ThresholdBasis::Point => (run.figures.estimated_ops, "estimated operations"),
                ThresholdBasis::Upper => (run.figures.ops_upper, "operations (upper bound)"),
            };
            let (threshold, threshold_name) =
                if bio { (t.bio_training_ops, "bio_training_ops") } else { (t.training_ops, "training_ops") };
            let span = format!(
                "run {}…{}",
                crate::dates::rfc3339(run.first_start),
                crate::dates::rfc3339(run.last_end)
            );
            let finding =
                |kind, summary: String, threshold: f64, name: &str, basis: ThresholdBasis| NewFinding {
                    kind,
                    subject: run.subject(&tenant.tenant),
                    tenant: Some(tenant.tenant.clone()),
                    host_id: None,
                    foreign_person: Some(foreign),
                    summary,
                    evidence: run_evidence(policy, &run, threshold, name, basis, bio),
                    due_at: None,
                };
            if figure >= threshold {
                out.push(finding(
                    FindingKind::RunThresholdCrossed,
                    format!(
                        "{origin} tenant {} {span}: {figure:.3e} {figure_name} ≥ {threshold_name} {threshold:.3e}{}",
                        tenant.tenant,
                        if bio { " (declared biological sequence data)" } else { "" }
                    ),
                    threshold,
                    threshold_name,
                    policy.threshold_basis,
                ));
            }
            if !bio && run.figures.ops_upper >= t.bio_training_ops {
                out.push(finding(
                    FindingKind::BioEarlyWarning,
                    format!(
                        "{origin} tenant {} {span}: up to {:.3e} operations (upper bound) ≥ bio_training_ops {:.3e}, the threshold had its data been biological sequences",
                        tenant.tenant, run.figures.ops_upper, t.bio_training_ops
                    ),
                    t.bio_training_ops,
                    "bio_training_ops",
                    ThresholdBasis::Upper,
                ));
            }
        }
    }
}

fn run_evidence(
    policy: &PolicyClaims,
    run: &Run,
    threshold: f64,
    threshold_name: &str,
    basis: ThresholdBasis,
    bio: bool,
) -> serde_json::Value {
    json!({
        "run": run,
        "gpu_hours": run.gpu_hours(),
        "threshold": {threshold_name: threshold},
        "threshold_name": threshold_name,
        "basis": basis.as_str(),
        "threshold_basis": policy.threshold_basis.as_str(),
        "declared_biological_sequence_data": bio,
        "run_gap_s": policy.thresholds.run_gap_s,
        "policy_version": policy.version,
    })
}
