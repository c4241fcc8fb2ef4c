//! What the agent shows: `kycctl status` and `kycctl workloads`, the content of the host
//! statement the collector polls, and systemd's one-line status.

use std::collections::BTreeMap;

use kycd_protocol::Verdict;

use super::policy_source::PolicySource;
use super::Agent;
use crate::config::Mode;

/// The identity part of a host statement's workload entry, from its attestation.
fn statement_subject(claims: &kycd_protocol::AttestationClaims) -> kycd_protocol::StatementSubject {
    let mut owner_countries: Vec<_> =
        claims.beneficial_owners.iter().flat_map(|o| o.countries.iter().copied()).collect();
    owner_countries.sort();
    owner_countries.dedup();
    let mut reseller_countries: Vec<_> = claims.resellers.iter().map(|r| r.country).collect();
    reseller_countries.sort();
    reseller_countries.dedup();
    kycd_protocol::StatementSubject {
        legal_name: claims.subject.legal_name.clone(),
        countries: claims.subject.countries.clone(),
        beneficial_owner_countries: owner_countries,
        reseller_countries,
        payment_source_country: claims.payment_source_country,
        foreign_person: claims.foreign_person,
        purposes: claims.purposes.clone(),
        person_status: claims.person_status,
        beneficial_owners: claims.beneficial_owners.clone(),
        resellers: claims.resellers.clone(),
        kyc: Some(kycd_protocol::StatementKyc {
            issuer: claims.iss.clone(),
            jti: claims.jti.clone(),
            verified_at: claims.kyc.verified_at,
            method: claims.kyc.method.clone(),
        }),
    }
}

impl Agent {
    /// The agent's state at a glance (`kycctl status`); `gpu` is the GPU backend's state.
    pub fn status(&self, gpu: String) -> crate::net::operator_api::Status {
        let mut verdicts = BTreeMap::new();
        for d in self.decisions.values() {
            let v = serde_json::to_value(d.verdict).ok().and_then(|v| v.as_str().map(str::to_owned));
            *verdicts.entry(v.unwrap_or_default()).or_default() += 1;
        }
        let now = self.now();
        let health = self.audit.health();
        crate::net::operator_api::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            host_id: self.host_id.clone(),
            mode: match self.config.mode {
                Mode::Audit => "audit".into(),
                Mode::Enforce => "enforce".into(),
            },
            started_at: self.started_at,
            uptime_s: now - self.started_at,
            policy: self.policy.as_ref().map(|p| crate::net::operator_api::PolicyStatus {
                version: p.claims.version,
                kid: p.kid.clone(),
                source: match (self.policy_source, &self.config.policy.fetch_url) {
                    (PolicySource::File, _) => self.config.policy.file.display().to_string(),
                    (_, Some(url)) => format!("{url} (kept in {})", self.fetched_copy_path().display()),
                    (_, None) => self.fetched_copy_path().display().to_string(),
                },
            }),
            policy_fetch: self.fetch_status.as_ref().and_then(|s| s.lock().ok()).map(|s| {
                crate::net::operator_api::PolicyFetchStatus {
                    url: s.url.clone(),
                    last_at: s.last_at,
                    outcome: s.last_outcome.clone(),
                    etag: s.etag.clone(),
                }
            }),
            issuer_kids: self.issuers.kids().map(str::to_owned).collect(),
            policy_kids: self.policy_keys.kids().map(str::to_owned).collect(),
            verdicts,
            attestations: self.attestations.len(),
            gpu,
            audit_failures: self.audit_failures,
            audit_write_failures: health.failures,
            audit_last_error: health.last_error.clone(),
            input_read_errors: self.counters.input_read_errors,
            last_read_error: self.last_read_error.clone(),
            connections: self.connections.each().map(|(name, s)| (name.to_owned(), s.into())).collect(),
            enforcement_errors: self
                .counters
                .enforcement_errors
                .iter()
                .map(|(k, v)| ((*k).into(), *v))
                .collect(),
            drift_repaired: self.counters.drift_repaired.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            enforcement_failing: self
                .counters
                .enforcement_failing
                .iter()
                .map(|(k, v)| ((*k).into(), v.clone()))
                .collect(),
            last_reload_error: self.last_reload_error.clone(),
            reporting: None,
            guest_telemetry: Vec::new(),
        }
    }

    /// Every known workload with its decision (`kycctl workloads`).
    pub fn workload_rows(&self) -> Vec<crate::net::operator_api::WorkloadRow> {
        self.workloads
            .iter()
            .map(|(id, w)| {
                let decision = self.decisions.get(id);
                crate::net::operator_api::WorkloadRow {
                    workload: id.to_string(),
                    tenant: decision.and_then(|d| d.tenant.clone()),
                    decision: decision.cloned(),
                    decided_at: self.decided_at.get(id).copied(),
                    cgroup: w.cgroup.as_ref().map(|c| c.display().to_string()),
                }
            })
            .collect()
    }

    /// The content of a host statement for `nonce` (the collector API signs it). `gpus` is
    /// the GPU inventory, `host` the machine's facts.
    pub fn statement_claims(
        &self,
        nonce: String,
        gpus: Vec<kycd_protocol::GpuInventoryEntry>,
        host: Option<kycd_protocol::HostFacts>,
    ) -> kycd_protocol::HostStatementClaims {
        let in_force = self.attestations_in_force();
        let workloads = self
            .decisions
            .iter()
            .map(|(id, d)| {
                let attested = in_force.get(id);
                kycd_protocol::WorkloadStatement {
                    workload: id.to_string(),
                    tenant: d.tenant.clone(),
                    attestation_digest: attested.map(|a| a.token_digest.clone()),
                    attestation_exp: attested.map(|a| a.claims.exp),
                    verdict: d.verdict,
                    conditions: d.conditions.clone(),
                    subject: attested.map(|a| statement_subject(&a.claims)),
                }
            })
            .collect();
        let iat = self.now();
        kycd_protocol::HostStatementClaims {
            iss: self.host_id.clone(),
            iat,
            exp: iat + 60,
            nonce,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            policy_version: self.policy.as_ref().map(|p| p.claims.version),
            workloads,
            gpus,
            host,
        }
    }

    /// A one-line summary for systemd's `STATUS=`.
    pub fn status_line(&self) -> String {
        let denied = self.decisions.values().filter(|d| d.verdict == Verdict::Deny).count();
        let policy =
            self.policy.as_ref().map_or("no policy".to_owned(), |p| format!("policy v{}", p.claims.version));
        format!("{:?}: {} workloads, {denied} denied, {policy}", self.config.mode, self.decisions.len())
    }
}
