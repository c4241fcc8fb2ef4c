//! The rule set: [`desired_findings`], a pure function of the fleet's state (see the table in
//! [`super`]), and the state it reads ([`FleetState`], [`HostView`], [`EvaluationSettings`]).

use std::collections::BTreeMap;

use kycd_protocol::{HostStatementClaims, MeasureAction, PolicyClaims, ThresholdBasis, Verdict};
use serde_json::json;

use super::prohibitions::prohibitions;
use super::runs::run_findings;
use super::unattributed::unattributed_findings;
use crate::fleet::{
    Finding, FindingKind, NewFinding, RejectionCount, TenantIdentity, TenantUsage, UnattributedUsage,
};
use crate::policy::PublishedPolicy;

/// Tunables of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaluationSettings {
    /// A host with neither a stored report nor a verified poll answer for this long is dark
    /// (three poll intervals by default).
    pub dark_after_s: i64,
    /// Statements taken within this long after a policy was published may still show the
    /// previous version (agents fetch on an interval) without being stale.
    pub policy_grace_s: i64,
    /// A host with a batch refused for good within this long has a `report_rejected`
    /// finding open.
    pub rejected_window_s: i64,
}

impl Default for EvaluationSettings {
    fn default() -> Self {
        EvaluationSettings { dark_after_s: 180, policy_grace_s: 600, rejected_window_s: 86_400 }
    }
}

/// What the collector knows about one enrolled host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    /// Host id.
    pub host_id: String,
    /// When it was enrolled.
    pub enrolled_at: i64,
    /// When its last report was stored.
    pub last_report_at: Option<i64>,
    /// When it last answered a poll with a verified statement.
    pub last_poll_ok_at: Option<i64>,
    /// Its latest verified statement.
    pub statement: Option<HostStatementClaims>,
    /// Its batches refused for good within the rejected window, if any.
    pub rejected: Option<RejectionCount>,
}

/// The fleet's state, as the rules read it.
#[derive(Debug, Clone, Copy)]
pub struct FleetState<'a> {
    /// Now (Unix seconds).
    pub now: i64,
    /// The published policy.
    pub policy: Option<&'a PublishedPolicy>,
    /// Usage per tenant.
    pub usage: &'a [TenantUsage],
    /// Usage without a tenant, per (host, workload).
    pub unattributed: &'a [UnattributedUsage],
    /// Identities per tenant id.
    pub identities: &'a BTreeMap<String, TenantIdentity>,
    /// Enrolled hosts.
    pub hosts: &'a [HostView],
    /// The findings not resolved (open, acknowledged, filed, dismissed).
    pub findings: &'a [Finding],
    /// Tunables.
    pub settings: EvaluationSettings,
}

/// The findings that hold in `state`, in a stable order.
pub fn desired_findings(state: &FleetState<'_>) -> Vec<NewFinding> {
    let mut out = Vec::new();
    if let Some(policy) = state.policy {
        for usage in state.usage {
            tenant_findings(&policy.claims, usage, state.identities.get(&usage.tenant), &mut out);
        }
        unattributed_findings(&policy.claims, state.unattributed, &mut out);
        run_findings(&policy.claims, state.usage, state.identities, state.now, &mut out);
    }
    // A deadline passed is a fact about the provider's filing, with or without a policy now.
    for finding in state.findings {
        overdue_finding(state.now, finding, &mut out);
    }
    // Not a threshold rule: sharing is a fact about the measurement, raised with or without a
    // published policy (which only adds whether it broke an `exclusive_gpu` condition).
    for usage in state.usage {
        shared_gpu_finding(state, usage, &mut out);
    }
    // Likewise a fact about the measurement: for the gap seconds only the allocation is known.
    for usage in state.usage {
        guest_telemetry_gap_finding(state, usage, &mut out);
    }
    for host in state.hosts {
        host_findings(state, host, &mut out);
    }
    out
}

