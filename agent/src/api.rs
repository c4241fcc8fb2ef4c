//! The operators' local API: HTTP/1.1 JSON over the Unix socket `api.socket`
//! (`/run/kycd/kycd.sock`), and the client `kycctl` uses to talk to it.
//!
//! The server owns no agent state: each request becomes an [`ApiRequest`] on a bounded
//! channel to the daemon's main loop, which answers over a oneshot. A full channel answers
//! 503 at once rather than queueing without bound. Who is calling is read from the socket
//! (`SO_PEERCRED`): mutations — admission — are accepted from root only.
//!
//! Who may do what: reads for root and members of the socket's group (`api.socket_group`);
//! mutations (admit, reload) for root only. The caller is pinned by its process start time
//! (from `/proc/PID/stat`), read again after its groups, so a PID reused in between is not
//! mistaken for the original caller. Refusals answer 403 and are logged.
//!
//! Endpoints:
//! - `GET /healthz` → `ok`.
//! - `GET /v1/status` → [`Status`]; `GET /v1/workloads` → [`WorkloadRow`]s;
//!   `GET /v1/gpus` → GPU inventory, utilization and per-tenant usage.
//! - `POST /v1/reload` → reloads trust anchors, the policy and attestations (SIGHUP).
//! - `POST /v1/admit` `{"workload": "KIND:ID", "attestation"?: "<JWS>", "libvirt_uuid"?: "…"}`
//!   → 200 `{"workload", "verdict", "decision"?, "error"?}`; the verdict is `deny` when the
//!   attestation is rejected or the decision could not be recorded.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kycd_protocol::Verdict;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::decision::Decision;
use crate::discovery::workload::WorkloadId;

/// Largest request body (an attestation is at most 64 KiB).
const MAX_BODY_BYTES: usize = 128 * 1024;

/// How long a request waits for the agent's main loop.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `api.socket_group` names no group in /etc/group.
    #[error("api.socket_group {0:?}: no such group in /etc/group")]
    UnknownGroup(String),
}

/// A request for the daemon's main loop.
#[derive(Debug)]
pub enum ApiRequest {
    /// Decide on a workload about to start, with the attestation it brings.
    Admit(Admission, oneshot::Sender<AdmitAnswer>),
    /// The agent's state at a glance.
    Status(oneshot::Sender<Status>),
    /// Every workload with its decision.
    Workloads(oneshot::Sender<Vec<WorkloadRow>>),
    /// Reload trust anchors, the policy and attestations.
    Reload(oneshot::Sender<()>),
    /// Prometheus text.
    Metrics(oneshot::Sender<String>),
    /// GPUs and per-tenant usage.
    Gpus(oneshot::Sender<serde_json::Value>),
    /// A caller was refused (recorded in the audit log).
    Refused {
        /// Its uid (`None`: credentials unreadable).
        uid: Option<u32>,
        /// What it asked for.
        request: &'static str,
    },
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Agent version.
    pub version: String,
    /// This host's id.
    pub host_id: String,
    /// `audit` or `enforce`.
    pub mode: String,
    /// When the agent started (Unix seconds).
    pub started_at: i64,
    /// Seconds since.
    pub uptime_s: i64,
    /// The policy in force.
    pub policy: Option<PolicyStatus>,
    /// Key ids trusted for attestations.
    pub issuer_kids: Vec<String>,
    /// Key ids trusted for the policy.
    pub policy_kids: Vec<String>,
    /// Workloads per verdict.
    pub verdicts: std::collections::BTreeMap<String, usize>,
    /// Attestations in force.
    pub attestations: usize,
    /// GPU backend state (`available`, `unavailable: …`, `disabled`).
    pub gpu: String,
    /// Consecutive evaluations whose decisions could not be recorded (0 = healthy).
    pub audit_failures: u32,
    /// Audit log appends that failed since start (any record, not only decisions).
    #[serde(default)]
    pub audit_write_failures: u64,
    /// The last audit append's error; absent when the last append succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_last_error: Option<String>,
    /// Inputs (attestations, libvirt's status) that could not be read for want of resources
    /// or a failing disk (EMFILE, ENFILE, EIO, …) since start; what they said before was kept.
    #[serde(default)]
    pub input_read_errors: u64,
    /// The last such failure: when (Unix seconds) and what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_read_error: Option<(i64, String)>,
    /// Connection counters per listener (`socket`, `collector_api`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub connections: std::collections::BTreeMap<String, ConnectionStatus>,
    /// Enforcement errors and drift repaired, by backend.
    pub enforcement_errors: std::collections::BTreeMap<String, u64>,
    /// Drift repaired, by backend.
    pub drift_repaired: std::collections::BTreeMap<String, u64>,
    /// The last reload's failure, if the last reload failed.
    pub last_reload_error: Option<String>,
    /// The policy fetcher's last fetch (absent: fetching is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_fetch: Option<PolicyFetchStatus>,
    /// The usage spool and uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting: Option<ReportingStatus>,
}

