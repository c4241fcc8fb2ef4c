//! How the capacity buckets are stored: one row per (subject, cluster, UTC hour) holding that
//! hour's minute buckets, not one row per minute.
//!
//! A busy tenant fills every minute, so a batch of a drained spool (a thousand windows of a
//! few VMs) touched a thousand minute rows in each of two clusters (`*` and its own) — two
//! thousand upserts against the thousand inserts of the windows themselves, which made the
//! roll-ups most of ingest's cost. Per hour it is a few dozen rows. SQLite reads each,
//! merges it here and writes it back, in this encoding:
//!
//! - a row's `flops` is a sequence of 9-byte entries `[minute of the hour: u8][FLOP/s: f64
//!   little-endian]`, minutes strictly increasing: only the minutes that have a bucket, so a
//!   tenant seen once an hour costs 9 bytes, not 60 slots, and a bucket of 0 FLOP/s (a window
//!   of a GPU without a known peak) stays a bucket, as in the raw aggregation;
//! - PostgreSQL keeps a `float8[60]` per row (NULL: no bucket) and merges in its upsert, one
//!   statement a batch (`store/postgres/rollups/capacity.rs`).

use std::collections::BTreeMap;

use super::apply::Bucket;
use super::Subject;
use crate::fleet::usage::saturating_sum;
use crate::fleet::CAPACITY_BUCKET_S;
use crate::store::error::StoreError;

/// Seconds in one stored row's span.
pub const HOUR_S: i64 = 3_600;
/// Minute buckets in a row.
pub const MINUTES: i64 = HOUR_S / CAPACITY_BUCKET_S;
/// Bytes per stored entry.
const ENTRY: usize = 9;

/// The hour row (its start) a minute bucket lies in.
pub fn hour_of(minute: i64) -> i64 {
    minute.div_euclid(HOUR_S) * HOUR_S
}

/// A stored row's minute buckets: minute start → FLOP/s. Refuses a value that is not a valid
/// encoding (a torn or foreign write), naming the row's hour.
pub fn decode(hour: i64, flops: &[u8]) -> Result<BTreeMap<i64, f64>, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("capacity row of hour {hour}: {why}"));
    if flops.len() % ENTRY != 0 {
        return Err(corrupt("length is not a multiple of 9 bytes"));
    }
    let mut out = BTreeMap::new();
    let mut last = -1i64;
    for entry in flops.chunks_exact(ENTRY) {
        let (minute, value) = entry.split_at(1);
        let minute = i64::from(minute[0]);
        if minute >= MINUTES || minute <= last {
            return Err(corrupt("minutes out of order or past the hour"));
        }
        last = minute;
        let bytes: [u8; 8] = value.try_into().map_err(|_| corrupt("short entry"))?;
        out.insert(hour + minute * CAPACITY_BUCKET_S, f64::from_le_bytes(bytes));
    }
    Ok(out)
}

/// The stored form of one hour's minute buckets (every key within `hour`).
pub fn encode(hour: i64, buckets: &BTreeMap<i64, f64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(buckets.len() * ENTRY);
    for (minute, flops) in buckets {
        // Within the hour by construction: 0..60 fits a byte.
        let index = u8::try_from((minute - hour).div_euclid(CAPACITY_BUCKET_S)).unwrap_or(u8::MAX);
        out.push(index);
        out.extend_from_slice(&flops.to_le_bytes());
    }
    out
}

/// One hour row a batch adds to: its key and the batch's buckets in it.
#[derive(Debug)]
pub struct HourRow<'a> {
    /// The subject.
    pub subject: &'a Subject,
    /// The cluster (`*`, `site/fabric` or `unplaced`).
    pub cluster: &'a str,
    /// Start of the hour.
    pub hour: i64,
    /// (index of the bucket in the batch's list, minute start, FLOP/s to add).
    adds: Vec<(usize, i64, f64)>,
}

