//! `kycctl keygen/sign/verify` as operators and scripts use them: the real binary, real
//! files, exit codes and stderr format.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn kycctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kycctl")).args(args).output().unwrap()
}

fn kycctl_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kycctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn now() -> i64 {
    kycd_protocol::clock::wall().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn attestation_claims(dir: &Path, country: &str) -> String {
    let path = dir.join(format!("claims-{country}.json"));
    let claims = serde_json::json!({
        "iss": "https://kyc.example.test", "sub": "tenant-42", "jti": "att-1",
        "exp": now() + 3600,
        "kyc": {"status": "verified"},
        "subject": {"kind": "individual", "legal_name": "Jane Doe", "countries": [country]},
        "binding": {"kind": "unix_user", "id": "1001"},
        "foreign_person": true
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&claims).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn keygen_sign_verify_round_trip_for_both_algorithms() {
    let dir = tempfile::tempdir().unwrap();
    let claims = attestation_claims(dir.path(), "FR");
    for (alg, kid) in [("ed25519", "issuer-ed"), ("es256", "issuer-es")] {
        let out = kycctl(&["keygen", "--alg", alg, "--kid", kid, "--out", s(&dir.path().join("keys"))]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let private = dir.path().join(format!("keys/{kid}.private.jwk"));
        let jwks = dir.path().join(format!("keys/{kid}.jwks"));
        assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        let public: serde_json::Value = serde_json::from_slice(&std::fs::read(&jwks).unwrap()).unwrap();
        assert!(public["keys"][0].get("d").is_none(), "private material in the public JWKS");

        let signed = kycctl(&["sign", "--key", s(&private), "--typ", "attestation", &claims]);
        assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
        let token_path = dir.path().join(format!("{kid}.jws"));
        std::fs::write(&token_path, &signed.stdout).unwrap(); // keeps println!'s newline

        let verified = kycctl(&["verify", "--jwks", s(&jwks), "--typ", "attestation", s(&token_path)]);
        assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
        let claims: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
        assert_eq!(claims["sub"], "tenant-42");
        let iat = claims["iat"].as_i64().expect("sign fills iat");
        assert!((iat - now()).abs() < 60);

        // The same token from stdin.
        let from_stdin =
            kycctl_stdin(&["verify", "--jwks", s(&jwks), "--typ", "attestation", "-"], &signed.stdout);
        assert!(from_stdin.status.success());

        // Wrong type: exit 1 with the kind first.
        let wrong = kycctl(&["verify", "--jwks", s(&jwks), "--typ", "policy", s(&token_path)]);
        assert_eq!(wrong.status.code(), Some(1));
        assert!(wrong.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&wrong.stderr);
        assert!(stderr.starts_with("error: WrongType: "), "{stderr}");
    }
}

#[test]
fn verify_reports_the_kind_and_exit_1_for_invalid_tokens() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/jws");
    let jwks = corpus.join("issuers.jwks");
    for (file, kind) in [
        ("alg-none.jws", "UnsupportedAlgorithm"),
        ("sig-payload-swapped.jws", "BadSignature"),
        ("exp-expired.jws", "Expired"),
        ("country-xk.jws", "InvalidClaim"),
    ] {
        let out = kycctl(&[
            "verify",
            "--jwks",
            s(&jwks),
            "--typ",
            "attestation",
            "--at",
            "1800000000",
            s(&corpus.join(file)),
        ]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(&format!("error: {kind}: ")), "{file}: {stderr}");
    }
    // The valid corpus token verifies at the corpus clock, and is expired by now.
    let valid = corpus.join("valid-eddsa-attestation.jws");
    let ok = kycctl(&["verify", "--jwks", s(&jwks), "--typ", "attestation", "--at", "1800000000", s(&valid)]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let later =
        kycctl(&["verify", "--jwks", s(&jwks), "--typ", "attestation", "--at", "1900000000", s(&valid)]);
    assert!(String::from_utf8_lossy(&later.stderr).starts_with("error: Expired: "));
}

#[test]
fn sign_refuses_claims_that_would_not_verify() {
    let dir = tempfile::tempdir().unwrap();
    assert!(kycctl(&["keygen", "--alg", "ed25519", "--kid", "k", "--out", s(dir.path())]).status.success());
    let key = dir.path().join("k.private.jwk");
    let bad_country = attestation_claims(dir.path(), "XK");
    let out = kycctl(&["sign", "--key", s(&key), "--typ", "attestation", &bad_country]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "a refused token must not be printed");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: InvalidClaim: "));

    let no_exp = dir.path().join("no-exp.json");
    std::fs::write(&no_exp, br#"{"iss":"a","sub":"b"}"#).unwrap();
    let out = kycctl(&["sign", "--key", s(&key), "--typ", "attestation", s(&no_exp)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: MissingClaim: "));

    let dup = dir.path().join("dup.json");
    std::fs::write(&dup, br#"{"exp":1,"exp":2}"#).unwrap();
    let out = kycctl(&["sign", "--key", s(&key), "--typ", "policy", s(&dup)]);
    assert_eq!(out.status.code(), Some(2), "unparseable claims are an input error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate key"));
}

#[test]
fn usage_and_io_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = kycctl(&["verify", "--jwks", s(&missing), "--typ", "attestation", s(&missing)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(kycctl(&["verify", "--typ", "attestation"]).status.code() == Some(2));
    assert!(kycctl(&["sign", "--typ", "nonsense"]).status.code() == Some(2));
    // A public JWKS is not a signing key.
    assert!(kycctl(&["keygen", "--alg", "es256", "--kid", "k", "--out", s(dir.path())]).status.success());
    let out = kycctl(&["sign", "--key", s(&dir.path().join("k.jwks")), "--typ", "policy", s(&missing)]);
    assert_eq!(out.status.code(), Some(2));
    // keygen never overwrites.
    let again = kycctl(&["keygen", "--alg", "es256", "--kid", "k", "--out", s(dir.path())]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // --help documents the exit codes.
    let help = kycctl(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit codes"));
}
