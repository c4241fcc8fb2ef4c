//! Resolving the desired state against the kernel: cgroup paths to the ids `nft` stores,
//! interface and cgroup names checked to be safe inside an nft quoted string.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;

use super::cidr::{without_nested, Cidr};
use super::{EnforceError, NftDesired, NftEnforcer, MAX_CGROUP_LEVEL, NFT_CGROUP_ROOT};

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
pub(super) struct Resolved {
    /// Level → cgroup id → the name `nft` resolves to that id.
    pub(super) cgroups: BTreeMap<usize, BTreeMap<u64, String>>,
    pub(super) interfaces: BTreeSet<String>,
    /// Like `cgroups`, for the cgroups in geo scope.
    pub(super) geo_cgroups: BTreeMap<usize, BTreeMap<u64, String>>,
    pub(super) geo_interfaces: BTreeSet<String>,
    pub(super) v4: BTreeSet<Cidr>,
    pub(super) v6: BTreeSet<Cidr>,
}

impl NftEnforcer {
    /// Resolves `desired` against the kernel; what cannot be expressed goes to `skipped`.
    pub(super) fn resolve(
        &mut self,
        desired: &NftDesired,
        cached: bool,
        skipped: &mut Vec<(String, String)>,
    ) -> Resolved {
        let mut r = Resolved::default();
        let mut cache = BTreeMap::new();
        r.cgroups = self.resolve_cgroups(&desired.cgroups, cached, &mut cache, skipped);
        r.geo_cgroups = self.resolve_cgroups(&desired.geo_cgroups, cached, &mut cache, skipped);
        for (names, into) in
            [(&desired.interfaces, &mut r.interfaces), (&desired.geo_interfaces, &mut r.geo_interfaces)]
        {
            for name in names {
                if valid_ifname(name) {
                    into.insert(name.clone());
                } else {
                    skipped.push((name.clone(), "invalid interface name".into()));
                }
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

    /// Resolves cgroup paths to level → id → the name `nft` resolves to that id; `cache`
    /// collects what was resolved (for the next cached resolve).
    fn resolve_cgroups(
        &self,
        paths: &BTreeSet<String>,
        cached: bool,
        cache: &mut BTreeMap<String, (usize, u64, String)>,
        skipped: &mut Vec<(String, String)>,
    ) -> BTreeMap<usize, BTreeMap<u64, String>> {
        let mut out: BTreeMap<usize, BTreeMap<u64, String>> = BTreeMap::new();
        if paths.is_empty() {
            return out;
        }
        let Some(mount) = self.cgroup_mount() else {
            skipped.extend(paths.iter().map(|c| (c.clone(), "no cgroup2 mount".into())));
            return out;
        };
        let Ok(prefix) = mount.strip_prefix(NFT_CGROUP_ROOT) else {
            let why = EnforceError::CgroupMountUnsupported(mount.clone()).to_string();
            skipped.extend(paths.iter().map(|c| (c.clone(), why.clone())));
            return out;
        };
        for rel in paths {
            // Resolved by the last call (when trusted), or earlier in this one.
            let hit = if cached { self.resolved_paths.get(rel).cloned() } else { None };
            if let Some(hit) = hit.or_else(|| cache.get(rel).cloned()) {
                let (level, id, name) = hit.clone();
                out.entry(level).or_default().insert(id, name);
                cache.insert(rel.clone(), hit);
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
                    out.entry(level).or_default().insert(m.ino(), name.clone());
                    cache.insert(rel.clone(), (level, m.ino(), name));
                }
                Ok(_) => skipped.push((rel.clone(), "not a cgroup directory".into())),
                Err(e) => skipped.push((rel.clone(), format!("cgroup not found: {e}"))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
