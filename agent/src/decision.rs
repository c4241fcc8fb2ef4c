//! The decision engine: given one workload, its (already verified) attestation and the
//! (already verified) jurisdiction policy, decide `allow`, `condition` or `deny`, say why, and
//! say when the answer could next change on its own.
//!
//! This module owns *only* the rules. It is a pure function: no I/O, no clock (the caller passes
//! `now`), no logging. Verifying signatures, binding attestations to workloads, anti-rollback,
//! enforcement and the audit log live elsewhere; what comes back here is a [`Decision`] that
//! the audit log records as JSON and the enforcers act on.
//!
//! Precedence (deny beats condition beats allow), evaluated in this order:
//! 1. **Policy.** No usable policy fails closed: none loaded → `no_policy`, expired
//!    (`now - skew >= exp`) → `policy_expired`, not yet valid (`nbf > now + skew`) →
//!    `policy_not_yet_valid`. The attestation is not evaluated further.
//! 2. **Rejected KYC** → deny (`kyc_rejected`), whatever the attestation's validity window and
//!    whatever the policy's `unverified` rule says: there is no grace for a rejection.
//! 3. **Unverified** (no attestation, expired, not yet valid, or KYC pending) → the policy's
//!    `unverified` rule: deny, allow, or allow during a grace period counted from when the agent
//!    first saw the workload. Measures are not evaluated: the attestation's data is not verified.
//! 4. **Verified** → every measure in effect is evaluated; any matching `prohibit` denies, any
//!    matching `condition` adds its conditions (merged, stricter wins); nothing matching allows.
//!    A measure reaches only the parties its `applies_to` names: with `foreign_persons` (the
//!    default) a match through `customer`, `beneficial_owner` or `payment_source` counts only
//!    for a foreign customer, and one through `reseller` only for a reseller not known to be a
//!    U.S. person. A measure that matched only parties it does not reach leaves a
//!    `measure_not_applicable` reason (no effect on the verdict), so the audit log shows why a
//!    listed country did not deny.
//!
//! Every applicable reason is collected (not just the first), and reasons are sorted so the
//! same input always yields the same, byte-identical decision. Reason details never contain
//! legal names (customer, owner or reseller): names are not logged at info level.

use kycd_protocol::{
    AttestationClaims, Conditions, ForeignStatus, KycStatus, Measure, MeasureAction, PolicyClaims, Role,
    UnverifiedHandling, Verdict,
};
use serde::{Deserialize, Serialize};

use crate::discovery::workload::WorkloadId;

/// Everything a decision depends on. The caller has verified both tokens' signatures; the
/// engine re-checks their validity windows against `now` because decisions are re-made over
/// time (see [`Decision::next_review_at`]).
#[derive(Debug, Clone, Copy)]
pub struct DecisionInput<'a> {
    /// The workload being decided on.
    pub workload: &'a WorkloadId,
    /// When the agent first saw the workload (seconds since the epoch); a grace period for
    /// unverified workloads starts here.
    pub first_seen: i64,
    /// The workload's attestation, signature-verified and bound to this workload. One whose
    /// binding names another workload is ignored (`attestation_binding_mismatch`).
    pub attestation: Option<&'a AttestationClaims>,
    /// The policy in force, verified; `None` when no policy is loaded (which denies).
    pub policy: Option<&'a PolicyClaims>,
    /// The current time (seconds since the epoch).
    pub now: i64,
    /// Clock-skew tolerance applied to the attestation's and the policy's `nbf`/`exp`.
    pub clock_skew_s: u64,
}

/// The outcome for one workload, as recorded in the audit log. The audit record adds the
/// workload and the time of the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// `allow`, `condition` or `deny`.
    pub verdict: Verdict,
    /// For `condition` only: the merge of the conditions of every matching condition measure.
    pub conditions: Option<Conditions>,
    /// Every applicable reason, sorted (by code, then measure id, citation and detail).
    pub reasons: Vec<Reason>,
    /// The earliest instant after `now` at which this decision could change without new input
    /// (attestation or policy expiry or start of validity, end of a grace period, a measure
    /// taking effect); `None` if it cannot. Skew is already applied: at this instant the
    /// decision *does* differ, so re-deciding then always makes progress.
    pub next_review_at: Option<i64>,
    /// Version of the policy applied; `None` when no usable policy was in force.
    pub policy_version: Option<u64>,
    /// The tenant (attestation `sub`), when an attestation for this workload was present.
    pub tenant: Option<String>,
    /// The attestation's `jti`, when an attestation for this workload was present.
    pub attestation_jti: Option<String>,
}

/// One reason for a decision.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reason {
    /// What kind of reason.
    pub code: ReasonCode,
    /// The measure, for `measure_prohibit` and `measure_condition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure_id: Option<String>,
    /// The measure's legal source, for `measure_prohibit` and `measure_condition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citation: Option<String>,
    /// Human-readable detail. Never contains a legal name, e.g. `customer country KP matched
    /// (role customer)` or `entity name matched (role beneficial_owner)`.
    pub detail: String,
}

/// Machine-readable reason codes. The declaration order is the sort order of reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The agent cannot write its audit log: deny everything until it can (set by the
    /// daemon, never by [`decide`]).
    AuditUnavailable,
    /// No policy is loaded: deny (fail closed).
    NoPolicy,
    /// The policy has expired: deny.
    PolicyExpired,
    /// The policy is not valid yet: deny, as if none were loaded.
    PolicyNotYetValid,
    /// An attestation was passed whose binding names another workload; it was ignored.
    AttestationBindingMismatch,
    /// The KYC service rejected the tenant: deny, with no grace.
    KycRejected,
    /// No attestation for the workload (unverified).
    NoAttestation,
    /// The attestation has expired (unverified).
    AttestationExpired,
    /// The attestation is not valid yet (unverified).
    AttestationNotYetValid,
    /// KYC is still pending (unverified).
    KycPending,
    /// The policy denies unverified workloads.
    UnverifiedDeny,
    /// The policy allows unverified workloads (audit only).
    UnverifiedAllow,
    /// Unverified, but within the policy's grace period: allowed until it ends.
    GraceRunning,
    /// Unverified and the grace period has ended: deny.
    GraceExpired,
    /// A prohibiting measure matches: deny.
    MeasureProhibit,
    /// A conditioning measure matches: its conditions apply.
    MeasureCondition,
    /// A measure matched only parties it does not reach (`applies_to: foreign_persons`, and
    /// the party is a U.S. person): no effect on the verdict.
    MeasureNotApplicable,
    /// Verified and no measure matches: allow.
    Allowed,
}

