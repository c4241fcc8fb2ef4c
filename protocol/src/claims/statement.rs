//! Host statements (`typ: kyc-host-statement+jwt`): a host's signed, point-in-time answer
//! to a collector's poll — its workloads with their verdicts, and its GPUs.

use serde::{Deserialize, Serialize};

use super::{check_id, Conditions, NumericDate, TokenClaims, TokenType};
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
