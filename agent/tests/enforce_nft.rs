//! The nftables backend against the real kernel, each test in its own network namespaces
//! (the host ruleset is never touched). Skips loudly without root, nft, iproute2 or python3.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_test_support::netns as enforce_support;

use std::collections::BTreeSet;

use enforce_support::*;
use kycd::enforce::{EnforceError, NftDesired, NftEnforcer};

/// Sets up a topology and a test cgroup, or prints SKIP and returns None.
fn setup() -> Option<(Topology, TestCgroup)> {
    if let Err(why) = nft_capable() {
        skip(&why);
        return None;
    }
    let cg = match TestCgroup::new() {
        Ok(cg) => cg,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    match Topology::new() {
        Ok(t) => Some((t, cg)),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn cgroup_block_cuts_the_cgroup_and_its_children_and_lifts_cleanly() {
    let Some((topo, cg)) = setup() else { return };
    let other = cg.child("other");
    let blocked = cg.child("blocked");
    let nested = blocked.join("inner");
    std::fs::create_dir(&nested).unwrap();
    let mut nft = NftEnforcer::new(topo.local.nft_command());

    assert!(can_connect(&topo.local, &blocked, "10.200.0.2", PORT), "baseline connect");
    let desired = NftDesired { cgroups: set(&[&cg.rel(&blocked)]), ..Default::default() };
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!((r.added, r.removed, r.rebuilt), (1, 0, true), "{r:?}");
    assert!(r.skipped.is_empty(), "{r:?}");
    assert!(!can_connect(&topo.local, &blocked, "10.200.0.2", PORT), "blocked cgroup still connects");
    assert!(!can_connect(&topo.local, &nested, "10.200.0.2", PORT), "child of blocked cgroup still connects");
    assert!(!can_connect(&topo.local, &blocked, "fd00:200::2", PORT), "blocked over IPv6 too");
    assert!(can_connect(&topo.local, &other, "10.200.0.2", PORT), "sibling cgroup must be unaffected");

    // Idempotent: a second reconcile changes nothing.
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!((r.added, r.removed, r.drift, r.rebuilt), (0, 0, 0, false), "{r:?}");

    let r = nft.reconcile(&NftDesired::default()).unwrap();
    assert_eq!((r.added, r.removed), (0, 1), "{r:?}");
    assert!(can_connect(&topo.local, &blocked, "10.200.0.2", PORT), "lift restores access");
    assert!(nft.read_actual().unwrap().cgroups.values().all(BTreeSet::is_empty));
}

#[test]
fn recreated_cgroup_gets_a_new_id_and_is_reblocked() {
    let Some((topo, cg)) = setup() else { return };
    let blocked = cg.child("vm");
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    let desired = NftDesired { cgroups: set(&[&cg.rel(&blocked)]), ..Default::default() };
    nft.reconcile(&desired).unwrap();
    let before = nft.read_actual().unwrap().cgroups;
    // The workload restarts: same path, new cgroup, new id. The old element no longer
    // matches anything and cannot be named by path any more.
    std::fs::remove_dir(&blocked).unwrap();
    std::fs::create_dir(&blocked).unwrap();
    assert!(
        can_connect(&topo.local, &blocked, "10.200.0.2", PORT),
        "stale element must not match the new cgroup"
    );
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!((r.added, r.removed), (1, 1), "{r:?}");
    let after = nft.read_actual().unwrap().cgroups;
    assert_ne!(before, after);
    assert_eq!(after.values().map(BTreeSet::len).sum::<usize>(), 1);
    assert!(!can_connect(&topo.local, &blocked, "10.200.0.2", PORT), "recreated cgroup is blocked again");
}

#[test]
fn interface_block_cuts_the_veth_and_lifts() {
    let Some((topo, cg)) = setup() else { return };
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    assert!(can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
    let desired = NftDesired { interfaces: set(&["kv0"]), ..Default::default() };
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!(r.added, 1, "{r:?}");
    assert!(!can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
    assert!(!can_connect(&topo.local, &cg.path, "fd00:200::2", PORT));
    nft.reconcile(&NftDesired::default()).unwrap();
    assert!(can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
}

#[test]
fn geo_cidr_block_cuts_matching_destinations_only() {
    let Some((topo, cg)) = setup() else { return };
    let tenant = cg.child("tenant");
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    let geo = |v4: &[&str], v6: &[&str]| NftDesired {
        geo_cgroups: set(&[&cg.rel(&tenant)]),
        cidrs_v4: set(v4),
        cidrs_v6: set(v6),
        ..Default::default()
    };
    nft.reconcile(&geo(&["10.200.0.0/30"], &[])).unwrap();
    assert!(!can_connect(&topo.local, &tenant, "10.200.0.2", PORT), "v4 CIDR blocked");
    assert!(can_connect(&topo.local, &tenant, "fd00:200::2", PORT), "v6 not in any blocked CIDR");
    let r = nft.reconcile(&geo(&[], &["fd00:200::/64"])).unwrap();
    assert_eq!((r.added, r.removed), (1, 1), "{r:?}");
    assert!(can_connect(&topo.local, &tenant, "10.200.0.2", PORT), "v4 block lifted");
    assert!(!can_connect(&topo.local, &tenant, "fd00:200::2", PORT), "v6 CIDR blocked");
    nft.reconcile(&NftDesired::default()).unwrap();
    assert!(can_connect(&topo.local, &tenant, "fd00:200::2", PORT));
}

/// The geo block follows the decisions through [`desired_state`]: a prohibiting measure on
/// KP (`applies_to` left at its default, `foreign_persons`) with KP's CIDR being the peer's
/// network. An allowed foreign tenant cannot reach it; an allowed U.S. tenant on the same
/// host can, and so can the host's own processes (a cgroup in no workload); `applies_to:
/// all` brings the U.S. tenant into scope as well.
#[test]
fn geo_block_applies_to_the_tenants_a_measure_reaches_not_the_host() {
    use kycd::decision::Decision;
    use kycd::discovery::workload::WorkloadId;
    use kycd::enforce::{Cidr, CountryCidrs};
    use kycd::reconcile::{desired_state, WorkloadView};
    use kycd_protocol::{AppliesTo, ForeignStatus, PolicyClaims, Verdict};

    let Some((topo, cg)) = setup() else { return };
    let foreign_cg = cg.child("foreign");
    let us_cg = cg.child("us");
    let host_cg = cg.child("host-daemon");
    let mount = kycd_test_support::netns::cgroup2_mount().unwrap();
    let mut policy: PolicyClaims = serde_json::from_value(serde_json::json!({
        "iss": "a", "iat": 0, "exp": 10_000, "version": 1, "unverified": {"action": "deny"},
        "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                       "early_warning_fraction": 0.01},
        "measures": [{"id": "kp", "match": {"countries": ["KP"]}, "roles": ["customer", "beneficial_owner"],
                      "action": "prohibit", "citation": "EO 13984"}]
    }))
    .unwrap();
    let geo: CountryCidrs = [(
        "KP".to_owned(),
        (vec![Cidr::parse("10.200.0.0/30").unwrap()], vec![Cidr::parse("fd00:200::/64").unwrap()]),
    )]
    .into_iter()
    .collect();
    let allowed = |tenant: &str| Decision {
        verdict: Verdict::Allow,
        conditions: None,
        reasons: vec![],
        next_review_at: None,
        policy_version: Some(1),
        tenant: Some(tenant.into()),
        attestation_jti: Some(format!("{tenant}-jti")),
    };
    let ids: Vec<WorkloadId> = [&foreign_cg, &us_cg]
        .iter()
        .map(|p| format!("cgroup:/{}", p.strip_prefix(&mount).unwrap().display()).parse().unwrap())
        .collect();
    let decisions = [allowed("t-foreign"), allowed("t-us")];
    let cgroups = [foreign_cg.clone(), us_cg.clone()];
    let statuses = [ForeignStatus::Foreign, ForeignStatus::Us];
    let views = || {
        (0..2).map(|i| WorkloadView {
            id: &ids[i],
            cgroup: Some(cgroups[i].as_path()),
            interfaces: &[],
            decision: &decisions[i],
            foreign: statuses[i],
        })
    };
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    for addr in ["10.200.0.2", "fd00:200::2"] {
        for c in [&foreign_cg, &us_cg, &host_cg] {
            // IPv6 on a fresh veth can take a moment to come up.
            let up = (0..30).any(|_| {
                can_connect(&topo.local, c, addr, PORT) || {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    false
                }
            });
            assert!(up, "baseline {addr} from {}", c.display());
        }
    }

    let desired = desired_state(views(), Some(&policy), Some(&mount), Some(&geo), 1_000);
    assert_eq!(desired.nft.geo_cgroups, set(&[&cg.rel(&foreign_cg)]), "{desired:?}");
    assert!(desired.nft.cgroups.is_empty(), "nobody is cut off entirely");
    let r = nft.reconcile(&desired.nft).unwrap();
    assert!(r.skipped.is_empty(), "{r:?}");
    for addr in ["10.200.0.2", "fd00:200::2"] {
        assert!(!can_connect(&topo.local, &foreign_cg, addr, PORT), "foreign tenant reaches KP at {addr}");
        assert!(can_connect(&topo.local, &us_cg, addr, PORT), "U.S. tenant is blocked from {addr}");
        assert!(can_connect(&topo.local, &host_cg, addr, PORT), "host process is blocked from {addr}");
    }

    policy.measures[0].applies_to = AppliesTo::All;
    let desired = desired_state(views(), Some(&policy), Some(&mount), Some(&geo), 1_000);
    nft.reconcile(&desired.nft).unwrap();
    assert!(!can_connect(&topo.local, &us_cg, "10.200.0.2", PORT), "applies_to all reaches the U.S. tenant");
    assert!(can_connect(&topo.local, &host_cg, "10.200.0.2", PORT), "never the host's own processes");

    nft.reconcile(&NftDesired::default()).unwrap();
    assert!(can_connect(&topo.local, &foreign_cg, "10.200.0.2", PORT), "lift restores access");
}

#[test]
fn drift_is_repaired_and_reported() {
    let Some((topo, cg)) = setup() else { return };
    let vm = cg.child("vm");
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    let desired = NftDesired {
        cgroups: set(&[&cg.rel(&vm)]),
        interfaces: set(&["vnet7", "vnet8"]),
        cidrs_v4: set(&["192.0.2.0/24"]),
        cidrs_v6: BTreeSet::new(),
        geo_cgroups: BTreeSet::new(),
        geo_interfaces: set(&["vnet9"]),
    };
    nft.reconcile(&desired).unwrap();

    // An element deleted by hand comes back, counted as drift.
    topo.local.exec(&["nft", "delete", "element", "inet", "kycd", "ifaces", "{ \"vnet7\" }"]);
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!((r.added, r.drift, r.rebuilt), (1, 1, false), "{r:?}");
    assert!(nft.read_actual().unwrap().interfaces.contains("vnet7"));

    // A cgroup element deleted by hand (nft names it relative to /sys/fs/cgroup).
    let nft_name = vm.strip_prefix("/sys/fs/cgroup").unwrap().to_string_lossy().into_owned();
    let level = cg.rel(&vm).split('/').count();
    topo.local.exec(&[
        "nft",
        "delete",
        "element",
        "inet",
        "kycd",
        &format!("cg_l{level}"),
        &format!("{{ \"{nft_name}\" }}"),
    ]);
    assert!(can_connect(&topo.local, &vm, "10.200.0.2", PORT), "hand-deleted element really gone");
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!((r.added, r.drift), (1, 1), "{r:?}");
    assert!(!can_connect(&topo.local, &vm, "10.200.0.2", PORT));

    // An element added by hand is removed, also drift.
    topo.local.exec(&["nft", "add", "element", "inet", "kycd", "geo_v4", "{ 198.51.100.0/24 }"]);
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!((r.removed, r.drift), (1, 1), "{r:?}");

    // The whole table deleted by hand: rebuilt with every element.
    topo.local.exec(&["nft", "delete", "table", "inet", "kycd"]);
    let r = nft.reconcile(&desired).unwrap();
    assert!(r.rebuilt, "{r:?}");
    assert_eq!(r.drift, 5, "every element kycd had applied was missing: {r:?}");
    let a = nft.read_actual().unwrap();
    assert_eq!((a.interfaces.len(), a.geo_interfaces.len()), (2, 1));
    assert_eq!(a.cidrs_v4.len(), 1);
    assert!(!can_connect(&topo.local, &vm, "10.200.0.2", PORT));

    // A rule deleted by hand: the structure differs, so the table is rebuilt.
    let listing = topo.local.exec(&["nft", "-a", "list", "chain", "inet", "kycd", "output"]);
    let handle = listing
        .lines()
        .find(|l| l.contains("@cg_l"))
        .and_then(|l| l.rsplit("# handle ").next())
        .unwrap()
        .trim()
        .to_owned();
    topo.local.exec(&["nft", "delete", "rule", "inet", "kycd", "output", "handle", &handle]);
    let r = nft.reconcile(&desired).unwrap();
    assert!(r.rebuilt, "{r:?}");
    assert_eq!(r.drift, 0, "elements were all still there: {r:?}");
    assert_eq!(rule_count(&topo.local), 44);
}

#[test]
fn a_failed_transaction_leaves_the_ruleset_intact() {
    let Some((topo, cg)) = setup() else { return };
    let vm = cg.child("vm");
    let mut good = NftEnforcer::new(topo.local.nft_command());
    let desired =
        NftDesired { interfaces: set(&["kv0"]), cidrs_v4: set(&["192.0.2.0/24"]), ..Default::default() };
    good.reconcile(&desired).unwrap();
    let before = topo.local.exec(&["nft", "list", "table", "inet", "kycd"]);

    // `ip netns exec` remounts /sys, so nft cannot resolve the cgroup path: the
    // transaction (delete table, re-create, drop kv0, add the cgroup) fails as a whole.
    let mut bad = NftEnforcer::new(vec![
        "ip".into(),
        "netns".into(),
        "exec".into(),
        topo.local.name.clone(),
        "nft".into(),
    ])
    .with_cgroup_mount(cg.mount.clone());
    let other = NftDesired { cgroups: set(&[&cg.rel(&vm)]), ..Default::default() };
    match bad.reconcile(&other) {
        Err(EnforceError::NftFailed { stderr, .. }) => assert!(stderr.contains("cgroupv2"), "{stderr}"),
        other => panic!("expected nft to fail, got {other:?}"),
    }
    let after = topo.local.exec(&["nft", "list", "table", "inet", "kycd"]);
    assert_eq!(before, after, "a failed transaction changed the ruleset");
    assert!(!can_connect(&topo.local, &cg.path, "10.200.0.2", PORT), "the block in force stays in force");
    // Nothing else in the namespace's ruleset was created either.
    assert_eq!(topo.local.exec(&["nft", "list", "tables"]).trim(), "table inet kycd");
}

#[test]
fn rule_count_is_independent_of_element_count() {
    let Some((topo, cg)) = setup() else { return };
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    let vm = cg.child("vm");
    let one = NftDesired {
        cgroups: set(&[&cg.rel(&vm)]),
        interfaces: set(&["vnet0"]),
        cidrs_v4: set(&["11.0.0.0/24"]),
        ..Default::default()
    };
    nft.reconcile(&one).unwrap();
    let rules_one = rule_count(&topo.local);

    let many = NftDesired {
        cgroups: one.cgroups.clone(),
        interfaces: (0..10_000).map(|i| format!("b{i}")).collect(),
        cidrs_v4: (0..10_000).map(|i| format!("11.{}.{}.0/24", i >> 8, i & 255)).collect(),
        cidrs_v6: (0..10_000).map(|i| format!("2001:db8:{i:x}::/48")).collect(),
        ..Default::default()
    };
    let t = kycd_protocol::clock::monotonic();
    let r = nft.reconcile(&many).unwrap();
    eprintln!("30,000 elements applied in {:?}", t.elapsed());
    assert_eq!((r.added, r.removed), (3 * 10_000 - 1, 1), "vnet0 goes, 11.0.0.0/24 stays: {r:?}");
    let rules_many = rule_count(&topo.local);
    assert_eq!(rules_one, rules_many, "blocking more must add elements, not rules");
    assert_eq!(rules_one, 44);
    let a = nft.read_actual().unwrap();
    assert_eq!((a.interfaces.len(), a.cidrs_v4.len(), a.cidrs_v6.len()), (10_000, 10_000, 10_000));

    // One more element on top of 30,000 is an incremental change.
    let mut more = many.clone();
    more.interfaces.insert("extra0".into());
    let t = kycd_protocol::clock::monotonic();
    let r = nft.reconcile(&more).unwrap();
    eprintln!("one more element on 30,000 in {:?}", t.elapsed());
    assert_eq!((r.added, r.removed, r.rebuilt), (1, 0, false), "{r:?}");
}

#[test]
fn remove_table_releases_everything_and_tolerates_absence() {
    let Some((topo, cg)) = setup() else { return };
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    nft.reconcile(&NftDesired { interfaces: set(&["kv0"]), ..Default::default() }).unwrap();
    assert!(!can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
    nft.remove_table().unwrap();
    assert!(!nft.read_actual().unwrap().present);
    assert!(can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
    nft.remove_table().unwrap();
}

#[test]
fn unusable_entries_are_skipped_not_fatal() {
    let Some((topo, cg)) = setup() else { return };
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    let desired = NftDesired {
        cgroups: set(&[&format!("{}/absent", cg.rel(&cg.path)), "a/b/c/d/e/f/g"]),
        interfaces: set(&["kv0", "bad name", "waytoolonginterfacename"]),
        cidrs_v4: set(&["10.0.0.1/8", "fd00::/8"]),
        geo_interfaces: set(&["bad\"geo"]),
        ..Default::default()
    };
    let r = nft.reconcile(&desired).unwrap();
    assert_eq!(r.skipped.len(), 7, "{r:?}");
    assert_eq!(r.added, 1, "{r:?}");
    assert!(!can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
}

#[test]
fn apply_is_incremental_and_falls_back_to_reconcile_on_failure() {
    let Some((topo, cg)) = setup() else { return };
    let mut nft = NftEnforcer::new(topo.local.nft_command());
    // The first apply has nothing to diff against: a full reconcile.
    let r = nft.apply(&NftDesired { interfaces: set(&["vnet9"]), ..Default::default() }).unwrap();
    assert!(r.rebuilt, "{r:?}");
    let r = nft.apply(&NftDesired { interfaces: set(&["vnet9", "kv0"]), ..Default::default() }).unwrap();
    assert_eq!((r.added, r.removed, r.rebuilt), (1, 0, false), "{r:?}");
    assert!(!can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));

    // Table deleted by hand: the incremental transaction fails, the fallback rebuilds.
    topo.local.exec(&["nft", "delete", "table", "inet", "kycd"]);
    let r =
        nft.apply(&NftDesired { interfaces: set(&["vnet9", "kv0", "vnet1"]), ..Default::default() }).unwrap();
    assert!(r.rebuilt, "{r:?}");
    assert!(!can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
    assert_eq!(nft.read_actual().unwrap().interfaces.len(), 3);

    // An element deleted by hand that apply wants to delete: nft fails on the missing
    // element, the fallback reconcile converges anyway.
    topo.local.exec(&["nft", "delete", "element", "inet", "kycd", "ifaces", "{ \"kv0\" }"]);
    let r = nft.apply(&NftDesired { interfaces: set(&["vnet9"]), ..Default::default() }).unwrap();
    assert!(!r.rebuilt, "{r:?}");
    assert_eq!(nft.read_actual().unwrap().interfaces, set(&["vnet9"]));
    assert!(can_connect(&topo.local, &cg.path, "10.200.0.2", PORT));
}
