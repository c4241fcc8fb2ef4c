//! `kycd-collector hosts …` as an operator runs it, on a SQLite file and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pg_support;

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
    let Some(pg) =
        pg_support::fresh_database("hosts_add_list_remove_and_private_keys_are_refused_on_postgres")
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

    assert!(collector(&["hosts", "remove", "--host-id", "host-1", "--db", &db]).status.success());
    assert!(!collector(&["hosts", "remove", "--host-id", "host-1", "--db", &db]).status.success());
    let out = collector(&["hosts", "list", "--db", &db]);
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
}