fn tenant_findings(
    policy: &PolicyClaims,
    usage: &TenantUsage,
    identity: Option<&TenantIdentity>,
    out: &mut Vec<NewFinding>,
) {
    let t = &policy.thresholds;
    let foreign = identity.map_or(usage.foreign_person, |i| i.foreign_person);
    let origin = if foreign { "foreign" } else { "domestic" };
    let totals = json!({
        "ops_lower": usage.ops_lower,
        "estimated_ops": usage.estimated_ops,
        "ops_upper": usage.ops_upper,
        "shared_gpu_seconds": usage.shared_gpu_seconds,
        "guest_gap_gpu_seconds": usage.guest_gap_gpu_seconds,
        "threshold_basis": policy.threshold_basis.as_str(),
        "gpu_hours": usage.gpu_hours(),
        "peak_flops": usage.peak_flops,
        "peak_at": usage.peak_at,
        "hosts": usage.hosts,
        "gpus": usage.gpus,
        "windows": usage.windows,
        "ops_by_method": usage.ops_by_method,
        "first_seen": usage.first_seen,
        "last_seen": usage.last_seen,
        "policy_version": policy.version,
    });
    // `basis`: which of the three figures crossed; `None` for a capacity finding.
    let mut raise =
        |kind: FindingKind, summary: String, threshold: serde_json::Value, basis: Option<ThresholdBasis>| {
            let mut evidence = totals.clone();
            if let Some(map) = evidence.as_object_mut() {
                map.insert("threshold".into(), threshold);
                if let Some(basis) = basis {
                    map.insert("basis".into(), json!(basis.as_str()));
                }
            }
            out.push(NewFinding {
                kind,
                subject: usage.tenant.clone(),
                tenant: Some(usage.tenant.clone()),
                host_id: None,
                foreign_person: Some(foreign),
                summary,
                evidence,
                due_at: None,
            });
        };
    // The early warning is there to be early: it holds the most operations the measured
    // activity allows (the upper bound) against its fraction, whatever the policy's basis.
    let early = t.early_warning_fraction * t.training_ops;
    if usage.ops_upper >= early {
        raise(
            FindingKind::EarlyWarning,
            format!(
                "{origin} tenant {}: up to {:.3e} operations (upper bound; point estimate {:.3e}) ≥ early warning {:.3e} ({} × {:.3e})",
                usage.tenant, usage.ops_upper, usage.estimated_ops, early, t.early_warning_fraction, t.training_ops
            ),
            json!({"early_warning_ops": early, "early_warning_fraction": t.early_warning_fraction,
                   "training_ops": t.training_ops}),
            Some(ThresholdBasis::Upper),
        );
    }
    // The training threshold is held against the figure the policy names.
    let (crossed, figure) = match policy.threshold_basis {
        ThresholdBasis::Point => (usage.estimated_ops, "estimated operations"),
        ThresholdBasis::Upper => (usage.ops_upper, "operations (upper bound)"),
    };
    if crossed >= t.training_ops {
        raise(
            FindingKind::TrainingThresholdCrossed,
            format!(
                "{origin} tenant {}: {crossed:.3e} {figure} ≥ training threshold {:.3e} (bounds {:.3e} … {:.3e})",
                usage.tenant, t.training_ops, usage.ops_lower, usage.ops_upper
            ),
            json!({"training_ops": t.training_ops}),
            Some(policy.threshold_basis),
        );
    }
    if usage.peak_flops >= t.cluster_flops {
        raise(
            FindingKind::ClusterCapacityCrossed,
            format!(
                "{origin} tenant {}: {:.3e} FLOP/s concurrent capacity on {} hosts fleet-wide ≥ cluster threshold {:.3e}",
                usage.tenant, usage.peak_flops, usage.hosts, t.cluster_flops
            ),
            json!({"cluster_flops": t.cluster_flops}),
            None,
        );
    }
    // The cluster as the rule means it: the hosts of one site and network fabric at once.
    for cluster in usage.clusters.iter().filter(|c| c.peak_flops >= t.cluster_flops) {
        let mut evidence = totals.clone();
        if let Some(map) = evidence.as_object_mut() {
            map.insert("threshold".into(), json!({"cluster_flops": t.cluster_flops}));
            map.insert("cluster".into(), json!(cluster));
        }
        out.push(NewFinding {
            kind: FindingKind::ColocatedCapacityCrossed,
            subject: format!("{}/cluster/{}", usage.tenant, cluster.name()),
            tenant: Some(usage.tenant.clone()),
            host_id: None,
            foreign_person: Some(foreign),
            summary: format!(
                "{origin} tenant {}: {:.3e} FLOP/s concurrent capacity on {} host(s) of cluster {} at {} ≥ cluster threshold {:.3e}",
                usage.tenant,
                cluster.peak_flops,
                cluster.hosts,
                cluster.name(),
                crate::dates::rfc3339(cluster.peak_at),
                t.cluster_flops
            ),
            evidence,
            due_at: None,
        });
    }
}

