//! Host enrollment: binding a host id to the public key its reports must be signed with.
//!
//! Enrollment is explicit (`kycd-collector hosts add`), with the public JWK the host prints
//! (`kycctl host-key --public`). There is deliberately **no trust-on-first-use mode**: with
//! TOFU the first report that names a host id would bind that id to whatever key signed it,
//! so an attacker who reaches the collector before the real host (or for a host id not yet
//! reporting, e.g. a new or re-imaged host) would own that host id: its usage reports would be
//! the attacker's, and the real host's reports would be rejected as badly signed. For a
//! regulatory record of who used which GPUs, the binding of host to key has to come from the
//! operator, out of band.

use kycd_protocol::{Algorithm, PublicKey};

/// Why a key cannot be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The file holds private key material (`d`): only the public key is enrolled, and a
    /// private key does not belong on the collector.
    #[error("the JWK holds a private key; enroll the public key only (kycctl host-key --public)")]
    PrivateKey,
    /// Not a valid public JWK.
    #[error("not a valid public JWK")]
    InvalidJwk(#[source] kycd_protocol::KeyError),
    /// A key for another algorithm than Ed25519.
    #[error("host keys must be OKP/Ed25519 (EdDSA), this one is for {0}")]
    NotEd25519(Algorithm),
    /// The key's `kid` differs from the host id; report signatures carry the host id as
    /// `kid`, and the key must be named by it.
    #[error("the JWK's kid {kid:?} is not the host id {host_id:?}")]
    KidMismatch {
        /// The key's kid.
        kid: String,
        /// The host id being enrolled.
        host_id: String,
    },
    /// The host id is not a valid identifier.
    #[error("invalid host id: {0}")]
    InvalidHostId(String),
}

/// Parses the public JWK to enroll for `host_id`: an OKP/Ed25519 public key whose `kid` is
/// the host id.
pub fn parse_host_key(host_id: &str, jwk: &[u8]) -> Result<PublicKey, EnrollError> {
    if host_id.is_empty() || host_id.len() > 128 || host_id.chars().any(|c| c.is_control()) {
        return Err(EnrollError::InvalidHostId("must be 1-128 bytes without control characters".into()));
    }
    let key = PublicKey::from_jwk_json(jwk).map_err(|e| match e {
        kycd_protocol::KeyError::PrivateMaterial(_) => EnrollError::PrivateKey,
        other => EnrollError::InvalidJwk(other),
    })?;
    if key.algorithm() != Algorithm::EdDSA {
        return Err(EnrollError::NotEd25519(key.algorithm()));
    }
    if key.kid() != host_id {
        return Err(EnrollError::KidMismatch { kid: key.kid().to_owned(), host_id: host_id.to_owned() });
    }
    Ok(key)
}

/// Why a placement is refused.
#[derive(Debug, thiserror::Error)]
#[error("{field} must be 1-64 characters of letters, digits, '.', '_' or '-' (got {value:?})")]
pub struct PlacementError {
    /// `site` or `fabric`.
    pub field: &'static str,
    /// What was given.
    pub value: String,
}

/// Parses a host's placement: a site and a network fabric, each a short identifier (they
/// name clusters in subjects and filings: no spaces, no `/`).
pub fn parse_placement(site: &str, fabric: &str) -> Result<crate::fleet::Placement, PlacementError> {
    let check = |field, value: &str| {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(value.to_owned())
        } else {
            Err(PlacementError { field, value: value.to_owned() })
        }
    };
    Ok(crate::fleet::Placement { site: check("site", site)?, fabric: check("fabric", fabric)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kycd_protocol::PrivateJwk;

    #[test]
    fn placements_are_short_identifiers() {
        let p = parse_placement("fra-1", "ib.pod_2").unwrap();
        assert_eq!((p.site.as_str(), p.fabric.as_str()), ("fra-1", "ib.pod_2"));
        for (site, fabric) in [("", "x"), ("a/b", "x"), ("a", "x y"), ("a", &"f".repeat(65))] {
            assert!(parse_placement(site, fabric).is_err(), "{site:?} {fabric:?}");
        }
        assert_eq!(parse_placement("a", "x/y").unwrap_err().field, "fabric");
    }

    #[test]
    fn only_public_ed25519_keys_named_by_the_host_id() {
        let key = PrivateJwk::generate(Algorithm::EdDSA, "host-1").unwrap();
        let public = key.public_key().to_jwk().to_string();
        assert_eq!(parse_host_key("host-1", public.as_bytes()).unwrap().kid(), "host-1");
        assert!(matches!(parse_host_key("host-1", key.to_json().as_bytes()), Err(EnrollError::PrivateKey)));
        assert!(matches!(parse_host_key("host-2", public.as_bytes()), Err(EnrollError::KidMismatch { .. })));
        let ec = PrivateJwk::generate(Algorithm::ES256, "host-1").unwrap().public_key().to_jwk().to_string();
        assert!(matches!(parse_host_key("host-1", ec.as_bytes()), Err(EnrollError::NotEd25519(_))));
        assert!(matches!(parse_host_key("host-1", b"{}"), Err(EnrollError::InvalidJwk(_))));
        assert!(matches!(parse_host_key("", public.as_bytes()), Err(EnrollError::InvalidHostId(_))));
    }
}
