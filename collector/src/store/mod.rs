//! The storage boundary of the collector: what ingest, the read API, the poller and the
//! command line need from a database, as object-safe traits ([`ReportStore`] in [`reports`],
//! and the fleet, policy and statement traits of their domain modules) gathered into one
//! [`Storage`] trait object, with two implementations: SQLite ([`sqlite::SqliteStore`], the
//! default) and PostgreSQL for fleets ([`postgres::PgStore`]), chosen by the database URL
//! ([`open_store`]); nothing above this module knows which database it talks to.
//!
//! Both backends are laid out alike: `mod.rs` (connection, open), `schema.rs` (migrations),
//! `reports.rs` ([`ReportStore`]), `fleet.rs` (fleet view and policy), `statements.rs`
//! (agent polling). What they share sits here: [`error`] ([`StoreError`]), [`reports`] (the
//! contract and its values) and [`schema`] (the migration rule and stored-value helpers);
//! those three import nothing from the backends, which import them.
//!
//! Calls are blocking: async callers run them on the blocking pool (`spawn_blocking`), never
//! on the reactor.
//!
//! Enrollment epochs are explained in [`reports`].

pub mod error;
pub mod postgres;
pub mod reports;
pub mod schema;
pub mod sqlite;

pub use error::StoreError;
pub use reports::{Enrollment, HostEntry, Rejection, ReportStore, ValidRecord, REJECTIONS_PER_HOST};

/// Everything the collector stores, as one trait object: reports and hosts ([`ReportStore`]),
/// the fleet view ([`crate::fleet::FleetStore`]) and the published policy
/// ([`crate::policy::PolicyStore`]), the agents' statements
/// ([`crate::statements::StatementStore`]) and the record history and its pruning
/// ([`crate::records::RecordStore`]).
pub trait Storage:
    ReportStore
    + crate::fleet::FleetStore
    + crate::policy::PolicyStore
    + crate::statements::StatementStore
    + crate::records::RecordStore
{
}

impl<
        T: ReportStore
            + crate::fleet::FleetStore
            + crate::policy::PolicyStore
            + crate::statements::StatementStore
            + crate::records::RecordStore
            + ?Sized,
    > Storage for T
{
}

/// Opens the store named by a database URL: `postgres://…` or `postgresql://…` (see
/// [`postgres`]), else SQLite: `sqlite:///abs/path`, `sqlite://rel/path`,
/// `sqlite:path` or a plain path.
pub fn open_store(url: &str) -> Result<std::sync::Arc<dyn Storage>, StoreError> {
    if postgres::is_postgres_url(url) {
        return Ok(std::sync::Arc::new(postgres::PgStore::open(url)?));
    }
    Ok(std::sync::Arc::new(sqlite::SqliteStore::open(sqlite_path(url)?)?))
}

/// The file path of a SQLite database URL (see [`open_store`]).
pub fn sqlite_path(url: &str) -> Result<std::path::PathBuf, StoreError> {
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if url.contains("://") {
        return Err(StoreError::UnsupportedUrl(postgres::redact_url(url)));
    } else {
        url
    };
    if path.is_empty() {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    }
    Ok(path.into())
}

/// What the unit tests of both backends share.
#[cfg(test)]
pub(crate) mod test_support {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A valid record of `seq` (covering `seq..=last_seq` when merged): one 60 s window.
    pub(crate) fn record(seq: u64, last_seq: Option<u64>) -> ValidRecord {
        let record = kycd_protocol::UsageRecord {
            seq,
            last_seq,
            window: kycd_protocol::UsageWindow {
                tenant: Some("t".into()),
                workload: "host:h".into(),
                foreign_person: false,
                foreign_status: None,
                start: 0,
                end: 60,
                gpu_seconds: 60.0,
                gpus: 1,
                max_concurrent_gpus: 1,
                estimated_ops: 1e15,
                ops_lower: None,
                ops_upper: None,
                shared_gpu_seconds: 0.0,
                guest_gap_gpu_seconds: 0.0,
                peak_flops: 1e15,
                method: kycd_protocol::EstimationMethod::GpmTensor,
                training_like: false,
                merged_windows: 1,
            },
        };
        let body_json = serde_json::to_string(&record).unwrap();
        ValidRecord { last_seq: last_seq.unwrap_or(seq), record, body_json }
    }

