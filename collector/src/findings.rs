//! Findings: what the collector concludes from the fleet view, raised once per state change.
//!
//! [`desired_findings`] is the rule set, a pure function of the fleet's state (aggregated
//! usage, tenant identities, hosts' last report/poll/statement, the published policy):
//!
//! | kind | holds when | about |
//! |---|---|---|
//! | `early_warning` | cumulative ops ≥ `early_warning_fraction × training_ops` | tenant |
//! | `training_threshold_crossed` | cumulative ops ≥ `training_ops` | tenant |
//! | `cluster_capacity_crossed` | concurrent peak FLOP/s ≥ `cluster_flops` | tenant |
//! | `host_dark` | no report and no poll answer for `dark_after_s` | host |
//! | `policy_stale` | a statement taken after the grace period shows an older policy | host |
//! | `enforcement_mismatch` | a statement allows a tenant a published prohibition matches | host/workload |
//! | `report_rejected` | a batch of the host was refused for good within `rejected_window_s` | host |
//!
//! `report_rejected` makes lost usage visible at the collector: a batch that verified with the
//! host's key and was then refused (`SeqConflict`, `InvalidRecord`, `HostMismatch`,
//! `Malformed`) is set aside by the agent and never sent again, so its windows are missing
//! from every total. The finding holds while the host's latest refusal is recent, so it is
//! raised even when the host reports fine again right after (a condition of "refused more
//! recently than stored" could come and go between two evaluations), and it resolves by
//! itself once refusals stop; its evidence quotes the newest refusals.
//!
//! Tenant findings carry the tenant's foreign flag (from its attestation, via host statements,
//! or from the reported windows when no statement named it yet): a reader of the regulation
//! files the foreign ones, the domestic ones are raised for the provider's own awareness.
//! Thresholds come from the published policy only (REGULATION.md: policy data, never
//! constants); with no policy published the threshold rules are not evaluated, and the
//! evaluation report says so.
//!
//! [`evaluate`] reconciles that set with the stored open findings: a condition that starts to
//! hold raises a finding (with evidence: totals, the top windows and the hosts), one that stops
//! holding resolves it. A condition that keeps holding is never raised twice: the store keeps
//! at most one open finding per (kind, subject), also across collector processes.

use std::collections::{BTreeMap, BTreeSet};

use kycd_protocol::{HostStatementClaims, MeasureAction, PolicyClaims, Role, StatementSubject, Verdict};
use serde::Serialize;
use serde_json::json;

use crate::fleet::{
    FindingKind, FindingQuery, FindingState, FleetStore, NewFinding, RejectionCount, TenantIdentity,
    TenantUsage,
};
use crate::policy::{PolicyStore, PublishedPolicy};
use crate::store::{Storage, StoreError};

/// How many windows a tenant finding quotes as evidence.
pub const EVIDENCE_WINDOWS: u32 = 20;

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
    /// Identities per tenant id.
    pub identities: &'a BTreeMap<String, TenantIdentity>,
    /// Enrolled hosts.
    pub hosts: &'a [HostView],
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
        "estimated_ops": usage.estimated_ops,
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
    let mut raise = |kind: FindingKind, summary: String, threshold: serde_json::Value| {
        let mut evidence = totals.clone();
        if let Some(map) = evidence.as_object_mut() {
            map.insert("threshold".into(), threshold);
        }
        out.push(NewFinding {
            kind,
            subject: usage.tenant.clone(),
            tenant: Some(usage.tenant.clone()),
            host_id: None,
            foreign_person: Some(foreign),
            summary,
            evidence,
        });
    };
    let early = t.early_warning_fraction * t.training_ops;
    if usage.estimated_ops >= early {
        raise(
            FindingKind::EarlyWarning,
            format!(
                "{origin} tenant {}: {:.3e} estimated operations ≥ early warning {:.3e} ({} × {:.3e})",
                usage.tenant, usage.estimated_ops, early, t.early_warning_fraction, t.training_ops
            ),
            json!({"early_warning_ops": early, "early_warning_fraction": t.early_warning_fraction,
                   "training_ops": t.training_ops}),
        );
    }
    if usage.estimated_ops >= t.training_ops {
        raise(
            FindingKind::TrainingThresholdCrossed,
            format!(
                "{origin} tenant {}: {:.3e} estimated operations ≥ training threshold {:.3e}",
                usage.tenant, usage.estimated_ops, t.training_ops
            ),
            json!({"training_ops": t.training_ops}),
        );
    }
    if usage.peak_flops >= t.cluster_flops {
        raise(
            FindingKind::ClusterCapacityCrossed,
            format!(
                "{origin} tenant {}: {:.3e} FLOP/s concurrent capacity on {} hosts ≥ cluster threshold {:.3e}",
                usage.tenant, usage.peak_flops, usage.hosts, t.cluster_flops
            ),
            json!({"cluster_flops": t.cluster_flops}),
        );
    }
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

/// A prohibition that matches a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prohibition {
    /// Measure id.
    pub measure: String,
    /// Its citation.
    pub citation: String,
    /// What matched (role and country, tenant id, or entity name).
    pub matched: Vec<String>,
}