/// One listener's connections, in [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// Open now.
    pub open: u64,
    /// Accepted since start.
    pub accepted: u64,
    /// Refused at the connection cap since start.
    pub refused: u64,
    /// Closed for not sending a request head in time.
    pub header_timeouts: u64,
    /// Closed after the idle timeout.
    pub idle_closed: u64,
}

impl From<kycd_net::ConnSnapshot> for ConnectionStatus {
    fn from(s: kycd_net::ConnSnapshot) -> Self {
        ConnectionStatus {
            open: s.open,
            accepted: s.accepted,
            refused: s.refused,
            header_timeouts: s.header_timeouts,
            idle_closed: s.idle_closed,
        }
    }
}

/// The reporting part of [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportingStatus {
    /// Records spooled and not yet acknowledged by the collector.
    pub spool_pending_records: u64,
    /// Bytes of spool segments on disk.
    pub spool_bytes: u64,
    /// Whether uploads are configured (`reporting.collector_url`).
    pub uploading: bool,
    /// When the collector last stored a batch (Unix seconds; absent: not since start).
    pub last_upload_at: Option<i64>,
    /// Damaged spool bytes found since start (quarantined under `spool/quarantine/`).
    #[serde(default)]
    pub spool_damage: SpoolDamageStatus,
    /// Batches the collector refused for good.
    #[serde(default)]
    pub rejected: RejectedStatus,
}

/// Spool damage since start, in [`ReportingStatus`] (see [`crate::reporting::spool`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpoolDamageStatus {
    /// Damaged regions (kind `corrupt`: visible records lost) quarantined and cut out.
    pub regions: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Torn tails (a write a crash interrupted, never visible) quarantined and truncated.
    pub torn_tails: u64,
    /// Their bytes.
    pub torn_tail_bytes: u64,
    /// Attempts to quarantine damaged bytes that failed (the bytes stay in their segment).
    pub quarantine_failures: u64,
    /// When damage was last found (Unix seconds).
    pub last_at: Option<i64>,
}

/// Batches the collector refused for good (400/409/413), in [`ReportingStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RejectedStatus {
    /// Batches since start.
    pub batches: u64,
    /// Seqs they covered.
    pub records: u64,
    /// Batch files in `<state_dir>/rejected/`, earlier runs' included.
    pub kept: u64,
    /// The last one since start.
    pub last: Option<LastRejection>,
}

/// The last rejected batch, in [`RejectedStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRejection {
    /// When (Unix seconds).
    pub at: i64,
    /// HTTP status.
    pub status: u16,
    /// The collector's error kind (e.g. `SeqConflict`), else `http_<status>`.
    pub kind: String,
}

/// The policy fetcher part of [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFetchStatus {
    /// The URL fetched.
    pub url: String,
    /// When the last fetch ended (Unix seconds; absent: none yet).
    pub last_at: Option<i64>,
    /// Its outcome (`applied`, `unchanged`, `not_modified`, `rejected: KIND`, or an error).
    pub outcome: Option<String>,
    /// The ETag of the last accepted answer.
    pub etag: Option<String>,
}

/// The policy part of [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Version.
    pub version: u64,
    /// Signing key.
    pub kid: String,
    /// Where it came from.
    pub source: String,
}

/// One row of `GET /v1/workloads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRow {
    /// `KIND:ID`.
    pub workload: String,
    /// The tenant, when attested.
    pub tenant: Option<String>,
    /// The recorded decision, if any.
    pub decision: Option<Decision>,
    /// When that decision was recorded (Unix seconds).
    pub decided_at: Option<i64>,
    /// The workload's cgroup directory.
    pub cgroup: Option<String>,
}

/// An admission request, as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitBody {
    /// `KIND:ID`.
    pub workload: String,
    /// The attestation the workload brings (compact JWS), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// For a libvirt domain not running yet: its UUID, so an attestation bound by UUID
    /// applies to it by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_uuid: Option<String>,
}

/// A validated admission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The workload.
    pub workload: WorkloadId,
    /// The attestation bytes.
    pub attestation: Option<Vec<u8>>,
    /// The libvirt domain's UUID (lower case).
    pub libvirt_uuid: Option<String>,
}

/// The answer to an admission request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmitAnswer {
    /// The workload decided on.
    pub workload: String,
    /// `allow`, `condition` or `deny`.
    pub verdict: Verdict,
    /// The recorded decision (absent when none could be made or recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why there is no decision, or why the attestation was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdmitAnswer {
    /// A denial without a decision (the agent could not decide or record).
    pub fn deny(workload: &WorkloadId, error: impl Into<String>) -> Self {
        AdmitAnswer {
            workload: workload.to_string(),
            verdict: Verdict::Deny,
            decision: None,
            error: Some(error.into()),
        }
    }
}

/// The caller, from `SO_PEERCRED`, and what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    uid: Option<u32>,
    access: Access,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    /// Nothing.
    None,
    /// Reads (member of the socket's group).
    Read,
    /// Everything (root).
    Admin,
}

