//! The jurisdiction policy (`typ: kyc-policy+jwt`): measures, their matches, conditions
//! and thresholds, and how unattested workloads are handled. Measures refuse unknown fields
//! (see the parent module).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{check_id, check_text, ForeignStatus, NumericDate, TokenClaims, TokenType};
use crate::{CountryCode, VerifyError};

/// The jurisdiction policy (`typ: kyc-policy+jwt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyClaims {
    /// Issuer (the policy authority).
    pub iss: String,
    /// Issued at.
    pub iat: NumericDate,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<NumericDate>,
    /// Expiry (required; a policy must be re-signed periodically).
    pub exp: NumericDate,
    /// Strictly increasing version; agents refuse anything lower than what they applied.
    pub version: u64,
    /// Special measures.
    pub measures: Vec<Measure>,
    /// What happens to workloads with no valid attestation.
    pub unverified: UnverifiedHandling,
    /// Reporting thresholds.
    pub thresholds: Thresholds,
    /// Which figure of a tenant's operations is held against the thresholds for the
    /// training-scale finding (early warning always uses the upper bound). Absent: `point`.
    #[serde(default, skip_serializing_if = "ThresholdBasis::is_point")]
    pub threshold_basis: ThresholdBasis,
    /// How long collectors must keep the regulatory record (usage, identities, statements)
    /// at least. Absent: the collector's own `retention.min_s` alone applies; present, the
    /// effective minimum is the larger of the two (a policy may raise it, never lower it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// The longest `retention.min_s` a policy may set: 100 years. Anything above is a typo (or
/// milliseconds), not a retention period.
pub const MAX_RETENTION_S: u64 = 100 * 365 * 86_400;

/// `retention` of a policy: the minimum record-keeping period it imposes on collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Seconds a record must be kept before it may be pruned; in `1..=MAX_RETENTION_S`.
    pub min_s: u64,
}

impl Retention {
    fn validate(&self) -> Result<(), VerifyError> {
        if self.min_s == 0 || self.min_s > MAX_RETENTION_S {
            return Err(VerifyError::invalid(
                "retention.min_s",
                format!("must be in 1..={MAX_RETENTION_S} seconds"),
            ));
        }
        Ok(())
    }
}

/// Which of a tenant's three operation figures a threshold is held against. Unknown values
/// are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdBasis {
    /// The point estimate (`estimated_ops`).
    #[default]
    Point,
    /// The upper bound (`ops_upper`): a provider that would rather report early than late.
    Upper,
}

impl ThresholdBasis {
    /// Whether this is the default.
    pub fn is_point(&self) -> bool {
        *self == ThresholdBasis::Point
    }

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ThresholdBasis::Point => "point",
            ThresholdBasis::Upper => "upper",
        }
    }
}

/// One special measure: whom it matches, in which roles, and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measure {
    /// Unique id within the policy, cited in decisions.
    pub id: String,
    /// Whom it applies to.
    #[serde(rename = "match")]
    pub matcher: MeasureMatch,
    /// Which parties' attributes are matched.
    pub roles: Vec<Role>,
    /// Prohibit or condition.
    pub action: MeasureAction,
    /// The conditions, for `action: condition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Conditions>,
    /// When the measure takes effect (absent: immediately).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_from: Option<NumericDate>,
    /// How a prohibition acts on the workload's processes (absent: `freeze`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Whom the measure reaches (absent: `foreign_persons`, as the orders are scoped).
    #[serde(default, skip_serializing_if = "AppliesTo::is_foreign_persons")]
    pub applies_to: AppliesTo,
    /// The legal source (e.g. a Federal Register citation).
    pub citation: String,
}

/// What a prohibiting measure does to a workload's processes. Either way its network
/// access is blocked too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Freeze the workload's cgroup (reversible: thawed when the prohibition lifts).
    #[default]
    Freeze,
    /// Kill every process in the workload's cgroup (and any that appears there later).
    Kill,
}

