//! `GET /console/findings/{id}`: one finding as its filing record shows it (the customer,
//! the usage, the policy and threshold, the hosts, the evidence windows, the audit records),
//! with the lifecycle forms; `POST` the same path takes an action (acknowledge, file with a
//! reference, dismiss with a reason) as the session's writer, through the same store call as
//! the API's `POST /v1/findings/{id}/{action}`, so it leaves the same audit record.
//! `GET /console/findings/{id}/record` is the print-ready filing record
//! ([`crate::filing::html`]).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use kycd_protocol::clock::{Clock as _, SystemClock};
use serde::Deserialize;

use super::units::{flop, flops, gpu_hours, time};
use super::{error_page, page, session, state_badge, tenant_link, Viewer};
use crate::filing::{filing_record, FilingError, FilingRecord, UsageSection};
use crate::fleet::{FindingAction, FindingState};
use crate::http::html::esc;
use crate::http::response::store_error;
use crate::http::ApiState;
use crate::store::StoreError;

async fn record_of(state: &ApiState, id: i64) -> Result<FilingRecord, Response> {
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || filing_record(store.as_ref(), id, SystemClock.unix_now())).await
    {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(FilingError::NotFound(_))) => {
            Err(error_page(StatusCode::NOT_FOUND, &format!("No finding #{id}.")))
        }
        Ok(Err(FilingError::Store(e))) => Err(super::failed(store_error(&e))),
        Err(e) => Err(error_page(StatusCode::INTERNAL_SERVER_ERROR, &format!("read task failed: {e}"))),
    }
}

pub(super) async fn record(State(state): State<ApiState>, Path(id): Path<i64>) -> Response {
    match record_of(&state, id).await {
        Ok(record) => {
            let mut r = crate::filing::html::render(&record).into_response();
            // The record page styles itself inline (it must be self-contained to print or save).
            super::secure_headers(
                &mut r,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            );
            r
        }
        Err(r) => r,
    }
}

pub(super) async fn page_route(
    State(state): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<i64>,
) -> Response {
    match record_of(&state, id).await {
        Ok(record) => {
            page(StatusCode::OK, &format!("Finding #{id}"), Some(&viewer), &render(&record, &viewer))
        }
        Err(r) => r,
    }
}

