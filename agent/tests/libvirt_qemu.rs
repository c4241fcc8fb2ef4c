//! End-to-end with real libvirt and QEMU (TCG: no KVM needed): the packaged qemu hook
//! (`packaging/libvirt/qemu`) in front of a libvirtd this test starts, and the real `kycd`
//! enforcing on the domain libvirt runs.
//!
//! - A domain whose tenant is prohibited does not start: `virsh start` fails with the reason.
//! - An allowed domain starts and is discovered as `libvirt_domain:NAME` with the cgroup
//!   libvirt made for it. Without systemd that is `machine/qemu-N-NAME.libvirt-qemu` (with
//!   systemd it would be a `machine.slice` scope, which the other tests cover).
//! - A policy prohibiting its tenant freezes that cgroup and puts its tap into the `ifaces`
//!   set; a policy lifting it thaws the domain and takes the tap out again.
//! - libvirt made the socket of its `org.kycd.telemetry.0` channel.
//!
//! libvirtd runs in a private network namespace, so its taps and the agent's nftables table
//! live there and the host's ruleset is never touched; it also runs in a private mount
//! namespace where `/dev/kvm` is `/dev/null` (see [`Libvirtd::start`]). The hook and its
//! settings go to `/etc/libvirt/hooks/qemu.d/kycd` and `/etc/default/kycd-hook` for the run
//! (libvirtd reads the hook directory when it starts) and are removed (or restored) after it.
//! Every guard removes what it made also when the test fails.
//!
//! Needs root, libvirtd, virtlogd, virsh, qemu-system-x86_64 and nft (`tests/run` installs
//! Debian's libvirt-daemon-system and qemu-system-x86); skips loudly otherwise. It also
//! refuses to run beside a libvirtd it did not start: that one would not run the test's hook.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kycd_test_support::host::{now, package_bin, Host};
use kycd_test_support::netns::{cgroup2_mount, events, have, nft_capable, skip, Netns};
use serde_json::{json, Value};

