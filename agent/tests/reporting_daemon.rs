//! The real `kycd` binary and its host key: created 0600 on first start with reporting
//! configured, and an unsafe key file stops the agent from starting, naming path and mode.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kycd_test_support::host as host_support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use host_support::Host;

#[test]
fn creates_the_host_key_and_refuses_an_unsafe_one() {
    // Port 9 (discard) on loopback: uploads fail and are retried; the agent runs on.
    let mut host = Host::new("[reporting]\ncollector_url = \"http://127.0.0.1:9\"\ngroup_commit_ms = 0\n");
    host.start();
    let key = host.path("state/host.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(host.path("state/spool").is_dir());
    let log = host.log();
    assert!(log.contains("spool opened") && log.contains("uploading usage reports"), "{log}");
    let first = std::fs::read(&key).unwrap();
    host.stop();
    host.start();
    assert_eq!(std::fs::read(&key).unwrap(), first, "never overwritten");
    host.stop();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kycd"))
        .args(["run", "--config"])
        .arg(host.path("etc/kycd.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = kycd_protocol::clock::monotonic() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if kycd_protocol::clock::monotonic() > deadline {
            let _ = child.kill();
            panic!("kycd started with a group-readable host key");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains(key.to_str().unwrap()) && err.contains("0640"), "{err}");
    assert!(!host.path("run/kycd.sock").exists(), "no socket: the agent did not start");
}
