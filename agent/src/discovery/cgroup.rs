//! Workload discovery from the cgroup v2 tree.
//!
//! The cgroup2 mount is found in `/proc/self/mountinfo` (on hybrid hosts it is
//! `/sys/fs/cgroup/unified`, not `/sys/fs/cgroup`). Under each configured root, every child
//! cgroup is a workload: a libvirt domain's cgroup becomes `libvirt_domain:NAME`,
//! `user-UID.slice` under `user.slice` becomes `unix_user:UID`, and anything else
//! `cgroup:/ROOT/CHILD`. The host itself is always the workload `host:host`.
//!
//! libvirt names a domain's cgroup after its machine name `qemu-N-NAME` (N: the running
//! domain's number) in one of two layouts: with systemd, the scope
//! `machine.slice/machine-qemu\x2dN\x2dNAME.scope` (systemd-escaped); without systemd, where
//! libvirt makes the cgroups itself, the directory `machine/qemu-N-NAME.libvirt-qemu` (not
//! escaped: the machine name holds only `[A-Za-z0-9._-]`). Each layout's root must be in
//! `[workloads] roots`.

use std::path::{Path, PathBuf};

use crate::discovery::workload::{WorkloadId, WorkloadKind};

/// A workload found in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Its id.
    pub id: WorkloadId,
    /// Its cgroup directory (absent for the host).
    pub cgroup: Option<PathBuf>,
}

/// The mount point of the cgroup2 filesystem, from the text of `/proc/self/mountinfo`.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup rw,… shared:9 - cgroup2 cgroup2 rw,…": the optional
        // fields end at " - ", after which the first field is the filesystem type.
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

/// systemd unit-name escaping: `\x2d` and friends. Escapes are bytes (a multi-byte UTF-8
/// character is several `\xNN`), so bytes are collected and decoded once at the end.
fn unescape_systemd(s: &str) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\\x") {
        out.extend_from_slice(&rest.as_bytes()[..i]);
        match rest.get(i + 2..i + 4).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) => {
                out.push(b);
                rest = &rest[i + 4..];
            }
            None => {
                out.extend_from_slice(b"\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.extend_from_slice(rest.as_bytes());
    String::from_utf8_lossy(&out).into_owned()
}

/// The number `N` and name `NAME` of the libvirt machine name `qemu-N-NAME` a child cgroup
/// `child` carries, in either layout: the systemd scope `machine-qemu\x2dN\x2dNAME.scope`
/// or, without systemd, `qemu-N-NAME.libvirt-qemu`. Both names are lossy in the same way
/// (libvirt drops characters outside `[A-Za-z0-9._-]` and truncates the machine name at 64
/// bytes), so either is only a hint of the domain's name.
fn libvirt_machine(child: &str) -> Option<(String, String)> {
    let machine = match child.strip_suffix(".libvirt-qemu") {
        Some(manual) => manual.to_owned(),
        None => unescape_systemd(child).strip_prefix("machine-")?.strip_suffix(".scope")?.to_owned(),
    };
    let (number, name) = machine.strip_prefix("qemu-")?.split_once('-')?;
    Some((number.to_owned(), name.to_owned()))
}

/// The domain number `N` of libvirt's cgroup `machine-qemu-N-NAME.scope` or
/// `qemu-N-NAME.libvirt-qemu`.
fn libvirt_scope_number(child: &str) -> Option<u32> {
    libvirt_machine(child)?.0.parse().ok()
}

/// The workload a child cgroup `child` of root `root` stands for.
pub fn classify(root: &str, child: &str) -> WorkloadId {
    if let Some((_, name)) = libvirt_machine(child).filter(|(_, name)| !name.is_empty()) {
        return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: name };
    }
    let unescaped = unescape_systemd(child);
    if let Some(uid) = unescaped.strip_prefix("user-").and_then(|r| r.strip_suffix(".slice")) {
        if uid.parse::<u32>().is_ok() {
            return WorkloadId { kind: WorkloadKind::UnixUser, id: uid.to_owned() };
        }
    }
    WorkloadId { kind: WorkloadKind::Cgroup, id: format!("/{root}/{child}") }
}

