//! Deciding, recording and enforcing: the stale workloads re-decided by the pure engine
//! ([`crate::decision::decide`]), the changed decisions written to the audit log together
//! with the records queued since the last evaluation (one fsync), then handed to the
//! [`crate::reconcile::Enforcer`] — and the lockdown when the log cannot be written.

use std::collections::BTreeSet;

use kycd_protocol::Verdict;
use tracing::{error, info, warn};

use super::{Agent, AuditEvent, LOCKDOWN_AFTER};
use crate::config::Mode;
use crate::decision::{decide, Decision, DecisionInput, Reason, ReasonCode};
use crate::discovery::workload::WorkloadId;

/// A decision that differs from the one on record: (workload, attestation digest, decision).
type Changed = (WorkloadId, Option<String>, Decision);

impl Agent {
    /// Re-decides the stale workloads (present or attested), records the queued records and
    /// the changed decisions, and marks the change for enforcement. Returns the earliest time
    /// a decision may change by itself (now, when some decision could not be recorded and
    /// must be retried).
    pub(super) fn evaluate(&mut self) -> Option<i64> {
        let now = self.now();
        let mut ids: BTreeSet<WorkloadId> = self.workloads.keys().cloned().collect();
        let resolved: Vec<WorkloadId> =
            self.attestations.values().map(|a| self.resolve(&a.workload)).collect();
        ids.extend(resolved);
        for id in &ids {
            // Attested before it exists (e.g. a VM about to start): decided now, so admission
            // can answer; first seen now.
            self.ensure_workload(id);
        }
        self.first_seen_fallback = None;
        self.persist_first_seen();
        // What to re-decide: everything when asked to (or while decisions are unrecorded),
        // else the workloads the events touched and any without a decision yet.
        let stale = std::mem::take(&mut self.stale);
        // A deadline that passed re-decides everything, whichever event woke the daemon.
        let everything = stale.all
            || self.audit_failures > 0
            || self.decisions.values().any(|d| d.next_review_at.is_some_and(|t| t <= now));
        let mut changed = Vec::new();
        let in_force = self.attestations_in_force();
        for id in &ids {
            if !everything && !stale.workloads.contains(id) && self.decisions.contains_key(id) {
                continue;
            }
            let state = &self.workloads[id];
            let attested = in_force.get(id).copied();
            // A binding by libvirt UUID was resolved to the domain's name above; the engine
            // checks bindings against the workload, so it sees the binding as resolved.
            let claims = attested.map(|a| {
                if a.workload == *id {
                    std::borrow::Cow::Borrowed(&a.claims)
                } else {
                    let mut resolved = a.claims.clone();
                    resolved.binding.id = id.id.clone();
                    std::borrow::Cow::Owned(resolved)
                }
            });
            let decision = decide(&DecisionInput {
                workload: id,
                first_seen: state.first_seen,
                attestation: claims.as_deref(),
                policy: self.policy.as_ref().map(|p| &p.claims),
                now,
                clock_skew_s: self.config.clock_skew_s,
            });
            if self.decisions.get(id) != Some(&decision) {
                changed.push((id.clone(), attested.map(|a| a.token_digest.clone()), decision));
            }
        }
        let gone: Vec<WorkloadId> = self.decisions.keys().filter(|id| !ids.contains(*id)).cloned().collect();
        if !gone.is_empty() || !changed.is_empty() {
            self.generation += 1;
        }
        for id in gone {
            self.decisions.remove(&id);
            self.decided_at.remove(&id);
        }
        let unrecorded = self.record_and_enforce(now, changed);
        if unrecorded > 0 {
            self.audit_failures = self.audit_failures.saturating_add(1);
            self.stale.all = true;
            error!(
                unrecorded,
                failures = self.audit_failures,
                "cannot record decisions; not enforcing them, will retry"
            );
            if self.audit_failures >= LOCKDOWN_AFTER {
                self.lockdown(now);
            }
            return Some(now);
        }
        self.audit_failures = 0;
        self.decisions.values().filter_map(|d| d.next_review_at).min()
    }

