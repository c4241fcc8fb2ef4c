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

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default location of the main configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kycd/kycd.toml";
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
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

/// `[collector_api]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorApiConfig {
    /// Serve it.
    pub enabled: bool,
    /// `IP:PORT`.
    pub listen: String,
    /// Server certificate chain (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA whose client certificates are accepted (mTLS); absent: no client certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// A file holding the bearer token collectors must present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// Serve plain HTTP (loopback addresses only).
    pub insecure_plaintext: bool,
    /// Most connections open at once; more are refused (closed at once).
    pub max_connections: usize,
    /// Most connections open at once from one IP address; more from it are refused.
    pub max_connections_per_ip: usize,
}

impl CollectorApiConfig {
    /// The listener's bounds, for [`kycd_net::serve`].
    pub fn limits(&self) -> kycd_net::Limits {
        kycd_net::Limits {
            max_connections: self.max_connections,
            max_per_peer: self.max_connections_per_ip,
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl Default for CollectorApiConfig {
    fn default() -> Self {
        CollectorApiConfig {
            enabled: false,
            listen: "[::]:9477".into(),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            bearer_token_file: None,
            insecure_plaintext: false,
            max_connections: 512,
            max_connections_per_ip: 128,
        }
    }
}

/// `[reporting]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportingConfig {
    /// Collector base URL (`https://collector:9478`); reports go to `{url}/v1/reports`.
    /// Absent: nothing is uploaded, but windows are still spooled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector_url: Option<String>,
    /// PEM CA certificate(s) trusted for the collector in addition to the system store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Group commit: the first window of a batch waits at most this long for others before
    /// the batch is written and fsync'd (0: commit what is queued at once).
    pub group_commit_ms: u64,
    /// A spool segment is sealed at this size.
    pub segment_max_bytes: u64,
    /// Cap on the spool; near it the oldest windows are merged per (tenant, workload).
    pub spool_max_bytes: u64,
    /// Most records per upload.
    pub batch_max_records: usize,
    /// Upload at least this often (seconds) while records are pending.
    pub batch_max_s: u64,
    /// Cap of the exponential retry backoff (seconds; base 1 s, full jitter).
    pub backoff_max_s: u64,
    /// TCP/TLS connect timeout (seconds).
    pub connect_timeout_s: u64,
    /// Whole-request timeout (seconds).
    pub request_timeout_s: u64,
}

impl Default for ReportingConfig {
    fn default() -> Self {
        ReportingConfig {
            collector_url: None,
            ca_file: None,
            group_commit_ms: 100,
            segment_max_bytes: 4 << 20,
            spool_max_bytes: 256 << 20,
            batch_max_records: 1000,
            batch_max_s: 10,
            backoff_max_s: 300,
            connect_timeout_s: 10,
            request_timeout_s: 60,
        }
    }
}

/// `[gpu]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Sample GPUs (and, in enforce mode, set compute modes). A host without NVML runs on,
    /// reporting the GPU backend unavailable.
    pub enabled: bool,
    /// `libnvidia-ml.so`: a bare name (searched like dlopen does) or a path.
    pub nvml_library: PathBuf,
    /// Replay this recorded trace (`kycctl gpu record`) in a loop instead of reading NVML:
    /// for demos and tests on machines without GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_trace: Option<PathBuf>,
    /// Milliseconds between samples.
    pub interval_ms: u64,
    /// Seconds per usage window.
    pub window_s: u64,
    /// A CSV laid over the built-in peak-FLOP/s table (same columns as
    /// `agent/data/gpu-peak-flops.csv`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops_file: Option<PathBuf>,
    /// `training_like`: at least this many GPUs …
    pub training_min_gpus: u32,
    /// … each at least this busy (percent) …
    pub training_min_activity_pct: u32,
    /// … for at least this many minutes.
    pub training_min_minutes: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            nvml_library: PathBuf::from(crate::gpu::nvml::DEFAULT_LIBRARY),
            replay_trace: None,
            interval_ms: 1000,
            window_s: 60,
            peak_flops_file: None,
            training_min_gpus: 8,
            training_min_activity_pct: 50,
            training_min_minutes: 10,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The operators' Unix socket (HTTP/1.1 JSON). Mutations (admit) are for root only.
    pub socket: PathBuf,
    /// A group given read access to the socket (mode 0660); absent: root only (0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Most connections open on the socket at once; more are refused (closed at once). Keep it
    /// well below the process's file-descriptor limit (`LimitNOFILE=` in kycd.service).
    pub max_connections: usize,
    /// Most connections open at once from one user (uid) other than root; more from that user
    /// are refused, so one member of `socket_group` cannot lock out the others or root.
    pub max_connections_per_user: usize,
    /// Seconds a connection may take to send a complete request head (also the longest an
    /// idle keep-alive connection stays open).
    pub header_read_timeout_s: u64,
    /// Seconds without a byte moving on a connection (a stalled body, an unread answer)
    /// before it is closed. Longer than the 10 s a request waits for the agent.
    pub idle_timeout_s: u64,
}

impl ApiConfig {
    /// The socket's bounds, for [`kycd_net::serve`].
    pub fn limits(&self) -> kycd_net::Limits {
        kycd_net::Limits {
            max_connections: self.max_connections,
            max_per_peer: self.max_connections_per_user,
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_s),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
        }
    }
}