/// The prohibiting measures of `policy` in effect at `now` that match the tenant as a host
/// statement describes it. The statement carries the customer's countries, its beneficial
/// owners', resellers' and payment source's countries, and the customer's legal name: the
/// same facts the agent's decision engine matches on, except beneficial owner and reseller
/// *names* (entity measures on those roles are the agent's alone to match).
pub fn prohibitions(
    policy: &PolicyClaims,
    tenant: &str,
    subject: &StatementSubject,
    now: i64,
) -> Vec<Prohibition> {
    let mut out = Vec::new();
    for measure in &policy.measures {
        if measure.action != MeasureAction::Prohibit || measure.effective_from.is_some_and(|from| from > now)
        {
            continue;
        }
        let m = &measure.matcher;
        let mut matched = Vec::new();
        for role in &measure.roles {
            let (name, countries): (&str, Vec<_>) = match role {
                Role::Customer => ("customer", subject.countries.clone()),
                Role::BeneficialOwner => ("beneficial_owner", subject.beneficial_owner_countries.clone()),
                Role::Reseller => ("reseller", subject.reseller_countries.clone()),
                Role::PaymentSource => {
                    ("payment_source", subject.payment_source_country.into_iter().collect())
                }
            };
            for country in countries {
                if m.countries.contains(&country) {
                    matched.push(format!("{name} country {country}"));
                }
            }
            if *role == Role::Customer {
                if m.tenants.iter().any(|t| t == tenant) {
                    matched.push(format!("tenant {tenant}"));
                }
                let legal = normalize_entity(&subject.legal_name);
                if !legal.is_empty() && m.entities.iter().any(|e| normalize_entity(e) == legal) {
                    matched.push("customer entity name".to_owned());
                }
            }
        }
        if !matched.is_empty() {
            matched.dedup();
            out.push(Prohibition {
                measure: measure.id.clone(),
                citation: measure.citation.clone(),
                matched,
            });
        }
    }
    out
}

/// Entity names compare case- and spacing-insensitively (as the agent compares them).
fn normalize_entity(name: &str) -> String {
    name.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// What one evaluation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvaluationReport {
    /// Findings raised now: (id, kind, subject).
    pub raised: Vec<(i64, FindingKind, String)>,
    /// Findings resolved now: (id, kind, subject).
    pub resolved: Vec<(i64, FindingKind, String)>,
    /// Findings open after the evaluation.
    pub open: usize,
    /// The policy version whose thresholds were applied; none: threshold rules not evaluated.
    pub policy_version: Option<u64>,
}

/// Tenant identities named by the hosts' statements (the newest statement naming a tenant
/// wins), to record with [`FleetStore::upsert_tenant_identities`].
pub fn identities_from_statements(hosts: &[HostView]) -> Vec<TenantIdentity> {
    let mut by_tenant: BTreeMap<String, TenantIdentity> = BTreeMap::new();
    for host in hosts {
        let Some(statement) = &host.statement else { continue };
        for workload in &statement.workloads {
            let (Some(tenant), Some(subject)) = (&workload.tenant, &workload.subject) else { continue };
            let newer = by_tenant.get(tenant).is_none_or(|known| known.seen_at <= statement.iat);
            if newer {
                by_tenant.insert(
                    tenant.clone(),
                    TenantIdentity {
                        tenant: tenant.clone(),
                        legal_name: subject.legal_name.clone(),
                        countries: subject.countries.clone(),
                        beneficial_owner_countries: subject.beneficial_owner_countries.clone(),
                        foreign_person: subject.foreign_person,
                        seen_at: statement.iat,
                    },
                );
            }
        }
    }
    by_tenant.into_values().collect()
}

/// Every open finding, paging through the store.
pub fn open_findings<S: FleetStore + ?Sized>(store: &S) -> Result<Vec<crate::fleet::Finding>, StoreError> {
    let mut out = Vec::new();
    let mut after_id = 0;
    loop {
        let page = store.list_findings(&FindingQuery {
            state: Some(FindingState::Open),
            after_id,
            limit: 1000,
            ..FindingQuery::default()
        })?;
        let Some(last) = page.last() else { break };
        after_id = last.id;
        out.extend(page);
    }
    Ok(out)
}