/// `shared_gpu`: a foreign tenant's usage includes GPU-seconds on a GPU shared with another
/// workload without isolation, so its operations there are an attribution by SM share, not a
/// measurement (bounds 0 … the whole device). Domestic tenants are not reported for it.
fn shared_gpu_finding(state: &FleetState<'_>, usage: &TenantUsage, out: &mut Vec<NewFinding>) {
    let foreign = state.identities.get(&usage.tenant).map_or(usage.foreign_person, |i| i.foreign_person);
    if !foreign || usage.shared_gpu_seconds <= 0.0 {
        return;
    }
    // Measures of the published policy, in effect now, that condition GPU use on exclusive
    // GPUs: the agent cannot make a running GPU exclusive, so sharing breaks the condition.
    let measures: Vec<&str> = state
        .policy
        .map(|p| {
            p.claims
                .measures
                .iter()
                .filter(|m| {
                    m.action == MeasureAction::Condition && m.effective_from.is_none_or(|f| f <= state.now)
                })
                .filter(|m| m.conditions.as_ref().is_some_and(|c| c.exclusive_gpu))
                .map(|m| m.id.as_str())
                .collect()
        })
        .unwrap_or_default();
    // Where a host's latest statement shows the condition imposed on this tenant's workload.
    let imposed: Vec<String> = state
        .hosts
        .iter()
        .filter_map(|h| Some((h, h.statement.as_ref()?)))
        .flat_map(|(h, s)| s.workloads.iter().map(move |w| (h, w)))
        .filter(|(_, w)| w.tenant.as_deref() == Some(usage.tenant.as_str()))
        .filter(|(_, w)| w.conditions.as_ref().is_some_and(|c| c.exclusive_gpu))
        .map(|(h, w)| format!("{}/{}", h.host_id, w.workload))
        .collect();
    let violated = !measures.is_empty();
    let condition = if violated {
        format!("; the exclusive_gpu condition of measure(s) {} was violated", measures.join(", "))
    } else {
        String::new()
    };
    out.push(NewFinding {
        kind: FindingKind::SharedGpu,
        subject: usage.tenant.clone(),
        tenant: Some(usage.tenant.clone()),
        host_id: None,
        foreign_person: Some(true),
        summary: format!(
            "foreign tenant {}: {:.0} GPU-seconds on GPUs shared without isolation on {} host(s): its operations there cannot be attributed to it alone{condition}",
            usage.tenant,
            usage.shared_gpu_seconds,
            usage.shared_gpu_hosts.len()
        ),
        evidence: json!({
            "shared_gpu_seconds": usage.shared_gpu_seconds,
            "gpu_seconds": usage.gpu_seconds,
            "shared_gpu_hosts": usage.shared_gpu_hosts,
            "ops_lower": usage.ops_lower,
            "estimated_ops": usage.estimated_ops,
            "ops_upper": usage.ops_upper,
            "policy_version": state.policy.map(|p| p.version),
            "exclusive_gpu_required": violated,
            "exclusive_gpu_measures": measures,
            "exclusive_gpu_imposed_on": imposed,
            "condition_violated": violated,
        }),
        due_at: None,
    });
}

