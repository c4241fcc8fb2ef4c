//! kycd's wire protocol: the types of every signed document (tenant attestations, the
//! jurisdiction policy, host statements, usage reports), strict JWS compact signing and
//! verification (EdDSA/Ed25519 per RFC 8037, ES256 per RFC 7518), JWKS trust sets, and ISO
//! 3166-1 alpha-2 country codes.
//!
//! This crate does no I/O and has no runtime: callers hand it bytes and the current time and
//! get back typed claims or a [`VerifyError`] naming exactly what was wrong. Every other part
//! of kycd trusts what [`verify`] accepts, so it accepts as little as it can.
//!
//! ```
//! use kycd_protocol::{verify, Algorithm, Jwks, PrivateJwk, PolicyClaims, VerifyOptions};
//! let key = PrivateJwk::generate(Algorithm::EdDSA, "policy-2026").unwrap();
//! let jwks = Jwks::from_keys([key.public_key()]).unwrap();
//! # let claims: PolicyClaims = serde_json::from_value(serde_json::json!({
//! #   "iss": "policy-authority", "iat": 1_800_000_000, "exp": 1_900_000_000, "version": 1,
//! #   "measures": [], "unverified": {"action": "deny"},
//! #   "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
//! #                  "early_warning_fraction": 0.01}})).unwrap();
//! let token = kycd_protocol::sign(&claims, &key).unwrap();
//! let verified = verify::<PolicyClaims>(token.as_bytes(), &jwks, &VerifyOptions::default(), 1_800_000_100).unwrap();
//! assert_eq!(verified.claims.version, 1);
//! ```

pub mod audit_chain;
pub mod b64;
pub mod backoff;
pub mod claims;
pub mod clock;
mod country;
mod country_table;
mod error;
pub mod json;
mod jwk;
mod jws;
pub mod wire;

pub use claims::*;
pub use country::{CountryCode, UnknownCountryCode};
pub use error::{KeyError, VerifyError};
pub use jwk::{Algorithm, Jwks, PrivateJwk, PublicKey};
pub use jws::{
    sign, sign_detached, sign_encoded_payload, sign_payload, verify, verify_detached, verify_signature,
    Header, Verified, VerifyOptions, DEFAULT_CLOCK_SKEW_S, DEFAULT_MAX_TOKEN_BYTES, MAX_HEADER_BYTES,
    REPORT_SIGNATURE_TYP,
};

/// SHA-256 of a token's compact serialization, lower-case hex: the attestation digest that
/// host statements and the audit log carry.
pub fn token_digest(token: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(token);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}
