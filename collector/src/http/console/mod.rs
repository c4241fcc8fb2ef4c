//! The compliance console: server-rendered HTML pages of the same data as the JSON read
//! API, where operators see how close each tenant is to a threshold and act on findings.
//!
//! - `GET /`: overview (open findings, tenants, usage without a tenant, hosts);
//! - `GET /console/tenants/{id}`: a tenant's cumulative operations over time against the
//!   thresholds ([`chart`]), its runs, per-host and per-method breakdown, its findings;
//! - `GET /console/findings/{id}`: a finding with its evidence windows, filing record and
//!   audit records, and the lifecycle forms; `POST` the same path takes an action;
//!   `GET /console/findings/{id}/record`: the print-ready filing record;
//! - `GET /console/hosts`: every host's last report and poll, dark state, the policy
//!   version it enforces and its open enforcement mismatches;
//! - `GET|POST /console/login`, `POST /console/logout`: the session ([`session`]).
//!
//! Access follows the read API's rule: with a read token configured, a page needs a session
//! (or the bearer token, for scripts); without one, pages are served to loopback clients only
//! (and need no login to read). Acting on a finding always needs a session opened with a
//! write token, and the session's CSRF token. No page runs a script: the chart is SVG drawn
//! here, the stylesheet is served by the collector, and the Content-Security-Policy allows
//! nothing else.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use super::ApiState;
use crate::http::html::esc;

pub mod chart;
mod finding;
mod hosts;
mod overview;
pub mod session;
mod tenant;
pub mod units;

pub use session::Sessions;

/// The login page.
pub const LOGIN: &str = "/console/login";
const LOGOUT: &str = "/console/logout";
const STYLESHEET: &str = "/console/console.css";
/// The hosts page.
pub const HOSTS_PAGE: &str = "/console/hosts";

/// Who is looking at a page: the session, if the browser has one.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    session: Option<session::Session>,
}

impl Viewer {
    /// The write token's name of the session, if it may act.
    pub fn writer(&self) -> Option<&str> {
        self.session.as_ref().and_then(|s| s.writer.as_deref())
    }

    fn csrf(&self) -> &str {
        self.session.as_ref().map_or("", |s| s.csrf.as_str())
    }
}

/// The console's routes (the access rule applied).
pub fn routes(state: ApiState) -> Router<ApiState> {
    Router::new()
        .route("/", get(overview::page_route))
        .route(LOGIN, get(login_form).post(login))
        .route(LOGOUT, axum::routing::post(logout))
        .route(STYLESHEET, get(stylesheet))
        .route("/console/tenants/{id}", get(tenant::page_route))
        .route("/console/findings/{id}", get(finding::page_route).post(finding::act))
        .route("/console/findings/{id}/record", get(finding::record))
        .route(HOSTS_PAGE, get(hosts::page_route))
        .route_layer(axum::middleware::from_fn_with_state(state, access))
}