/// `guest_telemetry_gap`: a foreign tenant's VM held passed-through GPUs while its guest sent
/// no telemetry (the guest's sampler was stopped, or never ran), so for those GPU-seconds the
/// host knows only that the GPUs were held: the point estimate and lower bound count 0 there,
/// the upper bound the whole allocation. Domestic tenants are not reported for it.
fn guest_telemetry_gap_finding(state: &FleetState<'_>, usage: &TenantUsage, out: &mut Vec<NewFinding>) {
    let foreign = state.identities.get(&usage.tenant).map_or(usage.foreign_person, |i| i.foreign_person);
    if !foreign || usage.guest_gap_gpu_seconds <= 0.0 {
        return;
    }
    out.push(NewFinding {
        kind: FindingKind::GuestTelemetryGap,
        subject: usage.tenant.clone(),
        tenant: Some(usage.tenant.clone()),
        host_id: None,
        foreign_person: Some(true),
        summary: format!(
            "foreign tenant {}: {:.0} GPU-seconds on passed-through GPUs of VM(s) whose guest sent no telemetry, on {} host(s): only the allocation bounds its operations there",
            usage.tenant,
            usage.guest_gap_gpu_seconds,
            usage.guest_gap_hosts.len()
        ),
        evidence: json!({
            "guest_gap_gpu_seconds": usage.guest_gap_gpu_seconds,
            "gpu_seconds": usage.gpu_seconds,
            "guest_gap_hosts": usage.guest_gap_hosts,
            "guest_gap_workloads": usage.guest_gap_workloads,
            "ops_lower": usage.ops_lower,
            "estimated_ops": usage.estimated_ops,
            "ops_upper": usage.ops_upper,
            "ops_by_method": usage.ops_by_method,
            "policy_version": state.policy.map(|p| p.version),
        }),
        due_at: None,
    });
}

/// `report_overdue`: `finding` has a filing deadline that passed while it was neither filed
/// nor dismissed. Resolves (it is no threshold kind) once it is filed or dismissed.
fn overdue_finding(now: i64, finding: &Finding, out: &mut Vec<NewFinding>) {
    let Some(due_at) = finding.finding.due_at else { return };
    if now <= due_at || !finding.state.is_pending() {
        return;
    }
    let f = &finding.finding;
    out.push(NewFinding {
        kind: FindingKind::ReportOverdue,
        subject: format!("finding/{}", finding.id),
        tenant: f.tenant.clone(),
        host_id: f.host_id.clone(),
        foreign_person: f.foreign_person,
        summary: format!(
            "finding {} ({} about {}) was due for filing at {} and is {}: {}s overdue",
            finding.id,
            f.kind.as_str(),
            f.subject,
            crate::dates::rfc3339(due_at),
            finding.state.as_str(),
            now - due_at
        ),
        evidence: json!({"finding_id": finding.id, "kind": f.kind.as_str(), "subject": f.subject,
                         "raised_at": finding.raised_at, "due_at": due_at, "state": finding.state.as_str(),
                         "acknowledged": finding.acknowledged}),
        due_at: None,
    });
}

