//! `kycd-collector hosts …` as an operator runs it, on a SQLite file and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_test_support::pg;

use std::process::Command;

use kycd_protocol::{Algorithm, PrivateJwk};

fn collector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(args).output().unwrap()
}

#[test]
fn hosts_add_list_remove_and_private_keys_are_refused_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: `hosts add` creates it.
    let db = format!("sqlite://{}", dir.path().join("sub/kycd.db").display());
    hosts_add_list_remove(&dir, &db);
}

#[test]
fn hosts_add_list_remove_and_private_keys_are_refused_on_postgres() {
    let Some(pg) = pg::fresh_database("hosts_add_list_remove_and_private_keys_are_refused_on_postgres")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    hosts_add_list_remove(&dir, &pg.url);
}

#[test]
fn bad_database_urls_are_refused_without_leaking_the_password() {
    for (db, expect) in [
        ("mysql://kycd:s3cret@db/kycd", "unsupported database URL"),
        ("postgres://kycd:s3cret@db:notaport/kycd", "invalid database URL"),
        ("postgres://kycd:s3cret@127.0.0.1:1/kycd?sslmode=require", "without TLS"),
    ] {
        let out = collector(&["hosts", "list", "--db", db]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{db}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{db}: {stderr}");
    }
}

fn hosts_add_list_remove(dir: &tempfile::TempDir, db: &str) {
    let db = db.to_owned();
    let key = PrivateJwk::generate(Algorithm::EdDSA, "host-1").unwrap();
    let private = dir.path().join("private.jwk");
    let public = dir.path().join("public.jwk");
    std::fs::write(&private, key.to_json().as_bytes()).unwrap();
    std::fs::write(&public, key.public_key().to_jwk().to_string()).unwrap();

    let out = collector(&[
        "hosts",
        "add",
        "--host-id",
        "host-1",
        "--public-jwk",
        private.to_str().unwrap(),
        "--db",
        &db,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("private key"), "{stderr}");

    let ec = dir.path().join("ec.jwk");
    let ec_key = PrivateJwk::generate(Algorithm::ES256, "host-1").unwrap();
    std::fs::write(&ec, ec_key.public_key().to_jwk().to_string()).unwrap();
    let out = collector(&[
        "hosts",
        "add",
        "--host-id",
        "host-1",
        "--public-jwk",
        ec.to_str().unwrap(),
        "--db",
        &db,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Ed25519"));

    let out = collector(&[
        "hosts",
        "add",
        "--host-id",
        "host-1",
        "--public-jwk",
        public.to_str().unwrap(),
        "--db",
        &db,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = collector(&[
        "hosts",
        "add",
        "--host-id",
        "host-1",
        "--public-jwk",
        public.to_str().unwrap(),
        "--db",
        &db,
    ]);
    assert!(!out.status.success(), "enrolling twice does not replace the key");

    let out = collector(&["hosts", "list", "--db", &db]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("host-1\t"), "{stdout}");
    assert!(!stdout.contains("\"d\""));

    assert!(stdout.contains("\tepoch=1\t"), "{stdout}");

    assert!(collector(&["hosts", "remove", "--host-id", "host-1", "--db", &db]).status.success());
    assert!(!collector(&["hosts", "remove", "--host-id", "host-1", "--db", &db]).status.success());
    let out = collector(&["hosts", "list", "--db", &db]);
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());

    // Re-imaged: the same host id with a new key is the next enrollment epoch.
    let rekeyed = dir.path().join("rekeyed.jwk");
    let new_key = PrivateJwk::generate(Algorithm::EdDSA, "host-1").unwrap();
    std::fs::write(&rekeyed, new_key.public_key().to_jwk().to_string()).unwrap();
    let add = |jwk: &std::path::Path| {
        collector(&[
            "hosts",
            "add",
            "--host-id",
            "host-1",
            "--public-jwk",
            jwk.to_str().unwrap(),
            "--db",
            &db,
        ])
    };
    let out = add(&rekeyed);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "enrolled host-1 (enrollment epoch 2)\n");
    let out = collector(&["hosts", "list", "--db", &db]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\tepoch=2\tacked_seq=0\t"));
    // Back to the first key: its epoch continues.
    assert!(collector(&["hosts", "remove", "--host-id", "host-1", "--db", &db]).status.success());
    let out = add(&public);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "enrolled host-1 (enrollment epoch 1)\n");
}

fn policy_token(issuer: &PrivateJwk, version: u64, exp_offset: i64) -> String {
    let now = kycd_protocol::clock::unix_now();
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(serde_json::json!({
        "iss": "authority", "iat": now - 10, "exp": now + exp_offset, "version": version, "measures": [],
        "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                       "early_warning_fraction": 0.5}
    }))
    .unwrap();
    kycd_protocol::sign(&claims, issuer).unwrap()
}

#[test]
fn policy_publish_accepts_only_newer_validly_signed_policies_and_export_and_findings_run() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kycd.db").display());
    let issuer = PrivateJwk::generate(Algorithm::EdDSA, "authority").unwrap();
    let stranger = PrivateJwk::generate(Algorithm::EdDSA, "authority").unwrap();
    let trust = dir.path().join("trust.jwks");
    let jwks = kycd_protocol::Jwks::from_keys([issuer.public_key()]).unwrap();
    std::fs::write(&trust, jwks.to_json().to_string()).unwrap();
    let write = |name: &str, token: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, token).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let publish =
        |file: &str| collector(&["policy", "publish", file, "--trust", trust.to_str().unwrap(), "--db", &db]);
    let text = |out: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };

    let out = collector(&["policy", "show", "--db", &db]);
    assert!(!out.status.success() && text(&out).contains("no policy has been published"), "{}", text(&out));
    let v2 = write("v2.jws", policy_token(&issuer, 2, 86_400));
    let out = publish(&v2);
    assert!(out.status.success() && text(&out).contains("published policy version 2"), "{}", text(&out));
    for (file, why) in [
        (write("v1.jws", policy_token(&issuer, 1, 86_400)), "not newer"),
        (v2.clone(), "not newer"),
        (write("forged.jws", policy_token(&stranger, 3, 86_400)), "does not verify"),
        (write("expired.jws", policy_token(&issuer, 4, -3_600)), "does not verify"),
        (write("garbage.jws", "not.a.token".into()), "does not verify"),
    ] {
        let out = publish(&file);
        assert!(!out.status.success() && text(&out).contains(why), "{file}: {}", text(&out));
    }
    let out = collector(&["policy", "show", "--token", "--db", &db]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), std::fs::read_to_string(&v2).unwrap());

    let out = collector(&["findings", "evaluate", "--db", &db]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "open\t0\n");
    let out = collector(&["findings", "list", "--kind", "bogus", "--db", &db]);
    assert!(!out.status.success() && text(&out).contains("unknown finding kind"));

    let out = collector(&["export", "--since", "2026-01-01", "--format", "csv", "--db", &db]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tenant,legal_name,countries,"));
    let out = collector(&["export", "--since", "2026-01-01", "--unattributed", "--db", &db]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        kycd_collector::export::UNATTRIBUTED_CSV_HEADER.join(",") + "\r\n"
    );
    let out = collector(&["findings", "list", "--kind", "unattributed_training_scale", "--db", &db]);
    assert!(out.status.success(), "{}", text(&out));
    let out = collector(&["export", "--since", "last tuesday", "--db", &db]);
    assert!(!out.status.success() && text(&out).contains("is not a date"), "{}", text(&out));
}
