//! The agent's configuration: one typed struct, built from layers.
//!
//! Layers, later ones winning key by key: built-in defaults → the main file
//! (`/etc/kycd/kycd.toml` unless `--config`) → `conf.d/*.toml` beside it, in lexical order →
//! command-line flags. Each file is checked on its own first, so an unknown key or a wrong type
//! is reported with *that* file's name, line and column; then the files are merged as TOML
//! tables and the result is checked for consistency. Every path is configurable so tests run
//! in temporary directories; paths left unset are derived from `state_dir`.
//!
//! Nothing here reads the environment: the daemon and tests build a [`Config`] explicitly.
//!
//! Files: [`load`](mod@load) (the layers), `validate` (consistency of the merged result), and one file
//! per group of sections: [`collector`], [`enforcement`], [`gpu`], [`service`], [`trust`].

pub mod collector;
pub mod enforcement;
pub mod gpu;
pub mod load;
pub mod service;
pub mod trust;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use collector::{CollectorApiConfig, ReportingConfig};
pub use enforcement::{AuditConfig, EnforcementConfig, WorkloadConfig};
pub use gpu::GpuConfig;
pub use load::{conf_d_dir, load, Loaded, Overrides};
pub use service::{ApiConfig, LogConfig, LogFormat};
pub use trust::{AttestationConfig, PolicyConfig, TrustConfig, DEFAULT_EXPIRED_RETENTION_S};

/// Default location of the main configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kycd/kycd.toml";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid TOML, or has an unknown key or a wrongly typed value. The message
    /// names the line, column and key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// The merged configuration is inconsistent.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `workloads.roots`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Whether decisions are only recorded or also enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Record what would happen (audit log, reports); enforce nothing.
    #[default]
    Audit,
    /// Record, then enforce.
    Enforce,
}

/// The whole agent configuration. See `packaging/kycd.toml` for every key, documented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `audit` or `enforce`.
    pub mode: Mode,
    /// This host's id; absent: `/etc/machine-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Where the agent keeps its state (attestations, policy version, audit log, spool).
    pub state_dir: PathBuf,
    /// Seconds of clock skew tolerated when checking token times.
    pub clock_skew_s: u64,
    /// Logging.
    pub log: LogConfig,
    /// Trust anchors.
    pub trust: TrustConfig,
    /// The jurisdiction policy.
    pub policy: PolicyConfig,
    /// Where attestations come from.
    pub attestations: AttestationConfig,
    /// Workload discovery.
    pub workloads: WorkloadConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// The operator API (local socket).
    pub api: ApiConfig,
    /// Enforcement backends (used in `mode = "enforce"`).
    pub enforcement: EnforcementConfig,
    /// GPU sampling through NVML.
    pub gpu: GpuConfig,
    /// The collector-facing HTTPS API (host statements, metrics).
    pub collector_api: CollectorApiConfig,
    /// The usage spool and uploads to the collector.
    pub reporting: ReportingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Audit,
            host_id: None,
            state_dir: PathBuf::from("/var/lib/kycd"),
            clock_skew_s: kycd_protocol::DEFAULT_CLOCK_SKEW_S,
            log: LogConfig::default(),
            trust: TrustConfig::default(),
            policy: PolicyConfig::default(),
            attestations: AttestationConfig::default(),
            workloads: WorkloadConfig::default(),
            audit: AuditConfig::default(),
            api: ApiConfig::default(),
            enforcement: EnforcementConfig::default(),
            gpu: GpuConfig::default(),
            collector_api: CollectorApiConfig::default(),
            reporting: ReportingConfig::default(),
        }
    }
}

impl Config {
    /// Where attestations accepted at admission are kept (owned by kycd: deleting a file
    /// withdraws it; expired ones are moved to [`Config::expired_dir`]).
    pub fn admitted_dir(&self) -> PathBuf {
        self.state_dir.join("admitted")
    }

    /// Where expired admitted attestations are archived until
    /// `attestations.expired_retention_s` after their expiry; never read by intake.
    pub fn expired_dir(&self) -> PathBuf {
        self.state_dir.join("admitted-expired")
    }

    /// The drop directory for attestations.
    pub fn drop_dir(&self) -> PathBuf {
        self.attestations.drop_dir.clone().unwrap_or_else(|| self.state_dir.join("attestations"))
    }

    /// The audit log directory.
    pub fn audit_dir(&self) -> PathBuf {
        self.audit.dir.clone().unwrap_or_else(|| self.state_dir.join("audit"))
    }

