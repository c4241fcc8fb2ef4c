//! `GET /console/hosts`: every enrolled host: its last report and last poll (and the last
//! poll's error), whether it is dark, the policy version its latest statement enforces
//! against the published one, its placement, and its open host findings (enforcement
//! mismatches, a stale policy, refused reports).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;

use super::units::{segment, time};
use super::{failed, finding_link, page, Viewer};
use crate::fleet::FindingKind;
use crate::http::html::esc;
use crate::http::read_api::host_summaries;
use crate::http::response::blocking;
use crate::http::ApiState;

pub(super) async fn page_route(
    State(state): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let store = Arc::clone(&state.store);
    let data = blocking(move || {
        let hosts = host_summaries(store.as_ref())?;
        let polls: BTreeMap<String, _> =
            store.host_poll_status()?.into_iter().map(|p| (p.host_id.clone(), p)).collect();
        let statements: BTreeMap<String, _> =
            store.latest_statements()?.into_iter().map(|s| (s.host_id, s.claims)).collect();
        let placements: BTreeMap<String, _> = store.host_placements()?.into_iter().collect();
        let findings = crate::findings::active_findings(store.as_ref())?;
        Ok((hosts, polls, statements, placements, findings, store.current_policy()?.map(|p| p.version)))
    })
    .await;
    let (hosts, polls, statements, placements, findings, published) = match data {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let mut by_host: BTreeMap<&str, Vec<&crate::fleet::Finding>> = BTreeMap::new();
    for f in findings.iter().filter(|f| f.state.is_pending() || f.finding.kind == FindingKind::HostDark) {
        if let Some(host) = f.finding.host_id.as_deref() {
            by_host.entry(host).or_default().push(f);
        }
    }
    let mut h = String::new();
    let _ = write!(
        h,
        "<h1>Hosts</h1><p>{} enrolled, {} dark. Published policy: {}.</p><table id=\"host-table\"><tr><th>host</th>\
         <th>placement</th><th>last report</th><th>last poll</th><th>last poll answered</th><th>state</th>\
         <th>policy version</th><th>agent</th><th>enforcement mismatches</th><th>other open findings</th></tr>",
        hosts.len(),
        hosts.iter().filter(|x| x.dark).count(),
        published.map_or_else(|| "none".to_owned(), |v| format!("version {v}"))
    );
    for host in &hosts {
        let poll = polls.get(&host.host_id);
        let statement = statements.get(&host.host_id);
        let enforced = statement.and_then(|s| s.policy_version);
        let policy = match (enforced, published) {
            (Some(v), Some(p)) if v < p => format!("<span class=\"warn\">{v} (published {p})</span>"),
            (Some(v), _) => format!("<span class=\"ok\">{v}</span>"),
            (None, _) if statement.is_some() => "<span class=\"warn\">none</span>".to_owned(),
            (None, _) => "no statement".to_owned(),
        };
        let poll_error = poll
            .and_then(|p| p.last_error.as_deref())
            .map(|e| format!("<br><span class=\"warn\">{}</span>", esc(e)))
            .unwrap_or_default();
        let open = by_host.get(host.host_id.as_str()).map_or(&[][..], Vec::as_slice);
        let list = |mismatch: bool| {
            let items: Vec<String> = open
                .iter()
                .filter(|f| (f.finding.kind == FindingKind::EnforcementMismatch) == mismatch)
                .map(|f| {
                    let what =
                        if mismatch { esc(&f.finding.summary) } else { f.finding.kind.as_str().to_owned() };
                    format!("{} {what}", finding_link(f.id))
                })
                .collect();
            items.join("<br>")
        };
        let _ = write!(
            h,
            "<tr id=\"host-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}{poll_error}</td><td>{}</td><td>{}</td><td>{policy}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            segment(&host.host_id),
            esc(&host.host_id),
            placements.get(&host.host_id).map_or_else(|| "unplaced".to_owned(), |p| esc(&format!("{}/{}", p.site, p.fabric))),
            time(host.last_report_at),
            time(poll.and_then(|p| p.last_attempt_at)),
            time(poll.and_then(|p| p.last_ok_at)),
            if host.dark { "<span class=\"dark\">dark</span>" } else { "<span class=\"ok\">reporting</span>" },
            statement.map_or_else(String::new, |s| esc(&s.agent_version)),
            list(true),
            list(false)
        );
    }
    h.push_str("</table>");
    page(StatusCode::OK, "Hosts", Some(&viewer), &h)
}
