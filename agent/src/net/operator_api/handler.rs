//! What the operator API can ask of the agent: [`RequestHandler`], one method per request
//! (the daemon implements it over the agent it owns), and [`dispatch`], which turns a queued
//! [`ApiRequest`] into that call and sends the reply. The transport (the socket, HTTP,
//! peer credentials) never touches the agent's state; the agent never sees a socket.

use super::{Admission, AdmitAnswer, ApiRequest, Status, WorkloadRow};

/// What the operator API asks of the agent.
pub trait RequestHandler {
    /// Decides on a workload about to start.
    fn admit(&mut self, admission: Admission) -> AdmitAnswer;
    /// The agent's state at a glance.
    fn status(&mut self) -> Status;
    /// Every workload with its decision.
    fn workloads(&mut self) -> Vec<WorkloadRow>;
    /// Reloads trust anchors, the policy and attestations.
    fn reload(&mut self);
    /// Prometheus text.
    fn metrics(&mut self) -> String;
    /// GPUs and per-tenant usage.
    fn gpus(&mut self) -> serde_json::Value;
    /// A caller was refused (recorded in the audit log).
    fn refused(&mut self, uid: Option<u32>, request: &'static str);
}

/// Answers one request (a caller that gave up on an admission gets nothing done on its
/// behalf; other answers to a caller gone are dropped).
pub fn dispatch(request: ApiRequest, handler: &mut impl RequestHandler) {
    match request {
        ApiRequest::Admit(admission, reply) => {
            if !reply.is_closed() {
                let _ = reply.send(handler.admit(admission));
            }
        }
        ApiRequest::Status(reply) => {
            let _ = reply.send(handler.status());
        }
        ApiRequest::Workloads(reply) => {
            let _ = reply.send(handler.workloads());
        }
        ApiRequest::Reload(reply) => {
            handler.reload();
            let _ = reply.send(());
        }
        ApiRequest::Gpus(reply) => {
            let _ = reply.send(handler.gpus());
        }
        ApiRequest::Metrics(reply) => {
            let _ = reply.send(handler.metrics());
        }
        ApiRequest::Refused { uid, request } => handler.refused(uid, request),
    }
}
