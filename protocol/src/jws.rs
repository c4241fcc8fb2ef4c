//! JWS compact serialization (RFC 7515 §7.1): signing, and verification that refuses every
//! token it should.
//!
//! The order of checks is deliberate: size first (before decoding anything), then the shape and
//! strict base64url of all three segments, then the header rules, key resolution and the
//! signature, and only then is the payload parsed as JSON — unauthenticated payload bytes never
//! reach the JSON parser or the claim types. Claims are then checked for time validity and
//! deserialized into the token type's struct.
//!
//! Header rules: `alg` ∈ {EdDSA, ES256} and consistent with the key; `kid` names exactly one
//! trusted key; `typ` equals the expected token type exactly; `crit`, `b64`, and embedded or
//! remote key parameters (`jwk`, `jku`, `x5u`, `x5c`) are refused. Other header parameters
//! (e.g. `cty`) are ignored, as RFC 7515 §4 permits.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::claims::TokenClaims;
use crate::json::{parse_strict, scan_object, ScannedObject};
use crate::jwk::{Algorithm, Jwks, PrivateJwk, PublicKey, VerifyingMaterial};
use crate::{b64, VerifyError};

/// Default cap on a whole compact token, checked before any decoding.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Cap on the decoded protected header; real headers are under 200 bytes.
pub const MAX_HEADER_BYTES: usize = 4 * 1024;
/// Default tolerance for clock skew between issuer and verifier.
pub const DEFAULT_CLOCK_SKEW_S: u64 = 60;

/// Header parameters that are refused outright (see the module doc).
const FORBIDDEN_HEADERS: [&str; 6] = ["crit", "b64", "jwk", "jku", "x5u", "x5c"];

/// Tunables of verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Largest accepted token, in bytes of compact serialization.
    pub max_token_bytes: usize,
    /// Seconds of clock skew tolerated for `exp`, `nbf` and `iat`.
    pub clock_skew_s: u64,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { max_token_bytes: DEFAULT_MAX_TOKEN_BYTES, clock_skew_s: DEFAULT_CLOCK_SKEW_S }
    }
}

/// The protected header of a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Algorithm the token was signed with.
    pub alg: Algorithm,
    /// Key that verified it.
    pub kid: String,
    /// Token type.
    pub typ: String,
}

/// A token that passed every check, with its typed claims.
#[derive(Debug, Clone)]
pub struct Verified<C> {
    /// The protected header.
    pub header: Header,
    /// The claims, typed and validated.
    pub claims: C,
}

/// Signs `claims` as a compact JWS whose `typ` is the claims' token type. The header is
/// `{"alg","kid","typ"}` and nothing else.
pub fn sign<C: TokenClaims + Serialize>(claims: &C, key: &PrivateJwk) -> Result<String, VerifyError> {
    let payload = serde_json::to_vec(claims)
        .map_err(|e| VerifyError::Malformed(format!("claims do not serialize: {e}")))?;
    Ok(sign_payload(&payload, C::TOKEN_TYPE.typ(), key))
}

/// Signs raw payload bytes under a header with the given `typ`. The caller is responsible
/// for the payload being the claims it means; [`sign`] is the typed entry point.
pub fn sign_payload(payload: &[u8], typ: &str, key: &PrivateJwk) -> String {
    sign_encoded_payload(&b64::encode(payload), typ, key)
}

/// [`sign_payload`] for a payload that is already base64url-encoded (unpadded), so a caller
/// that keeps most of a payload's encoding between tokens (the agent's host statements,
/// whose volatile fields lead the payload) encodes only what changed.
pub fn sign_encoded_payload(payload_b64: &str, typ: &str, key: &PrivateJwk) -> String {
    let mut header = Map::new();
    header.insert("alg".into(), Value::String(key.algorithm().as_str().into()));
    header.insert("kid".into(), Value::String(key.kid().into()));
    header.insert("typ".into(), Value::String(typ.into()));
    let header = b64::encode(Value::Object(header).to_string().as_bytes());
    let mut token = String::with_capacity(header.len() + payload_b64.len() + 90);
    token.push_str(&header);
    token.push('.');
    token.push_str(payload_b64);
    let signature = key.sign_raw(token.as_bytes());
    token.push('.');
    token.push_str(&b64::encode(&signature));
    token
}

