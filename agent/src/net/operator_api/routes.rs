//! The operator socket's HTTP routes: each handler checks the caller's access, turns the
//! request into an [`ApiRequest`] for the main loop and answers its reply as JSON.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kycd_protocol::wire::operator;
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::peer::{Access, Peer};
use super::{Admission, AdmitBody, ApiRequest};
use crate::discovery::workload::WorkloadId;

/// Largest request body (an attestation is at most 64 KiB).
const MAX_BODY_BYTES: usize = 128 * 1024;

/// How long a request waits for the agent's main loop.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the API on `listener` until `shutdown` is cancelled, within `limits` (connection
/// cap, header-read and idle timeouts: see [`kycd_net`]); `stats` counts its connections.
pub async fn serve(
    listener: UnixListener,
    requests: mpsc::Sender<ApiRequest>,
    limits: kycd_net::Limits,
    stats: std::sync::Arc<kycd_net::ConnStats>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(operator::ADMIT, post(admit))
        .route(operator::STATUS, get(status))
        .route(operator::WORKLOADS, get(workloads))
        .route(operator::RELOAD, post(reload))
        .route(operator::GPUS, get(gpus))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(requests);
    // Credentials are read once per connection, in the connection's own task.
    let prepare = |stream: tokio::net::UnixStream, _| async move {
        let peer = Peer::of(&stream);
        Some((stream, peer))
    };
    // Per-user cap: one group member cannot take every place; root is never capped per user.
    let user = |stream: &tokio::net::UnixStream, _: &_| {
        stream.peer_cred().ok().map(|c| c.uid()).filter(|uid| *uid != 0)
    };
    kycd_net::serve(listener, app, limits, stats, shutdown, user, prepare).await;
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({"error": message.into()}))).into_response()
}

/// Refuses callers below `needed` (the refusal to answer), logging who and what.
fn refuse(
    requests: &mpsc::Sender<ApiRequest>,
    peer: Peer,
    needed: Access,
    what: &'static str,
) -> Option<Response> {
    if peer.access >= needed {
        return None;
    }
    warn!(uid = ?peer.uid, request = what, "operator API: permission denied");
    // Recorded in the audit log when the loop has room; a flood of refusals must not
    // crowd out real requests.
    let _ = requests.try_send(ApiRequest::Refused { uid: peer.uid, request: what });
    let message = match needed {
        Access::Admin => format!("{what} is for root only"),
        _ => format!("{what} is for root and members of the socket's group"),
    };
    Some(error(StatusCode::FORBIDDEN, message))
}

/// Sends `make(reply)` to the main loop and waits for the answer.
async fn ask<T>(
    requests: &mpsc::Sender<ApiRequest>,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest,
) -> Result<T, &'static str> {
    let (reply, answer) = oneshot::channel();
    if requests.try_send(make(reply)).is_err() {
        return Err("the agent is busy; retry");
    }
    match tokio::time::timeout(AGENT_TIMEOUT, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        _ => Err("the agent did not answer"),
    }
}

/// A request that needs `needed` access and answers the main loop's reply as JSON.
async fn answer<T: Serialize>(
    requests: mpsc::Sender<ApiRequest>,
    peer: Peer,
    needed: Access,
    what: &'static str,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest,
) -> Response {
    if let Some(refused) = refuse(&requests, peer, needed, what) {
        return refused;
    }
    match ask(&requests, make).await {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(why) => error(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn status(
    State(requests): State<mpsc::Sender<ApiRequest>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Response {
    answer(requests, peer, Access::Read, "status", ApiRequest::Status).await
}

async fn workloads(
    State(requests): State<mpsc::Sender<ApiRequest>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Response {
    answer(requests, peer, Access::Read, "workloads", ApiRequest::Workloads).await
}

async fn gpus(
    State(requests): State<mpsc::Sender<ApiRequest>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Response {
    answer(requests, peer, Access::Read, "gpus", ApiRequest::Gpus).await
}

async fn reload(
    State(requests): State<mpsc::Sender<ApiRequest>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Response {
    let reload = |reply: oneshot::Sender<()>| ApiRequest::Reload(reply);
    match answer(requests, peer, Access::Admin, "reload", reload).await {
        r if r.status() == StatusCode::OK => {
            axum::Json(serde_json::json!({"reloaded": true})).into_response()
        }
        r => r,
    }
}

async fn admit(
    State(requests): State<mpsc::Sender<ApiRequest>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse(&requests, peer, Access::Admin, "admission") {
        return refused;
    }
    let body: AdmitBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")),
    };
    let workload: WorkloadId = match body.workload.parse() {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let libvirt_uuid = body.libvirt_uuid.map(|u| u.to_ascii_lowercase());
    if libvirt_uuid.as_ref().is_some_and(|u| !crate::discovery::cgroup::is_uuid(u)) {
        return error(StatusCode::BAD_REQUEST, "libvirt_uuid is not a UUID");
    }
    let admission =
        Admission { workload, attestation: body.attestation.map(String::into_bytes), libvirt_uuid };
    match ask(&requests, |reply| ApiRequest::Admit(admission, reply)).await {
        Ok(answer) => {
            info!(workload = %answer.workload, verdict = ?answer.verdict, "admission answered");
            axum::Json(answer).into_response()
        }
        Err(why) => error(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
