//! The test harness for end-to-end tests of the real `kycd` binary: a temporary
//! installation (keys, trust files, config, state), the running daemon, and readers of its
//! audit log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kycd_protocol::{Algorithm, Jwks, PrivateJwk};
use serde_json::{json, Value};

/// A binary of the package under test (`kycd`, `kycctl`): cargo builds a package's binaries
/// before its integration tests and benches, into the directory above the test's own
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`), which is the path
/// `env!("CARGO_BIN_EXE_<name>")` names there; this crate is not that package, so it looks.
pub fn package_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    dir.join(name)
}

pub fn now() -> i64 {
    kycd_protocol::clock::wall().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A temporary installation: keys, trust files, config, state; and the running daemon.
#[derive(Debug)]
pub struct Host {
    pub dir: tempfile::TempDir,
    pub issuer: PrivateJwk,
    pub authority: PrivateJwk,
    pub child: Option<Child>,
    pub extra_config: String,
    /// The audit directory, relative to the temp dir.
    pub audit_rel: &'static str,
    /// Lines added to the `[api]` table.
    pub extra_api: String,
    /// A program (and its arguments) that runs kycd, e.g. `prlimit --nofile=128:128 --`.
    pub launcher: Vec<String>,
}

impl Host {
    pub fn new(extra_config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issuer = PrivateJwk::generate(Algorithm::EdDSA, "kyc-1").unwrap();
        let authority = PrivateJwk::generate(Algorithm::ES256, "authority-1").unwrap();
        let host = Host {
            dir,
            issuer,
            authority,
            child: None,
            extra_config: extra_config.to_owned(),
            audit_rel: "state/audit",
            extra_api: String::new(),
            launcher: Vec::new(),
        };
        fs::create_dir_all(host.path("etc/trust")).unwrap();
        fs::create_dir_all(host.path("cgroup")).unwrap();
        for (name, key) in [("issuers", &host.issuer), ("policy", &host.authority)] {
            let jwks = Jwks::from_keys([key.public_key()]).unwrap().to_json().to_string();
            fs::write(host.path(&format!("etc/trust/{name}.jwks")), jwks).unwrap();
        }
        host.write_config();
        host
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write_config(&self) {
        let d = self.dir.path().display();
        let config = format!(
            "host_id = \"node-1\"\nstate_dir = \"{d}/state\"\nclock_skew_s = 0\n{extra}\n\
             [trust]\nissuers = \"{d}/etc/trust/issuers.jwks\"\npolicy = \"{d}/etc/trust/policy.jwks\"\n\
             [policy]\nfile = \"{d}/etc/policy.jws\"\n\
             [attestations]\nhost_attestation = \"{d}/etc/host.jws\"\n\
             cloud_init_instance_data = \"{d}/etc/instance-data.json\"\n\
             [api]\nsocket = \"{d}/run/kycd.sock\"\n{api}",
            extra = self.extra_config,
            api = self.extra_api
        );
        let config = if config.contains("[workloads]") {
            config
        } else {
            format!("{config}[workloads]\ncgroup_root = \"{d}/cgroup\"\nrescan_interval_s = 1\n")
        };
        fs::write(self.path("etc/kycd.toml"), config).unwrap();
    }

    pub fn start(&mut self) {
        let log = fs::File::create(self.path("kycd.log")).unwrap();
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(package_bin("kycd"));
                c
            }
            None => Command::new(package_bin("kycd")),
        };
        let child = command
            .args(["run", "--config"])
            .arg(self.path("etc/kycd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_for("agent start", |r| r["event"]["type"] == "agent_started" && self.started_count() > 0);
        // Ready (decided once, reconciled) when its socket appears.
        let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
        while !self.path("run/kycd.sock").exists() {
            assert!(kycd_protocol::clock::monotonic() < deadline, "no socket; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn started_count(&self) -> usize {
        self.records().iter().filter(|r| r["event"]["type"] == "agent_started").count()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM, as systemd would.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
            while kycd_protocol::clock::monotonic() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "kycd exited with {status}: {}", self.log());
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            panic!("kycd did not stop on SIGTERM");
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.path("kycd.log")).unwrap_or_default()
    }

    pub fn records(&self) -> Vec<Value> {
        let dir = self.path(self.audit_rel);
        let Ok(entries) = fs::read_dir(&dir) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                fs::read_to_string(f).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>()
            })
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Waits until some audit record satisfies `pred`; returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
        loop {
            if let Some(r) = self.records().into_iter().rev().find(|r| pred(r)) {
                return r;
            }
            assert!(
                kycd_protocol::clock::monotonic() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The latest decision recorded for `workload`.
    pub fn latest_decision(&self, workload: &str) -> Option<Value> {
        self.records()
            .into_iter()
            .rev()
            .find(|r| r["event"]["type"] == "decision" && r["event"]["workload"] == workload)
    }

    pub fn wait_for_verdict(&self, workload: &str, verdict: &str) -> Value {
        self.wait_for(&format!("{workload} → {verdict}"), |_| {
            self.latest_decision(workload).is_some_and(|d| d["event"]["decision"]["verdict"] == verdict)
        });
        self.latest_decision(workload).unwrap()
    }

    pub fn write_policy(&self, version: u64, prohibited: &[&str]) {
        self.write_policy_with(version, prohibited, json!({"action": "deny"}));
    }

    pub fn write_policy_with(&self, version: u64, prohibited: &[&str], unverified: Value) {
        self.write_policy_full(version, prohibited, unverified, None);
    }

    pub fn write_policy_full(&self, version: u64, prohibited: &[&str], unverified: Value, nbf: Option<i64>) {
        let token = self.policy_token(version, prohibited, unverified, nbf, &self.authority);
        atomic_write(&self.path("etc/policy.jws"), token.as_bytes());
    }

    /// A signed policy token (`key` signs it; the trusted authority is `self.authority`).
    pub fn policy_token(
        &self,
        version: u64,
        prohibited: &[&str],
        unverified: Value,
        nbf: Option<i64>,
        key: &PrivateJwk,
    ) -> String {
        let measures: Vec<Value> = prohibited
            .iter()
            .map(|c| {
                json!({"id": format!("m-{}", c.to_lowercase()), "match": {"countries": [c]},
                       "roles": ["customer", "beneficial_owner", "reseller", "payment_source"],
                       "action": "prohibit", "citation": "EO 13984 sec. 2"})
            })
            .collect();
        let mut claims = json!({
            "iss": "authority", "iat": now() - 10, "exp": now() + 86_400, "version": version,
            "measures": measures, "unverified": unverified,
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01}
        });
        if let Some(nbf) = nbf {
            claims["nbf"] = json!(nbf);
        }
        let claims: kycd_protocol::PolicyClaims = serde_json::from_value(claims).unwrap();
        kycd_protocol::sign(&claims, key).unwrap()
    }

    pub fn attestation(&self, vm: &str, country: &str, exp: i64) -> String {
        let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
            "iss": "kyc", "sub": format!("tenant-{vm}"), "jti": format!("att-{vm}-{exp}"),
            "iat": now() - 5, "exp": exp, "kyc": {"status": "verified"},
            "subject": {"kind": "organization", "legal_name": "Secret Legal Name AG", "countries": [country]},
            "binding": {"kind": "libvirt_domain", "id": vm, "host_id": "node-1"},
            "foreign_person": true
        }))
        .unwrap();
        kycd_protocol::sign(&claims, &self.issuer).unwrap()
    }

    pub fn drop_file(&self, name: &str, contents: &[u8]) {
        atomic_write(&self.path(&format!("state/attestations/{name}")), contents);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes as delivery tools should: a hidden temp file in the same directory, then rename.
pub fn atomic_write(path: &Path, contents: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_str().unwrap()));
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, path).unwrap();
}

pub fn reasons(decision: &Value) -> Vec<String> {
    decision["event"]["decision"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_owned())
        .collect()
}

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Runs `kycctl admit` against the host's agent; returns (exit code, stdout, stderr).
pub fn admit(host: &Host, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(package_bin("kycctl"))
        .arg("admit")
        .args(args)
        .arg("--socket")
        .arg(host.path("run/kycd.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: kycd\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// `promtool check metrics` on `metrics` (promtool is the reference parser of the text
/// format); skips loudly where promtool is not installed (CI installs it).
pub fn promtool_check(metrics: &str) {
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics:\n{}{}\n{metrics}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => crate::skip!("SKIP promtool check metrics: promtool not available ({e})"),
    }
}
