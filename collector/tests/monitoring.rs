//! The packaged Grafana dashboard and Prometheus alerts (`packaging/grafana`,
//! `packaging/prometheus`) against the real binaries: every metric their PromQL names is in a
//! running agent's or collector's `/metrics` (scraped here: the real `kycd` replaying a
//! recorded GPU trace, uploading to and fetching its policy from the real
//! `kycd-collector serve`); `promtool check rules` accepts the alerts and every dashboard
//! query, and `promtool test rules` fires and clears each alert.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::agent_bin;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kycd_test_support::host::http_get;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A GET with a bearer token on loopback: (status, body).
fn get_with_token(addr: &str, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: kycd\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Metric names a `/metrics` text declares (`# TYPE NAME KIND`).
fn declared(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
fn wait_for<T>(secs: u64, what: &str, context: impl Fn() -> String, f: impl FnMut() -> Option<T>) -> T {
    kycd_test_support::wait_for(secs, Duration::from_millis(100), what, context, f)
}

/// Operators, modifiers and aggregations (an aggregation may be followed by `by (…)` rather
/// than its parenthesis).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "count_values",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
];

/// The metric names a PromQL expression reads: identifiers that are not functions or
/// aggregations (followed by `(`), keywords, label names (inside `{…}` or a `by (…)`-style
/// list), string literals, range durations or Grafana variables (`$__rate_interval`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    // A label list follows these keywords: skip it.
    let mut label_list_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if label_list_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                label_list_next = false;
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                let is_call = chars.get(j) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&lower.as_str())
                {
                    label_list_next = is_call;
                } else if !is_call && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("packaging/grafana/kycd-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard["panels"]];
    while let Some(panels) = stack.pop() {
        for panel in panels.as_array().into_iter().flatten() {
            stack.push(&panel["panels"]);
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().unwrap().to_owned());
            }
        }
    }
    exprs
}

/// Every alert's `expr` (the rules file keeps each on one line).
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("packaging/prometheus/kycd-alerts.yml")).unwrap();
    let mut alert = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(expr) = line.strip_prefix("expr:") {
            out.push((alert.clone(), expr.trim().to_owned()));
        }
    }
    out
}

#[test]
fn the_extractor_finds_metric_names_and_only_those() {
    let names = metric_names(
        r#"sum by (tenant) (rate(kycd_gpu_seconds_total{job="kycd", workload=~"a.*"}[$__rate_interval])) > 0 or on() group_left (x) count_values("version", kycd_policy_version) unless vector(1e3) and up offset 5m"#,
    );
    let expected: BTreeSet<String> =
        ["kycd_gpu_seconds_total", "kycd_policy_version", "up"].map(String::from).into();
    assert_eq!(names, expected);
}

#[test]
fn every_alert_has_firing_and_quiet_unit_tests() {
    let tests = std::fs::read_to_string(repo().join("packaging/prometheus/kycd-alerts.test.yml")).unwrap();
    for (alert, _) in alert_exprs() {
        let evals: Vec<&str> = tests
            .split("- eval_time:")
            .skip(1)
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(evals.iter().any(|c| c.contains("exp_alerts:")), "{alert}: no test where it fires");
        assert!(evals.iter().any(|c| !c.contains("exp_alerts:")), "{alert}: no test where it stays quiet");
    }
}

#[test]
fn promtool_checks_and_unit_tests_the_alerts_and_parses_every_dashboard_query() {
    let dir = repo().join("packaging/prometheus");
    let check = Command::new("promtool").arg("check").arg("rules").arg(dir.join("kycd-alerts.yml")).output();
    let check = match check {
        Ok(out) => out,
        Err(e) => {
            kycd_test_support::skip!("SKIP promtool: not available ({e})");
            return;
        }
    };
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    assert!(check.status.success(), "promtool check rules:\n{}", text(&check));
    assert!(text(&check).contains(&format!("{} rules found", alert_exprs().len())), "{}", text(&check));
    let test = Command::new("promtool")
        .args(["test", "rules", "kycd-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(test.status.success(), "promtool test rules:\n{}", text(&test));
    // The dashboard's queries as recording rules: promtool parses each (Grafana's range
    // variable replaced by a duration).
    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::json!(expr)
        ));
    }
    let file = tmp.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let check = Command::new("promtool").arg("check").arg("rules").arg(&file).output().unwrap();
    assert!(check.status.success(), "a dashboard query does not parse:\n{}", text(&check));
}

