//! Wire types of every signed document kycd reads or writes (see DESIGN.md): tenant
//! attestations, the jurisdiction policy, host statements, and usage reports.
//!
//! Compatibility rules, chosen per type because they fail in different directions:
//! - **Attestation claims** ignore unknown *fields* (the KYC service may add data), but an
//!   unknown *enum value* (KYC status, subject kind, binding kind) is an error: a status the
//!   agent does not understand must not be read as "verified".
//! - **Policy**: the top level ignores unknown fields (metadata), but a measure, its match, its
//!   conditions and the `unverified` rule refuse unknown fields. A matcher or condition the
//!   agent cannot apply would otherwise be silently dropped and the measure would restrict
//!   less than its author meant; rejecting the policy keeps the previous one in force.
//!
//! Times are JWT NumericDates: integer seconds since the Unix epoch.

use std::collections::HashSet;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{CountryCode, VerifyError};

/// Seconds since the Unix epoch (RFC 7519 NumericDate, integer only).
pub type NumericDate = i64;

/// Longest identifier (issuer, subject, jti, measure id, workload id) accepted.
pub const MAX_ID_LEN: usize = 256;
/// Longest free-text field (names, citations) accepted.
pub const MAX_TEXT_LEN: usize = 1024;

/// The kinds of signed token, each with its own `typ` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// A tenant's verified-identity attestation.
    Attestation,
    /// The jurisdiction policy.
    Policy,
    /// A host's signed answer to a collector's poll.
    HostStatement,
}

impl TokenType {
    /// The JOSE `typ` header value.
    pub fn typ(self) -> &'static str {
        match self {
            TokenType::Attestation => "kyc-attestation+jwt",
            TokenType::Policy => "kyc-policy+jwt",
            TokenType::HostStatement => "kyc-host-statement+jwt",
        }
    }
}

/// Claims carried by a signed token of one [`TokenType`].
pub trait TokenClaims: DeserializeOwned {
    /// The token type (and so the `typ` header) these claims travel under.
    const TOKEN_TYPE: TokenType;
    /// Claims that must be present (checked before typing, for a precise `MissingClaim`).
    const REQUIRED_CLAIMS: &'static [&'static str];
    /// Semantic checks beyond the types (non-empty ids, consistent fields, …).
    fn validate(&self) -> Result<(), VerifyError>;
}

fn check_id(claim: &str, value: &str) -> Result<(), VerifyError> {
    if value.is_empty() {
        return Err(VerifyError::invalid(claim, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(VerifyError::invalid(claim, format!("longer than {MAX_ID_LEN} bytes")));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(VerifyError::invalid(claim, "contains control characters"));
    }
    Ok(())
}

fn check_text(claim: &str, value: &str) -> Result<(), VerifyError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(VerifyError::invalid(claim, format!("longer than {MAX_TEXT_LEN} bytes")));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(VerifyError::invalid(claim, "contains control characters"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Attestation

/// A tenant's verified-identity attestation (`typ: kyc-attestation+jwt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttestationClaims {
    /// Issuer (the KYC service).
    pub iss: String,
    /// Tenant id.
    pub sub: String,
    /// Unique token id; replay and supersession are tracked by it.
    pub jti: String,
    /// Issued at.
    pub iat: NumericDate,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<NumericDate>,
    /// Expiry (required).
    pub exp: NumericDate,
    /// Outcome of the KYC process.
    pub kyc: Kyc,
    /// Who the customer is.
    pub subject: Subject,
    /// Beneficial owners of an organisation (89 FR 5698 requires identifying them).
    #[serde(default)]
    pub beneficial_owners: Vec<BeneficialOwner>,
    /// The lessee chain: resellers between the provider and the customer.
    #[serde(default)]
    pub resellers: Vec<Reseller>,
    /// Country of the customer's source of payment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_source_country: Option<CountryCode>,
    /// The workload on the host this attestation is for.
    pub binding: Binding,
    /// Whether the KYC service determined the customer to be a foreign person.
    pub foreign_person: bool,
}

/// KYC outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kyc {
    /// Status; only `verified` counts as verified.
    pub status: KycStatus,
    /// When verification completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<NumericDate>,
    /// How identity was verified (free text, e.g. `document+liveness`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// KYC status. Unknown values are errors (fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KycStatus {
    /// Identity verified.
    Verified,
    /// Verification not complete.
    Pending,
    /// Verification failed or refused.
    Rejected,
}

/// The customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// Person or organisation.
    pub kind: SubjectKind,
    /// Legal name (forwarded only in findings, never logged at info level).
    pub legal_name: String,
    /// Nationality / incorporation / residence / principal place of business.
    pub countries: Vec<CountryCode>,
}

/// Kind of customer. Unknown values are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    /// A natural person.
    Individual,
    /// A legal entity.
    Organization,
}

