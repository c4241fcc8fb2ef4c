//! What a running libvirt domain holds, from libvirt's status XML
//! (`/run/libvirt/qemu/NAME.xml`): its tap interfaces (for the nftables interface sets) and
//! the host PCI devices passed through to it (for GPU accounting, [`crate::gpu::passthrough`]).
//!
//! This is a scan for `<target dev='…'/>` inside `<interface …>` elements and for the
//! `<source><address …/></source>` of `<hostdev mode='subsystem' type='pci'>` elements, not an
//! XML parser: libvirt writes that file itself in a fixed shape, and what is found is
//! validated (interface names, PCI addresses) before anyone uses it.

use std::io::Read as _;
use std::path::Path;

/// Status files are a few tens of KiB; refuse to read more than this.
const MAX_STATUS_XML: u64 = 1 << 20;

/// The host-side device names (`vnet3`) of `name`'s network interfaces, in document order,
/// without duplicates. A missing file yields none (the domain is not running); any other
/// read error is returned, so the caller keeps the taps it knew (and their blocks).
pub fn domain_interfaces(status_dir: &Path, name: &str) -> std::io::Result<Vec<String>> {
    Ok(status_xml(status_dir, name)?.map(|text| interfaces_in(&text)).unwrap_or_default())
}

/// The host PCI addresses (`0000:17:00.0`) of the devices passed through to `name`
/// (`<hostdev mode='subsystem' type='pci'>`), in document order, without duplicates. A missing
/// file yields none (the domain is not running); any other read error is returned.
pub fn domain_pci_hostdevs(status_dir: &Path, name: &str) -> std::io::Result<Vec<String>> {
    Ok(status_xml(status_dir, name)?.map(|text| pci_hostdevs_in(&text)).unwrap_or_default())
}

/// The name of the virtio-serial channel a guest's `kycd guest` writes to.
pub const TELEMETRY_CHANNEL: &str = "org.kycd.telemetry.0";

/// The host-side Unix socket of `name`'s `org.kycd.telemetry.0` channel
/// (`<channel type='unix'><source mode='bind' path='…'/><target type='virtio'
/// name='org.kycd.telemetry.0'/></channel>`; libvirt fills in the path of a channel defined
/// without one). `None` when the domain is not running or has no such channel; a read error
/// is returned.
pub fn domain_telemetry_channel(
    status_dir: &Path,
    name: &str,
) -> std::io::Result<Option<std::path::PathBuf>> {
    Ok(status_xml(status_dir, name)?.and_then(|text| telemetry_channel_in(&text)))
}

/// The bound socket path of the first unix channel with the telemetry target name.
fn telemetry_channel_in(xml: &str) -> Option<std::path::PathBuf> {
    let mut rest = xml;
    while let Some(i) = find_open_tag(rest, "channel") {
        let end = rest[i..].find("</channel>")?;
        let body = &rest[i..i + end];
        rest = &rest[i + end + "</channel>".len()..];
        let head = &body[..body.find('>').unwrap_or(body.len())];
        let tag =
            |name: &str| find_open_tag(body, name).and_then(|t| body[t..].find('>').map(|e| &body[t..t + e]));
        let (Some(source), Some(target)) = (tag("source"), tag("target")) else { continue };
        if attr(head, "type") != Some("unix")
            || attr(target, "type") != Some("virtio")
            || attr(target, "name") != Some(TELEMETRY_CHANNEL)
            || attr(source, "mode") != Some("bind")
        {
            continue;
        }
        let path = std::path::PathBuf::from(super::cgroup::unescape_xml(attr(source, "path")?));
        // libvirt writes absolute paths; anything else is not a socket it made.
        if path.is_absolute() && !path.components().any(|c| c == std::path::Component::ParentDir) {
            return Some(path);
        }
    }
    None
}

/// The status XML of domain `name`; `None` when it has none (not running) or the name could
/// not be a file name.
fn status_xml(status_dir: &Path, name: &str) -> std::io::Result<Option<String>> {
    if name.is_empty() || name.contains('/') {
        return Ok(None);
    }
    let mut text = String::new();
    let read = std::fs::File::open(status_dir.join(format!("{name}.xml")))
        .and_then(|f| f.take(MAX_STATUS_XML).read_to_string(&mut text));
    match read {
        Ok(_) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // Anything else says nothing about the domain: the caller keeps what it knew.
        Err(e) => Err(e),
    }
}

/// The `<source>` PCI addresses of the PCI host devices in `xml`.
fn pci_hostdevs_in(xml: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut rest = xml;
    while let Some(i) = find_open_tag(rest, "hostdev") {
        let Some(end) = rest[i..].find("</hostdev>") else { break };
        let body = &rest[i..i + end];
        let head = &body[..body.find('>').unwrap_or(body.len())];
        let is_pci = attr(head, "mode") == Some("subsystem") && attr(head, "type") == Some("pci");
        let address = body
            .find("<source")
            .and_then(|s| body[s..].find("</source>").map(|e| &body[s..s + e]))
            .and_then(|source| {
                let a = find_open_tag(source, "address")?;
                let tag = &source[a..a + source[a..].find('>')?];
                pci_address(
                    attr(tag, "domain")?,
                    attr(tag, "bus")?,
                    attr(tag, "slot")?,
                    attr(tag, "function")?,
                )
            });
        if let (true, Some(address)) = (is_pci, address) {
            if !found.contains(&address) {
                found.push(address);
            }
        }
        rest = &rest[i + end + "</hostdev>".len()..];
    }
    found
}