    /// The effective configuration as TOML, derived paths filled in (for `check-config`).
    pub fn to_effective_toml(&self) -> String {
        let mut effective = self.clone();
        effective.attestations.drop_dir = Some(self.drop_dir());
        effective.audit.dir = Some(self.audit_dir());
        toml::to_string_pretty(&effective).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn empty_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "kycd.toml", "");
        let loaded = load(&main, &Overrides::default()).unwrap();
        assert_eq!(loaded.config, Config::default());
        assert_eq!(loaded.config.drop_dir(), Path::new("/var/lib/kycd/attestations"));
        assert_eq!(loaded.config.audit_dir(), Path::new("/var/lib/kycd/audit"));
    }

    #[test]
    fn layers_apply_in_order_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "kycd.toml",
            "mode = \"enforce\"\nstate_dir = \"/srv/kycd\"\n[log]\nformat = \"json\"\nlevel = \"debug\"\n",
        );
        write(dir.path(), "conf.d/20-later.toml", "[log]\nlevel = \"warn\"\n");
        write(
            dir.path(),
            "conf.d/10-first.toml",
            "[log]\nlevel = \"trace\"\n[workloads]\nroots = [\"a.slice\"]\n",
        );
        write(dir.path(), "conf.d/ignored.txt", "this is not toml");
        let loaded = load(&main, &Overrides { mode: Some(Mode::Audit), ..Default::default() }).unwrap();
        let c = &loaded.config;
        assert_eq!(c.mode, Mode::Audit, "flags win");
        assert_eq!(c.state_dir, Path::new("/srv/kycd"));
        assert_eq!(c.log.format, LogFormat::Json, "untouched keys of a merged table survive");
        assert_eq!(c.log.level, "warn", "conf.d files apply in lexical order");
        assert_eq!(c.workloads.roots, ["a.slice"]);
        assert_eq!(c.audit_dir(), Path::new("/srv/kycd/audit"), "derived paths follow state_dir");
        assert_eq!(loaded.sources.len(), 3);
    }

    #[test]
    fn unknown_keys_name_the_file_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "kycd.toml", "mode = \"audit\"\n");
        write(
            dir.path(),
            "conf.d/50-typo.toml",
            "# comment\n[trust]\nissuers = \"/x\"\nissuer_file = \"/y\"\n",
        );
        let err = load(&main, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("50-typo.toml"), "{err}");
        assert!(err.contains("issuer_file"), "{err}");
        assert!(err.contains("line 4"), "{err}");

        let main = write(dir.path(), "other/kycd.toml", "\n\nmodee = \"audit\"\n");
        let err = load(&main, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("modee") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_types_and_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in [
            ("mode = \"enforcing\"", "enforcing"),
            ("clock_skew_s = \"60\"", "clock_skew_s"),
            ("clock_skew_s = 7200", "clock_skew_s"),
            ("state_dir = \"relative/path\"", "state_dir"),
            ("[workloads]\nroots = [\"/abs\"]", "workloads.roots"),
            ("[workloads]\nroots = [\"a/../b\"]", "workloads.roots"),
            ("[attestations]\nmax_bytes = 10", "attestations.max_bytes"),
            ("host_id = \"has space\"", "host_id"),
            ("[reporting]\ncollector_url = \"ftp://x\"", "reporting.collector_url"),
            ("[reporting]\nbatch_max_records = 0", "reporting.batch_max_records"),
            ("[policy]\nfetch_url = \"ftp://x\"", "policy.fetch_url"),
            ("[policy]\nfetch_interval_s = 0", "policy.fetch_interval_s"),
            ("[collector_api]\nkeep_alive_s = 5", "collector_api.keep_alive_s"),
            ("[log]\nformat = \"xml\"", "xml"),
            ("not toml at all [", "TOML"),
        ] {
            let main = write(dir.path(), "kycd.toml", text);
            let err = load(&main, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let missing = dir.path().join("missing.toml");
        assert!(matches!(load(&missing, &Overrides::default()), Err(ConfigError::Io { .. })));
    }

    #[test]
    fn effective_toml_round_trips() {
        let c = Config { host_id: Some("node-1".into()), ..Config::default() };
        let text = c.to_effective_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.drop_dir(), c.drop_dir());
        assert_eq!(back.host_id.as_deref(), Some("node-1"));
        assert_eq!(back.mode, c.mode);
    }

    /// `packaging/kycd.toml` is the documented example: it must load, set every key the
    /// schema has (so the documentation is complete), and equal the defaults.
    #[test]
    fn packaged_example_is_valid_complete_and_default() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kycd.toml");
        let loaded = load(&example, &Overrides::default()).unwrap();
        let mut expected = Config::default();
        expected.attestations.drop_dir = Some(expected.drop_dir());
        expected.audit.dir = Some(expected.audit_dir());
        expected.workloads.cgroup_root = loaded.config.workloads.cgroup_root.clone();
        expected.host_id = loaded.config.host_id.clone();
        assert_eq!(loaded.config, expected);

        fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in table {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    toml::Value::Table(t) => keys(&path, t, out),
                    _ => out.push(path),
                }
            }
        }
        let text = fs::read_to_string(&example).unwrap();
        // Optional keys appear commented out (`# key = …`); uncomment them to list them.
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ")).unwrap_or(l))
            .fold(String::new(), |mut acc, l| {
                acc.push_str(l);
                acc.push('\n');
                acc
            });
        let mut documented = Vec::new();
        keys("", &toml::from_str(&uncommented).unwrap(), &mut documented);
        let mut all = Vec::new();
        let full = Config {
            host_id: Some("x".into()),
            workloads: WorkloadConfig { cgroup_root: Some("/x".into()), ..WorkloadConfig::default() },
            api: ApiConfig { socket_group: Some("kycd".into()), ..ApiConfig::default() },
            policy: PolicyConfig {
                fetch_url: Some("https://x".into()),
                fetch_ca_file: Some("/x".into()),
                ..PolicyConfig::default()
            },
            reporting: ReportingConfig {
                collector_url: Some("https://x".into()),
                ca_file: Some("/x".into()),
                ..ReportingConfig::default()
            },
            enforcement: EnforcementConfig {
                geo_cidr_file: Some("/x".into()),
                ..EnforcementConfig::default()
            },
            ..expected
        };
        keys("", &toml::Table::try_from(&full).unwrap(), &mut all);
        for key in &all {
            assert!(documented.contains(key), "packaging/kycd.toml does not document {key}");
        }
    }
}