/// A beneficial owner of the customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeneficialOwner {
    /// Name.
    pub name: String,
    /// Countries of nationality/residence.
    pub countries: Vec<CountryCode>,
}

/// A reseller in the lessee chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reseller {
    /// Name.
    pub name: String,
    /// Country of the reseller.
    pub country: CountryCode,
}

/// What on the host an attestation covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Binding {
    /// Kind of workload.
    pub kind: BindingKind,
    /// Identifier within the kind: a cgroup path, a libvirt domain UUID or name, a numeric
    /// uid, or any label for `host`.
    pub id: String,
    /// The host (cloud-init instance id) the attestation is restricted to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
}

/// Kind of workload binding. Unknown values are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingKind {
    /// A cgroup v2 path relative to the cgroup root, e.g. `/machine.slice/foo.scope`.
    Cgroup,
    /// A libvirt domain (UUID or name).
    LibvirtDomain,
    /// Everything a Unix user runs (`user-UID.slice`).
    UnixUser,
    /// The whole host (single-tenant bare metal or VM).
    Host,
}

/// Checks a cgroup path: absolute, normalised, no `.`/`..` components. An attestation must
/// never be able to name a path outside the cgroup tree kycd enforces on.
fn check_cgroup_path(claim: &str, path: &str) -> Result<(), VerifyError> {
    if !path.starts_with('/') {
        return Err(VerifyError::invalid(claim, "cgroup path must start with '/'"));
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err(VerifyError::invalid(claim, "cgroup path must not end with '/'"));
    }
    if path.len() > 1 && path[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(VerifyError::invalid(claim, "cgroup path must be normalised (no '//', '.' or '..')"));
    }
    Ok(())
}

impl Binding {
    fn validate(&self) -> Result<(), VerifyError> {
        check_id("binding.id", &self.id)?;
        match self.kind {
            BindingKind::Cgroup => check_cgroup_path("binding.id", &self.id)?,
            BindingKind::UnixUser => {
                self.id.parse::<u32>().map_err(|_| {
                    VerifyError::invalid("binding.id", "unix_user binding needs a numeric uid")
                })?;
            }
            BindingKind::LibvirtDomain => {
                if self.id.contains('/') {
                    return Err(VerifyError::invalid("binding.id", "libvirt domain must not contain '/'"));
                }
            }
            BindingKind::Host => {}
        }
        if let Some(host) = &self.host_id {
            check_id("binding.host_id", host)?;
        }
        Ok(())
    }
}

impl AttestationClaims {
    /// Every country connected to the tenant, with the role it plays.
    pub fn countries_by_role(&self) -> impl Iterator<Item = (Role, CountryCode)> + '_ {
        let customer = self.subject.countries.iter().map(|c| (Role::Customer, *c));
        let owners = self
            .beneficial_owners
            .iter()
            .flat_map(|o| o.countries.iter().map(|c| (Role::BeneficialOwner, *c)));
        let resellers = self.resellers.iter().map(|r| (Role::Reseller, r.country));
        let payment = self.payment_source_country.iter().map(|c| (Role::PaymentSource, *c));
        customer.chain(owners).chain(resellers).chain(payment)
    }
}

impl TokenClaims for AttestationClaims {
    const TOKEN_TYPE: TokenType = TokenType::Attestation;
    const REQUIRED_CLAIMS: &'static [&'static str] =
        &["iss", "sub", "jti", "iat", "exp", "kyc", "subject", "binding", "foreign_person"];

    fn validate(&self) -> Result<(), VerifyError> {
        check_id("iss", &self.iss)?;
        check_id("sub", &self.sub)?;
        check_id("jti", &self.jti)?;
        if self.iat >= self.exp {
            return Err(VerifyError::invalid("exp", "must be after iat"));
        }
        check_text("subject.legal_name", &self.subject.legal_name)?;
        if self.subject.legal_name.trim().is_empty() {
            return Err(VerifyError::invalid("subject.legal_name", "must not be empty"));
        }
        if self.subject.countries.is_empty() {
            return Err(VerifyError::invalid("subject.countries", "must name at least one country"));
        }
        if let Some(method) = &self.kyc.method {
            check_text("kyc.method", method)?;
        }
        for (i, owner) in self.beneficial_owners.iter().enumerate() {
            check_text(&format!("beneficial_owners[{i}].name"), &owner.name)?;
            if owner.countries.is_empty() {
                return Err(VerifyError::invalid(
                    format!("beneficial_owners[{i}].countries"),
                    "must name at least one country",
                ));
            }
        }
        for (i, reseller) in self.resellers.iter().enumerate() {
            check_text(&format!("resellers[{i}].name"), &reseller.name)?;
        }
        self.binding.validate()
    }
}

