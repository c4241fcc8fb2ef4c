//! The regulatory record and its retention: what the collector keeps so that an operator can
//! show, years later, what was known when (REGULATION.md: EO 13984 and 89 FR 5698 require
//! providers to *keep records* of their foreign customers and of large training runs), and
//! the one way rows of it are ever deleted ([`RecordStore::prune`], `kycd-collector records
//! prune`).
//!
//! Kept, beside the usage records themselves:
//! - **identity history** (`identity_history`): one row per distinct (tenant, attestation
//!   digest, identity) a verified host statement named, with when it was first and last seen.
//!   `tenant_identities` stays the *current* view (overwritten by the newest statement); the
//!   history is append-only: a row is inserted once and afterwards only its `last_seen`
//!   advances.
//! - **statement history** (`statement_history`): every distinct verified host statement,
//!   keyed by (host, [`statement_content_digest`]) — the digest leaves out what changes on
//!   every poll (`iat`, `exp`, `nonce`, the host's uptime), so a host that answers the same
//!   thing every minute adds one row, not 525,600 a year; its `last_seen` advances.
//!
//! Retention: nothing younger than the effective minimum ([`effective_min_s`]: the larger of
//! the collector's `retention.min_s`, default [`DEFAULT_RETENTION_MIN_S`], and the published
//! policy's `retention.min_s`) is ever deleted: a prune whose cut-off lies inside it is refused
//! as a whole ([`RetentionError::InsideRetention`]). Rows tied to a finding not yet filed are
//! kept whatever their age and counted as refused ([`PruneCounts`]): a finding is *unfiled*
//! while its state is not one of `resolved`, `filed`, `dismissed` (the SQL says exactly
//! `state NOT IN ('resolved', 'filed', 'dismissed')`, so it holds for every lifecycle state
//! added later, which are unfiled until they say otherwise). A row is tied when such a
//! finding is about its tenant, its host, or (usage without a tenant) its `host/workload`.

use std::collections::BTreeMap;

use kycd_protocol::{HostStatementClaims, StatementSubject};
use serde::{Deserialize, Serialize};

use crate::store::error::StoreError;

/// The default minimum retention: 5 years (5 × 365 × 86,400 s). REGULATION.md says providers
/// must *keep records* (EO 13984; the customer identification programme of 89 FR 5698) and
/// that every number is policy data, but names no period; 5 years is issue 19's reading of the
/// proposed rule's record keeping. A published policy may raise it
/// ([`kycd_protocol::Retention`]), the collector's `--retention-min-s` set it.
pub const DEFAULT_RETENTION_MIN_S: u64 = 157_680_000;

/// The finding states that release a row for pruning; every other state ties it. The SQL of
/// both backends spells this list out literally (`NOT IN ('resolved', 'filed', 'dismissed')`).
pub const RELEASED_STATES: [&str; 3] = ["resolved", "filed", "dismissed"];

/// One tenant identity as a verified statement named it, for [`RecordStore::record_identities`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityObservation {
    /// Tenant id.
    pub tenant: String,
    /// SHA-256 (hex) of the attestation the statement said is in force; empty if it named none.
    pub attestation_digest: String,
    /// The identity, as the statement carried it.
    pub identity: StatementSubject,
    /// When (the statement's `iat`, Unix seconds).
    pub seen_at: i64,
}

/// One row of the identity history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// Tenant id.
    pub tenant: String,
    /// SHA-256 (hex) of the attestation in force; empty if none was named.
    pub attestation_digest: String,
    /// The identity (legal name, countries, beneficial owners' countries, resellers',
    /// payment source, foreign flag) as stored.
    pub identity: serde_json::Value,
    /// First statement naming it (Unix seconds).
    pub first_seen: i64,
    /// Last statement naming it (Unix seconds).
    pub last_seen: i64,
}

/// One row of the statement history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementRecord {
    /// The host.
    pub host_id: String,
    /// [`statement_content_digest`] of the claims.
    pub content_digest: String,
    /// First poll that returned it (Unix seconds, the collector's clock).
    pub first_seen: i64,
    /// Last poll that returned it.
    pub last_seen: i64,
    /// The token as first received (a compact JWS, or a digest-bound `head~body`,
    /// [`kycd_protocol::verify_split_statement`]): the signed evidence.
    pub token: String,
}

/// What a prune deleted (or, dry, would delete) and what it kept because a finding not yet
/// filed is tied to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneCounts {
    /// Usage records deleted.
    pub records: u64,
    /// Identity history rows deleted.
    pub identities: u64,
    /// Statement history rows deleted.
    pub statements: u64,
    /// Usage records old enough but kept: tied to an unfiled finding.
    pub refused_records: u64,
    /// Identity history rows kept for the same reason.
    pub refused_identities: u64,
    /// Statement history rows kept for the same reason.
    pub refused_statements: u64,
}

impl PruneCounts {
    /// Rows deleted, all tables.
    pub fn deleted(&self) -> u64 {
        self.records.saturating_add(self.identities).saturating_add(self.statements)
    }

