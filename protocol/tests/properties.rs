//! Property tests: the verifier never panics, signing round-trips any valid claims, and no
//! single-byte change to a valid token is accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_protocol::{
    b64, sign, sign_payload, verify, Algorithm, AttestationClaims, BeneficialOwner, Binding, BindingKind,
    CountryCode, Jwks, Kyc, KycStatus, PolicyClaims, PrivateJwk, Reseller, Subject, SubjectKind, TokenClaims,
    VerifyOptions,
};
use proptest::prelude::*;
use std::sync::OnceLock;

const NOW: i64 = 1_800_000_000;

struct Keys {
    ed: PrivateJwk,
    es: PrivateJwk,
    jwks: Jwks,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ed = PrivateJwk::generate(Algorithm::EdDSA, "ed").unwrap();
        let es = PrivateJwk::generate(Algorithm::ES256, "es").unwrap();
        let jwks = Jwks::from_keys([ed.public_key(), es.public_key()]).unwrap();
        Keys { ed, es, jwks }
    })
}

fn country() -> impl Strategy<Value = CountryCode> {
    let all: Vec<CountryCode> = CountryCode::all().collect();
    proptest::sample::select(all)
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._:/-]{0,40}"
}

fn name() -> impl Strategy<Value = String> {
    // Printable, including non-ASCII; no control characters.
    "[A-Za-z0-9 .,'&äöüéçñ漢字-]{1,60}".prop_filter("not blank", |s| !s.trim().is_empty())
}

fn binding() -> impl Strategy<Value = Binding> {
    let host = || proptest::option::of(id());
    prop_oneof![
        ("[a-z0-9_.-]{1,20}", host()).prop_map(|(p, h)| Binding {
            kind: BindingKind::Cgroup,
            id: format!("/machine.slice/{p}x.scope"),
            host_id: h
        }),
        (any::<u32>(), host()).prop_map(|(u, h)| Binding {
            kind: BindingKind::UnixUser,
            id: u.to_string(),
            host_id: h
        }),
        ("[a-f0-9-]{1,36}", host()).prop_map(|(d, h)| Binding {
            kind: BindingKind::LibvirtDomain,
            id: d,
            host_id: h
        }),
        (id(), host()).prop_map(|(i, h)| Binding { kind: BindingKind::Host, id: i, host_id: h }),
    ]
}

prop_compose! {
    fn attestation()(
        iss in id(), sub in id(), jti in id(),
        iat in (NOW - 1_000_000)..(NOW + 30),
        lifetime in 100i64..10_000_000,
        nbf_offset in proptest::option::of(-1000i64..30),
        status in prop_oneof![Just(KycStatus::Verified), Just(KycStatus::Pending), Just(KycStatus::Rejected)],
        kind in prop_oneof![Just(SubjectKind::Individual), Just(SubjectKind::Organization)],
        legal_name in name(),
        countries in proptest::collection::vec(country(), 1..4),
        owners in proptest::collection::vec((name(), proptest::collection::vec(country(), 1..3)), 0..3),
        resellers in proptest::collection::vec((name(), country(), proptest::option::of(any::<bool>())), 0..3),
        payment in proptest::option::of(country()),
        binding in binding(),
        foreign_person in any::<bool>(),
    ) -> AttestationClaims {
        let exp = (iat + lifetime).max(NOW + 100);
        AttestationClaims {
            iss, sub, jti, iat, nbf: nbf_offset.map(|o| NOW + o), exp,
            kyc: Kyc { status, verified_at: Some(iat - 10), method: Some("document".into()) },
            subject: Subject {
                kind,
                legal_name,
                countries,
                nationality_countries: vec![],
                incorporation_country: None,
                location_countries: vec![],
            },
            beneficial_owners: owners.into_iter().map(|(name, countries)| BeneficialOwner { name, countries }).collect(),
            resellers: resellers.into_iter().map(|(name, country, f)| Reseller { name, country, foreign_person: f }).collect(),
            payment_source_country: payment,
            binding,
            foreign_person,
            purposes: vec![],
            person_status: None,
        }
    }
}

fn valid_token(es: bool) -> String {
    let claims: AttestationClaims = serde_json::from_value(serde_json::json!({
        "iss": "https://kyc.example.test", "sub": "tenant-1", "jti": "j-1",
        "iat": NOW - 10, "exp": NOW + 3600,
        "kyc": {"status": "verified"},
        "subject": {"kind": "organization", "legal_name": "Acme", "countries": ["DE"]},
        "binding": {"kind": "host", "id": "h1"}, "foreign_person": true
    }))
    .unwrap();
    sign(&claims, if es { &keys().es } else { &keys().ed }).unwrap()
}

fn opts() -> VerifyOptions {
    VerifyOptions::default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(verify::<AttestationClaims>(&bytes, &keys().jwks, &opts(), NOW).is_err());
        let _ = verify::<PolicyClaims>(&bytes, &keys().jwks, &opts(), NOW);
        let _ = Jwks::from_json(&bytes);
        let _ = PrivateJwk::from_json(&bytes);
    }

    #[test]
    fn arbitrary_segments_never_panic(h in proptest::collection::vec(any::<u8>(), 0..300),
                                      p in proptest::collection::vec(any::<u8>(), 0..300),
                                      s in proptest::collection::vec(any::<u8>(), 0..100)) {
        let token = format!("{}.{}.{}", b64::encode(&h), b64::encode(&p), b64::encode(&s));
        prop_assert!(verify::<AttestationClaims>(token.as_bytes(), &keys().jwks, &opts(), NOW).is_err());
    }

    /// Arbitrary payloads *correctly signed* reach the JSON and claim layers: no panic there
    /// either, and only a valid claim set is accepted.
    #[test]
    fn signed_arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..600),
                                             json in "\\{(\"[a-z]{1,4}\":(1|\"x\"|\\[\\]|\\{\\}|null),?){0,6}\\}") {
        for body in [payload.as_slice(), json.as_bytes()] {
            let token = sign_payload(body, AttestationClaims::TOKEN_TYPE.typ(), &keys().ed);
            prop_assert!(verify::<AttestationClaims>(token.as_bytes(), &keys().jwks, &opts(), NOW).is_err());
        }
    }

    #[test]
    fn sign_verify_round_trips(claims in attestation(), es in any::<bool>()) {
        let key = if es { &keys().es } else { &keys().ed };
        let token = sign(&claims, key).unwrap();
        let verified = verify::<AttestationClaims>(token.as_bytes(), &keys().jwks, &opts(), NOW).unwrap();
        prop_assert_eq!(verified.claims, claims);
        prop_assert_eq!(verified.header.kid, key.kid());
    }

    #[test]
    fn any_single_byte_mutation_is_rejected(index in any::<proptest::sample::Index>(), byte in any::<u8>(), es in any::<bool>()) {
        let token = valid_token(es);
        let mut bytes = token.into_bytes();
        let i = index.index(bytes.len());
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        prop_assert!(verify::<AttestationClaims>(&bytes, &keys().jwks, &opts(), NOW).is_err(),
                     "mutation at {} to {:#04x} accepted", i, byte);
    }
}

#[test]
fn every_byte_position_mutated_is_rejected() {
    // Exhaustive over positions (one replacement each) for both algorithms, complementing the
    // random byte values above.
    for es in [false, true] {
        let token = valid_token(es);
        assert!(verify::<AttestationClaims>(token.as_bytes(), &keys().jwks, &opts(), NOW).is_ok());
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            assert!(
                verify::<AttestationClaims>(&bytes, &keys().jwks, &opts(), NOW).is_err(),
                "position {i} accepted"
            );
        }
    }
}