// ---------------------------------------------------------------------------------------------
// Policy

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
        self.thresholds.validate()
    }
}

// ---------------------------------------------------------------------------------------------
// Host statement

/// A verdict, as reported to collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Allowed under conditions.
    Condition,
    /// Denied.
    Deny,
}

/// A host's signed answer to a collector poll (`typ: kyc-host-statement+jwt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatementClaims {
    /// The host id (also the issuer).
    pub iss: String,
    /// Issued at (the host's clock).
    pub iat: NumericDate,
    /// Expiry (short: a statement is a point-in-time answer).
    pub exp: NumericDate,
    /// The collector's nonce, echoed.
    pub nonce: String,
    /// Agent version.
    pub agent_version: String,
    /// Version of the policy in force, if any.
    #[serde(default)]
    pub policy_version: Option<u64>,
    /// Each workload and its verdict.
    pub workloads: Vec<WorkloadStatement>,
    /// GPU inventory.
    #[serde(default)]
    pub gpus: Vec<GpuInventoryEntry>,
}

/// One workload in a host statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatement {
    /// Workload id (`kind:id`).
    pub workload: String,
    /// Tenant, if attested.
    #[serde(default)]
    pub tenant: Option<String>,
    /// SHA-256 (hex) of the attestation token in force.
    #[serde(default)]
    pub attestation_digest: Option<String>,
    /// Expiry of that attestation.
    #[serde(default)]
    pub attestation_exp: Option<NumericDate>,
    /// Verdict.
    pub verdict: Verdict,
    /// Conditions, when the verdict is `condition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Conditions>,
    /// Who the attested tenant is, from the attestation in force: what the collector needs
    /// for findings and regulatory exports (the agent never logs it at info level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<StatementSubject>,
}

/// The identity of an attested tenant, as a host statement carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementSubject {
    /// Verified legal name.
    pub legal_name: String,
    /// The subject's countries (incorporation, residence, nationality).
    #[serde(default)]
    pub countries: Vec<CountryCode>,
    /// Countries of the beneficial owners.
    #[serde(default)]
    pub beneficial_owner_countries: Vec<CountryCode>,
    /// Countries of the resellers in the lessee chain.
    #[serde(default)]
    pub reseller_countries: Vec<CountryCode>,
    /// Country of the payment source.
    #[serde(default)]
    pub payment_source_country: Option<CountryCode>,
    /// Whether the attestation marks the tenant a foreign person.
    pub foreign_person: bool,
}

/// One GPU in a host statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInventoryEntry {
    /// NVML UUID.
    pub uuid: String,
    /// NVML name.
    pub name: String,
}

impl TokenClaims for HostStatementClaims {
    const TOKEN_TYPE: TokenType = TokenType::HostStatement;
    const REQUIRED_CLAIMS: &'static [&'static str] =
        &["iss", "iat", "exp", "nonce", "agent_version", "workloads"];

    fn validate(&self) -> Result<(), VerifyError> {
        check_id("iss", &self.iss)?;
        check_id("nonce", &self.nonce)?;
        check_id("agent_version", &self.agent_version)
    }
}

// ---------------------------------------------------------------------------------------------
// Usage reporting

/// How a window's operations were estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimationMethod {
    /// GPM tensor-pipe activity × peak tensor FLOP/s (Hopper+).
    GpmTensor,
    /// SM utilisation × peak tensor FLOP/s: an upper bound.
    UtilizationUpperBound,
    /// Some GPU in the window has no known peak FLOP/s, or neither GPM nor utilization could
    /// be read for it (e.g. MIG without GPM): `estimated_ops` counts only what could be
    /// estimated, so it is a lower bound.
    Unknown,
}

/// GPU usage of one (tenant, workload) over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageWindow {
    /// Tenant (`sub`), or absent for unattributed usage.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Workload id (`kind:id`).
    pub workload: String,
    /// Whether the tenant is a foreign person (from its attestation).
    #[serde(default)]
    pub foreign_person: bool,
    /// Window start.
    pub start: NumericDate,
    /// Window end (exclusive).
    pub end: NumericDate,
    /// GPU-seconds of use.
    pub gpu_seconds: f64,
    /// Distinct GPUs used.
    pub gpus: u32,
    /// Most GPUs used at the same time (one sample) within the window.
    #[serde(default)]
    pub max_concurrent_gpus: u32,
    /// Estimated operations.
    pub estimated_ops: f64,
    /// Peak FLOP/s capacity of the GPUs used (for cluster-capacity aggregation).
    pub peak_flops: f64,
    /// How operations were estimated.
    pub method: EstimationMethod,
    /// The agent's local training heuristic fired in this window (enough GPUs busy enough for
    /// long enough); a hint for the collector, which decides findings from the totals.
    #[serde(default)]
    pub training_like: bool,
    /// How many original windows were merged into this one (1 unless the spool neared its cap).
    #[serde(default = "one")]
    pub merged_windows: u32,
}

