//! The fake `libnvidia-ml.so` (`tests/fake-nvml`) as a test fixture: built once per test
//! process, copied with its own `scenario.json` (and a fake `/proc` tree for attribution) into
//! a temporary directory per test. Separate files are separate `dlopen`s, so tests running in
//! parallel do not share the fake's state, and no environment variable is set.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Path of the fake library, built on first use with `cargo build -p kycd-fake-nvml` (a
/// cdylib member is not built by `cargo test` itself), in the calling test's profile.
pub fn library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        // target/<profile>/deps/<this test> → target/<profile>/
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "kycd-fake-nvml"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).status().unwrap();
        assert!(status.success(), "cargo build -p kycd-fake-nvml failed");
        let lib = profile_dir.join("libkycd_fake_nvml.so");
        assert!(lib.exists(), "{} missing after build", lib.display());
        lib
    })
}

/// A directory holding a private copy of the fake library, its scenario and a fake `/proc`.
#[derive(Debug)]
pub struct FakeNvml {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl FakeNvml {
    /// A copy of the library serving `scenario` (its `state_file`, when present, is pointed
    /// into the directory).
    pub fn new(mut scenario: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if scenario.get("state_file").is_some() {
            scenario["state_file"] = serde_json::json!(dir.path().join("modes.json"));
        }
        std::fs::copy(library(), dir.path().join("libnvidia-ml.so.1")).unwrap();
        std::fs::write(dir.path().join("scenario.json"), scenario.to_string()).unwrap();
        std::fs::create_dir(dir.path().join("proc")).unwrap();
        FakeNvml { dir }
    }

    /// The library to load (`gpu.nvml_library`).
    pub fn library(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// The fake `/proc` root.
    pub fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    /// Puts `pid` into cgroup `path` in the fake `/proc`.
    pub fn process(&self, pid: u32, cgroup: &str) {
        let d = self.proc_root().join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
    }
}
