//! nftables enforcement through the `nft` program.
//!
//! Owns the table `inet kycd` and nothing else: it never lists, flushes or edits any other
//! table. The table has three base chains (`input`, `output`, `forward`, policy accept,
//! priority `filter - 10` so they run before the usual filter tables) and a fixed set of
//! rules, each matching one named set; blocking a workload adds a set *element*, never a
//! rule, so the rule count is the same with one blocked workload or ten thousand:
//!
//! - `cg_l1` … `cg_l6` (`type cgroupsv2`): host processes, matched with
//!   `socket cgroupv2 level N @cg_lN` in `input` and `output`. The kernel compares the
//!   ancestor at depth N of the socket's cgroup, so a cgroup of depth N goes in `cg_lN` and
//!   blocks everything below it too.
//! - `ifaces` (`type ifname`): VM tap devices, `iifname`/`oifname` in all three chains.
//! - `geo_v4` / `geo_v6` (`flags interval`): jurisdiction CIDRs, source in `input`,
//!   destination in `output`, both in `forward`.
//!
//! Every change is one `nft -f -` transaction, so it applies entirely or not at all.
//! [`NftEnforcer::reconcile`] reads the table back and repairs any drift (a missing or extra
//! element, an altered or deleted table — the latter by deleting and re-creating the table
//! inside the same transaction); its read costs O(elements). [`NftEnforcer::apply`] diffs
//! against what this process last applied instead, for per-decision latency, and falls back
//! to `reconcile` when nft rejects the change. The first call of a process always rebuilds
//! the table, because it has no record of the structure it expects.
//!
//! Findings about nft 1.0.6 that shape this module:
//! - `nft` resolves a cgroupv2 element path by `stat`ing `/sys/fs/cgroup/<path>` and stores
//!   the inode (= the cgroup id). On a hybrid host the cgroup2 mount is
//!   `/sys/fs/cgroup/unified`, so element names carry that `unified/` prefix; a cgroup that
//!   is deleted and recreated has a new id, and the element must be re-added. Elements are
//!   therefore compared by cgroup id, never by path.
//! - Listing a cgroupv2 element walks the whole `/sys/fs/cgroup` tree to turn the id back
//!   into a path: 300 elements took 4.4 s on the development VM. Reads run `nft` in a
//!   private mount namespace with an empty tmpfs over `/sys/fs/cgroup`, so it prints bare ids
//!   instead (30 ms).
//! - `nft` cannot parse a numeric cgroupv2 element, so an element whose cgroup is gone can
//!   only be removed by flushing its set and re-adding the rest (in the same transaction).
//! - `ip netns exec` remounts `/sys`, which hides the cgroup tree from `nft`: to run in a
//!   network namespace, use `nsenter --net=/run/netns/NAME nft` as the command.
//! - `typeof socket cgroupv2 level N` sets list back as `level 0`, and JSON output drops the
//!   level of `socket cgroupv2` matches, so sets are declared `type cgroupsv2` and each rule
//!   carries a comment naming its set.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use tracing::{debug, info, warn};

use super::EnforceError;

/// The table this backend owns.
pub const TABLE: &str = "kycd";
/// Deepest cgroup level with a set and rule of its own.
pub const MAX_CGROUP_LEVEL: usize = 6;
/// Where `nft` looks for cgroupv2 paths (compiled into nftables).
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Elements per `add element` statement; keeps each statement a reasonable size.
const CHUNK: usize = 1000;

/// What should be blocked. Everything not listed is not blocked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftDesired {
    /// Host cgroups whose sockets are cut off, relative to the cgroup2 root
    /// (`machine.slice/x.scope`).
    pub cgroups: BTreeSet<String>,
    /// Network interfaces (VM taps) whose traffic is dropped.
    pub interfaces: BTreeSet<String>,
    /// IPv4 CIDRs (`a.b.c.d/n` or a bare address) no traffic may go to or come from.
    pub cidrs_v4: BTreeSet<String>,
    /// IPv6 CIDRs, likewise.
    pub cidrs_v6: BTreeSet<String>,
}

