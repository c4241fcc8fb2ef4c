//! `kycctl` as operators and scripts use it: the real binary, real files, a real agent over
//! its real socket; exit codes and stderr format. keygen/sign/verify; the global flags
//! (`--socket`, `--config`, `--json`/`-o json`, before or after the subcommand); `status`
//! exiting 4 with a one-line reason while the agent is unhealthy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kycd_test_support::host::{self as host_support, Host};

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

/// kycctl's exit code, stdout and stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = kycctl(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running agent with a policy in force, and its socket; `None` (skipped) unless root:
/// the socket answers root or its group only.
fn agent(test: &str, extra_config: &str, policy: bool) -> Option<(Host, String)> {
    if !host_support::is_root() {
        kycd_test_support::skip!("SKIP {test}: the operator socket answers root (or its group) only");
        return None;
    }
    let mut host = Host::new(extra_config);
    if policy {
        host.write_policy(1, &["KP"]);
    }
    host.start();
    let socket = host.path("run/kycd.sock").display().to_string();
    Some((host, socket))
}

#[test]
fn socket_json_and_config_are_global_before_or_after_the_subcommand() {
    let Some((mut host, socket)) = agent("global flags", "", true) else { return };
    let socket = socket.as_str();
    for args in [vec!["--socket", socket, "status"], vec!["status", "--socket", socket]] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("policy:       version 1 signed by authority-1"), "{args:?}: {out}");
    }
    // --json and -o json / --output json, before or after; the same JSON.
    for args in [
        vec!["--json", "--socket", socket, "status"],
        vec!["status", "--json", "--socket", socket],
        vec!["-o", "json", "--socket", socket, "status"],
        vec!["--socket", socket, "status", "-o", "json"],
        vec!["--output=json", "status", "--socket", socket],
        vec!["-ojson", "status", "--socket", socket],
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let status: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        assert_eq!(status["policy"]["version"], 1, "{args:?}");
    }
    for args in
        [vec!["-o", "json", "--socket", socket, "workloads"], vec!["--socket", socket, "-o", "json", "gpus"]]
    {
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
    }
    // -o text is the default; contradicting --json, or an unknown format, is a usage error.
    let (code, out, _) = run(&["-o", "text", "--socket", socket, "status"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("kycd "), "{out}");
    let (code, _, err) = run(&["--json", "-o", "text", "--socket", socket, "status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("contradict"), "{err}");
    let (code, _, err) = run(&["-o", "yaml", "--socket", socket, "status"]);
    assert_eq!(code, 2, "{err}");
    // --config, before or after, for the commands that read the configuration.
    let config = host.path("etc/kycd.toml").display().to_string();
    for args in [vec!["--config", &config, "host-id"], vec!["host-id", "--config", &config]] {
        let (code, out, err) = run(&args);
        assert_eq!((code, out.trim()), (0, "node-1"), "{args:?}: {err}");
    }
    // A global flag a command has no use for changes nothing.
    let (code, out, _) = run(&["--socket", "/nonexistent.sock", "--config", &config, "host-id"]);
    assert_eq!((code, out.trim()), (0, "node-1"));
    host.stop();
    // The global --socket is the one used: nothing listens there now.
    let (code, _, err) = run(&["--socket", socket, "status"]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn status_exits_4_with_a_one_line_reason_while_the_agent_is_unhealthy() {
    let Some((mut host, socket)) = agent("unhealthy status", "", false) else { return };
    let socket = socket.as_str();
    // No policy in force: every workload is denied. The summary still prints in full.
    let (code, out, err) = run(&["--socket", socket, "status"]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains("policy:       none (every workload denied)"), "{out}");
    assert_eq!(err, "error: unhealthy: no policy in force (every workload denied)\n");
    // The same verdict with JSON on stdout.
    let (code, out, err) = run(&["status", "-o", "json", "--socket", socket]);
    assert_eq!(code, 4, "{err}");
    assert!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["policy"].is_null());
    assert_eq!(err.lines().count(), 1, "{err}");
    // A policy arrives: healthy again.
    host.write_policy(1, &["KP"]);
    let deadline = kycd_protocol::clock::monotonic() + std::time::Duration::from_secs(15);
    loop {
        let (code, out, err) = run(&["--socket", socket, "status"]);
        if code == 0 {
            assert!(err.is_empty(), "{err}");
            break;
        }
        assert_eq!(code, 4, "{err}");
        assert!(kycd_protocol::clock::monotonic() < deadline, "never healthy:\n{out}{err}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    host.stop();
}

#[test]
fn status_exits_4_while_enforcement_is_failing_and_names_the_backend() {
    // Enforce mode with an nft that cannot be started: every reconciliation fails.
    // (No GPU backend either: with none available, prohibiting GPUs fails as well.)
    let extra = "mode = \"enforce\"\n[enforcement]\nreconcile_interval_s = 1\ncgroup = false\n\
                 nft_command = [\"/nonexistent/kycd-test-nft\"]\n[gpu]\nenabled = false\n";
    let Some((mut host, socket)) = agent("enforcement failing", extra, true) else { return };
    let deadline = kycd_protocol::clock::monotonic() + std::time::Duration::from_secs(15);
    let (out, err) = loop {
        let (code, out, err) = run(&["--socket", &socket, "status"]);
        if code == 4 {
            break (out, err);
        }
        assert!(kycd_protocol::clock::monotonic() < deadline, "exit {code}:\n{out}{err}\n{}", host.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: unhealthy: enforcement failing: nftables: "), "{err}");
    assert!(err.contains("/nonexistent/kycd-test-nft") && !err.contains("; "), "only nftables: {err}");
    assert!(out.contains("FAILING now: nftables: "), "{out}");
    let (_, json, _) = run(&["--json", "--socket", &socket, "status"]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        status["enforcement_failing"]["nftables"].as_str().unwrap().contains("kycd-test-nft"),
        "{status}"
    );
    assert!(status["enforcement_errors"]["nftables"].as_u64().unwrap() >= 1, "{status}");
    host.stop();
}
