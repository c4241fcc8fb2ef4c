//! The JSON read API and the policy distribution endpoint (routed in [`super::api_router`]).
//!
//! - `GET /v1/policy`: the published policy (compact JWS, `application/jose`) with an
//!   `ETag`; a matching `If-None-Match` gets `304`; none published: `404`. Public: the policy
//!   is signed and agents verify it against their own trust anchors.
//! - `GET /v1/tenants[?after=ID&limit=N]`, `GET /v1/tenants/{id}`, `GET /v1/findings[?state=
//!   open|resolved&kind=K&tenant=T&host=H&after=ID&limit=N]`, `GET /v1/hosts[?after=ID&
//!   limit=N]`: JSON, paginated by cursor (`next` is the `after` of the next page, absent on
//!   the last page); `limit` defaults to 100, at most 1000.
//! - `GET /v1/unattributed[?after=HOST/WORKLOAD&limit=N]`: the usage no tenant is known for
//!   (workloads without a valid attestation), per host and workload, with its open findings;
//!   paginated the same way, by `host/workload`.
//!
//! The read endpoints expose tenants' legal names and countries: they need the bearer token
//! of `--read-token-file` when one is configured, and are served only to loopback clients
//! when none is (an operator tunnels in). Refusals are 401/403 JSON errors and a log line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::response::{api_error, blocking, error, ApiError};
use super::ApiState;
use crate::fleet::{FindingKind, FindingQuery, FindingState, TenantIdentity, TenantUsage, UnattributedUsage};
use crate::store::{Storage, StoreError};

/// Default and largest page size.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page size.
pub const MAX_PAGE: u32 = 1000;

/// Who may read.
#[derive(Clone)]
pub struct ReadAccess {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for ReadAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAccess").field("token", &self.token.as_ref().map(|_| "<redacted>")).finish()
    }
}

impl ReadAccess {
    /// Readers must present this bearer token.
    pub fn token(token: &str) -> Self {
        ReadAccess { token: Some(Arc::from(token.trim())) }
    }

    /// No token: loopback clients only.
    pub fn loopback_only() -> Self {
        ReadAccess { token: None }
    }

    /// Whether readers must present a token (otherwise: loopback clients only).
    pub(super) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `presented` is the read token (compared in constant time).
    pub(super) fn token_ok(&self, presented: &str) -> bool {
        self.token.as_ref().is_some_and(|t| constant_time_eq(presented.trim().as_bytes(), t.as_bytes()))
    }

    /// Whether the request carries the read token as its bearer token.
    pub(super) fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|p| self.token_ok(p))
    }
}

/// The bearer token of a request's `Authorization` header.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn authorize(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    match &state.access.token {
        Some(token) => {
            let presented = bearer(request.headers());
            if !presented.is_some_and(|p| constant_time_eq(p.trim().as_bytes(), token.as_bytes())) {
                tracing::warn!(%peer, path, "read API: missing or wrong bearer token");
                let mut r =
                    error(StatusCode::UNAUTHORIZED, "Unauthorized", "a valid bearer token is required");
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        None if !peer.ip().is_loopback() => {
            tracing::warn!(%peer, path, "read API: refused a non-loopback client (no --read-token-file)");
            return error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "the read API is served to loopback clients only unless a read token is configured",
            );
        }
        None => {}
    }
    next.run(request).await
}

pub(super) async fn policy(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let store = Arc::clone(&state.store);
    let current = match blocking(move || store.current_policy()).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let Some(policy) = current else {
        return error(StatusCode::NOT_FOUND, "NoPolicy", "no policy has been published");
    };
    let etag = policy.etag();
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let etag_value = HeaderValue::from_str(&etag).unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = policy.token.into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jose"));
        r
    };
    response.headers_mut().insert(header::ETAG, etag_value);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Pagination and filters of the list endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Cursor: the `next` of the previous page.
    pub after: Option<String>,
    /// Page size.
    pub limit: Option<u32>,
    /// Findings: state filter.
    pub state: Option<String>,
    /// Findings: kind filter.
    pub kind: Option<String>,
    /// Findings: tenant filter.
    pub tenant: Option<String>,
    /// Findings: host filter.
    pub host: Option<String>,
}

type ListQuery = Result<Query<ListParams>, axum::extract::rejection::QueryRejection>;

/// The parameters of a list request and its page size.
fn list_request(query: ListQuery) -> Result<(ListParams, u32), ApiError> {
    let params = query
        .map(|Query(p)| p)
        .map_err(|e| api_error(StatusCode::BAD_REQUEST, "BadRequest", e.body_text()))?;
    match params.limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok((params, n)),
        n => Err(api_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("limit {n} is not in 1..={MAX_PAGE}"),
        )),
    }
}

