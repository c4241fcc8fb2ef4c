//! Shared helpers for kycd's end-to-end tests: locating fixtures and reading corpus manifests.
#![allow(clippy::panic)] // test support: a missing fixture should fail the test loudly

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// `tests/corpus/<name>`.
pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name)
}

/// A corpus manifest: the fixed clock the tokens were made for, and the cases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest<C> {
    /// Unix time at which the corpus is evaluated (tokens are made relative to it).
    pub now: i64,
    /// Clock skew to verify with.
    pub skew_s: u64,
    /// The cases.
    pub cases: Vec<C>,
}

/// Reads `dir/manifest.json`, panicking with the path on any error.
pub fn read_manifest<C: DeserializeOwned>(dir: &Path) -> Manifest<C> {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