const URI: &str = "qemu:///system";
const LIBVIRTD_SOCKET: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCKET: &str = "/run/libvirt/virtlogd-sock";
const STATUS_DIR: &str = "/run/libvirt/qemu";
const HOOK: &str = "/etc/libvirt/hooks/qemu.d/kycd";
const HOOK_SETTINGS: &str = "/etc/default/kycd-hook";
const TELEMETRY_CHANNEL: &str = "org.kycd.telemetry.0";

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh").args(["-c", URI]).args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Polls `ok` every 50 ms for up to `secs` seconds; on timeout fails with `context()`.
fn eventually(what: &str, secs: u64, context: impl Fn() -> String, mut ok: impl FnMut() -> bool) {
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(secs);
    while !ok() {
        assert!(kycd_protocol::clock::monotonic() < deadline, "timed out: {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file put in place for the test; on drop the file that was there before (or none) is
/// back, and a directory made for it is removed again.
struct Installed {
    path: PathBuf,
    before: Option<(Vec<u8>, fs::Permissions)>,
    made_dir: Option<PathBuf>,
}

impl Installed {
    fn new(path: &str, contents: &[u8], mode: u32) -> Self {
        let path = PathBuf::from(path);
        let before = fs::read(&path).ok().map(|b| (b, fs::metadata(&path).unwrap().permissions()));
        let parent = path.parent().unwrap();
        let made_dir = (!parent.exists()).then(|| parent.to_owned());
        fs::create_dir_all(parent).unwrap();
        let guard = Installed { path, before, made_dir };
        fs::write(&guard.path, contents).unwrap();
        fs::set_permissions(&guard.path, fs::Permissions::from_mode(mode)).unwrap();
        guard
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match self.before.take() {
            Some((bytes, perms)) => {
                let _ = fs::write(&self.path, bytes);
                let _ = fs::set_permissions(&self.path, perms);
            }
            None => {
                let _ = fs::remove_file(&self.path);
            }
        }
        if let Some(dir) = &self.made_dir {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// libvirtd (and virtlogd, unless one runs already) started by this test, in the foreground
/// as children, stopped on drop.
struct Libvirtd {
    libvirtd: Child,
    virtlogd: Option<Child>,
    log: PathBuf,
}

impl Libvirtd {
    /// Starts virtlogd and libvirtd; libvirtd in network namespace `netns` and a private
    /// mount namespace where `/dev/kvm`, if present, is a null device only root may open.
    /// Why: where `/dev/kvm` exists but only root may open it (no udev to give it to group
    /// kvm), libvirt 9 finds KVM when probing QEMU but not for the `libvirt-qemu` user that
    /// runs domains, throws its capability cache away on every lookup and re-probes QEMU
    /// about a dozen times per domain start (~50 s). With KVM unusable both ways the cache
    /// stays valid: one probe on a fresh machine (~3 s), none after. The domains here are
    /// TCG (`type='qemu'`) anyway.
    ///
    /// `dir` (removed after libvirtd stops) holds its log and the stand-in for `/dev/kvm`.
    fn start(netns: &Netns, dir: &Path) -> Self {
        let virtlogd = (!connectable(VIRTLOGD_SOCKET)).then(|| {
            let child = Command::new("virtlogd").stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            eventually("virtlogd socket", 10, String::new, || connectable(VIRTLOGD_SOCKET));
            child
        });
        // A null device node that stays linked while libvirtd runs: libvirt moves the mounts
        // under /dev into each domain's private /dev, which fails for a plain file or an
        // unlinked one.
        let script = "if [ -e /dev/kvm ]; then mknod -m 0600 \"$1\" c 1 3 && mount --bind \"$1\" /dev/kvm \
                      || exit 1; fi; exec nsenter --net=\"$0\" libvirtd";
        let no_kvm = dir.join("no-kvm");
        let out = fs::File::create(dir.join("libvirtd.log")).unwrap();
        // unshare and nsenter exec: the child is libvirtd itself.
        let libvirtd = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "--", "sh", "-c", script, &netns.path()])
            .arg(&no_kvm)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut daemons = Libvirtd { libvirtd, virtlogd, log: dir.join("libvirtd.log") };
        let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(30);
        while !virsh(&["version"]).status.success() {
            let exited = daemons.libvirtd.try_wait().unwrap();
            let late = kycd_protocol::clock::monotonic() > deadline;
            assert!(exited.is_none() && !late, "libvirtd not up ({exited:?}):\n{}", daemons.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        // Never libvirt's NAT network: the domains here have plain taps only.
        if text(&virsh(&["net-list", "--name"])).lines().any(|l| l.trim() == "default") {
            virsh(&["net-destroy", "default"]);
        }
        daemons
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(10);
    while kycd_protocol::clock::monotonic() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        stop(&mut self.libvirtd);
        if let Some(virtlogd) = &mut self.virtlogd {
            stop(virtlogd);
        }
    }
}

fn connectable(socket: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// Domains this test defined: thawed, destroyed and undefined on drop.
#[derive(Default)]
struct Domains {
    names: Vec<String>,
}

impl Domains {
    fn define(&mut self, name: &str, xml: &str, dir: &Path) {
        let file = dir.join(format!("{name}.xml"));
        fs::write(&file, xml).unwrap();
        self.names.push(name.to_owned());
        let out = virsh(&["define", file.to_str().unwrap()]);
        assert!(out.status.success(), "virsh define {name}: {}", text(&out));
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for name in &self.names {
            // A domain the agent froze dies only slowly on SIGTERM: thaw it first.
            if let Some(cgroup) = domain_cgroup(name) {
                let _ = fs::write(cgroup.join("cgroup.freeze"), "0");
            }
            let _ = virsh(&["destroy", name]);
            let _ = virsh(&["undefine", name]);
        }
    }
}

/// The running domain's number, from its status XML (`<domain … id='N'>`).
fn domain_number(name: &str) -> Option<u32> {
    let xml = fs::read_to_string(Path::new(STATUS_DIR).join(format!("{name}.xml"))).ok()?;
    let tag = &xml[xml.find("<domain ")?..];
    let at = tag[..tag.find('>')?].find(" id='")? + " id='".len();
    tag[at..].split('\'').next()?.parse().ok()
}

/// The cgroup libvirt made for a running domain, if it is the layout of a host without
/// systemd: `<cgroup2>/machine/qemu-N-NAME.libvirt-qemu`.
fn domain_cgroup(name: &str) -> Option<PathBuf> {
    let path = cgroup2_mount()?.join(format!("machine/qemu-{}-{name}.libvirt-qemu", domain_number(name)?));
    path.is_dir().then_some(path)
}

/// The `path` of the `<source mode='bind' …/>` of the unix channel named `channel` in a
/// status XML.
fn channel_socket(status_xml: &str, channel: &str) -> Option<PathBuf> {
    status_xml.split("<channel ").skip(1).find_map(|rest| {
        let element = &rest[..rest.find("</channel>")?];
        if !element.contains(&format!("name='{channel}'")) {
            return None;
        }
        let source = &element[element.find("<source ")?..];
        let at = source.find("path='")? + "path='".len();
        Some(PathBuf::from(source[at..].split('\'').next()?))
    })
}

fn domain_xml(name: &str, attestation: &str, devices: &str) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <metadata>\n    \
         <kycd:attestation xmlns:kycd=\"https://kycd.dev/xmlns/attestation/1\">{attestation}</kycd:attestation>\n  \
         </metadata>\n  <devices>\n{devices}    <video><model type='none'/></video>\n    \
         <memballoon model='none'/>\n  </devices>\n</domain>\n"
    )
}

/// Whether `tap` is an element of the agent's `ifaces` set in `netns`.
fn tap_blocked(netns: &Netns, tap: &str) -> bool {
    netns.exec(&["nft", "list", "set", "inet", "kycd", "ifaces"]).contains(&format!("\"{tap}\""))
}

/// The agent's workload row for `workload` (`kycctl workloads --json`).
fn workload_row(host: &Host, workload: &str) -> Option<Value> {
    let out = Command::new(package_bin("kycctl"))
        .args(["workloads", "--json", "--socket"])
        .arg(host.path("run/kycd.sock"))
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout).ok()?;
    rows.as_array()?.iter().find(|r| r["workload"] == workload).cloned()
}

/// `kycctl status` of the test's agent.
fn kycctl_status(host: &Host) -> String {
    let out = Command::new(package_bin("kycctl"))
        .args(["status", "--socket"])
        .arg(host.path("run/kycd.sock"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why this test cannot run here, if it cannot.
fn missing_capability() -> Option<String> {
    if let Err(why) = nft_capable() {
        return Some(why);
    }
    for program in ["virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "mount"] {
        if !have(program) {
            return Some(format!("{program} not found (Debian: libvirt-daemon-system, qemu-system-x86)"));
        }
    }
    if cgroup2_mount().is_none() {
        return Some("no cgroup2 mount".into());
    }
    if Path::new("/run/systemd/system").exists() {
        // libvirtd would register its domains with systemd-machined: a machine.slice scope.
        return Some("systemd runs this host: the test checks libvirt's cgroups without systemd".into());
    }
    if connectable(LIBVIRTD_SOCKET) {
        return Some("a libvirtd runs already; the test starts its own (hooks are read at start)".into());
    }
    None
}

#[test]
fn the_qemu_hook_refuses_prohibited_tenants_and_kycd_enforces_on_running_domains() {
    let test = "the_qemu_hook_refuses_prohibited_tenants_and_kycd_enforces_on_running_domains";
    if let Some(why) = missing_capability() {
        skip(&format!("{test}: {why}"));
        return;
    }
    let mount = cgroup2_mount().unwrap();
    let netns = Netns::new().unwrap();
    let nft: Vec<String> = netns.nft_command().iter().map(|a| format!("{a:?}")).collect();
    let mut host = Host::new("");
    host.extra_config = format!(
        "mode = \"enforce\"\n[workloads]\ncgroup_root = \"{mount}\"\nroots = [\"machine\"]\n\
         libvirt_status_dir = \"{STATUS_DIR}\"\nrescan_interval_s = 1\n\
         [enforcement]\nreconcile_interval_s = 1\nnft_command = [{nft}]\n",
        mount = mount.display(),
        nft = nft.join(", ")
    );
    host.write_config();
    // v1: KP prohibited; unattested workloads allowed (other cgroups under machine/ are
    // never touched).
    host.write_policy_with(1, &["KP"], json!({"action": "allow"}));
    host.start();
    host.wait_for("policy v1", |r| r["event"]["type"] == "policy_applied");

    let settings = format!(
        "KYCCTL={}\nKYCD_SOCKET={}\nKYCD_ADMIT_TIMEOUT=5s\n",
        package_bin("kycctl").display(),
        host.path("run/kycd.sock").display()
    );
    let hook = fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/libvirt/qemu")).unwrap();
    // Field order is drop order: domains go before libvirtd stops, the hook after.
    struct Rig {
        domains: Domains,
        libvirtd: Libvirtd,
        _hook: Installed,
        _settings: Installed,
    }
    let _settings = Installed::new(HOOK_SETTINGS, settings.as_bytes(), 0o644);
    let _hook = Installed::new(HOOK, &hook, 0o755);
    let libvirtd = Libvirtd::start(&netns, host.dir.path());
    let mut rig = Rig { domains: Domains::default(), libvirtd, _hook, _settings };
    let context = |rig: &Rig| format!("kycd log:\n{}\nlibvirtd log:\n{}", host.log(), rig.libvirtd.log());

    // A: its tenant is in KP. The hook asks the agent at "prepare": the start fails, and
    // virsh says why.
    let pid = std::process::id();
    let a = format!("kycd-e2e-a-{pid}");
    let a_att = host.attestation(&a, "KP", now() + 3600);
    rig.domains.define(&a, &domain_xml(&a, &a_att, ""), &host.path(""));
    let out = virsh(&["start", &a]);
    assert!(!out.status.success(), "a prohibited tenant's domain started:\n{}", context(&rig));
    let err = text(&out);
    assert!(err.contains("measure_prohibit") && err.contains("m-kp"), "virsh start {a}: {err}");
    let decision = host.latest_decision(&format!("libvirt_domain:{a}")).unwrap();
    assert_eq!(decision["event"]["decision"]["verdict"], "deny");
    assert!(!text(&virsh(&["domstate", &a])).contains("running"));

    // B: allowed (DE), with a tap and the telemetry channel.
    let b = format!("kycd-e2e-b-{pid}");
    let b_id = format!("libvirt_domain:{b}");
    let tap = format!("kycdtap{pid}");
    let devices = format!(
        "    <interface type='ethernet'>\n      <target dev='{tap}' managed='yes'/>\n      \
         <model type='virtio'/>\n      <rom enabled='no'/>\n    </interface>\n    \
         <channel type='unix'>\n      <target type='virtio' name='{TELEMETRY_CHANNEL}'/>\n    </channel>\n"
    );
    let b_att = host.attestation(&b, "DE", now() + 3600);
    rig.domains.define(&b, &domain_xml(&b, &b_att, &devices), &host.path(""));
    let out = virsh(&["start", &b]);
    assert!(out.status.success(), "virsh start {b}: {}\n{}", text(&out), context(&rig));
    assert!(text(&virsh(&["domstate", &b])).contains("running"));
    let number = domain_number(&b).expect("status XML with the domain's id");
    let cgroup = mount.join(format!("machine/qemu-{number}-{b}.libvirt-qemu"));
    assert!(cgroup.is_dir(), "libvirt without systemd makes {}", cgroup.display());
    // The tap is in the test's namespace, not the host's.
    assert!(netns.exec_status(&["ip", "link", "show", &tap]));
    assert!(!Command::new("ip").args(["link", "show", &tap]).output().unwrap().status.success());

    // Discovered under its own name, with libvirt's cgroup, and allowed by its attestation.
    let cgroup_text = cgroup.display().to_string();
    eventually(
        "B discovered",
        15,
        || context(&rig),
        || workload_row(&host, &b_id).is_some_and(|r| r["cgroup"] == cgroup_text.as_str()),
    );
    let row = workload_row(&host, &b_id).unwrap();
    assert_eq!(row["decision"]["verdict"], "allow", "{row}");
    let decision = host.latest_decision(&b_id).unwrap();
    assert_eq!(decision["event"]["decision"]["verdict"], "allow");
    assert!(decision["event"]["attestation_digest"].is_string(), "{decision}");
    assert!(events(&cgroup).contains("frozen 0"));
    assert!(!tap_blocked(&netns, &tap));

    // The channel libvirt made for the agent's telemetry: a listening socket on the host side.
    let status = fs::read_to_string(Path::new(STATUS_DIR).join(format!("{b}.xml"))).unwrap();
    let channel = channel_socket(&status, TELEMETRY_CHANNEL).expect("a unix channel with a bind source");
    let kind = fs::metadata(&channel).map(|m| m.file_type().is_socket());
    assert!(matches!(kind, Ok(true)), "{}: {kind:?}", channel.display());
    // The agent finds that socket in B's live XML and connects to it (B holds no GPU, so
    // whatever its guest reported would be refused; its guest sits in the firmware and says
    // nothing: the read path with a guest that talks is the fleet test's,
    // collector/tests/vm_fleet.rs, where the real `kycd guest` writes through such a socket).
    let line = format!("guest telemetry: {b} no_gpus, channel connected, 0/0 GPUs reporting");
    eventually(
        "the agent connected to B's telemetry channel",
        15,
        || context(&rig),
        || kycctl_status(&host).contains(&line),
    );
    // QEMU's end shows the agent's connection: the socket has a connected peer. (The kernel
    // makes the accepted end of a Unix connection in the connecting side's network namespace,
    // the agent's, not in QEMU's.)
    let ss = Command::new("ss").args(["-x", "-a"]).output().unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(
        ss.lines().any(|l| l.contains("ESTAB") && l.contains(&*channel.to_string_lossy())),
        "no established connection on {}:\n{ss}\n{}",
        channel.display(),
        context(&rig)
    );

    // v2: DE prohibited too. The agent freezes B's cgroup (libvirt's children with it) and
    // drops its tap's traffic.
    host.write_policy_with(2, &["KP", "DE"], json!({"action": "allow"}));
    host.wait_for_verdict(&b_id, "deny");
    eventually("B frozen", 15, || context(&rig), || events(&cgroup).lines().any(|l| l == "frozen 1"));
    eventually("B's tap blocked", 15, || context(&rig), || tap_blocked(&netns, &tap));
    for child in fs::read_dir(&cgroup).unwrap().flatten().filter(|e| e.path().is_dir()) {
        assert!(events(&child.path()).contains("frozen 1"), "{} not frozen", child.path().display());
    }
    // libvirt does not know (a freeze is not a pause), so it cannot lift it either.
    assert!(text(&virsh(&["domstate", &b])).contains("running"));

    // v3: lifted. Thawed, tap released.
    host.write_policy_with(3, &["KP"], json!({"action": "allow"}));
    host.wait_for_verdict(&b_id, "allow");
    eventually("B thawed", 15, || context(&rig), || events(&cgroup).lines().any(|l| l == "frozen 0"));
    eventually("B's tap released", 15, || context(&rig), || !tap_blocked(&netns, &tap));
    assert!(text(&virsh(&["domstate", &b])).contains("running"));

    drop(rig);
    host.stop();
}