    /// Rows kept because of unfiled findings, all tables.
    pub fn refused(&self) -> u64 {
        self.refused_records.saturating_add(self.refused_identities).saturating_add(self.refused_statements)
    }
}

/// What the record tables offer. Implementations are internally synchronised (`&self`).
pub trait RecordStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records what statements named: a new (tenant, digest, identity) is inserted, a known
    /// one gets its `last_seen` advanced (never moved back); nothing else changes.
    fn record_identities(&self, seen: &[IdentityObservation]) -> Result<(), StoreError>;
    /// The identity history (of one tenant, or all), by tenant then first seen.
    fn identity_history(&self, tenant: Option<&str>) -> Result<Vec<IdentityRecord>, StoreError>;
    /// The statement history (of one host, or all), by host then first seen.
    fn statement_history(&self, host_id: Option<&str>) -> Result<Vec<StatementRecord>, StoreError>;
    /// Deletes, in one transaction, the usage records that ended by `before` and the history
    /// rows last seen before it, except those tied to an unfiled finding (counted as
    /// refused); with `dry_run` only counts. The retention check is the caller's
    /// ([`check_cutoff`]): this deletes what it is told. PostgreSQL deletes usage records by
    /// whole months only ([`crate::store::postgres::partitions`]).
    fn prune(&self, before: i64, dry_run: bool) -> Result<PruneCounts, StoreError>;
}

/// Why a prune was refused.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The cut-off is younger than now − the effective minimum retention.
    #[error(
        "refusing to prune before {before}: it is inside the retention period of {min_s} s \
         ({set_by}); the latest cut-off allowed now is {limit}; {would} rows would have been deleted \
         (records {records}, identities {identities}, statements {statements})",
        before = date(*before),
        limit = date(*limit),
        would = counts.deleted(),
        records = counts.records,
        identities = counts.identities,
        statements = counts.statements,
    )]
    InsideRetention {
        /// The cut-off asked for.
        before: i64,
        /// now − `min_s`.
        limit: i64,
        /// The effective minimum.
        min_s: u64,
        /// Which setting it comes from.
        set_by: &'static str,
        /// What the prune would have deleted.
        counts: PruneCounts,
    },
    /// A configured minimum outside `1..=MAX_RETENTION_S`.
    #[error("retention.min_s {0} is out of range (1..={max} s)", max = kycd_protocol::MAX_RETENTION_S)]
    InvalidMinimum(u64),
    /// The store failed.
    #[error("record store")]
    Store(#[from] StoreError),
}

/// Unix seconds as RFC 3339 UTC (the number itself if out of range), for messages.
fn date(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| at.to_string())
}

/// The effective minimum retention and where it comes from: the larger of the configured one
/// and the published policy's.
pub fn effective_min_s(configured: u64, policy: Option<&kycd_protocol::PolicyClaims>) -> (u64, &'static str) {
    match policy.and_then(|p| p.retention) {
        Some(r) if r.min_s > configured => (r.min_s, "the published policy's retention.min_s"),
        _ => (configured, "the collector's retention.min_s"),
    }
}

/// A configured minimum, checked.
pub fn check_configured(min_s: u64) -> Result<u64, RetentionError> {
    if min_s == 0 || min_s > kycd_protocol::MAX_RETENTION_S {
        return Err(RetentionError::InvalidMinimum(min_s));
    }
    Ok(min_s)
}

/// The latest cut-off allowed at `now` for a minimum of `min_s`.
pub fn cutoff_limit(now: i64, min_s: u64) -> i64 {
    now.saturating_sub(i64::try_from(min_s).unwrap_or(i64::MAX))
}

/// Whether `before` may be pruned at `now` under the effective minimum; `Err` with the limit.
pub fn check_cutoff(before: i64, now: i64, min_s: u64) -> Result<(), i64> {
    let limit = cutoff_limit(now, min_s);
    if before > limit {
        Err(limit)
    } else {
        Ok(())
    }
}

/// One prune at `now` with the configured minimum: refused as a whole when `before` is inside
/// the effective retention; else the tied rows are kept and everything else older is deleted
/// (`dry_run`: counted). The usage roll-ups keep the deleted windows' usage (a tenant's
/// cumulative totals never drop because detail aged out; see [`crate::fleet::rollup`]).
pub fn prune<S: RecordStore + crate::policy::PolicyStore + ?Sized>(
    store: &S,
    before: i64,
    now: i64,
    configured_min_s: u64,
    dry_run: bool,
) -> Result<PruneCounts, RetentionError> {
    let configured = check_configured(configured_min_s)?;
    let policy = store.current_policy()?;
    let (min_s, set_by) = effective_min_s(configured, policy.as_ref().map(|p| &p.claims));
    if let Err(limit) = check_cutoff(before, now, min_s) {
        let counts = store.prune(before, true)?;
        return Err(RetentionError::InsideRetention { before, limit, min_s, set_by, counts });
    }
    Ok(store.prune(before, dry_run)?)
}