/// One evaluation: records the identities the statements name, computes the findings that
/// hold, raises the new ones (with their evidence) and resolves the ones that stopped holding.
pub fn evaluate<S: FleetStore + PolicyStore + ?Sized>(
    store: &S,
    hosts: &[HostView],
    settings: EvaluationSettings,
    now: i64,
) -> Result<EvaluationReport, StoreError> {
    let named = identities_from_statements(hosts);
    if !named.is_empty() {
        store.upsert_tenant_identities(&named)?;
    }
    let identities: BTreeMap<String, TenantIdentity> =
        store.tenant_identities()?.into_iter().map(|i| (i.tenant.clone(), i)).collect();
    let policy = store.current_policy()?;
    let usage = store.tenant_usage(None, None)?;
    let state =
        FleetState { now, policy: policy.as_ref(), usage: &usage, identities: &identities, hosts, settings };
    let desired = desired_findings(&state);

    let open = open_findings(store)?;
    let open_keys: BTreeSet<(FindingKind, &str)> =
        open.iter().map(|f| (f.finding.kind, f.finding.subject.as_str())).collect();
    let desired_keys: BTreeSet<(FindingKind, &str)> =
        desired.iter().map(|f| (f.kind, f.subject.as_str())).collect();

    let mut report =
        EvaluationReport { policy_version: policy.as_ref().map(|p| p.version), ..Default::default() };
    for finding in &open {
        if !desired_keys.contains(&(finding.finding.kind, finding.finding.subject.as_str()))
            && store.resolve_finding(finding.id, now)?
        {
            tracing::info!(id = finding.id, kind = finding.finding.kind.as_str(), subject = %finding.finding.subject,
                "finding resolved");
            report.resolved.push((finding.id, finding.finding.kind, finding.finding.subject.clone()));
        }
    }
    for mut finding in desired {
        if open_keys.contains(&(finding.kind, finding.subject.as_str())) {
            continue;
        }
        if let (FindingKind::ReportRejected, Some(host)) = (finding.kind, finding.host_id.clone()) {
            let rejections = store.rejections(&host, EVIDENCE_WINDOWS)?;
            if let Some(map) = finding.evidence.as_object_mut() {
                map.insert("rejections".into(), json!(rejections));
            }
        }
        if let Some(tenant) = finding.tenant.clone().filter(|_| finding.host_id.is_none()) {
            // Evidence is gathered only for a finding being raised: the windows that weigh
            // most and every host involved.
            let windows = store.usage_evidence(&tenant, EVIDENCE_WINDOWS)?;
            let involved = store.tenant_hosts(&tenant)?;
            if let Some(map) = finding.evidence.as_object_mut() {
                map.insert("top_windows".into(), json!(windows));
                map.insert("host_ids".into(), json!(involved));
                if let Some(identity) = identities.get(&tenant) {
                    map.insert("identity".into(), json!(identity));
                }
            }
        }
        if let Some(id) = store.raise_finding(&finding, now)? {
            tracing::warn!(id, kind = finding.kind.as_str(), subject = %finding.subject, foreign = ?finding.foreign_person,
                "finding raised");
            report.raised.push((id, finding.kind, finding.subject.clone()));
        }
    }
    report.open = open.len() + report.raised.len() - report.resolved.len();
    Ok(report)
}

/// The enrolled hosts as the rules see them at `now`: last report from the records, last
/// verified poll answer and latest statement from the poller's store, batches refused within
/// `settings.rejected_window_s`.
pub fn host_views(
    store: &dyn Storage,
    settings: EvaluationSettings,
    now: i64,
) -> Result<Vec<HostView>, StoreError> {
    let last_report = store.last_report_at()?;
    let mut rejected: BTreeMap<String, RejectionCount> = store
        .rejection_counts(now.saturating_sub(settings.rejected_window_s))?
        .into_iter()
        .map(|r| (r.host_id.clone(), r))
        .collect();
    let last_poll_ok: BTreeMap<String, i64> = store
        .host_poll_status()?
        .into_iter()
        .filter_map(|s| s.last_ok_at.map(|at| (s.host_id, at)))
        .collect();
    let mut statements: BTreeMap<String, HostStatementClaims> =
        store.latest_statements()?.into_iter().map(|s| (s.host_id, s.claims)).collect();
    Ok(store
        .list_hosts()?
        .into_iter()
        .map(|h| HostView {
            last_report_at: last_report.get(&h.host_id).copied(),
            last_poll_ok_at: last_poll_ok.get(&h.host_id).copied(),
            statement: statements.remove(&h.host_id),
            rejected: rejected.remove(&h.host_id),
            host_id: h.host_id,
            enrolled_at: h.enrolled_at,
        })
        .collect())
}

/// One evaluation over everything `store` holds (see [`evaluate`]).
pub fn evaluate_store(
    store: &dyn Storage,
    settings: EvaluationSettings,
    now: i64,
) -> Result<EvaluationReport, StoreError> {
    let hosts = host_views(store, settings, now)?;
    evaluate(store, &hosts, settings, now)
}

/// Evaluates every `interval` until `shutdown`; failures are logged and retried on the next
/// tick (findings are derived state: a missed evaluation delays them, loses nothing).
pub async fn run_evaluator(
    store: std::sync::Arc<dyn Storage>,
    settings: EvaluationSettings,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let store = std::sync::Arc::clone(&store);
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            evaluate_store(store.as_ref(), settings, crate::server::unix_now())
        })
        .await;
        match result {
            Ok(Ok(report)) => tracing::info!(
                raised = report.raised.len(),
                resolved = report.resolved.len(),
                open = report.open,
                policy_version = ?report.policy_version,
                elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "findings evaluated"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "findings evaluation failed; retrying next interval"),
            Err(e) => tracing::error!(error = %e, "findings evaluation task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let evil =
            subject(json!({"legal_name": " evil corp ", "countries": ["US"], "foreign_person": false}));
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
            identities: &identities,
            hosts,
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
}