    /// After migration 6 of a version-5 database holding records of tenant `t` on host `a`
    /// (epoch 1, up to seq 2) whose estimates sum to `old_ops`: the old records count their
    /// estimate as both bounds and shared nothing; a new record adds its own bounds.
    pub(crate) fn check_migrated_to_bounds<S: ReportStore + crate::fleet::FleetStore>(
        store: &S,
        old_ops: f64,
    ) {
        let t = &store.tenant_usage(Some("t"), None).unwrap()[0];
        assert_eq!((t.ops_lower, t.estimated_ops, t.ops_upper), (old_ops, old_ops, old_ops), "{t:?}");
        assert_eq!((t.shared_gpu_seconds, t.shared_gpu_hosts.len()), (0.0, 0));
        let mut new = record(3, None);
        let w = &mut new.record.window;
        (w.ops_lower, w.ops_upper, w.shared_gpu_seconds) = (Some(0.5e15), Some(3e15), 10.0);
        new.body_json = serde_json::to_string(&new.record).unwrap();
        assert_eq!(store.insert_batch("a", 1, &[new], 0).unwrap(), 3);
        let t = &store.tenant_usage(Some("t"), None).unwrap()[0];
        assert_eq!(
            (t.ops_lower, t.estimated_ops, t.ops_upper),
            (old_ops + 0.5e15, old_ops + 1e15, old_ops + 3e15),
            "{t:?}"
        );
        assert_eq!(
            (t.shared_gpu_seconds, t.shared_gpu_hosts.as_slice()),
            (10.0, ["a".to_owned()].as_slice())
        );
    }

    /// After migration 7 of a version-6 database holding two records of tenant `t` on host
    /// `a` (epoch 1, seq 1 and 2, 60 GPU-seconds each): the old records had no guest gap; a
    /// new one keeps its own, with its host and workload.
    pub(crate) fn check_migrated_to_guest_gap<S: ReportStore + crate::fleet::FleetStore>(store: &S) {
        let t = &store.tenant_usage(Some("t"), None).unwrap()[0];
        assert_eq!((t.guest_gap_gpu_seconds, t.guest_gap_hosts.len(), t.windows), (0.0, 0, 2), "{t:?}");
        let mut new = record(3, None);
        let w = &mut new.record.window;
        (w.method, w.guest_gap_gpu_seconds) = (kycd_protocol::EstimationMethod::GuestReported, 15.0);
        new.body_json = serde_json::to_string(&new.record).unwrap();
        assert_eq!(store.insert_batch("a", 1, &[new], 0).unwrap(), 3);
        let t = &store.tenant_usage(Some("t"), None).unwrap()[0];
        assert_eq!(
            (t.guest_gap_gpu_seconds, t.guest_gap_hosts.as_slice(), t.guest_gap_workloads.as_slice()),
            (15.0, ["a".to_owned()].as_slice(), ["a/host:h".to_owned()].as_slice())
        );
    }

    /// Rows of a version-7 database: an open and a resolved threshold finding of tenant `t`,
    /// and `t`'s identity (no detail then).
    pub(crate) const VERSION_7_FINDINGS: &str = r#"
        INSERT INTO findings (kind, subject, tenant, host_id, foreign_person, summary, evidence_json, state,
                              raised_at, resolved_at)
        VALUES ('training_threshold_crossed', 't', 't', NULL, TRUE, 'old open', '{}', 'open', 100, NULL),
               ('early_warning', 't', 't', NULL, TRUE, 'old resolved', '{}', 'resolved', 50, 90);
        INSERT INTO tenant_identities (tenant, legal_name, countries, owner_countries, foreign_person, seen_at)
        VALUES ('t', 'T Ltd', '["DE"]', '[]', TRUE, 100);
    "#;

