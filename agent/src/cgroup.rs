//! Workload discovery from the cgroup v2 tree.
//!
//! The cgroup2 mount is found in `/proc/self/mountinfo` (on hybrid hosts it is
//! `/sys/fs/cgroup/unified`, not `/sys/fs/cgroup`). Under each configured root, every child
//! cgroup is a workload: libvirt's `machine-qemu\x2dN\x2dNAME.scope` becomes
//! `libvirt_domain:NAME`, `user-UID.slice` under `user.slice` becomes `unix_user:UID`, and
//! anything else `cgroup:/ROOT/CHILD`. The host itself is always the workload `host:host`.

use std::path::{Path, PathBuf};

use crate::workload::{WorkloadId, WorkloadKind};

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

/// systemd unit-name escaping: `\x2d` and friends.
fn unescape_systemd(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        match rest.get(i + 2..i + 4).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The workload a child cgroup `child` of root `root` stands for.
pub fn classify(root: &str, child: &str) -> WorkloadId {
    let unescaped = unescape_systemd(child);
    if let Some(rest) = unescaped.strip_prefix("machine-qemu-").and_then(|r| r.strip_suffix(".scope")) {
        // machine-qemu-<N>-<name>.scope
        if let Some((_, name)) = rest.split_once('-') {
            if !name.is_empty() {
                return WorkloadId { kind: WorkloadKind::LibvirtDomain, id: name.to_owned() };
            }
        }
    }
    if let Some(uid) = unescaped.strip_prefix("user-").and_then(|r| r.strip_suffix(".slice")) {
        if uid.parse::<u32>().is_ok() {
            return WorkloadId { kind: WorkloadKind::UnixUser, id: uid.to_owned() };
        }
    }
    WorkloadId { kind: WorkloadKind::Cgroup, id: format!("/{root}/{child}") }
}

/// Lists workloads under `roots` of the cgroup tree at `mount`, plus the host. Roots that do
/// not exist on this host are skipped (a GPU node may run no VMs).
pub fn discover(mount: &Path, roots: &[String]) -> Vec<Discovered> {
    let mut found =
        vec![Discovered { id: WorkloadId { kind: WorkloadKind::Host, id: "host".into() }, cgroup: None }];
    for root in roots {
        let Ok(entries) = std::fs::read_dir(mount.join(root)) else { continue };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(child) = entry.file_name().to_str().map(str::to_owned) else { continue };
            found.push(Discovered { id: classify(root, &child), cgroup: Some(entry.path()) });
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found.dedup_by(|a, b| a.id == b.id);
    found
}

/// The `<uuid>` of a libvirt domain, from its status XML (`/run/libvirt/qemu/NAME.xml`).
/// Only the first `<uuid>` element is read; libvirt writes the domain's own UUID first.
pub fn libvirt_domain_uuid(status_dir: &Path, name: &str) -> Option<String> {
    use std::io::Read as _;
    let mut text = String::new();
    let file = std::fs::File::open(status_dir.join(format!("{name}.xml"))).ok()?;
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    let start = text.find("<uuid>")? + "<uuid>".len();
    let end = start + text[start..].find("</uuid>")?;
    let uuid = text[start..end].trim().to_ascii_lowercase();
    let valid = uuid.len() == 36 && uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uuid)
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
    fn reads_the_domain_uuid_from_libvirt_status_xml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("gpu-vm.xml"),
            "<domstatus state='running'>\n  <domain type='kvm' id='3'>\n    <name>gpu-vm</name>\n    \
             <uuid>6F1C2A9E-3A51-4C1E-9D3B-2B7F0E5E8A10</uuid>\n  </domain>\n</domstatus>\n",
        )
        .unwrap();
        assert_eq!(
            libvirt_domain_uuid(dir.path(), "gpu-vm").as_deref(),
            Some("6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10")
        );
        assert_eq!(libvirt_domain_uuid(dir.path(), "absent"), None);
        std::fs::write(dir.path().join("bad.xml"), "<uuid>not-a-uuid</uuid>").unwrap();
        assert_eq!(libvirt_domain_uuid(dir.path(), "bad"), None);
    }

    #[test]
    fn discovers_children_of_existing_roots_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("machine.slice/machine-qemu\\x2d1\\x2dvm1.scope")).unwrap();
        std::fs::create_dir_all(dir.path().join("kubepods.slice/pod-a.slice")).unwrap();
        std::fs::write(dir.path().join("kubepods.slice/cgroup.procs"), "").unwrap();
        let roots = vec!["machine.slice".into(), "kubepods.slice".into(), "absent.slice".into()];
        let ids: Vec<String> = discover(dir.path(), &roots).into_iter().map(|d| d.id.to_string()).collect();
        assert_eq!(ids, ["cgroup:/kubepods.slice/pod-a.slice", "libvirt_domain:vm1", "host:host"]);
    }
}
