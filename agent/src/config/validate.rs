//! Consistency checks on the merged configuration: what each file's own parse cannot see.

use std::path::Path;

use super::{Config, ConfigError};

impl Config {
    /// Consistency checks on the merged configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.to_owned() });
        let absolute: [(&'static str, Option<&Path>); 20] = [
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
            ("gpu.sysfs_root", Some(&self.gpu.sysfs_root)),
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
        if !(10..=3600).contains(&self.collector_api.keep_alive_s) {
            return invalid(
                "collector_api.keep_alive_s",
                "must be 10 (the header-read timeout) to 3600 seconds",
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
        if self.attestations.expired_retention_s > kycd_protocol::MAX_RETENTION_S {
            return invalid("attestations.expired_retention_s", "must be at most 100 years (3153600000)");
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
        if !(10..=86_400).contains(&self.gpu.guest_telemetry_timeout_s) {
            return invalid("gpu.guest_telemetry_timeout_s", "must be between 10 and 86400");
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
}