/// `[enforcement]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnforcementConfig {
    /// Seconds between reconciliations of the host's actual state with the decisions (a
    /// decision change reconciles at once). Drift (a thawed cgroup, a deleted rule) is
    /// repaired within one interval.
    pub reconcile_interval_s: u64,
    /// Freeze (or kill) denied workloads' cgroups.
    pub cgroup: bool,
    /// Block denied workloads' network traffic in nftables table `inet kycd`.
    pub nftables: bool,
    /// The command that runs `nft` (arguments allowed, e.g. to enter a network namespace).
    pub nft_command: Vec<String>,
    /// A per-country CIDR list (`CC CIDR` per line). When set, traffic from and to the
    /// countries named by prohibiting measures in effect is dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geo_cidr_file: Option<PathBuf>,
    /// On stop, lift every block kycd imposed (default: blocks stay — fail closed).
    pub release_on_exit: bool,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `kycd=debug,info`.
    pub level: String,
}

/// `[trust]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    /// JWKS of the KYC service keys that sign attestations.
    pub issuers: PathBuf,
    /// JWKS of the policy authority keys that sign the policy.
    pub policy: PathBuf,
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The signed policy file.
    pub file: PathBuf,
    /// Where to fetch the published policy (the collector's `GET /v1/policy`, full URL);
    /// absent: no fetching. A fetched policy goes through the same verification and
    /// anti-rollback as the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_url: Option<String>,
    /// Seconds between fetches (each jittered by ±10 %, so a fleet does not fetch in step).
    pub fetch_interval_s: u64,
    /// PEM CA certificate(s) trusted for `fetch_url` besides the system trust store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_ca_file: Option<PathBuf>,
    /// Whole-request timeout of a fetch (seconds; the connect timeout is the smaller of this
    /// and 10 s).
    pub fetch_timeout_s: u64,
}

/// `[attestations]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestationConfig {
    /// Drop directory watched for `*.jws`; absent: `<state_dir>/attestations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_dir: Option<PathBuf>,
    /// The host attestation written by cloud-init.
    pub host_attestation: PathBuf,
    /// cloud-init's instance data, for checking a host attestation's `host_id`.
    pub cloud_init_instance_data: PathBuf,
    /// Largest attestation accepted, bytes.
    pub max_bytes: usize,
}