/// What the kernel has in table `inet kycd`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftActual {
    /// Whether the table exists at all.
    pub present: bool,
    /// cgroup ids per level (1-based).
    pub cgroups: BTreeMap<usize, BTreeSet<u64>>,
    /// Levels holding an element that could not be mapped to a cgroup id.
    pub unresolved_levels: BTreeSet<usize>,
    /// Blocked interfaces.
    pub interfaces: BTreeSet<String>,
    /// Blocked IPv4 CIDRs.
    pub cidrs_v4: BTreeSet<Cidr>,
    /// Blocked IPv6 CIDRs.
    pub cidrs_v6: BTreeSet<Cidr>,
    /// Sets holding elements in a form kycd never writes (e.g. ranges): rewritten whole.
    pub foreign_elements: BTreeSet<String>,
    /// The table's structure (chains, rules, set declarations) without elements or handles,
    /// to notice when someone altered it.
    pub structure: String,
}

/// What one [`NftEnforcer::reconcile`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftReport {
    /// Elements added.
    pub added: usize,
    /// Elements removed.
    pub removed: usize,
    /// Elements kycd had applied that were missing, or that someone else added.
    pub drift: usize,
    /// The table was (re)created from scratch: missing, altered, or first seen by this
    /// process.
    pub rebuilt: bool,
    /// Desired entries that cannot be expressed, with why (cgroup gone, invalid name, too
    /// deep): the rest is still applied.
    pub skipped: Vec<(String, String)>,
}

/// An IPv4 or IPv6 network in canonical form (no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `addr/len` or a bare address (a host route). Host bits must be clear: a CIDR
    /// with them set is more likely a typo than a network.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("invalid address {addr:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => {
                l.parse::<u8>().ok().filter(|l| *l <= max).ok_or(format!("invalid prefix length {l:?}"))?
            }
            None => max,
        };
        let cidr = Self { addr, len };
        if cidr.network() != addr {
            return Err(format!("host bits set in {s} (network is {})", cidr.network()));
        }
        Ok(cidr)
    }

    /// Whether this is an IPv4 network.
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn network(&self) -> IpAddr {
        mask(self.addr, self.len)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Drops networks contained in another one: nft rejects overlapping intervals.
fn without_nested(cidrs: BTreeSet<Cidr>) -> BTreeSet<Cidr> {
    let all: HashSet<Cidr> = cidrs.iter().copied().collect();
    cidrs
        .into_iter()
        .filter(|c| !(0..c.len).any(|l| all.contains(&Cidr { addr: mask(c.addr, l), len: l })))
        .collect()
}

/// Country code (ISO 3166 alpha-2, upper case) → its (IPv4, IPv6) networks.
pub type CountryCidrs = BTreeMap<String, (Vec<Cidr>, Vec<Cidr>)>;

/// Loads a country CIDR file: one `CC CIDR` per line (ISO 3166 alpha-2 code, then an IPv4
/// or IPv6 network); `#` starts a comment; blank lines are ignored.
pub fn load_country_cidrs(path: &Path) -> Result<CountryCidrs, EnforceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| EnforceError::CidrFileIo { path: path.to_path_buf(), source })?;
    parse_country_cidrs(path, &text)
}

fn parse_country_cidrs(path: &Path, text: &str) -> Result<CountryCidrs, EnforceError> {
    let mut out = CountryCidrs::new();
    for (i, raw) in text.lines().enumerate() {
        let bad = |reason: String| EnforceError::CidrFile { path: path.to_path_buf(), line: i + 1, reason };
        let line = raw.split_once('#').map_or(raw, |(l, _)| l).trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(cc), Some(cidr), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad("expected `CC CIDR`".into()));
        };
        if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(bad(format!("invalid country code {cc:?}")));
        }
        let cidr = Cidr::parse(cidr).map_err(bad)?;
        let entry = out.entry(cc.to_ascii_uppercase()).or_default();
        if cidr.is_v4() {
            entry.0.push(cidr);
        } else {
            entry.1.push(cidr);
        }
    }
    Ok(out)
}

/// A valid Linux interface name that is also safe inside an nft quoted string.
fn valid_ifname(name: &str) -> bool {
    // The kernel allows any bytes but '/', ':' and whitespace; '"' and '\' would end or
    // escape the nft string, and a trailing '*' is an nft wildcard.
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'"' | b'\\' | b'*'))
}

/// A cgroup path relative to the cgroup2 root, safe inside an nft quoted string. Returns
/// its components.
fn cgroup_components(rel: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = rel.trim_matches('/').split('/').collect();
    let ok = parts
        .iter()
        .all(|p| !p.is_empty() && *p != "." && *p != ".." && p.chars().all(|c| !c.is_control() && c != '"'));
    ok.then_some(parts)
}