impl ReasonCode {
    /// The wire name (as serialized), e.g. `measure_prohibit`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::AuditUnavailable => "audit_unavailable",
            ReasonCode::NoPolicy => "no_policy",
            ReasonCode::PolicyExpired => "policy_expired",
            ReasonCode::PolicyNotYetValid => "policy_not_yet_valid",
            ReasonCode::AttestationBindingMismatch => "attestation_binding_mismatch",
            ReasonCode::KycRejected => "kyc_rejected",
            ReasonCode::NoAttestation => "no_attestation",
            ReasonCode::AttestationExpired => "attestation_expired",
            ReasonCode::AttestationNotYetValid => "attestation_not_yet_valid",
            ReasonCode::KycPending => "kyc_pending",
            ReasonCode::UnverifiedDeny => "unverified_deny",
            ReasonCode::UnverifiedAllow => "unverified_allow",
            ReasonCode::GraceRunning => "grace_running",
            ReasonCode::GraceExpired => "grace_expired",
            ReasonCode::MeasureProhibit => "measure_prohibit",
            ReasonCode::MeasureCondition => "measure_condition",
            ReasonCode::MeasureNotApplicable => "measure_not_applicable",
            ReasonCode::Allowed => "allowed",
        }
    }
}

/// Decides on one workload. Pure: the same input always gives the same [`Decision`].
pub fn decide(input: &DecisionInput<'_>) -> Decision {
    let mut acc = Acc { now: input.now, reasons: Vec::new(), next_review_at: None };
    let skew = to_i64(input.clock_skew_s);

    let attestation = match input.attestation {
        Some(a) if WorkloadId::from_binding(&a.binding) != *input.workload => {
            acc.reason(
                ReasonCode::AttestationBindingMismatch,
                format!(
                    "attestation {} is bound to {}, not to {}; ignored",
                    a.jti,
                    WorkloadId::from_binding(&a.binding),
                    input.workload
                ),
            );
            None
        }
        other => other,
    };

    let policy = usable_policy(input.policy, input.now, skew, &mut acc);
    let (verdict, conditions) = match policy {
        None => (Verdict::Deny, None),
        Some(policy) => evaluate(policy, attestation, input, skew, &mut acc),
    };

    let mut reasons = acc.reasons;
    reasons.sort();
    Decision {
        verdict,
        conditions,
        reasons,
        next_review_at: acc.next_review_at,
        policy_version: policy.map(|p| p.version),
        tenant: attestation.map(|a| a.sub.clone()),
        attestation_jti: attestation.map(|a| a.jti.clone()),
    }
}

/// Reasons and review candidates collected while deciding.
struct Acc {
    now: i64,
    reasons: Vec<Reason>,
    next_review_at: Option<i64>,
}

impl Acc {
    fn reason(&mut self, code: ReasonCode, detail: String) {
        self.reasons.push(Reason { code, measure_id: None, citation: None, detail });
    }

    fn measure_reason(&mut self, code: ReasonCode, measure: &Measure, detail: String) {
        self.reasons.push(Reason {
            code,
            measure_id: Some(measure.id.clone()),
            citation: Some(measure.citation.clone()),
            detail,
        });
    }