/// `0000:17:00.0` from libvirt's hex attributes (`0x0000`, `0x17`, `0x00`, `0x0`), or `None`
/// when one is not a number in range.
fn pci_address(domain: &str, bus: &str, slot: &str, function: &str) -> Option<String> {
    let hex = |v: &str, max: u32| {
        let digits = v.strip_prefix("0x").unwrap_or(v);
        u32::from_str_radix(digits, 16).ok().filter(|n| *n <= max)
    };
    Some(format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        hex(domain, 0xffff)?,
        hex(bus, 0xff)?,
        hex(slot, 0x1f)?,
        hex(function, 0x7)?
    ))
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
    attr(&body[t..t + body[t..].find('>')?], "dev")
}

/// The value of attribute `name` in a tag's text (`name='v'` or `name="v"`).
fn attr<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    let pattern = format!("{name}=");
    let mut from = 0;
    while let Some(i) = tag[from..].find(&pattern) {
        let at = from + i;
        // A whole attribute name: preceded by whitespace (so `dev=` does not match `xdev=`).
        if at > 0 && tag.as_bytes()[at - 1].is_ascii_whitespace() {
            let start = at + pattern.len();
            let quote = tag[start..].chars().next().filter(|q| *q == '\'' || *q == '"')?;
            let value = &tag[start + 1..];
            return Some(&value[..value.find(quote)?]);
        }
        from = at + pattern.len();
    }
    None
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
    fn reads_the_host_pci_addresses_of_passed_through_devices() {
        let xml = "<domstatus><domain><devices>\n\
            <hostdev mode='subsystem' type='pci' managed='yes'>\n  <driver name='vfio'/>\n\
              <source>\n    <address domain='0x0000' bus='0x17' slot='0x00' function='0x0'/>\n  </source>\n\
              <alias name='hostdev0'/>\n\
              <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>\n</hostdev>\n\
            <hostdev mode=\"subsystem\" type=\"pci\" managed=\"no\"><source>\
              <address domain=\"0x0001\" bus=\"0xb3\" slot=\"0x1f\" function=\"0x7\"/></source></hostdev>\n\
            <hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>\
              <address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>\n\
            <hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x100' slot='0x0' function='0x0'/></source></hostdev>\n\
            <hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x17' slot='0x00' function='0x0'/></source></hostdev>\n\
            </devices></domain></domstatus>";
        // The host address (in <source>), not the guest's; no mdev; out-of-range refused;
        // duplicates once.
        assert_eq!(pci_hostdevs_in(xml), ["0000:17:00.0", "0001:b3:1f.7"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gpu-vm.xml"), xml).unwrap();
        assert_eq!(domain_pci_hostdevs(dir.path(), "gpu-vm").unwrap(), ["0000:17:00.0", "0001:b3:1f.7"]);
        assert!(domain_pci_hostdevs(dir.path(), "absent").unwrap().is_empty());
        assert_eq!(attr("<x xdev='a' dev='b'", "dev"), Some("b"));
    }

    #[test]
    fn finds_the_telemetry_channel_socket() {
        let xml = "<domstatus><domain><devices>\n\
            <channel type='unix'>\n  <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm/org.qemu.guest_agent.0'/>\n\
              <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>\n</channel>\n\
            <channel type='pty'><target type='virtio' name='org.kycd.telemetry.0'/></channel>\n\
            <channel type='unix'><source mode='connect' path='/tmp/elsewhere'/><target type='virtio' name='org.kycd.telemetry.0'/></channel>\n\
            <channel type='unix'><source mode='bind' path='relative'/><target type='virtio' name='org.kycd.telemetry.0'/></channel>\n\
            <channel type='unix'>\n  <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm&amp;1/org.kycd.telemetry.0'/>\n\
              <target type='virtio' name='org.kycd.telemetry.0' state='disconnected'/>\n  <alias name='channel1'/>\n</channel>\n\
            </devices></domain></domstatus>";
        // Only a unix channel libvirt binds, with the telemetry name and an absolute path.
        assert_eq!(
            telemetry_channel_in(xml),
            Some("/var/lib/libvirt/qemu/channel/target/domain-3-vm&1/org.kycd.telemetry.0".into())
        );
        assert_eq!(telemetry_channel_in("<channel type='unix'><source mode='bind' path='/a/../b'/><target type='virtio' name='org.kycd.telemetry.0'/></channel>"), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.xml"), xml).unwrap();
        assert!(domain_telemetry_channel(dir.path(), "vm").unwrap().is_some());
        assert_eq!(domain_telemetry_channel(dir.path(), "absent").unwrap(), None);
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
