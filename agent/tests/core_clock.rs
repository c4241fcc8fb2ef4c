//! The agent's core in-process, on a manual clock: deadlines, expiry, grace periods and
//! transient rejections are tested by moving the clock, not by waiting for time to pass.
//! The files (keys, trust sets, policy, attestations, cgroup tree, audit log) are real, in a
//! temporary directory; the daemon's tokio wiring is not involved (`daemon_e2e.rs` tests
//! the binary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use kycd::config::{load, Overrides};
use kycd::core::{Agent, Event};
use kycd::reconcile::RecordOnly;
use kycd_protocol::clock::ManualClock;
use serde_json::{json, Value};

use host_support::{now, reasons, Host};
use kycd_test_support::host as host_support;

/// An agent over `host`'s installation, on `clock`, with its first evaluation done.
fn agent(host: &Host, clock: &Arc<ManualClock>) -> Agent {
    let config = load(&host.path("etc/kycd.toml"), &Overrides::default()).unwrap().config;
    let mut agent = Agent::new(config, Box::new(RecordOnly), clock.clone()).unwrap();
    agent.settle();
    agent
}

fn decisions(host: &Host, workload: &str) -> Vec<Value> {
    host.records()
        .into_iter()
        .filter(|r| r["event"]["type"] == "decision" && r["event"]["workload"] == workload)
        .collect()
}

fn latest(host: &Host, workload: &str) -> Value {
    decisions(host, workload).pop().unwrap_or_else(|| panic!("no decision for {workload}"))
}

#[test]
fn attestation_expiry_flips_the_verdict_at_the_deadline() {
    let host = Host::new("");
    host.write_policy(1, &[]);
    let clock = Arc::new(ManualClock::at(now()));
    let mut agent = agent(&host, &clock);
    let exp = now() + 600;
    host.drop_file("vm-a.jws", host.attestation("vm-a", "FR", exp).as_bytes());
    agent.handle(Event::DropDir(host.path("state/attestations/vm-a.jws")));
    let next = agent.settle();
    let allowed = latest(&host, "libvirt_domain:vm-a");
    assert_eq!(allowed["event"]["decision"]["verdict"], "allow");
    assert_eq!(allowed["event"]["decision"]["next_review_at"], exp);
    assert_eq!(next, Some(exp), "the daemon sleeps exactly until the expiry");

    clock.set_unix(exp - 1);
    agent.settle();
    assert_eq!(decisions(&host, "libvirt_domain:vm-a").len(), 1, "nothing changes before the deadline");
    clock.set_unix(exp);
    agent.handle(Event::Deadline);
    agent.settle();
    let denied = latest(&host, "libvirt_domain:vm-a");
    assert_eq!(reasons(&denied), ["attestation_expired", "unverified_deny"]);
    assert_eq!(denied["ts"], exp, "re-decided at the deadline");
}

#[test]
fn a_deadline_passed_is_honoured_whichever_event_comes_first() {
    let host = Host::new("");
    host.write_policy(1, &[]);
    let clock = Arc::new(ManualClock::at(now()));
    let mut agent = agent(&host, &clock);
    let exp = now() + 60;
    host.drop_file("vm-a.jws", host.attestation("vm-a", "FR", exp).as_bytes());
    agent.handle(Event::DropDir(host.path("state/attestations/vm-a.jws")));
    agent.settle();
    // Another tenant's attestation arrives after vm-a's deadline, before the timer fires.
    clock.set_unix(exp + 5);
    host.drop_file("vm-b.jws", host.attestation("vm-b", "FR", exp + 3600).as_bytes());
    agent.handle(Event::DropDir(host.path("state/attestations/vm-b.jws")));
    agent.settle();
    assert_eq!(latest(&host, "libvirt_domain:vm-b")["event"]["decision"]["verdict"], "allow");
}

#[test]
fn restarting_the_agent_does_not_restart_a_grace_period() {
    let host = Host::new("");
    host.write_policy_with(1, &[], json!({"action": "grace", "grace_s": 3600}));
    fs::create_dir_all(host.path("cgroup/machine.slice/machine-qemu\\x2d1\\x2dvm\\x2dg.scope")).unwrap();
    let t0 = now();
    let clock = Arc::new(ManualClock::at(t0));
    let first = agent(&host, &clock);
    let decision = latest(&host, "libvirt_domain:vm-g");
    assert_eq!(reasons(&decision), ["no_attestation", "grace_running"]);
    assert_eq!(decision["event"]["decision"]["next_review_at"], t0 + 3600);
    drop(first);

    clock.advance(Duration::from_secs(600));
    let _second = agent(&host, &clock);
    let again = latest(&host, "libvirt_domain:vm-g");
    assert_eq!(again["event"]["decision"]["next_review_at"], t0 + 3600, "grace end moved");
}

#[test]
fn a_vm_stopped_and_started_again_keeps_its_grace_period() {
    let host = Host::new("");
    host.write_policy_with(1, &[], json!({"action": "grace", "grace_s": 3600}));
    let scope = host.path("cgroup/machine.slice/machine-qemu\\x2d1\\x2dvm\\x2dr.scope");
    fs::create_dir_all(&scope).unwrap();
    let t0 = now();
    let clock = Arc::new(ManualClock::at(t0));
    let mut agent = agent(&host, &clock);
    fs::remove_dir(&scope).unwrap();
    clock.advance(Duration::from_secs(60));
    agent.handle(Event::Tick);
    agent.settle();
    assert!(host.records().iter().any(|r| r["event"]["type"] == "workload_vanished"));

    clock.advance(Duration::from_secs(60));
    fs::create_dir_all(host.path("cgroup/machine.slice/machine-qemu\\x2d2\\x2dvm\\x2dr.scope")).unwrap();
    agent.handle(Event::Tick);
    agent.settle();
    let again = latest(&host, "libvirt_domain:vm-r");
    assert_eq!(reasons(&again), ["no_attestation", "grace_running"]);
    assert_eq!(again["event"]["decision"]["next_review_at"], t0 + 3600, "grace restarted");
}

