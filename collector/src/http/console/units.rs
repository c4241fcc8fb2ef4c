//! How the console writes numbers, times and links: GPU-hours to two significant digits,
//! operations and capacity with SI prefixes (the exact figure in a tooltip), UTC times, and
//! path segments percent-encoded. Every function returns text already safe to put in HTML.

use crate::fleet::finite;

/// `value` to two significant digits, without an exponent: `0.04`, `1.2`, `12`, `120`,
/// `1200` (a figure an operator reads at a glance, not a ledger entry).
pub fn two_significant(value: f64) -> String {
    let v = finite(value);
    if v == 0.0 {
        return "0".to_owned();
    }
    let scale = 10f64.powi(v.log10().floor() as i32 - 1);
    let rounded = (v / scale).round() * scale;
    // Rounding may carry into the next decade (9.96 → 10): the digits shown follow the result.
    let decimals = (1 - rounded.log10().floor() as i32).max(0);
    // usize::try_from cannot fail for a non-negative i32 this small.
    format!("{rounded:.prec$}", prec = usize::try_from(decimals).unwrap_or(0))
}

/// GPU-seconds as GPU-hours, two significant digits.
pub fn gpu_hours(gpu_seconds: f64) -> String {
    two_significant(finite(gpu_seconds) / 3600.0)
}

const PREFIXES: [(f64, &str); 10] = [
    (1e30, "Q"),
    (1e27, "R"),
    (1e24, "Y"),
    (1e21, "Z"),
    (1e18, "E"),
    (1e15, "P"),
    (1e12, "T"),
    (1e9, "G"),
    (1e6, "M"),
    (1e3, "k"),
];

/// `value` with an SI prefix and `unit`, two significant digits: `150 PFLOP`, `1.0 YFLOP`.
pub fn si(value: f64, unit: &str) -> String {
    let v = finite(value);
    for (scale, prefix) in PREFIXES {
        if v >= scale * 0.9995 {
            return format!("{} {prefix}{unit}", two_significant(v / scale));
        }
    }
    format!("{} {unit}", two_significant(v))
}

/// Floating-point operations in SI, with the exact figure as a tooltip.
pub fn flop(value: f64) -> String {
    format!("<span title=\"{:.4e} FLOP\">{}</span>", finite(value), si(value, "FLOP"))
}

/// Capacity (operations per second) in SI, with the exact figure as a tooltip.
pub fn flops(value: f64) -> String {
    format!("<span title=\"{:.4e} FLOP/s\">{}</span>", finite(value), si(value, "FLOP/s"))
}

/// A Unix time as `YYYY-MM-DD HH:MM:SSZ` (UTC), or `never`.
pub fn time(at: Option<i64>) -> String {
    at.map_or_else(|| "never".to_owned(), |t| crate::dates::rfc3339(t).replace('T', " "))
}

/// A path segment, percent-encoded (tenant and host ids are not the provider's text).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_hours_keep_two_significant_digits() {
        // The overview used to print 144 GPU-seconds as "GPU-hours 0.0".
        assert_eq!(gpu_hours(144.0), "0.040");
        assert_eq!(two_significant(0.04), "0.040");
        assert_eq!(two_significant(1.234), "1.2");
        assert_eq!(two_significant(12.34), "12");
        assert_eq!(two_significant(1234.0), "1200");
        assert_eq!(two_significant(0.0), "0");
        assert_eq!(two_significant(f64::NAN), "0");
        assert_eq!(two_significant(9.96), "10");
    }

    #[test]
    fn operations_read_in_si() {
        assert_eq!(si(1.5e17, "FLOP"), "150 PFLOP");
        assert_eq!(si(1e26, "FLOP"), "100 YFLOP");
        assert_eq!(si(1e24, "FLOP"), "1.0 YFLOP");
        assert_eq!(si(7.9e15, "FLOP/s"), "7.9 PFLOP/s");
        assert_eq!(si(2.5e31, "FLOP"), "25 QFLOP");
        assert_eq!(si(12.0, "FLOP"), "12 FLOP");
        assert_eq!(si(999.9, "FLOP"), "1.0 kFLOP");
        assert!(flop(1.5e17).contains("title=\"1.5000e17 FLOP\""));
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00Z");
    }
}
