//! The fleet view the collector derives from what hosts report and answer: per-tenant usage
//! aggregated across hosts and time, the tenants' identities (from host statements), and the
//! findings raised on them. [`FleetStore`] is the storage boundary for it; every backend
//! implements it with the same meaning.
//!
//! Aggregation is defined here, once, so both backends compute the same numbers:
//! - cumulative operations, as three figures summed over every stored window side by side:
//!   the lower bound, the point estimate and the upper bound (a window from an agent that
//!   sent no bounds counts its estimate for all three, as ingest stored it), and GPU-seconds,
//!   of them those in which the tenant shared a GPU without isolation, and those in which a
//!   VM of the tenant held passed-through GPUs while its guest sent no telemetry (with the
//!   hosts and workloads where it did);
//! - concurrent peak FLOP/s capacity: windows are bucketed by the minute their `start` falls
//!   in and `peak_flops × min(1, length / 60 s)` summed per bucket, across hosts; the peak is
//!   the largest bucket. Agents close windows aligned to Unix time (60 s by default), so a
//!   workload that runs through a minute contributes one full minute of windows to that
//!   bucket on each host (one 60 s window, or six 10 s windows weighted 1/6 each), and the
//!   bucket sum is the fleet's concurrent capacity for the tenant in that minute. A record
//!   merged from several windows (spool pressure) counts once, in its first minute: it can
//!   only under-state concurrency, never invent it.
//! - GPUs involved: per host the most GPUs the tenant used at once, summed over hosts.
//!
//! Windows that name no tenant (workloads without a valid attestation, which the policy's
//! `unverified: allow` or `grace` lets run) are aggregated by the same rules in the same pass,
//! per (host, workload) instead of per tenant ([`UnattributedUsage`]): nothing ties such a
//! workload to a customer across hosts, but leaving it out would let unverified usage train
//! at any scale unseen.
//!
//! Totals never overflow into something that is not a number: ingest bounds every window
//! (`crate::ingest::check_window`), and the sums here saturate anyway (floats at `f64::MAX`,
//! counts at their integer maximum; a NaN or negative stored value counts as 0), so a database
//! written before those bounds, or edited by hand, cannot make a total `inf` (`null` in
//! JSON, `inf` in CSV) or `NaN`.

use std::collections::BTreeMap;

use kycd_protocol::CountryCode;
use serde::{Deserialize, Serialize};

use crate::store::error::StoreError;
use crate::store::reports::Rejection;

pub mod clusters;
mod evidence;
pub mod lifecycle;
pub mod rollup;
pub mod runs;
mod usage;

pub use clusters::{ClusterUsage, Placement};
pub use evidence::WindowEvidence;
pub use lifecycle::{Acknowledgement, AuditRow, Dismissal, Filing, FindingAction};
pub use runs::{Run, RunFigures};
pub use usage::{
    finite, saturating_sum, FleetUsage, TenantUsage, UnattributedUsage, UsageAccumulator, WindowRow,
    CAPACITY_BUCKET_S,
};

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
    /// Everything that statement said about it (absent for identities recorded before
    /// schema 8): what a filing quotes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<IdentityDetail>,
}

impl TenantIdentity {
    /// Whether the attestation declares training on biological sequence data.
    pub fn declares_bio(&self) -> bool {
        self.detail
            .as_ref()
            .is_some_and(|d| d.subject.purposes.contains(&kycd_protocol::Purpose::BiologicalSequenceData))
    }
}

