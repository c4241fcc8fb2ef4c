//! Test harnesses that more than one crate's tests or benches use, in one place instead of
//! `#[path]` includes of another crate's test files.
//!
//! - [`pg`]: a throwaway PostgreSQL cluster and a fresh database per test.
//! - [`bench_stats`]: percentiles and the like of measured durations.
//!
//! Test code: unwrap and panic are how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench_stats;
pub mod pg;
