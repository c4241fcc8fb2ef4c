//! The fleet view the collector derives from what hosts report and answer: per-tenant usage
//! aggregated across hosts and time, the tenants' identities (from host statements), and the
//! findings raised on them. [`FleetStore`] is the storage boundary for it; every backend
//! implements it with the same meaning.
//!
//! Aggregation is defined here, once, so both backends compute the same numbers:
//! - cumulative estimated operations and GPU-seconds: sums over every stored window;
//! - concurrent peak FLOP/s capacity: windows are bucketed by the minute their `start` falls
//!   in and `peak_flops` summed per bucket, across hosts; the peak is the largest bucket.
//!   Agents close 60 s windows aligned to Unix minutes, so a workload that runs through a
//!   minute contributes exactly one window to that bucket on each host, and the bucket sum is
//!   the fleet's concurrent capacity for the tenant in that minute. A record merged from
//!   several windows (spool pressure) counts once, in its first minute: it can only
//!   under-state concurrency, never invent it.
//! - GPUs involved: per host the most GPUs the tenant used at once, summed over hosts.

use std::collections::BTreeMap;

use kycd_protocol::CountryCode;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// Width of a concurrency bucket, seconds (the agents' window length).
pub const CAPACITY_BUCKET_S: i64 = 60;

/// One tenant's usage, aggregated over every host and window stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// Tenant id (the attestation `sub`).
    pub tenant: String,
    /// Cumulative estimated operations.
    pub estimated_ops: f64,
    /// Cumulative GPU-seconds.
    pub gpu_seconds: f64,
    /// Largest concurrent FLOP/s capacity in one minute, summed across hosts.
    pub peak_flops: f64,
    /// Start of the minute of that peak (Unix seconds).
    pub peak_at: i64,
    /// Hosts that reported usage of the tenant.
    pub hosts: u32,
    /// GPUs involved: per host the most used at once, summed over hosts.
    pub gpus: u32,
    /// Windows stored.
    pub windows: u64,
    /// Estimated operations by estimation method (wire names).
    pub ops_by_method: BTreeMap<String, f64>,
    /// Start of the first window.
    pub first_seen: i64,
    /// End of the last window.
    pub last_seen: i64,
    /// Whether any window marks the tenant a foreign person.
    pub foreign_person: bool,
}

impl TenantUsage {
    /// GPU-hours.
    pub fn gpu_hours(&self) -> f64 {
        self.gpu_seconds / 3600.0
    }
}

/// One stored window, as evidence for a finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowEvidence {
    /// Reporting host.
    pub host_id: String,
    /// Its sequence number there.
    pub seq: u64,
    /// Window start.
    pub start: i64,
    /// Window end.
    pub end: i64,
    /// Estimated operations.
    pub estimated_ops: f64,
    /// Peak FLOP/s capacity.
    pub peak_flops: f64,
    /// GPUs used.
    pub gpus: u32,
    /// Estimation method.
    pub method: String,
}

/// Who a tenant is, as the latest host statement naming it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantIdentity {
    /// Tenant id.
    pub tenant: String,
    /// Verified legal name.
    pub legal_name: String,
    /// The subject's countries.
    pub countries: Vec<CountryCode>,
    /// Beneficial owners' countries.
    pub beneficial_owner_countries: Vec<CountryCode>,
    /// Whether the attestation marks it a foreign person.
    pub foreign_person: bool,
    /// When a statement last named it (Unix seconds).
    pub seen_at: i64,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Cumulative operations ≥ `early_warning_fraction × training_ops`.
    EarlyWarning,
    /// Cumulative operations ≥ `training_ops`.
    TrainingThresholdCrossed,
    /// Concurrent capacity ≥ `cluster_flops`.
    ClusterCapacityCrossed,
    /// Neither a report nor a poll answer within the dark interval.
    HostDark,
    /// The host's statement shows an older policy than the published one.
    PolicyStale,
    /// The host allows a tenant the published policy prohibits.
    EnforcementMismatch,
}