#[test]
fn a_policy_not_valid_yet_is_applied_once_it_is() {
    let host = Host::new("");
    let clock = Arc::new(ManualClock::at(now()));
    let mut agent = agent(&host, &clock);
    assert_eq!(latest(&host, "host:host")["event"]["decision"]["verdict"], "deny");
    host.write_policy_full(1, &[], json!({"action": "allow"}), Some(now() + 120));
    agent.handle(Event::ConfigFile(host.path("etc/policy.jws")));
    agent.settle();
    let rejected: Vec<Value> =
        host.records().into_iter().filter(|r| r["event"]["type"] == "policy_rejected").collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["event"]["kind"], "NotYetValid");

    // Nothing changes on disk: the periodic retry applies it once its nbf has passed.
    clock.advance(Duration::from_secs(60));
    agent.handle(Event::Tick);
    agent.settle();
    assert!(!host.records().iter().any(|r| r["event"]["type"] == "policy_applied"), "applied early");
    clock.advance(Duration::from_secs(61));
    agent.handle(Event::Tick);
    agent.settle();
    assert!(host.records().iter().any(|r| r["event"]["type"] == "policy_applied"));
    assert_eq!(latest(&host, "host:host")["event"]["decision"]["verdict"], "allow");
    let rejections = host.records().iter().filter(|r| r["event"]["type"] == "policy_rejected").count();
    assert_eq!(rejections, 1, "a transient rejection is recorded once, not on every retry");
}

#[test]
fn an_attestation_re_decides_its_own_workload_and_shares_its_fsync_with_the_decision() {
    let host = Host::new("");
    host.write_policy(1, &["KP"]);
    let clock = Arc::new(ManualClock::at(now()));
    for vm in ["vm-1", "vm-2", "vm-3"] {
        host.drop_file(&format!("{vm}.jws"), host.attestation(vm, "FR", now() + 3600).as_bytes());
    }
    let mut agent = agent(&host, &clock);
    let before = host.records().len();
    host.drop_file("vm-2-new.jws", host.attestation("vm-2", "KP", now() + 7200).as_bytes());
    agent.handle(Event::DropDir(host.path("state/attestations/vm-2-new.jws")));
    agent.settle();
    let new: Vec<Value> = host.records().into_iter().skip(before).collect();
    let kinds: Vec<&str> = new.iter().map(|r| r["event"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["attestation_accepted", "decision"], "{new:?}");
    assert_eq!(new[1]["event"]["workload"], "libvirt_domain:vm-2");
    assert_eq!(new[1]["event"]["decision"]["verdict"], "deny");
    // A policy change re-decides everyone.
    host.write_policy(2, &["FR", "KP"]);
    agent.handle(Event::ConfigFile(host.path("etc/policy.jws")));
    agent.settle();
    for vm in ["vm-1", "vm-3"] {
        assert_eq!(latest(&host, &format!("libvirt_domain:{vm}"))["event"]["decision"]["verdict"], "deny");
    }
}

/// Issue 19: an attestation accepted at admission is not deleted when it expires: it leaves
/// the admitted directory (withdrawn: it attests nothing) for the archive, and is deleted only
/// once `attestations.expired_retention_s` (default 5 years) has passed since its expiry.
#[test]
fn an_expired_admitted_attestation_is_archived_until_its_retention_has_passed() {
    let host = Host::new("");
    host.write_policy(1, &[]);
    let clock = Arc::new(ManualClock::at(now()));
    let mut agent = agent(&host, &clock);
    let exp = now() + 600;
    let token = host.attestation("vm-a", "FR", exp);
    let answer = agent.admit(kycd::net::operator_api::Admission {
        workload: "libvirt_domain:vm-a".parse().unwrap(),
        attestation: Some(token.clone().into_bytes()),
        libvirt_uuid: None,
    });
    assert_eq!(answer.verdict, kycd_protocol::Verdict::Allow, "{answer:?}");
    let listed = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(host.path(dir))
            .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let admitted = listed("state/admitted");
    assert_eq!(admitted.len(), 1);

    // Past the expiry (and the clock skew): withdrawn from the admitted directory, archived.
    clock.set_unix(exp + 3600);
    agent.handle(Event::Tick);
    agent.settle();
    assert!(listed("state/admitted").is_empty());
    let archived = format!("{exp}.{}", admitted[0]);
    assert_eq!(listed("state/admitted-expired"), std::slice::from_ref(&archived));
    assert_eq!(fs::read_to_string(host.path("state/admitted-expired").join(&archived)).unwrap(), token);

    // A day short of five years after the expiry: still kept. Five years: deleted.
    let five_years = i64::try_from(kycd::config::DEFAULT_EXPIRED_RETENTION_S).unwrap();
    clock.set_unix(exp + five_years - 86_400);
    agent.handle(Event::Tick);
    agent.settle();
    assert_eq!(listed("state/admitted-expired"), [archived]);
    clock.set_unix(exp + five_years);
    agent.handle(Event::Tick);
    agent.settle();
    assert!(listed("state/admitted-expired").is_empty());
}
