//! When a failing host is polled again: exponential backoff from the poll interval to a cap,
//! with a jitter derived from the host id and its failure count (see [`next_attempt_at`]).

use std::time::Duration;

use kycd_protocol::backoff;

/// When a host with `failures` consecutive failures, last tried at `last_attempt_at`, may
/// be polled again (None: now). See the module doc.
pub fn next_attempt_at(
    host_id: &str,
    last_attempt_at: Option<i64>,
    failures: u32,
    interval: Duration,
    backoff_max: Duration,
) -> Option<i64> {
    let last = last_attempt_at?;
    if failures == 0 {
        return None;
    }
    let delay = backoff::exponential(interval.max(Duration::from_secs(1)), failures, backoff_max);
    // Deterministic jitter in [0.5, 1): the same host and failure count always give the same
    // delay (so a restart does not reshuffle), different hosts failing together spread out.
    let jitter = 0.5 + 0.5 * backoff::keyed_fraction(&format!("{host_id}/{failures}"));
    Some(last.saturating_add((delay.as_secs_f64() * jitter).ceil() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let i = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        assert_eq!(next_attempt_at("h", None, 3, i, max), None, "never tried");
        assert_eq!(next_attempt_at("h", Some(1000), 0, i, max), None, "healthy");
        let delay = |f| next_attempt_at("h", Some(1000), f, i, max).unwrap() - 1000;
        for f in 1..=6u32 {
            let full = (60 * 2i64.pow(f - 1)).min(3600);
            assert!(delay(f) >= full / 2 && delay(f) <= full, "f={f}: {}", delay(f));
        }
        assert!(delay(40) <= 3600 && delay(40) >= 1800);
        assert_eq!(delay(3), delay(3), "deterministic");
        let spread: std::collections::HashSet<i64> =
            (0..50).map(|h| next_attempt_at(&format!("host-{h}"), Some(0), 4, i, max).unwrap()).collect();
        assert!(spread.len() > 10, "hosts failing together spread out: {spread:?}");
    }
}
