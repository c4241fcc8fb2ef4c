//! Host statements (`typ: kyc-host-statement+jwt`): a host's signed, point-in-time answer
//! to a collector's poll — its workloads with their verdicts, and its GPUs.

use serde::{Deserialize, Serialize};

use super::{
    check_id, BeneficialOwner, Conditions, ForeignStatus, NumericDate, PersonStatus, Reseller, TokenClaims,
    TokenType,
};
use crate::{CountryCode, VerifyError};

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
    /// The machine's facts (absent from agents that predate them, and then not serialized, so
    /// a statement without them is byte for byte what it was). A collector that does not know
    /// the field ignores it: statements do not refuse unknown fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostFacts>,
}

/// Facts about the machine behind a host statement: what it is, and which boot it is in (a
/// boot id that changes while the uptime did not fall means another machine answers).
/// Every field defaults, so a statement from an agent that reads fewer facts still parses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostFacts {
    /// CPU model as the kernel names it (empty where it names none, e.g. on some Arm hosts).
    pub cpu_model: String,
    /// Physical CPU cores.
    pub cpu_cores: u32,
    /// Logical CPUs (hardware threads).
    pub cpu_threads: u32,
    /// Physical memory, bytes.
    pub memory_bytes: u64,
    /// Kernel release (as `uname -r` prints it).
    pub kernel: String,
    /// Seconds since boot.
    pub uptime_s: u64,
    /// This boot's random id (Linux `/proc/sys/kernel/random/boot_id`), new at every boot.
    pub boot_id: String,
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
    /// The purposes the attestation declares (`biological_sequence_data` lowers the
    /// threshold of the tenant's training runs to `bio_training_ops`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<crate::Purpose>,
    /// The attestation's `person_status` (status and basis), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person_status: Option<PersonStatus>,
    /// The beneficial owners with their names (for filing reports; absent from older agents,
    /// which carry only `beneficial_owner_countries`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub beneficial_owners: Vec<BeneficialOwner>,
    /// The resellers with their names, countries and foreign flags, in chain order (absent
    /// from older agents, which carry only `reseller_countries`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resellers: Vec<Reseller>,
    /// Who verified the tenant, and how (absent from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kyc: Option<StatementKyc>,
}

impl StatementSubject {
    /// The resellers' foreign statuses with their countries: from `resellers` where the
    /// agent sent them, else every `reseller_countries` entry as `unknown` (an older agent).
    pub fn reseller_statuses(&self) -> Vec<(CountryCode, ForeignStatus)> {
        if self.resellers.is_empty() {
            self.reseller_countries.iter().map(|c| (*c, ForeignStatus::Unknown)).collect()
        } else {
            self.resellers.iter().map(|r| (r.country, ForeignStatus::from_option(r.foreign_person))).collect()
        }
    }
}

/// The KYC facts of the attestation behind a [`StatementSubject`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementKyc {
    /// The attestation's issuer (`iss`, the KYC service).
    pub issuer: String,
    /// The attestation's `jti`.
    pub jti: String,
    /// When verification completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<NumericDate>,
    /// How identity was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(host: Option<HostFacts>) -> HostStatementClaims {
        HostStatementClaims {
            iss: "node-1".into(),
            iat: 1_800_000_000,
            exp: 1_800_000_060,
            nonce: "0123456789abcdef".into(),
            agent_version: "0.1.0".into(),
            policy_version: Some(3),
            workloads: vec![],
            gpus: vec![],
            host,
        }
    }

    /// HostStatementClaims as it was before `host`: what an old collector verifies with.
    #[derive(Debug, Deserialize)]
    struct OldStatement {
        iss: String,
        #[allow(dead_code)]
        workloads: Vec<WorkloadStatement>,
    }

    impl TokenClaims for OldStatement {
        const TOKEN_TYPE: TokenType = TokenType::HostStatement;
        const REQUIRED_CLAIMS: &'static [&'static str] =
            &["iss", "iat", "exp", "nonce", "agent_version", "workloads"];
        fn validate(&self) -> Result<(), VerifyError> {
            Ok(())
        }
    }

    #[test]
    fn host_facts_are_optional_both_ways() {
        // Without facts: no `host` key at all, so old statements serialize as they did.
        let old = serde_json::to_value(statement(None)).unwrap();
        assert!(old.get("host").is_none(), "{old}");
        assert_eq!(serde_json::from_value::<HostStatementClaims>(old).unwrap(), statement(None));
        // With facts: a new collector reads them back; an old one verifies and ignores them.
        let facts = HostFacts { kernel: "6.8.0".into(), boot_id: "b".into(), ..HostFacts::default() };
        let new = statement(Some(facts.clone()));
        let key = crate::PrivateJwk::generate(crate::Algorithm::EdDSA, "node-1").unwrap();
        let jwks = crate::Jwks::from_keys([key.public_key()]).unwrap();
        let token = crate::sign(&new, &key).unwrap();
        let options = crate::VerifyOptions::default();
        let at = 1_800_000_010;
        let read = crate::verify::<HostStatementClaims>(token.as_bytes(), &jwks, &options, at).unwrap();
        assert_eq!(read.claims.host, Some(facts));
        let old = crate::verify::<OldStatement>(token.as_bytes(), &jwks, &options, at).unwrap();
        assert_eq!(old.claims.iss, "node-1");
    }

    #[test]
    fn statement_subject_new_fields_are_optional_both_ways() {
        let old = serde_json::json!({
            "legal_name": "X", "countries": ["US"], "beneficial_owner_countries": ["KP"],
            "reseller_countries": ["NL"], "payment_source_country": null, "foreign_person": false
        });
        let s: StatementSubject = serde_json::from_value(old.clone()).unwrap();
        assert_eq!((s.person_status, s.resellers.len(), s.kyc.clone()), (None, 0, None));
        assert_eq!(serde_json::to_value(&s).unwrap(), old);
        let nl = CountryCode::parse("NL").unwrap();
        assert_eq!(s.reseller_statuses(), [(nl, ForeignStatus::Unknown)]);
        let new = StatementSubject {
            resellers: vec![Reseller { name: "R".into(), country: nl, foreign_person: Some(false) }],
            kyc: Some(StatementKyc {
                issuer: "kyc".into(),
                jti: "j".into(),
                verified_at: Some(1),
                method: None,
            }),
            ..s
        };
        assert_eq!(new.reseller_statuses(), [(nl, ForeignStatus::Us)]);
        let wire = serde_json::to_value(&new).unwrap();
        assert_eq!(serde_json::from_value::<StatementSubject>(wire).unwrap(), new);
    }

    #[test]
    fn host_facts_round_trip_and_default_what_is_missing() {
        let facts = HostFacts {
            cpu_model: "AMD EPYC 9654 96-Core Processor".into(),
            cpu_cores: 192,
            cpu_threads: 384,
            memory_bytes: 1 << 40,
            kernel: "6.8.0-45-generic".into(),
            uptime_s: 3600,
            boot_id: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
        };
        let wire = serde_json::to_value(&facts).unwrap();
        assert_eq!(wire["cpu_threads"], 384);
        assert_eq!(serde_json::from_value::<HostFacts>(wire).unwrap(), facts);
        let partial: HostFacts = serde_json::from_str(r#"{"kernel": "6.1", "future_fact": 1}"#).unwrap();
        assert_eq!(partial, HostFacts { kernel: "6.1".into(), ..HostFacts::default() });
    }
}