fn one() -> u32 {
    1
}

/// One spooled record: a usage window and its sequence number on its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Strictly increasing per host, never reused; ingest is idempotent on (host_id, seq).
    pub seq: u64,
    /// For a record merged from several spooled windows (the spool near its size cap): it
    /// stands for every sequence number `seq..=last_seq`, which the collector counts as
    /// received. Absent for an ordinary record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// The window.
    pub window: UsageWindow,
}

/// The collector's answer to `POST /v1/reports` (200): every record of the host with
/// `seq <= acked_seq` is stored (sequence numbers start at 1; 0 = none yet). The agent
/// advances its durable cursor to it, and only then deletes spooled records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportAck {
    /// Highest contiguous stored sequence number of the host.
    pub acked_seq: u64,
}

/// A batch of records uploaded to `POST /v1/reports`: the request body is this JSON,
/// gzip-compressed (`Content-Encoding: gzip`), and `X-Kycd-Signature` carries a detached
/// JWS over the exact body bytes (`typ` [`crate::REPORT_SIGNATURE_TYP`], `kid` = the
/// host id), signed with the host's Ed25519 key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportBatch {
    /// Reporting host.
    pub host_id: String,
    /// When the batch was sent.
    pub sent_at: NumericDate,
    /// Records in increasing `seq` order.
    pub records: Vec<UsageRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_must_be_normalised_and_absolute() {
        for ok in ["/", "/machine.slice", "/kubepods.slice/pod-1.slice/cri-abc.scope"] {
            check_cgroup_path("c", ok).unwrap();
        }
        for bad in ["", "machine.slice", "/a//b", "/a/../b", "/..", "/a/.", "/a/"] {
            assert!(check_cgroup_path("c", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conditions_merge_keeps_the_stricter() {
        let mut a = Conditions { max_gpus: Some(8), ..Default::default() };
        a.merge(&Conditions { max_gpus: Some(2), no_gpu: true, ..Default::default() });
        assert_eq!(a.max_gpus, Some(2));
        assert!(a.no_gpu);
        a.merge(&Conditions { network: Some(NetworkCondition::DenyEgress), ..Default::default() });
        assert_eq!(a.network, Some(NetworkCondition::DenyEgress));
        assert_eq!(a.max_gpus, Some(2));
    }

    #[test]
    fn usage_window_new_fields_default_for_old_senders() {
        let old = serde_json::json!({
            "tenant": "t", "workload": "host:host", "start": 0, "end": 60, "gpu_seconds": 60.0,
            "gpus": 1, "estimated_ops": 1.0, "peak_flops": 1.0, "method": "gpm_tensor"
        });
        let w: UsageWindow = serde_json::from_value(old).unwrap();
        assert_eq!((w.max_concurrent_gpus, w.training_like, w.merged_windows), (0, false, 1));
        let wire = serde_json::to_value(EstimationMethod::Unknown).unwrap();
        assert_eq!(wire, serde_json::json!("unknown"));
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

    #[test]
    fn attestation_countries_by_role_cover_the_chain() {
        let a: AttestationClaims = serde_json::from_value(serde_json::json!({
            "iss": "i", "sub": "t", "jti": "j", "iat": 1, "exp": 2,
            "kyc": {"status": "verified"},
            "subject": {"kind": "organization", "legal_name": "X", "countries": ["DE"]},
            "beneficial_owners": [{"name": "O", "countries": ["FR", "IT"]}],
            "resellers": [{"name": "R", "country": "NL"}],
            "payment_source_country": "CH",
            "binding": {"kind": "host", "id": "h"},
            "foreign_person": true,
            "some_future_field": {"ignored": true}
        }))
        .unwrap();
        let got: Vec<_> = a.countries_by_role().map(|(r, c)| (r, c.to_string())).collect();
        assert_eq!(
            got,
            [
                (Role::Customer, "DE".to_string()),
                (Role::BeneficialOwner, "FR".into()),
                (Role::BeneficialOwner, "IT".into()),
                (Role::Reseller, "NL".into()),
                (Role::PaymentSource, "CH".into()),
            ]
        );
    }
}