/// The `typ` of a report upload's signature (`X-Kycd-Signature` on `POST /v1/reports`).
pub const REPORT_SIGNATURE_TYP: &str = "kyc-report+jws";

/// Signs `body` as a JWS with a detached payload (RFC 7515 Appendix F): the compact form
/// `header..signature`, whose signing input is `b64(header) "." b64(body)`. Report uploads
/// carry it in `X-Kycd-Signature`, signing the exact (compressed) request body, so the
/// collector authenticates a batch before it decompresses or parses anything.
pub fn sign_detached(body: &[u8], typ: &str, key: &PrivateJwk) -> String {
    let token = sign_payload(body, typ, key);
    let header = token.split('.').next().unwrap_or_default();
    let signature = token.rsplit('.').next().unwrap_or_default();
    format!("{header}..{signature}")
}

/// Verifies a detached JWS (`header..signature`) over `body` against `jwks`, with every
/// header rule of [`verify`] (algorithm allow-list, `kid` resolving to exactly one key, `typ`
/// equal to `expected_typ`, no `crit`/`b64`/embedded keys). Returns the header (its `kid`
/// names the signer).
pub fn verify_detached(
    detached: &[u8],
    body: &[u8],
    jwks: &Jwks,
    expected_typ: &'static str,
) -> Result<Header, VerifyError> {
    let mut segments = detached.split(|&b| b == b'.');
    let (Some(header_b64), Some(b""), Some(signature_b64), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return Err(VerifyError::Malformed("a detached JWS is `header..signature`".into()));
    };
    let mut token = Vec::with_capacity(header_b64.len() + body.len() * 4 / 3 + signature_b64.len() + 4);
    token.extend_from_slice(header_b64);
    token.push(b'.');
    token.extend_from_slice(b64::encode(body).as_bytes());
    token.push(b'.');
    token.extend_from_slice(signature_b64);
    let options = VerifyOptions { max_token_bytes: usize::MAX, clock_skew_s: DEFAULT_CLOCK_SKEW_S };
    verify_envelope(&token, jwks, &options, expected_typ).map(|(header, _)| header)
}

/// Verifies a compact JWS against `jwks` as a token of type `C` at time `now` (Unix seconds).
pub fn verify<C: TokenClaims>(
    token: &[u8],
    jwks: &Jwks,
    options: &VerifyOptions,
    now: i64,
) -> Result<Verified<C>, VerifyError> {
    let (header, payload) = verify_envelope(token, jwks, options, C::TOKEN_TYPE.typ())?;
    let claims = decode_claims::<C>(&payload, options, now)?;
    Ok(Verified { header, claims })
}

/// Everything up to and including the signature: returns the header and the authenticated
/// payload bytes.
fn verify_envelope(
    token: &[u8],
    jwks: &Jwks,
    options: &VerifyOptions,
    expected_typ: &'static str,
) -> Result<(Header, Vec<u8>), VerifyError> {
    if token.len() > options.max_token_bytes {
        return Err(VerifyError::TooLarge {
            part: "token",
            size: token.len(),
            limit: options.max_token_bytes,
        });
    }
    let mut segments = token.split(|&b| b == b'.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        let count = token.split(|&b| b == b'.').count();
        return Err(VerifyError::Malformed(format!(
            "a compact JWS has 3 dot-separated segments, this has {count}"
        )));
    };
    let segment = |name: &str, text: &[u8]| {
        b64::decode(text)
            .map_err(|e| VerifyError::Malformed(format!("{name} segment is not strict base64url: {e}")))
    };
    // Exact decoded length of unpadded base64url (a remainder of 1 is invalid and is refused
    // by the decoder below).
    let header_len = header_b64.len() * 3 / 4;
    if header_len > MAX_HEADER_BYTES {
        return Err(VerifyError::TooLarge { part: "header", size: header_len, limit: MAX_HEADER_BYTES });
    }
    let header_bytes = segment("header", header_b64)?;
    let payload = segment("payload", payload_b64)?;
    let signature = segment("signature", signature_b64)?;

    let header = parse_header(&header_bytes, expected_typ)?;
    let key = resolve_key(jwks, &header)?;
    let signing_input_len = header_b64.len() + 1 + payload_b64.len();
    verify_signature(key, &token[..signing_input_len], &signature)?;
    Ok((header, payload))
}

