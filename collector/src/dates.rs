//! Dates as operators type them (`--since`, `--until`, `--before`) and as exports and
//! filings print them: RFC 3339 UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Why a date does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a date (YYYY-MM-DD, RFC 3339 like 2026-01-31T00:00:00Z, or Unix seconds)")]
pub struct DateError(String);

/// Parses `YYYY-MM-DD` (midnight UTC), an RFC 3339 timestamp, or Unix seconds.
pub fn parse_date(text: &str) -> Result<i64, DateError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| DateError(text.to_owned()));
    }
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_owned() };
    OffsetDateTime::parse(&full, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .map_err(|_| DateError(text.to_owned()))
}

/// Formats Unix seconds as RFC 3339 UTC (the number itself if out of range).
pub fn rfc3339(at: i64) -> String {
    OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| at.to_string())
}
