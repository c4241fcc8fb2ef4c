//! A throwaway PostgreSQL server for the collector's tests and benchmark, and a fresh
//! database per test on it.
//!
//! - `KYCD_TEST_POSTGRES_URL` set (e.g. `postgres://postgres@127.0.0.1:5432/postgres`, a role
//!   that may `CREATE DATABASE`): that server is used.
//! - Otherwise a private cluster per test binary, started on first use: `initdb` (trust auth)
//!   in a temp dir under /tmp, `pg_ctl start` listening on 127.0.0.1 on a free port, its unix
//!   socket in the temp dir. PostgreSQL refuses to run as root, so as root the cluster runs as
//!   the `postgres` system user (`runuser`) with the dir chowned to it.
//! - Neither possible (no PostgreSQL binaries, or root without a `postgres` user): the tests
//!   skip, saying so on stderr — unless `KYCD_REQUIRE_POSTGRES=1` (tests/run sets it when it
//!   installed PostgreSQL), where that is a failure.
//!
//! Cleanup: the cluster lives in a static (Rust never drops those) and must also go when a
//! test aborts or the binary is killed, so a watchdog process, in its own process group,
//! waits for the test process to exit and then stops the server (`pg_ctl stop -m immediate`)
//! and removes the directory. Each test's database is dropped when its [`PgDb`] drops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Runs `f` on a thread of its own: the blocking PostgreSQL client cannot run on an async
/// thread (it blocks on a runtime of its own), and tests call it from `#[tokio::test]`s.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// A PostgreSQL server the tests may create databases on.
#[derive(Debug)]
pub struct Server {
    /// URL of a database to run `CREATE DATABASE` from.
    admin_url: String,
    /// The private cluster's directory (None for an external server); shown by `Debug`.
    #[allow(dead_code)]
    dir: Option<PathBuf>,
}

/// A private cluster: started by [`Cluster::start`], stopped and removed when dropped (and by
/// its watchdog when the process exits without dropping it).
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

