//! Test harnesses that more than one crate's tests or benches use, in one place instead of
//! `#[path]` includes of another crate's test files.
//!
//! - [`pg`]: a throwaway PostgreSQL cluster and a fresh database per test.
//! - [`bench_stats`]: percentiles and the like of measured durations.
//! - [`host`]: a temporary installation of the real `kycd` binary (keys, trust files,
//!   config, state), the running daemon, and readers of its audit log (the agent's
//!   end-to-end tests).
//! - [`fake_nvml`]: the fake `libnvidia-ml.so` with a scenario and a fake `/proc`, per test.
//! - [`netns`]: real-kernel fixtures of the enforcement tests: network namespaces, throwaway
//!   cgroups, listeners and connection probes.
//!
//! A test that cannot run here (not root, no PostgreSQL, no nft, no promtool, …) says so with
//! [`skip!`] and returns — unless `KYCD_REQUIRE_ALL=1` (which `tests/run` sets as root, as
//! CI runs), where the same call fails the test: in CI nothing skips.
//!
//! Test code: unwrap and panic are how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench_stats;
pub mod fake_nvml;
pub mod host;
pub mod netns;
pub mod pg;
pub mod sysfs;

/// Whether every test must run here (`KYCD_REQUIRE_ALL` set): a missing capability is then a
/// failure, not a skip.
pub fn require_all() -> bool {
    std::env::var_os("KYCD_REQUIRE_ALL").is_some()
}

/// Skips the test loudly (`SKIP …` on stderr) — or fails it when [`require_all`].
#[track_caller]
pub fn skip_with(why: std::fmt::Arguments<'_>) {
    assert!(!require_all(), "{why} (KYCD_REQUIRE_ALL is set: nothing may skip)");
    eprintln!("{why}");
}

/// `skip!("SKIP …: why", args…)`: see [`skip_with`]. The caller returns after it.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {
        $crate::skip_with(format_args!($($arg)*))
    };
}

/// Polls `f` every `every` until it returns `Some`, for at most `secs` seconds; on a timeout
/// fails with `what` and `context()` (the daemons' logs, say). For conditions another process
/// brings about, which no manual clock can advance.
pub fn wait_for<T>(
    secs: u64,
    every: std::time::Duration,
    what: &str,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = kycd_protocol::clock::monotonic() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(kycd_protocol::clock::monotonic() < deadline, "timed out waiting for {what}\n{}", context());
        std::thread::sleep(every);
    }
}
