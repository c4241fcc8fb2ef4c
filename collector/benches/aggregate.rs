//! Aggregation over a large fleet history: `FleetStore::tenant_usage` (per-tenant totals,
//! per-host GPU maxima, per-minute concurrent capacity) and one full findings evaluation over
//! `KYCD_BENCH_WINDOWS` stored windows (default 10,000,000), against a baseline in the same
//! run: one plain full scan summing two columns of every row (`SELECT COUNT(*),
//! SUM(estimated_ops), SUM(peak_flops) FROM records`), the least any aggregation over every
//! window must read.
//!
//!     cargo bench -p kycd-collector --bench aggregate
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

use kycd_collector::findings::{evaluate_store, EvaluationSettings};
use kycd_collector::fleet::FleetStore as _;
use kycd_collector::{ReportStore as _, SqliteStore};
use kycd_protocol::{Algorithm, PrivateJwk};

const HOSTS: u64 = 2_000;
const TENANTS: u64 = 200;
const TENANTS_PER_HOST: u64 = 5;
const ROUNDS: usize = 3;
/// Bumped when the loader writes different rows, so a database of an older one is not reused
/// (2: windows without a tenant, issue 19).
const LOADER_VERSION: u32 = 2;
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
    let base: i64 = 1_790_000_000 / 60 * 60;
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
    conn.execute_batch("ANALYZE").unwrap();
}

fn main() {
    let windows: u64 =
        std::env::var("KYCD_BENCH_WINDOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    if std::env::var("KYCD_BENCH_SQLITE").as_deref() == Ok("0") {
        println!("SQLite: skipped (KYCD_BENCH_SQLITE=0)");
    } else {
        sqlite(windows);
    }
    aggregate_pg::run(windows);
}

fn sqlite(windows: u64) {
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
    let store = SqliteStore::open(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut baseline = Vec::new();
    let mut usage = Vec::new();
    let mut evaluation = Vec::new();
    for round in 0..ROUNDS {
        let t = kycd_protocol::clock::monotonic();
        let (rows, _ops, _flops): (i64, f64, f64) = conn
            .query_row("SELECT COUNT(*), SUM(estimated_ops), SUM(peak_flops) FROM records", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        baseline.push(t.elapsed().as_secs_f64());
        assert_eq!(u64::try_from(rows).unwrap(), windows / HOSTS * HOSTS);

        let t = kycd_protocol::clock::monotonic();
        let tenants = store.tenant_usage(None, None).unwrap();
        usage.push(t.elapsed().as_secs_f64());
        assert_eq!(tenants.len(), usize::try_from(TENANTS).unwrap());

        let t = kycd_protocol::clock::monotonic();
        let report = evaluate_store(&store, EvaluationSettings::default(), 1_790_000_000).unwrap();
        evaluation.push(t.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: scan {:.2}s, tenant_usage {:.2}s, evaluate {:.2}s (open findings {})",
            baseline[round], usage[round], evaluation[round], report.open
        );
    }
    // Every host's unverified workload, aggregated on its own (outside the timings).
    assert_eq!(store.fleet_usage(None).unwrap().unattributed.len(), usize::try_from(HOSTS).unwrap());
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "aggregate over {windows} windows, {HOSTS} hosts, {TENANTS} tenants (best of {ROUNDS}):\n  \
         baseline full scan   {:.2} s\n  tenant_usage         {:.2} s  ({:.2}x the scan)\n  \
         evaluate (findings)  {:.2} s  ({:.2}x the scan)",
        best(&baseline),
        best(&usage),
        best(&usage) / best(&baseline),
        best(&evaluation),
        best(&evaluation) / best(&baseline),
    );
}