/// The statement entry a tenant identity was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityDetail {
    /// The subject as the host statement carried it (from the attestation in force).
    pub subject: kycd_protocol::StatementSubject,
    /// Digest of that attestation (the KYC record's link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_digest: Option<String>,
    /// Its expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_exp: Option<i64>,
    /// The host whose statement it was.
    pub host_id: String,
    /// The workload it was about.
    pub workload: String,
}

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Cumulative upper bound of operations ≥ `early_warning_fraction × training_ops`.
    EarlyWarning,
    /// Cumulative operations, the figure the policy's `threshold_basis` names (point
    /// estimate or upper bound), ≥ `training_ops`.
    TrainingThresholdCrossed,
    /// Concurrent capacity ≥ `cluster_flops`.
    ClusterCapacityCrossed,
    /// Neither a report nor a poll answer within the dark interval.
    HostDark,
    /// The host's statement shows an older policy than the published one.
    PolicyStale,
    /// The host allows a tenant the published policy prohibits.
    EnforcementMismatch,
    /// Batches of the (authenticated) host were refused for good recently: usage it
    /// measured is not in the collector's totals.
    ReportRejected,
    /// A foreign tenant shared a GPU with another workload without isolation: its
    /// operations there could not be attributed to it alone (and an `exclusive_gpu`
    /// condition of the published policy, if any, was not met).
    SharedGpu,
    /// A foreign tenant's VM held passed-through GPUs while its guest sent no telemetry: for
    /// that time only the allocation bound of its operations is known.
    GuestTelemetryGap,
    /// A workload with no verified tenant (foreign status unknown, so treated as foreign)
    /// crossed the training threshold (on the policy's `threshold_basis`) or the cluster
    /// capacity threshold on one host; subject `host/workload`.
    UnattributedTrainingScale,
    /// One training run of a tenant (its windows across hosts and workloads with no pause
    /// longer than the policy's `run_gap_s`) reached the run's threshold: `bio_training_ops`
    /// when the tenant declared biological sequence data, else `training_ops` (on the
    /// policy's `threshold_basis`); subject `tenant/run/FIRST_START`.
    RunThresholdCrossed,
    /// The second early-warning tier: a training run not declared as biological sequence data
    /// reached `bio_training_ops` on its upper bound; subject `tenant/run/FIRST_START`.
    BioEarlyWarning,
    /// A finding due for filing (`due_at`) passed its deadline neither filed nor dismissed;
    /// subject `finding/ID`.
    ReportOverdue,
    /// A tenant's concurrent capacity on the hosts of one co-located cluster (one site and
    /// network fabric; the unplaced hosts together as one) reached `cluster_flops`: the
    /// cluster as the rule means it; subject `tenant/cluster/SITE/FABRIC` (or
    /// `tenant/cluster/unplaced`).
    ColocatedCapacityCrossed,
}

impl FindingKind {
    /// Every kind.
    pub const ALL: [FindingKind; 14] = [
        FindingKind::EarlyWarning,
        FindingKind::TrainingThresholdCrossed,
        FindingKind::ClusterCapacityCrossed,
        FindingKind::HostDark,
        FindingKind::PolicyStale,
        FindingKind::EnforcementMismatch,
        FindingKind::ReportRejected,
        FindingKind::SharedGpu,
        FindingKind::GuestTelemetryGap,
        FindingKind::UnattributedTrainingScale,
        FindingKind::RunThresholdCrossed,
        FindingKind::BioEarlyWarning,
        FindingKind::ReportOverdue,
        FindingKind::ColocatedCapacityCrossed,
    ];

    /// Whether the finding records a crossed threshold: such a finding never closes on its
    /// own (a raised threshold or pruned windows do not undo the crossing); it is filed or
    /// dismissed by an operator.
    pub fn is_threshold(self) -> bool {
        matches!(
            self,
            FindingKind::EarlyWarning
                | FindingKind::TrainingThresholdCrossed
                | FindingKind::ClusterCapacityCrossed
                | FindingKind::UnattributedTrainingScale
                | FindingKind::RunThresholdCrossed
                | FindingKind::BioEarlyWarning
                | FindingKind::ColocatedCapacityCrossed
        )
    }

