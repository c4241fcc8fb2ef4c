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
//!
//! One module per document: `attestation`, `policy`, `statement`, `report`; this
//! one holds what they share (the token types, the claim checks). Every type is re-exported
//! here and at the crate root, where callers name them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::VerifyError;

mod attestation;
mod policy;
mod report;
mod statement;
mod statement_head;

pub use attestation::*;
pub use policy::*;
pub use report::*;
pub use statement::*;
pub use statement_head::*;

/// Whether a party is a foreign person, as reports and statements carry it: `unknown` where
/// no attestation says (unattributed usage, a reseller the KYC service did not classify).
/// Measures limited to foreign persons treat `unknown` as foreign (fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForeignStatus {
    /// A foreign person.
    Foreign,
    /// A United States person.
    Us,
    /// Not known.
    Unknown,
}

impl ForeignStatus {
    /// From an attestation's `foreign_person`.
    pub fn from_flag(foreign_person: bool) -> Self {
        if foreign_person {
            ForeignStatus::Foreign
        } else {
            ForeignStatus::Us
        }
    }

    /// From an optional flag (a reseller's): absent is `unknown`.
    pub fn from_option(foreign_person: Option<bool>) -> Self {
        foreign_person.map_or(ForeignStatus::Unknown, Self::from_flag)
    }

    /// Whether a measure limited to foreign persons applies: foreign or unknown.
    pub fn maybe_foreign(self) -> bool {
        self != ForeignStatus::Us
    }

    /// The status of a merge of two records: foreign if either is, else unknown if either
    /// is, else U.S.
    pub fn merge(self, other: ForeignStatus) -> ForeignStatus {
        match (self, other) {
            (ForeignStatus::Foreign, _) | (_, ForeignStatus::Foreign) => ForeignStatus::Foreign,
            (ForeignStatus::Unknown, _) | (_, ForeignStatus::Unknown) => ForeignStatus::Unknown,
            _ => ForeignStatus::Us,
        }
    }

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ForeignStatus::Foreign => "foreign",
            ForeignStatus::Us => "us",
            ForeignStatus::Unknown => "unknown",
        }
    }
}

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
    /// The signed head of a digest-bound host statement ([`HostStatementHead`]).
    HostStatementHead,
}

impl TokenType {
    /// The JOSE `typ` header value.
    pub fn typ(self) -> &'static str {
        match self {
            TokenType::Attestation => "kyc-attestation+jwt",
            TokenType::Policy => "kyc-policy+jwt",
            TokenType::HostStatement => "kyc-host-statement+jwt",
            TokenType::HostStatementHead => "kyc-host-statement-head+jwt",
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