impl Peer {
    /// Who is calling on `stream`, and what it may do.
    fn of(stream: &tokio::net::UnixStream) -> Self {
        let cred = stream.peer_cred().ok();
        let uid = cred.map(|c| c.uid());
        let access = match cred {
            Some(c) if c.uid() == 0 => Access::Admin,
            Some(c) => {
                let group = stream.local_addr().ok().and_then(|a| a.as_pathname().map(socket_gid)).flatten();
                match (group, c.pid()) {
                    (Some(gid), Some(pid)) if member_of(pid, c.gid(), gid) => Access::Read,
                    _ => Access::None,
                }
            }
            None => Access::None,
        };
        Peer { uid, access }
    }
}

/// The group owning the socket file: its members may read.
fn socket_gid(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    // A root-only socket (mode 0600) grants no group reads, whatever its group.
    (meta.mode() & 0o060 != 0).then_some(meta.gid())
}

/// Whether process `pid` (primary group `gid`) is in group `group`, reading its
/// supplementary groups from /proc and pinning the process by its start time, so a PID
/// reused while we read is not taken for the caller.
fn member_of(pid: i32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let start = || -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 22 (starttime), counted after the parenthesised command name.
        let after = stat.rsplit_once(')')?.1;
        after.split_whitespace().nth(19).map(str::to_owned)
    };
    let Some(before) = start() else { return false };
    let groups = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| g.split_whitespace().filter_map(|n| n.parse::<u32>().ok()).collect::<Vec<_>>())
    });
    let member = groups.is_some_and(|g| g.contains(&group));
    member && start().as_deref() == Some(before.as_str())
}

/// Creates the socket: its directory (0755), a stale socket from a previous run removed
/// (only if it is a socket), mode 0600, or 0660 with group `socket_group`.
pub fn bind(path: &Path, socket_group: Option<&str>) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::FileTypeExt as _;
    let err = |source| ApiError::Socket { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let gid =
        socket_group.map(|g| group_id(g).ok_or_else(|| ApiError::UnknownGroup(g.to_owned()))).transpose()?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// The gid of `name` from /etc/group (NSS groups are not consulted: the socket's group is a
/// local system group created by the package).
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

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
        .route("/v1/admit", post(admit))
        .route("/v1/status", get(status))
        .route("/v1/workloads", get(workloads))
        .route("/v1/reload", post(reload))
        .route("/v1/gpus", get(gpus))
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

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (agent down, wrong path, no permission).
    #[error("cannot reach the agent at {path}: {source}")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the agent: {0}")]
    Http(String),
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends one request to the agent's socket and returns the status and the JSON body (or
/// `null` when the body is not JSON).
pub async fn request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClientError> {
    use http_body_util::{BodyExt as _, Full};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Unreachable { path: socket.to_owned(), source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "kycd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| ClientError::Http(e.to_string()))?;
    let status = response.status().as_u16();
    let bytes =
        response.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?.to_bytes();
    driver.abort();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_round_trip_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/kycd.sock");
        let listener = bind(&socket, None).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let limits = kycd_net::Limits {
            max_connections: 8,
            max_per_peer: 4,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
        };
        let stats = std::sync::Arc::new(kycd_net::ConnStats::default());
        let server = tokio::spawn(serve(listener, tx, limits, stats.clone(), shutdown.clone()));
        // A fake main loop that denies everything it is asked about.
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                if let ApiRequest::Admit(a, reply) = request {
                    let _ = reply.send(AdmitAnswer::deny(&a.workload, format!("uuid {:?}", a.libvirt_uuid)));
                }
            }
        });
        let (status, body) = request(&socket, "GET", "/healthz", None).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::Value::Null, "healthz is plain text");
        let is_root = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        let admit = serde_json::json!({"workload": "libvirt_domain:vm-1", "libvirt_uuid": "6F1C2A9E-3A51-4C1E-9D3B-2B7F0E5E8A10"});
        let (status, body) = request(&socket, "POST", "/v1/admit", Some(&admit)).await.unwrap();
        if is_root {
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["verdict"], "deny");
            assert_eq!(body["workload"], "libvirt_domain:vm-1");
            assert_eq!(body["error"], "uuid Some(\"6f1c2a9e-3a51-4c1e-9d3b-2b7f0e5e8a10\")");
            for bad in [
                serde_json::json!({"workload": "pod:x"}),
                serde_json::json!({"workload": "host:host", "extra": 1}),
                serde_json::json!({"workload": "libvirt_domain:x", "libvirt_uuid": "nope"}),
            ] {
                let (status, body) = request(&socket, "POST", "/v1/admit", Some(&bad)).await.unwrap();
                assert_eq!(status, 400, "{bad} → {body}");
                assert!(body["error"].is_string());
            }
        } else {
            eprintln!("SKIP admission as root: not root; checking the refusal instead");
            assert_eq!(status, 403);
        }
        assert!(stats.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2);
        shutdown.cancel();
        server.await.unwrap();
        let err = request(&socket, "GET", "/healthz", None).await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn refuses_to_replace_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kycd.sock");
        std::fs::write(&path, "precious").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(async { bind(&path, None).unwrap_err() });
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        let err = rt.block_on(async { bind(&dir.path().join("s"), Some("no-such-group-kycd")).unwrap_err() });
        assert!(matches!(err, ApiError::UnknownGroup(_)), "{err}");
    }
}