/// `[workloads]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The cgroup v2 mount; absent: found in `/proc/self/mountinfo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
    /// Cgroups under these (relative to the cgroup root) are workloads.
    pub roots: Vec<String>,
    /// Seconds between rescans of the cgroup tree (inotify catches most changes sooner).
    pub rescan_interval_s: u64,
    /// libvirt's status directory (`NAME.xml` per running domain), read to map domain
    /// UUIDs in attestation bindings to the domain names in cgroup scope names.
    pub libvirt_status_dir: PathBuf,
    /// How long a vanished workload's first-seen time is kept. A workload that comes back
    /// within this time (a VM restarted) continues its grace period instead of starting a
    /// new one.
    pub forget_after_s: u64,
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Audit log directory; absent: `<state_dir>/audit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Rotate a segment when it would exceed this size.
    pub max_file_bytes: u64,
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

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            issuers: PathBuf::from("/etc/kycd/trust/issuers.jwks"),
            policy: PathBuf::from("/etc/kycd/trust/policy.jwks"),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: PathBuf::from("/etc/kycd/policy.jws"),
            fetch_url: None,
            fetch_interval_s: 300,
            fetch_ca_file: None,
            fetch_timeout_s: 30,
        }
    }
}

impl Default for AttestationConfig {
    fn default() -> Self {
        AttestationConfig {
            drop_dir: None,
            host_attestation: PathBuf::from("/etc/kycd/attestations/host.jws"),
            cloud_init_instance_data: PathBuf::from("/run/cloud-init/instance-data.json"),
            max_bytes: kycd_protocol::DEFAULT_MAX_TOKEN_BYTES,
        }
    }
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            cgroup_root: None,
            roots: vec!["machine.slice".into(), "kubepods.slice".into(), "slurmstepd.scope".into()],
            rescan_interval_s: 5,
            libvirt_status_dir: PathBuf::from("/run/libvirt/qemu"),
            forget_after_s: 30 * 24 * 3600,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from("/run/kycd/kycd.sock"),
            socket_group: None,
            max_connections: 64,
            max_connections_per_user: 16,
            header_read_timeout_s: 10,
            idle_timeout_s: 30,
        }
    }
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        EnforcementConfig {
            reconcile_interval_s: 5,
            cgroup: true,
            nftables: true,
            nft_command: vec!["nft".into()],
            geo_cidr_file: None,
            release_on_exit: false,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { dir: None, max_file_bytes: 64 << 20 }
    }
}

/// Command-line overrides: the last layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--mode`.
    pub mode: Option<Mode>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--release-on-exit`.
    pub release_on_exit: bool,
}

/// A loaded configuration and the files it came from, in order.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// Files read, in layer order.
    pub sources: Vec<PathBuf>,
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let io = |source| ConfigError::Io { path: path.to_owned(), source };
    let mut text = String::new();
    fs::File::open(path).map_err(io)?.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse { path: path.to_owned(), message: "larger than 1 MiB".into() });
    }
    Ok(text)
}

/// Parses one layer: checked against the schema on its own (so errors carry this file's
/// line numbers), and returned as a table for merging.
fn parse_layer(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = read_file(path)?;
    let parse_err = |e: toml::de::Error| ConfigError::Parse { path: path.to_owned(), message: e.to_string() };
    toml::from_str::<Config>(&text).map_err(parse_err)?;
    toml::from_str::<toml::Table>(&text).map_err(parse_err)
}

/// Recursively overlays `top` on `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The `conf.d` directory that belongs to a main config file.
pub fn conf_d_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new("/")).join("conf.d")
}

/// Loads the layered configuration rooted at `main` and applies `overrides`.
pub fn load(main: &Path, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    let mut sources = vec![main.to_owned()];
    let mut merged = parse_layer(main)?;
    let conf_d = conf_d_dir(main);
    match fs::read_dir(&conf_d) {
        Ok(entries) => {
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            for file in files {
                merge(&mut merged, parse_layer(&file)?);
                sources.push(file);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::Io { path: conf_d, source }),
    }
    let mut config: Config = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse { path: main.to_owned(), message: e.to_string() })?;
    if let Some(mode) = overrides.mode {
        config.mode = mode;
    }
    if let Some(dir) = &overrides.state_dir {
        config.state_dir = dir.clone();
    }
    if let Some(format) = overrides.log_format {
        config.log.format = format;
    }
    config.enforcement.release_on_exit |= overrides.release_on_exit;
    config.validate()?;
    Ok(Loaded { config, sources })
}

