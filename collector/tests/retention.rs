//! Retention of the regulatory record on each backend (issue 19): the identity history is
//! append-only beside the current view, every distinct verified statement is kept (identical
//! ones only advance `last_seen`), `records prune` deletes nothing inside the retention
//! minimum (the configured one or the policy's, whichever is larger) nor anything tied to a
//! finding not yet filed, and a backup restores into a fresh database with the same totals,
//! findings and history.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use kycd_collector::findings::{evaluate, EvaluationSettings, HostView};
use kycd_collector::fleet::{FindingAction, FindingKind, FindingQuery, NewFinding};
use kycd_collector::records::{prune, PruneCounts, RetentionError, DEFAULT_RETENTION_MIN_S};
use kycd_collector::{PollOutcome, Storage};
use kycd_protocol::HostStatementClaims;
use serde_json::json;

backend_tests!(
    the_identity_history_keeps_every_identity_and_the_current_view_the_newest,
    every_distinct_statement_is_kept_and_repeats_only_advance_last_seen,
    prune_refuses_inside_retention_and_keeps_rows_tied_to_unfiled_findings,
    a_policy_can_raise_the_retention_minimum,
    the_records_commands_list_history_and_prune_exits_non_zero_inside_retention,
    a_backup_restores_into_a_fresh_database_with_the_same_totals_findings_and_history,
);

const SETTINGS: EvaluationSettings =
    EvaluationSettings { dark_after_s: 180, policy_grace_s: 0, rejected_window_s: 3600 };

/// A cut-off after every window [`store_windows`] stores (they start at `base()`), and
/// after the end of their month on PostgreSQL ([`cutoff_after`]).
fn after_windows(db: &TestDb) -> i64 {
    cutoff_after(db, base() + 86_400)
}

fn statement(host: &str, iat: i64, nonce: &str, workloads: serde_json::Value) -> HostStatementClaims {
    serde_json::from_value(json!({
        "iss": host, "iat": iat, "exp": iat + 60, "nonce": nonce, "agent_version": "0.1.0",
        "policy_version": 1, "workloads": workloads, "gpus": []
    }))
    .unwrap()
}

fn workload(tenant: &str, digest: &str, legal_name: &str, countries: &[&str]) -> serde_json::Value {
    json!({"workload": format!("libvirt_domain:{tenant}"), "tenant": tenant, "attestation_digest": digest,
           "verdict": "allow",
           "subject": {"legal_name": legal_name, "countries": countries,
                       "beneficial_owner_countries": [], "foreign_person": true}})
}

/// A host that answered at its statement's time (so no rule finds it dark).
fn view(host: &str, statement: HostStatementClaims) -> HostView {
    HostView {
        host_id: host.into(),
        enrolled_at: 0,
        last_report_at: Some(statement.iat),
        last_poll_ok_at: Some(statement.iat),
        statement: Some(statement),
        rejected: None,
    }
}

fn tenant_window(tenant: Option<&str>, minute: i64) -> kycd_protocol::UsageWindow {
    let mut w = window(base() + 60 * minute);
    w.tenant = tenant.map(Into::into);
    w.workload = format!("libvirt_domain:{}", tenant.unwrap_or("anonymous"));
    w
}

fn finding(kind: FindingKind, subject: &str, tenant: Option<&str>, host: Option<&str>) -> NewFinding {
    NewFinding {
        kind,
        subject: subject.into(),
        tenant: tenant.map(Into::into),
        host_id: host.map(Into::into),
        foreign_person: Some(true),
        summary: "test".into(),
        evidence: json!({}),
        due_at: None,
    }
}

/// The tenants with windows stored (the roll-ups keep the usage of pruned windows).
fn tenants(store: &dyn Storage) -> Vec<String> {
    let windows = store.fleet_usage_from_windows(kycd_collector::fleet::Period::default()).unwrap();
    windows.tenants.into_iter().map(|t| t.tenant).collect()
}

