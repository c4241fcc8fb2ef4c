//! The operator API's requests, answered: [`Node`] implements
//! [`crate::net::operator_api::RequestHandler`] for the running daemon (the agent's core plus
//! reporting and the GPU sampler).

use crate::core::{Agent, AuditEvent};
use crate::net::operator_api::{Admission, AdmitAnswer, RequestHandler, Status, WorkloadRow};

use super::gpu::SharedGpuMetrics;

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
        if let Some(m) = self.gpu.and_then(|m| m.lock().ok()) {
            status.guest_telemetry = m.guest_status();
        }
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