/// One page of a list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The cursor of the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A tenant as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantSummary {
    /// Tenant id.
    pub tenant: String,
    /// Identity from host statements, if a statement named it.
    pub identity: Option<TenantIdentity>,
    /// Foreign person (identity first, reported windows otherwise).
    pub foreign_person: bool,
    /// Aggregated usage.
    pub usage: TenantUsage,
    /// Open findings about it.
    pub open_findings: Vec<FindingKind>,
}

/// Every tenant with usage, joined with identity and open findings.
pub fn tenant_summaries(store: &dyn Storage, since: Option<i64>) -> Result<Vec<TenantSummary>, StoreError> {
    Ok(fleet_summaries(store, since)?.0)
}

/// Every tenant with usage (joined with identity and open findings) and every (host,
/// workload) with usage and no tenant (with its open findings, by `host/workload`), from one
/// aggregation pass.
pub fn fleet_summaries(
    store: &dyn Storage,
    since: Option<i64>,
) -> Result<(Vec<TenantSummary>, Vec<UnattributedSummary>), StoreError> {
    let identities: BTreeMap<String, TenantIdentity> =
        store.tenant_identities()?.into_iter().map(|i| (i.tenant.clone(), i)).collect();
    let mut open: BTreeMap<String, Vec<FindingKind>> = BTreeMap::new();
    let mut open_unattributed: BTreeMap<String, Vec<FindingKind>> = BTreeMap::new();
    for f in crate::findings::active_findings(store)? {
        if f.finding.kind == FindingKind::UnattributedTrainingScale {
            open_unattributed.entry(f.finding.subject.clone()).or_default().push(f.finding.kind);
        } else if let Some(t) = &f.finding.tenant {
            open.entry(t.clone()).or_default().push(f.finding.kind);
        }
    }
    // A listing shows totals, not runs: the roll-ups without the busy segments.
    let fleet = match since {
        None => store.rollup_usage(crate::fleet::rollup::Segments::None)?,
        Some(_) => store.fleet_usage(since)?,
    };
    let tenants = fleet
        .tenants
        .into_iter()
        .map(|usage| {
            let identity = identities.get(&usage.tenant).cloned();
            TenantSummary {
                foreign_person: identity.as_ref().map_or(usage.foreign_person, |i| i.foreign_person),
                open_findings: open.remove(&usage.tenant).unwrap_or_default(),
                tenant: usage.tenant.clone(),
                identity,
                usage,
            }
        })
        .collect();
    let mut unattributed: Vec<UnattributedSummary> = fleet
        .unattributed
        .into_iter()
        .map(|usage| {
            let subject = usage.subject();
            let open_findings = open_unattributed.remove(&subject).unwrap_or_default();
            UnattributedSummary { open_findings, subject, usage }
        })
        .collect();
    // By the cursor's own order ("a-b/x" sorts before "a/x"), so pages never skip.
    unattributed.sort_by(|a, b| a.subject.cmp(&b.subject));
    Ok((tenants, unattributed))
}

pub(super) fn paginate<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    after: Option<&str>,
    limit: u32,
) -> Page<T> {
    let mut page: Vec<T> = items.into_iter().filter(|i| after.is_none_or(|a| key(i).as_str() > a)).collect();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = page.len() > limit;
    page.truncate(limit);
    let next = if more { page.last().map(&key) } else { None };
    Page { items: page, next }
}

