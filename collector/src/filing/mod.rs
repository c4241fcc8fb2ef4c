//! The filing record (`kycd-collector report FINDING_ID`): everything a provider's report to
//! the regulator about one finding needs, gathered from the store at the time of the report
//! ([`filing_record`]), as JSON or as a self-contained, print-ready HTML page ([`html`]).
//!
//! - **finding**: kind, subject, summary, state and its steps (acknowledged, filed with the
//!   reference, dismissed with the reason: who, when), raised at, due at;
//! - **customer**: what the newest host statement naming the tenant said (legal name,
//!   countries, beneficial owners', resellers' and the payment source's countries, foreign
//!   status, declared purposes) — for unattributed usage: unknown, treated as foreign;
//! - **kyc**: the link to the KYC record: the attestation's digest and expiry, and the host
//!   and workload whose statement carried it;
//! - **run** (run findings): the run recomputed now — first and last window, whether it still
//!   runs, operations (lower, point, upper, by method), GPU-hours, peak concurrent capacity,
//!   hosts — beside the figures at the time the finding was raised (its evidence);
//! - **usage** (all-time tenant findings and unattributed usage): the same figures over every
//!   stored window;
//! - **policy**: the version and the threshold crossed, and the basis it was held on;
//! - **hosts**: every host involved, with the site and network fabric it was placed in;
//! - **evidence windows**: the run's (or the tenant's, or the workload's) windows that weigh
//!   most, with their host, epoch and sequence number (each traceable to a signed batch);
//! - **audit**: the collector audit log's records about this finding.

use serde::Serialize;

use crate::fleet::{
    Finding, FindingKind, FindingQuery, Run, TenantIdentity, TenantUsage, UnattributedUsage, WindowEvidence,
};
use crate::store::{Storage, StoreError};

pub mod html;

/// Windows a filing quotes.
pub const FILING_WINDOWS: u32 = 100;

/// Why a filing record cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum FilingError {
    /// No finding has this id.
    #[error("no finding with id {0}")]
    NotFound(i64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The customer as the newest host statement naming the tenant described it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Customer {
    /// Tenant id; none for unattributed usage.
    pub tenant: Option<String>,
    /// `foreign`, `us` or `unknown` (unknown is treated as foreign).
    pub foreign_status: &'static str,
    /// The identity, when known.
    pub identity: Option<TenantIdentity>,
}

/// The usage figures a filing quotes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub enum UsageSection {
    /// A training run, recomputed now.
    Run {
        /// The run.
        #[serde(flatten)]
        run: Run,
        /// The run gap the policy set (seconds).
        run_gap_s: u64,
    },
    /// The tenant's usage over every stored window.
    Tenant(Box<TenantUsage>),
    /// A workload without a tenant.
    Unattributed(Box<UnattributedUsage>),
}

/// The policy the finding was raised under.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySection {
    /// Its version (from the evidence).
    pub version: Option<u64>,
    /// The threshold(s) crossed, as the evidence names them.
    pub threshold: serde_json::Value,
    /// The figure held against it (`point`, `upper`).
    pub basis: Option<String>,
    /// The currently published version, if another.
    pub current_version: Option<u64>,
}

/// A host involved, with its site and network fabric (none: unplaced).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilingHost {
    /// Host id.
    pub host_id: String,
    /// Its placement, if any.
    #[serde(flatten)]
    pub placement: Option<crate::fleet::Placement>,
}

/// Everything a report about one finding needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilingRecord {
    /// When the record was made (Unix seconds).
    pub generated_at: i64,
    /// The finding.
    pub finding: Finding,
    /// The customer.
    pub customer: Customer,
    /// The usage: the run, the tenant's or the workload's.
    pub usage: Option<UsageSection>,
    /// The hosts involved, with their sites and fabrics.
    pub hosts: Vec<FilingHost>,
    /// The policy and threshold.
    pub policy: PolicySection,
    /// The windows that weigh most.
    pub evidence_windows: Vec<WindowEvidence>,
    /// The audit log's records about this finding (their lines).
    pub audit: Vec<serde_json::Value>,
}

/// `tenant/run/START` → (tenant, START).
fn run_subject(subject: &str) -> Option<(&str, i64)> {
    let (tenant, start) = subject.rsplit_once("/run/")?;
    Some((tenant, start.parse().ok()?))
}

