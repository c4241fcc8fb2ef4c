//! Tenant attestations (`typ: kyc-attestation+jwt`): who the tenant is, how it was
//! verified, and which workloads the attestation binds. Unknown fields are ignored, unknown
//! enum values refused (see the parent module).

use serde::{Deserialize, Serialize};

use super::{check_id, check_text, ForeignStatus, NumericDate, Role, TokenClaims, TokenType};
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
    /// The customer's U.S.-person status with its basis, when the KYC service states it.
    /// Must agree with `foreign_person` (the attestation is refused otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person_status: Option<PersonStatus>,
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

/// The customer's status under EO 13984 §5 and 89 FR 5698 ("United States person": a U.S.
/// citizen, a lawful permanent resident, an entity organised under U.S. law *including its
/// foreign branches*, or any person in the United States; everyone else is foreign), with
/// the fact it rests on. Unknown values are errors (fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonStatus {
    /// U.S. or foreign person.
    pub status: PersonStatusKind,
    /// Why.
    pub basis: PersonBasis,
}

/// U.S. person or foreign person. Unknown values are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PersonStatusKind {
    /// A United States person.
    UsPerson,
    /// A foreign person.
    ForeignPerson,
}

/// The fact a [`PersonStatus`] rests on. Unknown values are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PersonBasis {
    /// U.S. citizen (individuals; U.S. person).
    Citizen,
    /// Lawful permanent resident (individuals; U.S. person).
    PermanentResident,
    /// Present in the United States (either kind; U.S. person).
    PresentInUs,
    /// Organised under the laws of the U.S. or a jurisdiction within it (organisations;
    /// U.S. person).
    UsOrganizedEntity,
    /// A foreign branch of a U.S.-organised entity (organisations; a U.S. person: the
    /// definition includes foreign branches).
    ForeignBranchOfUsEntity,
    /// Neither a citizen nor a permanent resident, and not in the U.S. (individuals;
    /// foreign person).
    ForeignNational,
    /// Organised under foreign law (organisations; foreign person).
    ForeignOrganizedEntity,
}

impl PersonBasis {
    /// The status this basis establishes.
    pub fn status(self) -> PersonStatusKind {
        match self {
            PersonBasis::Citizen
            | PersonBasis::PermanentResident
            | PersonBasis::PresentInUs
            | PersonBasis::UsOrganizedEntity
            | PersonBasis::ForeignBranchOfUsEntity => PersonStatusKind::UsPerson,
            PersonBasis::ForeignNational | PersonBasis::ForeignOrganizedEntity => {
                PersonStatusKind::ForeignPerson
            }
        }
    }

    /// The kind of subject this basis can describe; `None` for either.
    pub fn subject_kind(self) -> Option<SubjectKind> {
        match self {
            PersonBasis::Citizen | PersonBasis::PermanentResident | PersonBasis::ForeignNational => {
                Some(SubjectKind::Individual)
            }
            PersonBasis::UsOrganizedEntity
            | PersonBasis::ForeignBranchOfUsEntity
            | PersonBasis::ForeignOrganizedEntity => Some(SubjectKind::Organization),
            PersonBasis::PresentInUs => None,
        }
    }
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
    /// Nationality / incorporation / residence / principal place of business: every
    /// country connected to the customer, what `customer` measures match on.
    pub countries: Vec<CountryCode>,
    /// Countries of nationality (individuals), when the KYC service breaks them out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nationality_countries: Vec<CountryCode>,
    /// Country of incorporation (organisations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incorporation_country: Option<CountryCode>,
    /// Countries of residence or principal place of business.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub location_countries: Vec<CountryCode>,
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
    /// Whether the reseller itself is a foreign person; absent = unknown, which measures
    /// treat as foreign (fail closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_person: Option<bool>,
}

impl Reseller {
    /// Whether measures limited to foreign persons apply to this reseller: foreign or unknown.
    pub fn maybe_foreign(&self) -> bool {
        self.foreign_status().maybe_foreign()
    }

    /// The reseller's status: absent flag = `unknown`.
    pub fn foreign_status(&self) -> ForeignStatus {
        ForeignStatus::from_option(self.foreign_person)
    }
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
    /// The customer's status as the wire's three values: the attestation always states it.
    pub fn foreign_status(&self) -> ForeignStatus {
        ForeignStatus::from_flag(self.foreign_person)
    }

