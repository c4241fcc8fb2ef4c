//! What makes the agent unhealthy: the conditions under which `kycctl status` exits 4.
//!
//! Only what is wrong *now* counts, never a count since start: an agent that failed an
//! enforcement step an hour ago and has reconciled cleanly since is healthy. Each problem is
//! one line, so that `kycctl status` can print them all on one line of stderr.

use super::Status;

impl Status {
    /// Why the agent is unhealthy (empty: healthy), in a fixed order:
    /// - the audit log is failing (the last append failed, or decisions went unrecorded):
    ///   decisions are not on the record, and new workloads are denied;
    /// - an enforcement backend's last reconciliation failed (enforce mode): a block the
    ///   policy asks for may not be in force;
    /// - no policy is in force: every workload is denied;
    /// - the last reload (or the start) could not load everything: the agent runs on what
    ///   it had, and the files on disk are not what it enforces.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.audit_last_error, self.audit_failures) {
            (Some(e), _) => problems.push(format!("audit log failing: the last write failed: {e}")),
            (None, 0) => {}
            (None, n) => problems.push(format!("audit log failing: {n} evaluations not recorded")),
        }
        for (backend, error) in &self.enforcement_failing {
            problems.push(format!("enforcement failing: {backend}: {error}"));
        }
        if self.policy.is_none() {
            problems.push("no policy in force (every workload denied)".to_owned());
        }
        if let Some(e) = &self.last_reload_error {
            problems.push(format!("last reload failed: {e}"));
        }
        // One line each, whatever an error message carried.
        problems.iter().map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::PolicyStatus;
    use super::*;

    fn healthy() -> Status {
        serde_json::from_value(serde_json::json!({
            "version": "0", "host_id": "h", "mode": "enforce", "started_at": 0, "uptime_s": 1,
            "policy": {"version": 1, "kid": "k", "source": "/etc/kycd/policy.jws"},
            "issuer_kids": [], "policy_kids": [], "verdicts": {}, "attestations": 0,
            "gpu": "disabled", "audit_failures": 0,
            "enforcement_errors": {"nftables": 3}, "drift_repaired": {"cgroup": 2},
            "last_reload_error": null
        }))
        .unwrap()
    }

    #[test]
    fn counts_since_start_alone_are_healthy() {
        let s = healthy();
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        // An older agent's answer, without enforcement_failing, reads as not failing.
        assert!(s.enforcement_failing.is_empty());
    }

    #[test]
    fn each_current_problem_is_one_line_in_order() {
        let mut s = healthy();
        s.audit_failures = 2;
        assert_eq!(s.problems(), ["audit log failing: 2 evaluations not recorded"]);
        s.audit_last_error = Some("No space left on device\n(os error 28)".into());
        s.enforcement_failing.insert("nftables".into(), "cannot run nft".into());
        s.policy = None;
        s.last_reload_error = Some("policy trust anchors: bad JWKS".into());
        assert_eq!(
            s.problems(),
            [
                "audit log failing: the last write failed: No space left on device (os error 28)",
                "enforcement failing: nftables: cannot run nft",
                "no policy in force (every workload denied)",
                "last reload failed: policy trust anchors: bad JWKS",
            ]
        );
        s.policy = Some(PolicyStatus { version: 2, kid: "k".into(), source: "s".into() });
        assert_eq!(s.problems().len(), 3);
    }
}
