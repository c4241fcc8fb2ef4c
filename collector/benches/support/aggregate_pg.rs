//! The PostgreSQL variant of the aggregation benchmark: the same fleet (see the bench's
//! module doc) bulk-loaded with `COPY … FROM STDIN` into a database migrated by
//! `PgStore::open` (so schema and indexes are the collector's), then `VACUUM ANALYZE`; the
//! same timings as on SQLite (see the bench's module doc), on it and on a copy
//! (`CREATE DATABASE … TEMPLATE`) with a history 100 times longer built as roll-up rows.
//!
//! Server: `KYCD_BENCH_POSTGRES_URL` (a role that may `CREATE DATABASE`; the database
//! `kycd_bench_aggregate_<windows>` is kept and reused when it holds the expected rows), else
//! a private cluster started for the run (kycd-test-support `pg`, loaded every run), else skipped.
//! `KYCD_BENCH_POSTGRES=0` skips it.

use std::io::Write as _;

use kycd_collector::fleet::FleetStore as _;
use kycd_collector::policy::PolicyStore as _;
use kycd_collector::{PgStore, ReportStore as _};
use kycd_protocol::{Algorithm, PrivateJwk};

use super::{
    history, owner, pg, round as rounds_one, Timings, BASE, HOSTS, LOADER_VERSION, ROUNDS, TENANTS,
    TENANTS_PER_HOST,
};

const COPY_SQL: &str = r#"COPY records (host_id, epoch, seq, last_seq, tenant, workload, start, "end", gpu_seconds,
    gpus, max_concurrent_gpus, estimated_ops, peak_flops, method, training_like, foreign_person,
    merged_windows, body_json, received_at, ops_lower, ops_upper, shared_gpu_seconds,
    guest_gap_gpu_seconds) FROM STDIN"#;

fn load(url: &str, windows: u64) {
    let store = PgStore::open(url).unwrap();
    for h in 0..HOSTS {
        let key = PrivateJwk::generate(Algorithm::EdDSA, &format!("host-{h:04}")).unwrap();
        store.enroll_host(key.kid(), &key.public_key(), 0).unwrap();
    }
    drop(store);
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let per_host = windows / HOSTS;
    let base = BASE;
    let started = kycd_protocol::clock::monotonic();
    // `records` is partitioned by month of the window's end: the months the windows end in.
    let last_end = base + 60 * i64::try_from(per_host / TENANTS_PER_HOST).unwrap() + 60;
    client
        .query(
            "SELECT kycd_records_partition(e) FROM generate_series($1::bigint, $2::bigint, 86400) e",
            &[&base, &last_end],
        )
        .unwrap();
    // One COPY per 200 hosts (a transaction each).
    for chunk in 0..HOSTS.div_ceil(200) {
        let copy = client.copy_in(COPY_SQL).unwrap();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, copy);
        for h in chunk * 200..((chunk + 1) * 200).min(HOSTS) {
            for i in 0..per_host {
                let slot = i % TENANTS_PER_HOST;
                let tenant = (h * TENANTS_PER_HOST + slot) % TENANTS;
                // The SQLite loader's tenants and workloads (`\N`: no tenant).
                let (owner, workload) = owner(h, i);
                let owner = owner.unwrap_or_else(|| "\\N".to_owned());
                let minute = i64::try_from(i / TENANTS_PER_HOST).unwrap();
                let start = base + 60 * minute;
                let seq = i + 1;
                let ops = 1.0e17 + (i % 97) as f64 * 1.0e15;
                let foreign = if tenant % 4 == 0 { "t" } else { "f" };
                writeln!(
                    out,
                    "host-{h:04}\t1\t{seq}\t{seq}\t{owner}\t{workload}\t{start}\t{end}\t480\t8\t8\t{ops:e}\t7.9e15\tgpm_pipes\tt\t{foreign}\t1\t{{}}\t{end}\t{lower:e}\t{upper:e}\t{shared}\t0",
                    end = start + 60,
                    lower = ops / 2.0,
                    upper = ops * 2.0,
                    // One VM slot in five shares its GPUs (the SQLite loader does the same).
                    shared = if slot == 0 { 480 } else { 0 },
                )
                .unwrap();
            }
        }
        out.into_inner().map_err(|e| e.into_error()).unwrap().finish().unwrap();
        eprintln!(
            "  loaded {} windows ({:.0}s)",
            ((chunk + 1) * 200).min(HOSTS) * per_host,
            started.elapsed().as_secs_f64()
        );
    }
    let store = PgStore::open(url).unwrap();
    store.publish_policy(&super::policy()).unwrap();
    let read = store.rollup_rebuild(kycd_protocol::clock::unix_now()).unwrap();
    eprintln!("  roll-ups built from {read} windows ({:.0}s)", started.elapsed().as_secs_f64());
    client.batch_execute("VACUUM ANALYZE").unwrap();
    eprintln!("  vacuumed and analyzed ({:.0}s)", started.elapsed().as_secs_f64());
}

