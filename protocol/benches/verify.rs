//! Full attestation verification vs the raw Ed25519 `verify_strict` it is built on, over the
//! same signing input and signature, in the same run. Target: full ≥ 0.8× raw throughput.
//!
//!     cargo bench -p kycd-protocol --bench verify

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kycd_protocol::{b64, sign, verify, Algorithm, AttestationClaims, Jwks, PrivateJwk, VerifyOptions};

const NOW: i64 = 1_800_000_000;

fn claims() -> AttestationClaims {
    // A realistic attestation: organisation with owners and a reseller chain (~700 bytes).
    let value = serde_json::json!({
        "iss": "https://kyc.example-cloud.test", "sub": "tenant-000123", "jti": "att-7f3c9e1a-0001",
        "iat": NOW - 100, "nbf": NOW - 100, "exp": NOW + 86_400,
        "kyc": {"status": "verified", "verified_at": NOW - 5000, "method": "document+liveness"},
        "subject": {"kind": "organization", "legal_name": "Example Frontier Labs GmbH", "countries": ["DE", "CH"]},
        "beneficial_owners": [
            {"name": "A. Owner", "countries": ["DE", "AT"]},
            {"name": "B. Holder", "countries": ["CH"]}
        ],
        "resellers": [{"name": "Reseller BV", "country": "NL"}],
        "payment_source_country": "DE",
        "binding": {"kind": "libvirt_domain", "id": "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10", "host_id": "i-0abc"},
        "foreign_person": true
    });
    match serde_json::from_value(value) {
        Ok(c) => c,
        Err(e) => unreachable_claims(e),
    }
}

fn unreachable_claims(e: serde_json::Error) -> ! {
    eprintln!("benchmark claims do not parse: {e}");
    std::process::exit(1)
}

fn bench(c: &mut Criterion) {
    let Ok(key) = PrivateJwk::generate(Algorithm::EdDSA, "issuer-2026") else { std::process::exit(1) };
    let Ok(jwks) = Jwks::from_keys([key.public_key()]) else { std::process::exit(1) };
    let Ok(token) = sign(&claims(), &key) else { std::process::exit(1) };
    let options = VerifyOptions::default();
    if verify::<AttestationClaims>(token.as_bytes(), &jwks, &options, NOW).is_err() {
        std::process::exit(1);
    }

    // The raw baseline: the same signing input and signature, straight into dalek.
    let Some(dot) = token.rfind('.') else { std::process::exit(1) };
    let signing_input = token.as_bytes()[..dot].to_vec();
    let Ok(sig_bytes) = b64::decode(&token.as_bytes()[dot + 1..]) else { std::process::exit(1) };
    let Ok(sig_array) = <[u8; 64]>::try_from(sig_bytes.as_slice()) else { std::process::exit(1) };
    let signature = ed25519_dalek::Signature::from_bytes(&sig_array);
    let Ok(x) = b64::decode(key.public_key().to_jwk()["x"].as_str().unwrap_or("").as_bytes()) else {
        std::process::exit(1)
    };
    let Ok(x) = <[u8; 32]>::try_from(x.as_slice()) else { std::process::exit(1) };
    let Ok(raw_key) = ed25519_dalek::VerifyingKey::from_bytes(&x) else { std::process::exit(1) };

    let mut group = c.benchmark_group("attestation_verify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_ed25519_verify_strict", |b| {
        b.iter(|| raw_key.verify_strict(black_box(&signing_input), black_box(&signature)).is_ok())
    });
    group.bench_function("full_attestation_verify", |b| {
        b.iter(|| verify::<AttestationClaims>(black_box(token.as_bytes()), &jwks, &options, NOW).is_ok())
    });
    group.finish();
    eprintln!("token: {} bytes, signing input {} bytes", token.len(), signing_input.len());
}

criterion_group!(benches, bench);
criterion_main!(benches);
