//! Which published prohibitions match a tenant as a host statement describes it (the
//! `enforcement_mismatch` rule's question).

use kycd_protocol::{MeasureAction, PolicyClaims, Role, StatementSubject};
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
