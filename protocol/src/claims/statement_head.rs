//! Digest-bound host statements (`GET /v1/attestation?nonce=N&v=2`): a small signed *head*
//! (`typ: kyc-host-statement-head+jwt`) carrying what changes per request — issuer, times,
//! the nonce, the uptime — and the SHA-256 of the *body*, the rest of the statement, which
//! follows it unsigned: `<head JWS>~<base64url(body JSON)>`.
//!
//! Why: Ed25519 hashes its whole signing input twice and the nonce makes every statement
//! differ, so signing the one-part statement costs its size on every request (a host with
//! 100 attested workloads: a 70 KB signing input, ~10× a health check's cost). The body only
//! changes when the host's state does, so the agent serialises, encodes and hashes it then,
//! and per request signs a ~300-byte head. The pair is as self-contained as a one-part
//! statement: verifying the head and the body's digest proves every claim, so the pair is
//! what a collector stores as evidence. [`verify_split_statement`] gives the same
//! [`HostStatementClaims`] a one-part statement does; the `~` (outside the base64url and
//! JWS alphabets) tells the two forms apart.
//!
//! A collector that holds the body of its last statement from a host sends its digest
//! (`&have=…`); an agent whose body still has it answers `head~`, leaving the body out, and
//! the collector puts the body it holds back before verifying. What is verified and stored is
//! always the whole pair.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{
    check_id, GpuInventoryEntry, HostFacts, HostStatementClaims, NumericDate, TokenClaims, TokenType,
    WorkloadStatement,
};
use crate::jws::{verify, Verified, VerifyOptions};
use crate::{b64, json, Jwks, VerifyError};

/// Separates a digest-bound statement's head from its body.
pub const STATEMENT_BODY_SEPARATOR: u8 = b'~';

/// The signed head of a digest-bound host statement (`typ: kyc-host-statement-head+jwt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatementHead {
    /// The host id (also the issuer).
    pub iss: String,
    /// Issued at (the host's clock).
    pub iat: NumericDate,
    /// Expiry (short: a statement is a point-in-time answer).
    pub exp: NumericDate,
    /// The collector's nonce, echoed.
    pub nonce: String,
    /// The host's uptime when it answered (the body's `host` facts carry none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    /// base64url (unpadded) SHA-256 of the body's JSON bytes.
    pub body_sha256: String,
}

impl TokenClaims for HostStatementHead {
    const TOKEN_TYPE: TokenType = TokenType::HostStatementHead;
    const REQUIRED_CLAIMS: &'static [&'static str] = &["iss", "iat", "exp", "nonce", "body_sha256"];

    fn validate(&self) -> Result<(), VerifyError> {
        check_id("iss", &self.iss)?;
        check_id("nonce", &self.nonce)?;
        if self.body_sha256.len() != 43 {
            return Err(VerifyError::invalid("body_sha256", "must be 43 base64url characters (SHA-256)"));
        }
        Ok(())
    }
}

/// The body of a digest-bound host statement: every claim of a [`HostStatementClaims`] but
/// the head's (and `host.uptime_s`, which the head carries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatementBody {
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
    /// The machine's facts, without the uptime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostFacts>,
}

/// The `body_sha256` of a body's JSON bytes.
pub fn statement_body_digest(body: &[u8]) -> String {
    b64::encode(&sha2::Sha256::digest(body))
}

/// The body part of a digest-bound statement (base64url; empty when the agent left it out),
/// or `None` for a one-part statement.
pub fn statement_body_part(token: &[u8]) -> Option<&[u8]> {
    let at = token.iter().position(|b| *b == STATEMENT_BODY_SEPARATOR)?;
    token.get(at + 1..)
}

/// Whether `token` is a digest-bound statement (`head~body`) rather than a one-part one.
pub fn is_split_statement(token: &[u8]) -> bool {
    token.contains(&STATEMENT_BODY_SEPARATOR)
}

