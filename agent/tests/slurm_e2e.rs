//! Real Slurm: `munged`, `slurmctld` and `slurmd` (Debian's `slurm-wlm` and `munge`) on
//! localhost with a throwaway `slurm.conf` (its own ports, state, spool and munge key), the
//! packaged prolog (`packaging/slurm/prolog.sh`) configured as `Prolog`, and the real `kycd`
//! deciding. A job of a user whose attestation names a prohibited country is refused, with
//! kycd's reason in the job's output file; an allowed user's job runs, and its processes
//! (under `proctrack/linuxproc`, in slurmd's cgroup) are attributed to `unix_user:<uid>`, the
//! workload the prolog admitted: the agent's GPU usage (the fake NVML listing the job's real
//! pid) lands on that workload and its tenant. Root only (daemons, throwaway users).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kycd_test_support::fake_nvml::FakeNvml;
use kycd_test_support::host::{self as host_support, now, Host};
use serde_json::json;

const H100: &str = "NVIDIA H100 80GB HBM3";

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds; `context` explains a timeout.
fn wait_for<T>(secs: u64, what: &str, context: impl Fn() -> String, f: impl FnMut() -> Option<T>) -> T {
    kycd_test_support::wait_for(secs, Duration::from_millis(200), what, context, f)
}

/// A throwaway Unix user (removed on drop).
struct User {
    name: String,
    uid: u32,
}

