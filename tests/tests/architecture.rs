//! The rules of `docs/architecture.md`, checked on the source tree: no import loops between
//! a crate's modules (one per file; a parent and its children excepted), no source file over about 500 lines of non-test code, the
//! protocol crate free of I/O, and both collector storage backends made of the same files.
//! (Time read only through the `Clock` is clippy's `disallowed-methods`, in `clippy.toml`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// "About 500 lines": the limit a file's non-test code must stay under.
const MAX_NON_TEST_LINES: usize = 520;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A file's code before its inline test module.
fn non_test_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The code without comments (so a doc comment naming `SystemTime::now` is not a use).
fn without_comments(code: &str) -> String {
    code.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const CRATES: [&str; 4] = ["protocol/src", "net/src", "agent/src", "collector/src"];

#[test]
fn no_file_has_more_than_about_500_lines_of_non_test_code() {
    let mut over = Vec::new();
    for krate in CRATES {
        // A `tests.rs` is a test module kept in a file of its own.
        for file in rust_files(&repo().join(krate)).into_iter().filter(|f| !f.ends_with("tests.rs")) {
            let lines = non_test_code(&file).lines().count();
            if lines > MAX_NON_TEST_LINES {
                over.push(format!("{}: {lines}", file.strip_prefix(repo()).unwrap().display()));
            }
        }
    }
    assert!(over.is_empty(), "files over {MAX_NON_TEST_LINES} lines of non-test code:\n{}", over.join("\n"));
}

/// A file's module path (`agent/src/core/intake.rs` → `core::intake`, `core/mod.rs` →
/// `core`); `None` for the crate root and binaries.
fn module_path(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if matches!(parts[0].as_str(), "lib" | "main" | "bin") {
        return None;
    }
    let parts: Vec<String> = parts.into_iter().filter(|p| p != "mod").collect();
    Some(parts.join("::"))
}

/// Whether one module is inside the other (a parent and its children use each other's items
/// by design: `mod` declarations one way, `super::` the other).
fn nested(a: &str, b: &str) -> bool {
    let inside =
        |inner: &str, outer: &str| inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with("::"));
    inside(a, b) || inside(b, a)
}

/// `crate::a::b::…` paths in `code`, each as its module-path segments (`a::b::…`, up to the
/// first segment that does not look like a module name).
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let preceded_by_ident = rest[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !preceded_by_ident {
            let path: String =
                after.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            let segments: Vec<&str> = path
                .split("::")
                .take_while(|s| !s.is_empty() && s.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
                .collect();
            if !segments.is_empty() {
                out.insert(segments.join("::"));
            }
        }
        rest = after;
    }
    out
}

/// The module an import names: the longest of `modules` that is a prefix of its path.
fn resolve<'a>(import: &str, modules: &'a BTreeSet<String>) -> Option<&'a String> {
    let segments: Vec<&str> = import.split("::").collect();
    (1..=segments.len()).rev().find_map(|n| modules.get(&segments[..n].join("::")))
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_loops_between_modules() {
    for krate in CRATES {
        let src = repo().join(krate);
        let files: Vec<(String, PathBuf)> =
            rust_files(&src).into_iter().filter_map(|f| Some((module_path(&src, &f)?, f))).collect();
        let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, file) in &files {
            let imports = crate_imports(&without_comments(&non_test_code(file)));
            let targets = imports.iter().filter_map(|i| resolve(i, &modules));
            let edges = graph.entry(module.clone()).or_default();
            edges.extend(targets.filter(|t| *t != module && !nested(t, module)).cloned());
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: import loop {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_loop_through_a_re_export() {
    let modules: BTreeSet<String> = ["daemon", "net::policy_fetch", "net"].map(String::from).into();
    assert_eq!(resolve("net::policy_fetch::FetchedPolicy", &modules).unwrap(), "net::policy_fetch");
    assert_eq!(resolve("daemon::Event", &modules).unwrap(), "daemon");
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("daemon".to_owned(), BTreeSet::from(["net::policy_fetch".to_owned()])),
        ("net::policy_fetch".to_owned(), BTreeSet::from(["daemon".to_owned()])),
    ]
    .into();
    assert!(find_cycle(&graph).is_some());
    assert!(nested("core::intake", "core") && !nested("core", "core_clock"));
}

#[test]
fn the_protocol_crate_does_no_io() {
    for file in rust_files(&repo().join("protocol/src")) {
        let code = without_comments(&non_test_code(&file));
        for banned in ["std::fs", "std::net", "tokio", "std::process", "std::env"] {
            assert!(!code.contains(banned), "{}: uses {banned}", file.display());
        }
    }
}

#[test]
fn both_storage_backends_have_the_same_files() {
    let names = |backend: &str| -> BTreeSet<String> {
        let dir = repo().join("collector/src/store").join(backend);
        rust_files(&dir).iter().map(|f| f.strip_prefix(&dir).unwrap().display().to_string()).collect()
    };
    let (sqlite, postgres) = (names("sqlite"), names("postgres"));
    assert!(!sqlite.is_empty(), "no collector/src/store/sqlite");
    assert_eq!(sqlite, postgres);
}