/// Verifies a digest-bound statement `head~body` against `jwks` at `now`: the head as a
/// compact JWS of its type (every rule of [`verify`]; `options.max_token_bytes` bounds the
/// whole pair), then the body's digest and strict JSON. Returns the statement's claims as a
/// one-part statement carries them, under the head's header.
pub fn verify_split_statement(
    token: &[u8],
    jwks: &Jwks,
    options: &VerifyOptions,
    now: i64,
) -> Result<Verified<HostStatementClaims>, VerifyError> {
    if token.len() > options.max_token_bytes {
        return Err(VerifyError::TooLarge {
            part: "token",
            size: token.len(),
            limit: options.max_token_bytes,
        });
    }
    let mut parts = token.split(|b| *b == STATEMENT_BODY_SEPARATOR);
    let (Some(head), Some(body_b64), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(VerifyError::Malformed("a digest-bound statement is `head~body`".into()));
    };
    let Verified { header, claims: head } = verify::<HostStatementHead>(head, jwks, options, now)?;
    let body = b64::decode(body_b64)
        .map_err(|_| VerifyError::Malformed("the statement body is not base64url".into()))?;
    if statement_body_digest(&body) != head.body_sha256 {
        return Err(VerifyError::Malformed(
            "the statement body does not match the head's body_sha256".into(),
        ));
    }
    json::scan_object(&body, &[]).map_err(|e| VerifyError::Malformed(format!("statement body: {e}")))?;
    let body: HostStatementBody =
        serde_json::from_slice(&body).map_err(|e| VerifyError::Malformed(format!("statement body: {e}")))?;
    check_id("agent_version", &body.agent_version)?;
    Ok(Verified { header, claims: join_statement(head, body) })
}

/// Signs `claims` in the digest-bound form (`head~body`) with `key`. The agent builds the
/// same from a snapshot it serialised once (`agent/src/net/statement.rs`); this is the
/// straightforward form, for tools and tests.
pub fn sign_split_statement(
    claims: &HostStatementClaims,
    key: &crate::PrivateJwk,
) -> Result<String, VerifyError> {
    let body = HostStatementBody {
        agent_version: claims.agent_version.clone(),
        policy_version: claims.policy_version,
        workloads: claims.workloads.clone(),
        gpus: claims.gpus.clone(),
        host: claims.host.clone().map(|mut facts| {
            facts.uptime_s = 0;
            facts
        }),
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| VerifyError::Malformed(format!("body does not serialize: {e}")))?;
    let head = HostStatementHead {
        iss: claims.iss.clone(),
        iat: claims.iat,
        exp: claims.exp,
        nonce: claims.nonce.clone(),
        uptime_s: claims.host.as_ref().map(|facts| facts.uptime_s),
        body_sha256: statement_body_digest(&body),
    };
    let mut token = crate::sign(&head, key)?;
    token.push(char::from(STATEMENT_BODY_SEPARATOR));
    token.push_str(&b64::encode(&body));
    Ok(token)
}

