//! The operator API's requests, answered: [`RequestHandler`] is what the socket (and the
//! collector API's `/metrics`) can ask of the agent, one method per request; [`dispatch`]
//! turns a queued [`ApiRequest`] into a call and sends its reply. [`Node`] implements it
//! for the running daemon (the agent's core plus reporting and the GPU sampler).

use crate::core::{Agent, AuditEvent};
use crate::net::operator_api::{Admission, AdmitAnswer, ApiRequest, Status, WorkloadRow};

use super::gpu::SharedGpuMetrics;

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

/// The running daemon, as the operator API sees it.
#[derive(Debug)]
pub(super) struct Node<'a> {
    pub(super) agent: &'a mut Agent,
    pub(super) reporting: &'a crate::reporting::Reporting,
    pub(super) gpu: Option<&'a SharedGpuMetrics>,
}

impl RequestHandler for Node<'_> {
    fn admit(&mut self, admission: Admission) -> AdmitAnswer {
        self.agent.admit(admission)
    }

    fn status(&mut self) -> Status {
        let gpu = match self.gpu {
            None => "disabled",
            Some(m) if m.lock().is_ok_and(|m| m.backend_available()) => "available",
            Some(_) => "unavailable",
        };
        let mut status = self.agent.status(gpu.to_owned());
        status.reporting = Some(self.reporting.status());
        status
    }

    fn workloads(&mut self) -> Vec<WorkloadRow> {
        self.agent.workload_rows()
    }

    fn reload(&mut self) {
        self.agent.handle(crate::core::Event::Reload);
    }

    fn metrics(&mut self) -> String {
        let mut out = kycd_net::prometheus::Exposition::new();
        self.agent.metrics(&mut out);
        out.append(&self.reporting.metrics_text());
        if let Some(m) = self.gpu.and_then(|m| m.lock().ok()) {
            out.append(&m.render());
        }
        out.finish()
    }

    fn gpus(&mut self) -> serde_json::Value {
        match self.gpu {
            Some(m) => m.lock().map(|m| m.to_json()).unwrap_or_default(),
            None => {
                serde_json::json!({"backend_available": false, "disabled": true, "gpus": [], "usage": []})
            }
        }
    }

    fn refused(&mut self, uid: Option<u32>, request: &'static str) {
        self.agent.record(AuditEvent::ApiRefused { uid, request: request.into() });
    }
}
