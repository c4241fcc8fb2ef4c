//! Retry timing shared by every retrying loop (report upload, policy fetch, collector
//! polling): exponential growth to a cap, and jitter so a fleet restarted together does not
//! retry together. Pure functions: the caller owns the clock and the sleeping.

use std::hash::{BuildHasher as _, Hasher as _};
use std::time::Duration;

/// `base · 2^(failures − 1)`, at most `cap` (`failures` ≥ 1; 0 counts as 1).
pub fn exponential(base: Duration, failures: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(cap)
}

/// A random duration in `[0, d]` ("full jitter"), from std's randomly keyed hasher: not
/// cryptographic, which spreading retries does not need.
pub fn full_jitter(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { h.finish() % nanos.saturating_add(1) })
}

/// `d` ± `fraction` (e.g. 0.1 for ±10 %), uniformly at random.
pub fn spread(d: Duration, fraction: f64) -> Duration {
    let fraction = fraction.clamp(0.0, 1.0);
    d.mul_f64(1.0 - fraction) + full_jitter(d.mul_f64(2.0 * fraction))
}

/// A deterministic fraction in `[0, 1)` of `key`: the same key always waits the same share
/// of its backoff (a host's retries spread across the interval, reproducibly).
pub fn keyed_fraction(key: &str) -> f64 {
    // FNV-1a: stable across processes and releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_to_its_cap() {
        let s = Duration::from_secs;
        assert_eq!(exponential(s(1), 0, s(60)), s(1));
        assert_eq!(exponential(s(1), 1, s(60)), s(1));
        assert_eq!(exponential(s(1), 4, s(60)), s(8));
        assert_eq!(exponential(s(1), 10, s(60)), s(60));
        assert_eq!(exponential(s(1), u32::MAX, s(60)), s(60));
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let d = Duration::from_secs(10);
        let draws: Vec<Duration> = (0..64).map(|_| full_jitter(d)).collect();
        assert!(draws.iter().all(|j| *j <= d));
        assert!(draws.iter().any(|j| *j != draws[0]), "not random");
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
        for _ in 0..64 {
            let s = spread(d, 0.1);
            assert!(s >= Duration::from_secs(9) && s <= Duration::from_secs(11), "{s:?}");
        }
    }

    #[test]
    fn keyed_fraction_is_stable_and_in_range() {
        assert_eq!(keyed_fraction("h1"), keyed_fraction("h1"));
        assert_ne!(keyed_fraction("h1"), keyed_fraction("h2"));
        assert!((0..100).map(|i| keyed_fraction(&format!("host-{i}"))).all(|f| (0.0..1.0).contains(&f)));
    }
}
