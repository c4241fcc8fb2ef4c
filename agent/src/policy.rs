//! The jurisdiction policy in force, and anti-rollback.
//!
//! A policy is accepted only if it verifies against the policy trust set and its `version` is
//! not lower than the highest version this host ever applied. That high-water mark (and a
//! digest of the claims that carried it) is persisted in `<state_dir>/policy.state`, written
//! atomically and fsync'd *before* the new policy takes effect, so neither a crash nor a
//! replayed older file can move a host back to a laxer policy. The same version with
//! different content is refused too: a version number names one policy, forever.
//!
//! Every policy token takes this one path, whatever its source: the policy file, the copy
//! of the last fetched policy, or a token just fetched by [`crate::policy_fetch`].
//!
//! An unreadable or corrupt state file is an error, not a fresh start: without the high-water
//! mark any old policy could be replayed, so the host stays without a policy (which the
//! decision engine treats as deny) until an operator repairs or removes the file.

use std::fs;
use std::path::{Path, PathBuf};

use kycd_protocol::{verify, Jwks, PolicyClaims, VerifyError, VerifyOptions};
use serde::{Deserialize, Serialize};

/// Largest policy token read (from the file, or fetched).
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// Name of the anti-rollback state file inside the state directory.
pub const STATE_FILE: &str = "policy.state";

/// Why a policy was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The token did not verify.
    #[error("policy rejected: {0}")]
    Invalid(#[from] VerifyError),
    /// A lower version than one already applied.
    #[error("policy version {offered} is lower than version {highest} already applied (rollback refused)")]
    Rollback {
        /// Version offered.
        offered: u64,
        /// Highest version applied on this host.
        highest: u64,
    },
    /// The applied version number with different claims.
    #[error("policy version {version} differs from the version {version} already applied (a version names one policy)")]
    VersionReused {
        /// The version.
        version: u64,
    },
    /// The state file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file exists but is not valid; see the module doc for why this is fatal.
    #[error("{path}: corrupt anti-rollback state ({reason}); refusing every policy until it is repaired")]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl PolicyError {
    /// Stable name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::Invalid(e) => e.kind(),
            PolicyError::Rollback { .. } => "Rollback",
            PolicyError::VersionReused { .. } => "VersionReused",
            PolicyError::Io { .. } => "Io",
            PolicyError::CorruptState { .. } => "CorruptState",
        }
    }
}

/// The persisted high-water mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyState {
    /// Highest version applied.
    pub version: u64,
    /// SHA-256 (hex) of that version's claims, canonically serialized.
    pub claims_digest: String,
    /// When it was applied (Unix seconds).
    pub applied_at: i64,
}

/// A policy that verified and passed anti-rollback.
#[derive(Debug, Clone)]
pub struct AppliedPolicy {
    /// The claims.
    pub claims: PolicyClaims,
    /// SHA-256 (hex) of the claims, canonically serialized.
    pub claims_digest: String,
    /// SHA-256 (hex) of the token as delivered.
    pub token_digest: String,
    /// The key that signed it.
    pub kid: String,
}

/// What offering a policy did.
#[derive(Debug, Clone)]
pub enum Offer {
    /// A newer version: persisted and now in force.
    Applied(AppliedPolicy),
    /// The version already applied, same claims (e.g. the same file re-read after a restart).
    Unchanged(AppliedPolicy),
}

/// Holds the anti-rollback state of one state directory.
#[derive(Debug)]
pub struct PolicyGuard {
    path: PathBuf,
    state: Option<PolicyState>,
}

fn claims_digest(claims: &PolicyClaims) -> Result<String, PolicyError> {
    // The typed claims re-serialized: independent of key, signature and JSON formatting, so
    // the same policy re-signed is recognised as the same policy.
    let canonical = serde_json::to_vec(claims).map_err(|e| {
        PolicyError::Invalid(VerifyError::Malformed(format!("policy does not serialize: {e}")))
    })?;
    Ok(kycd_protocol::token_digest(&canonical))
}

