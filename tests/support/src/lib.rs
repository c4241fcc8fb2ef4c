//! Test harnesses that more than one crate's tests or benches use, in one place instead of
//! `#[path]` includes of another crate's test files.
//!
//! - [`pg`]: a throwaway PostgreSQL cluster and a fresh database per test.
//! - [`bench_stats`]: percentiles and the like of measured durations.
//! - [`host`]: a temporary installation of the real `kycd` binary (keys, trust files,
//!   config, state), the running daemon, and readers of its audit log (the agent's
//!   end-to-end tests).
//! - [`netns`]: real-kernel fixtures of the enforcement tests: network namespaces, throwaway
//!   cgroups, listeners and connection probes.
//!
//! Test code: unwrap and panic are how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench_stats;
pub mod host;
pub mod netns;
pub mod pg;