impl Config {
    /// Consistency checks on the merged configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.to_owned() });
        let absolute: [(&'static str, Option<&Path>); 19] = [
            ("collector_api.cert_file", self.collector_api.cert_file.as_deref()),
            ("collector_api.key_file", self.collector_api.key_file.as_deref()),
            ("collector_api.client_ca_file", self.collector_api.client_ca_file.as_deref()),
            ("collector_api.bearer_token_file", self.collector_api.bearer_token_file.as_deref()),
            ("gpu.replay_trace", self.gpu.replay_trace.as_deref()),
            ("reporting.ca_file", self.reporting.ca_file.as_deref()),
            ("gpu.peak_flops_file", self.gpu.peak_flops_file.as_deref()),
            ("api.socket", Some(&self.api.socket)),
            ("enforcement.geo_cidr_file", self.enforcement.geo_cidr_file.as_deref()),
            ("state_dir", Some(&self.state_dir)),
            ("trust.issuers", Some(&self.trust.issuers)),
            ("trust.policy", Some(&self.trust.policy)),
            ("policy.file", Some(&self.policy.file)),
            ("policy.fetch_ca_file", self.policy.fetch_ca_file.as_deref()),
            ("attestations.drop_dir", self.attestations.drop_dir.as_deref()),
            ("attestations.host_attestation", Some(&self.attestations.host_attestation)),
            ("workloads.cgroup_root", self.workloads.cgroup_root.as_deref()),
            ("workloads.libvirt_status_dir", Some(&self.workloads.libvirt_status_dir)),
            ("audit.dir", self.audit.dir.as_deref()),
        ];
        for (key, path) in absolute {
            if path.is_some_and(|p| !p.is_absolute()) {
                return invalid(key, "must be an absolute path");
            }
        }
        if self.clock_skew_s > 3600 {
            return invalid("clock_skew_s", "must be at most 3600 (one hour)");
        }
        if !(1..=65_536).contains(&self.api.max_connections) {
            return invalid("api.max_connections", "must be 1 to 65536");
        }
        if !(1..=65_536).contains(&self.collector_api.max_connections) {
            return invalid("collector_api.max_connections", "must be 1 to 65536");
        }
        if !(1..=self.collector_api.max_connections).contains(&self.collector_api.max_connections_per_ip) {
            return invalid(
                "collector_api.max_connections_per_ip",
                "must be 1 to collector_api.max_connections",
            );
        }
        if !(1..=self.api.max_connections).contains(&self.api.max_connections_per_user) {
            return invalid("api.max_connections_per_user", "must be 1 to api.max_connections");
        }
        if !(1..=60).contains(&self.api.header_read_timeout_s) {
            return invalid("api.header_read_timeout_s", "must be 1 to 60 seconds");
        }
        if !(11..=3600).contains(&self.api.idle_timeout_s) {
            return invalid(
                "api.idle_timeout_s",
                "must be 11 to 3600 seconds (longer than the 10 s a request waits for the agent)",
            );
        }
        if self.attestations.max_bytes < 1024 || self.attestations.max_bytes > 1 << 20 {
            return invalid("attestations.max_bytes", "must be between 1024 and 1048576");
        }
        for root in &self.workloads.roots {
            if root.is_empty() || root.starts_with('/') || root.split('/').any(|c| c.is_empty() || c == "..")
            {
                return invalid(
                    "workloads.roots",
                    "entries are relative cgroup paths like \"machine.slice\"",
                );
            }
        }
        if !(100..=60_000).contains(&self.gpu.interval_ms) {
            return invalid("gpu.interval_ms", "must be between 100 and 60000");
        }
        if self.gpu.window_s == 0 || self.gpu.window_s.saturating_mul(1000) < self.gpu.interval_ms {
            return invalid("gpu.window_s", "must be at least one sampling interval");
        }
        if self.gpu.training_min_activity_pct > 100 {
            return invalid("gpu.training_min_activity_pct", "is a percentage (0-100)");
        }
        if self.enforcement.reconcile_interval_s == 0 {
            return invalid("enforcement.reconcile_interval_s", "must be at least 1");
        }
        if self.enforcement.nft_command.first().is_none_or(|c| c.is_empty()) {
            return invalid("enforcement.nft_command", "must name a program, e.g. [\"nft\"]");
        }
        if self.workloads.rescan_interval_s == 0 {
            return invalid("workloads.rescan_interval_s", "must be at least 1");
        }
        if self.audit.max_file_bytes < 4096 {
            return invalid("audit.max_file_bytes", "must be at least 4096");
        }
        if let Some(id) = &self.host_id {
            if id.is_empty() || id.len() > 256 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return invalid("host_id", "must be 1-256 characters without whitespace");
            }
        }
        let r = &self.reporting;
        if let Some(url) = &r.collector_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 2048 {
                return invalid("reporting.collector_url", "must be an http:// or https:// URL");
            }
        }
        if let Some(url) = &self.policy.fetch_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 2048 {
                return invalid("policy.fetch_url", "must be an http:// or https:// URL");
            }
        }
        if !(1..=86_400).contains(&self.policy.fetch_interval_s) {
            return invalid("policy.fetch_interval_s", "must be between 1 and 86400");
        }
        if !(1..=3600).contains(&self.policy.fetch_timeout_s) {
            return invalid("policy.fetch_timeout_s", "must be between 1 and 3600");
        }
        if r.group_commit_ms > 10_000 {
            return invalid("reporting.group_commit_ms", "must be at most 10000");
        }
        if r.segment_max_bytes < 4096 || r.spool_max_bytes < r.segment_max_bytes.saturating_mul(4) {
            return invalid(
                "reporting.spool_max_bytes",
                "segment_max_bytes must be at least 4096 and spool_max_bytes at least 4 segments",
            );
        }
        if !(1..=100_000).contains(&r.batch_max_records) {
            return invalid("reporting.batch_max_records", "must be between 1 and 100000");
        }
        if r.batch_max_s == 0 || r.backoff_max_s == 0 || r.connect_timeout_s == 0 || r.request_timeout_s == 0
        {
            return invalid("reporting", "batch_max_s, backoff_max_s and the timeouts must be at least 1");
        }
        if self.log.level.trim().is_empty() {
            return invalid("log.level", "must not be empty");
        }
        Ok(())
    }

    /// Where attestations accepted at admission are kept (owned by kycd: deleting a file
    /// withdraws it; expired ones are removed).
    pub fn admitted_dir(&self) -> PathBuf {
        self.state_dir.join("admitted")
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
