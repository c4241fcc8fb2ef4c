//! Policy distribution: the collector holds the fleet's current signed jurisdiction policy,
//! accepts a new one only when it verifies against the configured trust anchors and has a
//! higher version than the current one (`kycd-collector policy publish`), and serves it to
//! agents at `GET /v1/policy` with an `ETag` so an unchanged policy costs a 304.
//!
//! The collector is a distribution point, not a trust anchor: agents verify a fetched policy
//! against their own trust anchors and apply their own anti-rollback. Checking here too keeps
//! a mistyped or stale file from ever being offered to the fleet, and gives the collector's
//! findings (`policy_stale`, `enforcement_mismatch`, the reporting thresholds) a policy they
//! can rely on.

use kycd_protocol::{Jwks, PolicyClaims, VerifyOptions};
use sha2::{Digest as _, Sha256};

use crate::store::error::StoreError;

/// The policy currently published.
#[derive(Debug, Clone)]
pub struct PublishedPolicy {
    /// Its version.
    pub version: u64,
    /// The compact JWS, exactly as published.
    pub token: String,
    /// When it was published (Unix seconds).
    pub published_at: i64,
    /// Its claims, as verified when it was published (stored beside the token, so an expired
    /// policy still reports its thresholds and version).
    pub claims: PolicyClaims,
}

impl PublishedPolicy {
    /// The entity tag served with it: version and a digest prefix, so two different tokens
    /// with one version (impossible through `publish`, but cheap to rule out) never share it.
    pub fn etag(&self) -> String {
        let digest = Sha256::digest(self.token.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("\"{}-{hex}\"", self.version)
    }
}

/// Where the published policy lives. Implemented by each storage backend.
pub trait PolicyStore: Send + Sync + std::fmt::Debug + 'static {
    /// The current policy, if one was published.
    fn current_policy(&self) -> Result<Option<PublishedPolicy>, StoreError>;

    /// Makes `policy` current, in one transaction that also checks it is newer than the
    /// current one ([`StoreError::PolicyNotNewer`] otherwise), so two concurrent publishers
    /// cannot roll the fleet back.
    fn publish_policy(&self, policy: &PublishedPolicy) -> Result<(), StoreError>;
}

/// Why a policy cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The token does not verify (signature, unknown key, expiry, malformed, …).
    #[error("the policy does not verify against the trust anchors")]
    Verify(#[source] kycd_protocol::VerifyError),
    /// Not newer than the published policy.
    #[error("policy version {offered} is not newer than the published version {current}")]
    NotNewer {
        /// The offered version.
        offered: u64,
        /// The published version.
        current: u64,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(StoreError),
}

/// Verifies `token` against `trust` and publishes it if it is newer than the current policy.
/// Returns the published policy.
pub fn publish(
    store: &dyn PolicyStore,
    token: &str,
    trust: &Jwks,
    now: i64,
) -> Result<PublishedPolicy, PublishError> {
    let token = token.trim();
    let verified =
        kycd_protocol::verify::<PolicyClaims>(token.as_bytes(), trust, &VerifyOptions::default(), now)
            .map_err(PublishError::Verify)?;
    let policy = PublishedPolicy {
        version: verified.claims.version,
        token: token.to_owned(),
        published_at: now,
        claims: verified.claims,
    };
    store.publish_policy(&policy).map_err(|e| match e {
        StoreError::PolicyNotNewer { offered, current } => PublishError::NotNewer { offered, current },
        other => PublishError::Store(other),
    })?;
    Ok(policy)
}
