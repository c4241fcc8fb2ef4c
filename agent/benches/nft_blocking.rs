//! Blocking latency of the nftables backend with 10,000 workloads already blocked: the time
//! from `NftEnforcer::reconcile` being called with one more blocked cgroup to it returning,
//! which is after `nft` has committed the transaction (the rule is active then). Runs in a
//! private network namespace; needs root, nft, iproute2, nsenter and unshare.
//!
//!     cargo bench -p kycd --bench nft_blocking
//!
//! `NftEnforcer::apply` (diff against what was last applied, no read-back) is timed the
//! same way.
//!
//! Baseline, in the same run and namespace: a bare `nft -f -` adding one cgroup element by
//! hand (no read-back, no diff) — the floor of any nft-CLI-driven enforcer. A second
//! scenario does the same with 10,000 geo CIDRs in place instead. Also prints the rule count
//! of `nft list table inet kycd` with 1 and with 10,000 elements.
// A benchmark is test code: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_test_support::netns as enforce_support;

use std::io::Write as _;
use std::process::{Command, Stdio};

use enforce_support::*;
use kycd::enforce::{NftDesired, NftEnforcer};

const IN_PLACE: usize = 10_000;
const CHANGES: usize = 200;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = (percentile(&ms, 0.50), percentile(&ms, 0.99), ms[ms.len() - 1]);
    println!("{name:<52} n={:<4} p50={p50:>8.3} ms  p99={p99:>8.3} ms  max={max:>8.3} ms", ms.len());
    (p50, p99)
}

