//! Findings: what the collector concludes from the fleet view, raised once per state change.
//!
//! [`desired_findings`] ([`rules`]) is the rule set, a pure function of the fleet's state (aggregated
//! usage, tenant identities, hosts' last report/poll/statement, the published policy):
//!
//! | kind | holds when | about |
//! |---|---|---|
//! | `early_warning` | cumulative upper bound of ops ≥ `early_warning_fraction × training_ops` | tenant |
//! | `training_threshold_crossed` | cumulative ops ≥ `training_ops`, the point estimate or the upper bound as the policy's `threshold_basis` says | tenant |
//! | `cluster_capacity_crossed` | concurrent peak FLOP/s ≥ `cluster_flops` | tenant |
//! | `host_dark` | no report and no poll answer for `dark_after_s` | host |
//! | `policy_stale` | a statement taken after the grace period shows an older policy | host |
//! | `enforcement_mismatch` | a statement allows a tenant a published prohibition matches | host/workload |
//! | `report_rejected` | a batch of the host was refused for good within `rejected_window_s` | host |
//! | `shared_gpu` | a foreign tenant has GPU-seconds on a GPU shared without isolation | tenant |
//! | `guest_telemetry_gap` | a foreign tenant's VM held passed-through GPUs while its guest sent no telemetry | tenant |
//! | `unattributed_training_scale` | a workload with no verified tenant crossed `training_ops` (on `threshold_basis`) or `cluster_flops` on one host | host/workload |
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
//! Operations are three figures per tenant (lower bound, point estimate, upper bound; an old
//! agent's windows count their estimate for all three). The early warning always holds the
//! upper bound against its fraction: it exists to warn before the point estimate gets there.
//! The training threshold holds the figure the policy's `threshold_basis` names (`point`,
//! the default, or `upper` for a provider that would rather file early than late); the
//! evidence carries all three figures and `basis`, the one that crossed.
//!
//! `shared_gpu` is raised with or without a policy: operations on a GPU shared without
//! isolation are split by SM share, not measured, which a filing about a foreign tenant must
//! say. Its evidence names the hosts, and whether a published measure conditions GPU use on
//! `exclusive_gpu` (then the condition was violated: the agent measures sharing, it cannot
//! prevent it on a running GPU).
//!
//! `guest_telemetry_gap` is raised with or without a policy too: a VM with passed-through
//! GPUs is measured by its own guest (`guest_reported`), and while the guest is silent the
//! host knows only that the GPUs were held, so the tenant's point estimate and lower bound
//! count nothing for that time and its upper bound the whole allocation. Its evidence names
//! the gap GPU-seconds, the hosts and the VMs (`host/workload`).
//!
//! `unattributed_training_scale` ([`unattributed`](mod@unattributed)) closes the unverified
//! loophole: windows without a tenant (a workload the policy's `unverified: allow` or `grace`
//! let run) are aggregated per (host, workload) and held against the same thresholds as a
//! tenant's. Its foreign status is unknown, so it is treated as foreign. Its evidence names the
//! host, the workload, the three figures, the peak, the thresholds and which crossed, the
//! policy version and the workload's top windows.
//!
//! [`evaluate`] reconciles that set with the stored open findings: a condition that starts to
//! hold raises a finding (with evidence: totals, the top windows and the hosts), one that stops
//! holding resolves it. A condition that keeps holding is never raised twice: the store keeps
//! at most one open finding per (kind, subject), also across collector processes.

//!
//! Layout: [`rules`] (the rule set and the state it reads), [`prohibitions`](mod@prohibitions) (policy measures
//! matched against a statement's subject), [`unattributed`](mod@unattributed) (the rule on usage
//! without a tenant); this file evaluates and records.

use std::collections::{BTreeMap, BTreeSet};

use kycd_protocol::clock::{Clock as _, SystemClock};
use kycd_protocol::HostStatementClaims;
use serde::Serialize;
use serde_json::json;

use crate::fleet::{FindingKind, FindingQuery, FleetStore, IdentityDetail, RejectionCount, TenantIdentity};
use crate::policy::PolicyStore;
use crate::store::{Storage, StoreError};

pub mod prohibitions;
pub mod rules;
pub mod runs;
pub mod unattributed;

pub use prohibitions::{prohibitions, Prohibition};
pub use rules::{desired_findings, EvaluationSettings, FleetState, HostView};

/// How many windows a tenant finding quotes as evidence.
pub const EVIDENCE_WINDOWS: u32 = 20;

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
            let detail = IdentityDetail {
                subject: subject.clone(),
                attestation_digest: workload.attestation_digest.clone(),
                attestation_exp: workload.attestation_exp,
                host_id: host.host_id.clone(),
                workload: workload.workload.clone(),
            };
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
                        detail: Some(detail),
                    },
                );
            }
        }
    }
    by_tenant.into_values().collect()
}

