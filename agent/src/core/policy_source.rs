//! Trust anchors and the policy in force, from its two sources: the policy file and the
//! fetched policy (its copy in the state directory, and tokens fresh from the fetcher).
//! Every token takes one path, [`Agent::offer_policy`]: verification, anti-rollback, the
//! log line and the audit record.

use std::path::PathBuf;

use kycd_protocol::{verify, PolicyClaims, VerifyOptions};
use tracing::{debug, error, info, warn};

use super::intake::Rejection;
use super::{Agent, AuditEvent, RejectKind};
use crate::net::policy_fetch::FetchVerdict;
use crate::policy::{Offer, PolicyError};
use crate::tokens;

/// Where a policy token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PolicySource {
    /// `policy.file`.
    File,
    /// The copy of the last accepted fetched policy (`<state_dir>/fetched-policy.jws`).
    FetchedCopy,
    /// Just fetched from `policy.fetch_url`.
    Fetch,
}

impl PolicySource {
    /// The file and the fetched policy are the two sources; the copy is the fetched one.
    pub(super) fn fetched(self) -> bool {
        matches!(self, PolicySource::FetchedCopy | PolicySource::Fetch)
    }
}

/// What offering a policy token came to (already logged and recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    /// A newer version, now in force.
    Applied(u64),
    /// The version in force (re-read, or re-signed), now in force from this source.
    Unchanged(u64),
    /// The same claims are already in force from the other source, which stays.
    Equivalent(u64),
    /// A lower version than the one in force from the other source: not a rollback
    /// attempt, just the older of the two sources.
    Superseded,
    /// Refused, with the error kind.
    Rejected(RejectKind),
}

impl Agent {
    fn policy_options(&self) -> VerifyOptions {
        VerifyOptions {
            max_token_bytes: crate::policy::MAX_POLICY_BYTES,
            clock_skew_s: self.config.clock_skew_s,
        }
    }

    pub(super) fn load_trust(&mut self) {
        for (which, path) in
            [("issuers", self.config.trust.issuers.clone()), ("policy", self.config.trust.policy.clone())]
        {
            match tokens::load_jwks(&path) {
                Ok(jwks) => {
                    info!(trust = which, path = %path.display(), kids = ?jwks.kids().collect::<Vec<_>>(), "trust anchors loaded");
                    if which == "issuers" {
                        self.issuers = jwks;
                    } else {
                        self.policy_keys = jwks;
                    }
                }
                Err(e) => {
                    self.counters.trust_load_failures += 1;
                    error!(trust = which, error = %e, "trust anchors not loaded; keeping the previous set");
                    self.last_reload_error = Some(format!("{which} trust anchors: {e}"));
                }
            }
        }
    }

    pub(super) fn load_geo(&mut self) {
        let Some(path) = self.config.enforcement.geo_cidr_file.clone() else { return };
        match crate::enforce::load_country_cidrs(&path) {
            Ok(geo) => {
                info!(path = %path.display(), countries = geo.len(), "country CIDR list loaded");
                self.geo = Some(geo);
                self.reconcile_due = true;
            }
            Err(e) => {
                *self.counters.enforcement_errors.entry("nftables").or_default() += 1;
                error!(path = %path.display(), error = %e, "country CIDR list not loaded; keeping the previous one");
            }
        }
    }

    /// Drops the policy in force when its signing key is no longer trusted (removed from
    /// the policy trust set): a revoked key must not keep governing the host. Without a
    /// policy every workload is denied until a policy signed by a trusted key arrives.
    pub(super) fn recheck_policy(&mut self) {
        let Some(token) = &self.policy_token else { return };
        let Err(e) = verify::<PolicyClaims>(token, &self.policy_keys, &self.policy_options(), self.now())
        else {
            return;
        };
        let kind = RejectKind::from(&e);
        if !kind.is_untrusted() {
            return; // Expiry is the decision engine's business (it denies an expired policy).
        }
        let version = self.policy.as_ref().map(|p| p.claims.version);
        error!(?version, kind = kind.as_str(), error = %e, "the policy in force is no longer trusted; dropping it");
        self.record(AuditEvent::PolicyWithdrawn {
            version,
            kind: kind.as_str().into(),
            reason: e.to_string(),
        });
        self.policy = None;
        self.policy_token = None;
        self.all_stale();
        self.generation += 1;
    }