/// Whom a measure reaches. Unknown values are errors.
///
/// With `foreign_persons` a match through the `customer`, `beneficial_owner` or
/// `payment_source` role counts only when the customer is a foreign person (the orders
/// restrict foreign persons; a U.S. customer with a listed owner is not one), and a match
/// through `reseller` only when that reseller is foreign or not known to be U.S. (fail
/// closed). `all` matches whatever the parties' status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppliesTo {
    /// Foreign persons only.
    #[default]
    ForeignPersons,
    /// Everyone.
    All,
}

impl AppliesTo {
    /// Whether this is the default.
    pub fn is_foreign_persons(&self) -> bool {
        *self == AppliesTo::ForeignPersons
    }

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            AppliesTo::ForeignPersons => "foreign_persons",
            AppliesTo::All => "all",
        }
    }
}

impl Measure {
    /// Whether a match counts, given the status of the party the matching role stands for:
    /// the reseller's own for `reseller`, the customer's for every other role.
    pub fn reaches(&self, status: ForeignStatus) -> bool {
        match self.applies_to {
            AppliesTo::All => true,
            AppliesTo::ForeignPersons => status.maybe_foreign(),
        }
    }
}

/// Match criteria; a party matches if any listed criterion matches. At least one is required.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureMatch {
    /// Jurisdictions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<CountryCode>,
    /// Tenant ids (the attestation's `sub`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// Named persons/entities, matched exactly against legal, owner and reseller names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<String>,
}

/// The party in the customer chain whose attributes a measure inspects. Unknown values are
/// errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The customer itself.
    Customer,
    /// A beneficial owner.
    BeneficialOwner,
    /// A reseller in the lessee chain.
    Reseller,
    /// The source of payment.
    PaymentSource,
}

/// What a measure does. Unknown values are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasureAction {
    /// Deny the workload.
    Prohibit,
    /// Allow under conditions.
    Condition,
}

/// Conditions attached to a `condition` measure or verdict.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    /// No GPU access at all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_gpu: bool,
    /// At most this many GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    /// Report all GPU usage, not only training-scale usage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub report_all_usage: bool,
    /// Network restriction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkCondition>,
    /// Operations must be attributable to this workload alone: every GPU it uses is in
    /// compute mode EXCLUSIVE_PROCESS or is a MIG instance of its own. The agent cannot make
    /// a running GPU exclusive without stopping its other users, so it measures: intervals
    /// in which the workload shares a GPU are reported (`shared_gpu_seconds`), logged and
    /// audited, and the collector raises a finding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive_gpu: bool,
}

impl Conditions {
    /// Whether no condition is set.
    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }

    /// The union of two condition sets, keeping the stricter of each.
    pub fn merge(&mut self, other: &Conditions) {
        self.no_gpu |= other.no_gpu;
        self.max_gpus = match (self.max_gpus, other.max_gpus) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.report_all_usage |= other.report_all_usage;
        self.exclusive_gpu |= other.exclusive_gpu;
        if other.network.is_some() {
            self.network = other.network;
        }
    }
}

/// Network conditions. Unknown values are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkCondition {
    /// No outbound traffic.
    DenyEgress,
}

/// Handling of workloads with no valid attestation. Wire form: `{"action": "deny"}`,
/// `{"action": "grace", "grace_s": 86400}` or `{"action": "allow"}`; any other member is an
/// error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UnverifiedWire", into = "UnverifiedWire")]
pub enum UnverifiedHandling {
    /// Deny at once.
    Deny,
    /// Allow for `grace_s` seconds after the workload is first seen, then deny.
    Grace {
        /// Length of the grace period, seconds.
        grace_s: u64,
    },
    /// Allow (audit only).
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum UnverifiedAction {
    Deny,
    Grace,
    Allow,
}

/// Serde's internally tagged enums do not enforce `deny_unknown_fields` on unit variants, so
/// the wire form goes through this flat struct.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnverifiedWire {
    action: UnverifiedAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grace_s: Option<u64>,
}

impl TryFrom<UnverifiedWire> for UnverifiedHandling {
    type Error = String;
    fn try_from(w: UnverifiedWire) -> Result<Self, String> {
        match (w.action, w.grace_s) {
            (UnverifiedAction::Deny, None) => Ok(UnverifiedHandling::Deny),
            (UnverifiedAction::Allow, None) => Ok(UnverifiedHandling::Allow),
            (UnverifiedAction::Grace, Some(grace_s)) => Ok(UnverifiedHandling::Grace { grace_s }),
            (UnverifiedAction::Grace, None) => Err("action \"grace\" needs grace_s".into()),
            (_, Some(_)) => Err("grace_s is only valid with action \"grace\"".into()),
        }
    }
}