async fn access(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let open_reads = !state.access.has_token();
    if open_reads && !peer.ip().is_loopback() {
        tracing::warn!(%peer, path, "console: refused a non-loopback client (no --read-token-file)");
        return error_page(
            StatusCode::FORBIDDEN,
            "The console is served to loopback clients only unless a read token is configured.",
        );
    }
    let session = state.sessions.find(request.headers());
    let public = path == LOGIN || path == STYLESHEET;
    if session.is_none() && !public && !open_reads && !state.access.bearer_ok(request.headers()) {
        if request.method() == Method::GET {
            return Redirect::to(LOGIN).into_response();
        }
        tracing::warn!(%peer, path, "console: POST without a session refused");
        return error_page(StatusCode::FORBIDDEN, "Log in first.");
    }
    request.extensions_mut().insert(Viewer { session });
    next.run(request).await
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:center}\
header a{color:#fff;text-decoration:none;font-weight:600}header .who{margin-left:auto;font-size:.9em}\
header form{display:inline}main{padding:1em 1.5em;max-width:1400px}h1{font-size:1.5em;margin:.3em 0}\
h2{font-size:1.15em;margin:1.4em 0 .4em}table{border-collapse:collapse;background:#fff;margin:.3em 0}\
td,th{border:1px solid #d5d9e0;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#eceff3}\
td.num{text-align:right;font-variant-numeric:tabular-nums}.foreign{color:#a40000;font-weight:600}\
.state{padding:.1em .5em;border-radius:.8em;background:#e3e7ee}.state.open{background:#ffd8d8}\
.state.acknowledged{background:#ffeec2}.state.filed{background:#d3f2d6}.state.dismissed{background:#e3e3e3}\
.dark{color:#a40000;font-weight:600}.ok{color:#1b6e2a}.warn{color:#a05a00;font-weight:600}\
.cards{display:flex;gap:.8em;flex-wrap:wrap}.card{background:#fff;border:1px solid #d5d9e0;padding:.5em .9em;min-width:9em}\
.card b{display:block;font-size:1.3em}form.action{background:#fff;border:1px solid #d5d9e0;padding:.6em 1em;margin:.4em 0}\
input[type=text],input[type=password]{width:24em;padding:.25em}button{padding:.3em 1em;cursor:pointer}\
pre{background:#fff;border:1px solid #d5d9e0;padding:.6em;overflow:auto;max-height:24em}\
.error{background:#ffd8d8;border:1px solid #a40000;padding:.6em 1em}.muted{color:#5d6675}\
svg.chart{background:#fff;border:1px solid #d5d9e0;max-width:100%;height:auto}\
svg .band{fill:#8fb4e8;fill-opacity:.45;stroke:#4f7fc4;stroke-width:.8}\
svg .point-series{fill:none;stroke:#0b3d91;stroke-width:2}svg .point{fill:#0b3d91}\
svg .grid{stroke:#e3e6eb;stroke-width:1}svg .axis-line{stroke:#5d6675}svg .axis{font-size:11px;fill:#5d6675}\
svg .threshold{stroke-width:1.5;stroke-dasharray:6 4}svg .threshold.early-warning{stroke:#d08b00}\
svg .threshold.training{stroke:#c00000}svg .threshold.bio{stroke:#7a1fa2}svg .threshold-label{font-size:11px}\
svg .threshold-label.early-warning{fill:#a06a00}svg .threshold-label.training{fill:#c00000}\
svg .threshold-label.bio{fill:#7a1fa2}svg .run{fill:#2e8540;fill-opacity:.12}\
.legend span{margin-right:1.2em}.swatch{display:inline-block;width:1.6em;height:.7em;vertical-align:middle;margin-right:.3em}\
.swatch.band{background:#8fb4e8}.swatch.point{background:#0b3d91;height:.2em}.swatch.run{background:#d5ecd9}\
.swatch.early-warning{border-top:2px dashed #d08b00;height:0}.swatch.training{border-top:2px dashed #c00000;height:0}\
.swatch.bio{border-top:2px dashed #7a1fa2;height:0}";

async fn stylesheet() -> Response {
    let mut r = CSS.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
    r
}

/// Headers every console page carries: no scripts, no framing, no caching of tenant data, no
/// referrer to other sites (`same-origin`: with `no-referrer` browsers send `Origin: null` on
/// the console's own forms, which [`session::same_origin`] would refuse).
fn secure_headers(r: &mut Response, csp: &'static str) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// A console page: the header (navigation, who is logged in), then `body`.
fn page(status: StatusCode, title: &str, viewer: Option<&Viewer>, body: &str) -> Response {
    let who = match viewer.and_then(|v| v.session.as_ref()) {
        Some(s) => format!(
            "<span class=\"who\">{} · <form method=\"post\" action=\"{LOGOUT}\"><input type=\"hidden\" name=\"csrf\" \
             value=\"{}\"><button type=\"submit\" id=\"logout\">Log out</button></form></span>",
            s.writer.as_deref().map_or_else(|| "read only".to_owned(), |w| format!("acting as {}", esc(w))),
            esc(&s.csrf)
        ),
        None if viewer.is_some() => "<span class=\"who\">not logged in (loopback)</span>".to_owned(),
        None => String::new(),
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · kycd collector</title>\
         <link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"{STYLESHEET}\"></head><body>\
         <header><a href=\"/\">kycd collector</a><a href=\"/\">Overview</a><a href=\"{HOSTS_PAGE}\">Hosts</a>{who}</header>\
         <main>{body}</main></body></html>",
        esc(title)
    );
    let mut r = (status, html).into_response();
    secure_headers(&mut r, CSP);
    r
}

/// An error page.
fn error_page(status: StatusCode, message: &str) -> Response {
    page(
        status,
        "Error",
        None,
        &format!("<h1>{}</h1><p class=\"error\">{}</p>", status.as_u16(), esc(message)),
    )
}

/// The page of a failed read.
fn failed(e: super::response::ApiError) -> Response {
    let (status, message) = e.parts();
    error_page(status, &message)
}

fn login_html(message: Option<&str>) -> String {
    let note = message.map(|m| format!("<p class=\"error\">{}</p>", esc(m))).unwrap_or_default();
    format!(
        "<h1>Log in</h1>{note}<p>Paste the collector's read token (to read), or your named write token (to \
         acknowledge, file and dismiss findings under your name).</p>\
         <form method=\"post\" action=\"{LOGIN}\" class=\"action\"><label>Token <input type=\"password\" \
         name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label> \
         <button type=\"submit\" id=\"login\">Log in</button></form>"
    )
}

async fn login_form() -> Response {
    page(StatusCode::OK, "Log in", None, &login_html(None))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !session::same_origin(&headers) {
        return error_page(StatusCode::FORBIDDEN, "The form was posted from another site.");
    }
    let token = form.map(|Form(f)| f.token).unwrap_or_default();
    let token = token.trim();
    let writer = state.writers.writer(token).map(str::to_owned);
    if writer.is_none() && !state.access.token_ok(token) {
        tracing::warn!(%peer, "console: login with a wrong token");
        return page(
            StatusCode::UNAUTHORIZED,
            "Log in",
            None,
            &login_html(Some("That token is not valid here.")),
        );
    }
    let (cookie, _) = match state.sessions.open(writer.clone()) {
        Ok(opened) => opened,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    tracing::info!(%peer, writer = writer.as_deref().unwrap_or("-"), "console: logged in");
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().insert(header::SET_COOKIE, session::set_cookie(&headers, Some(&cookie)));
    r
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(state): State<ApiState>,
    axum::Extension(viewer): axum::Extension<Viewer>,
    headers: axum::http::HeaderMap,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let presented = form.ok().and_then(|Form(f)| f.csrf);
    match &viewer.session {
        Some(s) if session::same_origin(&headers) && session::csrf_ok(s, presented.as_deref()) => {
            state.sessions.close(&headers);
            let mut r = Redirect::to(LOGIN).into_response();
            r.headers_mut().insert(header::SET_COOKIE, session::set_cookie(&headers, None));
            r
        }
        _ => error_page(StatusCode::FORBIDDEN, "Missing or wrong CSRF token."),
    }
}

/// A link to a tenant's page.
fn tenant_link(tenant: &str) -> String {
    format!("<a href=\"/console/tenants/{}\">{}</a>", units::segment(tenant), esc(tenant))
}

/// A link to a finding's page.
fn finding_link(id: i64) -> String {
    format!("<a href=\"/console/findings/{id}\">#{id}</a>")
}

/// A finding's state as a badge.
fn state_badge(state: crate::fleet::FindingState) -> String {
    format!("<span class=\"state {0}\">{0}</span>", state.as_str())
}