/// The one-part claims of a verified head and its body.
pub fn join_statement(head: HostStatementHead, body: HostStatementBody) -> HostStatementClaims {
    let host = body.host.map(|mut facts| {
        facts.uptime_s = head.uptime_s.unwrap_or(0);
        facts
    });
    HostStatementClaims {
        iss: head.iss,
        iat: head.iat,
        exp: head.exp,
        nonce: head.nonce,
        agent_version: body.agent_version,
        policy_version: body.policy_version,
        workloads: body.workloads,
        gpus: body.gpus,
        host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sign, Algorithm, PrivateJwk};

    fn body() -> HostStatementBody {
        HostStatementBody {
            agent_version: "0.1.0".into(),
            policy_version: Some(4),
            workloads: vec![],
            gpus: vec![],
            host: Some(HostFacts { kernel: "6.8.0".into(), boot_id: "b-1".into(), ..HostFacts::default() }),
        }
    }

    /// `head~body` for `body` (its JSON as given), the head naming `digest_of`'s digest.
    fn statement(key: &PrivateJwk, body_json: &[u8], digest_of: &[u8]) -> String {
        let head = HostStatementHead {
            iss: "node-1".into(),
            iat: 1_800_000_000,
            exp: 1_800_000_060,
            nonce: "0123456789abcdef".into(),
            uptime_s: Some(77),
            body_sha256: statement_body_digest(digest_of),
        };
        format!("{}~{}", sign(&head, key).unwrap(), b64::encode(body_json))
    }

    #[test]
    fn a_verified_pair_gives_the_one_part_claims() {
        let key = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        let jwks = Jwks::from_keys([key.public_key()]).unwrap();
        let json = serde_json::to_vec(&body()).unwrap();
        let token = statement(&key, &json, &json);
        assert!(is_split_statement(token.as_bytes()));
        let options = VerifyOptions::default();
        let claims = verify_split_statement(token.as_bytes(), &jwks, &options, 1_800_000_010).unwrap().claims;
        assert_eq!(
            (claims.iss.as_str(), claims.nonce.as_str(), claims.policy_version),
            ("node-1", "0123456789abcdef", Some(4))
        );
        let host = claims.host.unwrap();
        assert_eq!(
            (host.uptime_s, host.boot_id.as_str()),
            (77, "b-1"),
            "the head's uptime joins the body's facts"
        );
        // The straightforward signer gives the same claims.
        let one_part = join_statement(
            HostStatementHead {
                iss: "node-1".into(),
                iat: 1_800_000_000,
                exp: 1_800_000_060,
                nonce: "0123456789abcdef".into(),
                uptime_s: Some(77),
                body_sha256: String::new(),
            },
            body(),
        );
        let signed = sign_split_statement(&one_part, &key).unwrap();
        let read = verify_split_statement(signed.as_bytes(), &jwks, &options, 1_800_000_010).unwrap().claims;
        assert_eq!(read, one_part);
        // Expired, as any statement.
        assert!(matches!(
            verify_split_statement(token.as_bytes(), &jwks, &options, 1_800_000_500),
            Err(VerifyError::Expired { .. })
        ));
    }

    #[test]
    fn a_changed_body_a_foreign_key_or_a_bad_shape_is_refused() {
        let key = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        let jwks = Jwks::from_keys([key.public_key()]).unwrap();
        let options = VerifyOptions::default();
        let now = 1_800_000_010;
        let json = serde_json::to_vec(&body()).unwrap();
        let mut other = body();
        other.policy_version = Some(5);
        let other = serde_json::to_vec(&other).unwrap();
        let swapped = statement(&key, &other, &json);
        let err = verify_split_statement(swapped.as_bytes(), &jwks, &options, now).unwrap_err();
        assert!(err.to_string().contains("body_sha256"), "{err}");
        let stranger = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        let forged = statement(&stranger, &json, &json);
        assert!(matches!(
            verify_split_statement(forged.as_bytes(), &jwks, &options, now),
            Err(VerifyError::BadSignature(_))
        ));
        let good = statement(&key, &json, &json);
        for bad in [good.replace('~', ""), format!("{good}~x"), good.replace('~', "~!")] {
            assert!(verify_split_statement(bad.as_bytes(), &jwks, &options, now).is_err(), "{bad}");
        }
        let duplicate = br#"{"agent_version":"a","agent_version":"b","workloads":[]}"#;
        let dup = statement(&key, duplicate, duplicate);
        let err = verify_split_statement(dup.as_bytes(), &jwks, &options, now).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let small = VerifyOptions { max_token_bytes: good.len() - 1, ..VerifyOptions::default() };
        assert!(matches!(
            verify_split_statement(good.as_bytes(), &jwks, &small, now),
            Err(VerifyError::TooLarge { .. })
        ));
        // A head is no one-part statement, and a one-part verifier refuses it by its type.
        let head = good.split('~').next().unwrap();
        assert!(crate::verify::<HostStatementClaims>(head.as_bytes(), &jwks, &options, now).is_err());
    }
}