fn render(r: &FilingRecord, viewer: &Viewer) -> String {
    let f = &r.finding;
    let mut h = String::new();
    let subject = match &f.finding.tenant {
        Some(t) => format!("{} (tenant {})", esc(&f.finding.subject), tenant_link(t)),
        None => esc(&f.finding.subject),
    };
    let _ = write!(
        h,
        "<h1>Finding #{}: {}</h1><p><span id=\"finding-state\">{}</span> {}</p><table class=\"facts\">\
         <tr><th>subject</th><td>{subject}</td></tr><tr><th>customer</th><td>{}{}</td></tr>\
         <tr><th>raised</th><td>{}</td></tr><tr><th>due</th><td>{}</td></tr>",
        f.id,
        f.finding.kind.as_str(),
        state_badge(f.state),
        esc(&f.finding.summary),
        r.customer.identity.as_ref().map_or_else(|| "unknown".to_owned(), |i| esc(&i.legal_name)),
        match r.customer.foreign_status {
            "us" => " (domestic)".to_owned(),
            other => format!(" <span class=\"foreign\">({other})</span>"),
        },
        time(Some(f.raised_at)),
        f.finding.due_at.map_or_else(|| "no filing due".to_owned(), |d| time(Some(d)))
    );
    if let Some(a) = &f.acknowledged {
        let _ = write!(h, "<tr><th>acknowledged</th><td>by {} at {}</td></tr>", esc(&a.by), time(Some(a.at)));
    }
    if let Some(x) = &f.filed {
        let _ = write!(
            h,
            "<tr><th>filed</th><td>reference <b id=\"filed-reference\">{}</b> by {} at {}</td></tr>",
            esc(&x.reference),
            esc(&x.by),
            time(Some(x.at))
        );
    }
    if let Some(d) = &f.dismissed {
        let _ = write!(
            h,
            "<tr><th>dismissed</th><td>{} (by {} at {})</td></tr>",
            esc(&d.reason),
            esc(&d.by),
            time(Some(d.at))
        );
    }
    if let Some(at) = f.resolved_at {
        let _ = write!(h, "<tr><th>resolved</th><td>{}</td></tr>", time(Some(at)));
    }
    h.push_str("</table>");
    actions(&mut h, f.id, f.state, viewer);
    usage(&mut h, r);
    h.push_str(
        "<h2>Evidence windows</h2><table id=\"evidence\"><tr><th>host</th><th>epoch</th><th>seq</th><th>start</th>\
         <th>end</th><th>operations (lower · point · upper)</th><th>GPUs</th><th>peak capacity</th><th>method</th></tr>",
    );
    for w in &r.evidence_windows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
             <td class=\"num\">{} · {} · {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&w.host_id),
            w.epoch,
            w.seq,
            time(Some(w.start)),
            time(Some(w.end)),
            flop(w.ops_lower),
            flop(w.estimated_ops),
            flop(w.ops_upper),
            w.gpus,
            flops(w.peak_flops),
            esc(&w.method)
        );
    }
    h.push_str("</table><h2>Audit records</h2><table id=\"audit\"><tr><th>seq</th><th>at</th><th>event</th><th>by</th><th>detail</th></tr>");
    for a in &r.audit {
        let e = &a["event"];
        let detail = e["reference"].as_str().or(e["reason"].as_str()).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a["seq"].as_u64().unwrap_or_default(),
            time(a["ts"].as_i64()),
            esc(e["type"].as_str().unwrap_or_default()),
            esc(e["by"].as_str().unwrap_or_default()),
            esc(detail)
        );
    }
    let _ = write!(
        h,
        "</table><h2>Evidence as raised</h2><pre>{}</pre><p><a href=\"/console/findings/{}/record\">Print-ready filing \
         record</a> · JSON: <code>kycd-collector report {}</code></p>",
        esc(&serde_json::to_string_pretty(&f.finding.evidence).unwrap_or_default()),
        f.id,
        f.id
    );
    h
}

fn actions(h: &mut String, id: i64, state: FindingState, viewer: &Viewer) {
    if !state.is_pending() {
        return;
    }
    h.push_str("<h2>Act on it</h2>");
    let Some(writer) = viewer.writer() else {
        h.push_str(
            "<p class=\"muted\">Log in with a write token to acknowledge, file or dismiss this finding.</p>",
        );
        return;
    };
    let form = |action: &str, field: Option<(&str, &str)>, button: &str| {
        let input = field.map_or_else(String::new, |(name, label)| {
            format!("<label>{label} <input type=\"text\" name=\"{name}\" id=\"{action}-{name}\" required maxlength=\"512\"></label> ")
        });
        format!(
            "<form method=\"post\" action=\"/console/findings/{id}\" class=\"action\"><input type=\"hidden\" name=\"csrf\" \
             value=\"{}\"><input type=\"hidden\" name=\"action\" value=\"{action}\">{input}<button type=\"submit\" \
             id=\"{action}-button\">{button}</button></form>",
            esc(viewer.csrf())
        )
    };
    let _ = write!(
        h,
        "<p class=\"muted\">Acting as {}; every step is recorded in the audit log.</p>",
        esc(writer)
    );
    if state == FindingState::Open {
        h.push_str(&form("acknowledge", None, "Acknowledge"));
    }
    h.push_str(&form("file", Some(("reference", "Filing reference")), "File"));
    h.push_str(&form("dismiss", Some(("reason", "Reason it needs no filing")), "Dismiss"));
}

