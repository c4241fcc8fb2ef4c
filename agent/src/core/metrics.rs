//! The agent's own metrics (decisions, rejected input, enforcement, the audit log, the
//! listeners, the policy fetcher) in the Prometheus text format.

use std::collections::BTreeMap;

use kycd_net::prometheus::{Exposition, Kind};
use kycd_protocol::Verdict;

use super::Agent;

impl Agent {
    /// The agent's metrics (the GPU sampler and reporting add their own).
    pub fn metrics(&self, out: &mut Exposition) {
        let labelled =
            |out: &mut Exposition, name: &str, help: &str, label: &str, m: &BTreeMap<&str, u64>| {
                out.family(name, Kind::Counter, help);
                for (k, v) in m {
                    out.sample(name, &[(label, k)], v);
                }
            };
        let mut verdicts: BTreeMap<&str, u64> = [("allow", 0), ("condition", 0), ("deny", 0)].into();
        for d in self.decisions.values() {
            let key = match d.verdict {
                Verdict::Allow => "allow",
                Verdict::Condition => "condition",
                Verdict::Deny => "deny",
            };
            *verdicts.entry(key).or_default() += 1;
        }
        out.family("kycd_workloads", Kind::Gauge, "Workloads by recorded verdict.");
        for (verdict, n) in &verdicts {
            out.sample("kycd_workloads", &[("verdict", verdict)], n);
        }
        out.single(
            "kycd_policy_version",
            Kind::Gauge,
            "Version of the policy in force (0: none).",
            self.policy.as_ref().map_or(0, |p| p.claims.version),
        );
        let c = &self.counters;
        labelled(
            out,
            "kycd_attestations_rejected_total",
            "Attestations rejected, by error kind.",
            "kind",
            &c.attestations_rejected,
        );
        labelled(
            out,
            "kycd_policies_rejected_total",
            "Policies rejected, by error kind.",
            "kind",
            &c.policies_rejected,
        );
        out.single(
            "kycd_trust_load_failures_total",
            Kind::Counter,
            "Trust files that failed to load (the previous set was kept).",
            c.trust_load_failures,
        );
        labelled(
            out,
            "kycd_enforcement_errors_total",
            "Enforcement failures, by backend.",
            "backend",
            &c.enforcement_errors,
        );
        labelled(
            out,
            "kycd_enforcement_drift_repaired_total",
            "Drift repaired by reconciliation, by backend.",
            "backend",
            &c.drift_repaired,
        );
        let health = self.audit.health();
        out.single(
            "kycd_audit_failing_evaluations",
            Kind::Gauge,
            "Consecutive evaluations whose decisions could not be recorded.",
            self.audit_failures,
        );
        out.single(
            "kycd_audit_write_failures_total",
            Kind::Counter,
            "Audit log appends that failed (any record).",
            health.failures,
        );
        out.single(
            "kycd_audit_last_write_ok",
            Kind::Gauge,
            "1 when the last audit log append succeeded, 0 when it failed.",
            u8::from(health.last_error.is_none()),
        );
        out.single(
            "kycd_input_read_errors_total",
            Kind::Counter,
            "Inputs (attestations, libvirt status) unreadable for want of resources or a failing disk (state kept).",
            c.input_read_errors,
        );
        for (i, (listener, snapshot)) in self.connections.each().enumerate() {
            snapshot.write_prometheus(out, "kycd_api", listener, i == 0);
        }
        if let Some(status) = self.fetch_status.as_ref().and_then(|s| s.lock().ok()) {
            out.append(&crate::net::policy_fetch::metrics_text(&status));
        }
    }
}
