//! Reporting: per-tenant GPU usage from the sampler to the collector, durably.
//!
//! [`Reporting`] owns the pipeline of a running daemon: the [`spool`] on disk (always), the
//! [`writer`] task that appends the sampler's windows to it, and the [`upload`]er that sends
//! them to the collector (when `reporting.collector_url` is set) over the HTTPS [`client`],
//! keeping the batches it refuses for good in [`rejected`]. It also answers for them in
//! `kycctl status`, `/metrics` and the audit log.

pub mod client;
pub mod rejected;
pub mod spool;
pub mod upload;
pub mod writer;

use crate::audit::AuditEvent;
use kycd_net::prometheus::{Exposition, Kind};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::clock::{Clock, SystemClock};
use kycd_protocol::PrivateJwk;
use tokio_util::sync::CancellationToken;
use tracing::info;

use client::build_client;
use rejected::count_rejected_files;
use spool::{SharedSpool, SpoolError};
use upload::{reports_url, UploadCounters, UploadError, UploaderOptions, FAILURE_KINDS};

/// Why reporting could not be set up at startup.
#[derive(Debug, thiserror::Error)]
pub enum ReportingError {
    /// The host key is unusable.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The spool cannot be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The uploader cannot be set up.
    #[error(transparent)]
    Upload(#[from] UploadError),
}

/// The reporting pipeline of a running daemon: the spool (always), the writer task fed by
/// the GPU sampler, and the uploader (when `reporting.collector_url` is set).
#[derive(Debug)]
pub struct Reporting {
    /// The spool.
    pub spool: SharedSpool,
    /// Notified after each commit.
    pub committed: Arc<tokio::sync::Notify>,
    /// Spool writer counters.
    pub writer_counters: Arc<writer::WriterCounters>,
    /// Uploader counters.
    pub upload_counters: Arc<UploadCounters>,
    group_commit: Duration,
    key: Arc<PrivateJwk>,
    /// What the uploader stamps batches, successes and rejections with.
    clock: Arc<dyn Clock>,
    uploader: Option<(UploaderOptions, reqwest::Client)>,
}

impl Reporting {
    /// Loads or creates the host key (`<state_dir>/host.key`), opens the spool
    /// (`<state_dir>/spool`) and builds the HTTP client. Blocking.
    pub fn open(config: &crate::config::Config, host_id: &str) -> Result<Self, ReportingError> {
        let key =
            crate::host::load_or_create_host_key(&crate::host::host_key_path(&config.state_dir), host_id)?;
        let r = &config.reporting;
        let spool = spool::Spool::open(
            &config.state_dir.join("spool"),
            spool::SpoolOptions { segment_max_bytes: r.segment_max_bytes, max_bytes: r.spool_max_bytes },
        )?;
        let uploader = match UploaderOptions::from_config(config, host_id) {
            Some(options) => {
                reports_url(&options.collector_url)?;
                let client = build_client(&options)?;
                Some((options, client))
            }
            None => {
                info!("reporting.collector_url is not set: usage windows are spooled, not uploaded");
                None
            }
        };
        let upload_counters = Arc::new(UploadCounters::default());
        upload_counters
            .rejected_files
            .store(count_rejected_files(&config.state_dir.join("rejected")), Relaxed);
        Ok(Reporting {
            spool: Arc::new(std::sync::Mutex::new(spool)),
            committed: Arc::new(tokio::sync::Notify::new()),
            writer_counters: Arc::default(),
            upload_counters,
            group_commit: Duration::from_millis(r.group_commit_ms),
            key: Arc::new(key),
            clock: Arc::new(SystemClock),
            uploader,
        })
    }

    /// The host key (it also signs the collector API's host statements).
    pub fn host_key(&self) -> Arc<PrivateJwk> {
        Arc::clone(&self.key)
    }