impl FindingKind {
    /// Every kind.
    pub const ALL: [FindingKind; 6] = [
        FindingKind::EarlyWarning,
        FindingKind::TrainingThresholdCrossed,
        FindingKind::ClusterCapacityCrossed,
        FindingKind::HostDark,
        FindingKind::PolicyStale,
        FindingKind::EnforcementMismatch,
    ];

    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::EarlyWarning => "early_warning",
            FindingKind::TrainingThresholdCrossed => "training_threshold_crossed",
            FindingKind::ClusterCapacityCrossed => "cluster_capacity_crossed",
            FindingKind::HostDark => "host_dark",
            FindingKind::PolicyStale => "policy_stale",
            FindingKind::EnforcementMismatch => "enforcement_mismatch",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        FindingKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Whether a finding still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingState {
    /// The condition holds.
    Open,
    /// The condition stopped holding (a dark host answered, a stale host updated, …).
    Resolved,
}

impl FindingState {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingState::Open => "open",
            FindingState::Resolved => "resolved",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "open" => Some(FindingState::Open),
            "resolved" => Some(FindingState::Resolved),
            _ => None,
        }
    }
}

/// A finding to raise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewFinding {
    /// Kind.
    pub kind: FindingKind,
    /// What it is about: the tenant id, the host id, or `host/workload` for a mismatch. At
    /// most one finding per (kind, subject) is open at a time.
    pub subject: String,
    /// The tenant, when it is about one.
    pub tenant: Option<String>,
    /// The host, when it is about one.
    pub host_id: Option<String>,
    /// Foreign (true) or domestic (false) tenant, per its attestation; none for host findings.
    pub foreign_person: Option<bool>,
    /// One line for humans.
    pub summary: String,
    /// Evidence: totals, thresholds, windows and hosts, statement excerpts.
    pub evidence: serde_json::Value,
}

/// A stored finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Id (increasing).
    pub id: i64,
    /// What was raised.
    #[serde(flatten)]
    pub finding: NewFinding,
    /// State.
    pub state: FindingState,
    /// When it was raised.
    pub raised_at: i64,
    /// When it was resolved.
    pub resolved_at: Option<i64>,
}

/// A page of findings.
#[derive(Debug, Clone, Default)]
pub struct FindingQuery {
    /// Only this state.
    pub state: Option<FindingState>,
    /// Only this kind.
    pub kind: Option<FindingKind>,
    /// Only findings about this tenant.
    pub tenant: Option<String>,
    /// Only findings about this host.
    pub host_id: Option<String>,
    /// Only ids above this (pagination cursor).
    pub after_id: i64,
    /// At most this many.
    pub limit: u32,
}

/// The fleet view's storage. Implemented by each backend; reads may run on their own
/// connection so a long aggregation does not hold up ingest.
pub trait FleetStore: Send + Sync + std::fmt::Debug + 'static {
    /// Usage aggregated per tenant (one tenant when `tenant` is given), by tenant id; with
    /// `since`, only windows ending after it count (a filing period), otherwise all of them.
    fn tenant_usage(&self, tenant: Option<&str>, since: Option<i64>) -> Result<Vec<TenantUsage>, StoreError>;

    /// The tenant's `limit` windows with the most estimated operations, most first.
    fn usage_evidence(&self, tenant: &str, limit: u32) -> Result<Vec<WindowEvidence>, StoreError>;

    /// The hosts that reported usage of the tenant, by host id.
    fn tenant_hosts(&self, tenant: &str) -> Result<Vec<String>, StoreError>;

    /// The last time each host's report was stored (hosts that never reported are absent).
    fn last_report_at(&self) -> Result<BTreeMap<String, i64>, StoreError>;

    /// Records tenants' identities (replacing older ones).
    fn upsert_tenant_identities(&self, identities: &[TenantIdentity]) -> Result<(), StoreError>;

    /// Every known tenant identity, by tenant id.
    fn tenant_identities(&self) -> Result<Vec<TenantIdentity>, StoreError>;

    /// Raises `finding` unless one of its (kind, subject) is open; returns the new id, or
    /// `None` when it was already open (so a condition that keeps holding is raised once).
    fn raise_finding(&self, finding: &NewFinding, at: i64) -> Result<Option<i64>, StoreError>;

    /// Resolves an open finding; false if it was not open.
    fn resolve_finding(&self, id: i64, at: i64) -> Result<bool, StoreError>;

    /// Findings matching `query`, by id.
    fn list_findings(&self, query: &FindingQuery) -> Result<Vec<Finding>, StoreError>;
}