/// Calls `f` with every finding `query` matches, paging through the store (`query.limit` a
/// page, from `query.after_id`).
pub fn for_each_finding<S: FleetStore + ?Sized, E: From<StoreError>>(
    store: &S,
    mut query: FindingQuery,
    mut f: impl FnMut(crate::fleet::Finding) -> Result<(), E>,
) -> Result<(), E> {
    loop {
        let page = store.list_findings(&query)?;
        let Some(last) = page.last() else { break };
        query.after_id = last.id;
        for finding in page {
            f(finding)?;
        }
    }
    Ok(())
}

/// Every finding not resolved (open, acknowledged, filed or dismissed), paging through the
/// store.
pub fn active_findings<S: FleetStore + ?Sized>(store: &S) -> Result<Vec<crate::fleet::Finding>, StoreError> {
    let mut out = Vec::new();
    let query = FindingQuery { active: true, limit: 1000, ..FindingQuery::default() };
    for_each_finding(store, query, |finding| {
        out.push(finding);
        Ok::<_, StoreError>(())
    })?;
    Ok(out)
}

/// Audit records read per query.
const AUDIT_PAGE: u32 = 1000;

/// Every record from `from` on, in order, paging through the store.
pub fn audit_rows<S: FleetStore + ?Sized>(
    store: &S,
    from: u64,
) -> Result<Vec<crate::fleet::AuditRow>, StoreError> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let page = store.audit_records(next, AUDIT_PAGE)?;
        let Some(last) = page.last() else { break };
        next = last.seq.saturating_add(1);
        let full = page.len() == AUDIT_PAGE as usize;
        out.extend(page);
        if !full {
            break;
        }
    }
    Ok(out)
}

/// How far back an incremental evaluation looks before the previous one started: covers
/// batches received before it but committed after, and clock skew between collectors.
pub const CHANGE_MARGIN_S: i64 = 300;

/// What an earlier evaluation of this process covered: every run unchanged since `since` was
/// evaluated under the policy version `policy_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covered {
    /// Segments changed at or after this (collector clock) are read again.
    pub since: i64,
    /// The policy version the runs were evaluated under (none: no policy).
    pub policy_version: Option<u64>,
}

impl Covered {
    /// What an evaluation that started at `now` and applied `report.policy_version` covers.
    pub fn by(report: &EvaluationReport, now: i64) -> Covered {
        Covered { since: now.saturating_sub(CHANGE_MARGIN_S), policy_version: report.policy_version }
    }
}

/// One evaluation: records the identities the statements name, computes the findings that
/// hold, raises the new ones (with their evidence) and resolves the ones that stopped holding.
pub fn evaluate<S: FleetStore + PolicyStore + crate::records::RecordStore + ?Sized>(
    store: &S,
    hosts: &[HostView],
    settings: EvaluationSettings,
    now: i64,
) -> Result<EvaluationReport, StoreError> {
    evaluate_incremental(store, hosts, settings, now, None)
}

