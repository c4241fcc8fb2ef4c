//! `kycctl workloads`, `tenants` and `decisions`: views of the agent's workload rows.

use std::path::Path;
use std::process::ExitCode;

use kycd_protocol::wire::operator;

use super::agent::agent_request;
use super::{fail, EXIT_INVALID};

pub(super) fn workloads(socket: &Path, json: bool) -> ExitCode {
    let body = match agent_request(socket, "GET", operator::WORKLOADS) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let rows: Vec<crate::net::operator_api::WorkloadRow> = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")),
    };
    println!("{:<48} {:<9} {:<20} {:<7} REASONS", "WORKLOAD", "VERDICT", "TENANT", "POLICY");
    for r in rows {
        let (verdict, policy, reasons) = match &r.decision {
            Some(d) => (
                format!("{:?}", d.verdict).to_lowercase(),
                d.policy_version.map_or("-".into(), |v| format!("v{v}")),
                d.reasons
                    .iter()
                    .map(|x| match &x.measure_id {
                        Some(m) => format!("{}({m})", x.code.as_str()),
                        None => x.code.as_str().to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            None => ("-".into(), "-".into(), "not yet recorded".into()),
        };
        println!(
            "{:<48} {:<9} {:<20} {:<7} {reasons}",
            r.workload,
            verdict,
            r.tenant.as_deref().unwrap_or("-"),
            policy
        );
    }
    ExitCode::SUCCESS
}

fn rows(socket: &Path) -> Result<Vec<crate::net::operator_api::WorkloadRow>, ExitCode> {
    let body = agent_request(socket, "GET", operator::WORKLOADS)?;
    serde_json::from_value(body)
        .map_err(|e| fail(EXIT_INVALID, format_args!("unreadable answer from the agent: {e}")))
}

fn verdict_name(d: &crate::decision::Decision) -> String {
    format!("{:?}", d.verdict).to_lowercase()
}

pub(super) fn tenants(socket: &Path, json: bool) -> ExitCode {
    let rows = match rows(socket) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut by_tenant: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    for r in rows {
        if let (Some(t), Some(d)) = (r.tenant.clone(), &r.decision) {
            by_tenant.entry(t).or_default().push((r.workload.clone(), verdict_name(d)));
        }
    }
    if json {
        let v: serde_json::Value = by_tenant
            .iter()
            .map(|(t, ws)| {
                let ws: Vec<_> =
                    ws.iter().map(|(w, v)| serde_json::json!({"workload": w, "verdict": v})).collect();
                (t.clone(), serde_json::Value::Array(ws))
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("{:<28} WORKLOADS (VERDICT)", "TENANT");
    for (t, ws) in by_tenant {
        let list: Vec<String> = ws.iter().map(|(w, v)| format!("{w} ({v})")).collect();
        println!("{t:<28} {}", list.join(", "));
    }
    ExitCode::SUCCESS
}

pub(super) fn decisions(socket: &Path, tenant: Option<&str>, since: Option<i64>, json: bool) -> ExitCode {
    let mut rows = match rows(socket) {
        Ok(r) => r,
        Err(code) => return code,
    };
    rows.retain(|r| {
        r.decision.is_some()
            && tenant.is_none_or(|t| r.tenant.as_deref() == Some(t))
            && since.is_none_or(|s| r.decided_at.is_some_and(|at| at >= s))
    });
    rows.sort_by_key(|r| std::cmp::Reverse(r.decided_at));
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("{:<12} {:<44} {:<9} {:<20} REASONS", "DECIDED_AT", "WORKLOAD", "VERDICT", "TENANT");
    for r in rows {
        let Some(d) = &r.decision else { continue };
        let reasons: Vec<String> = d
            .reasons
            .iter()
            .map(|x| match (&x.measure_id, &x.citation) {
                (Some(m), Some(c)) => format!("{} {m} ({c})", x.code.as_str()),
                _ => x.code.as_str().to_owned(),
            })
            .collect();
        println!(
            "{:<12} {:<44} {:<9} {:<20} {}",
            r.decided_at.map_or("-".into(), |t| t.to_string()),
            r.workload,
            verdict_name(d),
            r.tenant.as_deref().unwrap_or("-"),
            reasons.join("; ")
        );
    }
    ExitCode::SUCCESS
}