/// What one scan of the cgroup tree found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Workloads, sorted by id, plus the host.
    pub found: Vec<Discovered>,
    /// Roots that exist but could not be read: their workloads are unknown this time, not
    /// gone (treating an unreadable tree as empty would forget them).
    pub unreadable_roots: Vec<PathBuf>,
}

/// Lists workloads under `roots` of the cgroup tree at `mount`, plus the host. Roots that do
/// not exist on this host are skipped (a GPU node may run no VMs).
///
/// libvirt's cgroup names are lossy (libvirt drops characters and truncates long names), so a
/// domain cgroup `machine-qemu-N-….scope` or `qemu-N-….libvirt-qemu` is named after the
/// running domain whose status XML says `id='N'` when there is one. Two cgroups that would still get the same id are both named
/// by their cgroup path instead: neither can then borrow the other's attestation.
pub fn discover(mount: &Path, roots: &[String], domains: &[LibvirtDomain]) -> Discovery {
    let mut discovery = Discovery {
        found: vec![Discovered {
            id: WorkloadId { kind: WorkloadKind::Host, id: "host".into() },
            cgroup: None,
        }],
        unreadable_roots: Vec::new(),
    };
    let mut found = Vec::new();
    for root in roots {
        let dir = mount.join(root);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => {
                discovery.unreadable_roots.push(dir);
                continue;
            }
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(child) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let mut id = classify(root, &child);
            if id.kind == WorkloadKind::LibvirtDomain {
                let number = libvirt_scope_number(&child);
                let domain = domains.iter().find(|d| d.id.is_some() && d.id == number);
                if let Some(d) = domain {
                    id.id = d.name.clone();
                }
                // A domain named like a UUID would match attestations bound to that UUID:
                // it keeps the name only if it is its own UUID.
                if is_uuid(&id.id)
                    && domain.and_then(|d| d.uuid.as_deref()) != Some(id.id.to_ascii_lowercase().as_str())
                {
                    id = WorkloadId { kind: WorkloadKind::Cgroup, id: format!("/{root}/{child}") };
                }
            }
            found.push((Discovered { id, cgroup: Some(entry.path()) }, root.clone(), child));
        }
    }
    found.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let mut i = 0;
    while i < found.len() {
        let mut j = i + 1;
        while j < found.len() && found[j].0.id == found[i].0.id {
            j += 1;
        }
        if j - i > 1 {
            for (d, root, child) in &mut found[i..j] {
                d.id = WorkloadId { kind: WorkloadKind::Cgroup, id: format!("/{root}/{child}") };
            }
        }
        i = j;
    }
    discovery.found.extend(found.into_iter().map(|(d, _, _)| d));
    discovery.found.sort_by(|a, b| a.id.cmp(&b.id));
    discovery
}

/// Whether `s` has the shape of a UUID (8-4-4-4-12 hex digits).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A libvirt domain from its status XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtDomain {
    /// The running domain's number (the `N` of its cgroup `machine-qemu-N-….scope` or
    /// `qemu-N-….libvirt-qemu`).
    pub id: Option<u32>,
    /// The domain name.
    pub name: String,
    /// The domain UUID, lower case.
    pub uuid: Option<String>,
}

/// At most this many status files are read per scan (a host runs far fewer domains).
const MAX_LIBVIRT_STATUS_FILES: usize = 4096;