#[test]
fn every_metric_the_dashboard_and_alerts_query_is_served_by_a_running_agent_or_collector() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = dir.display();
    let token = "monitoring-test-token";
    std::fs::write(dir.join("token"), token).unwrap();
    std::fs::set_permissions(dir.join("token"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // The collector, its read API (and /metrics) behind a read token.
    let collector_port = free_port();
    let collector_addr = format!("127.0.0.1:{collector_port}");
    let db = format!("sqlite://{d}/collector.db");
    let log = std::fs::File::create(dir.join("collector.log")).unwrap();
    let _collector = Proc(
        Command::new(env!("CARGO_BIN_EXE_kycd-collector"))
            .args(["serve", "--listen", &collector_addr, "--db", &db, "--read-token-file"])
            .arg(dir.join("token"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // The agent: uploads to the collector and fetches its policy there, serves its collector
    // API (and /metrics) in plaintext on loopback behind the same token, and replays a
    // recorded H200 trace so the GPU families are there.
    let agent_port = free_port();
    let agent_addr = format!("127.0.0.1:{agent_port}");
    std::fs::create_dir_all(dir.join("cgroup")).unwrap();
    for name in ["issuers", "policy"] {
        std::fs::write(dir.join(format!("{name}.jwks")), r#"{"keys": []}"#).unwrap();
    }
    let trace = repo().join("agent/tests/data/h200-2026-12-04/trace-format2.jsonl");
    let config = format!(
        "host_id = \"node-1\"\nstate_dir = \"{d}/state\"\n\
         [log]\nlevel = \"warn\"\n\
         [trust]\nissuers = \"{d}/issuers.jwks\"\npolicy = \"{d}/policy.jwks\"\n\
         [policy]\nfile = \"{d}/policy.jws\"\nfetch_url = \"http://{collector_addr}/v1/policy\"\nfetch_interval_s = 1\n\
         [attestations]\nhost_attestation = \"{d}/host.jws\"\n\
         [workloads]\ncgroup_root = \"{d}/cgroup\"\n\
         [api]\nsocket = \"{d}/run/kycd.sock\"\n\
         [gpu]\nreplay_trace = \"{}\"\ninterval_ms = 100\nwindow_s = 1\n\
         [reporting]\ncollector_url = \"http://{collector_addr}\"\n\
         [collector_api]\nenabled = true\nlisten = \"{agent_addr}\"\ninsecure_plaintext = true\n\
         bearer_token_file = \"{d}/token\"\n",
        trace.display()
    );
    std::fs::write(dir.join("kycd.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let _agent = Proc(
        Command::new(agent_bin("kycd"))
            .args(["run", "--config"])
            .arg(dir.join("kycd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let logs = || {
        format!(
            "agent:\n{}\ncollector:\n{}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("collector.log")).unwrap_or_default()
        )
    };

    let scrape = |addr: &str| {
        std::net::TcpStream::connect(addr).ok()?;
        let (status, body) = get_with_token(addr, "/metrics", token);
        (status == 200).then_some(body)
    };
    // The GPU families are there once the replay's sampler runs.
    let agent = wait_for(60, "the agent's /metrics with the GPU families", logs, || {
        scrape(&agent_addr).filter(|m| m.contains("kycd_gpu_utilization_ratio{"))
    });
    let collector = wait_for(30, "the collector's /metrics", logs, || scrape(&collector_addr));
    // The collector's /metrics is fleet data: behind the read rule like the read API.
    let (status, _) = get_with_token(&collector_addr, "/metrics", "wrong");
    assert_eq!(status, 401, "{}", logs());
    let (status, _) = http_get(&collector_addr, "/metrics");
    assert_eq!(status, 401);
    kycd_test_support::host::promtool_check(&collector);
    for line in ["kycd_collector_hosts 0", "kycd_collector_hosts_dark 0", "kycd_collector_policy_version 0"] {
        assert!(collector.lines().any(|l| l == line), "{line} missing:\n{collector}");
    }
    assert!(collector.contains("kycd_collector_findings_active{kind=\"host_dark\"} 0"), "{collector}");
    // A refused upload is counted by its error kind.
    {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(&collector_addr).unwrap();
        write!(
            stream,
            "POST /v1/reports HTTP/1.1\r\nHost: kycd\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 415"), "{response}");
    }
    let collector = scrape(&collector_addr).unwrap();
    assert!(
        collector
            .lines()
            .any(|l| l == "kycd_collector_reports_refused_total{kind=\"UnsupportedEncoding\"} 1"),
        "{collector}"
    );
    assert!(collector.lines().any(|l| l == "kycd_collector_reports_stored_total 0"), "{collector}");

    let mut served = declared(&agent);
    served.extend(declared(&collector));
    // Prometheus's own per-target series.
    served.insert("up".into());
    let mut unknown = Vec::new();
    let mut queried = BTreeSet::new();
    let exprs: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|e| ("dashboard".to_owned(), e))
        .chain(alert_exprs().into_iter().map(|(a, e)| (format!("alert {a}"), e)))
        .collect();
    assert!(exprs.len() > 20, "{exprs:?}");
    for (whose, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{whose}: no metric in {expr}");
        for name in names {
            if !served.contains(&name) {
                unknown.push(format!("{whose}: {name} in {expr}"));
            }
            queried.insert(name);
        }
    }
    assert!(unknown.is_empty(), "metrics no running agent or collector serves:\n{}", unknown.join("\n"));
    // The issue's list, by the metric each panel or alert stands on.
    for needed in [
        "kycd_gpu_seconds_total",
        "kycd_gpu_estimated_operations_total",
        "kycd_enforcement_errors_total",
        "kycd_enforcement_drift_repaired_total",
        "kycd_spool_pending_records",
        "kycd_upload_last_success_timestamp_seconds",
        "kycd_policy_version",
        "kycd_collector_policy_version",
        "kycd_collector_findings_active",
        "kycd_collector_hosts_dark",
        "kycd_collector_reports_stored_total",
        "kycd_audit_last_write_ok",
        "kycd_upload_rejected_batches_total",
    ] {
        assert!(queried.contains(needed), "nothing queries {needed}");
    }
}
