//! The shipped cloud-config (packaging/cloud-init/kycd.yaml), applied by cloud-init itself:
//! a NoCloud seed holding it (placeholders filled with real keys and tokens) on a simulated
//! first boot, inside private mount, hostname and network namespaces with /etc and /var as
//! overlays (cloud_init_apply.sh). Checked: cloud-init writes exactly the files the
//! cloud-config lists, with their modes; `kycd check-config` accepts the configuration they
//! make with the packaged kycd.toml, and reads every file where cloud-init put it; the agent
//! accepts the host attestation against the instance id cloud-init recorded.
//!
//! Needs root (namespaces, mounts), cloud-init, unshare and python3-yaml (cloud-init's own
//! dependency, used to read the YAML); `tests/run` installs cloud-init.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use kycd_protocol::Jwks;
use kycd_test_support::host::{is_root, now, Host};
use serde_json::{json, Value};

const INSTANCE_ID: &str = "i-0kycd-cloud-init-test";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Whether `program` runs (`--version` or `--help` exits 0).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

/// The YAML file as JSON, read by PyYAML (what cloud-init itself parses it with).
fn yaml_to_json(path: &Path) -> Value {
    let out = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "PyYAML: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The shipped cloud-config with every `<…>` placeholder of its files filled in.
fn filled_cloud_config(host: &Host, host_attestation: &str, policy: &str) -> String {
    let jwk = |key: &kycd_protocol::PrivateJwk| {
        Jwks::from_keys([key.public_key()]).unwrap().to_json()["keys"][0].to_string()
    };
    let shipped = fs::read_to_string(repo("packaging/cloud-init/kycd.yaml")).unwrap();
    let mut filled = String::new();
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let value = if trimmed.starts_with("{\"keys\": [<KYC issuer public JWK") {
            Some(format!("{{\"keys\": [{}]}}", jwk(&host.issuer)))
        } else if trimmed.starts_with("{\"keys\": [<policy authority public JWK") {
            Some(format!("{{\"keys\": [{}]}}", jwk(&host.authority)))
        } else if trimmed.starts_with("<signed jurisdiction policy") {
            Some(policy.to_owned())
        } else if trimmed.starts_with("<this instance's host attestation") {
            Some(host_attestation.to_owned())
        } else {
            None
        };
        filled.push_str(indent);
        filled.push_str(value.as_deref().unwrap_or(trimmed));
        filled.push('\n');
    }
    filled
}