/// Desired state resolved against the kernel: cgroup ids, canonical CIDRs.
#[derive(Debug, Clone, Default)]
struct Resolved {
    /// Level → cgroup id → the name `nft` resolves to that id.
    cgroups: BTreeMap<usize, BTreeMap<u64, String>>,
    interfaces: BTreeSet<String>,
    v4: BTreeSet<Cidr>,
    v6: BTreeSet<Cidr>,
}

/// The nftables backend. See the module documentation.
#[derive(Debug)]
pub struct NftEnforcer {
    /// The `nft` program and any wrapper in front of it (e.g. `nsenter --net=… nft`).
    command: Vec<String>,
    /// The cgroup2 mount; `None` = find it in `/proc/self/mountinfo` when needed.
    cgroup_mount: Option<PathBuf>,
    /// Run reads with an empty `/sys/fs/cgroup` so `nft` prints cgroup ids (see module docs).
    numeric_reads: bool,
    /// What the last successful reconcile applied, to tell drift from new entries.
    applied: Option<Resolved>,
    /// The table structure as read right after this process last built it.
    structure: Option<String>,
    /// cgroup path → (level, id, nft name) as last resolved, so [`NftEnforcer::apply`] only
    /// `stat`s new paths. `reconcile` always re-resolves (a recreated cgroup has a new id).
    resolved_paths: BTreeMap<String, (usize, u64, String)>,
}

impl Default for NftEnforcer {
    fn default() -> Self {
        Self::new(vec!["nft".into()])
    }
}

impl NftEnforcer {
    /// A backend running `command` as `nft` (normally `["nft"]`).
    pub fn new(command: Vec<String>) -> Self {
        Self {
            command,
            cgroup_mount: None,
            numeric_reads: true,
            applied: None,
            structure: None,
            resolved_paths: BTreeMap::new(),
        }
    }

    /// Uses `mount` as the cgroup2 mount instead of looking it up.
    pub fn with_cgroup_mount(mut self, mount: PathBuf) -> Self {
        self.cgroup_mount = Some(mount);
        self
    }

    fn cgroup_mount(&self) -> Option<PathBuf> {
        self.cgroup_mount.clone().or_else(|| {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            crate::cgroup::find_cgroup2_mount(&mountinfo)
        })
    }

    fn program(&self) -> Result<(&String, &[String]), EnforceError> {
        self.command.split_first().ok_or_else(|| EnforceError::NftMissing {
            program: "(empty nft command)".into(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })
    }

    /// Runs the command with `args`, feeding `stdin`; returns stdout.
    fn run(&self, wrapper: &[&str], args: &[&str], stdin: Option<&str>) -> Result<String, EnforceError> {
        let (nft, nft_args) = self.program()?;
        let mut cmd = match wrapper.split_first() {
            Some((w, w_args)) => {
                let mut c = Command::new(w);
                c.args(w_args).arg(nft);
                c
            }
            None => Command::new(nft),
        };
        cmd.args(nft_args).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let program = wrapper.first().map_or(nft.clone(), |w| (*w).to_owned());
        let mut child = cmd.spawn().map_err(|source| EnforceError::NftMissing { program, source })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error means nft exited early; its status and stderr tell why.
            if let Err(e) = pipe.write_all(text.as_bytes()) {
                debug!(error = %e, "nft closed its stdin early");
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|source| EnforceError::NftMissing { program: self.command.join(" "), source })?;
        if !out.status.success() {
            return Err(EnforceError::NftFailed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().chars().take(4096).collect(),
            });
        }
        String::from_utf8(out.stdout).map_err(|_| EnforceError::NftParse("output is not UTF-8".into()))
    }