async fn the_identity_history_keeps_every_identity_and_the_current_view_the_newest(db: TestDb) {
    off_runtime(|| {
        let store = kycd_collector::open_store(&db.url).unwrap();
        let digest_1 = "a1".repeat(32);
        let digest_2 = "b2".repeat(32);
        let evaluate_at = |iat: i64, digest: &str, name: &str| {
            let s = statement("h1", iat, "nonce-0001", json!([workload("t1", digest, name, &["DE"])]));
            evaluate(store.as_ref(), &[view("h1", s)], SETTINGS, iat).unwrap();
        };
        evaluate_at(1_000, &digest_1, "Old Name GmbH");
        evaluate_at(2_000, &digest_2, "New Name GmbH");
        // The first identity seen again later (a host still on the old attestation): its
        // last_seen advances, nothing is added, its first_seen stays.
        evaluate_at(3_000, &digest_1, "Old Name GmbH");
        evaluate_at(2_500, &digest_1, "Old Name GmbH"); // older: never moves last_seen back

        let current = store.tenant_identities().unwrap();
        assert_eq!(current.len(), 1);
        assert_eq!((current[0].legal_name.as_str(), current[0].seen_at), ("Old Name GmbH", 3_000));

        let history = store.identity_history(Some("t1")).unwrap();
        let rows: Vec<_> = history
            .iter()
            .map(|r| {
                (
                    r.attestation_digest.as_str(),
                    r.identity["legal_name"].as_str().unwrap(),
                    r.first_seen,
                    r.last_seen,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (digest_1.as_str(), "Old Name GmbH", 1_000, 3_000),
                (digest_2.as_str(), "New Name GmbH", 2_000, 2_000)
            ]
        );
        assert_eq!(history[0].identity["countries"], json!(["DE"]));
        assert_eq!(history[0].identity["foreign_person"], json!(true));
        assert!(store.identity_history(Some("other")).unwrap().is_empty());
        assert_eq!(store.identity_history(None).unwrap().len(), 2);
    });
}

async fn every_distinct_statement_is_kept_and_repeats_only_advance_last_seen(db: TestDb) {
    off_runtime(|| {
        let store = kycd_collector::open_store(&db.url).unwrap();
        let key = host_key("h1");
        store.enroll_host("h1", &key.public_key(), 0).unwrap();
        let poll = |at: i64, nonce: &str, tenant: &str| {
            let claims =
                statement("h1", at, nonce, json!([workload(tenant, &"c3".repeat(32), "X Ltd", &["FR"])]));
            let outcome = PollOutcome::Ok { claims: Box::new(claims), token: format!("token-{at}") };
            store.record_poll("h1", at, &outcome).unwrap();
        };
        poll(100, "nonce-0001", "t1");
        poll(160, "nonce-0002", "t1"); // same answer, new iat/exp/nonce
        poll(220, "nonce-0003", "t2"); // a new workload: new content
        poll(280, "nonce-0004", "t1"); // back to the first answer
        let failed = PollOutcome::Failed { kind: "timeout".into(), detail: "slow".into() };
        store.record_poll("h1", 340, &failed).unwrap();

        let history = store.statement_history(Some("h1")).unwrap();
        let rows: Vec<_> = history.iter().map(|r| (r.first_seen, r.last_seen, r.token.as_str())).collect();
        assert_eq!(rows, [(100, 280, "token-100"), (220, 220, "token-220")]);
        assert_ne!(history[0].content_digest, history[1].content_digest);
        // The latest view still holds only the newest statement.
        assert_eq!(store.latest_token("h1").unwrap().as_deref(), Some("token-280"));
        assert!(store.statement_history(Some("h2")).unwrap().is_empty());
    });
}

/// Two tenants' usage on two hosts, usage without a tenant on a third, identity and statement
/// history for both tenants; all of it older than [`after_windows`].
fn populate(store: &Arc<dyn Storage>) {
    store_windows(
        store.as_ref(),
        "h1",
        vec![tenant_window(Some("t-open"), 0), tenant_window(Some("t-open"), 1)],
    );
    store_windows(store.as_ref(), "h2", vec![tenant_window(Some("t-done"), 2)]);
    store_windows(store.as_ref(), "h3", vec![tenant_window(None, 3)]);
    let views = [
        view(
            "h1",
            statement(
                "h1",
                base(),
                "nonce-0001",
                json!([workload("t-open", &"d1".repeat(32), "Open Ltd", &["CN"])]),
            ),
        ),
        view(
            "h2",
            statement(
                "h2",
                base(),
                "nonce-0002",
                json!([workload("t-done", &"d2".repeat(32), "Done Ltd", &["RU"])]),
            ),
        ),
    ];
    evaluate(store.as_ref(), &views, SETTINGS, base()).unwrap();
    for (host, v) in [("h1", &views[0]), ("h2", &views[1])] {
        let key = host_key(host);
        store.enroll_host(host, &key.public_key(), 0).unwrap();
        let outcome =
            PollOutcome::Ok { claims: Box::new(v.statement.clone().unwrap()), token: format!("tok-{host}") };
        store.record_poll(host, base(), &outcome).unwrap();
    }
}

async fn prune_refuses_inside_retention_and_keeps_rows_tied_to_unfiled_findings(db: TestDb) {
    off_runtime(|| {
        let store = kycd_collector::open_store(&db.url).unwrap();
        populate(&store);
        // evaluate() raised nothing (no policy); the findings below tie rows by tenant and
        // by host/workload.
        let open = store
            .raise_finding(&finding(FindingKind::EarlyWarning, "t-open", Some("t-open"), None), 1)
            .unwrap()
            .unwrap();
        let subject = "h3/libvirt_domain:anonymous";
        let unattributed = store
            .raise_finding(&finding(FindingKind::UnattributedTrainingScale, subject, None, Some("h3")), 1)
            .unwrap()
            .unwrap();
        let done = store
            .raise_finding(&finding(FindingKind::EarlyWarning, "t-done", Some("t-done"), None), 1)
            .unwrap()
            .unwrap();
        assert!(store.resolve_finding(done, 2).unwrap());
        let before = after_windows(&db);
        // SQLite keeps each tied row (2 of t-open, 1 of h3) and deletes t-done's; PostgreSQL
        // drops whole months, and the one month of windows holds tied rows: all 4 are kept.
        let pg = db.is_postgres();
        let (deleted, refused) = if pg { (0, 4) } else { (1, 3) };

        // A cut-off one second inside the retention period: refused as a whole, with counts.
        let inside = prune(
            store.as_ref(),
            before,
            before + i64::try_from(DEFAULT_RETENTION_MIN_S).unwrap() - 1,
            DEFAULT_RETENTION_MIN_S,
            false,
        );
        match inside {
            Err(RetentionError::InsideRetention { min_s, counts, .. }) => {
                assert_eq!(min_s, DEFAULT_RETENTION_MIN_S);
                assert_eq!((counts.records, counts.refused_records), (deleted, refused), "{counts:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(tenants(store.as_ref()), ["t-done", "t-open"], "nothing deleted");

        let now = before + i64::try_from(DEFAULT_RETENTION_MIN_S).unwrap();
        let dry = prune(store.as_ref(), before, now, DEFAULT_RETENTION_MIN_S, true).unwrap();
        let expected = PruneCounts {
            records: deleted,
            identities: 1,
            statements: 1,
            refused_records: refused,
            refused_identities: 1,
            refused_statements: 1,
        };
        assert_eq!(dry, expected);
        assert_eq!(tenants(store.as_ref()), ["t-done", "t-open"], "a dry run deletes nothing");

        // Acknowledged is not filed, so it still ties.
        store.act_on_finding(open, &FindingAction::Acknowledge, "alice", now).unwrap();
        assert_eq!(prune(store.as_ref(), before, now, DEFAULT_RETENTION_MIN_S, false).unwrap(), expected);
        let left: &[&str] = if pg { &["t-done", "t-open"] } else { &["t-open"] };
        assert_eq!(tenants(store.as_ref()), left);
        let windows = |store: &dyn Storage| store.fleet_usage_from_windows(Default::default()).unwrap();
        assert_eq!(windows(store.as_ref()).unattributed.len(), 1, "tied by host/workload");
        let identities: Vec<String> =
            store.identity_history(None).unwrap().into_iter().map(|r| r.tenant).collect();
        assert_eq!(identities, ["t-open"]);
        let statements: Vec<String> =
            store.statement_history(None).unwrap().into_iter().map(|r| r.host_id).collect();
        assert_eq!(statements, ["h1"]);

        // Filed and dismissed release what they tied; a second prune finds the rest.
        store.act_on_finding(open, &FindingAction::File { reference: "BIS-1".into() }, "alice", now).unwrap();
        store
            .act_on_finding(
                unattributed,
                &FindingAction::Dismiss { reason: "test load".into() },
                "alice",
                now,
            )
            .unwrap();
        let rest = prune(store.as_ref(), before, now, DEFAULT_RETENTION_MIN_S, false).unwrap();
        assert_eq!(
            (rest.records, rest.identities, rest.statements, rest.refused()),
            (4 - deleted, 1, 1, 0),
            "{rest:?}"
        );
        assert!(tenants(store.as_ref()).is_empty());
        assert!(windows(store.as_ref()).unattributed.is_empty());
        // The roll-ups keep what the windows measured: both tenants' totals and the usage
        // without a tenant stay, and the check compares what it still can.
        let kept = store.fleet_usage(None).unwrap();
        assert_eq!((kept.tenants.len(), kept.unattributed.len()), (2, 1));
        assert!(store.rollup_check().unwrap().iter().all(|c| c.differences == 0));
        // The findings themselves and the current views are never pruned.
        let findings = store.list_findings(&FindingQuery { limit: 10, ..FindingQuery::default() }).unwrap();
        assert_eq!(findings.len(), 3);
        assert_eq!(store.tenant_identities().unwrap().len(), 2);
        assert_eq!(store.latest_statements().unwrap().len(), 2);
    });
}

async fn a_policy_can_raise_the_retention_minimum(db: TestDb) {
    off_runtime(|| {
        let store = kycd_collector::open_store(&db.url).unwrap();
        populate(&store);
        let before = after_windows(&db);
        let ten_years = 2 * DEFAULT_RETENTION_MIN_S;
        let claims: kycd_protocol::PolicyClaims = serde_json::from_value(json!({
            "iss": "authority", "iat": 0, "exp": 10, "version": 1, "measures": [],
            "unverified": {"action": "deny"}, "retention": {"min_s": ten_years},
            "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                           "early_warning_fraction": 0.01}
        }))
        .unwrap();
        store
            .publish_policy(&kycd_collector::policy::PublishedPolicy {
                version: 1,
                token: "t".into(),
                published_at: 0,
                claims,
            })
            .unwrap();
        // Six years on: outside the collector's 5, inside the policy's 10.
        let now = before + i64::try_from(DEFAULT_RETENTION_MIN_S).unwrap() + 365 * 86_400;
        match prune(store.as_ref(), before, now, DEFAULT_RETENTION_MIN_S, false) {
            Err(e @ RetentionError::InsideRetention { .. }) => {
                let RetentionError::InsideRetention { min_s, .. } = &e else { unreachable!() };
                assert_eq!(*min_s, ten_years);
                assert!(e.to_string().contains("policy"), "{e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(tenants(store.as_ref()).len(), 2);
        // A configured minimum above the policy's wins too.
        let now = before + i64::try_from(ten_years).unwrap();
        assert!(prune(store.as_ref(), before, now, ten_years + 1, false).is_err());
        assert_eq!(prune(store.as_ref(), before, now, DEFAULT_RETENTION_MIN_S, false).unwrap().records, 4);
    });
}

fn collector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kycd-collector")).args(args).output().unwrap()
}

async fn the_records_commands_list_history_and_prune_exits_non_zero_inside_retention(db: TestDb) {
    off_runtime(|| {
        let store = kycd_collector::open_store(&db.url).unwrap();
        populate(&store);
        let out = collector(&["records", "identities", "--tenant", "t-open", "--json", "--db", &db.url]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1);
        assert_eq!(
            (lines[0]["identity"]["legal_name"].as_str(), lines[0]["first_seen"].as_i64()),
            (Some("Open Ltd"), Some(base()))
        );
        let out = collector(&["records", "statements", "--db", &db.url]);
        assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);

        let before = after_windows(&db).to_string();
        let inside = (after_windows(&db) + 86_400).to_string();
        let out = collector(&["records", "prune", "--before", &before, "--now", &inside, "--db", &db.url]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("inside the retention period of 157680000 s"), "{stderr}");
        assert!(stderr.contains("8 rows would have been deleted"), "{stderr}");
        assert_eq!(tenants(store.as_ref()).len(), 2, "nothing deleted");
        // A shorter configured minimum (flag) lets it through; no unfiled finding ties anything.
        let out = collector(&[
            "records",
            "prune",
            "--before",
            &before,
            "--now",
            &inside,
            "--retention-min-s",
            "86400",
            "--db",
            &db.url,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with("deleted: records 4, identities 2, statements 2;"), "{stdout}");
        assert!(tenants(store.as_ref()).is_empty());
    });
}

async fn a_backup_restores_into_a_fresh_database_with_the_same_totals_findings_and_history(db: TestDb) {
    let target = if db.is_postgres() {
        match TestDb::postgres("backup_target") {
            Some(target) => target,
            None => return,
        }
    } else {
        TestDb::sqlite()
    };
    off_runtime(|| {
        let store = kycd_collector::open_store(&db.url).unwrap();
        populate(&store);
        store.raise_finding(&finding(FindingKind::EarlyWarning, "t-open", Some("t-open"), None), 7).unwrap();
        let file = db.dir().join("backup.kycd");
        kycd_collector::cli::backup::backup(&db.url, &file).unwrap();
        assert!(file.metadata().unwrap().len() > 0);
        assert!(kycd_collector::cli::backup::backup(&db.url, &file).is_err(), "never overwrites a backup");

        // Into a fresh database (opened once by a collector, as after a reinstall).
        let restored = kycd_collector::open_store(&target.url).unwrap();
        kycd_collector::cli::backup::restore(&target.url, &file, false).unwrap();
        let restored_now = kycd_collector::open_store(&target.url).unwrap();
        drop(restored);
        let all = FindingQuery { limit: 100, ..FindingQuery::default() };
        assert_eq!(restored_now.tenant_usage(None, None).unwrap(), store.tenant_usage(None, None).unwrap());
        assert_eq!(restored_now.fleet_usage(None).unwrap().unattributed.len(), 1);
        assert_eq!(restored_now.list_findings(&all).unwrap(), store.list_findings(&all).unwrap());
        assert_eq!(restored_now.identity_history(None).unwrap(), store.identity_history(None).unwrap());
        assert_eq!(restored_now.statement_history(None).unwrap(), store.statement_history(None).unwrap());
        assert_eq!(restored_now.list_findings(&all).unwrap().len(), 1);
        // A database that holds data is not restored over unless forced.
        let refused = kycd_collector::cli::backup::restore(&target.url, &file, false);
        assert!(matches!(refused, Err(kycd_collector::cli::backup::BackupError::NotEmpty(_))), "{refused:?}");
        kycd_collector::cli::backup::restore(&target.url, &file, true).unwrap();
        assert_eq!(restored_now.tenant_usage(None, None).unwrap(), store.tenant_usage(None, None).unwrap());
    });
}
