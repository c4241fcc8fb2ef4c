//! Real-kernel fixtures for the enforcement tests: private network namespaces, throwaway
//! cgroups, listeners and connection probes. Every fixture removes what it created when
//! dropped, also when the test fails. A fixture that cannot be set up panics: a test failure.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A process-unique suffix `<pid>-<n>`.
pub fn unique() -> String {
    format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// Prints the loud skip line (or fails under `KYCD_REQUIRE_ALL`); the test then returns.
#[track_caller]
pub fn skip(why: &str) {
    crate::skip!("SKIP: {why}");
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn have(program: &str) -> bool {
    Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

pub fn run_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs and returns stdout; panics with stderr on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    find_cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The cgroup2 mount point in a `/proc/self/mountinfo` text. The agent has its own parser
/// (`kycd::discovery::cgroup`); this crate must not depend on the agent (the collector's tests use it
/// too), so the harness reads mountinfo itself, the same way: the filesystem type is the first
/// field after " - ", the mount point the fifth before it, with `\NNN` octal escapes.
fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN` octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// This process's own cgroup v2 path ("/" or "/user.slice/…").
pub fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// A cgroup created for one test under this process's own cgroup; on drop its processes
/// are killed and it is removed (children first).
#[derive(Debug)]
pub struct TestCgroup {
    pub path: PathBuf,
    pub mount: PathBuf,
}

impl TestCgroup {
    /// Creates `<mount>/<own cgroup>/kycd-test-<pid>-<n>`, or says why it cannot.
    pub fn new() -> Result<Self, String> {
        let mount = cgroup2_mount().ok_or("no cgroup2 mount")?;
        let own = own_cgroup().ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
        let path = mount.join(own.trim_start_matches('/')).join(format!("kycd-test-{}", unique()));
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let cg = Self { path, mount };
        if !cg.path.join("cgroup.freeze").exists() || !cg.path.join("cgroup.kill").exists() {
            return Err("kernel lacks cgroup.freeze/cgroup.kill".into());
        }
        Ok(cg)
    }

    /// A child cgroup `name` (removed with the parent).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap();
        p
    }

    /// The path relative to the cgroup2 root, as `NftDesired` wants it.
    pub fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.mount).unwrap().to_string_lossy().into_owned()
    }

    /// Spawns `sleep 60` inside `cg`.
    pub fn spawn_sleep(cg: &Path) -> Child {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec sleep 60")
            .arg(cg)
            .spawn()
            .unwrap();
        // Wait until it is in the cgroup.
        let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(5);
        while kycd_protocol::clock::monotonic() < deadline {
            if events(cg).contains("populated 1") {
                return child;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sleep never entered {}", cg.display());
    }
}

pub fn events(cg: &Path) -> String {
    std::fs::read_to_string(cg.join("cgroup.events")).unwrap_or_default()
}

pub fn wait_events(cg: &Path, line: &str) -> bool {
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(5);
    while kycd_protocol::clock::monotonic() < deadline {
        if events(cg).lines().any(|l| l == line) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && kycd_protocol::clock::monotonic() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
        if self.path.exists() {
            eprintln!("WARNING: could not remove test cgroup {}", self.path.display());
        }
    }
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Result<Self, String> {
        let name = format!("kycd-t-{}", unique());
        if !run_ok(&["ip", "netns", "add", &name]) {
            return Err(format!("`ip netns add {name}` failed"));
        }
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The prefix that runs a program in this namespace without hiding the cgroup tree
    /// (`ip netns exec` remounts /sys, and nft would no longer find cgroup paths).
    pub fn prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.path())]
    }

    /// The `nft` command for `NftEnforcer` in this namespace.
    pub fn nft_command(&self) -> Vec<String> {
        let mut c = self.prefix();
        c.push("nft".into());
        c
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut all: Vec<String> = self.prefix();
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&refs)
    }

    pub fn exec_status(&self, args: &[&str]) -> bool {
        let mut all: Vec<String> = self.prefix();
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run_ok(&refs)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !run_ok(&["ip", "netns", "del", &self.name]) {
            eprintln!("WARNING: could not delete netns {}", self.name);
        }
    }
}

/// A TCP listener in a namespace, killed on drop.
#[derive(Debug)]
pub struct Listener {
    child: Child,
}

impl Listener {
    /// Listens on `[::]:port` (dual stack) inside `ns`.
    pub fn start(ns: &Netns, port: u16) -> Self {
        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_INET6)\n\
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
            s.bind(('::', int(sys.argv[1])))\n\
            s.listen(64)\n\
            print('ready', flush=True)\n\
            while True:\n    c,_=s.accept(); c.close()\n";
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path())).args(["python3", "-c", script, &port.to_string()]);
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        Self { child }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a TCP connect from a fresh process in cgroup `cg` and namespace `ns` to
/// `host:port` succeeds within a second. The probe is killed after 5 s: a process moved into
/// a frozen cgroup never runs, and must not hang the test.
pub fn can_connect(ns: &Netns, cg: &Path, host: &str, port: u16) -> bool {
    let script = "import socket,sys\n\
        try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()\n\
        except OSError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n";
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec nsenter --net=\"$1\" python3 -c \"$2\" \"$3\" \"$4\"")
        .args([cg.to_string_lossy().as_ref(), &ns.path(), script, host, &port.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if kycd_protocol::clock::monotonic() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("connection probe in {} hung (frozen cgroup?)", cg.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two namespaces joined by a veth pair: `kv0` (10.200.0.1, fd00:200::1) in `local` —
/// where the kycd table lives — and `kv1` (10.200.0.2, fd00:200::2) in `peer`, which
/// runs a listener on `PORT`. Dropped in field order: listener, then namespaces.
#[derive(Debug)]
pub struct Topology {
    pub listener: Listener,
    pub local: Netns,
    pub peer: Netns,
}

pub const PORT: u16 = 18080;

impl Topology {
    pub fn new() -> Result<Self, String> {
        let local = Netns::new()?;
        let peer = Netns::new()?;
        if !run_ok(&[
            "ip",
            "-n",
            &local.name,
            "link",
            "add",
            "kv0",
            "type",
            "veth",
            "peer",
            "name",
            "kv1",
            "netns",
            &peer.name,
        ]) {
            return Err("cannot create a veth pair".into());
        }
        for (ns, dev, v4, v6) in [
            (&local, "kv0", "10.200.0.1/24", "fd00:200::1/64"),
            (&peer, "kv1", "10.200.0.2/24", "fd00:200::2/64"),
        ] {
            run(&["ip", "-n", &ns.name, "addr", "add", v4, "dev", dev]);
            run(&["ip", "-n", &ns.name, "addr", "add", v6, "dev", dev, "nodad"]);
            run(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
        }
        let listener = Listener::start(&peer, PORT);
        Ok(Self { listener, local, peer })
    }
}

/// Everything an nftables test needs, or why it cannot run.
pub fn nft_capable() -> Result<(), String> {
    if !is_root() {
        return Err("not root".into());
    }
    for p in ["nft", "ip", "nsenter", "unshare", "python3"] {
        if !have(p) {
            return Err(format!("{p} not found"));
        }
    }
    Ok(())
}

/// Number of rules in the table, from `nft -t list table inet kycd` (terse: without set
/// elements, because listing cgroupv2 elements walks the whole cgroup tree per element and
/// takes minutes at 10,000 elements; the rules printed are the same).
pub fn rule_count(ns: &Netns) -> usize {
    ns.exec(&["nft", "-t", "list", "table", "inet", "kycd"])
        .lines()
        .filter(|l| l.contains('@') && l.contains(" drop"))
        .count()
}