impl HourRow<'_> {
    /// The batch's buckets in this row: (index in the batch's list, minute start, FLOP/s).
    pub fn adds(&self) -> &[(usize, i64, f64)] {
        &self.adds
    }

    /// The minute's place in the row (0–59).
    pub fn slot(&self, minute: i64) -> usize {
        usize::try_from((minute - self.hour).div_euclid(CAPACITY_BUCKET_S)).unwrap_or(0)
    }

    /// Adds the batch's buckets to the stored row (`None`: none yet), writes each bucket's
    /// new value at its index in `values`, and returns the row's new encoding.
    pub fn merge(&self, stored: Option<&[u8]>, values: &mut [f64]) -> Result<Vec<u8>, StoreError> {
        let mut buckets = match stored {
            Some(flops) => decode(self.hour, flops)?,
            None => BTreeMap::new(),
        };
        for (index, minute, flops) in &self.adds {
            let value = match buckets.get(minute) {
                Some(old) => saturating_sum(*old, *flops),
                None => saturating_sum(0.0, *flops),
            };
            buckets.insert(*minute, value);
            if let Some(slot) = values.get_mut(*index) {
                *slot = value;
            }
        }
        Ok(encode(self.hour, &buckets))
    }
}

/// The batch's buckets (in key order, as [`super::apply::RollupTx::add_capacity`] gets them)
/// grouped into their hour rows, in key order.
pub fn hour_rows<'a>(buckets: &[Bucket<'a>]) -> Vec<HourRow<'a>> {
    let mut rows: Vec<HourRow<'a>> = Vec::new();
    for (index, (subject, cluster, minute, flops)) in buckets.iter().enumerate() {
        let hour = hour_of(*minute);
        match rows.last_mut() {
            Some(row) if row.subject == *subject && row.cluster == *cluster && row.hour == hour => {
                row.adds.push((index, *minute, *flops));
            }
            _ => rows.push(HourRow { subject, cluster, hour, adds: vec![(index, *minute, *flops)] }),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_refuse_bad_encodings() {
        let hour = 1_800_000_000 / HOUR_S * HOUR_S;
        let buckets: BTreeMap<i64, f64> = [(hour, 0.0), (hour + 60, 1.5e15), (hour + 3_540, f64::MAX)].into();
        let flops = encode(hour, &buckets);
        assert_eq!(flops.len(), 27);
        assert_eq!(decode(hour, &flops).unwrap(), buckets);
        assert!(decode(hour, &flops[..26]).is_err(), "torn");
        let mut swapped = flops[9..18].to_vec();
        swapped.extend_from_slice(&flops[..9]);
        assert!(decode(hour, &swapped).is_err(), "out of order");
        let mut past = flops.clone();
        past[18] = 60;
        assert!(decode(hour, &past).is_err(), "minute 60");
    }

    #[test]
    fn a_batch_adds_to_its_hours_and_reports_each_buckets_new_value() {
        let tenant = Subject { tenant: "t".into(), host_id: String::new(), workload: String::new() };
        let hour = 7_200;
        // Key order: cluster, then minute; two hours of `*`, one of a placed cluster.
        let buckets: Vec<Bucket<'_>> = vec![
            (&tenant, "*", hour + 60, 1.0),
            (&tenant, "*", hour + 120, 2.0),
            (&tenant, "*", hour + HOUR_S, 3.0),
            (&tenant, "a/b", hour + 60, 4.0),
        ];
        let rows = hour_rows(&buckets);
        let keys: Vec<(&str, i64)> = rows.iter().map(|r| (r.cluster, r.hour)).collect();
        assert_eq!(keys, [("*", hour), ("*", hour + HOUR_S), ("a/b", hour)]);
        let stored = encode(hour, &[(hour + 60, 10.0), (hour + 180, 5.0)].into());
        let mut values = vec![f64::NAN; buckets.len()];
        let merged = rows[0].merge(Some(&stored), &mut values).unwrap();
        assert_eq!(
            decode(hour, &merged).unwrap(),
            [(hour + 60, 11.0), (hour + 120, 2.0), (hour + 180, 5.0)].into()
        );
        rows[1].merge(None, &mut values).unwrap();
        rows[2].merge(None, &mut values).unwrap();
        assert_eq!(values, [11.0, 2.0, 3.0, 4.0]);
    }
}