/// `nft -f -` by hand in `ns`, feeding `script`.
fn bare_nft(ns: &Netns, script: &str) {
    let mut cmd = Command::new(&ns.nft_command()[0]);
    cmd.args(&ns.nft_command()[1..]).args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "bare nft failed: {script}");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes benches with this.
    }
    if let Err(why) = nft_capable() {
        skip(&why);
        return;
    }
    let cg = match TestCgroup::new() {
        Ok(cg) => cg,
        Err(why) => return skip(&why),
    };
    let ns = Netns::new().unwrap();
    let t = kycd_protocol::clock::monotonic();
    let base = cg.child("w");
    let names: Vec<String> = (0..IN_PLACE + 2 * CHANGES).map(|i| format!("wl{i}")).collect();
    for n in &names {
        std::fs::create_dir(base.join(n)).unwrap();
    }
    eprintln!("created {} cgroups in {:?}", names.len(), t.elapsed());
    let rel = |n: &str| cg.rel(&base.join(n));

    // --- Scenario 1: 10,000 blocked cgroups in place, add one more, 200 times.
    let mut nft = NftEnforcer::new(ns.nft_command());
    let mut desired = NftDesired::default();
    desired.cgroups.insert(rel(&names[0]));
    nft.reconcile(&desired).unwrap();
    let rules_one = rule_count(&ns);
    desired.cgroups.extend(names[..IN_PLACE].iter().map(|n| rel(n)));
    let t = kycd_protocol::clock::monotonic();
    let r = nft.reconcile(&desired).unwrap();
    eprintln!("initial 10,000-cgroup reconcile: {:?} ({r:?})", t.elapsed());
    let rules_many = rule_count(&ns);

    let mut kycd_ms = Vec::with_capacity(CHANGES);
    for n in &names[IN_PLACE..IN_PLACE + CHANGES] {
        desired.cgroups.insert(rel(n));
        let t = kycd_protocol::clock::monotonic();
        let r = nft.reconcile(&desired).unwrap();
        kycd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((r.added, r.removed, r.rebuilt), (1, 0, false), "{r:?}");
    }
    // The same with `apply`, which diffs against what it last applied instead of reading back.
    let mut apply_ms = Vec::with_capacity(CHANGES);
    for n in &names[IN_PLACE + CHANGES..] {
        desired.cgroups.insert(rel(n));
        let t = kycd_protocol::clock::monotonic();
        let r = nft.apply(&desired).unwrap();
        apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((r.added, r.removed, r.rebuilt), (1, 0, false), "{r:?}");
    }
    // Back to 10,000 + 200 for the baseline, which adds the same elements by hand.
    for n in &names[IN_PLACE + CHANGES..] {
        desired.cgroups.remove(&rel(n));
    }
    nft.reconcile(&desired).unwrap();
    let level = rel(&names[0]).split('/').count();
    let prefix = cg.mount.strip_prefix("/sys/fs/cgroup").unwrap().to_path_buf();
    let mut bare_ms = Vec::with_capacity(CHANGES);
    for n in &names[IN_PLACE + CHANGES..] {
        let name = prefix.join(rel(n));
        let script = format!("add element inet kycd cg_l{level} {{ \"{}\" }}\n", name.display());
        let t = kycd_protocol::clock::monotonic();
        bare_nft(&ns, &script);
        bare_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total = nft.read_actual().unwrap().cgroups.values().map(|s| s.len()).sum::<usize>();
    assert_eq!(total, IN_PLACE + 2 * CHANGES, "every added element is in the kernel");

    println!("\n{IN_PLACE} blocked cgroups in place, one more blocked per change:");
    let (k50, k99) = summary("kycd NftEnforcer::reconcile (+1 cgroup)", kycd_ms);
    let (a50, a99) = summary("kycd NftEnforcer::apply (+1 cgroup)", apply_ms);
    let (b50, b99) = summary("baseline: bare `nft -f -` add element (+1 cgroup)", bare_ms);
    println!("ratio reconcile/bare: p50 {:.2}x, p99 {:.2}x", k50 / b50, k99 / b99);
    println!("ratio apply/bare:     p50 {:.2}x, p99 {:.2}x", a50 / b50, a99 / b99);

    // --- Scenario 2: 10,000 geo CIDRs in place, block one more cgroup per change.
    let mut nft = NftEnforcer::new(ns.nft_command());
    nft.remove_table().unwrap();
    let mut desired = NftDesired {
        cidrs_v4: (0..IN_PLACE).map(|i| format!("11.{}.{}.0/24", i >> 8, i & 255)).collect(),
        ..Default::default()
    };
    nft.reconcile(&desired).unwrap();
    let mut geo_ms = Vec::with_capacity(CHANGES);
    for n in &names[..CHANGES] {
        desired.cgroups.insert(rel(n));
        let t = kycd_protocol::clock::monotonic();
        let r = nft.reconcile(&desired).unwrap();
        geo_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.added, 1, "{r:?}");
    }
    let mut geo_apply_ms = Vec::with_capacity(CHANGES);
    for n in &names[CHANGES..2 * CHANGES] {
        desired.cgroups.insert(rel(n));
        let t = kycd_protocol::clock::monotonic();
        let r = nft.apply(&desired).unwrap();
        geo_apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.added, 1, "{r:?}");
    }
    let mut bare_ms = Vec::with_capacity(CHANGES);
    for n in &names[2 * CHANGES..3 * CHANGES] {
        let name = prefix.join(rel(n));
        let script = format!("add element inet kycd cg_l{level} {{ \"{}\" }}\n", name.display());
        let t = kycd_protocol::clock::monotonic();
        bare_nft(&ns, &script);
        bare_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut bare_cidr_ms = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let script = format!("add element inet kycd geo_v4 {{ 12.0.{}.{}/32 }}\n", i >> 8, i & 255);
        let t = kycd_protocol::clock::monotonic();
        bare_nft(&ns, &script);
        bare_cidr_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("\n{IN_PLACE} geo CIDRs in place, one more cgroup blocked per change:");
    let (g50, g99) = summary("kycd NftEnforcer::reconcile (+1 cgroup)", geo_ms);
    let (a50, a99) = summary("kycd NftEnforcer::apply (+1 cgroup)", geo_apply_ms);
    let (b50, b99) = summary("baseline: bare `nft -f -` add element (+1 cgroup)", bare_ms);
    summary("for reference: bare `nft -f -` add element (+1 CIDR)", bare_cidr_ms);
    println!("ratio reconcile/bare: p50 {:.2}x, p99 {:.2}x", g50 / b50, g99 / b99);
    println!("ratio apply/bare:     p50 {:.2}x, p99 {:.2}x", a50 / b50, a99 / b99);

    println!("\n`nft list table inet kycd` rules: {rules_one} with 1 element, {rules_many} with {IN_PLACE}");
    nft.remove_table().unwrap();
}
