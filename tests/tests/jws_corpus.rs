#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Runs every case of the bad-input JWS corpus (tests/corpus/jws, made by gen_corpus.py) through `verify`.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use kycd_protocol::{verify, AttestationClaims, Jwks, PolicyClaims, PrivateJwk, VerifyOptions};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    file: String,
    typ: String,
    jwks: String,
    expect: String,
    why: String,
}

type Manifest = kycd_tests::Manifest<Case>;

fn corpus_dir() -> PathBuf {
    kycd_tests::corpus_dir("jws")
}

fn manifest() -> Manifest {
    kycd_tests::read_manifest(&corpus_dir())
}

/// The outcome of one case: `ok`, the `VerifyError` kind, or the `KeyError` kind of a JWKS that
/// does not load. The second element is the error's message, for failure reports.
fn outcome(case: &Case, options: &VerifyOptions, now: i64) -> (String, String) {
    let dir = corpus_dir();
    let jwks_bytes =
        fs::read(dir.join(&case.jwks)).unwrap_or_else(|e| panic!("{}: {}: {e}", case.name, case.jwks));
    let jwks = match Jwks::from_json(&jwks_bytes) {
        Ok(jwks) => jwks,
        Err(e) => return (e.kind().to_owned(), format!("JWKS {}: {e}", case.jwks)),
    };
    let token =
        fs::read(dir.join(&case.file)).unwrap_or_else(|e| panic!("{}: {}: {e}", case.name, case.file));
    let result = match case.typ.as_str() {
        "attestation" => verify::<AttestationClaims>(&token, &jwks, options, now).map(|_| ()),
        "policy" => verify::<PolicyClaims>(&token, &jwks, options, now).map(|_| ()),
        other => panic!("{}: unknown typ {other:?}", case.name),
    };
    match result {
        Ok(()) => ("ok".to_owned(), String::new()),
        Err(e) => (e.kind().to_owned(), e.to_string()),
    }
}

#[test]
fn every_corpus_case_yields_its_expected_kind() {
    let manifest = manifest();
    let options = VerifyOptions { max_token_bytes: 65536, clock_skew_s: manifest.skew_s };
    let mut mismatches = Vec::new();
    for case in &manifest.cases {
        let (kind, detail) = outcome(case, &options, manifest.now);
        if kind != case.expect {
            mismatches.push(format!(
                "{}: expected {}, got {kind} ({detail}) — case: {}",
                case.name, case.expect, case.why
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} corpus cases failed:\n  {}",
        mismatches.len(),
        manifest.cases.len(),
        mismatches.join("\n  ")
    );
}

#[test]
fn manifest_is_substantial_and_consistent() {
    let manifest = manifest();
    let failures = manifest.cases.iter().filter(|c| c.expect != "ok").count();
    assert!(failures >= 40, "only {failures} failure cases");
    assert!(manifest.cases.iter().any(|c| c.expect == "ok"), "no positive control");

    let mut names = BTreeSet::new();
    let mut files = BTreeSet::new();
    for case in &manifest.cases {
        assert!(names.insert(case.name.as_str()), "duplicate case name {}", case.name);
        assert!(files.insert(case.file.as_str()), "two cases share {}", case.file);
        assert!(!case.why.trim().is_empty(), "{}: empty why", case.name);
        assert!(corpus_dir().join(&case.file).is_file(), "{}: missing {}", case.name, case.file);
        assert!(corpus_dir().join(&case.jwks).is_file(), "{}: missing {}", case.name, case.jwks);
    }
}

#[test]
fn every_token_file_is_in_the_manifest() {
    let manifest = manifest();
    let listed: BTreeSet<&str> = manifest.cases.iter().map(|c| c.file.as_str()).collect();
    let mut orphans = Vec::new();
    for entry in fs::read_dir(corpus_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".jws") && !listed.contains(name.as_str()) {
            orphans.push(name);
        }
    }
    orphans.sort();
    assert!(orphans.is_empty(), "token files not listed in manifest.json: {orphans:?}");
}

#[test]
fn corpus_signing_keys_match_the_trust_set() {
    let dir = corpus_dir();
    let issuers = Jwks::from_json(&fs::read(dir.join("issuers.jwks")).unwrap()).unwrap();
    assert_eq!(issuers.kids().collect::<Vec<_>>(), ["ed-1", "es-1"]);
    for (kid, trusted) in [("ed-1", true), ("es-1", true), ("ed-other", false)] {
        let key = PrivateJwk::from_json(&fs::read(dir.join("keys").join(format!("{kid}.jwk"))).unwrap())
            .unwrap_or_else(|e| panic!("keys/{kid}.jwk: {e}"));
        let public = key.public_key().to_jwk();
        let in_set = issuers.keys().iter().any(|k| k.to_jwk() == public);
        assert_eq!(in_set, trusted, "{kid}: in issuers.jwks = {in_set}");
    }
}