fn usage(h: &mut String, r: &FilingRecord) {
    let threshold = serde_json::to_string(&r.policy.threshold).unwrap_or_default();
    let _ = write!(
        h,
        "<h2>Filing record</h2><table><tr><th>policy</th><td>version {} (basis {}; threshold {})</td></tr>",
        r.policy.version.map_or_else(|| "?".to_owned(), |v| v.to_string()),
        esc(r.policy.basis.as_deref().unwrap_or("point")),
        esc(&threshold)
    );
    let figures = match &r.usage {
        Some(UsageSection::Run { run, .. }) => Some((
            "the run",
            run.figures.ops_lower,
            run.figures.estimated_ops,
            run.figures.ops_upper,
            run.figures.gpu_seconds,
        )),
        Some(UsageSection::Tenant(u)) => {
            Some(("all time", u.ops_lower, u.estimated_ops, u.ops_upper, u.gpu_seconds))
        }
        Some(UsageSection::Unattributed(u)) => {
            Some(("the workload", u.ops_lower, u.estimated_ops, u.ops_upper, u.gpu_seconds))
        }
        None => None,
    };
    if let Some((scope, lower, point, upper, gpu_seconds)) = figures {
        let _ = write!(
            h,
            "<tr><th>operations ({scope})</th><td>{} · {} · {} (lower · point · upper)</td></tr><tr><th>GPU-hours</th><td>{}</td></tr>",
            flop(lower),
            flop(point),
            flop(upper),
            gpu_hours(gpu_seconds)
        );
    }
    let hosts: Vec<String> = r
        .hosts
        .iter()
        .map(|x| match &x.placement {
            Some(p) => format!("{} ({}/{})", esc(&x.host_id), esc(&p.site), esc(&p.fabric)),
            None => esc(&x.host_id),
        })
        .collect();
    let _ = write!(h, "<tr><th>hosts</th><td>{}</td></tr></table>", hosts.join(", "));
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionForm {
    csrf: Option<String>,
    action: Option<String>,
    reference: Option<String>,
    reason: Option<String>,
}

pub(super) async fn act(
    State(state): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return error_page(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    let Some(session) = viewer.session.as_ref() else {
        return error_page(StatusCode::FORBIDDEN, "Log in with a write token first.");
    };
    if !session::same_origin(&headers) || !session::csrf_ok(session, form.csrf.as_deref()) {
        tracing::warn!(id, "console: finding action refused: missing or wrong CSRF token");
        return error_page(
            StatusCode::FORBIDDEN,
            "Missing or wrong CSRF token: reload the page and try again.",
        );
    }
    let Some(actor) = session.writer.clone() else {
        return error_page(
            StatusCode::FORBIDDEN,
            "This session is read only: log in with a write token to act.",
        );
    };
    let action = match (form.action.as_deref(), form.reference, form.reason) {
        (Some("acknowledge"), ..) => FindingAction::Acknowledge,
        (Some("file"), Some(reference), _) => FindingAction::File { reference },
        (Some("dismiss"), _, Some(reason)) => FindingAction::Dismiss { reason },
        _ => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Unknown action, or its reference or reason is missing.",
            )
        }
    };
    let store = Arc::clone(&state.store);
    let (taken, who) = (action.clone(), actor.clone());
    let result =
        tokio::task::spawn_blocking(move || store.act_on_finding(id, &taken, &who, SystemClock.unix_now()))
            .await;
    match result {
        Ok(Ok(finding)) => {
            tracing::info!(id, action = action.name(), %actor, state = finding.state.as_str(), "finding action taken (console)");
            Redirect::to(&format!("/console/findings/{id}")).into_response()
        }
        Ok(Err(e @ StoreError::FindingNotFound(_))) => error_page(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ StoreError::InvalidTransition { .. })) => error_page(StatusCode::CONFLICT, &e.to_string()),
        Ok(Err(e @ StoreError::InvalidAction(_))) => error_page(StatusCode::BAD_REQUEST, &e.to_string()),
        Ok(Err(e)) => super::failed(store_error(&e)),
        Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, &format!("action task failed: {e}")),
    }
}