impl User {
    fn add(name: &str) -> User {
        let out = Command::new("useradd")
            .args(["--no-create-home", "--user-group", "--shell", "/bin/sh", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "useradd {name}: {}", text(&out));
        let out = Command::new("id").args(["-u", name]).output().unwrap();
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        User { name: name.to_owned(), uid }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// The Slurm cluster's daemons, their directory and the jobs submitted: on drop the jobs are
/// cancelled (slurmd leaves running jobs' slurmstepd behind when it stops) and the daemons
/// killed, in reverse order of start.
struct Cluster {
    dir: tempfile::TempDir,
    node: String,
    daemons: Vec<(&'static str, Child)>,
    jobs: Vec<String>,
}

impl Cluster {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn conf(&self) -> PathBuf {
        self.path("slurm.conf")
    }

    fn spawn(&mut self, name: &'static str, program: &str, args: &[&str]) {
        let log = std::fs::File::create(self.path(&format!("log/{name}.stderr"))).unwrap();
        let child = Command::new(program)
            .args(args)
            .env("SLURM_CONF", self.conf())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        self.daemons.push((name, child));
    }

    /// A Slurm client command as root.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program).args(args).env("SLURM_CONF", self.conf()).output().unwrap()
    }

    /// `sbatch` as `user`, in the jobs directory; the job id.
    fn submit(&mut self, user: &User, output: &str, script: &str) -> String {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.uid))
            .arg("--clear-groups")
            .args(["--", "sbatch", "--parsable", "--job-name", "kycd-test", "-o", output, "--wrap", script])
            .env("SLURM_CONF", self.conf())
            .current_dir(self.path("jobs"))
            .output()
            .unwrap();
        assert!(out.status.success(), "sbatch as {}: {}\n{}", user.name, text(&out), self.logs());
        let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_owned();
        self.jobs.push(id.clone());
        id
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["slurmctld.log", "slurmd.log", "munged.log"] {
            let log = std::fs::read_to_string(self.path(&format!("log/{name}"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            out.push_str(&format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.jobs.is_empty() {
            let _ = self.run("scancel", &self.jobs.iter().map(String::as_str).collect::<Vec<_>>());
            // slurmd ends the cancelled jobs' steps; wait for it, bounded.
            let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
            while kycd_protocol::clock::monotonic() < deadline {
                let out = self.run("squeue", &["-h", "-t", "running", "-o", "%i"]);
                if !out.status.success() || out.stdout.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        while let Some((_, mut child)) = self.daemons.pop() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(5);
            while kycd_protocol::clock::monotonic() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// munged, slurmctld and slurmd on localhost, `prolog` as the Prolog.
fn start_cluster(prolog_env: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let node = String::from_utf8_lossy(&Command::new("hostname").arg("-s").output().unwrap().stdout)
        .trim()
        .to_owned();
    let mut cluster = Cluster { dir, node, daemons: Vec::new(), jobs: Vec::new() };
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    // The job users reach the munge socket and write their output under jobs/.
    mode(cluster.dir.path(), 0o755);
    for sub in ["state", "spool", "munge", "log", "jobs"] {
        std::fs::create_dir(cluster.path(sub)).unwrap();
    }
    mode(&cluster.path("munge"), 0o755);
    mode(&cluster.path("jobs"), 0o1777);
    let key: Vec<u8> = (0..1024).map(|i| (i * 7 + std::process::id() as usize) as u8).collect();
    std::fs::write(cluster.path("munge/munge.key"), key).unwrap();
    mode(&cluster.path("munge/munge.key"), 0o400);

    // A wrapper that points the packaged prolog at this test's agent (slurmd runs the prolog
    // with SLURM_* variables only; a site sets these in /etc/default/kycd-hook).
    let prolog = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/slurm/prolog.sh");
    std::fs::write(cluster.path("prolog"), format!("#!/bin/sh\n{prolog_env}exec {}\n", prolog.display()))
        .unwrap();
    mode(&cluster.path("prolog"), 0o755);

    let d = cluster.dir.path().display();
    let (ctld_port, slurmd_port) = (free_port(), free_port());
    let node = cluster.node.clone();
    let conf = format!(
        "ClusterName=kycdtest{pid}\nSlurmctldHost={node}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
         SlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\n\
         AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={d}/munge/munge.sock\n\
         StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
         SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
         SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
         ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
         SwitchType=switch/none\nMpiDefault=none\nReturnToService=2\n\
         SchedulerType=sched/builtin\nSelectType=select/linear\n\
         Prolog={d}/prolog\n\
         NodeName={node} NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN\n\
         PartitionName=test Nodes={node} Default=YES MaxTime=10 State=UP\n",
        pid = std::process::id()
    );
    std::fs::write(cluster.conf(), conf).unwrap();

    let sock = format!("{d}/munge/munge.sock");
    cluster.spawn(
        "munged",
        "munged",
        &[
            "--foreground",
            "--force",
            &format!("--key-file={d}/munge/munge.key"),
            &format!("--socket={sock}"),
            &format!("--pid-file={d}/munge/munged.pid"),
            &format!("--seed-file={d}/munge/munged.seed"),
            &format!("--log-file={d}/log/munged.log"),
        ],
    );
    wait_for(10, "munged's socket", || cluster.logs(), || Path::new(&sock).exists().then_some(()));
    cluster.spawn("slurmctld", "slurmctld", &["-D", "-i"]);
    cluster.spawn("slurmd", "slurmd", &["-D"]);
    wait_for(
        60,
        "the node idle",
        || cluster.logs(),
        || {
            let out = cluster.run("sinfo", &["-h", "-n", &node, "-o", "%T"]);
            String::from_utf8_lossy(&out.stdout).trim().starts_with("idle").then_some(())
        },
    );
    cluster
}

/// A signed attestation binding the Unix user `uid` to a tenant of `country`.
fn user_attestation(host: &Host, uid: u32, tenant: &str, country: &str) -> String {
    let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
        "iss": "kyc", "sub": tenant, "jti": format!("att-{tenant}"),
        "iat": now() - 5, "exp": now() + 3600, "kyc": {"status": "verified"},
        "subject": {"kind": "organization", "legal_name": format!("{tenant} Ltd"), "countries": [country]},
        "binding": {"kind": "unix_user", "id": uid.to_string(), "host_id": "node-1"},
        "foreign_person": true
    }))
    .unwrap();
    kycd_protocol::sign(&claims, &host.issuer).unwrap()
}

#[test]
fn slurm_runs_an_allowed_users_job_and_refuses_a_prohibited_ones_with_the_reason() {
    if !host_support::is_root() {
        kycd_test_support::skip!("SKIP slurm_e2e: needs root (Slurm daemons, throwaway users)");
        return;
    }
    if let Some(missing) =
        ["munged", "slurmctld", "slurmd", "sbatch", "useradd", "setpriv"].into_iter().find(|p| !have(p))
    {
        kycd_test_support::skip!("SKIP slurm_e2e: {missing} not installed (Debian: slurm-wlm, munge)");
        return;
    }
    let pid = std::process::id();
    let allowed = User::add(&format!("kycdsa{pid}"));
    let denied = User::add(&format!("kycdsd{pid}"));

    let mut host = Host::new("");
    host.write_policy(1, &["KP"]);
    host.drop_file("allowed.jws", user_attestation(&host, allowed.uid, "tenant-allowed", "DE").as_bytes());
    host.drop_file("denied.jws", user_attestation(&host, denied.uid, "tenant-denied", "KP").as_bytes());
    host.start();
    let kycctl = host_support::package_bin("kycctl");
    let socket = host.path("run/kycd.sock");
    let mut cluster = start_cluster(&format!(
        "KYCCTL={}\nKYCD_SOCKET={}\nexport KYCCTL KYCD_SOCKET\n",
        kycctl.display(),
        socket.display()
    ));
    let job_file = |cluster: &Cluster, name: &str| {
        std::fs::read_to_string(cluster.path(&format!("jobs/{name}"))).unwrap_or_default()
    };

    // The allowed user's job runs (its output says so) until cancelled.
    let job = cluster.submit(
        &allowed,
        "allowed-%j.out",
        "echo started as $(id -u); echo $$ > allowed.pid; exec sleep 300",
    );
    let out = format!("allowed-{job}.out");
    wait_for(
        60,
        "the allowed job to start",
        || format!("{}\n{}", cluster.logs(), host.log()),
        || job_file(&cluster, &out).contains("started").then_some(()),
    );
    assert_eq!(job_file(&cluster, &out).trim(), format!("started as {}", allowed.uid));
    let decision = host.wait_for_verdict(&format!("unix_user:{}", allowed.uid), "allow");
    assert_eq!(decision["event"]["decision"]["tenant"], "tenant-allowed", "{decision}");
    let job_pid: u32 =
        wait_for(10, "the job's pid", String::new, || job_file(&cluster, "allowed.pid").trim().parse().ok());

    // Its processes are the admitted workload's: the agent, restarted with a GPU whose only
    // process is the job's shell, accounts the GPU's use to unix_user:<uid> and its tenant.
    host.stop();
    let fake = FakeNvml::new(json!({"gpus": [{"name": H100, "uuid": "GPU-slurm-0",
        "ticks": [{"util": 90, "tensor": 50.0, "processes": [{"pid": job_pid, "used_mib": 1024, "sm_util": 90}]}]}]}));
    host.extra_config =
        format!("[gpu]\nnvml_library = \"{}\"\ninterval_ms = 100\nwindow_s = 1\n", fake.library().display());
    host.write_config();
    host.start();
    let workload = format!("unix_user:{}", allowed.uid);
    let usage = wait_for(
        30,
        "GPU usage of the job's workload",
        || host.log(),
        || {
            let out =
                Command::new(&kycctl).args(["usage", "--json", "--socket"]).arg(&socket).output().ok()?;
            let usage: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            usage
                .as_array()?
                .iter()
                .find(|u| u["workload"] == workload.as_str() && u["gpu_seconds"].as_f64() > Some(0.0))
                .cloned()
        },
    );
    assert_eq!(usage["tenant"], "tenant-allowed", "{usage}");
    let out = cluster.run("scancel", &[&job]);
    assert!(out.status.success(), "{}", text(&out));

    // The prohibited user's job: the prolog fails, Slurm holds the job, and the job's output
    // file carries kycd's reason ahead of Slurm's own line.
    wait_for(
        30,
        "the node idle again",
        || cluster.logs(),
        || {
            let out = cluster.run("sinfo", &["-h", "-n", &cluster.node, "-o", "%T"]);
            String::from_utf8_lossy(&out.stdout).trim().starts_with("idle").then_some(())
        },
    );
    let job = cluster.submit(&denied, "denied-%j.out", "echo the job ran");
    let out = format!("denied-{job}.out");
    let log = wait_for(
        60,
        "the refused job's output",
        || format!("{}\n{}", cluster.logs(), host.log()),
        || {
            let log = job_file(&cluster, &out);
            log.contains("Error running slurm prolog").then_some(log)
        },
    );
    assert!(log.contains(&format!("kycd: job {job} of {} refused", denied.name)), "{log}");
    assert!(log.contains(&format!("denied: unix_user:{}", denied.uid)), "{log}");
    assert!(log.contains("measure_prohibit"), "the reason code: {log}");
    assert!(log.contains("m-kp"), "the measure: {log}");
    assert!(!log.contains("the job ran"), "{log}");
    let decision = host.wait_for_verdict(&format!("unix_user:{}", denied.uid), "deny");
    assert_eq!(decision["event"]["decision"]["tenant"], "tenant-denied", "{decision}");
    let show = cluster.run("scontrol", &["show", "job", &job]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("JobState=PENDING"), "{}", text(&show));
    let node = cluster.run("sinfo", &["-h", "-R", "-o", "%E"]);
    assert!(String::from_utf8_lossy(&node.stdout).contains("Prolog error"), "{}", text(&node));
    drop(cluster);
    host.stop();
}