/// The running domains described by libvirt's status directory (`/run/libvirt/qemu/*.xml`).
/// A missing directory means no domains; files that vanish or do not parse are skipped. A
/// directory that cannot be listed, or a file unreadable for want of resources
/// ([`crate::fsutil::is_resource_error`]), is an error: the caller keeps the domains it knew.
pub fn libvirt_domains(status_dir: &Path) -> std::io::Result<Vec<LibvirtDomain>> {
    use std::io::Read as _;
    let entries = match std::fs::read_dir(status_dir) {
        Ok(entries) => entries,
        // libvirt not installed, or no domain ever ran.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut domains = Vec::new();
    for entry in entries.take(MAX_LIBVIRT_STATUS_FILES) {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("xml") {
            continue;
        }
        let mut text = String::new();
        let read = std::fs::File::open(&path).and_then(|f| f.take(1 << 20).read_to_string(&mut text));
        match read {
            Ok(_) => {}
            // The agent's own trouble: the caller keeps the domains it knew.
            Err(e) if crate::fsutil::is_resource_error(&e) => return Err(e),
            // Gone since listed (the domain stopped), or not text: not a running domain.
            Err(_) => continue,
        }
        if let Some(d) = parse_libvirt_status(&text) {
            domains.push(d);
        }
    }
    domains.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(domains)
}

/// The domain's id, name and UUID from a status (or domain) XML document. Only the first
/// `<domain …>` element counts; libvirt writes the domain's own fields before any nested
/// element that could carry a `<name>` or `<uuid>` of its own.
fn parse_libvirt_status(text: &str) -> Option<LibvirtDomain> {
    let start = text.find("<domain ")?;
    let tag_end = start + text[start..].find('>')?;
    let tag = &text[start..tag_end];
    let id = ["id='", "id=\""].iter().find_map(|p| {
        let at = tag.find(p)? + p.len();
        tag[at..].split(['\'', '"']).next()?.parse().ok()
    });
    let body = &text[tag_end..];
    let element = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let at = body.find(&open)? + open.len();
        let end = at + body[at..].find(&format!("</{name}>"))?;
        Some(unescape_xml(body[at..end].trim()))
    };
    let name = element("name").filter(|n| !n.is_empty())?;
    let uuid = element("uuid").map(|u| u.to_ascii_lowercase()).filter(|u| is_uuid(u));
    Some(LibvirtDomain { id, name, uuid })
}