impl From<UnverifiedHandling> for UnverifiedWire {
    fn from(h: UnverifiedHandling) -> Self {
        match h {
            UnverifiedHandling::Deny => UnverifiedWire { action: UnverifiedAction::Deny, grace_s: None },
            UnverifiedHandling::Allow => UnverifiedWire { action: UnverifiedAction::Allow, grace_s: None },
            UnverifiedHandling::Grace { grace_s } => {
                UnverifiedWire { action: UnverifiedAction::Grace, grace_s: Some(grace_s) }
            }
        }
    }
}

/// Reporting thresholds (REGULATION.md). Policy data, never constants in code.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Operations for one model (10^26 in EO 14110).
    pub training_ops: f64,
    /// Operations for a model trained mainly on biological sequence data (10^23).
    pub bio_training_ops: f64,
    /// Concurrent cluster capacity, operations per second (10^20).
    pub cluster_flops: f64,
    /// Fraction of `training_ops` that raises an early warning (0 < f ≤ 1).
    pub early_warning_fraction: f64,
    /// Seconds a provider has to report a crossed threshold once it learns of it (the
    /// collector's `due_at`): 15 days by default (REGULATION.md), 1 hour … 365 days.
    #[serde(default = "default_report_deadline_s", skip_serializing_if = "is_default_report_deadline")]
    pub report_deadline_s: u64,
    /// The longest pause inside one training run: a tenant's windows separated by more than
    /// this many seconds belong to different runs. 1 hour by default, 60 s … 30 days.
    #[serde(default = "default_run_gap_s", skip_serializing_if = "is_default_run_gap")]
    pub run_gap_s: u64,
}

/// The default reporting deadline: 15 days (REGULATION.md).
pub const DEFAULT_REPORT_DEADLINE_S: u64 = 15 * 86_400;
/// The default longest pause inside a training run: 1 hour.
pub const DEFAULT_RUN_GAP_S: u64 = 3600;

fn default_report_deadline_s() -> u64 {
    DEFAULT_REPORT_DEADLINE_S
}

fn default_run_gap_s() -> u64 {
    DEFAULT_RUN_GAP_S
}

fn is_default_report_deadline(v: &u64) -> bool {
    *v == DEFAULT_REPORT_DEADLINE_S
}

fn is_default_run_gap(v: &u64) -> bool {
    *v == DEFAULT_RUN_GAP_S
}

impl Thresholds {
    fn validate(&self) -> Result<(), VerifyError> {
        for (name, v) in [
            ("thresholds.training_ops", self.training_ops),
            ("thresholds.bio_training_ops", self.bio_training_ops),
            ("thresholds.cluster_flops", self.cluster_flops),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(VerifyError::invalid(name, "must be a positive finite number"));
            }
        }
        let f = self.early_warning_fraction;
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            return Err(VerifyError::invalid("thresholds.early_warning_fraction", "must be in (0, 1]"));
        }
        if !(3600..=365 * 86_400).contains(&self.report_deadline_s) {
            return Err(VerifyError::invalid(
                "thresholds.report_deadline_s",
                "must be 3600 … 31536000 seconds",
            ));
        }
        if !(60..=30 * 86_400).contains(&self.run_gap_s) {
            return Err(VerifyError::invalid("thresholds.run_gap_s", "must be 60 … 2592000 seconds"));
        }
        Ok(())
    }
}