    /// Whether a crossing of this kind about a foreign (or unknown) person must be reported
    /// to the regulator, so it gets a `due_at`. The fleet-wide capacity
    /// (`cluster_capacity_crossed`) is not a cluster as the rule means one: its co-located
    /// figure is what is filed.
    pub fn needs_filing(self) -> bool {
        matches!(
            self,
            FindingKind::TrainingThresholdCrossed
                | FindingKind::UnattributedTrainingScale
                | FindingKind::RunThresholdCrossed
                | FindingKind::ColocatedCapacityCrossed
        )
    }

    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::EarlyWarning => "early_warning",
            FindingKind::TrainingThresholdCrossed => "training_threshold_crossed",
            FindingKind::ClusterCapacityCrossed => "cluster_capacity_crossed",
            FindingKind::HostDark => "host_dark",
            FindingKind::PolicyStale => "policy_stale",
            FindingKind::EnforcementMismatch => "enforcement_mismatch",
            FindingKind::ReportRejected => "report_rejected",
            FindingKind::SharedGpu => "shared_gpu",
            FindingKind::GuestTelemetryGap => "guest_telemetry_gap",
            FindingKind::UnattributedTrainingScale => "unattributed_training_scale",
            FindingKind::RunThresholdCrossed => "run_threshold_crossed",
            FindingKind::BioEarlyWarning => "bio_early_warning",
            FindingKind::ReportOverdue => "report_overdue",
            FindingKind::ColocatedCapacityCrossed => "colocated_capacity_crossed",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        FindingKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Where a finding stands (see [`lifecycle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingState {
    /// Raised, nobody acted on it yet.
    Open,
    /// An operator has seen it and works on it.
    Acknowledged,
    /// Reported to the regulator (with a reference).
    Filed,
    /// Decided to need no filing (with a reason).
    Dismissed,
    /// The condition stopped holding (a dark host answered, a stale host updated, …); never
    /// for threshold kinds.
    Resolved,
}

impl FindingState {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingState::Open => "open",
            FindingState::Acknowledged => "acknowledged",
            FindingState::Filed => "filed",
            FindingState::Dismissed => "dismissed",
            FindingState::Resolved => "resolved",
        }
    }

    /// Every state.
    pub const ALL: [FindingState; 5] = [
        FindingState::Open,
        FindingState::Acknowledged,
        FindingState::Filed,
        FindingState::Dismissed,
        FindingState::Resolved,
    ];

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        FindingState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether a report about it is still owed: open or acknowledged.
    pub fn is_pending(self) -> bool {
        matches!(self, FindingState::Open | FindingState::Acknowledged)
    }
}

/// A finding to raise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewFinding {
    /// Kind.
    pub kind: FindingKind,
    /// What it is about: the tenant id, the host id, or `host/workload` for a mismatch and
    /// for unattributed usage. At most one finding per (kind, subject) is open at a time.
    pub subject: String,
    /// The tenant, when it is about one.
    pub tenant: Option<String>,
    /// The host, when it is about one.
    pub host_id: Option<String>,
    /// Foreign (true) or domestic (false) tenant, per its attestation; none for host findings;
    /// true for unattributed usage (unknown, treated as foreign).
    pub foreign_person: Option<bool>,
    /// One line for humans.
    pub summary: String,
    /// Evidence: totals, thresholds, windows and hosts, statement excerpts.
    pub evidence: serde_json::Value,
    /// When the filing is due (raised at + the policy's `report_deadline_s`), for kinds that
    /// need one about a foreign or unknown person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<i64>,
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
    /// Who acknowledged it, when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<Acknowledgement>,
    /// The filing, when filed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filed: Option<Filing>,
    /// The dismissal, when dismissed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dismissed: Option<Dismissal>,
}

/// A page of findings.
#[derive(Debug, Clone, Default)]
pub struct FindingQuery {
    /// Only this state.
    pub state: Option<FindingState>,
    /// Only findings not resolved (open, acknowledged, filed or dismissed).
    pub active: bool,
    /// Only this id.
    pub id: Option<i64>,
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

/// The windows a computation covers: those ending after `since` and starting before `until`
/// (either open-ended when absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Period {
    /// Only windows ending after this.
    pub since: Option<i64>,
    /// Only windows starting before this.
    pub until: Option<i64>,
}

/// The fleet view's storage. Implemented by each backend; reads may run on their own
/// connection so a long aggregation does not hold up ingest.
pub trait FleetStore: Send + Sync + std::fmt::Debug + 'static {
    /// Usage aggregated per tenant (one tenant when `tenant` is given), by tenant id; with
    /// `since`, only windows ending after it count (a filing period), otherwise all of them.
    fn tenant_usage(&self, tenant: Option<&str>, since: Option<i64>) -> Result<Vec<TenantUsage>, StoreError> {
        self.tenant_usage_in(tenant, Period { since, until: None })
    }

    /// Usage aggregated per tenant (one tenant when `tenant` is given) over the windows of
    /// `period`, by tenant id.
    fn tenant_usage_in(&self, tenant: Option<&str>, period: Period) -> Result<Vec<TenantUsage>, StoreError>;

    /// Every tenant's usage and the usage without a tenant per (host, workload), in one pass
    /// over the windows (those ending after `since`, if given).
    fn fleet_usage(&self, since: Option<i64>) -> Result<FleetUsage, StoreError> {
        self.fleet_usage_in(Period { since, until: None })
    }

    /// [`FleetStore::fleet_usage`] over the windows of `period`. All time (the default
    /// period) is read from the roll-ups ([`rollup`]), any other period from the windows.
    fn fleet_usage_in(&self, period: Period) -> Result<FleetUsage, StoreError>;

    /// The all-time fleet view from the roll-ups, with the runs `segments` selects.
    fn rollup_usage(&self, segments: rollup::Segments) -> Result<FleetUsage, StoreError>;

    /// [`FleetStore::fleet_usage_in`] from the raw windows whatever the period.
    fn fleet_usage_from_windows(&self, period: Period) -> Result<FleetUsage, StoreError>;

    /// The roll-ups recomputed from the raw windows against the stored ones ([`rollup::check`]).
    fn rollup_check(&self) -> Result<Vec<rollup::check::TableCheck>, StoreError>;

    /// Recomputes the stored roll-ups from the raw windows (hosts in their cluster now), at
    /// `now`; returns the windows read.
    fn rollup_rebuild(&self, now: i64) -> Result<u64, StoreError>;

    /// Places enrolled host `host_id` in a site and fabric (none: unplaced) at `at`; false
    /// when the host is not enrolled.
    fn set_host_placement(
        &self,
        host_id: &str,
        placement: Option<&Placement>,
        at: i64,
    ) -> Result<bool, StoreError>;

    /// Every placed host's placement, by host id.
    fn host_placements(&self) -> Result<Vec<(String, Placement)>, StoreError>;

    /// The tenant's `limit` windows overlapping `from..to` with the most estimated
    /// operations, most first (a run's evidence).
    fn run_evidence(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError>;

    /// The `limit` windows without a tenant of `workload` on `host_id` with the most estimated
    /// operations, most first.
    fn unattributed_evidence(
        &self,
        host_id: &str,
        workload: &str,
        limit: u32,
    ) -> Result<Vec<WindowEvidence>, StoreError>;

    /// The tenant's `limit` windows with the most estimated operations, most first.
    fn usage_evidence(&self, tenant: &str, limit: u32) -> Result<Vec<WindowEvidence>, StoreError> {
        self.run_evidence(tenant, i64::MIN, i64::MAX, limit)
    }

    /// The hosts that reported the tenant's windows in busy segments starting within
    /// `from..=to` (a run's), by host id.
    fn run_hosts(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, StoreError>;

    /// The hosts that reported usage of the tenant, by host id.
    fn tenant_hosts(&self, tenant: &str) -> Result<Vec<String>, StoreError>;

    /// One tenant's roll-ups with its per-day tables ([`rollup::Tables::History`]; no
    /// capacity buckets, no busy segments): the console's history chart and per-host view,
    /// at a cost of the tenant's days and hosts, not its windows.
    fn tenant_rollups(&self, tenant: &str) -> Result<rollup::Rollups, StoreError>;

    /// The last time each host's report was stored (hosts that never reported are absent).
    fn last_report_at(&self) -> Result<BTreeMap<String, i64>, StoreError>;

    /// Records tenants' identities (replacing older ones).
    fn upsert_tenant_identities(&self, identities: &[TenantIdentity]) -> Result<(), StoreError>;

    /// Every known tenant identity, by tenant id.
    fn tenant_identities(&self) -> Result<Vec<TenantIdentity>, StoreError>;

    /// Raises `finding` unless one of its (kind, subject) is active (not resolved); returns
    /// the new id, or `None` when one was (so a condition that keeps holding is raised once,
    /// and a filed or dismissed crossing is not raised again).
    fn raise_finding(&self, finding: &NewFinding, at: i64) -> Result<Option<i64>, StoreError>;

    /// Resolves an active finding; false if it was resolved already. Never called for
    /// threshold kinds ([`FindingKind::is_threshold`]).
    fn resolve_finding(&self, id: i64, at: i64) -> Result<bool, StoreError>;

    /// Takes `action` on finding `id` as `actor` at `at`: checks the transition
    /// ([`FindingAction::transition`]), records it on the finding and appends the audit
    /// record, in one transaction; returns the updated finding.
    fn act_on_finding(
        &self,
        id: i64,
        action: &FindingAction,
        actor: &str,
        at: i64,
    ) -> Result<Finding, StoreError>;

    /// Appends `event` to the collector's audit log at `at`; returns its seq.
    fn append_audit(&self, at: i64, event: &serde_json::Value) -> Result<u64, StoreError>;

    /// The audit log's records with seq ≥ `from_seq`, at most `limit`, in order.
    fn audit_records(&self, from_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

    /// Findings matching `query`, by id.
    fn list_findings(&self, query: &FindingQuery) -> Result<Vec<Finding>, StoreError>;

    /// Per host, the batches refused for good at or after `since` (see
    /// [`crate::store::Rejection`]), by host id; hosts without any are absent.
    fn rejection_counts(&self, since: i64) -> Result<Vec<RejectionCount>, StoreError>;

    /// The `limit` newest rejections of `host_id`, newest first.
    fn rejections(&self, host_id: &str, limit: u32) -> Result<Vec<Rejection>, StoreError>;
}

/// How many batches of a host were refused for good since some time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionCount {
    /// The host.
    pub host_id: String,
    /// Refused batches.
    pub count: u64,
    /// The latest refusal (Unix seconds).
    pub last_at: i64,
}
