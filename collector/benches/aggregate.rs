//! Usage aggregation and findings evaluation over a large fleet history, from the raw
//! windows and from the roll-ups (issue 20), against a baseline in the same run: one plain
//! full scan summing two columns of every row (`SELECT COUNT(*), SUM(estimated_ops),
//! SUM(peak_flops) FROM records`), the least any aggregation over every window must read.
//!
//!     cargo bench -p kycd-collector --bench aggregate
//!
//! Timed, best of 3 rounds: the scan; `fleet_usage_from_windows` (the aggregation over every
//! raw window, what evaluation read before the roll-ups); `tenant_usage` (from the roll-ups,
//! every run); one full `evaluate_store` (every run, as a collector's first evaluation); one
//! incremental evaluation (`evaluate_store_incremental`: the runs changed in the last five
//! minutes, as every later evaluation; the tail's segments are marked changed just before).
//! A policy with the default thresholds is published, so the run rules run.
//!
//! Then the same over a history 100 times longer (`KYCD_BENCH_HISTORY_X`, default 100: 1
//! billion windows for 10 million): a copy of the database whose roll-ups are scaled as if
//! the windows before the raw tail had been ingested — totals ×100, first seen moved back,
//! one day row and one busy segment (22 h of work, 2 h pause) per tenant and history day —
//! built directly as roll-up rows (see `support/history.rs`); the raw windows stay the 10
//! million of the tail. Capacity buckets of the history are not synthesized (nothing timed
//! here reads them), and the history's day rows are copies of the tail's first day, so
//! `rollups check` would not pass on that copy.
//!
//! The fleet: 2,000 hosts, 200 tenants (a quarter foreign), minute-aligned 60 s windows, each
//! host serving 5 tenants over consecutive minutes; one window in 50 (in the fifth slot) is
//! of a workload without a tenant (`cgroup:/unverified`, aggregated per host and workload). Rows are bulk-loaded with a raw prepared
//! INSERT (synchronous=OFF for the load only; the load is not what is measured) into a
//! database created by `SqliteStore::open`, so schema and indexes are the collector's.
//! `body_json` is stored as `{}` to keep the file at ~3 GB; aggregation never reads it. The
//! database lives under the target directory (not /tmp, often tmpfs) and is reused across
//! runs with the same window count and loader version (delete `target/tmp/bench-aggregate-*.db`
//! to rebuild).
//!
//! Then the same on PostgreSQL (see `support/aggregate_pg.rs`: `KYCD_BENCH_POSTGRES_URL` or a
//! private cluster; `KYCD_BENCH_POSTGRES=0` skips it). `KYCD_BENCH_SQLITE=0` skips SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_collector::findings::{evaluate_store, evaluate_store_incremental, Covered, EvaluationSettings};
use kycd_collector::fleet::{FleetStore as _, Period};
use kycd_collector::policy::{PolicyStore as _, PublishedPolicy};
use kycd_collector::{ReportStore as _, SqliteStore};
use kycd_protocol::{Algorithm, PrivateJwk};

const HOSTS: u64 = 2_000;
const TENANTS: u64 = 200;
const TENANTS_PER_HOST: u64 = 5;
const ROUNDS: usize = 5;
/// Bumped when the loader writes different rows, so a database of an older one is not reused
/// (2: windows without a tenant, issue 19; 3: roll-ups built after loading, a policy
/// published, issue 20).
const LOADER_VERSION: u32 = 3;
/// One window in this many has no tenant.
const UNATTRIBUTED_EVERY: u64 = 50;

/// The tenant and workload of host `h`'s `i`-th window: `None` and `cgroup:/unverified` for
/// one window in [`UNATTRIBUTED_EVERY`], otherwise the slot's tenant and VM.
fn owner(h: u64, i: u64) -> (Option<String>, String) {
    let slot = i % TENANTS_PER_HOST;
    if i % UNATTRIBUTED_EVERY == UNATTRIBUTED_EVERY - 1 {
        return (None, "cgroup:/unverified".to_owned());
    }
    let tenant = (h * TENANTS_PER_HOST + slot) % TENANTS;
    (Some(format!("t-{tenant:03}")), format!("libvirt_domain:vm-{slot}"))
}

use kycd_test_support::pg;

#[path = "support/aggregate_pg.rs"]
mod aggregate_pg;
#[path = "support/history.rs"]
mod history;

/// Where the loader's windows start (the tail of the history).
const BASE: i64 = 1_790_000_000 / 60 * 60;

/// The policy published with the fleet: REGULATION.md's thresholds (nothing in this fleet
/// crosses them, so the findings stay few whatever the history's length).
fn policy() -> PublishedPolicy {
    let claims = serde_json::from_value(serde_json::json!({
        "iss": "authority", "iat": 1_780_000_000, "exp": 1_900_000_000, "version": 1,
        "measures": [], "unverified": {"action": "allow"},
        "thresholds": {"training_ops": 1e26, "bio_training_ops": 1e23, "cluster_flops": 1e20,
                       "early_warning_fraction": 0.5}
    }))
    .unwrap();
    PublishedPolicy { version: 1, token: "bench".into(), published_at: 1_780_000_000, claims }
}

