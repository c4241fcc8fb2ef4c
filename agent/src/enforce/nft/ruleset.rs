//! The table `inet kycd` (chains, sets, the fixed rules) and the pieces of the `nft -f -`
//! transaction that brings its sets to their desired contents.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use super::{CG_SET, CHUNK, GEO_CG_SET, MAX_CGROUP_LEVEL, NFT_CGROUP_ROOT, TABLE};

/// How a value-compared set is brought to its desired contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rewrite {
    /// Delete the extra elements, add the missing ones.
    Incremental,
    /// Flush and re-add everything (the set holds elements kycd cannot name).
    Flush,
    /// The set is being created in this transaction: add everything.
    Fresh,
}

/// One set's share of a transaction.
#[derive(Debug, Default)]
pub(super) struct SetChange {
    pub(super) script: String,
    pub(super) added: usize,
    pub(super) removed: usize,
    pub(super) drift: usize,
}

/// Diffs a set compared by value: `want` against `actual`, with `prev` (what was last
/// applied) telling drift from new entries. Elements are formatted only for the difference.
pub(super) fn plain_set<T: Ord>(
    set: &str,
    want: &BTreeSet<T>,
    actual: &BTreeSet<T>,
    prev: Option<&BTreeSet<T>>,
    rewrite: Rewrite,
    fmt: impl Fn(&T) -> String,
) -> SetChange {
    let add: Vec<&T> = want.difference(actual).collect();
    let del: Vec<&T> = actual.difference(want).collect();
    let mut change = SetChange { added: add.len(), removed: del.len(), ..SetChange::default() };
    if let Some(p) = prev {
        change.drift =
            add.iter().filter(|e| p.contains(e)).count() + del.iter().filter(|e| !p.contains(e)).count();
    }
    match rewrite {
        Rewrite::Fresh => push_elements(&mut change.script, "add", set, want.iter().map(&fmt)),
        Rewrite::Flush => {
            change.script.push_str(&format!("flush set inet {TABLE} {set}\n"));
            push_elements(&mut change.script, "add", set, want.iter().map(&fmt));
        }
        Rewrite::Incremental => {
            push_elements(&mut change.script, "delete", set, del.into_iter().map(&fmt));
            push_elements(&mut change.script, "add", set, add.into_iter().map(&fmt));
        }
    }
    change
}

/// The id `nft` would resolve the element name `name` to now.
pub(super) fn cgroup_id(name: &str) -> Option<u64> {
    std::fs::metadata(Path::new(NFT_CGROUP_ROOT).join(name)).ok().map(|m| m.ino())
}

pub(super) fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

pub(super) fn push_elements(
    script: &mut String,
    verb: &str,
    set: &str,
    elements: impl Iterator<Item = String>,
) {
    let all: Vec<String> = elements.collect();
    for chunk in all.chunks(CHUNK) {
        script.push_str(&format!("{verb} element inet {TABLE} {set} {{ {} }}\n", chunk.join(", ")));
    }
}

/// The table with its sets, chains and rules, without elements.
pub(super) fn table_definition() -> String {
    let mut t = format!("table inet {TABLE} {{\n");
    for prefix in [CG_SET, GEO_CG_SET] {
        for level in 1..=MAX_CGROUP_LEVEL {
            t.push_str(&format!("\tset {prefix}{level} {{\n\t\ttype cgroupsv2\n\t}}\n"));
        }
    }
    for set in ["ifaces", "geo_ifaces"] {
        t.push_str(&format!("\tset {set} {{\n\t\ttype ifname\n\t}}\n"));
    }
    t.push_str("\tset geo_v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}\n");
    t.push_str("\tset geo_v6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t}\n");
    let cg_rules = || {
        (1..=MAX_CGROUP_LEVEL)
            .map(|l| format!("\t\tsocket cgroupv2 level {l} @cg_l{l} drop comment \"kycd:cg_l{l}\"\n"))
            .collect::<String>()
    };
    // The jurisdiction CIDRs, only for the workloads in geo scope (see the module docs):
    // sockets of their cgroups in `input`/`output`, their taps' routed traffic in `forward`.
    let geo_cg_rules = |dir: &str| {
        (1..=MAX_CGROUP_LEVEL)
            .flat_map(|l| {
                [("ip", "geo_v4"), ("ip6", "geo_v6")].map(|(family, set)| {
                    format!(
                        "\t\tsocket cgroupv2 level {l} @{GEO_CG_SET}{l} {family} {dir} @{set} drop comment \"kycd:{GEO_CG_SET}{l}\"\n"
                    )
                })
            })
            .collect::<String>()
    };
    let chain = |name: &str, body: String| {
        format!("\tchain {name} {{\n\t\ttype filter hook {name} priority filter - 10; policy accept;\n{body}\t}}\n")
    };
    t.push_str(&chain(
        "input",
        format!("\t\tiifname @ifaces drop comment \"kycd:ifaces\"\n{}{}", cg_rules(), geo_cg_rules("saddr")),
    ));
    t.push_str(&chain(
        "forward",
        "\t\tiifname @ifaces drop comment \"kycd:ifaces\"\n\t\toifname @ifaces drop comment \"kycd:ifaces\"\n\
         \t\tiifname @geo_ifaces ip daddr @geo_v4 drop comment \"kycd:geo_ifaces\"\n\
         \t\toifname @geo_ifaces ip saddr @geo_v4 drop comment \"kycd:geo_ifaces\"\n\
         \t\tiifname @geo_ifaces ip6 daddr @geo_v6 drop comment \"kycd:geo_ifaces\"\n\
         \t\toifname @geo_ifaces ip6 saddr @geo_v6 drop comment \"kycd:geo_ifaces\"\n"
            .to_owned(),
    ));
    t.push_str(&chain(
        "output",
        format!("\t\toifname @ifaces drop comment \"kycd:ifaces\"\n{}{}", cg_rules(), geo_cg_rules("daddr")),
    ));
    t.push_str("}\n");
    t
}

