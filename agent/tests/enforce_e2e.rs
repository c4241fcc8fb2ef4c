//! End-to-end enforcement: the real `kycd` binary in enforce mode, against real cgroup v2
//! directories and an nftables table inside a private network namespace (the host's
//! ruleset is never touched). Skips loudly without root, nft, iproute2 or python3.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_test_support::host as host_support;
use kycd_test_support::netns as enforce_support;

use std::fs;
use std::time::Duration;

use enforce_support::{can_connect, events, nft_capable, skip, wait_events, TestCgroup, Topology, PORT};
use host_support::{now, Host};
use serde_json::{json, Value};

fn policy(host: &Host, version: u64, measures: Value, unverified: &str) {
    let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
        "iss": "authority", "iat": now() - 10, "exp": now() + 86_400, "version": version,
        "measures": measures, "unverified": {"action": unverified},
        "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                       "early_warning_fraction": 0.01}
    }))
    .unwrap();
    host_support::atomic_write(
        &host.path("etc/policy.jws"),
        kycd_protocol::sign(&claims, &host.authority).unwrap().as_bytes(),
    );
}

fn cgroup_attestation(host: &Host, cgroup_id: &str, country: &str) -> String {
    let claims: kycd_protocol::AttestationClaims = serde_json::from_value(json!({
        "iss": "kyc", "sub": "tenant-net", "jti": format!("att-{country}"), "iat": now() - 5,
        "exp": now() + 3600, "kyc": {"status": "verified"},
        "subject": {"kind": "organization", "legal_name": "Net Co", "countries": [country]},
        "binding": {"kind": "cgroup", "id": cgroup_id}, "foreign_person": true
    }))
    .unwrap();
    kycd_protocol::sign(&claims, &host.issuer).unwrap()
}

fn eventually(what: &str, host: &Host, mut ok: impl FnMut() -> bool) {
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    while !ok() {
        assert!(kycd_protocol::clock::monotonic() < deadline, "timed out: {what}; log:\n{}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A namespace pair, a test cgroup and an agent configured to enforce on both (not started),
/// or a loud skip.
fn enforcing_setup(test: &str, extra_enforcement: &str) -> Option<(Topology, TestCgroup, Host)> {
    if let Err(why) = nft_capable() {
        skip(&format!("{test}: {why}"));
        return None;
    }
    let (topo, cg) = match (Topology::new(), TestCgroup::new()) {
        (Ok(t), Ok(c)) => (t, c),
        (Err(why), _) | (_, Err(why)) => {
            skip(&format!("{test}: {why}"));
            return None;
        }
    };
    let nft: Vec<String> = topo.local.nft_command().iter().map(|a| format!("{a:?}")).collect();
    let mut host = Host::new("");
    host.extra_config = format!(
        "mode = \"enforce\"\n[workloads]\ncgroup_root = \"{mount}\"\nroots = [\"{root}\"]\nrescan_interval_s = 1\n\
         [enforcement]\nreconcile_interval_s = 1\nnft_command = [{nft}]\n{extra_enforcement}",
        mount = cg.mount.display(),
        root = cg.rel(&cg.path),
        nft = nft.join(", ")
    );
    host.write_config();
    Some((topo, cg, host))
}

#[test]
fn denials_freeze_and_cut_off_drift_is_repaired_and_lifting_restores() {
    let Some((topo, cg, mut host)) =
        enforcing_setup("denials_freeze_and_cut_off_drift_is_repaired_and_lifting_restores", "")
    else {
        return;
    };
    let job = cg.child("job");
    let net = cg.child("net");
    let mut sleeper = TestCgroup::spawn_sleep(&job);
    let root = cg.rel(&cg.path);
    // v1: RU customers may run without network egress; unattested workloads are allowed.
    let ru = json!([{"id": "ru-egress", "match": {"countries": ["RU"]}, "roles": ["customer"],
        "action": "condition", "conditions": {"network": "deny_egress"}, "citation": "test"}]);
    policy(&host, 1, ru.clone(), "allow");
    host.drop_file("net.jws", cgroup_attestation(&host, &format!("/{root}/net"), "RU").as_bytes());
    host.start();
    let net_id = format!("cgroup:/{root}/net");
    let job_id = format!("cgroup:/{root}/job");
    host.wait_for_verdict(&net_id, "condition");
    host.wait_for_verdict(&job_id, "allow");
    eventually("net cut off", &host, || !can_connect(&topo.local, &net, "10.200.0.2", PORT));
    assert!(events(&net).contains("frozen 0"), "a condition does not freeze");
    assert!(events(&job).contains("frozen 0"));

    // v2: unattested workloads are denied: job is frozen.
    policy(&host, 2, ru.clone(), "deny");
    host.wait_for_verdict(&job_id, "deny");
    assert!(wait_events(&job, "frozen 1"), "denied job not frozen:\n{}", host.log());

    // Drift: thawed by hand, frozen again within a reconcile interval.
    fs::write(job.join("cgroup.freeze"), "0").unwrap();
    eventually("job refrozen", &host, || {
        host.log().contains("drift repaired") && events(&job).contains("frozen 1")
    });
    // Drift: the table flushed by hand (rules and elements gone), restored.
    assert!(topo.local.exec_status(&["nft", "flush", "table", "inet", "kycd"]));
    eventually("table restored", &host, || !can_connect(&topo.local, &net, "10.200.0.2", PORT));

    // v3: nothing prohibited or conditioned, unattested allowed: everything lifted.
    policy(&host, 3, json!([]), "allow");
    host.wait_for_verdict(&job_id, "allow");
    assert!(wait_events(&job, "frozen 0"), "lifted job still frozen:\n{}", host.log());
    eventually("net reconnects", &host, || can_connect(&topo.local, &net, "10.200.0.2", PORT));

    // Fail closed across a stop: a denial in force stays in force while the agent is down.
    policy(&host, 4, ru, "deny");
    assert!(wait_events(&job, "frozen 1"), "denied again:\n{}", host.log());
    host.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert!(events(&job).contains("frozen 1"), "the block was lifted when the agent stopped");
    assert!(!can_connect(&topo.local, &net, "10.200.0.2", PORT), "net reconnected while the agent is down");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn release_on_exit_lifts_every_block() {
    let Some((topo, cg, mut host)) =
        enforcing_setup("release_on_exit_lifts_every_block", "release_on_exit = true\n")
    else {
        return;
    };
    let job = cg.child("job");
    let mut sleeper = TestCgroup::spawn_sleep(&job);
    policy(&host, 1, json!([]), "deny");
    host.start();
    assert!(wait_events(&job, "frozen 1"), "{}", host.log());
    // (A denied cgroup is frozen, so no connect test here: a probe would freeze too.)
    eventually("table in place", &host, || topo.local.exec(&["nft", "list", "tables"]).contains("kycd"));
    host.stop();
    assert!(events(&job).contains("frozen 0"), "not thawed on exit:\n{}", host.log());
    let tables = topo.local.exec(&["nft", "list", "tables"]);
    assert!(!tables.contains("kycd"), "table left behind: {tables}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