/// [`evaluate`] that reads, of the tenants' runs, only those that may have changed since
/// `covered` (the runs of busy segments grown since then; [`crate::fleet::rollup::Segments`]):
/// every other run was held against the same policy by the evaluation that covered it, and
/// its findings are raised already. So the evaluation's cost does not grow with the history.
/// Without `covered`, or when the policy changed since, every run is read.
pub fn evaluate_incremental<S: FleetStore + PolicyStore + crate::records::RecordStore + ?Sized>(
    store: &S,
    hosts: &[HostView],
    settings: EvaluationSettings,
    now: i64,
    covered: Option<Covered>,
) -> Result<EvaluationReport, StoreError> {
    let named = identities_from_statements(hosts);
    if !named.is_empty() {
        store.upsert_tenant_identities(&named)?;
    }
    // The append-only history beside the current view (issue 19: what was known when).
    store.record_identities(&crate::records::identities_seen(
        hosts.iter().filter_map(|h| h.statement.as_ref()),
    ))?;
    let identities: BTreeMap<String, TenantIdentity> =
        store.tenant_identities()?.into_iter().map(|i| (i.tenant.clone(), i)).collect();
    let policy = store.current_policy()?;
    // The roll-ups: the tenants' usage and the usage without a tenant.
    let version = policy.as_ref().map(|p| p.version);
    let fleet = match covered.filter(|c| c.policy_version == version) {
        Some(covered) => {
            let gap_s =
                policy.as_ref().map_or(kycd_protocol::DEFAULT_RUN_GAP_S, |p| p.claims.thresholds.run_gap_s);
            let gap_s = i64::try_from(gap_s).unwrap_or(i64::MAX);
            store
                .rollup_usage(crate::fleet::rollup::Segments::ChangedSince { since: covered.since, gap_s })?
        }
        None => store.fleet_usage(None)?,
    };
    let active = active_findings(store)?;
    let state = FleetState {
        now,
        policy: policy.as_ref(),
        usage: &fleet.tenants,
        unattributed: &fleet.unattributed,
        identities: &identities,
        hosts,
        findings: &active,
        settings,
    };
    let desired = desired_findings(&state);

    let active_keys: BTreeSet<(FindingKind, &str)> =
        active.iter().map(|f| (f.finding.kind, f.finding.subject.as_str())).collect();
    let desired_keys: BTreeSet<(FindingKind, &str)> =
        desired.iter().map(|f| (f.kind, f.subject.as_str())).collect();
    // A crossing is reported within the policy's deadline of the provider learning of it.
    let deadline_s = policy
        .as_ref()
        .map_or(kycd_protocol::DEFAULT_REPORT_DEADLINE_S, |p| p.claims.thresholds.report_deadline_s);
    let deadline_s = i64::try_from(deadline_s).unwrap_or(i64::MAX);

    let mut report =
        EvaluationReport { policy_version: policy.as_ref().map(|p| p.version), ..Default::default() };
    for finding in &active {
        // A crossed threshold is a fact to file, not a condition: it never resolves itself.
        if !finding.finding.kind.is_threshold()
            && !desired_keys.contains(&(finding.finding.kind, finding.finding.subject.as_str()))
            && store.resolve_finding(finding.id, now)?
        {
            tracing::info!(id = finding.id, kind = finding.finding.kind.as_str(), subject = %finding.finding.subject,
                "finding resolved");
            report.resolved.push((finding.id, finding.finding.kind, finding.finding.subject.clone()));
        }
    }
    for mut finding in desired {
        if active_keys.contains(&(finding.kind, finding.subject.as_str())) {
            continue;
        }
        // Unknown foreign status (`None` is only for host findings) counts as foreign.
        if finding.kind.needs_filing() && finding.foreign_person != Some(false) {
            finding.due_at = Some(now.saturating_add(deadline_s));
        }
        if let (FindingKind::ReportRejected, Some(host)) = (finding.kind, finding.host_id.clone()) {
            let rejections = store.rejections(&host, EVIDENCE_WINDOWS)?;
            if let Some(map) = finding.evidence.as_object_mut() {
                map.insert("rejections".into(), json!(rejections));
            }
        }
        if let (FindingKind::UnattributedTrainingScale, Some(host)) = (finding.kind, finding.host_id.clone())
        {
            let workload = finding.evidence["workload"].as_str().unwrap_or_default().to_owned();
            let windows = store.unattributed_evidence(&host, &workload, EVIDENCE_WINDOWS)?;
            if let Some(map) = finding.evidence.as_object_mut() {
                map.insert("top_windows".into(), json!(windows));
            }
        }
        if let Some(tenant) = finding
            .tenant
            .clone()
            .filter(|_| finding.host_id.is_none() && finding.kind != FindingKind::ReportOverdue)
        {
            // Evidence is gathered only for a finding being raised: the windows that weigh
            // most (of the run, for a run finding) and every host involved.
            let span = finding
                .evidence
                .get("run")
                .and_then(|run| Some((run.get("first_start")?.as_i64()?, run.get("last_end")?.as_i64()?)));
            let windows = match span {
                Some((from, to)) => {
                    // An incremental evaluation read the run without its hosts.
                    let hosts = store.run_hosts(&tenant, from, to)?;
                    if let Some(run) = finding.evidence.get_mut("run").and_then(|r| r.as_object_mut()) {
                        run.insert("hosts".into(), json!(hosts));
                    }
                    store.run_evidence(&tenant, from, to, EVIDENCE_WINDOWS)?
                }
                None => store.usage_evidence(&tenant, EVIDENCE_WINDOWS)?,
            };
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
    report.open = active.len() + report.raised.len() - report.resolved.len();
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
    evaluate_store_incremental(store, settings, now, None)
}

/// [`evaluate_incremental`] over everything `store` holds.
pub fn evaluate_store_incremental(
    store: &dyn Storage,
    settings: EvaluationSettings,
    now: i64,
    covered: Option<Covered>,
) -> Result<EvaluationReport, StoreError> {
    let hosts = host_views(store, settings, now)?;
    evaluate_incremental(store, &hosts, settings, now, covered)
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
    // The first evaluation reads every run; later ones the runs changed since the last one
    // that succeeded (a failed one changes nothing, so the next reads from the same point).
    let mut covered: Option<Covered> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let store = std::sync::Arc::clone(&store);
        let started = SystemClock.instant();
        let now = SystemClock.unix_now();
        let result = tokio::task::spawn_blocking(move || {
            evaluate_store_incremental(store.as_ref(), settings, now, covered)
        })
        .await;
        if let Ok(Ok(report)) = &result {
            covered = Some(Covered::by(report, now));
        }
        match result {
            Ok(Ok(report)) => tracing::info!(
                raised = report.raised.len(),
                resolved = report.resolved.len(),
                open = report.open,
                policy_version = ?report.policy_version,
                elapsed_ms = u64::try_from(SystemClock.instant().saturating_duration_since(started).as_millis()).unwrap_or(u64::MAX),
                "findings evaluated"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "findings evaluation failed; retrying next interval"),
            Err(e) => tracing::error!(error = %e, "findings evaluation task failed"),
        }
    }
}