fn parse_header(bytes: &[u8], expected_typ: &'static str) -> Result<Header, VerifyError> {
    let value = parse_strict(bytes).map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(VerifyError::Malformed("header is not a JSON object".into()));
    };
    if let Some(name) = FORBIDDEN_HEADERS.iter().find(|n| fields.contains_key(**n)) {
        return Err(VerifyError::ForbiddenHeader((*name).to_owned()));
    }
    let text = |name: &'static str| -> Result<&str, VerifyError> {
        match fields.get(name) {
            None => Err(VerifyError::MissingHeader(name)),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(VerifyError::Malformed(format!("header parameter {name:?} is not a string"))),
        }
    };
    let alg_name = text("alg")?;
    let alg = Algorithm::from_jose(alg_name)
        .ok_or_else(|| VerifyError::UnsupportedAlgorithm(truncate(alg_name)))?;
    let typ = text("typ")?;
    if typ != expected_typ {
        return Err(VerifyError::WrongType { expected: expected_typ, found: truncate(typ) });
    }
    let kid = text("kid")?;
    Ok(Header { alg, kid: kid.to_owned(), typ: typ.to_owned() })
}

fn resolve_key<'a>(jwks: &'a Jwks, header: &Header) -> Result<&'a PublicKey, VerifyError> {
    let mut matching = jwks.keys().iter().filter(|k| k.kid() == header.kid);
    let key = matching.next().ok_or_else(|| VerifyError::UnknownKey(truncate(&header.kid)))?;
    if matching.next().is_some() {
        return Err(VerifyError::AmbiguousKey(truncate(&header.kid)));
    }
    if key.algorithm() != header.alg {
        return Err(VerifyError::KeyAlgorithmMismatch {
            kid: truncate(&header.kid),
            key: key.material.type_name(),
            alg: header.alg.as_str().to_owned(),
        });
    }
    Ok(key)
}

/// The signature layer alone: is `signature` valid for `signing_input` under `key`, with the
/// key's algorithm? Ed25519 uses `verify_strict` (rejects non-canonical `S` and small-order
/// `A`/`R`); ES256 requires exactly 64 bytes `r‖s` (a DER signature is refused).
///
/// ES256 accepts both `s` and `n − s`: RFC 7518 does not require low-S and other
/// implementations (PyJWT/OpenSSL) emit either. So an ES256 token's bytes, and its
/// [`crate::token_digest`], are not unique for given claims; identity is the `jti`.
pub fn verify_signature(key: &PublicKey, signing_input: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
    match &key.material {
        VerifyingMaterial::Ed25519(k) => {
            let bytes: &[u8; 64] = signature
                .try_into()
                .map_err(|_| VerifyError::BadSignature("an Ed25519 signature is exactly 64 bytes"))?;
            let sig = ed25519_dalek::Signature::from_bytes(bytes);
            k.verify_strict(signing_input, &sig)
                .map_err(|_| VerifyError::BadSignature("Ed25519 verification failed"))
        }
        VerifyingMaterial::P256(k) => {
            use p256::ecdsa::signature::Verifier as _;
            if signature.len() != 64 {
                return Err(VerifyError::BadSignature("an ES256 signature is exactly 64 bytes r||s"));
            }
            let sig = p256::ecdsa::Signature::from_slice(signature)
                .map_err(|_| VerifyError::BadSignature("ES256 r or s out of range"))?;
            k.verify(signing_input, &sig).map_err(|_| VerifyError::BadSignature("ES256 verification failed"))
        }
    }
}