    /// The spool depth, the last successful upload, spool damage and rejected batches (for
    /// `kycctl status`).
    pub fn status(&self) -> crate::net::operator_api::ReportingStatus {
        let (pending, bytes, stats) = self
            .spool
            .lock()
            .map(|s| (s.pending(), s.used_bytes(), s.stats()))
            .unwrap_or((0, 0, spool::SpoolStats::default()));
        let c = &self.upload_counters;
        let last = c.last_success_at.load(Relaxed);
        let last_rejection = c.last_rejection.lock().ok().and_then(|r| r.clone());
        crate::net::operator_api::ReportingStatus {
            spool_pending_records: pending,
            spool_bytes: bytes,
            uploading: self.uploader.is_some(),
            last_upload_at: (last > 0).then_some(last),
            spool_damage: crate::net::operator_api::SpoolDamageStatus {
                regions: stats.damaged_regions,
                bytes: stats.damaged_bytes,
                torn_tails: stats.torn_tails,
                torn_tail_bytes: stats.truncated_bytes,
                quarantine_failures: stats.quarantine_failures,
                last_at: (stats.last_damage_at > 0).then_some(stats.last_damage_at),
            },
            rejected: crate::net::operator_api::RejectedStatus {
                batches: c.batches_rejected.load(Relaxed),
                records: c.records_rejected.load(Relaxed),
                kept: c.rejected_files.load(Relaxed),
                last: last_rejection.map(|r| crate::net::operator_api::LastRejection {
                    at: r.at,
                    status: r.status,
                    kind: r.kind,
                }),
            },
        }
    }

    /// Audit events for what reporting found since the last call: `spool_damaged` (one per
    /// damaged region or torn tail quarantined) and `report_batch_rejected` (one per batch
    /// the collector refused for good). Never blocks: a spool busy with an fsync is asked
    /// again on the next call.
    pub fn take_audit_events(&self) -> Vec<AuditEvent> {
        let mut events = Vec::new();
        if let Ok(mut spool) = self.spool.try_lock() {
            for d in spool.take_damage() {
                events.push(AuditEvent::SpoolDamaged {
                    kind: d.kind.as_str().into(),
                    segment: d.segment,
                    offset: d.offset,
                    bytes: d.len,
                    seq_before: d.seq_before,
                    seq_after: d.seq_after,
                    quarantined: d.quarantined,
                    found_at: d.found_at,
                });
            }
        }
        if let Ok(mut queue) = self.upload_counters.unrecorded_rejections.lock() {
            for r in queue.drain(..) {
                events.push(AuditEvent::ReportBatchRejected {
                    status: r.status,
                    kind: r.kind,
                    error: r.error,
                    first_seq: r.first_seq,
                    last_seq: r.last_seq,
                    records: r.records,
                    file: r.file,
                    rejected_at: r.at,
                });
            }
        }
        events
    }

