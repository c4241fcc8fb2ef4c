//! Names on the wire that more than one process must spell the same way: HTTP paths,
//! header names, and the stored names of enumerations. The agent, `kycctl` and the
//! collector take them from here, never from a literal of their own.

use crate::EstimationMethod;

/// Operator socket (`kycd`, answered over its Unix socket; `kycctl` calls them).
pub mod operator {
    /// `POST`: admit a workload (`kycctl admit`, libvirt hook, Slurm prolog).
    pub const ADMIT: &str = "/v1/admit";
    /// `GET`: the agent's state at a glance.
    pub const STATUS: &str = "/v1/status";
    /// `GET`: every known workload with its decision.
    pub const WORKLOADS: &str = "/v1/workloads";
    /// `POST`: reload trust anchors, policy and attestations (like SIGHUP).
    pub const RELOAD: &str = "/v1/reload";
    /// `GET`: GPU inventory and usage.
    pub const GPUS: &str = "/v1/gpus";
}

/// The agent's collector-facing HTTPS API.
pub mod agent_api {
    /// `GET ?nonce=`: a signed host statement; `GET ?nonce=…&v=2`: the digest-bound form
    /// ([`crate::HostStatementHead`]), which older agents answer with the one-part form.
    pub const ATTESTATION: &str = "/v1/attestation";
    /// The query parameter that asks for the digest-bound form.
    pub const STATEMENT_V2_PARAM: &str = "v=2";
    /// The query parameter (`have=<body_sha256>`) with which a collector that holds a body
    /// asks the agent to leave it out when it is still the current one: the answer is then
    /// `head~` and the collector puts the body it holds back after the `~`.
    pub const STATEMENT_HAVE_PARAM: &str = "have";
    /// The content type of a digest-bound statement (`head~body`).
    pub const STATEMENT_V2_CONTENT_TYPE: &str = "application/kyc-host-statement-v2";
    /// `GET`: Prometheus metrics (served here, not on the operator socket).
    pub const METRICS: &str = "/metrics";
}

/// The collector's HTTP API.
pub mod collector {
    /// `POST`: a signed, gzip-compressed report batch.
    pub const REPORTS: &str = "/v1/reports";
    /// `GET`: the policy the collector serves to agents.
    pub const POLICY: &str = "/v1/policy";
    /// `GET`: per-tenant aggregates.
    pub const TENANTS: &str = "/v1/tenants";
    /// `GET`: usage without a tenant, per host and workload.
    pub const UNATTRIBUTED: &str = "/v1/unattributed";
    /// `GET`: findings.
    pub const FINDINGS: &str = "/v1/findings";
    /// `GET`: enrolled hosts.
    pub const HOSTS: &str = "/v1/hosts";
}

/// The detached signature of a report batch (`POST /v1/reports`), lower case as HTTP/2 and
/// `http::HeaderName` spell it.
pub const SIGNATURE_HEADER: &str = "x-kycd-signature";

impl EstimationMethod {
    /// Every method, in wire order (the order the collector's exports list them).
    pub const ALL: [EstimationMethod; 7] = [
        EstimationMethod::GpmPipes,
        EstimationMethod::GpmTensor,
        EstimationMethod::SharedSplit,
        EstimationMethod::UtilizationUpperBound,
        EstimationMethod::GuestReported,
        EstimationMethod::Allocation,
        EstimationMethod::Unknown,
    ];

    /// The wire name, as serialized and as stored by the collector (`records.method`).
    pub const fn as_str(self) -> &'static str {
        match self {
            EstimationMethod::GpmPipes => "gpm_pipes",
            EstimationMethod::GpmTensor => "gpm_tensor",
            EstimationMethod::SharedSplit => "shared_split",
            EstimationMethod::UtilizationUpperBound => "utilization_upper_bound",
            EstimationMethod::Allocation => "allocation",
            EstimationMethod::GuestReported => "guest_reported",
            EstimationMethod::Unknown => "unknown",
        }
    }

    /// How much a window can be trusted, weakest 0: a window merged from GPU-intervals
    /// measured differently carries the weakest method among them.
    pub const fn strength(self) -> u8 {
        match self {
            EstimationMethod::Unknown => 0,
            EstimationMethod::Allocation => 1,
            EstimationMethod::GuestReported => 2,
            EstimationMethod::UtilizationUpperBound => 3,
            EstimationMethod::SharedSplit => 4,
            EstimationMethod::GpmTensor => 5,
            EstimationMethod::GpmPipes => 6,
        }
    }

    /// The weaker of two methods.
    pub fn weakest(self, other: EstimationMethod) -> EstimationMethod {
        if other.strength() < self.strength() {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_the_serialized_names() {
        for m in EstimationMethod::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), serde_json::Value::from(m.as_str()));
        }
    }
}