/// Registered time claims, read before the typed claims so their errors are precise.
struct TimeClaims {
    exp: i64,
    nbf: Option<i64>,
    iat: Option<i64>,
}

const TIME_CLAIMS: [&str; 3] = ["exp", "nbf", "iat"];

fn numeric_date(claims: &ScannedObject, name: &str) -> Result<Option<i64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
            VerifyError::invalid(name, "must be an integer number of seconds since the epoch")
        }),
        Some(_) => Err(VerifyError::invalid(name, "must be a number (seconds since the epoch)")),
    }
}

fn time_claims(claims: &ScannedObject) -> Result<TimeClaims, VerifyError> {
    Ok(TimeClaims {
        exp: numeric_date(claims, "exp")?.ok_or_else(|| VerifyError::MissingClaim("exp".into()))?,
        nbf: numeric_date(claims, "nbf")?,
        iat: numeric_date(claims, "iat")?,
    })
}

fn check_times(t: &TimeClaims, now: i64, skew_s: u64) -> Result<(), VerifyError> {
    let skew = i64::try_from(skew_s).unwrap_or(i64::MAX);
    if now.saturating_sub(skew) >= t.exp {
        return Err(VerifyError::Expired { exp: t.exp, now, skew_s });
    }
    if let Some(nbf) = t.nbf {
        if now.saturating_add(skew) < nbf {
            return Err(VerifyError::NotYetValid { nbf, now, skew_s });
        }
    }
    if let Some(iat) = t.iat {
        if now.saturating_add(skew) < iat {
            return Err(VerifyError::IssuedInFuture { iat, now, skew_s });
        }
    }
    Ok(())
}

/// Payload → typed claims. One strict scan (duplicates, depth, UTF-8, top-level members and
/// time claims), then serde straight from the bytes into `C`; no intermediate JSON tree.
fn decode_claims<C: TokenClaims>(
    payload: &[u8],
    options: &VerifyOptions,
    now: i64,
) -> Result<C, VerifyError> {
    let scanned =
        scan_object(payload, &TIME_CLAIMS).map_err(|e| VerifyError::Malformed(format!("payload: {e}")))?;
    check_times(&time_claims(&scanned)?, now, options.clock_skew_s)?;
    if let Some(missing) = C::REQUIRED_CLAIMS.iter().find(|name| !scanned.has(name)) {
        return Err(VerifyError::MissingClaim((*missing).to_owned()));
    }
    // Path tracking costs as much as the parse itself, so it runs only to explain a failure.
    let claims: C = match serde_json::from_slice(payload) {
        Ok(claims) => claims,
        Err(plain) => return Err(explain_claim_error::<C>(payload, plain)),
    };
    claims.validate()?;
    Ok(claims)
}