/// Brings the cgroup sets `{prefix}1` … `{prefix}N` to `want`, compared by cgroup id:
/// counts are against what the kernel had (`actual`), the script against what each set holds
/// once the transaction reaches it (nothing, after a `rebuild`). An element to delete whose
/// last applied name (`prev`) no longer resolves to its id forces a flush of its set.
pub(super) fn cgroup_sets(
    prefix: &str,
    want: &BTreeMap<usize, BTreeMap<u64, String>>,
    actual: &BTreeMap<usize, BTreeSet<u64>>,
    unresolved: &BTreeSet<usize>,
    prev: Option<&BTreeMap<usize, BTreeMap<u64, String>>>,
    rebuild: bool,
) -> SetChange {
    let mut change = SetChange::default();
    let script = &mut change.script;
    for level in 1..=MAX_CGROUP_LEVEL {
        let set = format!("{prefix}{level}");
        let empty_w = BTreeMap::new();
        let empty_a = BTreeSet::new();
        let w = want.get(&level).unwrap_or(&empty_w);
        let a = actual.get(&level).unwrap_or(&empty_a);
        let prev = prev.map(|p| p.get(&level).unwrap_or(&empty_w));
        let add: Vec<u64> = w.keys().filter(|id| !a.contains(id)).copied().collect();
        let del: Vec<u64> = a.iter().filter(|id| !w.contains_key(id)).copied().collect();
        if let Some(p) = prev {
            change.drift += add.iter().filter(|id| p.contains_key(id)).count();
            change.drift += del.iter().filter(|id| !p.contains_key(id)).count();
        }
        change.added += add.len();
        change.removed += del.len();
        if rebuild {
            push_elements(script, "add", &set, w.values().map(|n| quote(n)));
            continue;
        }
        // Deleting needs a name that still resolves to the id; otherwise flush the set
        // and re-add what is wanted, in the same transaction.
        let mut del_names = Vec::new();
        let mut flush = unresolved.contains(&level);
        for id in &del {
            match prev.and_then(|p| p.get(id)).filter(|name| cgroup_id(name) == Some(*id)) {
                Some(name) => del_names.push(quote(name)),
                None => flush = true,
            }
        }
        if flush {
            script.push_str(&format!("flush set inet {TABLE} {set}\n"));
            push_elements(script, "add", &set, w.values().map(|n| quote(n)));
        } else {
            push_elements(script, "delete", &set, del_names.into_iter());
            push_elements(script, "add", &set, add.iter().filter_map(|id| w.get(id)).map(|n| quote(n)));
        }
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_definition_has_a_fixed_rule_count() {
        let t = table_definition();
        // cg_lN in input and output, ifaces in all three chains (both ways in forward),
        // geo_ifaces both ways in two families, geo_cg_lN in two families in input and output.
        assert_eq!(t.matches(" drop comment").count(), 2 * MAX_CGROUP_LEVEL + 4 + 4 + 4 * MAX_CGROUP_LEVEL);
        assert!(!t.contains("flush ruleset"));
        // Geo CIDRs never match on their own: every rule naming them names a workload set.
        for line in t.lines().filter(|l| l.contains("@geo_v")) {
            assert!(line.contains("@geo_cg_l") || line.contains("@geo_ifaces"), "{line}");
        }
    }
}