    /// Where an accepted fetched policy is kept.
    pub(super) fn fetched_copy_path(&self) -> PathBuf {
        self.config.state_dir.join(crate::net::policy_fetch::FETCHED_FILE)
    }

    /// Loads the policy file and the copy of the last fetched policy. The copy goes first:
    /// when both are valid the higher version ends up in force, and the lower one is
    /// recognised as superseded rather than refused as a rollback.
    pub(super) fn load_policy(&mut self) {
        self.load_policy_file(PolicySource::FetchedCopy);
        self.load_policy_file(PolicySource::File);
    }

    fn load_policy_file(&mut self, source: PolicySource) {
        let path = match source {
            PolicySource::File => self.config.policy.file.clone(),
            PolicySource::FetchedCopy | PolicySource::Fetch => self.fetched_copy_path(),
        };
        let bytes = match crate::fsutil::read_regular_file(&path, crate::policy::MAX_POLICY_BYTES) {
            Ok(b) => tokens::strip_one_newline(b),
            // Nothing fetched yet: the usual case, not worth a word.
            Err(e) if source != PolicySource::File && e.kind() == std::io::ErrorKind::NotFound => {
                self.rejected.remove(&path);
                return;
            }
            Err(e) => {
                let rejection = Rejection { digest: String::new(), kind: RejectKind::Io };
                if self.rejected.get(&path) != Some(&rejection) {
                    warn!(path = %path.display(), error = %e, "no policy file; workloads are denied until a policy is applied");
                    self.rejected.insert(path, rejection);
                }
                return;
            }
        };
        let digest = kycd_protocol::token_digest(&bytes);
        if self.policy.as_ref().is_some_and(|p| p.token_digest == digest) {
            self.rejected.remove(&path);
            return;
        }
        let previous = self.rejected.get(&path).filter(|r| r.digest == digest).cloned();
        if previous.as_ref().is_some_and(Rejection::permanent) {
            return;
        }
        let origin = path.display().to_string();
        let remembered = match self.offer_policy(source, &origin, bytes, previous.as_ref()) {
            Offered::Applied(_) | Offered::Unchanged(_) => None,
            Offered::Equivalent(_) => Some(RejectKind::Equivalent),
            Offered::Superseded => Some(RejectKind::Superseded),
            Offered::Rejected(kind) => Some(kind),
        };
        match remembered {
            None => self.rejected.remove(&path),
            Some(kind) => self.rejected.insert(path, Rejection { digest, kind }),
        };
    }