    /// The spool's and the uploader's metrics in the Prometheus text format (for `/metrics`).
    pub fn metrics_text(&self) -> String {
        let mut out = Exposition::new();
        let (pending, bytes, stats) = match self.spool.lock() {
            Ok(s) => (s.pending(), s.used_bytes(), s.stats()),
            Err(_) => (0, 0, spool::SpoolStats::default()),
        };
        out.single(
            "kycd_spool_pending_records",
            Kind::Gauge,
            "Usage records spooled and not yet acknowledged by the collector.",
            pending,
        );
        out.single("kycd_spool_bytes", Kind::Gauge, "Bytes of spool segments on disk.", bytes);
        out.single(
            "kycd_spool_merges_total",
            Kind::Counter,
            "Merge passes run because the spool neared its cap.",
            stats.merges,
        );
        let mut by_damage = |name: &str, help: &str, corrupt: u64, torn: u64| {
            out.family(name, Kind::Counter, help).sample(name, &[("kind", "corrupt")], corrupt).sample(
                name,
                &[("kind", "torn_tail")],
                torn,
            );
        };
        by_damage(
            "kycd_spool_damage_events_total",
            "Damaged spool regions (corrupt) and torn tails quarantined and cut out of segments since start.",
            stats.damaged_regions,
            stats.torn_tails,
        );
        by_damage(
            "kycd_spool_damaged_bytes_total",
            "Bytes of those regions and tails (copies kept in the spool's quarantine/ directory).",
            stats.damaged_bytes,
            stats.truncated_bytes,
        );
        out.single(
            "kycd_spool_quarantine_failures_total",
            Kind::Counter,
            "Damaged spool bytes that could not be quarantined (left in place and retried).",
            stats.quarantine_failures,
        );
        out.single(
            "kycd_spool_append_errors_total",
            Kind::Counter,
            "Failed spool appends (each retried).",
            self.writer_counters.append_errors.load(Relaxed),
        );
        let c = &self.upload_counters;
        out.single(
            "kycd_upload_batches_total",
            Kind::Counter,
            "Report batches the collector stored.",
            c.batches_ok.load(Relaxed),
        );
        out.single(
            "kycd_upload_records_total",
            Kind::Counter,
            "Usage records in report batches the collector stored.",
            c.records_ok.load(Relaxed),
        );
        out.single(
            "kycd_upload_rejected_batches_total",
            Kind::Counter,
            "Report batches the collector refused for good (400/409/413), kept in rejected/ and not sent again.",
            c.batches_rejected.load(Relaxed),
        );
        out.single(
            "kycd_upload_rejected_records_total",
            Kind::Counter,
            "Seqs covered by those batches.",
            c.records_rejected.load(Relaxed),
        );
        let failures = c.failures.lock().map(|f| f.clone()).unwrap_or_default();
        out.family(
            "kycd_upload_failures_total",
            Kind::Counter,
            "Failed upload attempts (retried) and permanently rejected batches, by kind.",
        );
        for kind in FAILURE_KINDS {
            out.sample(
                "kycd_upload_failures_total",
                &[("kind", kind)],
                failures.get(kind).copied().unwrap_or(0),
            );
        }
        out.single(
            "kycd_upload_last_success_timestamp_seconds",
            Kind::Gauge,
            "When the collector last stored a batch (Unix seconds; 0: never since start).",
            c.last_success_at.load(Relaxed),
        );
        out.finish()
    }

    /// Starts the spool writer for `windows`; `observe` sees each window first (metrics).
    pub fn spawn_writer(
        &self,
        windows: crate::gpu::usage::WindowReceiver,
        observe: impl FnMut(&kycd_protocol::UsageWindow) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(writer::run_writer(
            Arc::clone(&self.spool),
            windows,
            self.group_commit,
            Arc::clone(&self.committed),
            Arc::clone(&self.writer_counters),
            observe,
        ))
    }

