//! Tenant attestations (`typ: kyc-attestation+jwt`): who the tenant is, how it was
//! verified, and which workloads the attestation binds. Unknown fields are ignored, unknown
//! enum values refused (see the parent module).

use serde::{Deserialize, Serialize};

use super::{check_id, check_text, NumericDate, Role, TokenClaims, TokenType};
use crate::{CountryCode, VerifyError};

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
    /// What the customer declared the compute is for. `biological_sequence_data` makes the
    /// policy's `bio_training_ops` the reporting threshold of its training runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<Purpose>,
}

/// A declared purpose of the compute. Unknown values are errors (fail closed: a purpose the
/// agent cannot read might be the one that lowers a threshold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Training on primarily biological sequence data (the 10^23 threshold).
    BiologicalSequenceData,
    /// Training AI models on other data.
    ModelTraining,
    /// Inference or fine-tuning of existing models.
    Inference,
    /// Anything else (rendering, simulation, …).
    Other,
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