    /// The one path every policy token takes, whatever its source: verification and
    /// anti-rollback ([`crate::policy::PolicyGuard::offer`]), then the log line and the
    /// audit record. `previous` is the rejection remembered for this content, if any (an
    /// unchanged transient failure is not recorded again).
    fn offer_policy(
        &mut self,
        source: PolicySource,
        origin: &str,
        bytes: Vec<u8>,
        previous: Option<&Rejection>,
    ) -> Offered {
        let now = self.now();
        match self.guard.offer(&bytes, &self.policy_keys, &self.policy_options(), now) {
            Ok(offer) => {
                let is_new = matches!(offer, Offer::Applied(_));
                let (Offer::Applied(p) | Offer::Unchanged(p)) = offer;
                let version = p.claims.version;
                let other_source = self.policy_source.fetched() != source.fetched();
                if !is_new
                    && other_source
                    && self.policy.as_ref().is_some_and(|cur| cur.claims_digest == p.claims_digest)
                {
                    debug!(version, origin, "the same policy is already in force from the other source");
                    return Offered::Equivalent(version);
                }
                info!(version, kid = %p.kid, measures = p.claims.measures.len(), origin, "policy applied");
                // Re-reading the version already applied (a restart) is not a new application.
                if is_new || self.policy.is_none() {
                    self.record(AuditEvent::PolicyApplied {
                        version,
                        claims_digest: p.claims_digest.clone(),
                        token_digest: p.token_digest.clone(),
                        kid: p.kid.clone(),
                        source: origin.into(),
                    });
                }
                self.policy = Some(p);
                self.policy_token = Some(bytes);
                self.policy_source = source;
                self.reconcile_due = true;
                self.all_stale();
                self.generation += 1;
                if is_new {
                    Offered::Applied(version)
                } else {
                    Offered::Unchanged(version)
                }
            }
            // The persisted copy was accepted once, so a newer version has been applied since;
            // the file is likewise just older than what the fetcher brought.
            Err(PolicyError::Rollback { offered, highest })
                if source == PolicySource::FetchedCopy
                    || (source == PolicySource::File
                        && self.policy.is_some()
                        && self.policy_source.fetched()) =>
            {
                info!(
                    offered,
                    in_force = highest,
                    origin,
                    "policy superseded by a newer version; not applied"
                );
                self.record(AuditEvent::PolicySuperseded {
                    version: offered,
                    in_force: highest,
                    source: origin.into(),
                });
                Offered::Superseded
            }
            Err(e) => {
                let kind = RejectKind::from(&e);
                let digest = kycd_protocol::token_digest(&bytes);
                if previous.is_some_and(|r| r.digest == digest && r.kind == kind) {
                    return Offered::Rejected(kind); // A transient failure retried, unchanged: already recorded.
                }
                *self.counters.policies_rejected.entry(kind.as_str()).or_default() += 1;
                if source == PolicySource::Fetch {
                    warn!(kind = kind.as_str(), error = %e, origin, "fetched policy rejected; keeping the current one");
                } else {
                    error!(kind = kind.as_str(), error = %e, origin, "policy rejected; keeping the current one");
                }
                self.record(AuditEvent::PolicyRejected {
                    kind: kind.as_str().into(),
                    reason: e.to_string(),
                    source: origin.into(),
                });
                Offered::Rejected(kind)
            }
        }
    }

    /// A token from the policy fetcher: offered like the file, and kept in the state
    /// directory once accepted, so a restart enforces it without the collector.
    pub fn offer_fetched_policy(&mut self, token: Vec<u8>) -> FetchVerdict {
        let bytes = tokens::strip_one_newline(token);
        let digest = kycd_protocol::token_digest(&bytes);
        if let Some(p) = self.policy.as_ref().filter(|p| p.token_digest == digest) {
            return FetchVerdict::Unchanged { version: p.claims.version };
        }
        let previous = self.fetch_rejected.clone().filter(|r| r.digest == digest);
        if let Some(r) = previous.as_ref().filter(|r| r.permanent()) {
            return FetchVerdict::Rejected { kind: r.kind.as_str() };
        }
        let origin = self.config.policy.fetch_url.clone().unwrap_or_else(|| "fetch".into());
        match self.offer_policy(PolicySource::Fetch, &origin, bytes.clone(), previous.as_ref()) {
            Offered::Applied(version) => {
                self.fetch_rejected = None;
                self.persist_fetched(&bytes);
                FetchVerdict::Applied { version }
            }
            Offered::Unchanged(version) => {
                // Now in force from this token: the copy must be this token too.
                self.fetch_rejected = None;
                self.persist_fetched(&bytes);
                FetchVerdict::Unchanged { version }
            }
            Offered::Equivalent(version) => {
                self.fetch_rejected = None;
                FetchVerdict::Unchanged { version }
            }
            Offered::Superseded => FetchVerdict::Rejected { kind: RejectKind::Rollback.as_str() },
            Offered::Rejected(kind) => {
                self.fetch_rejected = Some(Rejection { digest, kind });
                FetchVerdict::Rejected { kind: kind.as_str() }
            }
        }
    }

    /// Writes the fetched policy in force to the state directory (atomically, fsync'd).
    /// A failure leaves it in force now; after a restart the host has the policy file's
    /// version or, if that is lower, none until the next fetch (fail closed).
    fn persist_fetched(&mut self, bytes: &[u8]) {
        let path = self.fetched_copy_path();
        match crate::fsutil::write_atomic(&path, bytes) {
            Ok(()) => {
                self.rejected.remove(&path);
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot keep the fetched policy; a restart will not enforce it until fetched again");
                self.record(AuditEvent::PolicyFetchNotPersisted { reason: e.to_string(), source: path });
            }
        }
    }
}