fn host_findings(state: &FleetState<'_>, host: &HostView, out: &mut Vec<NewFinding>) {
    let settings = state.settings;
    let host_finding =
        |kind, subject: String, tenant: Option<String>, foreign, summary, evidence| NewFinding {
            kind,
            subject,
            tenant,
            host_id: Some(host.host_id.clone()),
            foreign_person: foreign,
            summary,
            evidence,
            due_at: None,
        };

    let last_heard = host.last_report_at.max(host.last_poll_ok_at);
    let silent_since = last_heard.unwrap_or(host.enrolled_at);
    if state.now - silent_since > settings.dark_after_s {
        let heard = match last_heard {
            Some(at) => format!("last heard {}s ago", state.now - at),
            None => "never heard from since enrollment".to_owned(),
        };
        out.push(host_finding(
            FindingKind::HostDark,
            host.host_id.clone(),
            None,
            None,
            format!(
                "host {}: no report and no poll answer for over {}s ({heard})",
                host.host_id, settings.dark_after_s
            ),
            json!({"last_report_at": host.last_report_at, "last_poll_ok_at": host.last_poll_ok_at,
                   "enrolled_at": host.enrolled_at, "dark_after_s": settings.dark_after_s}),
        ));
    }

    if let Some(rejected) =
        host.rejected.as_ref().filter(|r| r.count > 0 && state.now - r.last_at <= settings.rejected_window_s)
    {
        out.push(host_finding(
            FindingKind::ReportRejected,
            host.host_id.clone(),
            None,
            None,
            format!(
                "host {}: {} report batch(es) refused for good within {}s (latest {}s ago): their usage is not counted",
                host.host_id,
                rejected.count,
                settings.rejected_window_s,
                state.now - rejected.last_at
            ),
            json!({"rejected_batches": rejected.count, "last_rejected_at": rejected.last_at,
                   "rejected_window_s": settings.rejected_window_s}),
        ));
    }

    let (Some(policy), Some(statement)) = (state.policy, &host.statement) else {
        return;
    };
    let behind = statement.policy_version.is_none_or(|v| v < policy.version);
    if behind && statement.iat >= policy.published_at + settings.policy_grace_s {
        let shown =
            statement.policy_version.map_or_else(|| "no policy".to_owned(), |v| format!("version {v}"));
        out.push(host_finding(
            FindingKind::PolicyStale,
            host.host_id.clone(),
            None,
            None,
            format!("host {}: enforces {shown}, published is version {}", host.host_id, policy.version),
            json!({"statement_policy_version": statement.policy_version, "published_version": policy.version,
                   "published_at": policy.published_at, "statement_iat": statement.iat}),
        ));
    }

    for workload in &statement.workloads {
        if !matches!(workload.verdict, Verdict::Allow | Verdict::Condition) {
            continue;
        }
        let (Some(tenant), Some(subject)) = (&workload.tenant, &workload.subject) else {
            continue;
        };
        let hits = prohibitions(&policy.claims, tenant, subject, state.now);
        if hits.is_empty() {
            continue;
        }
        let verdict = if workload.verdict == Verdict::Allow { "allows" } else { "conditionally allows" };
        let measures: Vec<&str> = hits.iter().map(|h| h.measure.as_str()).collect();
        out.push(host_finding(
            FindingKind::EnforcementMismatch,
            format!("{}/{}", host.host_id, workload.workload),
            Some(tenant.clone()),
            Some(subject.foreign_person),
            format!(
                "host {} {verdict} tenant {tenant} ({}) which published policy version {} prohibits (measure {})",
                host.host_id,
                workload.workload,
                policy.version,
                measures.join(", ")
            ),
            json!({"workload": workload.workload, "verdict": workload.verdict,
                   "attestation_digest": workload.attestation_digest,
                   "statement_policy_version": statement.policy_version,
                   "statement_iat": statement.iat, "published_version": policy.version,
                   "prohibited_by": hits}),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kycd_protocol::StatementSubject;
    use serde_json::json;

    /// A host statement's word that tenant `said-domestic` is no foreign person.
    fn said_domestic() -> BTreeMap<String, TenantIdentity> {
        let domestic = TenantIdentity {
            tenant: "said-domestic".into(),
            legal_name: "D".into(),
            countries: vec![],
            beneficial_owner_countries: vec![],
            foreign_person: false,
            seen_at: 0,
            detail: None,
        };
        BTreeMap::from([("said-domestic".to_owned(), domestic)])
    }

    fn policy(published_at: i64) -> PublishedPolicy {
        let claims: PolicyClaims = serde_json::from_value(json!({
            "iss": "authority", "iat": 0, "exp": 10_000_000, "version": 7,
            "measures": [
                {"id": "m-kp", "match": {"countries": ["KP"]}, "roles": ["payment_source"],
                 "action": "prohibit", "citation": "c"},
                {"id": "m-later", "match": {"countries": ["RU"]}, "roles": ["customer"],
                 "action": "prohibit", "citation": "c", "effective_from": 5_000},
                {"id": "m-name", "match": {"entities": ["Evil  CORP"]}, "roles": ["customer"],
                 "action": "prohibit", "citation": "c"},
                {"id": "m-cond", "match": {"countries": ["SG"]}, "roles": ["customer"],
                 "action": "condition", "conditions": {"no_gpu": true}, "citation": "c"}
            ],
            "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.5}
        }))
        .unwrap();
        PublishedPolicy { version: 7, token: String::new(), published_at, claims }
    }

    fn subject(json: serde_json::Value) -> StatementSubject {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn prohibitions_match_roles_dates_and_names() {
        let p = policy(0).claims;
        let paid_from_kp =
            subject(json!({"legal_name": "A", "countries": ["SG"], "payment_source_country": "KP",
                                          "foreign_person": true}));
        let hits = prohibitions(&p, "t", &paid_from_kp, 1_000);
        assert_eq!(hits.iter().map(|h| h.measure.as_str()).collect::<Vec<_>>(), ["m-kp"]);
        assert_eq!(hits[0].matched, ["payment_source country KP"]);
        // A KP *customer* is not matched by a payment-source-only measure; conditions never are.
        let kp_customer = subject(json!({"legal_name": "A", "countries": ["KP"], "foreign_person": true}));
        assert!(prohibitions(&p, "t", &kp_customer, 1_000).is_empty());
        let ru = subject(json!({"legal_name": "A", "countries": ["RU"], "foreign_person": true}));
        assert!(prohibitions(&p, "t", &ru, 4_999).is_empty(), "not yet effective");
        assert_eq!(prohibitions(&p, "t", &ru, 5_000).len(), 1);
        let evil = subject(json!({"legal_name": " evil corp ", "countries": ["US"], "foreign_person": true}));
        assert_eq!(prohibitions(&p, "t", &evil, 0)[0].matched, ["customer entity name"]);
    }

    fn host(statement_iat: i64, version: Option<u64>, last_report_at: Option<i64>) -> HostView {
        HostView {
            host_id: "h".into(),
            enrolled_at: 0,
            last_report_at,
            last_poll_ok_at: None,
            rejected: None,
            statement: Some(
                serde_json::from_value(json!({"iss": "h", "iat": statement_iat, "exp": statement_iat + 60,
                    "nonce": "n", "agent_version": "1", "policy_version": version, "workloads": []}))
                .unwrap(),
            ),
        }
    }

    fn kinds(policy: &PublishedPolicy, hosts: &[HostView], now: i64) -> Vec<FindingKind> {
        let identities = BTreeMap::new();
        let state = FleetState {
            now,
            policy: Some(policy),
            usage: &[],
            unattributed: &[],
            identities: &identities,
            hosts,
            findings: &[],
            settings: EvaluationSettings { dark_after_s: 180, policy_grace_s: 600, rejected_window_s: 3600 },
        };
        desired_findings(&state).into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn stale_policy_waits_out_the_grace_period_and_dark_needs_silence() {
        let published = policy(10_000);
        // Within the grace period an old version is expected; after it, it is stale.
        assert_eq!(kinds(&published, &[host(10_599, Some(6), Some(10_599))], 10_600), []);
        assert_eq!(
            kinds(&published, &[host(10_600, Some(6), Some(10_600))], 10_600),
            [FindingKind::PolicyStale]
        );
        assert_eq!(
            kinds(&published, &[host(10_600, None, Some(10_600))], 10_600),
            [FindingKind::PolicyStale]
        );
        assert_eq!(kinds(&published, &[host(10_600, Some(7), Some(10_600))], 10_600), []);
        // Silence: 180 s is fine, 181 s is dark; a poll answer counts like a report.
        assert_eq!(kinds(&published, &[host(10_000, Some(7), Some(10_000))], 10_180), []);
        assert_eq!(
            kinds(&published, &[host(10_000, Some(7), Some(10_000))], 10_181),
            [FindingKind::HostDark]
        );
        let mut polled = host(10_000, Some(7), None);
        polled.last_poll_ok_at = Some(10_100);
        assert_eq!(kinds(&published, &[polled], 10_200), []);
    }

    /// `shared_gpu`: only for tenants foreign by their identity (which wins over the windows'
    /// flag); the measures named are the `exclusive_gpu` conditions in effect; statements
    /// showing the condition imposed on the tenant's workload are quoted.
    #[test]
    fn shared_gpu_names_the_exclusive_conditions_in_effect() {
        use crate::fleet::{UsageAccumulator, WindowRow};
        let mut acc = UsageAccumulator::default();
        for tenant in ["f", "said-domestic"] {
            acc.add(&WindowRow {
                tenant: Some(tenant),
                host_id: "h",
                start: 0,
                end: 60,
                gpu_seconds: 60.0,
                gpus: 1,
                ops_lower: 0.0,
                estimated_ops: 1.0,
                ops_upper: 2.0,
                shared_gpu_seconds: 60.0,
                guest_gap_gpu_seconds: 0.0,
                workload: None,
                peak_flops: 1.0,
                method: "shared_split",
                foreign_person: true,
            });
        }
        let usage = acc.finish();
        let mut published = policy(0);
        published.claims.measures = serde_json::from_value(json!([
            {"id": "m-now", "match": {"countries": ["SG"]}, "roles": ["customer"], "action": "condition",
             "conditions": {"exclusive_gpu": true}, "citation": "c"},
            {"id": "m-later", "match": {"countries": ["SG"]}, "roles": ["customer"], "action": "condition",
             "conditions": {"exclusive_gpu": true}, "citation": "c", "effective_from": 5_000},
            {"id": "m-other", "match": {"countries": ["SG"]}, "roles": ["customer"], "action": "condition",
             "conditions": {"no_gpu": true}, "citation": "c"}
        ]))
        .unwrap();
        let mut h = host(1_000, Some(7), Some(1_000));
        if let Some(statement) = h.statement.as_mut() {
            statement.workloads = serde_json::from_value(json!([
                {"workload": "cgroup:/f", "tenant": "f", "verdict": "condition", "conditions": {"exclusive_gpu": true}},
                {"workload": "cgroup:/x", "tenant": "x", "verdict": "condition", "conditions": {"exclusive_gpu": true}}
            ]))
            .unwrap();
        }
        let identities = said_domestic();
        let hosts = [h];
        let state = FleetState {
            now: 1_000,
            policy: Some(&published),
            usage: &usage,
            unattributed: &[],
            identities: &identities,
            hosts: &hosts,
            findings: &[],
            settings: EvaluationSettings::default(),
        };
        let shared: Vec<NewFinding> =
            desired_findings(&state).into_iter().filter(|f| f.kind == FindingKind::SharedGpu).collect();
        assert_eq!(shared.len(), 1, "{shared:?}");
        assert_eq!(shared[0].subject, "f");
        let e = &shared[0].evidence;
        assert_eq!(e["exclusive_gpu_measures"], json!(["m-now"]));
        assert_eq!(e["exclusive_gpu_imposed_on"], json!(["h/cgroup:/f"]));
        assert_eq!((e["condition_violated"].as_bool(), e["policy_version"].as_u64()), (Some(true), Some(7)));
        assert!(shared[0].summary.contains("m-now was violated"), "{}", shared[0].summary);
    }

    /// `guest_telemetry_gap`: only for tenants foreign by their identity (which wins over the
    /// windows' flag), with or without a published policy; the evidence names the gap
    /// seconds, hosts and VMs.
    #[test]
    fn guest_telemetry_gap_is_raised_for_foreign_tenants_without_a_policy() {
        use crate::fleet::{UsageAccumulator, WindowRow};
        let mut acc = UsageAccumulator::default();
        for (tenant, host, gap) in
            [("f", "h1", 40.0), ("f", "h2", 20.0), ("f", "h3", 0.0), ("said-domestic", "h1", 60.0)]
        {
            acc.add(&WindowRow {
                tenant: Some(tenant),
                host_id: host,
                start: 0,
                end: 60,
                gpu_seconds: 60.0,
                gpus: 1,
                ops_lower: 0.0,
                estimated_ops: 0.0,
                ops_upper: 6e16,
                shared_gpu_seconds: 0.0,
                guest_gap_gpu_seconds: gap,
                workload: (gap > 0.0).then_some("vm:guest"),
                peak_flops: 1e15,
                method: "allocation",
                foreign_person: true,
            });
        }
        let usage = acc.finish();
        let identities = said_domestic();
        let state = FleetState {
            now: 1_000,
            policy: None,
            usage: &usage,
            unattributed: &[],
            identities: &identities,
            hosts: &[],
            findings: &[],
            settings: EvaluationSettings::default(),
        };
        let gaps: Vec<NewFinding> = desired_findings(&state)
            .into_iter()
            .filter(|f| f.kind == FindingKind::GuestTelemetryGap)
            .collect();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!((gaps[0].subject.as_str(), gaps[0].foreign_person), ("f", Some(true)));
        let e = &gaps[0].evidence;
        assert_eq!(e["guest_gap_gpu_seconds"].as_f64(), Some(60.0));
        assert_eq!(e["guest_gap_hosts"], json!(["h1", "h2"]));
        assert_eq!(e["guest_gap_workloads"], json!(["h1/vm:guest", "h2/vm:guest"]));
        assert!(e["policy_version"].is_null());
        assert!(gaps[0].summary.contains("60 GPU-seconds"), "{}", gaps[0].summary);
        assert_eq!(FindingKind::parse("guest_telemetry_gap"), Some(FindingKind::GuestTelemetryGap));
    }
}
