//! The table `inet kycd` (chains, sets, the fixed rules) and the pieces of the `nft -f -`
//! transaction that brings its sets to their desired contents.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use super::{CHUNK, MAX_CGROUP_LEVEL, NFT_CGROUP_ROOT, TABLE};

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
    for level in 1..=MAX_CGROUP_LEVEL {
        t.push_str(&format!("\tset cg_l{level} {{\n\t\ttype cgroupsv2\n\t}}\n"));
    }
    t.push_str("\tset ifaces {\n\t\ttype ifname\n\t}\n");
    t.push_str("\tset geo_v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}\n");
    t.push_str("\tset geo_v6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t}\n");
    let cg_rules = || {
        (1..=MAX_CGROUP_LEVEL)
            .map(|l| format!("\t\tsocket cgroupv2 level {l} @cg_l{l} drop comment \"kycd:cg_l{l}\"\n"))
            .collect::<String>()
    };
    let chain = |name: &str, body: String| {
        format!("\tchain {name} {{\n\t\ttype filter hook {name} priority filter - 10; policy accept;\n{body}\t}}\n")
    };
    t.push_str(&chain(
        "input",
        format!(
            "\t\tiifname @ifaces drop comment \"kycd:ifaces\"\n{}\t\tip saddr @geo_v4 drop comment \"kycd:geo_v4\"\n\t\tip6 saddr @geo_v6 drop comment \"kycd:geo_v6\"\n",
            cg_rules()
        ),
    ));
    t.push_str(&chain(
        "forward",
        "\t\tiifname @ifaces drop comment \"kycd:ifaces\"\n\t\toifname @ifaces drop comment \"kycd:ifaces\"\n\
         \t\tip saddr @geo_v4 drop comment \"kycd:geo_v4\"\n\t\tip daddr @geo_v4 drop comment \"kycd:geo_v4\"\n\
         \t\tip6 saddr @geo_v6 drop comment \"kycd:geo_v6\"\n\t\tip6 daddr @geo_v6 drop comment \"kycd:geo_v6\"\n"
            .to_owned(),
    ));
    t.push_str(&chain(
        "output",
        format!(
            "\t\toifname @ifaces drop comment \"kycd:ifaces\"\n{}\t\tip daddr @geo_v4 drop comment \"kycd:geo_v4\"\n\t\tip6 daddr @geo_v6 drop comment \"kycd:geo_v6\"\n",
            cg_rules()
        ),
    ));
    t.push_str("}\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_definition_has_a_fixed_rule_count() {
        let t = table_definition();
        assert_eq!(t.matches(" drop comment").count(), 2 * MAX_CGROUP_LEVEL + 12);
        assert!(!t.contains("flush ruleset"));
    }
}