#[test]
fn cloud_init_applies_the_shipped_cloud_config_and_kycd_accepts_what_it_wrote() {
    if !is_root() {
        kycd_test_support::skip!("SKIP cloud-init apply: needs root for namespaces and mounts");
        return;
    }
    if !runs("cloud-init", &["--version"]) || !runs("unshare", &["--version"]) {
        kycd_test_support::skip!("SKIP cloud-init apply: cloud-init or unshare not installed");
        return;
    }
    if !runs("python3", &["-c", "import yaml"]) {
        kycd_test_support::skip!("SKIP cloud-init apply: no python3-yaml (cloud-init's dependency)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    for private in ["/etc", "/var", "/run"] {
        assert!(!work.path().starts_with(private), "the work dir must lie outside {private} (TMPDIR)");
    }
    let host = Host::new("");
    let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
        "iss": "kyc", "sub": "tenant-bare-metal", "jti": "host-att-1", "iat": now() - 5,
        "exp": now() + 3600, "kyc": {"status": "verified"},
        "subject": {"kind": "organization", "legal_name": "Renter AG", "countries": ["DE"]},
        "binding": {"kind": "host", "id": "bare-metal", "host_id": INSTANCE_ID},
        "foreign_person": true
    }))
    .unwrap();
    let host_attestation = kycd_protocol::sign(&claims, &host.issuer).unwrap();
    let policy = host.policy_token(7, &["KP"], json!({"action": "deny"}), None, &host.authority);
    let user_data = work.path().join("user-data");
    fs::write(&user_data, filled_cloud_config(&host, &host_attestation, &policy)).unwrap();
    fs::write(work.path().join("meta-data"), format!("instance-id: {INSTANCE_ID}\n")).unwrap();
    fs::copy(repo("packaging/kycd.toml"), work.path().join("kycd.toml")).unwrap();
    let cloud_config = yaml_to_json(&user_data);
    let write_files = cloud_config["write_files"].as_array().expect("write_files in the cloud-config");
    for f in write_files {
        let content = f["content"].as_str().unwrap();
        assert!(!content.contains('<'), "a placeholder this test does not fill: {content}");
    }
    // What the cloud-config's own schema check says of the filled file, too.
    let schema =
        Command::new("cloud-init").args(["schema", "--config-file"]).arg(&user_data).output().unwrap();
    assert!(schema.status.success(), "{}", String::from_utf8_lossy(&schema.stdout));

    let out = Command::new("unshare")
        .args(["--mount", "--uts", "--net", "--fork", "--", "sh"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cloud_init_apply.sh"))
        .arg(work.path())
        .args([env!("CARGO_BIN_EXE_kycd"), env!("CARGO_BIN_EXE_kycctl")])
        .output()
        .unwrap();
    let results = work.path().join("out");
    let read = |name: &str| fs::read_to_string(results.join(name)).unwrap_or_default();
    assert!(
        out.status.success(),
        "cloud_init_apply.sh: {}\n{}\ncloud-init:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read("cloud-init.out")
    );

    // cloud-init found the seed: the instance id the host attestation is bound to.
    let instance_data: Value = serde_json::from_str(&read("instance-data.json")).unwrap();
    assert_eq!(instance_data["v1"]["instance_id"], INSTANCE_ID);
    // It wrote exactly the listed files under /etc/kycd, with their contents and modes.
    let written = results.join("etc-kycd");
    let mut found: Vec<String> = walk(&written)
        .iter()
        .map(|p| format!("/etc/kycd/{}", p.strip_prefix(&written).unwrap().display()))
        .collect();
    found.sort();
    let mut listed: Vec<String> =
        write_files.iter().map(|f| f["path"].as_str().unwrap().to_owned()).collect();
    listed.sort();
    assert_eq!(found, listed, "cloud-init's files under /etc/kycd; log:\n{}", read("cloud-init.log"));
    let file_of = |path: &str| written.join(path.strip_prefix("/etc/kycd/").unwrap());
    for f in write_files {
        let path = f["path"].as_str().unwrap();
        assert_eq!(fs::read_to_string(file_of(path)).unwrap(), f["content"].as_str().unwrap(), "{path}");
        let mode = fs::metadata(file_of(path)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(format!("{mode:04o}"), f["permissions"].as_str().unwrap(), "{path}");
    }
    // runcmd became the script the final stage runs: the unit enabled and started.
    let runcmd = read("runcmd");
    assert!(runcmd.contains("'systemctl' 'enable' '--now' 'kycd.service'"), "{runcmd}");
    // write_files made /etc/kycd/attestations 0755; runcmd restores the package's 0700.
    assert!(runcmd.contains("'chmod' '0700' '/etc/kycd/attestations'"), "{runcmd}");

    // kycd check-config accepts the packaged kycd.toml with what cloud-init added, and
    // reads each input from the file cloud-init wrote it to.
    assert_eq!(read("check-config.rc").trim(), "0", "kycd check-config: {}", read("check-config.err"));
    let effective: toml::Table = toml::from_str(&read("effective.toml")).unwrap();
    assert_eq!(effective["mode"].as_str(), Some("enforce"), "the cloud-init drop-in applies");
    assert!(effective["reporting"]["collector_url"].as_str().is_some_and(|u| u.starts_with("https://")));
    let issuers_jwks = Jwks::from_keys([host.issuer.public_key()]).unwrap().to_json();
    let policy_jwks = Jwks::from_keys([host.authority.public_key()]).unwrap().to_json();
    for (table, key, expected) in [
        ("trust", "issuers", issuers_jwks["keys"][0].clone()),
        ("trust", "policy", policy_jwks["keys"][0].clone()),
    ] {
        let path = effective[table][key].as_str().unwrap();
        let jwks: Value = serde_json::from_str(&fs::read_to_string(file_of(path)).unwrap()).unwrap();
        assert_eq!(jwks["keys"][0], expected, "{table}.{key} = {path}");
    }
    let policy_file = effective["policy"]["file"].as_str().unwrap();
    assert_eq!(fs::read_to_string(file_of(policy_file)).unwrap().trim(), policy);
    let host_file = effective["attestations"]["host_attestation"].as_str().unwrap();
    assert_eq!(fs::read_to_string(file_of(host_file)).unwrap().trim(), host_attestation);
    let host_mode = fs::metadata(file_of(host_file)).unwrap().permissions().mode() & 0o777;
    assert_eq!(host_mode, 0o600, "the host attestation names the tenant: root only");
    assert_eq!(
        effective["attestations"]["cloud_init_instance_data"].as_str(),
        Some("/run/cloud-init/instance-data.json"),
        "where cloud-init wrote the instance id"
    );

    // The agent on that configuration accepts the host attestation (bound to the instance
    // id cloud-init recorded) and runs healthy.
    let workloads: Value = serde_json::from_str(&read("workloads.json"))
        .unwrap_or_else(|e| panic!("{e}: {}\nkycd log:\n{}", read("workloads.json"), read("kycd.log")));
    let row = workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "host:host")
        .unwrap_or_else(|| panic!("no host workload: {workloads:#}\nkycd log:\n{}", read("kycd.log")));
    assert_eq!(row["decision"]["verdict"], "allow", "{row:#}\nkycd log:\n{}", read("kycd.log"));
    assert_eq!(row["decision"]["attestation_jti"], "host-att-1");
    assert_eq!(row["tenant"], "tenant-bare-metal");
    assert_eq!(read("status.rc").trim(), "0", "kycctl status: {}", read("status.err"));
    let status: Value = serde_json::from_str(&read("status.json")).unwrap();
    assert_eq!(status["policy"]["version"], 7);

    // Nothing of this reached the real host.
    assert!(!Path::new(&format!("/var/lib/cloud/instances/{INSTANCE_ID}")).exists());
}

/// Regular files under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return files };
    for e in entries.flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files.extend(walk(&e.path()));
        } else if t.is_file() {
            files.push(e.path());
        }
    }
    files
}
