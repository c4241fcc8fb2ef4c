#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Published JOSE test vectors (RFC 8037 A.4 Ed25519, RFC 7515 A.3 ES256) at the signature layer.

use kycd_protocol::{b64, verify_signature, Algorithm, PublicKey};

/// RFC 8037 Appendix A.2: the public part of the A.1 Ed25519 key (plus a `kid`, which kycd requires).
const RFC8037_A2_JWK: &str =
    r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"rfc8037-a1"}"#;
/// RFC 8037 Appendix A.4: JWS Signing Input of `{"alg":"EdDSA"}` over "Example of Ed25519 signing".
const RFC8037_A4_SIGNING_INPUT: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
/// RFC 8037 Appendix A.4: the signature.
const RFC8037_A4_SIGNATURE: &str =
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

/// RFC 7515 Appendix A.3.1: the P-256 public key (plus a `kid`).
const RFC7515_A3_JWK: &str = concat!(
    r#"{"kty":"EC","crv":"P-256","#,
    r#""x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","#,
    r#""y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","#,
    r#""kid":"rfc7515-a3"}"#
);
/// RFC 7515 Appendix A.3.1: `{"alg":"ES256"}` . the A.1 JWT claims (with their CRLFs).
const RFC7515_A3_SIGNING_INPUT: &str = concat!(
    "eyJhbGciOiJFUzI1NiJ9",
    ".",
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt",
    "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
);
/// RFC 7515 Appendix A.3.1: the signature, R || S.
const RFC7515_A3_SIGNATURE: &str =
    "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";

fn check_vector(jwk: &str, alg: Algorithm, signing_input: &str, signature: &str) {
    let key = PublicKey::from_jwk_json(jwk.as_bytes()).unwrap();
    assert_eq!(key.algorithm(), alg);
    let sig = b64::decode(signature.as_bytes()).unwrap();
    assert_eq!(sig.len(), 64);
    verify_signature(&key, signing_input.as_bytes(), &sig).unwrap();

    // Any one-bit change of the signature or of the signing input must fail.
    for (i, bit) in [(0, 0x01), (31, 0x80), (32, 0x01), (63, 0x40)] {
        let mut bad = sig.clone();
        bad[i] ^= bit;
        let err = verify_signature(&key, signing_input.as_bytes(), &bad).unwrap_err();
        assert_eq!(err.kind(), "BadSignature", "signature byte {i} bit {bit:#x}");
    }
    for i in [0, signing_input.len() / 2, signing_input.len() - 1] {
        let mut input = signing_input.as_bytes().to_vec();
        input[i] ^= 0x01;
        let err = verify_signature(&key, &input, &sig).unwrap_err();
        assert_eq!(err.kind(), "BadSignature", "signing input byte {i}");
    }
}

#[test]
fn rfc8037_a4_ed25519() {
    // The payload really is the RFC's sentence under the RFC's header.
    let (header, payload) = RFC8037_A4_SIGNING_INPUT.split_once('.').unwrap();
    assert_eq!(b64::decode(header.as_bytes()).unwrap(), br#"{"alg":"EdDSA"}"#);
    assert_eq!(b64::decode(payload.as_bytes()).unwrap(), b"Example of Ed25519 signing");
    check_vector(RFC8037_A2_JWK, Algorithm::EdDSA, RFC8037_A4_SIGNING_INPUT, RFC8037_A4_SIGNATURE);
}

#[test]
fn rfc7515_a3_es256() {
    let (header, payload) = RFC7515_A3_SIGNING_INPUT.split_once('.').unwrap();
    assert_eq!(b64::decode(header.as_bytes()).unwrap(), br#"{"alg":"ES256"}"#);
    assert_eq!(
        b64::decode(payload.as_bytes()).unwrap(),
        b"{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}"
    );
    check_vector(RFC7515_A3_JWK, Algorithm::ES256, RFC7515_A3_SIGNING_INPUT, RFC7515_A3_SIGNATURE);
}

#[test]
fn vectors_do_not_cross_verify() {
    // Each key refuses the other vector's signature (wrong key, and for Ed25519 vs ES256 the
    // same 64-byte length, so only the maths can say no).
    let ed = PublicKey::from_jwk_json(RFC8037_A2_JWK.as_bytes()).unwrap();
    let es = PublicKey::from_jwk_json(RFC7515_A3_JWK.as_bytes()).unwrap();
    let ed_sig = b64::decode(RFC8037_A4_SIGNATURE.as_bytes()).unwrap();
    let es_sig = b64::decode(RFC7515_A3_SIGNATURE.as_bytes()).unwrap();
    assert!(verify_signature(&ed, RFC7515_A3_SIGNING_INPUT.as_bytes(), &es_sig).is_err());
    assert!(verify_signature(&es, RFC8037_A4_SIGNING_INPUT.as_bytes(), &ed_sig).is_err());
}
