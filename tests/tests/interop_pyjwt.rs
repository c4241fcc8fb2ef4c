#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! PyJWT interop: PyJWT-made tokens verify in kycd; kycd-made ones in PyJWT (opt-in: KYCD_INTEROP_PYTHON).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kycd_protocol::{
    sign, verify, Algorithm, AttestationClaims, BindingKind, Jwks, KycStatus, MeasureAction, PolicyClaims,
    PrivateJwk, Role, UnverifiedHandling, Verified, VerifyOptions,
};
use serde::Deserialize;

type Manifest = kycd_tests::Manifest<Case>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    file: String,
    typ: String,
    jwks: String,
    alg: String,
    kid: String,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    version: Option<u64>,
}

fn interop_dir() -> PathBuf {
    kycd_tests::corpus_dir("interop")
}

fn manifest() -> Manifest {
    kycd_tests::read_manifest(&interop_dir())
}

fn load_jwks(case: &Case) -> Jwks {
    Jwks::from_json(&fs::read(interop_dir().join(&case.jwks)).unwrap()).unwrap()
}

fn options(m: &Manifest) -> VerifyOptions {
    VerifyOptions { max_token_bytes: 65536, clock_skew_s: m.skew_s }
}

fn check_header<C>(case: &Case, v: &Verified<C>, typ: &str) {
    assert_eq!(v.header.alg.as_str(), case.alg, "{}", case.name);
    assert_eq!(v.header.kid, case.kid, "{}", case.name);
    assert_eq!(v.header.typ, typ, "{}", case.name);
}

fn check_attestation(case: &Case, c: &AttestationClaims, now: i64) {
    let name = &case.name;
    assert_eq!(Some(&c.sub), case.sub.as_ref(), "{name}");
    assert_eq!(c.iss, "https://kyc.example-cloud.test", "{name}");
    assert_eq!(c.jti, format!("att-pyjwt-{}", case.alg.to_lowercase()), "{name}");
    assert_eq!((c.iat, c.nbf, c.exp), (now - 100, Some(now - 100), now + 86_400), "{name}");
    assert_eq!(c.kyc.status, KycStatus::Verified, "{name}");
    assert_eq!(c.kyc.verified_at, Some(now - 1000), "{name}");
    assert_eq!(c.subject.legal_name, "Example Labs GmbH", "{name}");
    let countries: Vec<String> = c.countries_by_role().map(|(r, cc)| format!("{r:?}:{cc}")).collect();
    assert_eq!(
        countries,
        ["Customer:DE", "BeneficialOwner:DE", "BeneficialOwner:AT", "Reseller:NL", "PaymentSource:DE"],
        "{name}"
    );
    assert_eq!(c.binding.kind, BindingKind::LibvirtDomain, "{name}");
    assert_eq!(c.binding.id, "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10", "{name}");
    assert_eq!(c.binding.host_id.as_deref(), Some("i-0abc"), "{name}");
    assert!(c.foreign_person, "{name}");
}

fn check_policy(case: &Case, c: &PolicyClaims, now: i64) {
    let name = &case.name;
    assert_eq!(Some(c.version), case.version, "{name}");
    assert_eq!(c.iss, "policy-authority", "{name}");
    assert_eq!((c.iat, c.exp), (now - 100, now + 30 * 86_400), "{name}");
    let ids: Vec<&str> = c.measures.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m-kp", "m-cond"], "{name}");
    let kp = &c.measures[0];
    assert_eq!(kp.action, MeasureAction::Prohibit, "{name}");
    assert_eq!(kp.matcher.countries.iter().map(|c| c.as_str()).collect::<Vec<_>>(), ["KP"], "{name}");
    assert_eq!(
        kp.roles,
        [Role::Customer, Role::BeneficialOwner, Role::Reseller, Role::PaymentSource],
        "{name}"
    );
    assert_eq!(kp.effective_from, Some(now - 100), "{name}");
    let cond = &c.measures[1];
    assert_eq!(cond.action, MeasureAction::Condition, "{name}");
    let conditions = cond.conditions.as_ref().unwrap();
    assert_eq!((conditions.max_gpus, conditions.report_all_usage), (Some(8), true), "{name}");
    assert_eq!(c.unverified, UnverifiedHandling::Grace { grace_s: 86_400 }, "{name}");
    assert_eq!(c.thresholds.training_ops, 1e26, "{name}");
    assert_eq!(c.thresholds.bio_training_ops, 1e23, "{name}");
    assert_eq!(c.thresholds.cluster_flops, 1e20, "{name}");
    assert_eq!(c.thresholds.early_warning_fraction, 0.01, "{name}");
}

