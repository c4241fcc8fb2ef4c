//! The collector's HTTP server (axum, HTTP/1.1): what each route is, and how the server runs.
//!
//! - [`ingest`]: `POST /v1/reports`, the agents' report uploads.
//! - [`read_api`]: `GET /v1/policy` (public) and the JSON read API (`/v1/tenants`,
//!   `/v1/findings`, `/v1/hosts`, [`UNATTRIBUTED`]), behind the read access rule.
//! - [`console`]: `GET /` and `/console/…`, the compliance console (server-rendered HTML,
//!   browser sessions, finding actions with CSRF protection), behind the same read rule.
//! - [`html`]: HTML escaping.
//! - [`actions`]: `POST /v1/findings/{id}/{acknowledge|file|dismiss}`, behind named write
//!   tokens.
//! - [`metrics`]: `GET /metrics`, Prometheus text, behind the read access rule.
//! - [`response`]: the JSON error responses all of them answer with.
//! - `GET /healthz` → `ok`.
//!
//! The route table is here, so the handler modules never import each other's routers. The
//! listener and the shutdown token are parameters ([`run`], [`serve`]), so tests bind
//! `127.0.0.1:0` and stop the server deterministically.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use kycd_protocol::wire::collector::{FINDINGS, HOSTS, POLICY, REPORTS, TENANTS};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ingest::Ingestor;
use crate::store::Storage;

pub mod actions;
pub mod console;
pub mod html;
pub mod ingest;
pub mod metrics;
pub mod read_api;
pub mod response;

pub use actions::WriteAccess;
pub use read_api::ReadAccess;
pub use response::RETRY_AFTER_S;

/// Shared state of the read API, the finding actions and the console (here, above the three,
/// so none of them imports another for it).
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Storage.
    pub store: Arc<dyn Storage>,
    /// Who may read.
    pub access: ReadAccess,
    /// Who may act on findings (named write tokens).
    pub writers: actions::WriteAccess,
    /// The console's browser sessions.
    pub sessions: console::Sessions,
}

impl ApiState {
    /// The state over `store` with these readers and writers, and no console session yet.
    pub fn new(store: Arc<dyn Storage>, access: ReadAccess, writers: actions::WriteAccess) -> Self {
        ApiState { store, access, writers, sessions: console::Sessions::default() }
    }
}

/// The server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Serving failed.
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
}

/// The usage without a tenant, per host and workload (read API).
pub use kycd_protocol::wire::collector::UNATTRIBUTED;

/// The collector's routes over `ingestor`.
pub fn router(ingestor: Arc<Ingestor>) -> Router {
    let limit = ingestor.limits().max_body_bytes;
    Router::new()
        .route(REPORTS, post(ingest::post_reports).layer(DefaultBodyLimit::max(limit)))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(ingestor)
}

/// Routes of the read API and the console (authorised) and `GET /v1/policy` (public).
pub fn api_router(state: ApiState) -> Router {
    let reads = Router::new()
        .route(TENANTS, get(read_api::tenants))
        .route(&format!("{TENANTS}/{{id}}"), get(read_api::tenant))
        .route(FINDINGS, get(read_api::findings))
        .route(HOSTS, get(read_api::hosts))
        .route(UNATTRIBUTED, get(read_api::unattributed))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), read_api::authorize));
    // Actions authenticate by their own (named) tokens, not the read rule.
    let actions = Router::new().route(
        &format!("{FINDINGS}/{{id}}/{{action}}"),
        post(actions::act).layer(DefaultBodyLimit::max(actions::MAX_ACTION_BODY)),
    );
    let console = console::routes(state.clone());
    Router::new()
        .route(POLICY, get(read_api::policy))
        .merge(reads)
        .merge(actions)
        .merge(console)
        .with_state(state)
}

/// Serves report ingest alone on `listener` until `shutdown` is cancelled (see [`serve`]).
pub async fn run(
    listener: TcpListener,
    ingestor: Arc<Ingestor>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    serve(listener, router(ingestor), shutdown).await
}

/// The whole collector: report ingest plus the read API and policy endpoint
/// ([`api_router`]) and `GET /metrics`.
pub fn app(ingestor: Arc<Ingestor>, api: ApiState) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(metrics::metrics))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), read_api::authorize))
        .with_state(metrics::MetricsState { ingestor: Arc::clone(&ingestor), api: api.clone() });
    router(ingestor).merge(api_router(api)).merge(metrics)
}

/// The bounds of the collector's listener (see [`kycd_net`]): what `serve --max-connections`,
/// `--max-connections-per-ip`, `--header-read-timeout-s` and `--idle-timeout-s` default to.
pub const DEFAULT_LIMITS: kycd_net::Limits = kycd_net::Limits {
    // ~12,500 agents uploading once a minute plus polls and exports need a few dozen at once;
    // 1024 leaves room and stays far below LimitNOFILE=65536.
    max_connections: 1024,
    // One agent uploads on one connection at a time; behind a load balancer (one IP for all)
    // set --max-connections-per-ip 0.
    max_per_peer: 64,
    header_read_timeout: std::time::Duration::from_secs(10),
    // Longer than a report's ingest (bounded by the database's busy timeout) and an
    // export's computation, during which no byte moves.
    idle_timeout: std::time::Duration::from_secs(60),
    // An idle keep-alive connection lasts as long as a fresh one (agents upload every few
    // seconds to minutes, on a connection of their own).
    keep_alive_timeout: std::time::Duration::from_secs(10),
};

/// Serves `app` on `listener` within [`DEFAULT_LIMITS`] until `shutdown` is cancelled (see
/// [`serve_bounded`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    serve_bounded(listener, app, DEFAULT_LIMITS, Arc::default(), shutdown).await
}

/// Serves `app` on `listener` until `shutdown` is cancelled, within `limits`: connections
/// past the cap (or past the per-IP cap) are refused, a request head must arrive within the
/// header-read timeout and a connection idle past the idle timeout is closed, so clients
/// that never finish cannot starve `/healthz` or ingest. On shutdown it stops accepting and
/// waits for in-flight requests to finish (the caller bounds that with a grace timeout).
/// Handlers see the peer address (`ConnectInfo`), which the read API's loopback rule needs.
pub async fn serve_bounded(
    listener: TcpListener,
    app: Router,
    limits: kycd_net::Limits,
    stats: Arc<kycd_net::ConnStats>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    kycd_net::serve(listener, app, limits, stats, shutdown, kycd_net::peer_ip, kycd_net::plain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::html::esc;
    use super::read_api::{constant_time_eq, paginate};

    #[test]
    fn html_escaping_and_pagination() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let items: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let first = paginate(items.clone(), Clone::clone, None, 2);
        assert_eq!(
            (first.items.as_slice(), first.next.as_deref()),
            (&["a".to_owned(), "b".to_owned()][..], Some("b"))
        );
        let second = paginate(items, Clone::clone, first.next.as_deref(), 2);
        assert_eq!((second.items, second.next), (vec!["c".to_owned()], None));
        assert!(
            constant_time_eq(b"abc", b"abc")
                && !constant_time_eq(b"abc", b"abd")
                && !constant_time_eq(b"a", b"ab")
        );
    }
}
