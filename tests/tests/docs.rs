//! The configuration reference (`docs/configuration.md`) lists exactly the keys of the
//! packaged agent configuration (`packaging/kycd.toml`), which a unit test in
//! `agent/src/config/mod.rs` keeps complete and equal to the defaults of the config struct: so
//! a key added to the struct fails there until it is in the example, and here until it is
//! documented (and a documented key that no longer exists fails here).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Dotted keys (`section.key`, or `key` at the top level) of the packaged config, with the
/// optional keys that appear commented out (`# key = …`) included.
fn example_keys() -> BTreeSet<String> {
    let text = repo_file("packaging/kycd.toml");
    let uncommented: String = text
        .lines()
        .map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ")).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let table: toml::Table = toml::from_str(&uncommented).unwrap();
    let mut keys = BTreeSet::new();
    for (k, v) in &table {
        match v {
            toml::Value::Table(t) => keys.extend(t.keys().map(|sub| format!("{k}.{sub}"))),
            _ => {
                keys.insert(k.clone());
            }
        }
    }
    keys
}

/// Dotted keys of the reference table rows: `| section | `key` | type | default | meaning |`.
fn documented_keys() -> BTreeSet<String> {
    let text = repo_file("docs/configuration.md");
    let mut keys = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let (Some(section), Some(key)) = (cells.first(), cells.get(1)) else { continue };
        let Some(key) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else { continue };
        let section = section.trim_start_matches("| ").trim();
        let dotted = if section == "(top level)" { key.to_owned() } else { format!("{section}.{key}") };
        assert!(keys.insert(dotted.clone()), "{dotted} is documented twice");
    }
    keys
}

#[test]
fn the_configuration_reference_lists_exactly_the_packaged_configs_keys() {
    let example = example_keys();
    let documented = documented_keys();
    assert!(example.len() > 40, "too few keys parsed from packaging/kycd.toml: {example:?}");
    let undocumented: Vec<_> = example.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&example).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/configuration.md is out of sync with packaging/kycd.toml:\n  missing from the docs: \
         {undocumented:?}\n  documented but not in the config: {stale:?}"
    );
}

/// The checker itself: a key missing on either side is seen.
#[test]
fn the_sync_check_parses_both_sides() {
    let documented = documented_keys();
    for key in ["mode", "state_dir", "api.socket_group", "reporting.collector_url", "gpu.replay_trace"] {
        assert!(documented.contains(key), "{key} not parsed from the docs table");
        assert!(example_keys().contains(key), "{key} not parsed from packaging/kycd.toml");
    }
    assert!(!documented.contains("nonexistent.key"));
}
