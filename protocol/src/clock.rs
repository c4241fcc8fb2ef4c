//! The one source of time: every part of kycd that needs "now" asks a [`Clock`].
//!
//! Production code holds a [`SystemClock`]; tests hold a [`ManualClock`] and move it by hand,
//! so grace periods, expiry, deadlines and backoff are tested without waiting for them.
//! `SystemTime::now` and `Instant::now` are banned everywhere else (`clippy.toml`,
//! `disallowed-methods`); this file is the one place allowed to call them.
//!
//! The clock lives in the protocol crate because every process shares it and it does no
//! I/O of its own: verification still takes `now` as an argument.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock and monotonic time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The wall clock (what timestamps and token validity are measured against).
    fn now(&self) -> SystemTime;

    /// The monotonic clock (what elapsed time and timeouts are measured with).
    fn instant(&self) -> Instant;

    /// The wall clock in whole Unix seconds (0 before the epoch, `i64::MAX` past its range).
    fn unix_now(&self) -> i64 {
        unix_seconds(self.now())
    }
}

/// Whole Unix seconds of `t` (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one sanctioned read of the wall clock.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    #[allow(clippy::disallowed_methods)] // The one sanctioned read of the monotonic clock.
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// Whole Unix seconds now, from the [`SystemClock`]: for code that is handed no clock (a
/// command-line tool, a test fixture).
pub fn unix_now() -> i64 {
    SystemClock.unix_now()
}

/// The wall clock now, from the [`SystemClock`] (for code that is handed no clock).
pub fn wall() -> SystemTime {
    SystemClock.now()
}

/// The monotonic clock now, from the [`SystemClock`] (for code that is handed no clock:
/// timing a step for a log line, a test's deadline).
pub fn monotonic() -> Instant {
    SystemClock.instant()
}

/// A clock that moves only when told to: both its wall and monotonic time advance together.
#[derive(Debug)]
pub struct ManualClock {
    state: Mutex<(SystemTime, Instant)>,
}

impl ManualClock {
    /// A clock showing Unix time `unix_s` (its monotonic time starts at the real "now").
    pub fn at(unix_s: i64) -> Self {
        let wall = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_s).unwrap_or(0));
        ManualClock { state: Mutex::new((wall, SystemClock.instant())) }
    }

    /// Moves both clocks forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.0 += d;
        s.1 += d;
    }

    /// Sets the wall clock to Unix time `unix_s` (the monotonic clock moves forward by the
    /// same amount when that is forward, and stays when it is backward, as real ones do).
    pub fn set_unix(&self, unix_s: i64) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wall = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_s).unwrap_or(0));
        if let Ok(forward) = wall.duration_since(s.0) {
            s.1 += forward;
        }
        s.0 = wall;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0
    }

    fn instant(&self) -> Instant {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::at(1_800_000_000);
        let start = clock.instant();
        assert_eq!(clock.unix_now(), 1_800_000_000);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.unix_now(), 1_800_000_090);
        assert_eq!(clock.instant() - start, Duration::from_secs(90));
        clock.set_unix(1_800_000_000);
        assert_eq!(clock.unix_now(), 1_800_000_000, "the wall clock may step back");
        assert_eq!(clock.instant() - start, Duration::from_secs(90), "the monotonic one does not");
    }

    #[test]
    fn unix_seconds_saturates_before_the_epoch() {
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_secs(5)), 5);
    }
}