/// The filing record of finding `id` at `now`.
pub fn filing_record(store: &dyn Storage, id: i64, now: i64) -> Result<FilingRecord, FilingError> {
    let finding = store
        .list_findings(&FindingQuery { id: Some(id), limit: 1, ..FindingQuery::default() })?
        .pop()
        .ok_or(FilingError::NotFound(id))?;
    let f = &finding.finding;
    let identity = match &f.tenant {
        Some(tenant) => store.tenant_identities()?.into_iter().find(|i| &i.tenant == tenant),
        None => None,
    };
    let foreign_status = match (f.tenant.as_ref(), f.foreign_person, identity.as_ref()) {
        (_, _, Some(i)) => {
            if i.foreign_person {
                "foreign"
            } else {
                "us"
            }
        }
        (Some(_), Some(false), None) => "us",
        (Some(_), Some(true), None) => "foreign",
        _ => "unknown",
    };
    let policy = store.current_policy()?;
    let gap_s = policy.as_ref().map_or(kycd_protocol::DEFAULT_RUN_GAP_S, |p| p.claims.thresholds.run_gap_s);
    let (usage, windows) = usage_section(store, &finding, gap_s, now)?;
    let mut hosts: Vec<String> = match &usage {
        Some(UsageSection::Run { run, .. }) => run.hosts.clone(),
        Some(UsageSection::Tenant(_)) => {
            f.tenant.as_deref().map(|t| store.tenant_hosts(t)).transpose()?.unwrap_or_default()
        }
        Some(UsageSection::Unattributed(u)) => vec![u.host_id.clone()],
        None => f.host_id.iter().cloned().collect(),
    };
    hosts.sort();
    hosts.dedup();
    let placements: std::collections::BTreeMap<String, crate::fleet::Placement> =
        store.host_placements()?.into_iter().collect();
    let hosts = hosts
        .into_iter()
        .map(|host_id| FilingHost { placement: placements.get(&host_id).cloned(), host_id })
        .collect();
    let audit = crate::findings::audit_rows(store, 0)?
        .into_iter()
        .filter_map(|row| serde_json::from_str::<serde_json::Value>(&row.line).ok())
        .filter(|record| record["event"]["finding_id"].as_i64() == Some(id))
        .collect();
    let evidence = &f.evidence;
    let policy = PolicySection {
        version: evidence["policy_version"].as_u64(),
        threshold: evidence["threshold"].clone(),
        basis: evidence["basis"].as_str().map(str::to_owned),
        current_version: policy.as_ref().map(|p| p.version),
    };
    Ok(FilingRecord {
        generated_at: now,
        customer: Customer { tenant: f.tenant.clone(), foreign_status, identity },
        usage,
        hosts,
        policy,
        evidence_windows: windows,
        audit,
        finding,
    })
}

/// The usage figures and evidence windows of `finding`: its run recomputed, the tenant's
/// all-time usage, or the unattributed workload's.
fn usage_section(
    store: &dyn Storage,
    finding: &Finding,
    gap_s: u64,
    now: i64,
) -> Result<(Option<UsageSection>, Vec<WindowEvidence>), StoreError> {
    let f = &finding.finding;
    match f.kind {
        FindingKind::RunThresholdCrossed | FindingKind::BioEarlyWarning => {
            let Some((tenant, start)) = run_subject(&f.subject) else { return Ok((None, Vec::new())) };
            let gap = i64::try_from(gap_s).unwrap_or(i64::MAX);
            let usage = store.tenant_usage(Some(tenant), None)?;
            // The run that started then, or that a late window has since extended to cover it.
            let run = usage
                .iter()
                .flat_map(|u| u.runs(gap, now))
                .find(|r| r.first_start <= start && start <= r.last_end);
            let Some(run) = run else { return Ok((None, Vec::new())) };
            let windows = store.run_evidence(tenant, run.first_start, run.last_end, FILING_WINDOWS)?;
            Ok((Some(UsageSection::Run { run, run_gap_s: gap_s }), windows))
        }
        FindingKind::UnattributedTrainingScale => {
            let Some(host) = f.host_id.as_deref() else { return Ok((None, Vec::new())) };
            let workload = f.evidence["workload"].as_str().unwrap_or_default();
            let usage = store
                .fleet_usage(None)?
                .unattributed
                .into_iter()
                .find(|u| u.host_id == host && u.workload == workload);
            let windows = store.unattributed_evidence(host, workload, FILING_WINDOWS)?;
            Ok((usage.map(|u| UsageSection::Unattributed(Box::new(u))), windows))
        }
        _ => match (&f.tenant, &f.host_id) {
            (Some(tenant), None) => {
                let usage = store.tenant_usage(Some(tenant), None)?.into_iter().next();
                let windows = store.usage_evidence(tenant, FILING_WINDOWS)?;
                Ok((usage.map(|u| UsageSection::Tenant(Box::new(u))), windows))
            }
            _ => Ok((None, Vec::new())),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_subjects_parse() {
        assert_eq!(super::run_subject("t/run/1700000000"), Some(("t", 1_700_000_000)));
        assert_eq!(super::run_subject("a/run/b/run/5"), Some(("a/run/b", 5)));
        assert_eq!(super::run_subject("t"), None);
        assert_eq!(super::run_subject("t/run/x"), None);
    }
}
