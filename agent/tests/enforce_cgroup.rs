//! The cgroup v2 backend against the real kernel, on throwaway cgroups under this test
//! process's own cgroup. Skips loudly without root or a writable cgroup2 mount.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_test_support::netns as enforce_support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::time::Duration;

use enforce_support::*;
use kycd::enforce::{CgroupAction, CgroupEnforcer};

fn setup() -> Option<(TestCgroup, tempfile::TempDir)> {
    if !is_root() {
        skip("not root");
        return None;
    }
    match TestCgroup::new() {
        Ok(cg) => Some((cg, tempfile::tempdir().unwrap())),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

fn one(path: &std::path::Path, action: CgroupAction) -> BTreeMap<PathBuf, CgroupAction> {
    BTreeMap::from([(path.to_path_buf(), action)])
}

fn freeze_file(cg: &std::path::Path) -> String {
    std::fs::read_to_string(cg.join("cgroup.freeze")).unwrap().trim().to_owned()
}

/// Whether a process with this pid exists (after `wait`, it has been reaped).
fn is_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn freeze_is_confirmed_and_lift_thaws_even_after_a_restart() {
    let Some((cg, state)) = setup() else { return };
    let wl = cg.child("wl");
    let mut sleeper = TestCgroup::spawn_sleep(&wl);
    let state_file = state.path().join("cgroup-state.json");

    let mut e = CgroupEnforcer::new(state_file.clone());
    let r = e.reconcile(&one(&wl, CgroupAction::Freeze));
    assert_eq!(r.frozen, vec![wl.clone()], "{r:?}");
    assert!(r.errors.is_empty() && r.pending.is_empty(), "{r:?}");
    assert!(events(&wl).lines().any(|l| l == "frozen 1"), "kernel says not frozen: {}", events(&wl));

    // Idempotent.
    let r = e.reconcile(&one(&wl, CgroupAction::Freeze));
    assert!(r.frozen.is_empty() && r.drift.is_empty() && r.errors.is_empty(), "{r:?}");

    // A new agent process (same state file) lifts what the old one imposed.
    drop(e);
    let mut e = CgroupEnforcer::new(state_file.clone());
    assert_eq!(e.imposed().collect::<Vec<_>>(), vec![wl.as_path()]);
    let r = e.reconcile(&BTreeMap::new());
    assert_eq!(r.thawed, vec![wl.clone()], "{r:?}");
    assert!(wait_events(&wl, "frozen 0"), "still frozen: {}", events(&wl));
    assert_eq!(e.imposed().count(), 0);
    assert_eq!(CgroupEnforcer::new(state_file).imposed().count(), 0, "state file updated");
    assert!(sleeper.try_wait().unwrap().is_none(), "the workload survives freeze and thaw");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn manual_thaw_is_drift_and_is_refrozen() {
    let Some((cg, state)) = setup() else { return };
    let wl = cg.child("wl");
    let mut sleeper = TestCgroup::spawn_sleep(&wl);
    let mut e = CgroupEnforcer::new(state.path().join("s.json"));
    e.reconcile(&one(&wl, CgroupAction::Freeze));
    assert!(wait_events(&wl, "frozen 1"));

    std::fs::write(wl.join("cgroup.freeze"), "0").unwrap();
    assert!(wait_events(&wl, "frozen 0"));
    let r = e.reconcile(&one(&wl, CgroupAction::Freeze));
    assert_eq!(r.drift, vec![wl.clone()], "{r:?}");
    assert_eq!(r.frozen, vec![wl.clone()], "{r:?}");
    assert!(events(&wl).lines().any(|l| l == "frozen 1"));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn kill_empties_the_cgroup() {
    let Some((cg, state)) = setup() else { return };
    let wl = cg.child("wl");
    let mut sleeper = TestCgroup::spawn_sleep(&wl);
    let pid = sleeper.id();
    let mut e = CgroupEnforcer::new(state.path().join("s.json"));
    let r = e.reconcile(&one(&wl, CgroupAction::Kill));
    assert_eq!(r.killed, vec![wl.clone()], "{r:?}");
    let status = sleeper.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    assert!(wait_events(&wl, "populated 0"), "{}", events(&wl));
    assert!(!is_alive(pid));
    // Nothing left to kill: not reported again.
    let r = e.reconcile(&one(&wl, CgroupAction::Kill));
    assert!(r.killed.is_empty() && r.errors.is_empty(), "{r:?}");
}

#[test]
fn a_cgroup_frozen_before_kycd_stays_frozen_on_lift() {
    let Some((cg, state)) = setup() else { return };
    let wl = cg.child("wl");
    let mut sleeper = TestCgroup::spawn_sleep(&wl);
    std::fs::write(wl.join("cgroup.freeze"), "1").unwrap();
    assert!(wait_events(&wl, "frozen 1"));

    let mut e = CgroupEnforcer::new(state.path().join("s.json"));
    let r = e.reconcile(&one(&wl, CgroupAction::Freeze));
    assert!(r.errors.is_empty() && r.pending.is_empty(), "{r:?}");
    let r = e.reconcile(&BTreeMap::new());
    assert_eq!(r.left_frozen, vec![wl.clone()], "{r:?}");
    assert!(r.thawed.is_empty(), "{r:?}");
    assert_eq!(freeze_file(&wl), "1");
    std::thread::sleep(Duration::from_millis(50));
    assert!(events(&wl).lines().any(|l| l == "frozen 1"), "someone else's freeze was lifted");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn vanished_cgroups_are_dropped_and_do_not_block_others() {
    let Some((cg, state)) = setup() else { return };
    let gone = cg.child("gone");
    let live = cg.child("live");
    let mut sleeper = TestCgroup::spawn_sleep(&live);
    let state_file = state.path().join("s.json");
    let mut e = CgroupEnforcer::new(state_file.clone());
    let mut desired = one(&gone, CgroupAction::Freeze);
    desired.insert(live.clone(), CgroupAction::Freeze);
    let r = e.reconcile(&desired);
    assert_eq!(r.frozen.len(), 2, "{r:?}");

    // The workload ends while frozen: its cgroup disappears.
    std::fs::remove_dir(&gone).unwrap();
    let r = e.reconcile(&desired);
    assert_eq!(r.vanished, vec![gone.clone()], "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(events(&live).lines().any(|l| l == "frozen 1"));
    assert_eq!(e.imposed().collect::<Vec<_>>(), vec![live.as_path()]);

    // Lifting everything: the vanished one is not an error, the live one thaws.
    let r = e.reconcile(&BTreeMap::new());
    assert_eq!(r.thawed, vec![live.clone()], "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(CgroupEnforcer::new(state_file).imposed().count(), 0);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn freeze_takes_effect_within_the_confirmation_budget() {
    let Some((cg, state)) = setup() else { return };
    // Several busy and sleeping workloads; all confirmed frozen in one call.
    let cgs: Vec<PathBuf> = (0..4).map(|i| cg.child(&format!("wl{i}"))).collect();
    let mut children: Vec<_> = cgs.iter().map(|c| TestCgroup::spawn_sleep(c)).collect();
    let desired: BTreeMap<PathBuf, CgroupAction> =
        cgs.iter().map(|c| (c.clone(), CgroupAction::Freeze)).collect();
    let mut e = CgroupEnforcer::new(state.path().join("s.json"));
    let t = kycd_protocol::clock::monotonic();
    let r = e.reconcile(&desired);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(r.frozen.len() + r.pending.len(), 4, "{r:?}");
    for c in &cgs {
        assert!(wait_events(c, "frozen 1"));
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
}