/// The identities the hosts' statements name, one per (tenant, attestation digest, identity)
/// at its newest `iat`, for [`RecordStore::record_identities`].
pub fn identities_seen<'a>(
    statements: impl IntoIterator<Item = &'a HostStatementClaims>,
) -> Vec<IdentityObservation> {
    let mut seen: BTreeMap<(String, String, String), IdentityObservation> = BTreeMap::new();
    for statement in statements {
        for workload in &statement.workloads {
            let (Some(tenant), Some(subject)) = (&workload.tenant, &workload.subject) else { continue };
            let digest = workload.attestation_digest.clone().unwrap_or_default();
            let Ok(identity_json) = serde_json::to_string(subject) else { continue };
            let entry = seen.entry((tenant.clone(), digest.clone(), identity_json)).or_insert_with(|| {
                IdentityObservation {
                    tenant: tenant.clone(),
                    attestation_digest: digest,
                    identity: subject.clone(),
                    seen_at: statement.iat,
                }
            });
            entry.seen_at = entry.seen_at.max(statement.iat);
        }
    }
    seen.into_values().collect()
}

/// The claims' fields that change on every poll while the host's answer does not: left out of
/// [`statement_content_digest`].
const VOLATILE: [&str; 3] = ["iat", "exp", "nonce"];

/// SHA-256 (hex) of a statement's claims without their volatile fields (`iat`, `exp`, `nonce`
/// and the host's `uptime_s`): equal for two polls of a host whose answer did not change.
pub fn statement_content_digest(claims: &HostStatementClaims) -> Result<String, StoreError> {
    let mut value = serde_json::to_value(claims)
        .map_err(|e| StoreError::Corrupt(format!("statement claims do not serialize: {e}")))?;
    if let Some(map) = value.as_object_mut() {
        for field in VOLATILE {
            map.remove(field);
        }
        if let Some(host) = map.get_mut("host").and_then(serde_json::Value::as_object_mut) {
            host.remove("uptime_s");
        }
    }
    // The same claims serialize to the same text in one build (keys sorted, or in field order
    // where a dependency enables serde_json's `preserve_order`).
    let text = serde_json::to_string(&value)
        .map_err(|e| StoreError::Corrupt(format!("statement claims do not serialize: {e}")))?;
    Ok(kycd_protocol::token_digest(text.as_bytes()))
}

/// A stored identity (JSON) as [`StatementSubject`] JSON text, for the history's key.
pub(crate) fn identity_json(identity: &StatementSubject) -> Result<String, StoreError> {
    serde_json::to_string(identity)
        .map_err(|e| StoreError::Corrupt(format!("identity does not serialize: {e}")))
}

/// A stored identity read back.
pub(crate) fn parse_identity(json: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("stored identity: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(iat: i64, nonce: &str, uptime_s: u64, policy_version: Option<u64>) -> HostStatementClaims {
        serde_json::from_value(serde_json::json!({
            "iss": "h", "iat": iat, "exp": iat + 60, "nonce": nonce, "agent_version": "1",
            "policy_version": policy_version, "workloads": [],
            "host": {"cpu_model": "x", "uptime_s": uptime_s, "boot_id": "b"},
        }))
        .unwrap()
    }

    #[test]
    fn the_content_digest_ignores_what_changes_every_poll() {
        let a = statement_content_digest(&statement(100, "n1", 5, Some(1))).unwrap();
        let b = statement_content_digest(&statement(160, "n2", 65, Some(1))).unwrap();
        assert_eq!(a, b);
        let c = statement_content_digest(&statement(160, "n2", 65, Some(2))).unwrap();
        assert_ne!(a, c, "a new policy version is new content");
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn the_effective_minimum_is_the_larger() {
        let policy = |min_s: Option<u64>| -> kycd_protocol::PolicyClaims {
            let mut claims = serde_json::json!({
                "iss": "a", "iat": 0, "exp": 10, "version": 1, "measures": [],
                "unverified": {"action": "deny"},
                "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                               "early_warning_fraction": 0.01},
            });
            if let Some(min_s) = min_s {
                claims["retention"] = serde_json::json!({"min_s": min_s});
            }
            serde_json::from_value(claims).unwrap()
        };
        assert_eq!(effective_min_s(100, None).0, 100);
        assert_eq!(effective_min_s(100, Some(&policy(None))).0, 100);
        assert_eq!(effective_min_s(100, Some(&policy(Some(50)))).0, 100, "a policy never lowers it");
        let (min_s, source) = effective_min_s(100, Some(&policy(Some(500))));
        assert_eq!((min_s, source.contains("policy")), (500, true));
    }

    #[test]
    fn cutoffs_inside_retention_are_refused() {
        let now = 1_000_000_000;
        assert_eq!(check_cutoff(now - 100, now, 100), Ok(()));
        assert_eq!(check_cutoff(now - 99, now, 100), Err(now - 100));
        assert_eq!(check_cutoff(i64::MIN, now, u64::MAX), Ok(()));
        assert!(matches!(check_configured(0), Err(RetentionError::InvalidMinimum(0))));
        assert_eq!(check_configured(DEFAULT_RETENTION_MIN_S).unwrap(), DEFAULT_RETENTION_MIN_S);
    }
}