fn count(url: &str) -> Option<u64> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).ok()?;
    let row = client.query_one("SELECT count(*) FROM records", &[]).ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// Runs the PostgreSQL variant, if a server can be had: the 10M-window database, then its
/// copy with a history `scale` times longer (see `history.rs`).
pub fn run(windows: u64, scale: i64) {
    if std::env::var("KYCD_BENCH_POSTGRES").as_deref() == Ok("0") {
        println!("PostgreSQL: skipped (KYCD_BENCH_POSTGRES=0)");
        return;
    }
    let mut _cluster = None;
    let admin = match std::env::var("KYCD_BENCH_POSTGRES_URL") {
        Ok(url) => url,
        Err(_) => match pg::Cluster::start(true) {
            Ok(cluster) => {
                let url = cluster.url("postgres");
                eprintln!("PostgreSQL: private cluster in {}", cluster.dir.display());
                _cluster = Some(cluster);
                url
            }
            Err(why) => {
                println!("PostgreSQL: skipped ({why})");
                return;
            }
        },
    };
    let name = format!("kycd_bench_aggregate_{windows}_v{LOADER_VERSION}");
    let url = pg::with_dbname(&admin, &name);
    let expected = windows / HOSTS * HOSTS;
    let mut admin_client = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    if count(&url) != Some(expected) {
        eprintln!("building PostgreSQL database {name} ({windows} windows)…");
        admin_client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
        admin_client.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        load(&url, windows);
    }
    let tail_s = i64::try_from(windows / HOSTS / TENANTS_PER_HOST).unwrap() * 60;
    let long = format!("{name}_x{scale}");
    let long_url = pg::with_dbname(&admin, &long);
    if count(&long_url) != Some(expected) {
        eprintln!("building PostgreSQL database {long} (history ×{scale})…");
        admin_client.batch_execute(&format!("DROP DATABASE IF EXISTS {long} WITH (FORCE)")).unwrap();
        admin_client.batch_execute(&format!("CREATE DATABASE {long} TEMPLATE {name}")).unwrap();
        let mut client = postgres::Client::connect(&long_url, postgres::NoTls).unwrap();
        history::postgres(&mut client, BASE, tail_s, scale);
    }
    let dbs: Vec<(i64, PgStore, postgres::Client)> = [(1, url), (scale, long_url)]
        .into_iter()
        .map(|(x, url)| {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            // Steady state: every tenant's current segment grew in the last minute.
            client
                .execute(
                    "UPDATE rollup_segments SET changed_at = $1 WHERE start >= $2",
                    &[&kycd_protocol::clock::unix_now(), &BASE],
                )
                .unwrap();
            (x, PgStore::open(&url).unwrap(), client)
        })
        .collect();
    // The two histories' rounds interleaved, so a change in the machine's load hits both.
    let mut dbs = dbs;
    let mut timings: Vec<Timings> = dbs.iter().map(|_| Timings::default()).collect();
    for r in 0..ROUNDS {
        for ((x, store, client), t) in dbs.iter_mut().zip(&mut timings) {
            eprint!("pg round {r}, history ×{x}:");
            let mut scan = || {
                let row = client
                    .query_one("SELECT count(*), sum(estimated_ops), sum(peak_flops) FROM records", &[])
                    .unwrap();
                assert_eq!(u64::try_from(row.get::<_, i64>(0)).unwrap(), expected);
            };
            rounds_one(store, &mut scan, *x == 1, t);
        }
    }
    for ((x, _, client), t) in dbs.iter_mut().zip(&timings) {
        let segments: i64 = client.query_one("SELECT count(*) FROM rollup_segments", &[]).unwrap().get(0);
        let what = format!(
            "PostgreSQL, {} windows of history ({windows} raw), {HOSTS} hosts, {TENANTS} tenants, {segments} busy segments",
            u64::try_from(*x).unwrap() * windows
        );
        t.print(&what, (*x > 1).then(|| &timings[0]));
    }
}