    /// Starts the uploader, when a collector is configured.
    pub fn spawn_uploader(&self, shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let (options, client) = self.uploader.clone()?;
        Some(tokio::spawn(upload::run(
            Arc::clone(&self.spool),
            Arc::clone(&self.key),
            options,
            client,
            Arc::clone(&self.committed),
            Arc::clone(&self.upload_counters),
            Arc::clone(&self.clock),
            shutdown,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::rejected::Rejection;
    use super::*;

    /// Spool damage found on open and a rejected batch reach `kycctl status`, `/metrics`
    /// and (once each) the audit events the daemon records.
    #[test]
    fn damage_and_rejections_are_visible_in_status_metrics_and_audit_events() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config { state_dir: dir.path().join("state"), ..Default::default() };
        let spool_dir = config.state_dir.join("spool");
        let mut spool = spool::Spool::open(&spool_dir, spool::SpoolOptions::default()).unwrap();
        for i in 0..3 {
            spool.append(spool::tests::window("t", "cgroup:/w", i * 60)).unwrap();
        }
        let seg = spool.segment_paths().pop().unwrap();
        drop(spool);
        // Flip a byte in record 2's payload.
        let mut bytes = std::fs::read(&seg).unwrap();
        let first_len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        bytes[8 + first_len + 8 + 10] ^= 0x41;
        std::fs::write(&seg, &bytes).unwrap();
        // A batch file left by an earlier run.
        std::fs::create_dir_all(config.state_dir.join("rejected")).unwrap();
        std::fs::write(config.state_dir.join("rejected/100-109.json"), b"{}").unwrap();

        let reporting = Reporting::open(&config, "node-1").unwrap();
        let status = reporting.status();
        assert_eq!(status.spool_damage.regions, 1);
        assert!(status.spool_damage.bytes > 0 && status.spool_damage.last_at.is_some());
        assert_eq!(
            status.rejected,
            crate::net::operator_api::RejectedStatus { kept: 1, ..Default::default() }
        );
        let metrics = reporting.metrics_text();
        for line in [
            "kycd_spool_damage_events_total{kind=\"corrupt\"} 1",
            "kycd_spool_damage_events_total{kind=\"torn_tail\"} 0",
            &format!("kycd_spool_damaged_bytes_total{{kind=\"corrupt\"}} {}", status.spool_damage.bytes),
            "kycd_upload_rejected_batches_total 0",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
        }
        let events: Vec<serde_json::Value> =
            reporting.take_audit_events().iter().map(AuditEvent::to_record).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "spool_damaged");
        assert_eq!(events[0]["kind"], "corrupt");
        assert_eq!((events[0]["seq_before"].as_u64(), events[0]["seq_after"].as_u64()), (Some(1), Some(3)));
        assert!(std::path::Path::new(events[0]["quarantined"].as_str().unwrap()).is_file());
        assert!(reporting.take_audit_events().is_empty(), "each recorded once");

        let (kind, error) =
            Rejection::describe(409, &serde_json::json!({"error": "seq 5 differs", "kind": "SeqConflict"}));
        assert_eq!((kind.as_str(), error.as_deref()), ("SeqConflict", Some("seq 5 differs")));
        assert_eq!(
            Rejection::describe(400, &serde_json::json!("bad")),
            ("http_400".to_owned(), Some("bad".into()))
        );
        reporting.upload_counters.rejected(
            Rejection {
                at: 1_800_000_000,
                status: 409,
                kind,
                error,
                first_seq: 4,
                last_seq: 13,
                records: 10,
                file: config.state_dir.join("rejected/4-13.json"),
            },
            true,
        );
        let status = reporting.status();
        assert_eq!(
            status.rejected,
            crate::net::operator_api::RejectedStatus {
                batches: 1,
                records: 10,
                kept: 2,
                last: Some(crate::net::operator_api::LastRejection {
                    at: 1_800_000_000,
                    status: 409,
                    kind: "SeqConflict".into()
                }),
            }
        );
        let metrics = reporting.metrics_text();
        assert!(metrics.lines().any(|l| l == "kycd_upload_rejected_batches_total 1"), "{metrics}");
        assert!(metrics.lines().any(|l| l == "kycd_upload_rejected_records_total 10"), "{metrics}");
        let events: Vec<serde_json::Value> =
            reporting.take_audit_events().iter().map(AuditEvent::to_record).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "report_batch_rejected");
        assert_eq!(
            (events[0]["status"].as_u64(), events[0]["kind"].as_str()),
            (Some(409), Some("SeqConflict"))
        );
        assert_eq!((events[0]["first_seq"].as_u64(), events[0]["last_seq"].as_u64()), (Some(4), Some(13)));
        // Older agents' status answers (no damage or rejection fields) still parse.
        let old: crate::net::operator_api::ReportingStatus = serde_json::from_value(serde_json::json!({
            "spool_pending_records": 0, "spool_bytes": 0, "uploading": false, "last_upload_at": null
        }))
        .unwrap();
        assert_eq!(old.rejected, crate::net::operator_api::RejectedStatus::default());
    }
}