/// The five predefined XML entities (libvirt escapes names and attribute values with them).
pub(super) fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_unified_and_hybrid_hosts() {
        let unified = "29 1 0:26 / / rw - ext4 /dev/vda rw\n\
                       35 29 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd\n";
        assert_eq!(find_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(find_cgroup2_mount("27 25 0:24 / /x rw - cgroup cgroup rw\n"), None);
        let escaped = "1 1 0:1 / /mnt/cg\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount(escaped), Some(PathBuf::from("/mnt/cg v2")));
    }

    #[test]
    fn classifies_libvirt_users_and_plain_cgroups() {
        let vm = classify("machine.slice", "machine-qemu\\x2d3\\x2dgpu\\x2dvm\\x2d7.scope");
        assert_eq!(vm.to_string(), "libvirt_domain:gpu-vm-7");
        assert_eq!(classify("user.slice", "user-1001.slice").to_string(), "unix_user:1001");
        assert_eq!(
            classify("kubepods.slice", "kubepods-pod1234.slice").to_string(),
            "cgroup:/kubepods.slice/kubepods-pod1234.slice"
        );
        assert_eq!(classify("user.slice", "user-x.slice").to_string(), "cgroup:/user.slice/user-x.slice");
    }

    #[test]
    fn reads_domains_from_libvirt_status_xml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("gpu-vm.xml"),
            "<domstatus state='running'>\n  <domain type='kvm' id='3'>\n    <name>gpu-vm</name>\n    \
             <uuid>6F1C2A9E-3A51-4C1E-9D3B-2B7F0E5E8A10</uuid>\n  </domain>\n</domstatus>\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad.xml"),
            "<domain id='x'><name>b&amp;d</name><uuid>no</uuid></domain>",
        )
        .unwrap();
        std::fs::write(dir.path().join("junk.xml"), "not xml").unwrap();
        std::fs::write(dir.path().join("gpu-vm.txt"), "<domain id='9'><name>other</name></domain>").unwrap();
        let domains = libvirt_domains(dir.path()).unwrap();
        assert_eq!(
            domains,
            [
                LibvirtDomain { id: None, name: "b&d".into(), uuid: None },
                LibvirtDomain {
                    id: Some(3),
                    name: "gpu-vm".into(),
                    uuid: Some("6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10".into())
                },
            ]
        );
        assert!(libvirt_domains(&dir.path().join("absent")).unwrap().is_empty());
        // A status "directory" that cannot be listed is an error, not "no domains".
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        assert!(libvirt_domains(&file).is_err());
    }

    #[test]
    fn unescapes_multibyte_utf8_in_unit_names() {
        assert_eq!(unescape_systemd("vm\\xc3\\xa9t\\xc3\\xa9"), "vmété");
        assert_eq!(unescape_systemd("a\\xzz"), "a\\xzz");
        assert_eq!(libvirt_scope_number("machine-qemu\\x2d12\\x2dvm.scope"), Some(12));
        assert_eq!(libvirt_scope_number("machine-qemu\\x2dx\\x2dvm.scope"), None);
    }

    #[test]
    fn names_libvirt_scopes_after_the_running_domain_and_splits_collisions() {
        let dir = tempfile::tempdir().unwrap();
        // libvirt truncates long names in scope names: the status XML has the real one.
        std::fs::create_dir_all(dir.path().join("machine.slice/machine-qemu\\x2d4\\x2dlong\\x2dna.scope"))
            .unwrap();
        std::fs::create_dir_all(dir.path().join("machine.slice/machine-qemu\\x2d5\\x2dtwin.scope")).unwrap();
        std::fs::create_dir_all(dir.path().join("machine.slice/machine-qemu\\x2d6\\x2dtwin.scope")).unwrap();
        let domains = [LibvirtDomain { id: Some(4), name: "long-name-of-vm".into(), uuid: None }];
        let ids: Vec<String> = discover(dir.path(), &["machine.slice".into()], &domains)
            .found
            .into_iter()
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(
            ids,
            [
                "cgroup:/machine.slice/machine-qemu\\x2d5\\x2dtwin.scope",
                "cgroup:/machine.slice/machine-qemu\\x2d6\\x2dtwin.scope",
                "libvirt_domain:long-name-of-vm",
                "host:host"
            ]
        );
    }

    #[test]
    fn classifies_libvirt_cgroups_made_without_systemd() {
        // libvirt without systemd: machine/qemu-N-NAME.libvirt-qemu, not systemd-escaped.
        let vm = classify("machine", "qemu-3-gpu-vm-7.libvirt-qemu");
        assert_eq!(vm.to_string(), "libvirt_domain:gpu-vm-7");
        assert_eq!(libvirt_scope_number("qemu-12-vm.libvirt-qemu"), Some(12));
        assert_eq!(libvirt_scope_number("qemu-x-vm.libvirt-qemu"), None);
        assert_eq!(classify("machine", "qemu-1-a\\x2db.libvirt-qemu").id, "a\\x2db", "no unescaping");
        for other in
            ["qemu-3-.libvirt-qemu", "lxc-1-ct.libvirt-lxc", "machine-qemu-1-x.libvirt-qemu", "qemu-1"]
        {
            assert_eq!(classify("machine", other).to_string(), format!("cgroup:/machine/{other}"));
        }
    }

    #[test]
    fn names_cgroups_made_without_systemd_after_the_running_domain() {
        let dir = tempfile::tempdir().unwrap();
        let machine = dir.path().join("machine");
        // libvirt's own children (threaded cgroups of vCPUs and the emulator) are not workloads.
        std::fs::create_dir_all(machine.join("qemu-4-long-na.libvirt-qemu/vcpu0")).unwrap();
        std::fs::create_dir_all(machine.join("qemu-4-long-na.libvirt-qemu/emulator")).unwrap();
        std::fs::create_dir_all(machine.join("qemu-6-twin.libvirt-qemu")).unwrap();
        // The same name in the other layout (a host that switched) collides too.
        std::fs::create_dir_all(dir.path().join("machine.slice/machine-qemu\\x2d5\\x2dtwin.scope")).unwrap();
        std::fs::write(machine.join("cgroup.procs"), "").unwrap();
        let domains = [LibvirtDomain { id: Some(4), name: "long-name-of-vm".into(), uuid: None }];
        let found = discover(dir.path(), &["machine".into(), "machine.slice".into()], &domains).found;
        let ids: Vec<String> = found.iter().map(|d| d.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "cgroup:/machine.slice/machine-qemu\\x2d5\\x2dtwin.scope",
                "cgroup:/machine/qemu-6-twin.libvirt-qemu",
                "libvirt_domain:long-name-of-vm",
                "host:host"
            ]
        );
        // The workload's cgroup is the domain's own (freezing it freezes libvirt's children).
        assert_eq!(found[2].cgroup.as_deref(), Some(machine.join("qemu-4-long-na.libvirt-qemu").as_path()));
        // The UUID rule holds in this layout too.
        let uuid = "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10";
        std::fs::create_dir_all(machine.join(format!("qemu-7-{uuid}.libvirt-qemu"))).unwrap();
        let impostor = [LibvirtDomain { id: Some(7), name: uuid.into(), uuid: None }];
        let found = discover(dir.path(), &["machine".into()], &impostor).found;
        assert!(found
            .iter()
            .any(|d| d.id.to_string() == format!("cgroup:/machine/qemu-7-{uuid}.libvirt-qemu")));
    }

    #[test]
    fn a_domain_named_like_a_foreign_uuid_does_not_keep_that_name() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = "6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10";
        assert!(is_uuid(uuid) && is_uuid(&uuid.to_uppercase()) && !is_uuid("vm-1") && !is_uuid("6f1c2a9e"));
        let scope = format!("machine-qemu\\x2d7\\x2d{}.scope", uuid.replace('-', "\\x2d"));
        std::fs::create_dir_all(dir.path().join("machine.slice").join(&scope)).unwrap();
        let impostor = [LibvirtDomain {
            id: Some(7),
            name: uuid.into(),
            uuid: Some("00000000-0000-0000-0000-000000000001".into()),
        }];
        let found = discover(dir.path(), &["machine.slice".into()], &impostor).found;
        assert_eq!(found[0].id.to_string(), format!("cgroup:/machine.slice/{scope}"));
        let honest = [LibvirtDomain { id: Some(7), name: uuid.into(), uuid: Some(uuid.into()) }];
        let found = discover(dir.path(), &["machine.slice".into()], &honest).found;
        assert_eq!(found[0].id.to_string(), format!("libvirt_domain:{uuid}"));
    }

    #[test]
    fn discovers_children_of_existing_roots_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("machine.slice/machine-qemu\\x2d1\\x2dvm1.scope")).unwrap();
        std::fs::create_dir_all(dir.path().join("kubepods.slice/pod-a.slice")).unwrap();
        std::fs::write(dir.path().join("kubepods.slice/cgroup.procs"), "").unwrap();
        let roots = vec!["machine.slice".into(), "kubepods.slice".into(), "absent.slice".into()];
        let discovery = discover(dir.path(), &roots, &[]);
        let ids: Vec<String> = discovery.found.into_iter().map(|d| d.id.to_string()).collect();
        assert_eq!(ids, ["cgroup:/kubepods.slice/pod-a.slice", "libvirt_domain:vm1", "host:host"]);
        assert!(discovery.unreadable_roots.is_empty(), "a missing root is not unreadable");
        std::fs::write(dir.path().join("file.slice"), "").unwrap();
        let discovery = discover(dir.path(), &["file.slice".into()], &[]);
        assert_eq!(discovery.unreadable_roots, [dir.path().join("file.slice")]);
    }
}
