//! What `POST /v1/reports` answered since start, for the collector's `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use kycd_net::prometheus::{Exposition, Kind};

/// Report uploads answered since start.
#[derive(Debug, Default)]
pub struct IngestCounters {
    stored: AtomicU64,
    records: AtomicU64,
    /// By error kind (`BadSignature`, `SeqConflict`, `Unavailable`, …).
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl IngestCounters {
    /// A batch stored (or found already stored) with `records` records.
    pub fn stored(&self, records: usize) {
        self.stored.fetch_add(1, Relaxed);
        self.records.fetch_add(u64::try_from(records).unwrap_or(u64::MAX), Relaxed);
    }

    /// A batch refused with the ingest error kind `kind`.
    pub fn refused(&self, kind: &'static str) {
        let mut refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *refused.entry(kind).or_default() += 1;
    }

    /// The counters in the Prometheus text format.
    pub fn write(&self, out: &mut Exposition) {
        out.single(
            "kycd_collector_reports_stored_total",
            Kind::Counter,
            "Report batches stored (or already stored: a retried upload).",
            self.stored.load(Relaxed),
        );
        out.single(
            "kycd_collector_report_records_total",
            Kind::Counter,
            "Usage records in the report batches stored.",
            self.records.load(Relaxed),
        );
        let name = "kycd_collector_reports_refused_total";
        out.family(name, Kind::Counter, "Report batches not stored, by error kind (4xx: refused for good, Unavailable/ClockAhead: retried).");
        let refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, n) in refused.iter() {
            out.sample(name, &[("kind", kind)], n);
        }
    }
}
