//! `GET /`: the overview: the findings waiting for an operator, every tenant with how far it
//! is toward the training threshold, the usage without a tenant, and the hosts that went dark.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use kycd_protocol::wire;

use super::units::{flop, flops, gpu_hours, time, two_significant};
use super::{failed, finding_link, page, state_badge, tenant_link, Viewer, HOSTS_PAGE};
use crate::http::html::esc;
use crate::http::read_api::{fleet_summaries, host_summaries};
use crate::http::response::blocking;
use crate::http::ApiState;

/// How far `ops` is toward `threshold`, as a percentage with two significant digits.
pub(super) fn share(ops: f64, threshold: f64) -> String {
    if threshold > 0.0 {
        format!("{} %", two_significant(ops / threshold * 100.0))
    } else {
        "–".to_owned()
    }
}

pub(super) async fn page_handler(state: ApiState, viewer: Viewer) -> Response {
    let store = Arc::clone(&state.store);
    let data = blocking(move || {
        let fleet = fleet_summaries(store.as_ref(), None)?;
        let findings = crate::findings::active_findings(store.as_ref())?;
        let hosts = host_summaries(store.as_ref())?;
        Ok((fleet, findings, hosts, store.current_policy()?))
    })
    .await;
    let ((tenants, unattributed), findings, hosts, policy) = match data {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let pending: Vec<_> = findings.iter().filter(|f| f.state.is_pending()).collect();
    let dark = hosts.iter().filter(|h| h.dark).count();
    let mut h = String::new();
    let _ = write!(
        h,
        "<h1>Overview</h1><div class=\"cards\"><div class=\"card\">Published policy<b>{}</b></div>\
         <div class=\"card\">Tenants<b>{}</b></div><div class=\"card\">Findings to act on<b id=\"pending\">{}</b></div>\
         <div class=\"card\">Hosts dark<b>{dark} of {}</b></div></div>",
        policy.as_ref().map_or_else(|| "none".to_owned(), |p| format!("version {}", p.version)),
        tenants.len(),
        pending.len(),
        hosts.len()
    );
    if policy.is_none() {
        h.push_str("<p class=\"warn\">No policy is published: threshold findings are not evaluated.</p>");
    }
    h.push_str(
        "<h2>Findings to act on</h2><table id=\"findings\"><tr><th>finding</th><th>kind</th><th>subject</th>\
         <th>state</th><th>foreign</th><th>raised</th><th>due</th><th>summary</th></tr>",
    );
    for f in &pending {
        let subject = match &f.finding.tenant {
            Some(t) if *t == f.finding.subject => tenant_link(t),
            _ => esc(&f.finding.subject),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{subject}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            finding_link(f.id),
            f.finding.kind.as_str(),
            state_badge(f.state),
            f.finding.foreign_person.map_or("", |x| if x { "foreign" } else { "domestic" }),
            time(Some(f.raised_at)),
            f.finding.due_at.map_or_else(String::new, |d| time(Some(d))),
            esc(&f.finding.summary)
        );
    }
    let (training, basis_upper) = policy.as_ref().map_or((0.0, false), |p| {
        (p.claims.thresholds.training_ops, p.claims.threshold_basis == kycd_protocol::ThresholdBasis::Upper)
    });
    let _ = write!(
        h,
        "</table><h2>Tenants</h2><table id=\"tenants\"><tr><th>tenant</th><th>legal name</th><th>countries</th>\
         <th>foreign</th><th>operations (lower · point · upper)</th><th>of training threshold ({})</th>\
         <th>GPU-hours</th><th>shared GPU-hours</th><th>GPU-hours without guest telemetry</th><th>peak capacity</th>\
         <th>hosts</th><th>open findings</th></tr>",
        if basis_upper { "upper bound" } else { "point estimate" }
    );
    for t in &tenants {
        let (name, countries) = t.identity.as_ref().map_or((String::new(), String::new()), |i| {
            (i.legal_name.clone(), i.countries.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "))
        });
        let kinds: Vec<&str> = t.open_findings.iter().map(|k| k.as_str()).collect();
        let basis = if basis_upper { t.usage.ops_upper } else { t.usage.estimated_ops };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td class=\"num\">{} · {} · {}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            tenant_link(&t.tenant),
            esc(&name),
            esc(&countries),
            if t.foreign_person { " class=\"foreign\"" } else { "" },
            if t.foreign_person { "yes" } else { "no" },
            flop(t.usage.ops_lower),
            flop(t.usage.estimated_ops),
            flop(t.usage.ops_upper),
            share(basis, training),
            gpu_hours(t.usage.gpu_seconds),
            gpu_hours(t.usage.shared_gpu_seconds),
            gpu_hours(t.usage.guest_gap_gpu_seconds),
            flops(t.usage.peak_flops),
            t.usage.hosts,
            esc(&kinds.join(", "))
        );
    }
    h.push_str(
        "</table><h2>Usage without a tenant</h2><p class=\"muted\">Workloads without a valid attestation (the \
         policy's <code>unverified</code> rule let them run), per host: foreign status unknown.</p><table>\
         <tr><th>host</th><th>workload</th><th>operations (lower · point · upper)</th><th>GPU-hours</th>\
         <th>peak capacity</th><th>open findings</th></tr>",
    );
    for u in &unattributed {
        let kinds: Vec<&str> = u.open_findings.iter().map(|k| k.as_str()).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{} · {} · {}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&u.usage.host_id),
            esc(&u.usage.workload),
            flop(u.usage.ops_lower),
            flop(u.usage.estimated_ops),
            flop(u.usage.ops_upper),
            gpu_hours(u.usage.gpu_seconds),
            flops(u.usage.peak_flops),
            esc(&kinds.join(", "))
        );
    }
    let _ = write!(h, "</table><h2>Dark hosts</h2><p><a href=\"{HOSTS_PAGE}\">All hosts</a></p><ul>");
    for host in hosts.iter().filter(|x| x.dark) {
        let _ = write!(
            h,
            "<li class=\"dark\">{} (last report {})</li>",
            esc(&host.host_id),
            time(host.last_report_at)
        );
    }
    let links: Vec<String> = [
        wire::collector::TENANTS,
        wire::collector::FINDINGS,
        wire::collector::HOSTS,
        crate::http::UNATTRIBUTED,
        wire::collector::POLICY,
    ]
    .iter()
    .map(|path| format!("<a href=\"{path}\">{path}</a>"))
    .collect();
    let _ = write!(h, "</ul><p class=\"muted\">JSON: {}</p>", links.join(" · "));
    page(StatusCode::OK, "Overview", Some(&viewer), &h)
}

pub(super) async fn page_route(
    State(state): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    page_handler(state, viewer).await
}
