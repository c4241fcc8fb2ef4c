//! Which published prohibitions match a tenant as a host statement describes it (the
//! `enforcement_mismatch` rule's question).

use kycd_protocol::{CountryCode, ForeignStatus, MeasureAction, PolicyClaims, Role, StatementSubject};
use serde::Serialize;

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
/// owners', resellers' and payment source's countries, the customer's legal name and, from
/// newer agents, the owners' and resellers' names and the resellers' foreign flags: the same
/// facts the agent's decision engine matches on. An older agent's statement has no owner or
/// reseller names (entity measures on those roles are then the agent's alone to match).
///
/// Scoped as the agent scopes it ([`kycd_protocol::Measure::reaches`]): under
/// `applies_to: foreign_persons` a match through `customer`, `beneficial_owner` or
/// `payment_source` counts only for a foreign customer, and one through `reseller` only for
/// a reseller that is foreign or of unknown status (every reseller of an older statement).
pub fn prohibitions(
    policy: &PolicyClaims,
    tenant: &str,
    subject: &StatementSubject,
    now: i64,
) -> Vec<Prohibition> {
    let customer = ForeignStatus::from_flag(subject.foreign_person);
    let resellers = subject.reseller_statuses();
    let mut out = Vec::new();
    for measure in &policy.measures {
        if measure.action != MeasureAction::Prohibit || measure.effective_from.is_some_and(|from| from > now)
        {
            continue;
        }
        let m = &measure.matcher;
        let entity = |name: &str| {
            let name = normalize_entity(name);
            !name.is_empty() && m.entities.iter().any(|e| normalize_entity(e) == name)
        };
        let mut matched = Vec::new();
        for role in &measure.roles {
            // (country, status of the party) for each country the role brings.
            let (name, countries): (&str, Vec<(CountryCode, ForeignStatus)>) = match role {
                Role::Customer => ("customer", subject.countries.iter().map(|c| (*c, customer)).collect()),
                Role::BeneficialOwner => (
                    "beneficial_owner",
                    subject.beneficial_owner_countries.iter().map(|c| (*c, customer)).collect(),
                ),
                Role::Reseller => ("reseller", resellers.clone()),
                Role::PaymentSource => (
                    "payment_source",
                    subject.payment_source_country.iter().map(|c| (*c, customer)).collect(),
                ),
            };
            for (country, status) in countries {
                if m.countries.contains(&country) && measure.reaches(status) {
                    matched.push(format!("{name} country {country}"));
                }
            }
            let names_hit = match role {
                Role::Customer if measure.reaches(customer) => {
                    if m.tenants.iter().any(|t| t == tenant) {
                        matched.push(format!("tenant {tenant}"));
                    }
                    entity(&subject.legal_name)
                }
                Role::BeneficialOwner => {
                    measure.reaches(customer) && subject.beneficial_owners.iter().any(|o| entity(&o.name))
                }
                Role::Reseller => {
                    subject.resellers.iter().any(|r| entity(&r.name) && measure.reaches(r.foreign_status()))
                }
                _ => false,
            };
            if names_hit {
                matched.push(format!("{name} entity name"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(applies_to: Option<&str>) -> PolicyClaims {
        let mut m = json!({"id": "m-kp", "match": {"countries": ["KP"], "entities": ["Bad Reseller"]},
                           "roles": ["customer", "beneficial_owner", "reseller"], "action": "prohibit",
                           "citation": "c"});
        if let Some(a) = applies_to {
            m["applies_to"] = json!(a);
        }
        serde_json::from_value(json!({
            "iss": "a", "iat": 0, "exp": 10_000, "version": 1, "measures": [m],
            "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.5}
        }))
        .unwrap()
    }

    fn subject(json: serde_json::Value) -> StatementSubject {
        serde_json::from_value(json).unwrap()
    }

    fn matched(p: &PolicyClaims, s: &StatementSubject) -> Vec<String> {
        prohibitions(p, "t", s, 0).into_iter().flat_map(|h| h.matched).collect()
    }

    #[test]
    fn foreign_persons_measures_skip_us_customers_as_the_agent_does() {
        let us_owner_kp = |foreign: bool| {
            subject(json!({"legal_name": "A", "countries": ["US"], "beneficial_owner_countries": ["KP"],
                           "foreign_person": foreign}))
        };
        assert!(matched(&policy(None), &us_owner_kp(false)).is_empty());
        assert_eq!(matched(&policy(None), &us_owner_kp(true)), ["beneficial_owner country KP"]);
        assert_eq!(matched(&policy(Some("all")), &us_owner_kp(false)), ["beneficial_owner country KP"]);
    }

    #[test]
    fn reseller_matches_follow_the_resellers_flag_and_old_statements_fail_closed() {
        // An older agent: countries only, so every reseller is of unknown status.
        let old = subject(json!({"legal_name": "A", "countries": ["US"], "reseller_countries": ["KP"],
                                 "foreign_person": false}));
        assert_eq!(matched(&policy(None), &old), ["reseller country KP"]);
        let named = |flag: Option<bool>| {
            subject(json!({"legal_name": "A", "countries": ["US"], "reseller_countries": ["KP"],
                           "resellers": [{"name": "bad  reseller", "country": "KP", "foreign_person": flag}],
                           "foreign_person": false}))
        };
        assert!(matched(&policy(None), &named(Some(false))).is_empty());
        assert_eq!(matched(&policy(None), &named(None)), ["reseller country KP", "reseller entity name"]);
        assert_eq!(matched(&policy(Some("all")), &named(Some(false))).len(), 2);
    }
}
