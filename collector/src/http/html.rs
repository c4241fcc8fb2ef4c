//! The HTML console: `GET /`, a read-only, server-rendered overview (tenants, usage without a
//! tenant, open findings, dark hosts) of the same data as the JSON read API, behind the same
//! access rule.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use kycd_protocol::wire;

use super::read_api::{
    fleet_summaries, host_summaries, ApiState, HostSummary, TenantSummary, UnattributedSummary,
};
use super::response::blocking;
use crate::fleet::Finding;

/// Escapes text for HTML element content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(super) async fn overview(State(state): State<ApiState>) -> Response {
    let store = Arc::clone(&state.store);
    let data = blocking(move || {
        let fleet = fleet_summaries(store.as_ref(), None)?;
        let findings = crate::findings::active_findings(store.as_ref())?;
        let hosts = host_summaries(store.as_ref())?;
        let policy = store.current_policy()?.map(|p| p.version);
        Ok((fleet, findings, hosts, policy))
    })
    .await;
    let ((tenants, unattributed), findings, hosts, policy) = match data {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    Html(render_overview(&tenants, &unattributed, &findings, &hosts, policy)).into_response()
}

fn render_overview(
    tenants: &[TenantSummary],
    unattributed: &[UnattributedSummary],
    findings: &[Finding],
    hosts: &[HostSummary],
    policy: Option<u64>,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>kycd collector</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #999;padding:.2em .6em;text-align:left}}.foreign{{color:#a00}}</style>\
         </head><body><h1>kycd collector</h1><p>Published policy: {}. {} tenants, {} open findings, \
         {} of {} hosts dark.</p>",
        policy.map_or_else(
            || "none (threshold findings are not evaluated)".to_owned(),
            |v| format!("version {v}")
        ),
        tenants.len(),
        findings.len(),
        hosts.iter().filter(|x| x.dark).count(),
        hosts.len(),
    );
    h.push_str("<h2>Open findings</h2><table><tr><th>id</th><th>kind</th><th>subject</th><th>foreign</th><th>raised</th><th>summary</th></tr>");
    for f in findings {
        let foreign = f.finding.foreign_person.map_or("", |x| if x { "foreign" } else { "domestic" });
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f.id,
            f.finding.kind.as_str(),
            esc(&f.finding.subject),
            foreign,
            crate::export::rfc3339(f.raised_at),
            esc(&f.finding.summary)
        );
    }
    h.push_str("</table><h2>Tenants</h2><table><tr><th>tenant</th><th>legal name</th><th>countries</th><th>foreign</th><th>ops lower bound</th><th>estimated ops</th><th>ops upper bound</th><th>GPU-hours</th><th>shared GPU-hours</th><th>GPU-hours without guest telemetry</th><th>peak FLOP/s</th><th>hosts</th><th>open findings</th></tr>");
    for t in tenants {
        let (name, countries) = t.identity.as_ref().map_or((String::new(), String::new()), |i| {
            (i.legal_name.clone(), i.countries.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "))
        });
        let kinds: Vec<&str> = t.open_findings.iter().map(|k| k.as_str()).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td>{:.3e}</td><td>{:.3e}</td><td>{:.3e}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.3e}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.tenant),
            esc(&name),
            esc(&countries),
            if t.foreign_person { " class=\"foreign\"" } else { "" },
            if t.foreign_person { "yes" } else { "no" },
            t.usage.ops_lower,
            t.usage.estimated_ops,
            t.usage.ops_upper,
            t.usage.gpu_hours(),
            t.usage.shared_gpu_seconds / 3600.0,
            t.usage.guest_gap_gpu_seconds / 3600.0,
            t.usage.peak_flops,
            t.usage.hosts,
            esc(&kinds.join(", "))
        );
    }
    h.push_str("</table><h2>Usage without a tenant</h2><p>Workloads without a valid attestation (the policy's <code>unverified</code> rule let them run), per host: foreign status unknown.</p><table><tr><th>host</th><th>workload</th><th>ops lower bound</th><th>estimated ops</th><th>ops upper bound</th><th>GPU-hours</th><th>peak FLOP/s</th><th>open findings</th></tr>");
    for u in unattributed {
        let kinds: Vec<&str> = u.open_findings.iter().map(|k| k.as_str()).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.3e}</td><td>{:.3e}</td><td>{:.3e}</td><td>{:.1}</td><td>{:.3e}</td><td>{}</td></tr>",
            esc(&u.usage.host_id),
            esc(&u.usage.workload),
            u.usage.ops_lower,
            u.usage.estimated_ops,
            u.usage.ops_upper,
            u.usage.gpu_hours(),
            u.usage.peak_flops,
            esc(&kinds.join(", "))
        );
    }
    h.push_str("</table><h2>Dark hosts</h2><ul>");
    for host in hosts.iter().filter(|x| x.dark) {
        let last = host.last_report_at.map_or_else(|| "never".to_owned(), crate::export::rfc3339);
        let _ = write!(h, "<li>{} (last report {last})</li>", esc(&host.host_id));
    }
    let links: Vec<String> = [
        wire::collector::TENANTS,
        wire::collector::FINDINGS,
        wire::collector::HOSTS,
        super::UNATTRIBUTED,
        wire::collector::POLICY,
    ]
    .iter()
    .map(|path| format!("<a href=\"{path}\">{path}</a>"))
    .collect();
    let _ = writeln!(h, "</ul><p>JSON: {}</p></body></html>", links.join(" · "));
    h
}