    /// Reads table `inet kycd` as it is in the kernel (absent table: `present == false`).
    pub fn read_actual(&self) -> Result<NftActual, EnforceError> {
        const LIST: [&str; 5] = ["-j", "list", "table", "inet", TABLE];
        // A private mount namespace with an empty tmpfs over /sys/fs/cgroup: nft then cannot
        // map cgroup ids back to paths and prints the ids, skipping a full walk of the
        // cgroup tree per element. If the mount fails nft still runs, just slower.
        const NUMERIC: [&str; 9] = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "mount -t tmpfs kycd-nft-read /sys/fs/cgroup 2>/dev/null; exec \"$@\"",
            "kycd-nft-read",
        ];
        let result = if self.numeric_reads {
            match self.run(&NUMERIC, &LIST, None) {
                Err(EnforceError::NftMissing { program, .. }) if program == "unshare" => {
                    warn!("unshare not found; listing cgroup elements will be slow");
                    self.run(&[], &LIST, None)
                }
                other => other,
            }
        } else {
            self.run(&[], &LIST, None)
        };
        match result {
            Ok(json) => parse_actual(&json),
            Err(EnforceError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => {
                Ok(NftActual::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves `desired` against the kernel; what cannot be expressed goes to `skipped`.
    fn resolve(
        &mut self,
        desired: &NftDesired,
        cached: bool,
        skipped: &mut Vec<(String, String)>,
    ) -> Resolved {
        let mut r = Resolved::default();
        let mut cache = BTreeMap::new();
        if !desired.cgroups.is_empty() {
            match self.cgroup_mount() {
                None => {
                    skipped.extend(desired.cgroups.iter().map(|c| (c.clone(), "no cgroup2 mount".into())))
                }
                Some(mount) => match mount.strip_prefix(NFT_CGROUP_ROOT) {
                    Err(_) => {
                        let why = EnforceError::CgroupMountUnsupported(mount.clone()).to_string();
                        skipped.extend(desired.cgroups.iter().map(|c| (c.clone(), why.clone())));
                    }
                    Ok(prefix) => {
                        for rel in &desired.cgroups {
                            if let Some(hit) = self.resolved_paths.get(rel).filter(|_| cached) {
                                let (level, id, name) = hit.clone();
                                r.cgroups.entry(level).or_default().insert(id, name);
                                cache.insert(rel.clone(), hit.clone());
                                continue;
                            }
                            let Some(parts) = cgroup_components(rel) else {
                                skipped.push((rel.clone(), "invalid cgroup path".into()));
                                continue;
                            };
                            let level = parts.len();
                            if level > MAX_CGROUP_LEVEL {
                                skipped.push((rel.clone(), format!("deeper than level {MAX_CGROUP_LEVEL}")));
                                continue;
                            }
                            let clean = parts.join("/");
                            let name = prefix.join(&clean).to_string_lossy().into_owned();
                            match std::fs::metadata(mount.join(&clean)) {
                                Ok(m) if m.is_dir() => {
                                    r.cgroups.entry(level).or_default().insert(m.ino(), name.clone());
                                    cache.insert(rel.clone(), (level, m.ino(), name));
                                }
                                Ok(_) => skipped.push((rel.clone(), "not a cgroup directory".into())),
                                Err(e) => skipped.push((rel.clone(), format!("cgroup not found: {e}"))),
                            }
                        }
                    }
                },
            }
        }
        for name in &desired.interfaces {
            if valid_ifname(name) {
                r.interfaces.insert(name.clone());
            } else {
                skipped.push((name.clone(), "invalid interface name".into()));
            }
        }
        for (list, want_v4) in [(&desired.cidrs_v4, true), (&desired.cidrs_v6, false)] {
            for s in list {
                match Cidr::parse(s) {
                    Ok(c) if c.is_v4() == want_v4 => {
                        if want_v4 {
                            r.v4.insert(c);
                        } else {
                            r.v6.insert(c);
                        }
                    }
                    Ok(_) => skipped.push((s.clone(), "wrong address family".into())),
                    Err(why) => skipped.push((s.clone(), why)),
                }
            }
        }
        r.v4 = without_nested(std::mem::take(&mut r.v4));
        r.v6 = without_nested(std::mem::take(&mut r.v6));
        self.resolved_paths = cache;
        r
    }

    /// Converges table `inet kycd` to `desired` in one atomic transaction; see the module
    /// documentation. On error nothing was changed.
    pub fn reconcile(&mut self, desired: &NftDesired) -> Result<NftReport, EnforceError> {
        // A cgroup can vanish between resolving it and nft resolving it again, which fails
        // the whole transaction; one retry re-resolves everything.
        match self.reconcile_once(desired) {
            Err(EnforceError::NftFailed { stderr, .. }) if stderr.contains("cgroupv2 path fails") => {
                debug!(%stderr, "a cgroup vanished during reconcile; retrying");
                self.reconcile_once(desired)
            }
            other => other,
        }
    }

    /// Like [`reconcile`](Self::reconcile), but diffs `desired` against what this process
    /// last applied instead of reading the table back, so its cost does not grow with the
    /// number of elements in place (reading 10,000 cgroupv2 elements back costs ~150 ms with
    /// nft 1.0.6). It does not see drift; call `reconcile` periodically for that. If the
    /// transaction fails (table deleted, an element to delete already gone), it falls back
    /// to `reconcile`, which repairs everything.
    pub fn apply(&mut self, desired: &NftDesired) -> Result<NftReport, EnforceError> {
        if self.applied.is_none() || self.structure.is_none() {
            return self.reconcile(desired);
        }
        match self.converge(desired, false) {
            Err(e @ EnforceError::NftMissing { .. }) => Err(e),
            Err(e) => {
                warn!(error = %e, "incremental nftables update failed; reconciling against the kernel");
                self.reconcile(desired)
            }
            ok => ok,
        }
    }

    /// What the table holds if nobody but this process changed it since its last apply.
    fn assumed_actual(&self) -> Option<NftActual> {
        let applied = self.applied.as_ref()?;
        Some(NftActual {
            present: true,
            cgroups: applied.cgroups.iter().map(|(l, ids)| (*l, ids.keys().copied().collect())).collect(),
            interfaces: applied.interfaces.clone(),
            cidrs_v4: applied.v4.clone(),
            cidrs_v6: applied.v6.clone(),
            structure: self.structure.clone()?,
            ..NftActual::default()
        })
    }

    fn reconcile_once(&mut self, desired: &NftDesired) -> Result<NftReport, EnforceError> {
        self.converge(desired, true)
    }

    /// Diffs `desired` against the table as read from the kernel (`read_back`) or as last
    /// applied, and commits the difference in one transaction.
    fn converge(&mut self, desired: &NftDesired, read_back: bool) -> Result<NftReport, EnforceError> {
        let mut report = NftReport::default();
        let want = self.resolve(desired, !read_back, &mut report.skipped);
        let actual = match (read_back, self.assumed_actual()) {
            (false, Some(assumed)) => assumed,
            _ => self.read_actual()?,
        };
        let rebuild = !actual.present || self.structure.as_deref() != Some(actual.structure.as_str());
        let mut script = String::new();
        let mut drift = 0usize;

        if rebuild {
            report.rebuilt = true;
            if actual.present {
                warn!("table inet kycd altered or first seen by this process; rebuilding it");
            } else if self.applied.is_some() {
                warn!("table inet kycd vanished; rebuilding it");
            }
            // `add` then `delete` makes the delete valid whether or not the table exists,
            // and both run in the same transaction as the re-creation.
            script.push_str(&format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"));
            script.push_str(&table_definition());
        }

        // cgroup sets, compared by cgroup id. Counts are against what the kernel had; the
        // script is against what the set holds once the transaction reaches it (nothing,
        // after a rebuild).
        for level in 1..=MAX_CGROUP_LEVEL {
            let set = format!("cg_l{level}");
            let empty_w = BTreeMap::new();
            let empty_a = BTreeSet::new();
            let w = want.cgroups.get(&level).unwrap_or(&empty_w);
            let a = actual.cgroups.get(&level).unwrap_or(&empty_a);
            let prev = self.applied.as_ref().map(|p| p.cgroups.get(&level).unwrap_or(&empty_w));
            let add: Vec<u64> = w.keys().filter(|id| !a.contains(id)).copied().collect();
            let del: Vec<u64> = a.iter().filter(|id| !w.contains_key(id)).copied().collect();
            if let Some(p) = prev {
                drift += add.iter().filter(|id| p.contains_key(id)).count();
                drift += del.iter().filter(|id| !p.contains_key(id)).count();
            }
            report.added += add.len();
            report.removed += del.len();
            if rebuild {
                push_elements(&mut script, "add", &set, w.values().map(|n| quote(n)));
                continue;
            }
            // Deleting needs a name that still resolves to the id; otherwise flush the set
            // and re-add what is wanted, in the same transaction.
            let mut del_names = Vec::new();
            let mut flush = actual.unresolved_levels.contains(&level);
            for id in &del {
                match prev.and_then(|p| p.get(id)).filter(|name| cgroup_id(name) == Some(*id)) {
                    Some(name) => del_names.push(quote(name)),
                    None => flush = true,
                }
            }
            if flush {
                script.push_str(&format!("flush set inet {TABLE} {set}\n"));
                push_elements(&mut script, "add", &set, w.values().map(|n| quote(n)));
            } else {
                push_elements(&mut script, "delete", &set, del_names.into_iter());
                push_elements(
                    &mut script,
                    "add",
                    &set,
                    add.iter().filter_map(|id| w.get(id)).map(|n| quote(n)),
                );
            }
        }

        // Interfaces and CIDRs, compared by value.
        let prev = self.applied.as_ref();
        let ifs_prev = prev.map(|p| &p.interfaces);
        let v4_prev = prev.map(|p| &p.v4);
        let v6_prev = prev.map(|p| &p.v6);
        let foreign = |set: &str| {
            if rebuild {
                Rewrite::Fresh
            } else if actual.foreign_elements.contains(set) {
                Rewrite::Flush
            } else {
                Rewrite::Incremental
            }
        };
        let parts = [
            plain_set("ifaces", &want.interfaces, &actual.interfaces, ifs_prev, foreign("ifaces"), |n| {
                quote(n)
            }),
            plain_set("geo_v4", &want.v4, &actual.cidrs_v4, v4_prev, foreign("geo_v4"), Cidr::to_string),
            plain_set("geo_v6", &want.v6, &actual.cidrs_v6, v6_prev, foreign("geo_v6"), Cidr::to_string),
        ];
        for part in parts {
            script.push_str(&part.script);
            report.added += part.added;
            report.removed += part.removed;
            drift += part.drift;
        }
        report.drift = drift;

        if !script.is_empty() {
            self.run(&[], &["-f", "-"], Some(&script))?;
            info!(
                added = report.added,
                removed = report.removed,
                drift = report.drift,
                rebuilt = report.rebuilt,
                "nftables table inet kycd updated"
            );
        }
        if rebuild {
            // Remember the structure exactly as the kernel reports it, to notice later edits.
            self.structure = Some(self.read_actual()?.structure);
        }
        for (entry, why) in &report.skipped {
            warn!(entry = %entry, reason = %why, "desired nftables entry skipped");
        }
        self.applied = Some(want);
        Ok(report)
    }

    /// Deletes table `inet kycd` (for `--release-on-exit`); absent is fine.
    pub fn remove_table(&self) -> Result<(), EnforceError> {
        self.run(&[], &["-f", "-"], Some(&format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")))?;
        info!("nftables table inet kycd removed");
        Ok(())
    }
}

/// How a value-compared set is brought to its desired contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrite {
    /// Delete the extra elements, add the missing ones.
    Incremental,
    /// Flush and re-add everything (the set holds elements kycd cannot name).
    Flush,
    /// The set is being created in this transaction: add everything.
    Fresh,
}

/// One set's share of a transaction.
#[derive(Debug, Default)]
struct SetChange {
    script: String,
    added: usize,
    removed: usize,
    drift: usize,
}

/// Diffs a set compared by value: `want` against `actual`, with `prev` (what was last
/// applied) telling drift from new entries. Elements are formatted only for the difference.
fn plain_set<T: Ord>(
    set: &str,
    want: &BTreeSet<T>,
    actual: &BTreeSet<T>,
    prev: Option<&BTreeSet<T>>,
    rewrite: Rewrite,
    fmt: impl Fn(&T) -> String,
) -> SetChange {
    let add: Vec<&T> = want.difference(actual).collect();
    let del: Vec<&T> = actual.difference(want).collect();
    let mut change = SetChange { added: add.len(), removed: del.len(), ..SetChange::default() };
    if let Some(p) = prev {
        change.drift =
            add.iter().filter(|e| p.contains(e)).count() + del.iter().filter(|e| !p.contains(e)).count();
    }
    match rewrite {
        Rewrite::Fresh => push_elements(&mut change.script, "add", set, want.iter().map(&fmt)),
        Rewrite::Flush => {
            change.script.push_str(&format!("flush set inet {TABLE} {set}\n"));
            push_elements(&mut change.script, "add", set, want.iter().map(&fmt));
        }
        Rewrite::Incremental => {
            push_elements(&mut change.script, "delete", set, del.into_iter().map(&fmt));
            push_elements(&mut change.script, "add", set, add.into_iter().map(&fmt));
        }
    }
    change
}

/// The id `nft` would resolve the element name `name` to now.
fn cgroup_id(name: &str) -> Option<u64> {
    std::fs::metadata(Path::new(NFT_CGROUP_ROOT).join(name)).ok().map(|m| m.ino())
}

fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

fn push_elements(script: &mut String, verb: &str, set: &str, elements: impl Iterator<Item = String>) {
    let all: Vec<String> = elements.collect();
    for chunk in all.chunks(CHUNK) {
        script.push_str(&format!("{verb} element inet {TABLE} {set} {{ {} }}\n", chunk.join(", ")));
    }
}

/// The table with its sets, chains and rules, without elements.
fn table_definition() -> String {
    let mut t = format!("table inet {TABLE} {{\n");
    for level in 1..=MAX_CGROUP_LEVEL {
        t.push_str(&format!("\tset cg_l{level} {{\n\t\ttype cgroupsv2\n\t}}\n"));
    }
    t.push_str("\tset ifaces {\n\t\ttype ifname\n\t}\n");
    t.push_str("\tset geo_v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}\n");
    t.push_str("\tset geo_v6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t}\n");
    let cg_rules = || {
        (1..=MAX_CGROUP_LEVEL)
            .map(|l| format!("\t\tsocket cgroupv2 level {l} @cg_l{l} drop comment \"kycd:cg_l{l}\"\n"))
            .collect::<String>()
    };
    let chain = |name: &str, body: String| {
        format!("\tchain {name} {{\n\t\ttype filter hook {name} priority filter - 10; policy accept;\n{body}\t}}\n")
    };
    t.push_str(&chain(
        "input",
        format!(
            "\t\tiifname @ifaces drop comment \"kycd:ifaces\"\n{}\t\tip saddr @geo_v4 drop comment \"kycd:geo_v4\"\n\t\tip6 saddr @geo_v6 drop comment \"kycd:geo_v6\"\n",
            cg_rules()
        ),
    ));
    t.push_str(&chain(
        "forward",
        "\t\tiifname @ifaces drop comment \"kycd:ifaces\"\n\t\toifname @ifaces drop comment \"kycd:ifaces\"\n\
         \t\tip saddr @geo_v4 drop comment \"kycd:geo_v4\"\n\t\tip daddr @geo_v4 drop comment \"kycd:geo_v4\"\n\
         \t\tip6 saddr @geo_v6 drop comment \"kycd:geo_v6\"\n\t\tip6 daddr @geo_v6 drop comment \"kycd:geo_v6\"\n"
            .to_owned(),
    ));
    t.push_str(&chain(
        "output",
        format!(
            "\t\toifname @ifaces drop comment \"kycd:ifaces\"\n{}\t\tip daddr @geo_v4 drop comment \"kycd:geo_v4\"\n\t\tip6 daddr @geo_v6 drop comment \"kycd:geo_v6\"\n",
            cg_rules()
        ),
    ));
    t.push_str("}\n");
    t
}

/// Parses `nft -j list table inet kycd`.
fn parse_actual(json: &str) -> Result<NftActual, EnforceError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| EnforceError::NftParse(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| EnforceError::NftParse("no `nftables` array".into()))?;
    let mut actual = NftActual::default();
    let mut structure = Vec::new();
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else { continue };
        let Some(body) = body.as_object() else { continue };
        let mut cleaned = body.clone();
        cleaned.remove("handle");
        match kind.as_str() {
            "metainfo" => continue,
            "table" => actual.present = true,
            "set" => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                let elems = cleaned.remove("elem");
                let elems = elems.as_ref().and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                parse_set_elements(&mut actual, &name, elems);
            }
            _ => {}
        }
        structure.push(serde_json::json!({ kind: cleaned }));
    }
    actual.structure = Value::Array(structure).to_string();
    Ok(actual)
}

fn parse_set_elements(actual: &mut NftActual, name: &str, elems: &[Value]) {
    if let Some(level) = name.strip_prefix("cg_l").and_then(|l| l.parse::<usize>().ok()) {
        let ids = actual.cgroups.entry(level).or_default();
        for e in elems {
            // Ids when read with an empty /sys/fs/cgroup; paths if that mount failed.
            let id = e.as_str().and_then(|s| s.parse::<u64>().ok().or_else(|| cgroup_id(s)));
            match id {
                Some(id) => {
                    ids.insert(id);
                }
                None => {
                    actual.unresolved_levels.insert(level);
                }
            }
        }
        return;
    }
    for e in elems {
        let parsed = match name {
            "ifaces" => e.as_str().map(|s| {
                actual.interfaces.insert(s.to_owned());
            }),
            "geo_v4" | "geo_v6" => element_cidr(e).map(|c| {
                if c.is_v4() {
                    actual.cidrs_v4.insert(c);
                } else {
                    actual.cidrs_v6.insert(c);
                }
            }),
            _ => Some(()), // a set kycd does not define: the structure check catches it
        };
        if parsed.is_none() {
            actual.foreign_elements.insert(name.to_owned());
        }
    }
}

/// A CIDR element as nft prints it: `"1.2.3.4"` or `{"prefix": {"addr": …, "len": n}}`.
fn element_cidr(e: &Value) -> Option<Cidr> {
    if let Some(s) = e.as_str() {
        return Cidr::parse(s).ok();
    }
    let p = e.get("prefix")?;
    let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
    let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
    Cidr::parse(&format!("{addr}/{len}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_canonically() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(Cidr::parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().len, 0);
    }

    #[test]
    fn nested_networks_are_dropped() {
        let s: BTreeSet<Cidr> = ["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/24", "0.0.0.0/1"]
            .iter()
            .map(|c| Cidr::parse(c).unwrap())
            .collect();
        let kept: Vec<String> = without_nested(s).iter().map(Cidr::to_string).collect();
        assert_eq!(kept, ["0.0.0.0/1"]);
    }

    #[test]
    fn country_file_parses_and_names_bad_lines() {
        let p = Path::new("geo.txt");
        let m =
            parse_country_cidrs(p, "# comment\n\nde 5.1.0.0/16 # trailing\nDE 2a00:1::/32\nFR 2.0.0.0/12\n")
                .unwrap();
        assert_eq!(m["DE"].0, vec![Cidr::parse("5.1.0.0/16").unwrap()]);
        assert_eq!(m["DE"].1, vec![Cidr::parse("2a00:1::/32").unwrap()]);
        assert_eq!(m["FR"].0.len(), 1);
        for (text, line) in [
            ("DE 1.2.3.0/24\nDEU 1.0.0.0/8\n", 2),
            ("\n\nDE\n", 3),
            ("DE 1.2.3.4/24\n", 1),
            ("DE 1.0.0.0/8 x\n", 1),
        ] {
            match parse_country_cidrs(p, text) {
                Err(EnforceError::CidrFile { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn interface_and_cgroup_names_are_validated() {
        assert!(valid_ifname("vnet3"));
        assert!(valid_ifname("123456789012345"));
        assert!(!valid_ifname("1234567890123456"));
        for bad in ["", "a b", "a/b", "a\"b", "vnet*", "..", "a:b", "é"] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
        assert_eq!(cgroup_components("/machine.slice/x.scope/"), Some(vec!["machine.slice", "x.scope"]));
        assert_eq!(cgroup_components("a/../b"), None);
        assert_eq!(cgroup_components("a//b"), None);
        assert_eq!(cgroup_components("a\"b"), None);
    }

    #[test]
    fn parses_nft_json_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "kycd", "handle": 1}},
            {"set": {"family": "inet", "name": "cg_l2", "table": "kycd", "type": "cgroupsv2", "handle": 3, "elem": ["44", "/nonexistent/x"]}},
            {"set": {"family": "inet", "name": "ifaces", "table": "kycd", "type": "ifname", "handle": 4, "elem": ["vnet0"]}},
            {"set": {"family": "inet", "name": "geo_v4", "table": "kycd", "type": "ipv4_addr", "handle": 5, "flags": ["interval"],
               "elem": ["1.2.3.4", {"prefix": {"addr": "5.0.0.0", "len": 24}}, {"range": ["6.0.0.1", "6.0.0.9"]}]}},
            {"rule": {"family": "inet", "table": "kycd", "chain": "output", "handle": 6, "comment": "kycd:cg_l2", "expr": []}}]}"#;
        let a = parse_actual(json).unwrap();
        assert!(a.present);
        assert_eq!(a.cgroups[&2], BTreeSet::from([44]));
        assert!(a.unresolved_levels.contains(&2));
        assert_eq!(a.interfaces, BTreeSet::from(["vnet0".to_owned()]));
        assert_eq!(a.cidrs_v4.len(), 2);
        assert!(a.foreign_elements.contains("geo_v4"));
        assert!(!a.structure.contains("handle"));
        assert!(!a.structure.contains("vnet0"));
        let b =
            parse_actual(&json.replace("\"handle\": 6", "\"handle\": 60").replace("vnet0", "vnet9")).unwrap();
        assert_eq!(a.structure, b.structure, "handles and elements are not structure");
        assert!(parse_actual("[]").is_err());
    }

    #[test]
    fn table_definition_has_a_fixed_rule_count() {
        let t = table_definition();
        assert_eq!(t.matches(" drop comment").count(), 2 * MAX_CGROUP_LEVEL + 12);
        assert!(!t.contains("flush ruleset"));
    }
}