pub(super) async fn tenants(State(state): State<ApiState>, query: ListQuery) -> Response {
    let (p, limit) = match list_request(query) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let store = Arc::clone(&state.store);
    match blocking(move || tenant_summaries(store.as_ref(), None)).await {
        Ok(all) => Json(paginate(all, |t| t.tenant.clone(), p.after.as_deref(), limit)).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn tenant(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let store = Arc::clone(&state.store);
    let lookup = id.clone();
    let found = blocking(move || {
        let usage = store.tenant_usage(Some(&lookup), None)?.into_iter().next();
        let identity = store.tenant_identities()?.into_iter().find(|i| i.tenant == lookup);
        let hosts = store.tenant_hosts(&lookup)?;
        let windows = store.usage_evidence(&lookup, crate::findings::EVIDENCE_WINDOWS)?;
        let findings = store.list_findings(&FindingQuery {
            tenant: Some(lookup.clone()),
            limit: MAX_PAGE,
            ..FindingQuery::default()
        })?;
        Ok((usage, identity, hosts, windows, findings))
    })
    .await;
    match found {
        Ok((None, None, ..)) => error(StatusCode::NOT_FOUND, "NotFound", format!("no tenant {id:?}")),
        Ok((usage, identity, hosts, windows, findings)) => Json(json!({
            "tenant": id,
            "identity": identity,
            "usage": usage,
            "hosts": hosts,
            "top_windows": windows,
            "findings": findings,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn findings(State(state): State<ApiState>, query: ListQuery) -> Response {
    let (p, limit) = match list_request(query) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let bad =
        |what: &str, v: &str| error(StatusCode::BAD_REQUEST, "BadRequest", format!("unknown {what} {v:?}"));
    let state_filter = match p.state.as_deref().map(|s| FindingState::parse(s).ok_or(s)) {
        Some(Err(s)) => return bad("state", s),
        other => other.and_then(Result::ok),
    };
    let kind = match p.kind.as_deref().map(|k| FindingKind::parse(k).ok_or(k)) {
        Some(Err(k)) => return bad("kind", k),
        other => other.and_then(Result::ok),
    };
    let after_id = match p.after.as_deref().map(str::parse::<i64>) {
        Some(Err(_)) => return bad("cursor", p.after.as_deref().unwrap_or_default()),
        Some(Ok(id)) => id,
        None => 0,
    };
    let query = FindingQuery {
        state: state_filter,
        kind,
        tenant: p.tenant,
        host_id: p.host,
        after_id,
        limit: limit.saturating_add(1),
        ..FindingQuery::default()
    };
    let store = Arc::clone(&state.store);
    match blocking(move || store.list_findings(&query)).await {
        Ok(mut items) => {
            let more = items.len() > limit as usize;
            items.truncate(limit as usize);
            let next = if more { items.last().map(|f| f.id.to_string()) } else { None };
            Json(Page { items, next }).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// A host as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct HostSummary {
    /// Host id.
    pub host_id: String,
    /// Enrolled at.
    pub enrolled_at: i64,
    /// Enrollment epoch of the current key.
    pub epoch: u64,
    /// Highest contiguous stored seq of the current epoch.
    pub acked_seq: u64,
    /// Last report stored.
    pub last_report_at: Option<i64>,
    /// Whether a `host_dark` finding is open for it.
    pub dark: bool,
}

/// Every enrolled host with its last report and dark state.
pub fn host_summaries(store: &dyn Storage) -> Result<Vec<HostSummary>, StoreError> {
    let last = store.last_report_at()?;
    let dark: std::collections::BTreeSet<String> = crate::findings::active_findings(store)?
        .into_iter()
        .filter(|f| f.finding.kind == FindingKind::HostDark)
        .filter_map(|f| f.finding.host_id)
        .collect();
    Ok(store
        .list_hosts()?
        .into_iter()
        .map(|h| HostSummary {
            last_report_at: last.get(&h.host_id).copied(),
            dark: dark.contains(&h.host_id),
            host_id: h.host_id,
            enrolled_at: h.enrolled_at,
            epoch: h.epoch,
            acked_seq: h.acked_seq,
        })
        .collect())
}

pub(super) async fn hosts(State(state): State<ApiState>, query: ListQuery) -> Response {
    let (p, limit) = match list_request(query) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let store = Arc::clone(&state.store);
    match blocking(move || host_summaries(store.as_ref())).await {
        Ok(all) => Json(paginate(all, |h| h.host_id.clone(), p.after.as_deref(), limit)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Usage without a tenant as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct UnattributedSummary {
    /// `host/workload`, the cursor of the list.
    pub subject: String,
    /// Aggregated usage.
    #[serde(flatten)]
    pub usage: UnattributedUsage,
    /// Open findings about it.
    pub open_findings: Vec<FindingKind>,
}

/// Every (host, workload) with usage and no tenant, by `host/workload`, with open findings.
pub fn unattributed_summaries(store: &dyn Storage) -> Result<Vec<UnattributedSummary>, StoreError> {
    Ok(fleet_summaries(store, None)?.1)
}

pub(super) async fn unattributed(State(state): State<ApiState>, query: ListQuery) -> Response {
    let (p, limit) = match list_request(query) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let store = Arc::clone(&state.store);
    match blocking(move || unattributed_summaries(store.as_ref())).await {
        Ok(all) => Json(paginate(all, |u| u.subject.clone(), p.after.as_deref(), limit)).into_response(),
        Err(e) => e.into_response(),
    }
}