/// The PostgreSQL binaries (`initdb`, `pg_ctl`, …), the newest installed version.
fn bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn postgres_user_exists() -> bool {
    Command::new("id")
        .arg("-u")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Cluster {
    /// Why no private cluster can be started here, if so.
    pub fn unavailable() -> Option<String> {
        if bindir().is_none() {
            return Some(
                "no PostgreSQL binaries in /usr/lib/postgresql/*/bin (Debian package `postgresql`)".into(),
            );
        }
        if is_root() && !postgres_user_exists() {
            return Some("running as root and there is no `postgres` user to run the server as".into());
        }
        None
    }

    /// Starts a cluster. `durable`: PostgreSQL's default durability (fsync on every commit),
    /// for benchmarks; otherwise fsync is off, which only a throwaway test cluster may do.
    pub fn start(durable: bool) -> Result<Cluster, String> {
        if let Some(why) = Self::unavailable() {
            return Err(why);
        }
        let bin = bindir().ok_or("no PostgreSQL binaries")?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("kycd-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let mut cluster = Cluster { dir, port: 0, bin, as_postgres };
        if as_postgres {
            cluster.run_checked(Command::new("chown").arg("postgres:").arg(&cluster.dir))?;
        }
        cluster.watchdog()?;
        let mut initdb = cluster.pg("initdb");
        initdb.arg("-D").arg(cluster.data()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        cluster.run_checked(&mut initdb)?;
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=200",
            cluster.dir.display()
        );
        if !durable {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        // A free port may be taken between our probe and the server's bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("free port: {e}"))?
                .port();
            let mut start = cluster.pg("pg_ctl");
            start
                .arg("-D")
                .arg(cluster.data())
                .arg("-l")
                .arg(cluster.dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("{options} -p {port}"))
                .arg("start");
            match cluster.run_checked(&mut start) {
                Ok(()) => {
                    cluster.port = port;
                    return Ok(cluster);
                }
                Err(e) => last = e,
            }
        }
        let log = std::fs::read_to_string(cluster.dir.join("server.log")).unwrap_or_default();
        Err(format!("pg_ctl start failed: {last}\n{log}"))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A PostgreSQL binary, run as the `postgres` user when we are root.
    fn pg(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run_checked(&self, cmd: &mut Command) -> Result<(), String> {
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The process that stops and removes the cluster once this process is gone, however it
    /// ends; in its own process group, so a Ctrl-C to the test run does not kill it first.
    fn watchdog(&self) -> Result<(), String> {
        let stop = self.pg("pg_ctl");
        let mut argv: Vec<String> = std::iter::once(stop.get_program())
            .chain(stop.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        argv.extend([
            "-D".into(),
            self.data().display().to_string(),
            "-m".into(),
            "immediate".into(),
            "stop".into(),
        ]);
        Command::new("sh")
            .arg("-c")
            .arg(
                r#"pid=$1; dir=$2; shift 2
                   while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
                   [ -f "$dir/data/postmaster.pid" ] && "$@"
                   rm -rf "$dir""#,
            )
            .arg("kycd-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(drop)
            .map_err(|e| format!("watchdog: {e}"))
    }

    /// URL of database `db` on this cluster, over TCP on loopback.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = self.pg("pg_ctl");
        stop.arg("-D").arg(self.data()).args(["-m", "immediate", "stop"]);
        let _ = stop.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `url` with its database name replaced by `db`.
pub fn with_dbname(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split_once('/').map_or(before_query, |(a, _)| a);
    format!("{scheme}://{authority}/{db}{query}")
}

/// The server of this test binary, or why there is none (then the caller skips).
fn server() -> Result<&'static Server, &'static str> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var("KYCD_TEST_POSTGRES_URL") {
                return Ok(Server { admin_url: url, dir: None });
            }
            let started = kycd_protocol::clock::monotonic();
            let cluster = Cluster::start(false)?;
            eprintln!(
                "started a throwaway PostgreSQL on 127.0.0.1:{} in {} ({:.1} s)",
                cluster.port,
                cluster.dir.display(),
                started.elapsed().as_secs_f64()
            );
            let server = Server { admin_url: cluster.url("postgres"), dir: Some(cluster.dir.clone()) };
            let _ = CLUSTER.set(cluster);
            Ok(server)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// A database of its own for one test, dropped with this value.
#[derive(Debug)]
pub struct PgDb {
    pub url: String,
    name: String,
    admin_url: String,
}

/// A fresh, empty database for one test, or `None` (after saying why on stderr) when no
/// PostgreSQL can be had here.
pub fn fresh_database(test: &str) -> Option<PgDb> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let server = match server() {
        Ok(server) => server,
        Err(why) => {
            assert!(
                std::env::var("KYCD_REQUIRE_POSTGRES").is_err(),
                "KYCD_REQUIRE_POSTGRES is set but no PostgreSQL is available: {why}"
            );
            crate::skip!("SKIP: {test} on PostgreSQL: {why} (set KYCD_TEST_POSTGRES_URL to use a server)");
            return None;
        }
    };
    let name = format!("kycd_t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let admin_url = server.admin_url.clone();
    let sql = format!("CREATE DATABASE {name}");
    off_runtime(|| {
        let mut client = postgres::Client::connect(&admin_url, postgres::NoTls).unwrap();
        client.batch_execute(&sql).unwrap();
    });
    Some(PgDb { url: with_dbname(&server.admin_url, &name), name, admin_url })
}

impl PgDb {
    /// A plain connection to this database (for what the store does not offer).
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin_url = self.admin_url.clone();
        let dropped = std::thread::spawn(move || -> Result<(), postgres::Error> {
            postgres::Client::connect(&admin_url, postgres::NoTls)?.batch_execute(&sql)
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: dropping test database {}: {e}", self.name);
        }
    }
}

/// How long to wait for a spawned server's TCP port.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Waits until `addr` accepts TCP connections.
pub fn wait_for_port(addr: std::net::SocketAddr) {
    let deadline = kycd_protocol::clock::monotonic() + STARTUP;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            kycd_protocol::clock::monotonic() < deadline,
            "nothing listening on {addr} after {STARTUP:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