/// Re-parses a payload that failed to deserialize, tracking the path to the failing claim.
fn explain_claim_error<C: TokenClaims>(payload: &[u8], plain: serde_json::Error) -> VerifyError {
    let mut de = serde_json::Deserializer::from_slice(payload);
    match serde_path_to_error::deserialize::<_, C>(&mut de) {
        Err(e) => {
            let claim = e.path().to_string();
            VerifyError::InvalidClaim { claim, reason: e.into_inner().to_string() }
        }
        // Unreachable in practice (same input, same deserializer); fail closed regardless.
        Ok(_) => VerifyError::InvalidClaim { claim: ".".into(), reason: plain.to_string() },
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_rules_honour_skew() {
        let t = |exp, nbf, iat| TimeClaims { exp, nbf, iat };
        assert!(check_times(&t(1000, None, None), 1059, 60).is_ok());
        assert_eq!(check_times(&t(1000, None, None), 1060, 60).unwrap_err().kind(), "Expired");
        assert!(check_times(&t(5000, Some(1060), None), 1000, 60).is_ok());
        assert_eq!(check_times(&t(5000, Some(1061), None), 1000, 60).unwrap_err().kind(), "NotYetValid");
        assert!(check_times(&t(5000, None, Some(1060)), 1000, 60).is_ok());
        assert_eq!(check_times(&t(5000, None, Some(1061)), 1000, 60).unwrap_err().kind(), "IssuedInFuture");
        assert_eq!(check_times(&t(i64::MIN, None, None), i64::MIN, u64::MAX).unwrap_err().kind(), "Expired");
        assert!(check_times(&t(i64::MAX, Some(0), Some(0)), i64::MAX - 1, u64::MAX).is_ok());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(100);
        let t = truncate(&s);
        assert!(t.len() <= 64 + '…'.len_utf8());
        assert!(t.ends_with('…'));
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;
    use crate::HostStatementClaims;

    #[test]
    fn pre_encoded_payloads_sign_exactly_like_sign() {
        let key = PrivateJwk::generate(Algorithm::EdDSA, "node-1").unwrap();
        let jwks = Jwks::from_keys([key.public_key()]).unwrap();
        let claims = HostStatementClaims {
            iss: "node-1".into(),
            iat: 1_800_000_000,
            exp: 1_800_000_060,
            nonce: "0123456789abcdef".into(),
            agent_version: "0.1.0".into(),
            policy_version: Some(3),
            workloads: vec![],
            gpus: vec![],
            host: None,
        };
        let typ = crate::TokenType::HostStatement.typ();
        let payload = serde_json::to_vec(&claims).unwrap();
        let typed = sign(&claims, &key).unwrap();
        assert_eq!(sign_payload(&payload, typ, &key), typed, "Ed25519 is deterministic");
        let encoded = sign_encoded_payload(&b64::encode(&payload), typ, &key);
        assert_eq!(encoded, typed);
        let options = VerifyOptions::default();
        let read = verify::<HostStatementClaims>(encoded.as_bytes(), &jwks, &options, 1_800_000_010).unwrap();
        assert_eq!(read.claims, claims);
    }
}

#[cfg(test)]
mod detached_tests {
    use super::*;

    #[test]
    fn detached_signatures_cover_the_exact_body() {
        let key = PrivateJwk::generate(Algorithm::EdDSA, "host-1").unwrap();
        let jwks = Jwks::from_keys([key.public_key()]).unwrap();
        let body = b"\x1f\x8b gzip bytes, not JSON";
        let sig = sign_detached(body, REPORT_SIGNATURE_TYP, &key);
        assert!(sig.contains(".."), "{sig}");
        let header = verify_detached(sig.as_bytes(), body, &jwks, REPORT_SIGNATURE_TYP).unwrap();
        assert_eq!(header.kid, "host-1");
        let err = verify_detached(sig.as_bytes(), b"another body", &jwks, REPORT_SIGNATURE_TYP).unwrap_err();
        assert_eq!(err.kind(), "BadSignature");
        let err = verify_detached(sig.as_bytes(), body, &jwks, "kyc-attestation+jwt").unwrap_err();
        assert_eq!(err.kind(), "WrongType");
        let attached = sign_payload(body, REPORT_SIGNATURE_TYP, &key);
        let err = verify_detached(attached.as_bytes(), body, &jwks, REPORT_SIGNATURE_TYP).unwrap_err();
        assert_eq!(err.kind(), "Malformed", "an attached payload is not a detached signature");
        let other = PrivateJwk::generate(Algorithm::EdDSA, "host-2").unwrap();
        let forged = sign_detached(body, REPORT_SIGNATURE_TYP, &other);
        assert_eq!(
            verify_detached(forged.as_bytes(), body, &jwks, REPORT_SIGNATURE_TYP).unwrap_err().kind(),
            "UnknownKey"
        );
    }
}
