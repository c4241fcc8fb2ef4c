//! Host statements pre-serialised once per snapshot, so a request only splices in what
//! changes per request and signs.
//!
//! The payload is the claims' JSON with the volatile fields first:
//! `{"iat":…,"exp":…,"nonce":"…"[,"host":{"uptime_s":…]` (the *head*, built per request),
//! then the rest of the host facts and every other claim (the *tail*, serialised when the
//! snapshot changes). The head is padded with 0–2 spaces (JSON whitespace) to a multiple of
//! 3 bytes, so the payload's base64url is the head's followed by the tail's, and the tail's
//! encoding is kept too: per request only the ~100-byte head is encoded, and the signature
//! (Ed25519 over the whole signing input) is computed. Collectors parse the payload, so
//! key order and whitespace do not matter to them; the fields and values are those of
//! [`kycd_protocol::sign`] over the stamped claims.
//!
//! The nonce is checked again here, before splicing: it is the one request-supplied value,
//! and an unchecked quote or backslash would let it write JSON.
//!
//! The same snapshot also gives the digest-bound form (`?v=2`,
//! [`kycd_protocol::HostStatementHead`]): its body (every claim but the head's) is
//! serialised, encoded and hashed here once, so a request signs only a ~300-byte head —
//! Ed25519 hashes its whole input twice, which made the one-part statement's cost grow with
//! the host's workloads.

use std::fmt::Write as _;

use kycd_protocol::{
    b64, statement_body_digest, HostStatementClaims, HostStatementHead, PrivateJwk, TokenType,
};
use serde_json::Value;