    /// Offers an instant at which the decision changes; only future instants count.
    fn review_at(&mut self, at: i64) {
        if at > self.now {
            self.next_review_at = Some(self.next_review_at.map_or(at, |n| n.min(at)));
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The policy if it is in force at `now`; otherwise records why not and returns `None`.
fn usable_policy<'p>(
    policy: Option<&'p PolicyClaims>,
    now: i64,
    skew: i64,
    acc: &mut Acc,
) -> Option<&'p PolicyClaims> {
    let Some(policy) = policy else {
        acc.reason(ReasonCode::NoPolicy, "no verified policy is loaded; failing closed".into());
        return None;
    };
    let expires_at = policy.exp.saturating_add(skew);
    let expired = now >= expires_at;
    if expired {
        acc.reason(
            ReasonCode::PolicyExpired,
            format!("policy version {} expired at {} (skew {skew} s)", policy.version, policy.exp),
        );
    }
    let mut not_yet_valid = false;
    if let Some(nbf) = policy.nbf {
        let valid_from = nbf.saturating_sub(skew);
        if now < valid_from {
            not_yet_valid = true;
            acc.reason(
                ReasonCode::PolicyNotYetValid,
                format!("policy version {} is not valid before {nbf} (skew {skew} s)", policy.version),
            );
            if !expired {
                acc.review_at(valid_from);
            }
        }
    }
    if expired || not_yet_valid {
        return None;
    }
    acc.review_at(expires_at);
    Some(policy)
}

/// Steps 2–4 of the precedence, under a policy in force.
fn evaluate(
    policy: &PolicyClaims,
    attestation: Option<&AttestationClaims>,
    input: &DecisionInput<'_>,
    skew: i64,
    acc: &mut Acc,
) -> (Verdict, Option<Conditions>) {
    let now = input.now;
    let Some(a) = attestation else {
        acc.reason(ReasonCode::NoAttestation, format!("no attestation for workload {}", input.workload));
        return (unverified(policy, input.first_seen, acc), None);
    };

    if a.kyc.status == KycStatus::Rejected {
        acc.reason(ReasonCode::KycRejected, format!("attestation {}: KYC status rejected", a.jti));
        return (Verdict::Deny, None);
    }

    let mut is_unverified = false;
    let expires_at = a.exp.saturating_add(skew);
    if now >= expires_at {
        is_unverified = true;
        acc.reason(ReasonCode::AttestationExpired, format!("attestation {} expired at {}", a.jti, a.exp));
    } else {
        acc.review_at(expires_at);
    }
    if let Some(nbf) = a.nbf {
        let valid_from = nbf.saturating_sub(skew);
        if now < valid_from {
            is_unverified = true;
            acc.reason(
                ReasonCode::AttestationNotYetValid,
                format!("attestation {} is not valid before {nbf}", a.jti),
            );
            acc.review_at(valid_from);
        }
    }
    if a.kyc.status == KycStatus::Pending {
        is_unverified = true;
        acc.reason(ReasonCode::KycPending, format!("attestation {}: KYC status pending", a.jti));
    }
    if is_unverified {
        return (unverified(policy, input.first_seen, acc), None);
    }

    evaluate_measures(policy, a, now, acc)
}

/// Step 3: the policy's rule for workloads without a valid, verified attestation.
fn unverified(policy: &PolicyClaims, first_seen: i64, acc: &mut Acc) -> Verdict {
    match policy.unverified {
        UnverifiedHandling::Deny => {
            acc.reason(
                ReasonCode::UnverifiedDeny,
                format!("policy version {} denies unverified workloads", policy.version),
            );
            Verdict::Deny
        }
        UnverifiedHandling::Allow => {
            acc.reason(
                ReasonCode::UnverifiedAllow,
                format!("policy version {} allows unverified workloads", policy.version),
            );
            Verdict::Allow
        }
        UnverifiedHandling::Grace { grace_s } => {
            let ends_at = first_seen.saturating_add(to_i64(grace_s));
            if acc.now < ends_at {
                acc.reason(
                    ReasonCode::GraceRunning,
                    format!("grace period of {grace_s} s from first seen at {first_seen} ends at {ends_at}"),
                );
                acc.review_at(ends_at);
                Verdict::Allow
            } else {
                acc.reason(
                    ReasonCode::GraceExpired,
                    format!("grace period of {grace_s} s from first seen at {first_seen} ended at {ends_at}"),
                );
                Verdict::Deny
            }
        }
    }
}

/// Step 4: every measure in effect against a verified attestation.
fn evaluate_measures(
    policy: &PolicyClaims,
    a: &AttestationClaims,
    now: i64,
    acc: &mut Acc,
) -> (Verdict, Option<Conditions>) {
    let mut prohibited = false;
    let mut conditions: Option<Conditions> = None;
    for measure in &policy.measures {
        if let Some(from) = measure.effective_from {
            if from > now {
                acc.review_at(from);
                continue;
            }
        }
        let Matches { hits, out_of_scope } = matches(measure, a);
        if hits.is_empty() {
            if !out_of_scope.is_empty() {
                let detail =
                    format!("{}; the measure applies to foreign persons only", out_of_scope.join("; "));
                acc.measure_reason(ReasonCode::MeasureNotApplicable, measure, detail);
            }
            continue;
        }
        let detail = hits.join("; ");
        match measure.action {
            MeasureAction::Prohibit => {
                prohibited = true;
                acc.measure_reason(ReasonCode::MeasureProhibit, measure, detail);
            }
            MeasureAction::Condition => {
                let merged = conditions.get_or_insert_with(Conditions::default);
                if let Some(c) = &measure.conditions {
                    merged.merge(c);
                }
                acc.measure_reason(ReasonCode::MeasureCondition, measure, detail);
            }
        }
    }
    if prohibited {
        (Verdict::Deny, None)
    } else if let Some(conditions) = conditions {
        (Verdict::Condition, Some(conditions))
    } else {
        acc.reason(ReasonCode::Allowed, format!("no measure of policy version {} matches", policy.version));
        (Verdict::Allow, None)
    }
}

/// How a measure matches an attestation: one privacy-safe line per distinct hit, in
/// attestation order.
#[derive(Debug, Default)]
struct Matches {
    /// Hits on parties the measure reaches; empty if it does not match.
    hits: Vec<String>,
    /// Hits on parties outside its `applies_to` (U.S. persons under `foreign_persons`), each
    /// saying whose status kept it out.
    out_of_scope: Vec<String>,
}

impl Matches {
    fn add(&mut self, reaches: bool, line: String) {
        let list = if reaches { &mut self.hits } else { &mut self.out_of_scope };
        if !list.contains(&line) {
            list.push(line);
        }
    }
}

fn matches(measure: &Measure, a: &AttestationClaims) -> Matches {
    let m = &measure.matcher;
    let has_role = |r: Role| measure.roles.contains(&r);
    let customer = a.foreign_status();
    let mut out = Matches::default();
    // Whether the measure reaches a hit, and the line that says so.
    let mut hit = |status: ForeignStatus, whose: &str, line: String| {
        let reaches = measure.reaches(status);
        let line = if reaches { line } else { format!("{line}, but the {whose} is a U.S. person") };
        out.add(reaches, line);
    };

    // `countries_by_role` lists resellers' countries in chain order: pair them with their flags.
    let mut resellers = a.resellers.iter();
    for (role, country) in a.countries_by_role() {
        let (status, whose) = match role {
            Role::Reseller => {
                (resellers.next().map_or(ForeignStatus::Unknown, |r| r.foreign_status()), "reseller")
            }
            _ => (customer, "customer"),
        };
        if has_role(role) && m.countries.contains(&country) {
            let line = format!("{} country {country} matched (role {})", role_label(role), role_name(role));
            hit(status, whose, line);
        }
    }
    if has_role(Role::Customer) && m.tenants.contains(&a.sub) {
        hit(customer, "customer", format!("tenant {} matched (role customer)", a.sub));
    }
    if !m.entities.is_empty() {
        let names = std::iter::once((Role::Customer, a.subject.legal_name.as_str(), customer))
            .chain(a.beneficial_owners.iter().map(|o| (Role::BeneficialOwner, o.name.as_str(), customer)))
            .chain(a.resellers.iter().map(|r| (Role::Reseller, r.name.as_str(), r.foreign_status())));
        for (role, name, status) in names {
            let name = normalize_entity(name);
            if has_role(role) && !name.is_empty() && m.entities.iter().any(|e| normalize_entity(e) == name) {
                let whose = if role == Role::Reseller { "reseller" } else { "customer" };
                hit(status, whose, format!("entity name matched (role {})", role_name(role)));
            }
        }
    }
    out
}

/// An entity name as compared: case-folded, whitespace runs collapsed to one space, trimmed.
/// Sanctions lists and KYC records disagree on case and spacing; a prohibition must not be
/// dodged by typing the name in capitals.
fn normalize_entity(name: &str) -> String {
    name.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// The role's wire name.
fn role_name(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::BeneficialOwner => "beneficial_owner",
        Role::Reseller => "reseller",
        Role::PaymentSource => "payment_source",
    }
}

/// The role in prose.
fn role_label(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::BeneficialOwner => "beneficial owner",
        Role::Reseller => "reseller",
        Role::PaymentSource => "payment source",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::workload::WorkloadKind;
    use serde_json::{json, Value};
    use ReasonCode::*;

    const NOW: i64 = 1_800_000_000;
    const SKEW: u64 = 60;
    const S: i64 = SKEW as i64;
    const ATT_EXP: i64 = NOW + 3_600;
    const POL_EXP: i64 = NOW + 86_400;
    const LEGAL: &str = "Acme Rocket Works GmbH";
    const OWNER: &str = "Jane Q Owner";
    const RESELLER: &str = "Resell Partners BV";

    fn attestation() -> Value {
        json!({
            "iss": "kyc.example", "sub": "tenant-42", "jti": "att-1",
            "iat": NOW - 1_000, "exp": ATT_EXP,
            "kyc": {"status": "verified", "verified_at": NOW - 2_000, "method": "document+liveness"},
            "subject": {"kind": "organization", "legal_name": LEGAL, "countries": ["DE"]},
            "beneficial_owners": [{"name": OWNER, "countries": ["FR"]}],
            "resellers": [{"name": RESELLER, "country": "NL"}],
            "payment_source_country": "CH",
            "binding": {"kind": "libvirt_domain", "id": "vm-1"},
            "foreign_person": true
        })
    }

    fn policy() -> Value {
        json!({
            "iss": "policy-authority", "iat": NOW - 1_000, "exp": POL_EXP, "version": 7,
            "measures": [],
            "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01}
        })
    }

    /// A prohibiting measure on `countries` in `roles`.
    fn prohibit(id: &str, countries: &[&str], roles: &[&str]) -> Value {
        json!({"id": id, "match": {"countries": countries}, "roles": roles, "action": "prohibit",
               "citation": format!("89 FR 5698 §{id}")})
    }

    /// A prohibiting measure with an arbitrary `match`.
    fn prohibit_match(id: &str, matcher: Value, roles: &[&str]) -> Value {
        json!({"id": id, "match": matcher, "roles": roles, "action": "prohibit",
               "citation": format!("89 FR 5698 §{id}")})
    }

    /// A conditioning measure on `countries` in `roles`.
    fn condition(id: &str, countries: &[&str], roles: &[&str], conditions: Value) -> Value {
        json!({"id": id, "match": {"countries": countries}, "roles": roles, "action": "condition",
               "conditions": conditions, "citation": format!("EO 13984 §{id}")})
    }

    fn effective_from(mut measure: Value, at: i64) -> Value {
        measure["effective_from"] = json!(at);
        measure
    }

    /// The input builder: owned JSON claims, edited fluently, parsed at `run`.
    #[derive(Clone)]
    struct Scenario {
        workload: WorkloadId,
        first_seen: i64,
        attestation: Option<Value>,
        policy: Option<Value>,
        now: i64,
        skew: u64,
    }

    fn set(mut v: &mut Value, path: &[&str], value: Value) {
        for k in path {
            v = &mut v[*k];
        }
        *v = value;
    }

    impl Scenario {
        /// Verified attestation for `libvirt_domain:vm-1`, policy v7 with no measures and
        /// `unverified: deny`, first seen 10 s ago.
        fn base() -> Self {
            Scenario {
                workload: WorkloadId { kind: WorkloadKind::LibvirtDomain, id: "vm-1".into() },
                first_seen: NOW - 10,
                attestation: Some(attestation()),
                policy: Some(policy()),
                now: NOW,
                skew: SKEW,
            }
        }
        fn measures(self, measures: Vec<Value>) -> Self {
            self.pol(&["measures"], Value::Array(measures))
        }
        fn unverified(self, rule: Value) -> Self {
            self.pol(&["unverified"], rule)
        }
        fn grace(self, grace_s: u64) -> Self {
            self.unverified(json!({"action": "grace", "grace_s": grace_s}))
        }
        fn att(mut self, path: &[&str], value: Value) -> Self {
            set(self.attestation.as_mut().unwrap(), path, value);
            self
        }
        fn pol(mut self, path: &[&str], value: Value) -> Self {
            set(self.policy.as_mut().unwrap(), path, value);
            self
        }
        fn no_attestation(mut self) -> Self {
            self.attestation = None;
            self
        }
        fn no_policy(mut self) -> Self {
            self.policy = None;
            self
        }
        fn now(mut self, now: i64) -> Self {
            self.now = now;
            self
        }
        fn first_seen(mut self, t: i64) -> Self {
            self.first_seen = t;
            self
        }
        fn workload(mut self, w: &str) -> Self {
            self.workload = w.parse().unwrap();
            self
        }
        fn run(&self) -> Decision {
            let a: Option<AttestationClaims> =
                self.attestation.clone().map(|v| serde_json::from_value(v).unwrap());
            let p: Option<PolicyClaims> = self.policy.clone().map(|v| serde_json::from_value(v).unwrap());
            decide(&DecisionInput {
                workload: &self.workload,
                first_seen: self.first_seen,
                attestation: a.as_ref(),
                policy: p.as_ref(),
                now: self.now,
                clock_skew_s: self.skew,
            })
        }
    }

    struct Case {
        name: &'static str,
        input: Scenario,
        verdict: Verdict,
        codes: &'static [ReasonCode],
        next_review_at: Option<i64>,
        /// Expected `conditions` (JSON), checked only for `condition` verdicts.
        conditions: Option<Value>,
    }

    fn case(
        name: &'static str,
        input: Scenario,
        verdict: Verdict,
        codes: &'static [ReasonCode],
        next_review_at: Option<i64>,
    ) -> Case {
        Case { name, input, verdict, codes, next_review_at, conditions: None }
    }

    fn cases() -> Vec<Case> {
        use Verdict::{Allow, Condition, Deny};
        let base = Scenario::base;
        let att_next = Some(ATT_EXP + S);
        let max2 = json!({"max_gpus": 2});
        vec![
            // --- policy (rule 1)
            case("no_policy", base().no_policy(), Deny, &[NoPolicy], None),
            case("no_policy_no_attestation", base().no_policy().no_attestation(), Deny, &[NoPolicy], None),
            case("policy_expired_at_skew_boundary", base().now(POL_EXP + S), Deny, &[PolicyExpired], None),
            case(
                "policy_within_skew_applies",
                base().now(POL_EXP + S - 1).att(&["exp"], json!(POL_EXP + 500)),
                Allow,
                &[Allowed],
                Some(POL_EXP + S),
            ),
            case(
                "policy_not_yet_valid",
                base().pol(&["nbf"], json!(NOW + 1_000)),
                Deny,
                &[PolicyNotYetValid],
                Some(NOW + 1_000 - S),
            ),
            case(
                "policy_nbf_within_skew_applies",
                base().pol(&["nbf"], json!(NOW + S)),
                Allow,
                &[Allowed],
                att_next,
            ),
            // --- rejected (rule 2)
            case(
                "kyc_rejected_denies",
                base().att(&["kyc", "status"], json!("rejected")),
                Deny,
                &[KycRejected],
                Some(POL_EXP + S),
            ),
            case(
                "kyc_rejected_no_grace",
                base().att(&["kyc", "status"], json!("rejected")).grace(86_400),
                Deny,
                &[KycRejected],
                Some(POL_EXP + S),
            ),
            case(
                "kyc_rejected_even_when_expired",
                base()
                    .att(&["kyc", "status"], json!("rejected"))
                    .unverified(json!({"action": "allow"}))
                    .now(ATT_EXP + S),
                Deny,
                &[KycRejected],
                Some(POL_EXP + S),
            ),
            // --- unverified (rule 3)
            case(
                "unknown_workload_unverified_deny",
                base().no_attestation(),
                Deny,
                &[NoAttestation, UnverifiedDeny],
                Some(POL_EXP + S),
            ),
            case(
                "unknown_workload_unverified_allow",
                base().no_attestation().unverified(json!({"action": "allow"})),
                Allow,
                &[NoAttestation, UnverifiedAllow],
                Some(POL_EXP + S),
            ),
            case(
                "unverified_skips_matching_measures",
                base().no_attestation().unverified(json!({"action": "allow"})).measures(vec![prohibit(
                    "all",
                    &["DE", "FR", "NL", "CH"],
                    &["customer", "beneficial_owner", "reseller", "payment_source"],
                )]),
                Allow,
                &[NoAttestation, UnverifiedAllow],
                Some(POL_EXP + S),
            ),
            case(
                "grace_running",
                base().no_attestation().grace(3_600),
                Allow,
                &[NoAttestation, GraceRunning],
                Some(NOW - 10 + 3_600),
            ),
            case(
                "grace_last_second_running",
                base().no_attestation().grace(3_600).first_seen(NOW - 3_599),
                Allow,
                &[NoAttestation, GraceRunning],
                Some(NOW + 1),
            ),
            case(
                "grace_expired_at_boundary",
                base().no_attestation().grace(3_600).first_seen(NOW - 3_600),
                Deny,
                &[NoAttestation, GraceExpired],
                Some(POL_EXP + S),
            ),
            case(
                "kyc_pending_grace_running_skips_measures",
                base().att(&["kyc", "status"], json!("pending")).grace(600).measures(vec![prohibit(
                    "de",
                    &["DE"],
                    &["customer"],
                )]),
                Allow,
                &[KycPending, GraceRunning],
                Some(NOW - 10 + 600),
            ),
            case(
                "kyc_pending_unverified_deny",
                base().att(&["kyc", "status"], json!("pending")),
                Deny,
                &[KycPending, UnverifiedDeny],
                att_next,
            ),
            case(
                "attestation_expired_at_skew_boundary",
                base().now(ATT_EXP + S),
                Deny,
                &[AttestationExpired, UnverifiedDeny],
                Some(POL_EXP + S),
            ),
            case(
                "attestation_within_skew_is_valid",
                base().now(ATT_EXP + S - 1),
                Allow,
                &[Allowed],
                Some(ATT_EXP + S),
            ),
            case(
                "attestation_expired_grace_expired",
                base().now(ATT_EXP + S).grace(3_600),
                Deny,
                &[AttestationExpired, GraceExpired],
                Some(POL_EXP + S),
            ),
            case(
                "attestation_expired_and_pending",
                base().now(ATT_EXP + S).att(&["kyc", "status"], json!("pending")),
                Deny,
                &[AttestationExpired, KycPending, UnverifiedDeny],
                Some(POL_EXP + S),
            ),
            case(
                "attestation_not_yet_valid",
                base().att(&["nbf"], json!(NOW + S + 1)),
                Deny,
                &[AttestationNotYetValid, UnverifiedDeny],
                Some(NOW + 1),
            ),
            case(
                "attestation_nbf_within_skew_is_valid",
                base().att(&["nbf"], json!(NOW + S)),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "binding_mismatch_is_unverified",
                base().workload("libvirt_domain:vm-2"),
                Deny,
                &[AttestationBindingMismatch, NoAttestation, UnverifiedDeny],
                Some(POL_EXP + S),
            ),
            // --- verified: roles (rule 4)
            case("verified_no_measures_allows", base(), Allow, &[Allowed], att_next),
            case(
                "customer_country_matches",
                base().measures(vec![prohibit("m", &["DE"], &["customer"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "customer_country_other_allows",
                base().measures(vec![prohibit("m", &["KP"], &["customer"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "beneficial_owner_country_matches",
                base().measures(vec![prohibit("m", &["FR"], &["beneficial_owner"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "beneficial_owner_country_other_allows",
                base().measures(vec![prohibit("m", &["KP"], &["beneficial_owner"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "reseller_country_matches",
                base().measures(vec![prohibit("m", &["NL"], &["reseller"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "reseller_country_other_allows",
                base().measures(vec![prohibit("m", &["KP"], &["reseller"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "payment_source_country_matches",
                base().measures(vec![prohibit("m", &["CH"], &["payment_source"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "payment_source_country_other_allows",
                base().measures(vec![prohibit("m", &["KP"], &["payment_source"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "payment_source_absent_allows",
                base().att(&["payment_source_country"], Value::Null).measures(vec![prohibit(
                    "m",
                    &["CH"],
                    &["payment_source"],
                )]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "role_not_in_measure_roles_does_not_match",
                base().measures(vec![prohibit("m", &["FR", "NL", "CH"], &["customer"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            // --- verified: actions, merge, precedence
            Case {
                conditions: Some(json!({"max_gpus": 2})),
                ..case(
                    "condition_measure",
                    base().measures(vec![condition("c", &["DE"], &["customer"], max2.clone())]),
                    Condition,
                    &[MeasureCondition],
                    att_next,
                )
            },
            Case {
                conditions: Some(
                    json!({"max_gpus": 2, "no_gpu": false, "report_all_usage": true, "network": "deny_egress"}),
                ),
                ..case(
                    "two_conditions_merge_stricter_wins",
                    base().measures(vec![
                        condition(
                            "c1",
                            &["DE"],
                            &["customer"],
                            json!({"max_gpus": 8, "report_all_usage": true}),
                        ),
                        condition(
                            "c2",
                            &["FR"],
                            &["beneficial_owner"],
                            json!({"max_gpus": 2, "network": "deny_egress"}),
                        ),
                    ]),
                    Condition,
                    &[MeasureCondition, MeasureCondition],
                    att_next,
                )
            },
            case(
                "deny_beats_condition",
                base().measures(vec![
                    condition("c", &["DE"], &["customer"], max2.clone()),
                    prohibit("p", &["NL"], &["reseller"]),
                ]),
                Deny,
                &[MeasureProhibit, MeasureCondition],
                att_next,
            ),
            case(
                "multiple_measures_all_reported",
                base().measures(vec![
                    prohibit("p1", &["DE"], &["customer"]),
                    prohibit("p2", &["CH"], &["payment_source"]),
                    prohibit("p3", &["KP"], &["customer"]),
                    condition("c1", &["FR"], &["beneficial_owner"], max2.clone()),
                ]),
                Deny,
                &[MeasureProhibit, MeasureProhibit, MeasureCondition],
                att_next,
            ),
            // --- verified: effective_from
            case(
                "measure_not_yet_effective_skipped",
                base().measures(vec![effective_from(prohibit("m", &["DE"], &["customer"]), NOW + 100)]),
                Allow,
                &[Allowed],
                Some(NOW + 100),
            ),
            case(
                "measure_effective_exactly_now_applies",
                base().measures(vec![effective_from(prohibit("m", &["DE"], &["customer"]), NOW)]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "measure_effective_in_past_applies",
                base().measures(vec![effective_from(prohibit("m", &["DE"], &["customer"]), NOW - 1)]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            // --- verified: tenants and entities
            case(
                "tenant_match",
                base().measures(vec![prohibit_match("t", json!({"tenants": ["tenant-42"]}), &["customer"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "tenant_other_allows",
                base().measures(vec![prohibit_match("t", json!({"tenants": ["tenant-43"]}), &["customer"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "tenant_match_needs_customer_role",
                base().measures(vec![prohibit_match("t", json!({"tenants": ["tenant-42"]}), &["reseller"])]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "entity_legal_name_matches",
                base().measures(vec![prohibit_match("e", json!({"entities": [LEGAL]}), &["customer"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "entity_match_is_trimmed",
                base().measures(vec![prohibit_match(
                    "e",
                    json!({"entities": [format!("  {LEGAL} ")]}),
                    &["customer"],
                )]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "entity_match_ignores_case_and_spacing",
                base().measures(vec![prohibit_match(
                    "e",
                    json!({"entities": [LEGAL.to_uppercase().replace(' ', "  \t")]}),
                    &["customer"],
                )]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "entity_different_name_does_not_match",
                base().measures(vec![prohibit_match(
                    "e",
                    json!({"entities": ["Other Corp"]}),
                    &["customer"],
                )]),
                Allow,
                &[Allowed],
                att_next,
            ),
            case(
                "entity_beneficial_owner_name_matches",
                base().measures(vec![prohibit_match(
                    "e",
                    json!({"entities": [OWNER]}),
                    &["beneficial_owner"],
                )]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "entity_reseller_name_matches",
                base().measures(vec![prohibit_match("e", json!({"entities": [RESELLER]}), &["reseller"])]),
                Deny,
                &[MeasureProhibit],
                att_next,
            ),
            case(
                "entity_owner_name_needs_owner_role",
                base().measures(vec![prohibit_match(
                    "e",
                    json!({"entities": [OWNER, RESELLER]}),
                    &["customer"],
                )]),
                Allow,
                &[Allowed],
                att_next,
            ),
            // --- next_review_at is the minimum of the candidates
            case(
                "next_review_min_is_measure",
                base().measures(vec![
                    effective_from(prohibit("a", &["KP"], &["customer"]), NOW + 500),
                    effective_from(prohibit("b", &["KP"], &["customer"]), NOW + 200),
                ]),
                Allow,
                &[Allowed],
                Some(NOW + 200),
            ),
            case(
                "next_review_min_is_attestation_exp",
                base().measures(vec![effective_from(prohibit("a", &["KP"], &["customer"]), ATT_EXP + S + 1)]),
                Allow,
                &[Allowed],
                Some(ATT_EXP + S),
            ),
            case(
                "next_review_min_is_policy_exp",
                base().pol(&["exp"], json!(NOW + 30)),
                Allow,
                &[Allowed],
                Some(NOW + 30 + S),
            ),
            case(
                "next_review_min_is_grace_end",
                base().att(&["kyc", "status"], json!("pending")).grace(120),
                Allow,
                &[KycPending, GraceRunning],
                Some(NOW - 10 + 120),
            ),
        ]
    }

    fn codes(d: &Decision) -> Vec<ReasonCode> {
        d.reasons.iter().map(|r| r.code).collect()
    }

    #[test]
    fn table() {
        let cases = cases();
        assert!(cases.len() >= 30, "{} cases", cases.len());
        let mut names = std::collections::HashSet::new();
        let mut failures = Vec::new();
        for c in &cases {
            assert!(names.insert(c.name), "duplicate case name {}", c.name);
            let d = c.input.run();
            let mut want = c.codes.to_vec();
            want.sort();
            let mut problems = Vec::new();
            if d.verdict != c.verdict {
                problems.push(format!("verdict {:?}, want {:?}", d.verdict, c.verdict));
            }
            if codes(&d) != want {
                problems.push(format!("codes {:?}, want {want:?}", codes(&d)));
            }
            if d.next_review_at != c.next_review_at {
                problems.push(format!("next_review_at {:?}, want {:?}", d.next_review_at, c.next_review_at));
            }
            // Invariants that hold for every decision.
            if (d.verdict == Verdict::Condition) != d.conditions.is_some() {
                problems.push(format!("conditions {:?} with verdict {:?}", d.conditions, d.verdict));
            }
            if let (Some(want), Some(got)) = (&c.conditions, &d.conditions) {
                let want: Conditions = serde_json::from_value(want.clone()).unwrap();
                if *got != want {
                    problems.push(format!("conditions {got:?}, want {want:?}"));
                }
            }
            if d.next_review_at.is_some_and(|t| t <= c.input.now) {
                problems.push("next_review_at not in the future".into());
            }
            if !d.reasons.windows(2).all(|w| w[0] <= w[1]) {
                problems.push("reasons not sorted".into());
            }
            let json = serde_json::to_string(&d).unwrap();
            for name in [LEGAL, OWNER, RESELLER] {
                if json.to_lowercase().contains(&name.to_lowercase()) {
                    problems.push(format!("decision JSON contains a legal name: {json}"));
                }
            }
            if c.input.run() != d {
                problems.push("not deterministic".into());
            }
            if !problems.is_empty() {
                failures.push(format!("{}: {}", c.name, problems.join("; ")));
            }
        }
        assert!(failures.is_empty(), "{} failing case(s):\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn re_deciding_at_next_review_changes_the_decision() {
        for c in cases() {
            let d = c.input.run();
            if let Some(t) = d.next_review_at {
                let later = c.input.clone().now(t).run();
                assert_ne!(later, d, "{}: nothing changed at next_review_at {t}", c.name);
                let just_before = c.input.clone().now(t - 1).run();
                assert_eq!(
                    (just_before.verdict, codes(&just_before)),
                    (d.verdict, codes(&d)),
                    "{}: changed before next_review_at",
                    c.name
                );
            }
        }
    }

    #[test]
    fn measure_reasons_carry_id_citation_and_role_detail() {
        let d = Scenario::base()
            .measures(vec![prohibit("kp", &["KP"], &["customer", "beneficial_owner"])])
            .att(&["subject", "countries"], json!(["KP", "DE"]))
            .att(
                &["beneficial_owners"],
                json!([{"name": OWNER, "countries": ["KP"]}, {"name": "B", "countries": ["KP"]}]),
            )
            .run();
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(
            d.reasons,
            [Reason {
                code: MeasureProhibit,
                measure_id: Some("kp".into()),
                citation: Some("89 FR 5698 §kp".into()),
                detail: "customer country KP matched (role customer); \
                         beneficial owner country KP matched (role beneficial_owner)"
                    .into(),
            }]
        );
        let d = Scenario::base()
            .measures(vec![prohibit_match("e", json!({"entities": [OWNER]}), &["beneficial_owner"])])
            .run();
        assert_eq!(d.reasons[0].detail, "entity name matched (role beneficial_owner)");
        let d = Scenario::base()
            .measures(vec![
                prohibit("p", &["CH"], &["payment_source"]),
                prohibit("r", &["NL"], &["reseller"]),
            ])
            .run();
        let details: Vec<_> = d.reasons.iter().map(|r| r.detail.as_str()).collect();
        assert_eq!(
            details,
            [
                "payment source country CH matched (role payment_source)",
                "reseller country NL matched (role reseller)"
            ]
        );
    }

    /// A U.S. customer whose beneficial owner is in a listed country.
    fn us_customer_with_listed_owner() -> Scenario {
        Scenario::base()
            .att(&["foreign_person"], json!(false))
            .att(&["person_status"], json!({"status": "us_person", "basis": "us_organized_entity"}))
            .att(&["beneficial_owners"], json!([{"name": OWNER, "countries": ["KP"]}]))
    }

    fn all(mut measure: Value) -> Value {
        measure["applies_to"] = json!("all");
        measure
    }

    #[test]
    fn foreign_persons_measures_skip_us_customers_and_all_measures_do_not() {
        let owner_kp = || prohibit("kp", &["KP"], &["beneficial_owner", "customer"]);
        let d = us_customer_with_listed_owner().measures(vec![owner_kp()]).run();
        assert_eq!((d.verdict, codes(&d)), (Verdict::Allow, vec![MeasureNotApplicable, Allowed]));
        assert_eq!(d.reasons[0].measure_id.as_deref(), Some("kp"));
        assert_eq!(
            d.reasons[0].detail,
            "beneficial owner country KP matched (role beneficial_owner), but the customer is a U.S. \
             person; the measure applies to foreign persons only"
        );
        assert!(!d.reasons.iter().any(|r| r.detail.contains(OWNER)), "{:?}", d.reasons);

        let d = us_customer_with_listed_owner().measures(vec![all(owner_kp())]).run();
        assert_eq!((d.verdict, codes(&d)), (Verdict::Deny, vec![MeasureProhibit]));

        // The same attestation for a foreign person is denied under the default.
        let d = us_customer_with_listed_owner()
            .att(&["foreign_person"], json!(true))
            .att(&["person_status"], json!({"status": "foreign_person", "basis": "foreign_organized_entity"}))
            .measures(vec![owner_kp()])
            .run();
        assert_eq!((d.verdict, codes(&d)), (Verdict::Deny, vec![MeasureProhibit]));

        // Conditions are scoped the same way; a tenant-id match on a U.S. customer too.
        let d = us_customer_with_listed_owner()
            .measures(vec![
                condition("c", &["KP"], &["beneficial_owner"], json!({"no_gpu": true})),
                prohibit_match("t", json!({"tenants": ["tenant-42"]}), &["customer"]),
            ])
            .run();
        assert_eq!(
            (d.verdict, codes(&d)),
            (Verdict::Allow, vec![MeasureNotApplicable, MeasureNotApplicable, Allowed])
        );
    }

    #[test]
    fn reseller_matches_follow_the_resellers_own_flag() {
        let us = || us_customer_with_listed_owner().measures(vec![prohibit("nl", &["NL"], &["reseller"])]);
        // No flag: unknown, treated as foreign (fail closed), whatever the customer is.
        assert_eq!(us().run().verdict, Verdict::Deny);
        let us_reseller = json!([{"name": RESELLER, "country": "NL", "foreign_person": false}]);
        let d = us().att(&["resellers"], us_reseller.clone()).run();
        assert_eq!((d.verdict, codes(&d)), (Verdict::Allow, vec![MeasureNotApplicable, Allowed]));
        assert!(d.reasons[0].detail.contains("but the reseller is a U.S. person"), "{:?}", d.reasons);
        // A foreign customer's U.S. reseller is still not reached through the reseller role.
        let d = Scenario::base().att(&["resellers"], us_reseller.clone());
        let d = d.measures(vec![prohibit("nl", &["NL"], &["reseller"])]).run();
        assert_eq!(d.verdict, Verdict::Allow);
        let foreign = json!([{"name": RESELLER, "country": "NL", "foreign_person": true}]);
        assert_eq!(us().att(&["resellers"], foreign).run().verdict, Verdict::Deny);
        // Entity matches on the reseller follow its flag as well.
        let by_name = prohibit_match("e", json!({"entities": [RESELLER]}), &["reseller"]);
        let d =
            us_customer_with_listed_owner().att(&["resellers"], us_reseller).measures(vec![by_name]).run();
        assert_eq!(d.verdict, Verdict::Allow);
    }

    #[test]
    fn decision_metadata() {
        let d = Scenario::base().run();
        assert_eq!(d.policy_version, Some(7));
        assert_eq!(d.tenant.as_deref(), Some("tenant-42"));
        assert_eq!(d.attestation_jti.as_deref(), Some("att-1"));
        assert!(d.reasons[0].detail.contains("policy version 7"), "{:?}", d.reasons);

        // Unverified attestations still identify the tenant for the audit log.
        let d = Scenario::base().att(&["kyc", "status"], json!("pending")).run();
        assert_eq!(d.tenant.as_deref(), Some("tenant-42"));
        assert_eq!(d.policy_version, Some(7));

        // No usable policy: no version was applied.
        let d = Scenario::base().now(POL_EXP + S).run();
        assert_eq!(d.policy_version, None);
        assert_eq!(d.tenant.as_deref(), Some("tenant-42"));

        // A mismatched binding is not this workload's tenant.
        let d = Scenario::base().workload("host:host").run();
        assert_eq!((d.tenant, d.attestation_jti), (None, None));
    }

    #[test]
    fn deterministic_regardless_of_measure_order() {
        let ms = vec![
            prohibit("p2", &["CH"], &["payment_source"]),
            condition("c1", &["FR"], &["beneficial_owner"], json!({"max_gpus": 4})),
            prohibit("p1", &["DE"], &["customer"]),
            condition("c0", &["NL"], &["reseller"], json!({"no_gpu": true})),
        ];
        let mut reversed = ms.clone();
        reversed.reverse();
        let a = Scenario::base().measures(ms).run();
        let b = Scenario::base().measures(reversed).run();
        assert_eq!(a, b);
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        let ids: Vec<_> = a.reasons.iter().map(|r| r.measure_id.as_deref().unwrap()).collect();
        assert_eq!(ids, ["p1", "p2", "c0", "c1"]);
    }

    #[test]
    fn decision_json_round_trips_with_snake_case_codes() {
        let d = Scenario::base()
            .measures(vec![condition("c", &["DE"], &["customer"], json!({"max_gpus": 2}))])
            .run();
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["verdict"], "condition");
        assert_eq!(v["conditions"], json!({"max_gpus": 2}));
        assert_eq!(v["reasons"][0]["code"], "measure_condition");
        assert_eq!(v["reasons"][0]["measure_id"], "c");
        assert_eq!(v["policy_version"], 7);
        let back: Decision = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);

        let d = Scenario::base().no_policy().run();
        let v = serde_json::to_value(&d).unwrap();
        assert!(v["reasons"][0].get("measure_id").is_none());
        assert_eq!(serde_json::from_value::<Decision>(v).unwrap(), d);
    }

    #[test]
    fn reason_code_as_str_matches_serde() {
        let all = [
            AuditUnavailable,
            NoPolicy,
            PolicyExpired,
            PolicyNotYetValid,
            AttestationBindingMismatch,
            KycRejected,
            NoAttestation,
            AttestationExpired,
            AttestationNotYetValid,
            KycPending,
            UnverifiedDeny,
            UnverifiedAllow,
            GraceRunning,
            GraceExpired,
            MeasureProhibit,
            MeasureCondition,
            MeasureNotApplicable,
            Allowed,
        ];
        for code in all {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }

    #[test]
    fn extreme_times_saturate_instead_of_overflowing() {
        let d = Scenario::base()
            .no_attestation()
            .grace(u64::MAX)
            .first_seen(i64::MAX - 5)
            .pol(&["exp"], json!(i64::MAX))
            .run();
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(d.next_review_at, Some(i64::MAX));
        let mut s = Scenario::base().att(&["nbf"], json!(i64::MIN)).now(NOW);
        s.skew = u64::MAX;
        assert_eq!(s.run().verdict, Verdict::Allow);
    }
}