    /// Appends the queued records and the changed decisions to the audit log (one fsync
    /// for all when it can; record by record when that fails, so one unwritable record does
    /// not hold back the rest); the decisions recorded take effect, and are enforced at the
    /// next reconciliation. Returns how many decisions could not be recorded.
    fn record_and_enforce(&mut self, now: i64, changed: Vec<Changed>) -> usize {
        let mode = self.config.mode;
        let mut records = std::mem::take(&mut self.pending);
        let queued = records.len();
        records.extend(changed.iter().map(|(id, digest, d)| {
            let event = AuditEvent::Decision {
                workload: id.to_string(),
                attestation_digest: digest.clone(),
                mode,
                decision: d.clone(),
            };
            (now, event)
        }));
        // Durable first: nothing is enforced that the audit log does not show.
        let written = self.write_records(records);
        let mut unrecorded = 0;
        for ((id, _, decision), ok) in changed.into_iter().zip(written.into_iter().skip(queued)) {
            if !ok {
                unrecorded += 1;
                continue;
            }
            info!(workload = %id, verdict = ?decision.verdict, policy_version = ?decision.policy_version,
                  reasons = ?decision.reasons.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), "decision");
            self.decided_at.insert(id.clone(), now);
            self.decisions.insert(id, decision);
            self.reconcile_due = true;
        }
        unrecorded
    }

    /// Denies every workload not already denied, unrecorded: the audit log has been failing
    /// for [`LOCKDOWN_AFTER`] evaluations (see the module docs). The synthetic decisions
    /// differ from what the engine decides, so the first evaluation that can record again
    /// records and enforces the real ones.
    fn lockdown(&mut self, now: i64) {
        let ids: Vec<WorkloadId> = self.workloads.keys().cloned().collect();
        for id in ids {
            let current = self.decisions.get(&id);
            if current.is_some_and(|d| d.reasons.iter().any(|r| r.code == ReasonCode::AuditUnavailable)) {
                continue;
            }
            let decision = Decision {
                verdict: Verdict::Deny,
                conditions: None,
                reasons: vec![Reason {
                    code: ReasonCode::AuditUnavailable,
                    measure_id: None,
                    citation: None,
                    detail: "the audit log cannot be written; denied until it can".into(),
                }],
                next_review_at: Some(now),
                policy_version: current.and_then(|d| d.policy_version),
                tenant: current.and_then(|d| d.tenant.clone()),
                attestation_jti: current.and_then(|d| d.attestation_jti.clone()),
            };
            error!(workload = %id, "audit log unavailable: denying (unrecorded)");
            self.decisions.insert(id, decision);
            self.reconcile_due = true;
            self.generation += 1;
        }
    }

    /// Converges the host on the recorded decisions (enforce mode only): a full reconcile
    /// on start and every interval, a fast apply on decision changes in between; see
    /// [`crate::reconcile`]. Drift and failures are logged and counted; a failing backend is
    /// retried at the next reconciliation, and what it had applied stays in place.
    pub(super) fn reconcile(&mut self) {
        if self.audit_failures > 0 && self.audit_failures < LOCKDOWN_AFTER {
            // Decisions are partly unrecorded: the host keeps what it has (a lift computed
            // from a partial picture could release a block) until they are recorded or the
            // lockdown denies everything.
            return;
        }
        let full = std::mem::take(&mut self.full_reconcile_due);
        self.reconcile_due = false;
        if self.config.mode != Mode::Enforce {
            return;
        }
        let in_force = self.attestations_in_force();
        let views = self.decisions.iter().map(|(id, decision)| {
            let w = self.workloads.get(id);
            // The status of the attestation the decision used; unknown without one.
            let foreign = in_force
                .get(id)
                .filter(|a| decision.attestation_jti.as_deref() == Some(a.claims.jti.as_str()))
                .map_or(kycd_protocol::ForeignStatus::Unknown, |a| a.claims.foreign_status());
            crate::reconcile::WorkloadView {
                id,
                cgroup: w.and_then(|w| w.cgroup.as_deref()),
                interfaces: w.map(|w| w.interfaces.as_slice()).unwrap_or(&[]),
                decision,
                foreign,
            }
        });
        let desired = crate::reconcile::desired_state(
            views,
            self.policy.as_ref().map(|p| &p.claims),
            self.cgroup_mount.as_deref(),
            self.geo.as_ref(),
            self.now(),
        );
        let report = if full { self.enforcer.reconcile(&desired) } else { self.enforcer.apply(&desired) };
        for (backend, what) in &report.drift {
            *self.counters.drift_repaired.entry(backend).or_default() += 1;
            warn!(backend, drift = %what, "drift repaired");
        }
        self.counters.enforcement_failing.clear();
        for (backend, error) in &report.errors {
            *self.counters.enforcement_errors.entry(backend).or_default() += 1;
            self.counters.enforcement_failing.entry(backend).or_insert_with(|| error.clone());
            error!(backend, %error, "enforcement failed; retrying at the next reconciliation");
        }
        if report.changes > 0 {
            info!(
                changes = report.changes,
                frozen = desired.cgroups.len(),
                blocked_cgroups = desired.nft.cgroups.len(),
                blocked_interfaces = desired.nft.interfaces.len(),
                geo_scoped = desired.nft.geo_cgroups.len() + desired.nft.geo_interfaces.len(),
                "host reconciled"
            );
        }
    }
}