    /// After migration 8 of a version-7 database holding [`VERSION_7_FINDINGS`]: the old
    /// findings read back with no lifecycle steps and no due date; the open one still blocks a
    /// second raise, and can be filed (recorded in a new audit log whose chain verifies); the
    /// resolved one does not block a new raise; the identity has no detail.
    pub(crate) fn check_migrated_to_lifecycle<S: crate::fleet::FleetStore>(store: &S) {
        use crate::fleet::{FindingAction, FindingKind, FindingQuery, FindingState, NewFinding};
        let all = store.list_findings(&FindingQuery { limit: 10, ..FindingQuery::default() }).unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(
            (all[0].state, all[0].finding.due_at, all[0].filed.as_ref()),
            (FindingState::Open, None, None)
        );
        assert_eq!(all[1].state, FindingState::Resolved);
        let again = |kind| NewFinding {
            kind,
            subject: "t".into(),
            tenant: Some("t".into()),
            host_id: None,
            foreign_person: Some(true),
            summary: "again".into(),
            evidence: serde_json::json!({}),
            due_at: Some(1_000),
        };
        assert_eq!(store.raise_finding(&again(FindingKind::TrainingThresholdCrossed), 200).unwrap(), None);
        let filed = store
            .act_on_finding(all[0].id, &FindingAction::File { reference: "BIS-1".into() }, "alice", 300)
            .unwrap();
        assert_eq!(
            (filed.state, filed.filed.as_ref().map(|f| f.reference.as_str())),
            (FindingState::Filed, Some("BIS-1"))
        );
        // Filed is not resolved: the crossing is still not raised again.
        assert_eq!(store.raise_finding(&again(FindingKind::TrainingThresholdCrossed), 400).unwrap(), None);
        let new = store.raise_finding(&again(FindingKind::EarlyWarning), 400).unwrap();
        assert!(new.is_some());
        let log = store.audit_records(0, 10).unwrap();
        assert_eq!(log.len(), 1);
        assert!(log[0].line.contains(r#""type":"finding_filed""#), "{}", log[0].line);
        assert_eq!(crate::fleet::lifecycle::verify_audit_log(log).unwrap().records, 1);
        let ids = store.tenant_identities().unwrap();
        assert_eq!((ids.len(), ids[0].detail.is_none()), (1, true));
    }

    /// After migration 9 of a version-8 database holding record 1 of host `a` (epoch 1, the
    /// window 0..60): the history tables start empty and work, and the old record is prunable.
    pub(crate) fn check_migrated_to_records<S: ReportStore + crate::records::RecordStore>(store: &S) {
        assert!(store.identity_history(None).unwrap().is_empty());
        assert!(store.statement_history(None).unwrap().is_empty());
        // 1970-02-01: past the window's end and the end of its month (PostgreSQL prunes
        // by whole months).
        let counts = store.prune(2_678_400, true).unwrap();
        assert_eq!((counts.records, counts.refused()), (1, 0), "{counts:?}");
        let identity: kycd_protocol::StatementSubject =
            serde_json::from_value(serde_json::json!({"legal_name": "L", "foreign_person": true})).unwrap();
        let seen = crate::records::IdentityObservation {
            tenant: "t".into(),
            attestation_digest: String::new(),
            identity,
            seen_at: 5,
        };
        store
            .record_identities(&[seen.clone(), crate::records::IdentityObservation { seen_at: 9, ..seen }])
            .unwrap();
        let history = store.identity_history(Some("t")).unwrap();
        assert_eq!(history.iter().map(|r| (r.first_seen, r.last_seen)).collect::<Vec<_>>(), [(5, 9)]);
    }

    /// After migration 11 of a version-10 database holding records 1 and 2..=3 (two windows)
    /// of host `a` (tenant `t`): the roll-ups were computed once on opening and equal the windows, and ingest
    /// keeps them so.
    pub(crate) fn check_migrated_to_rollups<S: ReportStore + crate::fleet::FleetStore>(store: &S) {
        let usage = store.tenant_usage(Some("t"), None).unwrap();
        assert_eq!((usage.len(), usage[0].windows, usage[0].hosts), (1, 2, 1), "{usage:?}");
        let differing: Vec<_> =
            store.rollup_check().unwrap().into_iter().filter(|c| c.differences > 0).collect();
        assert!(differing.is_empty(), "{differing:#?}");
        assert_eq!(store.insert_batch("a", 1, &[record(4, None)], 0).unwrap(), 4);
        assert_eq!(store.tenant_usage(Some("t"), None).unwrap()[0].windows, 3);
        assert!(store.rollup_check().unwrap().iter().all(|c| c.differences == 0));
    }

    /// After migration 5 of a version-4 database holding host `a` (key `a1`, enrolled at 100,
    /// records 1 and 2..=3) and the records of a removed host `b` (record 1): everything is in
    /// epoch 1, and new keys start epoch 2 beside the old records. `new_key` makes a key;
    /// `rows` counts the stored records.
    pub(crate) fn check_migrated_to_epochs(
        store: &dyn ReportStore,
        a1: &kycd_protocol::PublicKey,
        new_key: impl Fn(&str) -> kycd_protocol::PublicKey,
        rows: impl Fn() -> i64,
    ) {
        let a = store.enrollment("a").unwrap().unwrap();
        assert_eq!((a.epoch, a.enrolled_at, a.public_key.to_jwk()), (1, 100, a1.to_jwk()));
        assert!(store.enrollment("b").unwrap().is_none(), "removed before the migration");
        assert_eq!(store.stored_ranges("a", 1).unwrap(), [(1, 1), (2, 3)]);
        assert_eq!(store.stored_ranges("b", 1).unwrap(), [(1, 1)]);
        assert_eq!((store.acked_seq("a", 1).unwrap(), store.acked_seq("b", 1).unwrap()), (3, 1));
        let listed = store.list_hosts().unwrap();
        assert_eq!(
            listed.iter().map(|h| (h.host_id.as_str(), h.epoch, h.acked_seq)).collect::<Vec<_>>(),
            [("a", 1, 3)]
        );
        // b's old records are epoch 1 (its key is not known): a new key is epoch 2, and its
        // seq 1 is a new record, not a conflict with the old one.
        assert_eq!(store.enroll_host("b", &new_key("b"), 300).unwrap(), 2);
        assert_eq!(store.insert_batch("b", 2, &[record(1, None)], 0).unwrap(), 1);
        assert_eq!(store.stored_ranges("b", 1).unwrap(), [(1, 1)]);
        // a: removed and re-enrolled with a new key, epoch 2; the old records stay.
        assert!(store.remove_host("a").unwrap());
        assert_eq!(store.enroll_host("a", &new_key("a"), 400).unwrap(), 2);
        assert_eq!(store.insert_batch("a", 2, &[record(1, None), record(2, None)], 0).unwrap(), 2);
        assert_eq!(store.stored_ranges("a", 1).unwrap(), [(1, 1), (2, 3)]);
        assert_eq!(rows(), 6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(sqlite_path("sqlite:///var/lib/x.db").unwrap(), std::path::Path::new("/var/lib/x.db"));
        assert_eq!(sqlite_path("sqlite://rel.db").unwrap(), std::path::Path::new("rel.db"));
        assert_eq!(sqlite_path("sqlite:rel.db").unwrap(), std::path::Path::new("rel.db"));
        assert_eq!(sqlite_path("/tmp/a.db").unwrap(), std::path::Path::new("/tmp/a.db"));
        assert!(matches!(sqlite_path("postgres://db/kycd"), Err(StoreError::UnsupportedUrl(_))));
        assert!(matches!(sqlite_path("sqlite://"), Err(StoreError::UnsupportedUrl(_))));
    }
}
