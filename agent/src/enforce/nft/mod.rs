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
//! - `geo_v4` / `geo_v6` (`flags interval`): jurisdiction CIDRs. They never match on their
//!   own: every rule naming them also names a workload set, so the CIDR block applies only
//!   to the workloads in *geo scope*, never host-wide (the host's own processes and
//!   out-of-scope tenants keep reaching those networks).
//! - `geo_cg_l1` … `geo_cg_l6` (`type cgroupsv2`): cgroups in geo scope, matched with
//!   `socket cgroupv2 level N @geo_cg_lN ip saddr @geo_v4` in `input` (`daddr` in `output`),
//!   and the same for `ip6`/`geo_v6`.
//! - `geo_ifaces` (`type ifname`): VM taps in geo scope, in `forward` only (a VM's traffic
//!   to and from the world is routed through the host): `iifname @geo_ifaces ip daddr
//!   @geo_v4`, `oifname @geo_ifaces ip saddr @geo_v4`, and the same for `ip6`. A tap on a
//!   bridge without `br_netfilter` is not seen by the `inet` family, as for `ifaces`.
//!
//! Which workloads are in geo scope is decided in [`crate::reconcile`]: those a prohibiting
//! measure in effect *applies to* (its `applies_to` and the tenant's foreign status) but that
//! are not denied (a denied workload is cut off entirely by `cg_lN`/`ifaces`).
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
//!
//! Files: [`cidr`] (networks and the country CIDR file), `resolve` (desired state against
//! the kernel: cgroup ids, interface names), `ruleset` (the table and the transaction
//! script), `listing` (reading `nft -j` back).

pub mod cidr;
mod listing;
mod resolve;
mod ruleset;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tracing::{debug, info, warn};

pub use cidr::{load_country_cidrs, Cidr, CountryCidrs};
use listing::parse_actual;
use resolve::Resolved;
use ruleset::{cgroup_sets, plain_set, quote, table_definition, Rewrite};

use super::EnforceError;

/// The table this backend owns.
pub const TABLE: &str = "kycd";
/// Name prefix of the cgroup sets that cut a workload off (`cg_l1` …).
const CG_SET: &str = "cg_l";
/// Name prefix of the cgroup sets in geo scope (`geo_cg_l1` …).
const GEO_CG_SET: &str = "geo_cg_l";
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
    /// Host cgroups in geo scope: their sockets may not reach the `cidrs_v4`/`cidrs_v6`
    /// networks (relative to the cgroup2 root, like `cgroups`).
    pub geo_cgroups: BTreeSet<String>,
    /// VM taps in geo scope: their routed traffic may not reach those networks.
    pub geo_interfaces: BTreeSet<String>,
    /// IPv4 CIDRs (`a.b.c.d/n` or a bare address) the workloads in geo scope may not reach
    /// or be reached from.
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
    /// cgroup ids in geo scope per level (1-based).
    pub geo_cgroups: BTreeMap<usize, BTreeSet<u64>>,
    /// Geo-scope levels holding an element that could not be mapped to a cgroup id.
    pub geo_unresolved_levels: BTreeSet<usize>,
    /// Interfaces in geo scope.
    pub geo_interfaces: BTreeSet<String>,
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
            crate::discovery::cgroup::find_cgroup2_mount(&mountinfo)
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
            geo_cgroups: applied
                .geo_cgroups
                .iter()
                .map(|(l, ids)| (*l, ids.keys().copied().collect()))
                .collect(),
            geo_interfaces: applied.geo_interfaces.clone(),
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

        // cgroup sets, compared by cgroup id.
        let prev = self.applied.as_ref();
        let cg_parts = [
            cgroup_sets(
                CG_SET,
                &want.cgroups,
                &actual.cgroups,
                &actual.unresolved_levels,
                prev.map(|p| &p.cgroups),
                rebuild,
            ),
            cgroup_sets(
                GEO_CG_SET,
                &want.geo_cgroups,
                &actual.geo_cgroups,
                &actual.geo_unresolved_levels,
                prev.map(|p| &p.geo_cgroups),
                rebuild,
            ),
        ];

        // Interfaces and CIDRs, compared by value.
        let ifs_prev = prev.map(|p| &p.interfaces);
        let geo_ifs_prev = prev.map(|p| &p.geo_interfaces);
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
        let value_parts = [
            plain_set("ifaces", &want.interfaces, &actual.interfaces, ifs_prev, foreign("ifaces"), |n| {
                quote(n)
            }),
            plain_set(
                "geo_ifaces",
                &want.geo_interfaces,
                &actual.geo_interfaces,
                geo_ifs_prev,
                foreign("geo_ifaces"),
                |n| quote(n),
            ),
            plain_set("geo_v4", &want.v4, &actual.cidrs_v4, v4_prev, foreign("geo_v4"), Cidr::to_string),
            plain_set("geo_v6", &want.v6, &actual.cidrs_v6, v6_prev, foreign("geo_v6"), Cidr::to_string),
        ];
        for part in cg_parts.into_iter().chain(value_parts) {
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