fn load(path: &std::path::Path, windows: u64) {
    let store = SqliteStore::open(path).unwrap();
    for h in 0..HOSTS {
        let key = PrivateJwk::generate(Algorithm::EdDSA, &format!("host-{h:04}")).unwrap();
        store.enroll_host(key.kid(), &key.public_key(), 0).unwrap();
    }
    drop(store);
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let per_host = windows / HOSTS;
    let base = BASE;
    let started = kycd_protocol::clock::monotonic();
    for h in 0..HOSTS {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    r#"INSERT INTO records (host_id, epoch, seq, last_seq, tenant, workload, start, "end", gpu_seconds,
                           gpus, max_concurrent_gpus, estimated_ops, peak_flops, method, training_like,
                           foreign_person, merged_windows, body_json, received_at,
                           ops_lower, ops_upper, shared_gpu_seconds, guest_gap_gpu_seconds)
                       VALUES (?1, 1, ?2, ?2, ?3, ?4, ?5, ?6, 480.0, 8, 8, ?7, 7.9e15, 'gpm_pipes', 1, ?8, 1, '{}', ?6,
                               ?7 / 2, ?7 * 2, ?9, 0)"#,
                )
                .unwrap();
            let host = format!("host-{h:04}");
            for i in 0..per_host {
                let slot = i % TENANTS_PER_HOST;
                let tenant = (h * TENANTS_PER_HOST + slot) % TENANTS;
                let minute = i64::try_from(i / TENANTS_PER_HOST).unwrap();
                let start = base + 60 * minute;
                let seq = i64::try_from(i + 1).unwrap();
                let ops = 1.0e17 + (i % 97) as f64 * 1.0e15;
                let (owner, workload) = owner(h, i);
                insert
                    .execute(rusqlite::params![
                        host,
                        seq,
                        owner,
                        workload,
                        start,
                        start + 60,
                        ops,
                        tenant % 4 == 0,
                        // One VM slot in five shares its GPUs.
                        if slot == 0 { 480.0 } else { 0.0 }
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        if h % 200 == 199 {
            eprintln!("  loaded {} windows ({:.0}s)", (h + 1) * per_host, started.elapsed().as_secs_f64());
        }
    }
    drop(conn);
    let store = SqliteStore::open(path).unwrap();
    store.publish_policy(&policy()).unwrap();
    let t = kycd_protocol::clock::monotonic();
    let read = store.rollup_rebuild(kycd_protocol::clock::unix_now()).unwrap();
    eprintln!("  roll-ups built from {read} windows in {:.0}s", t.elapsed().as_secs_f64());
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("ANALYZE").unwrap();
}

fn main() {
    let windows: u64 =
        std::env::var("KYCD_BENCH_WINDOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let scale: i64 = std::env::var("KYCD_BENCH_HISTORY_X").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    if std::env::var("KYCD_BENCH_SQLITE").as_deref() == Ok("0") {
        println!("SQLite: skipped (KYCD_BENCH_SQLITE=0)");
    } else {
        sqlite(windows, scale);
    }
    aggregate_pg::run(windows, scale);
}

/// The timings of one database, best of [`ROUNDS`].
#[derive(Debug, Default)]
pub struct Timings {
    scan: Vec<f64>,
    raw: Vec<f64>,
    usage: Vec<f64>,
    full: Vec<f64>,
    incremental: Vec<f64>,
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

impl Timings {
    /// Prints them, with `reference` (the shorter history) for the ratios.
    pub fn print(&self, what: &str, reference: Option<&Timings>) {
        let scan = best(&self.scan);
        println!("{what} (best of {ROUNDS}):");
        let line = |name: &str, v: &[f64], r: Option<&[f64]>| {
            if v.is_empty() {
                return;
            }
            let ratio = r
                .filter(|r| !r.is_empty())
                .map(|r| format!(", {:.2}x the shorter history", best(v) / best(r)));
            println!(
                "  {name:<34} {:>8.3} s  ({:.3}x the scan{})",
                best(v),
                best(v) / scan,
                ratio.unwrap_or_default()
            );
        };
        line("baseline full scan (raw windows)", &self.scan, reference.map(|r| r.scan.as_slice()));
        line("aggregation of every raw window", &self.raw, None);
        line("tenant_usage (roll-ups, all runs)", &self.usage, reference.map(|r| r.usage.as_slice()));
        line("evaluate, first (all runs)", &self.full, reference.map(|r| r.full.as_slice()));
        line("evaluate, incremental", &self.incremental, reference.map(|r| r.incremental.as_slice()));
    }
}

/// Times one round on `store` into `t`; `scan` runs the baseline; `raw`: also the
/// aggregation over the raw windows.
pub fn round<S: kycd_collector::Storage>(store: &S, scan: &mut impl FnMut(), raw: bool, t: &mut Timings) {
    let now = 1_790_000_000 + 100_000;
    let clock = kycd_protocol::clock::monotonic();
    scan();
    t.scan.push(clock.elapsed().as_secs_f64());
    if raw {
        let clock = kycd_protocol::clock::monotonic();
        let fleet = store.fleet_usage_from_windows(Period::default()).unwrap();
        t.raw.push(clock.elapsed().as_secs_f64());
        assert_eq!(fleet.tenants.len(), usize::try_from(TENANTS).unwrap());
    }
    let clock = kycd_protocol::clock::monotonic();
    let tenants = store.tenant_usage(None, None).unwrap();
    t.usage.push(clock.elapsed().as_secs_f64());
    assert_eq!(tenants.len(), usize::try_from(TENANTS).unwrap());
    let clock = kycd_protocol::clock::monotonic();
    let full = evaluate_store(store, EvaluationSettings::default(), now).unwrap();
    t.full.push(clock.elapsed().as_secs_f64());
    let covered = Covered { since: kycd_protocol::clock::unix_now() - 300, policy_version: Some(1) };
    let clock = kycd_protocol::clock::monotonic();
    let incremental =
        evaluate_store_incremental(store, EvaluationSettings::default(), now, Some(covered)).unwrap();
    t.incremental.push(clock.elapsed().as_secs_f64());
    assert_eq!(incremental.open, full.open);
    let last = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    eprintln!(
        "  scan {:.2}s, raw {:.2}s, tenant_usage {:.3}s, evaluate {:.3}s, incremental {:.3}s (open findings {})",
        last(&t.scan),
        if raw { last(&t.raw) } else { 0.0 },
        last(&t.usage),
        last(&t.full),
        last(&t.incremental),
        full.open
    );
}

fn sqlite(windows: u64, scale: i64) {
    // Kept between runs (loading takes minutes), in cargo's scratch directory for benches.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-aggregate-{windows}-v{LOADER_VERSION}.db"));
    if !path.exists() {
        eprintln!("building {} ({windows} windows)…", path.display());
        let partial = path.with_extension("partial");
        let _ = std::fs::remove_file(&partial);
        load(&partial, windows);
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", partial.display()));
        }
        std::fs::rename(&partial, &path).unwrap();
    }
    let tail_s = i64::try_from(windows / HOSTS / TENANTS_PER_HOST).unwrap() * 60;
    let long = path.with_extension(format!("x{scale}.db"));
    if !long.exists() {
        eprintln!("building {} (history ×{scale})…", long.display());
        std::fs::copy(&path, &long).unwrap();
        let conn = rusqlite::Connection::open(&long).unwrap();
        history::sqlite(&conn, BASE, tail_s, scale);
    }
    let dbs: Vec<(i64, SqliteStore, rusqlite::Connection)> = [(1, &path), (scale, &long)]
        .into_iter()
        .map(|(x, path)| {
            let conn = rusqlite::Connection::open(path).unwrap();
            // Steady state: every tenant's current segment grew in the last minute.
            conn.execute(
                "UPDATE rollup_segments SET changed_at = ?1 WHERE start >= ?2",
                rusqlite::params![kycd_protocol::clock::unix_now(), BASE],
            )
            .unwrap();
            (x, SqliteStore::open(path).unwrap(), conn)
        })
        .collect();
    // The two histories' rounds interleaved, so a change in the machine's load hits both.
    let mut timings: Vec<Timings> = dbs.iter().map(|_| Timings::default()).collect();
    for r in 0..ROUNDS {
        for ((x, store, conn), t) in dbs.iter().zip(&mut timings) {
            eprint!("round {r}, history ×{x}:");
            let mut scan = || {
                let rows: i64 = conn
                    .query_row("SELECT COUNT(*), SUM(estimated_ops), SUM(peak_flops) FROM records", [], |r| {
                        r.get(0)
                    })
                    .unwrap();
                assert_eq!(u64::try_from(rows).unwrap(), windows / HOSTS * HOSTS);
            };
            round(store, &mut scan, *x == 1, t);
        }
    }
    for ((x, _, conn), t) in dbs.iter().zip(&timings) {
        let segments: i64 = conn.query_row("SELECT COUNT(*) FROM rollup_segments", [], |r| r.get(0)).unwrap();
        let what = format!(
            "SQLite, {} windows of history ({windows} raw), {HOSTS} hosts, {TENANTS} tenants, {segments} busy segments",
            u64::try_from(*x).unwrap() * windows
        );
        t.print(&what, (*x > 1).then(|| &timings[0]));
    }
}
