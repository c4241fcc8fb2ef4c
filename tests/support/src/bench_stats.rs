//! Statistics of measured durations, as the benchmarks report them.

use std::time::Duration;

/// The `p` quantile (0 ≤ p ≤ 1) of `sorted` (ascending), nearest rank; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The median of `d` (the upper one of an even count); zero when empty.
pub fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    percentile(&d, 0.5)
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_upper_middle_and_percentiles_pick_ranks() {
        let s = Duration::from_secs;
        for n in 1..=9u64 {
            let v: Vec<Duration> = (0..n).rev().map(s).collect();
            assert_eq!(median(v), s(n / 2), "n={n}");
        }
        let sorted: Vec<Duration> = (0..100).map(s).collect();
        assert_eq!(percentile(&sorted, 0.99), s(98));
        assert_eq!(percentile(&sorted, 1.0), s(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