impl PolicyGuard {
    /// Opens the state in `state_dir` (absent file: no policy applied yet).
    pub fn open(state_dir: &Path) -> Result<Self, PolicyError> {
        let path = state_dir.join(STATE_FILE);
        let state = match fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| PolicyError::CorruptState { path: path.clone(), reason: e.to_string() })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(PolicyError::Io { path, source }),
        };
        Ok(PolicyGuard { path, state })
    }

    /// The persisted high-water mark.
    pub fn state(&self) -> Option<&PolicyState> {
        self.state.as_ref()
    }

    /// Verifies `token` and applies anti-rollback; a newer version is persisted (fsync'd)
    /// before this returns `Applied`.
    pub fn offer(
        &mut self,
        token: &[u8],
        jwks: &Jwks,
        options: &VerifyOptions,
        now: i64,
    ) -> Result<Offer, PolicyError> {
        let verified = verify::<PolicyClaims>(token, jwks, options, now)?;
        let claims_digest = claims_digest(&verified.claims)?;
        let version = verified.claims.version;
        let applied = AppliedPolicy {
            claims: verified.claims,
            claims_digest,
            token_digest: kycd_protocol::token_digest(token),
            kid: verified.header.kid,
        };
        match &self.state {
            Some(s) if version < s.version => {
                Err(PolicyError::Rollback { offered: version, highest: s.version })
            }
            Some(s) if version == s.version && applied.claims_digest != s.claims_digest => {
                Err(PolicyError::VersionReused { version })
            }
            Some(s) if version == s.version => Ok(Offer::Unchanged(applied)),
            _ => {
                let state =
                    PolicyState { version, claims_digest: applied.claims_digest.clone(), applied_at: now };
                self.persist(&state)?;
                self.state = Some(state);
                Ok(Offer::Applied(applied))
            }
        }
    }

    fn persist(&self, state: &PolicyState) -> Result<(), PolicyError> {
        let io = |source| PolicyError::Io { path: self.path.clone(), source };
        let body = serde_json::to_vec(state).map_err(|e| io(std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(&self.path, &body).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kycd_protocol::{Algorithm, PrivateJwk};

    const NOW: i64 = 1_800_000_000;

    fn policy(version: u64, measure: &str) -> PolicyClaims {
        serde_json::from_value(serde_json::json!({
            "iss": "authority", "iat": NOW - 10, "exp": NOW + 86_400, "version": version,
            "measures": [{"id": measure, "match": {"countries": ["KP"]}, "roles": ["customer"],
                          "action": "prohibit", "citation": "EO 13984"}],
            "unverified": {"action": "deny"},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01}
        }))
        .unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        key: PrivateJwk,
        jwks: Jwks,
    }

    impl Fixture {
        fn new() -> Self {
            let key = PrivateJwk::generate(Algorithm::ES256, "authority-1").unwrap();
            let jwks = Jwks::from_keys([key.public_key()]).unwrap();
            Fixture { dir: tempfile::tempdir().unwrap(), key, jwks }
        }
        fn token(&self, version: u64, measure: &str) -> String {
            kycd_protocol::sign(&policy(version, measure), &self.key).unwrap()
        }
        fn offer(&self, guard: &mut PolicyGuard, token: &str) -> Result<Offer, PolicyError> {
            guard.offer(token.as_bytes(), &self.jwks, &VerifyOptions::default(), NOW)
        }
    }

    #[test]
    fn versions_only_move_forward_across_restarts() {
        let f = Fixture::new();
        let mut guard = PolicyGuard::open(f.dir.path()).unwrap();
        assert!(guard.state().is_none());
        assert!(matches!(f.offer(&mut guard, &f.token(5, "m")).unwrap(), Offer::Applied(_)));
        assert!(matches!(f.offer(&mut guard, &f.token(7, "m")).unwrap(), Offer::Applied(_)));
        let err = f.offer(&mut guard, &f.token(6, "m")).unwrap_err();
        assert!(matches!(err, PolicyError::Rollback { offered: 6, highest: 7 }), "{err}");

        // A restart reads the persisted mark: the rollback is still refused.
        let mut reopened = PolicyGuard::open(f.dir.path()).unwrap();
        assert_eq!(reopened.state().unwrap().version, 7);
        assert_eq!(f.offer(&mut reopened, &f.token(5, "m")).unwrap_err().kind(), "Rollback");
        // The same policy re-signed (ES256 signatures differ each time) is recognised as unchanged.
        assert!(matches!(f.offer(&mut reopened, &f.token(7, "m")).unwrap(), Offer::Unchanged(_)));
        // The same version with other content is refused.
        assert_eq!(f.offer(&mut reopened, &f.token(7, "other")).unwrap_err().kind(), "VersionReused");
        assert_eq!(reopened.state().unwrap().version, 7);
    }

    #[test]
    fn invalid_tokens_do_not_touch_the_state() {
        let f = Fixture::new();
        let mut guard = PolicyGuard::open(f.dir.path()).unwrap();
        f.offer(&mut guard, &f.token(3, "m")).unwrap();
        let other = PrivateJwk::generate(Algorithm::ES256, "authority-1").unwrap();
        let forged = kycd_protocol::sign(&policy(99, "m"), &other).unwrap();
        assert_eq!(f.offer(&mut guard, &forged).unwrap_err().kind(), "BadSignature");
        assert_eq!(PolicyGuard::open(f.dir.path()).unwrap().state().unwrap().version, 3);
    }

    #[test]
    fn corrupt_state_fails_closed() {
        let f = Fixture::new();
        fs::write(f.dir.path().join(STATE_FILE), b"{\"version\": 3").unwrap();
        let err = PolicyGuard::open(f.dir.path()).unwrap_err();
        assert_eq!(err.kind(), "CorruptState", "{err}");
    }
}
