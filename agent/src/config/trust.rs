//! `[trust]`, `[policy]` and `[attestations]`: the signed inputs of a decision and where
//! they come from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[trust]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    /// JWKS of the KYC service keys that sign attestations.
    pub issuers: PathBuf,
    /// JWKS of the policy authority keys that sign the policy.
    pub policy: PathBuf,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            issuers: PathBuf::from("/etc/kycd/trust/issuers.jwks"),
            policy: PathBuf::from("/etc/kycd/trust/policy.jwks"),
        }
    }
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The signed policy file.
    pub file: PathBuf,
    /// Where to fetch the published policy (the collector's `GET /v1/policy`, full URL);
    /// absent: no fetching. A fetched policy goes through the same verification and
    /// anti-rollback as the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_url: Option<String>,
    /// Seconds between fetches (each jittered by ±10 %, so a fleet does not fetch in step).
    pub fetch_interval_s: u64,
    /// PEM CA certificate(s) trusted for `fetch_url` besides the system trust store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_ca_file: Option<PathBuf>,
    /// Whole-request timeout of a fetch (seconds; the connect timeout is the smaller of this
    /// and 10 s).
    pub fetch_timeout_s: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: PathBuf::from("/etc/kycd/policy.jws"),
            fetch_url: None,
            fetch_interval_s: 300,
            fetch_ca_file: None,
            fetch_timeout_s: 30,
        }
    }
}

/// How long expired admitted attestations are archived by default: 5 years, the collector's
/// default record retention (issue 19).
pub const DEFAULT_EXPIRED_RETENTION_S: u64 = 157_680_000;

/// `[attestations]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestationConfig {
    /// Drop directory watched for `*.jws`; absent: `<state_dir>/attestations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_dir: Option<PathBuf>,
    /// The host attestation written by cloud-init.
    pub host_attestation: PathBuf,
    /// cloud-init's instance data, for checking a host attestation's `host_id`.
    pub cloud_init_instance_data: PathBuf,
    /// Largest attestation accepted, bytes.
    pub max_bytes: usize,
    /// How long an expired admitted attestation is kept in `<state_dir>/admitted-expired/`
    /// (seconds after its expiry) before it is deleted: the record of who was admitted.
    pub expired_retention_s: u64,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        AttestationConfig {
            drop_dir: None,
            host_attestation: PathBuf::from("/etc/kycd/attestations/host.jws"),
            cloud_init_instance_data: PathBuf::from("/run/cloud-init/instance-data.json"),
            max_bytes: kycd_protocol::DEFAULT_MAX_TOKEN_BYTES,
            expired_retention_s: DEFAULT_EXPIRED_RETENTION_S,
        }
    }
}