#[test]
fn pyjwt_tokens_verify_in_kycd() {
    let m = manifest();
    let algs: std::collections::BTreeSet<(&str, &str)> =
        m.cases.iter().map(|c| (c.alg.as_str(), c.typ.as_str())).collect();
    assert_eq!(algs.len(), 4, "expected EdDSA and ES256 tokens of both types: {algs:?}");
    for case in &m.cases {
        let jwks = load_jwks(case);
        let token = fs::read(interop_dir().join(&case.file)).unwrap();
        match case.typ.as_str() {
            "attestation" => {
                let v = verify::<AttestationClaims>(&token, &jwks, &options(&m), m.now)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", case.name, e.kind()));
                check_header(case, &v, "kyc-attestation+jwt");
                check_attestation(case, &v.claims, m.now);
            }
            "policy" => {
                let v = verify::<PolicyClaims>(&token, &jwks, &options(&m), m.now)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", case.name, e.kind()));
                check_header(case, &v, "kyc-policy+jwt");
                check_policy(case, &v.claims, m.now);
            }
            other => panic!("{}: unknown typ {other:?}", case.name),
        }
    }
}

/// Re-signs every PyJWT token's claims with kycd (same keys, loaded as kycd private JWKs) and
/// has `tests/interop/pyjwt_verify.py` verify the result. Needs Python with PyJWT, so it only
/// runs when `KYCD_INTEROP_PYTHON` names the interpreter; otherwise it checks just the kycd side.
#[test]
fn kycd_signed_tokens_verify_in_pyjwt() {
    let m = manifest();
    let python = std::env::var_os("KYCD_INTEROP_PYTHON");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop").join("pyjwt_verify.py");
    let tmp = tempfile::tempdir().unwrap();
    for case in &m.cases {
        let jwks = load_jwks(case);
        let key_file = interop_dir().join("keys").join(format!("{}.jwk", case.kid));
        let key = PrivateJwk::from_json(&fs::read(&key_file).unwrap()).unwrap();
        assert_eq!(key.algorithm(), if case.alg == "EdDSA" { Algorithm::EdDSA } else { Algorithm::ES256 });
        let token = fs::read(interop_dir().join(&case.file)).unwrap();
        let resigned = match case.typ.as_str() {
            "attestation" => {
                let v = verify::<AttestationClaims>(&token, &jwks, &options(&m), m.now).unwrap();
                let again = sign(&v.claims, &key).unwrap();
                let back = verify::<AttestationClaims>(again.as_bytes(), &jwks, &options(&m), m.now).unwrap();
                assert_eq!(back.claims, v.claims, "{}", case.name);
                again
            }
            _ => {
                let v = verify::<PolicyClaims>(&token, &jwks, &options(&m), m.now).unwrap();
                let again = sign(&v.claims, &key).unwrap();
                let back = verify::<PolicyClaims>(again.as_bytes(), &jwks, &options(&m), m.now).unwrap();
                assert_eq!(back.claims, v.claims, "{}", case.name);
                again
            }
        };
        let Some(python) = &python else { continue };
        let file = tmp.path().join(format!("kycd-{}.jws", case.name));
        fs::write(&file, &resigned).unwrap();
        let out = Command::new(python)
            .arg(&script)
            .arg(&file)
            .arg(interop_dir().join(&case.jwks))
            .arg(&case.typ)
            .args(["--now", &m.now.to_string(), "--skew", &m.skew_s.to_string()])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python:?}: {e}"));
        assert!(
            out.status.success(),
            "{}: PyJWT refused kycd's token: {}{}",
            case.name,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed["header"]["alg"], case.alg.as_str(), "{}", case.name);
        assert_eq!(printed["header"]["kid"], case.kid.as_str(), "{}", case.name);
        match (&case.sub, case.version) {
            (Some(sub), _) => assert_eq!(printed["claims"]["sub"], sub.as_str(), "{}", case.name),
            (None, Some(version)) => assert_eq!(printed["claims"]["version"], version, "{}", case.name),
            (None, None) => panic!("{}: manifest names neither sub nor version", case.name),
        }
    }
    if python.is_none() {
        eprintln!("KYCD_INTEROP_PYTHON not set: kycd-signed tokens were not checked with PyJWT");
    }
}
