//! A libvirt domain's tap interfaces, from libvirt's status XML
//! (`/run/libvirt/qemu/NAME.xml`), for the nftables interface sets.
//!
//! This is a scan for `<target dev='…'/>` inside `<interface …>` elements, not an XML
//! parser: libvirt writes that file itself in a fixed shape, and the names found are
//! validated as interface names before anyone uses them.

use std::io::Read as _;
use std::path::Path;

/// Status files are a few tens of KiB; refuse to read more than this.
const MAX_STATUS_XML: u64 = 1 << 20;

/// The host-side device names (`vnet3`) of `name`'s network interfaces, in document order,
/// without duplicates. A missing file yields none (the domain is not running); any other
/// read error is returned, so the caller keeps the taps it knew (and their blocks).
pub fn domain_interfaces(status_dir: &Path, name: &str) -> std::io::Result<Vec<String>> {
    if name.is_empty() || name.contains('/') {
        return Ok(Vec::new());
    }
    let mut text = String::new();
    let read = std::fs::File::open(status_dir.join(format!("{name}.xml")))
        .and_then(|f| f.take(MAX_STATUS_XML).read_to_string(&mut text));
    match read {
        Ok(_) => Ok(interfaces_in(&text)),
        // Not running (no status file): no taps.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        // Anything else says nothing about the taps: the caller keeps those it knew.
        Err(e) => Err(e),
    }
}

fn interfaces_in(xml: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut rest = xml;
    // `<interface ` or `<interface>`, but not `<interfaces` or other prefixes.
    while let Some(i) = find_open_tag(rest, "interface") {
        let body_start = i;
        let Some(end) = rest[body_start..].find("</interface>") else { break };
        let body = &rest[body_start..body_start + end];
        if let Some(dev) = target_dev(body) {
            if valid_ifname(dev) && !found.iter().any(|f| f == dev) {
                found.push(dev.to_owned());
            }
        }
        rest = &rest[body_start + end + "</interface>".len()..];
    }
    found
}

/// Offset just past `<tag` where the next byte ends the tag name.
fn find_open_tag(text: &str, tag: &str) -> Option<usize> {
    let open = format!("<{tag}");
    let mut from = 0;
    while let Some(i) = text[from..].find(&open) {
        let after = from + i + open.len();
        match text.as_bytes().get(after) {
            Some(b' ' | b'>' | b'\t' | b'\n' | b'\r' | b'/') => return Some(after),
            Some(_) => from = after,
            None => return None,
        }
    }
    None
}

/// The `dev` attribute of the first `<target …>` in `body`.
fn target_dev(body: &str) -> Option<&str> {
    let t = find_open_tag(body, "target")?;
    let tag = &body[t..t + body[t..].find('>')?];
    let at = tag.find("dev=")? + "dev=".len();
    let quote = tag[at..].chars().next().filter(|q| *q == '\'' || *q == '"')?;
    let value = &tag[at + 1..];
    Some(&value[..value.find(quote)?])
}

/// Linux interface name rules (≤ 15 bytes, no '/', no whitespace), printable ASCII only.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "<domstatus state='running'>\n  <domain type='kvm' id='3'>\n    <name>gpu-vm</name>\n\
        <devices>\n      <disk type='file'><target dev='vda' bus='virtio'/></disk>\n\
        <interface type='network'>\n        <mac address='52:54:00:aa:bb:cc'/>\n\
        <source network='default'/>\n        <target dev='vnet3'/>\n        <model type='virtio'/>\n\
        </interface>\n      <interface type=\"bridge\">\n        <target dev=\"vnet4\"/>\n      </interface>\n\
        <interface type='user'>\n        <model type='virtio'/>\n      </interface>\n\
        <interface type='network'><target dev='bad name'/></interface>\n\
        <interface type='network'><target dev='vnet3'/></interface>\n\
        <console type='pty'><target type='serial' port='0'/></console>\n    </devices>\n  </domain>\n</domstatus>\n";

    #[test]
    fn reads_tap_names_from_interface_elements_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gpu-vm.xml"), STATUS).unwrap();
        assert_eq!(domain_interfaces(dir.path(), "gpu-vm").unwrap(), ["vnet3", "vnet4"]);
        assert!(domain_interfaces(dir.path(), "absent").unwrap().is_empty());
        assert!(domain_interfaces(dir.path(), "../gpu-vm").unwrap().is_empty());
        // A status file that cannot be read is an error, not "no taps" (which would lift the
        // domain's network block).
        std::fs::create_dir(dir.path().join("odd.xml")).unwrap();
        assert!(domain_interfaces(dir.path(), "odd").is_err());
    }

    #[test]
    fn rejects_invalid_interface_names() {
        assert!(interfaces_in("<interface><target dev='0123456789abcdef'/></interface>").is_empty());
        assert!(interfaces_in("<interface><target dev='a/b'/></interface>").is_empty());
        assert!(interfaces_in("<interface><target dev=''/></interface>").is_empty());
        assert!(interfaces_in("<interfaces><target dev='x'/></interfaces>").is_empty());
        assert!(interfaces_in("<interface><target dev='x'/>").is_empty(), "unterminated element");
        assert_eq!(interfaces_in("<interface><target dev='tap-0'/></interface>"), ["tap-0"]);
    }
}
