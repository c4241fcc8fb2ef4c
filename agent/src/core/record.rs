//! Writing the audit log: records are queued as they happen and written together with the
//! decisions they lead to, one fsync for all (see the module docs of [`crate::core`]).

use tracing::{error, warn};

use super::{Agent, AuditEvent};

impl Agent {
    /// Queues a record for the audit log; it is written with the next evaluation's
    /// decisions ([`Agent::settle`]), or by [`Agent::flush_records`].
    pub fn record(&mut self, event: AuditEvent) {
        let now = self.now();
        self.pending.push((now, event));
    }

    /// Writes the queued records now, in one fsync'd batch (record by record when the batch
    /// fails, so one unwritable record does not hold back the rest). A record that cannot
    /// be written is logged loudly and dropped: records other than decisions act on
    /// nothing, and decisions are never dropped (see [`Agent::settle`]).
    pub fn flush_records(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let _ = self.write_records(pending);
    }

    /// Appends `records` in one batch; returns which of them were written.
    pub(super) fn write_records(&mut self, records: Vec<(i64, AuditEvent)>) -> Vec<bool> {
        if records.is_empty() {
            return Vec::new();
        }
        let encoded: Vec<(i64, serde_json::Value)> =
            records.iter().map(|(ts, event)| (*ts, event.to_record())).collect();
        match self.audit.append_batch(encoded.iter().map(|(ts, v)| (*ts, v))) {
            Ok(_) => vec![true; encoded.len()],
            Err(e) => {
                warn!(error = %e, records = encoded.len(), "cannot append the records as one batch; trying one by one");
                encoded
                    .iter()
                    .zip(&records)
                    .map(|((ts, value), (_, event))| match self.audit.append(*ts, value) {
                        Ok(_) => true,
                        Err(e) => {
                            error!(error = %e, record = event.kind(), "cannot write the audit log");
                            false
                        }
                    })
                    .collect()
            }
        }
    }
}