impl Measure {
    fn validate(&self, i: usize) -> Result<(), VerifyError> {
        let at = |field: &str| format!("measures[{i}].{field}");
        check_id(&at("id"), &self.id)?;
        check_text(&at("citation"), &self.citation)?;
        if self.citation.trim().is_empty() {
            return Err(VerifyError::invalid(at("citation"), "must not be empty"));
        }
        let m = &self.matcher;
        if m.countries.is_empty() && m.tenants.is_empty() && m.entities.is_empty() {
            return Err(VerifyError::invalid(at("match"), "must name countries, tenants or entities"));
        }
        for t in &m.tenants {
            check_id(&at("match.tenants"), t)?;
        }
        for e in &m.entities {
            check_id(&at("match.entities"), e)?;
        }
        if self.roles.is_empty() {
            return Err(VerifyError::invalid(at("roles"), "must name at least one role"));
        }
        if self.roles.iter().collect::<HashSet<_>>().len() != self.roles.len() {
            return Err(VerifyError::invalid(at("roles"), "names a role twice"));
        }
        match (self.action, &self.conditions) {
            (MeasureAction::Prohibit, Some(_)) => {
                Err(VerifyError::invalid(at("conditions"), "a prohibit measure takes no conditions"))
            }
            (MeasureAction::Condition, None) => {
                Err(VerifyError::invalid(at("conditions"), "a condition measure needs conditions"))
            }
            (MeasureAction::Condition, Some(c)) if c.is_empty() => {
                Err(VerifyError::invalid(at("conditions"), "must set at least one condition"))
            }
            _ => Ok(()),
        }
    }
}