/// A nonce a statement may carry: 16–64 characters of the URL-safe base64 alphabet (so it is
/// also safe to splice into the statement's JSON: no quote, backslash or control character).
pub fn valid_nonce(nonce: &str) -> bool {
    (16..=64).contains(&nonce.len())
        && nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Why a statement cannot be prepared or stamped.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The claims do not serialise to a JSON object.
    #[error("the statement claims do not serialise")]
    Serialize(#[source] serde_json::Error),
    /// The claims serialise to something other than an object.
    #[error("the statement claims are not a JSON object")]
    NotAnObject,
    /// The nonce is not 16–64 URL-safe characters (refused before splicing).
    #[error("the nonce is not 16-64 URL-safe characters")]
    InvalidNonce,
    /// The digest-bound statement's head does not sign.
    #[error("the statement head does not sign")]
    Head(#[source] kycd_protocol::VerifyError),
}

/// A snapshot's statement, serialised but for its per-request fields.
#[derive(Debug, Clone)]
pub struct PreparedStatement {
    /// Whether the claims carry host facts (and so a per-request `host.uptime_s`).
    has_host: bool,
    /// The payload after the head: the remaining host facts (closing `host`), then every
    /// other claim and the closing brace; starts with `,` or `}`.
    tail: String,
    /// `tail`, base64url-encoded.
    tail_b64: String,
    /// The issuer (host id), for the digest-bound form's head.
    iss: String,
    /// The digest-bound form's body (JSON of every claim but the head's), base64url-encoded.
    body_b64: String,
    /// Its `body_sha256`.
    body_sha256: String,
}

/// Claims stamped per request, moved into the head.
const VOLATILE: [&str; 3] = ["iat", "exp", "nonce"];

/// `{…}` → the members between the braces (empty for `{}`).
fn members(object: &serde_json::Map<String, Value>) -> Result<String, StatementError> {
    let text = serde_json::to_string(object).map_err(StatementError::Serialize)?;
    Ok(text.get(1..text.len().saturating_sub(1)).unwrap_or_default().to_owned())
}

impl PreparedStatement {
    /// Serialises `claims` without their volatile fields (`iat`, `exp`, `nonce`,
    /// `host.uptime_s`).
    pub fn new(claims: &HostStatementClaims) -> Result<Self, StatementError> {
        let Value::Object(mut object) = serde_json::to_value(claims).map_err(StatementError::Serialize)?
        else {
            return Err(StatementError::NotAnObject);
        };
        for name in VOLATILE {
            object.remove(name);
        }
        let mut body = object.clone();
        body.remove("iss");
        if let Some(Value::Object(host)) = body.get_mut("host") {
            host.remove("uptime_s");
        }
        let body = serde_json::to_vec(&body).map_err(StatementError::Serialize)?;
        let mut tail = String::new();
        let has_host = match object.remove("host") {
            Some(Value::Object(mut host)) => {
                host.remove("uptime_s");
                let rest = members(&host)?;
                if !rest.is_empty() {
                    tail.push(',');
                    tail.push_str(&rest);
                }
                tail.push('}');
                true
            }
            Some(_) => return Err(StatementError::NotAnObject),
            None => false,
        };
        let rest = members(&object)?;
        if !rest.is_empty() {
            tail.push(',');
            tail.push_str(&rest);
        }
        tail.push('}');
        let tail_b64 = b64::encode(tail.as_bytes());
        Ok(PreparedStatement {
            has_host,
            tail,
            tail_b64,
            iss: claims.iss.clone(),
            body_b64: b64::encode(&body),
            body_sha256: statement_body_digest(&body),
        })
    }

    /// The head for these values, padded to a multiple of 3 bytes; refuses an invalid nonce.
    fn head(&self, nonce: &str, iat: i64, exp: i64, uptime_s: u64) -> Result<String, StatementError> {
        if !valid_nonce(nonce) {
            return Err(StatementError::InvalidNonce);
        }
        let mut head = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = write!(head, r#"{{"iat":{iat},"exp":{exp},"nonce":"{nonce}""#);
        if self.has_host {
            let _ = write!(head, r#","host":{{"uptime_s":{uptime_s}"#);
        }
        while head.len() % 3 != 0 {
            head.push(' ');
        }
        Ok(head)
    }

    /// The payload (JSON) for these per-request values.
    pub fn payload(&self, nonce: &str, iat: i64, exp: i64, uptime_s: u64) -> Result<String, StatementError> {
        Ok(self.head(nonce, iat, exp, uptime_s)? + &self.tail)
    }

    /// The signed statement (compact JWS, `typ: kyc-host-statement+jwt`) for these values.
    pub fn sign(
        &self,
        key: &PrivateJwk,
        nonce: &str,
        iat: i64,
        exp: i64,
        uptime_s: u64,
    ) -> Result<String, StatementError> {
        let head = self.head(nonce, iat, exp, uptime_s)?;
        let mut payload_b64 = b64::encode(head.as_bytes());
        payload_b64.push_str(&self.tail_b64);
        Ok(kycd_protocol::sign_encoded_payload(&payload_b64, TokenType::HostStatement.typ(), key))
    }

    /// The body's `body_sha256`.
    pub fn body_sha256(&self) -> &str {
        &self.body_sha256
    }

    /// The digest-bound statement (`head~body`, [`kycd_protocol::verify_split_statement`])
    /// for these values: only the head is built and signed per request. `with_body: false`
    /// leaves the body out (`head~`), for a collector that said it holds it.
    pub fn sign_split(
        &self,
        key: &PrivateJwk,
        nonce: &str,
        iat: i64,
        exp: i64,
        uptime_s: u64,
        with_body: bool,
    ) -> Result<String, StatementError> {
        if !valid_nonce(nonce) {
            return Err(StatementError::InvalidNonce);
        }
        let head = HostStatementHead {
            iss: self.iss.clone(),
            iat,
            exp,
            nonce: nonce.to_owned(),
            uptime_s: self.has_host.then_some(uptime_s),
            body_sha256: self.body_sha256.clone(),
        };
        let mut token = kycd_protocol::sign(&head, key).map_err(StatementError::Head)?;
        token.push(char::from(kycd_protocol::STATEMENT_BODY_SEPARATOR));
        if with_body {
            token.push_str(&self.body_b64);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use kycd_protocol::{Algorithm, HostFacts, Jwks, VerifyOptions, WorkloadStatement};

    use super::*;

    fn claims(host: Option<HostFacts>) -> HostStatementClaims {
        HostStatementClaims {
            iss: "node-1".into(),
            iat: 0,
            exp: 0,
            nonce: String::new(),
            agent_version: "0.1.0".into(),
            policy_version: Some(7),
            workloads: vec![WorkloadStatement {
                workload: "libvirt_domain:vm-\"1\"\\é".into(),
                tenant: Some("t".into()),
                attestation_digest: None,
                attestation_exp: Some(5),
                verdict: kycd_protocol::Verdict::Allow,
                conditions: None,
                subject: None,
            }],
            gpus: vec![],
            host,
        }
    }

    fn stamped(mut claims: HostStatementClaims, nonce: &str, iat: i64, uptime_s: u64) -> HostStatementClaims {
        claims.nonce = nonce.into();
        claims.iat = iat;
        claims.exp = iat + 60;
        if let Some(host) = claims.host.as_mut() {
            host.uptime_s = uptime_s;
        }
        claims
    }

    #[test]
    fn spliced_payloads_are_the_stamped_claims() {
        let facts =
            HostFacts { kernel: "6.8.0".into(), boot_id: "b".into(), uptime_s: 9, ..HostFacts::default() };
        let key = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        let jwks = Jwks::from_keys([key.public_key()]).unwrap();
        for host in [None, Some(facts)] {
            let snapshot = claims(host);
            let prepared = PreparedStatement::new(&snapshot).unwrap();
            // Nonce lengths and numbers of every size move the head's padding through 0, 1, 2.
            for (nonce, iat, uptime) in [
                ("0123456789abcdef", 1_800_000_000, 0),
                ("0123456789abcdef-", 1_800_000_000, 12),
                ("0123456789abcdef_X", -1, u64::MAX),
                (&*"A".repeat(64), i64::MAX - 60, 1),
            ] {
                let want = stamped(snapshot.clone(), nonce, iat, uptime);
                let payload = prepared.payload(nonce, iat, iat + 60, uptime).unwrap();
                let parsed: Value = serde_json::from_str(&payload).unwrap();
                assert_eq!(parsed, serde_json::to_value(&want).unwrap(), "{payload}");
                let token = prepared.sign(&key, nonce, iat, iat + 60, uptime).unwrap();
                let encoded = token.split('.').nth(1).unwrap();
                assert_eq!(b64::decode(encoded.as_bytes()).unwrap(), payload.as_bytes());
                if iat > 0 {
                    let options = VerifyOptions::default();
                    let read =
                        kycd_protocol::verify::<HostStatementClaims>(token.as_bytes(), &jwks, &options, iat)
                            .unwrap();
                    assert_eq!(read.claims, want);
                    // The digest-bound form of the same snapshot gives the same claims.
                    let split = prepared.sign_split(&key, nonce, iat, iat + 60, uptime, true).unwrap();
                    let read = kycd_protocol::verify_split_statement(split.as_bytes(), &jwks, &options, iat)
                        .unwrap();
                    assert_eq!(read.claims, want);
                    assert!(split.len() > token.len(), "the body rides along in full");
                    // Left out, it is what the collector puts back.
                    let head = prepared.sign_split(&key, nonce, iat, iat + 60, uptime, false).unwrap();
                    let body = kycd_protocol::statement_body_part(split.as_bytes()).unwrap();
                    assert!(head.ends_with('~'));
                    let joined = [head.as_bytes(), body].concat();
                    let read = kycd_protocol::verify_split_statement(&joined, &jwks, &options, iat).unwrap();
                    assert_eq!(read.claims, want);
                    assert!(
                        kycd_protocol::verify_split_statement(head.as_bytes(), &jwks, &options, iat).is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn hostile_nonces_are_refused_before_splicing() {
        let prepared = PreparedStatement::new(&claims(None)).unwrap();
        let key = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        for nonce in [
            r#"0123456789abcdef","iss":"evil"#,
            "0123456789abcdef\\",
            "0123456789abcdef\n",
            "0123456789abcdef\u{0}",
            "0123456789abcdé",
            "short",
        ] {
            let err = prepared.payload(nonce, 1, 61, 0).unwrap_err();
            assert!(matches!(err, StatementError::InvalidNonce), "{nonce:?}: {err}");
            assert!(matches!(prepared.sign(&key, nonce, 1, 61, 0), Err(StatementError::InvalidNonce)));
        }
    }
}