    /// Refuses a `person_status` that contradicts `foreign_person`, its own basis, or the
    /// subject's kind, and detailed countries missing from `subject.countries`.
    fn validate_person(&self) -> Result<(), VerifyError> {
        if let Some(ps) = self.person_status {
            let foreign = ps.status == PersonStatusKind::ForeignPerson;
            if foreign != self.foreign_person {
                return Err(VerifyError::invalid(
                    "person_status.status",
                    format!("contradicts foreign_person: {}", self.foreign_person),
                ));
            }
            if ps.basis.status() != ps.status {
                return Err(VerifyError::invalid("person_status.basis", "contradicts person_status.status"));
            }
            if ps.basis.subject_kind().is_some_and(|k| k != self.subject.kind) {
                return Err(VerifyError::invalid("person_status.basis", "does not fit subject.kind"));
            }
        }
        let detailed = self
            .subject
            .nationality_countries
            .iter()
            .chain(&self.subject.incorporation_country)
            .chain(&self.subject.location_countries);
        for c in detailed {
            if !self.subject.countries.contains(c) {
                return Err(VerifyError::invalid(
                    "subject.countries",
                    format!("must list {c}, named in the detailed country fields"),
                ));
            }
        }
        Ok(())
    }

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
        self.validate_person()?;
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

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "iss": "i", "sub": "t", "jti": "j", "iat": 1, "exp": 2,
            "kyc": {"status": "verified"},
            "subject": {"kind": "organization", "legal_name": "X", "countries": ["US", "KP"]},
            "binding": {"kind": "host", "id": "h"},
            "foreign_person": false
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn refusal(extra: serde_json::Value) -> (String, String) {
        let a: AttestationClaims = serde_json::from_value(claims(extra)).unwrap();
        match a.validate() {
            Err(VerifyError::InvalidClaim { claim, reason }) => (claim, reason),
            other => panic!("expected InvalidClaim, got {other:?}"),
        }
    }

    #[test]
    fn person_status_agrees_with_foreign_person_its_basis_and_the_subject() {
        let ok = claims(serde_json::json!({
            "person_status": {"status": "us_person", "basis": "us_organized_entity"},
            "subject": {"kind": "organization", "legal_name": "X", "countries": ["US", "KP"],
                        "incorporation_country": "US", "location_countries": ["US", "KP"]},
            "resellers": [{"name": "R", "country": "NL", "foreign_person": false}, {"name": "S", "country": "DE"}]
        }));
        let a: AttestationClaims = serde_json::from_value(ok.clone()).unwrap();
        a.validate().unwrap();
        assert_eq!(a.foreign_status(), ForeignStatus::Us);
        assert_eq!(a.resellers.iter().map(Reseller::maybe_foreign).collect::<Vec<_>>(), [false, true]);
        assert_eq!(serde_json::to_value(&a).unwrap()["person_status"]["basis"], "us_organized_entity");
        // A foreign branch of a U.S. entity is a U.S. person.
        let branch = serde_json::json!({"person_status": {"status": "us_person", "basis": "foreign_branch_of_us_entity"}});
        serde_json::from_value::<AttestationClaims>(claims(branch)).unwrap().validate().unwrap();

        let contradicts_flag = refusal(serde_json::json!({
            "person_status": {"status": "foreign_person", "basis": "foreign_organized_entity"}
        }));
        assert_eq!(contradicts_flag.0, "person_status.status");
        let contradicts_status = refusal(serde_json::json!({
            "person_status": {"status": "us_person", "basis": "foreign_national"},
            "subject": {"kind": "individual", "legal_name": "X", "countries": ["KP"]}
        }));
        assert_eq!(
            contradicts_status,
            ("person_status.basis".into(), "contradicts person_status.status".into())
        );
        let wrong_kind =
            refusal(serde_json::json!({"person_status": {"status": "us_person", "basis": "citizen"}}));
        assert_eq!(wrong_kind, ("person_status.basis".into(), "does not fit subject.kind".into()));
        let unlisted = refusal(serde_json::json!({
            "subject": {"kind": "individual", "legal_name": "X", "countries": ["US"], "nationality_countries": ["IR"]}
        }));
        assert_eq!(unlisted.0, "subject.countries");
    }

    #[test]
    fn unknown_person_status_values_are_refused() {
        for ps in [
            serde_json::json!({"status": "dual", "basis": "citizen"}),
            serde_json::json!({"status": "us_person", "basis": "visa_holder"}),
            serde_json::json!({"status": "us_person"}),
            serde_json::json!({"status": "us_person", "basis": "citizen", "extra": 1}),
        ] {
            let v = claims(serde_json::json!({"person_status": ps}));
            assert!(serde_json::from_value::<AttestationClaims>(v).is_err(), "{ps}");
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