impl TokenClaims for PolicyClaims {
    const TOKEN_TYPE: TokenType = TokenType::Policy;
    const REQUIRED_CLAIMS: &'static [&'static str] =
        &["iss", "iat", "exp", "version", "measures", "unverified", "thresholds"];

    fn validate(&self) -> Result<(), VerifyError> {
        check_id("iss", &self.iss)?;
        if self.iat >= self.exp {
            return Err(VerifyError::invalid("exp", "must be after iat"));
        }
        if self.version == 0 {
            return Err(VerifyError::invalid("version", "must be at least 1"));
        }
        let mut ids = HashSet::new();
        for (i, m) in self.measures.iter().enumerate() {
            m.validate(i)?;
            if !ids.insert(m.id.as_str()) {
                return Err(VerifyError::invalid(
                    format!("measures[{i}].id"),
                    format!("duplicate id {:?}", m.id),
                ));
            }
        }
        if let Some(retention) = &self.retention {
            retention.validate()?;
        }
        self.thresholds.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_with(retention: serde_json::Value) -> Result<PolicyClaims, String> {
        let mut claims = serde_json::json!({
            "iss": "authority", "iat": 0, "exp": 10, "version": 1, "measures": [],
            "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01},
        });
        if !retention.is_null() {
            claims["retention"] = retention;
        }
        let claims: PolicyClaims = serde_json::from_value(claims).map_err(|e| e.to_string())?;
        claims.validate().map_err(|e| e.to_string())?;
        Ok(claims)
    }

    #[test]
    fn retention_is_optional_positive_and_bounded() {
        assert_eq!(policy_with(serde_json::Value::Null).unwrap().retention, None);
        let five_years = policy_with(serde_json::json!({"min_s": 157_680_000})).unwrap();
        assert_eq!(five_years.retention, Some(Retention { min_s: 157_680_000 }));
        // Absent stays absent on the wire: older policies re-serialize byte for byte.
        let plain = policy_with(serde_json::Value::Null).unwrap();
        assert!(!serde_json::to_string(&plain).unwrap().contains("retention"));
        for bad in [serde_json::json!({"min_s": 0}), serde_json::json!({"min_s": MAX_RETENTION_S + 1})] {
            let err = policy_with(bad).unwrap_err();
            assert!(err.contains("retention.min_s"), "{err}");
        }
        assert!(policy_with(serde_json::json!({"min_s": -1})).is_err());
        assert!(policy_with(serde_json::json!({"min_s": 1, "max_s": 2})).is_err(), "unknown fields");
    }

    #[test]
    fn applies_to_defaults_to_foreign_persons_and_is_serialized_only_when_all() {
        let m = serde_json::json!({"id": "m", "match": {"countries": ["KP"]}, "roles": ["beneficial_owner"],
                                   "action": "prohibit", "citation": "c"});
        let foreign: Measure = serde_json::from_value(m.clone()).unwrap();
        assert_eq!(foreign.applies_to, AppliesTo::ForeignPersons);
        assert_eq!(serde_json::to_value(&foreign).unwrap(), m);
        assert!(foreign.reaches(ForeignStatus::Foreign) && foreign.reaches(ForeignStatus::Unknown));
        assert!(!foreign.reaches(ForeignStatus::Us));
        let mut v = m.clone();
        v["applies_to"] = serde_json::json!("all");
        let all: Measure = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((all.applies_to, all.applies_to.as_str()), (AppliesTo::All, "all"));
        assert_eq!(serde_json::to_value(&all).unwrap(), v);
        assert!(all.reaches(ForeignStatus::Us));
        v["applies_to"] = serde_json::json!("us_persons");
        assert!(serde_json::from_value::<Measure>(v).is_err());
    }

    #[test]
    fn conditions_merge_keeps_the_stricter() {
        let mut a = Conditions { max_gpus: Some(8), ..Default::default() };
        a.merge(&Conditions { max_gpus: Some(2), no_gpu: true, ..Default::default() });
        assert_eq!(a.max_gpus, Some(2));
        assert!(a.no_gpu);
        a.merge(&Conditions { exclusive_gpu: true, ..Default::default() });
        assert!(a.exclusive_gpu);
        a.merge(&Conditions { network: Some(NetworkCondition::DenyEgress), ..Default::default() });
        assert_eq!(a.network, Some(NetworkCondition::DenyEgress));
        assert_eq!(a.max_gpus, Some(2));
    }

    #[test]
    fn threshold_basis_defaults_to_point_and_refuses_unknown_values() {
        assert_eq!(ThresholdBasis::default(), ThresholdBasis::Point);
        let upper: ThresholdBasis = serde_json::from_str(r#""upper""#).unwrap();
        assert_eq!((upper, upper.as_str()), (ThresholdBasis::Upper, "upper"));
        assert!(serde_json::from_str::<ThresholdBasis>(r#""lower""#).is_err());
        let c: Conditions = serde_json::from_str(r#"{"exclusive_gpu": true}"#).unwrap();
        assert!(c.exclusive_gpu && !c.is_empty());
        assert_eq!(serde_json::to_value(Conditions::default()).unwrap(), serde_json::json!({}));
    }

    /// The filing deadline and the run gap default (and are then not serialized, so an
    /// older policy's wire form is unchanged) and are bounded.
    #[test]
    fn report_deadline_and_run_gap_default_and_are_bounded() {
        let base = serde_json::json!({"training_ops": 1e26, "bio_training_ops": 1e23,
            "cluster_flops": 1e20, "early_warning_fraction": 0.5});
        let t: Thresholds = serde_json::from_value(base.clone()).unwrap();
        assert_eq!((t.report_deadline_s, t.run_gap_s), (15 * 86_400, 3600));
        assert!(t.validate().is_ok());
        assert_eq!(serde_json::to_value(t).unwrap(), base);
        for (field, bad) in
            [("report_deadline_s", 59), ("report_deadline_s", 400 * 86_400), ("run_gap_s", 10)]
        {
            let mut v = base.clone();
            v[field] = serde_json::json!(bad);
            let t: Thresholds = serde_json::from_value(v).unwrap();
            let e = t.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}={bad}: {e}");
        }
    }

    #[test]
    fn unverified_handling_wire_form() {
        let g: UnverifiedHandling = serde_json::from_str(r#"{"action":"grace","grace_s":3600}"#).unwrap();
        assert_eq!(g, UnverifiedHandling::Grace { grace_s: 3600 });
        assert!(serde_json::from_str::<UnverifiedHandling>(r#"{"action":"deny","grace_s":1}"#).is_err());
        assert!(serde_json::from_str::<UnverifiedHandling>(r#"{"action":"maybe"}"#).is_err());
        assert!(serde_json::from_str::<UnverifiedHandling>(r#"{"action":"grace"}"#).is_err());
        assert!(serde_json::from_str::<UnverifiedHandling>(r#"{"action":"deny","x":1}"#).is_err());
        let wire = serde_json::to_value(UnverifiedHandling::Grace { grace_s: 5 }).unwrap();
        assert_eq!(wire, serde_json::json!({"action": "grace", "grace_s": 5}));
        let wire = serde_json::to_value(UnverifiedHandling::Deny).unwrap();
        assert_eq!(wire, serde_json::json!({"action": "deny"}));
    }
}
