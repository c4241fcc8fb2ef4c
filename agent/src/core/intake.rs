//! Attestation intake: files in the drop directory, the host attestation, and those brought
//! by admission requests all go through one verification and one pair of accept/reject
//! records. Unreadable is not invalid: a file that cannot be read for want of resources
//! keeps what it attested ([`crate::fsutil::is_resource_error`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kycd_protocol::{verify, AttestationClaims, Verdict, VerifyError};
use tracing::{debug, error, info, warn};

use super::{Agent, AuditEvent, RejectKind};
use crate::discovery::workload::{WorkloadId, WorkloadKind};
use crate::fsutil::is_resource_error;
use crate::net::operator_api::{Admission, AdmitAnswer};
use crate::tokens;

/// A file that failed intake, by the digest of its content. Permanent failures (bad
/// signature, malformed, expired) are not retried until the content or the trust anchors
/// change; transient ones (not valid yet, a missing cloud-init file) are retried on every
/// tick, silently unless the outcome changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejection {
    pub(super) digest: String,
    pub(super) kind: RejectKind,
}

impl Rejection {
    pub(super) fn permanent(&self) -> bool {
        !self.kind.is_transient()
    }
}

/// A verified attestation and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Attested {
    pub(super) claims: AttestationClaims,
    pub(super) token_digest: String,
    pub(super) workload: WorkloadId,
}

/// Whether intake re-verifies a file whose content was already judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recheck {
    /// Skip content already accepted or permanently rejected (watcher events, ticks).
    IfChanged,
    /// Verify again (the trust anchors may have changed).
    Always,
}

/// Why an attestation was not accepted.
#[derive(Debug, thiserror::Error)]
pub(super) enum IntakeError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{0}")]
    Io(String),
    #[error("bound to host {bound:?}, this host is {actual:?}")]
    WrongHost { bound: String, actual: String },
    #[error("the host attestation file must carry a binding of kind \"host\"")]
    NotHostBinding,
    /// An input the verification needs could not be read for want of resources or a failing
    /// disk ([`is_resource_error`]): not a verdict on the attestation.
    #[error("{}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
}

impl IntakeError {
    fn kind(&self) -> RejectKind {
        match self {
            IntakeError::Verify(e) => e.into(),
            IntakeError::Io(_) | IntakeError::Unreadable { .. } => RejectKind::Io,
            IntakeError::WrongHost { .. } => RejectKind::WrongHost,
            IntakeError::NotHostBinding => RejectKind::NotHostBinding,
        }
    }
}

/// A file name in the drop directory that is a delivered attestation: `*.jws`, not hidden
/// (writers stage `.name.jws.tmp` or `.name` and rename into place).
pub(super) fn is_attestation_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !name.starts_with('.') && name.ends_with(".jws") && name.len() > ".jws".len()
}

/// What identifies a file that cannot be read as an attestation (a FIFO, a directory, a
/// device): its device, inode, modification time and type. A rejection is recorded once per
/// identity, not on every rescan.
fn file_identity(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) => format!(
            "file:{}:{}:{}.{}:{:o}",
            m.dev(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.mode() & nix::sys::stat::SFlag::S_IFMT.bits()
        ),
        Err(_) => String::new(),
    }
}

/// cloud-init's instance id (`v1.instance_id` in instance-data.json).
fn cloud_init_instance_id(path: &Path) -> Result<String, IntakeError> {
    let bytes = crate::fsutil::read_regular_file(path, 1 << 20).map_err(|e| {
        if is_resource_error(&e) {
            IntakeError::Unreadable { path: path.to_owned(), source: e }
        } else {
            IntakeError::Io(format!("{}: {e}", path.display()))
        }
    })?;
    let doc = kycd_protocol::json::parse_strict(&bytes)
        .map_err(|e| IntakeError::Io(format!("{}: {e}", path.display())))?;
    doc["v1"]["instance_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| IntakeError::Io(format!("{}: no v1.instance_id", path.display())))
}

impl Agent {
    fn verify_attestation(&self, bytes: &[u8], host_file: bool) -> Result<Attested, IntakeError> {
        let verified = verify::<AttestationClaims>(bytes, &self.issuers, &self.options(), self.now())?;
        let claims = verified.claims;
        if host_file && claims.binding.kind != kycd_protocol::BindingKind::Host {
            return Err(IntakeError::NotHostBinding);
        }
        if let Some(bound) = &claims.binding.host_id {
            let actual = if host_file {
                cloud_init_instance_id(&self.config.attestations.cloud_init_instance_data)?
            } else {
                self.host_id.clone()
            };
            if *bound != actual {
                return Err(IntakeError::WrongHost { bound: bound.clone(), actual });
            }
        }
        Ok(Attested {
            token_digest: kycd_protocol::token_digest(bytes),
            workload: WorkloadId::from_binding(&claims.binding),
            claims,
        })
    }

    /// Stores a verified attestation kept in `path` (recorded unless the same token is
    /// already stored there) and marks its workload for re-decision.
    fn accept(&mut self, path: PathBuf, a: Attested, via: Option<&str>) {
        if self.attestations.get(&path).is_some_and(|old| old.token_digest == a.token_digest) {
            return;
        }
        match via {
            Some(via) => {
                info!(workload = %a.workload, tenant = %a.claims.sub, jti = %a.claims.jti, via, "attestation accepted")
            }
            None => {
                info!(path = %path.display(), workload = %a.workload, tenant = %a.claims.sub, jti = %a.claims.jti, "attestation accepted")
            }
        }
        self.record(AuditEvent::AttestationAccepted {
            workload: a.workload.to_string(),
            tenant: a.claims.sub.clone(),
            jti: a.claims.jti.clone(),
            digest: a.token_digest.clone(),
            exp: a.claims.exp,
            source: path.clone(),
            via: via.map(str::to_owned),
        });
        self.stale_workload(&a.workload);
        if let Some(old) = self.attestations.insert(path, a) {
            self.stale_workload(&old.workload);
        }
        self.generation += 1;
    }

    /// Forgets the attestation kept in `path`, if any, and records its withdrawal.
    fn withdraw(&mut self, path: &Path) {
        let Some(gone) = self.attestations.remove(path) else { return };
        self.record(AuditEvent::AttestationWithdrawn {
            workload: gone.workload.to_string(),
            tenant: gone.claims.sub.clone(),
            jti: gone.claims.jti.clone(),
            source: path.to_owned(),
        });
        self.stale_workload(&gone.workload);
        self.generation += 1;
    }

    /// Counts, logs and records a refused attestation (`source`: its file, or `admission`).
    fn record_rejection(
        &mut self,
        kind: RejectKind,
        reason: String,
        source: String,
        workload: Option<&WorkloadId>,
    ) {
        *self.counters.attestations_rejected.entry(kind.as_str()).or_default() += 1;
        match workload {
            Some(w) => {
                warn!(workload = %w, kind = kind.as_str(), error = %reason, "admission: attestation rejected")
            }
            None => warn!(path = %source, kind = kind.as_str(), error = %reason, "attestation rejected"),
        }
        self.record(AuditEvent::AttestationRejected {
            kind: kind.as_str().into(),
            reason,
            source,
            workload: workload.map(ToString::to_string),
        });
    }

    /// Verifies one delivered file and stores or withdraws it.
    pub(super) fn ingest(&mut self, path: &Path, host_file: bool, recheck: Recheck) {
        let bytes = match crate::fsutil::read_regular_file(
            path,
            self.config.attestations.max_bytes.saturating_add(2),
        ) {
            Ok(bytes) => tokens::strip_one_newline(bytes),
            // `open` fails with EMFILE even for a file that no longer exists; `lstat` needs no
            // descriptor, so a deletion (the way to withdraw an attestation) still counts.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || (is_resource_error(&e)
                        && std::fs::symlink_metadata(path)
                            .is_err_and(|m| m.kind() == std::io::ErrorKind::NotFound)) =>
            {
                self.rejected.remove(path);
                if let Some(gone) = self.attestations.get(path) {
                    info!(path = %path.display(), workload = %gone.workload, tenant = %gone.claims.sub, "attestation withdrawn");
                }
                self.withdraw(path);
                return;
            }
            Err(e) if is_resource_error(&e) => {
                self.read_failed(path, &e);
                return;
            }
            Err(e) => {
                // Not readable as an attestation (a FIFO, a directory, …): rejected once per
                // file identity, so it is not re-recorded on every rescan.
                let identity = file_identity(path);
                let previous = self.rejected.get(path).filter(|r| r.digest == identity).cloned();
                self.read_failing.remove(path);
                self.reject(path, identity, IntakeError::Io(format!("{}: {e}", path.display())), previous);
                return;
            }
        };
        if self.read_failing.remove(path) {
            info!(path = %path.display(), "attestation readable again");
        }
        let digest = kycd_protocol::token_digest(&bytes);
        if recheck == Recheck::IfChanged
            && self.attestations.get(path).is_some_and(|a| a.token_digest == digest)
        {
            return;
        }
        let previous = self.rejected.get(path).filter(|r| r.digest == digest).cloned();
        if recheck == Recheck::IfChanged && previous.as_ref().is_some_and(Rejection::permanent) {
            debug!(path = %path.display(), "unchanged rejected file ignored");
            return;
        }
        match self.verify_attestation(&bytes, host_file) {
            Ok(a) => {
                self.rejected.remove(path);
                if host_file {
                    // cloud-init's instance data was read (when the binding needs it): a later
                    // outage is logged and recorded again.
                    self.read_failing.remove(&self.config.attestations.cloud_init_instance_data);
                }
                self.accept(path.to_owned(), a, None);
            }
            // cloud-init's instance data could not be read this time: keep what the file
            // attested (a reload under descriptor exhaustion must not withdraw the host's).
            Err(IntakeError::Unreadable { path: input, source }) => self.read_failed(&input, &source),
            Err(e) => self.reject(path, digest, e, previous),
        }
    }

    /// An input (an attestation file or directory, libvirt's status) could not be read for
    /// want of resources or a failing disk: what it said before stays in force. Counted
    /// every time; logged and recorded once per outage.
    pub(super) fn read_failed(&mut self, path: &Path, e: &std::io::Error) {
        self.counters.input_read_errors = self.counters.input_read_errors.saturating_add(1);
        self.last_read_error = Some((self.now(), format!("{}: {e}", path.display())));
        if self.read_failing.insert(path.to_owned()) {
            error!(path = %path.display(), error = %e, "cannot read an input; keeping what it said before");
            self.record(AuditEvent::InputReadFailed { source: path.to_owned(), error: e.to_string() });
        }
    }

    /// Records an intake failure (once per content and kind) and withdraws whatever the file
    /// attested before: a file that no longer verifies no longer attests.
    fn reject(&mut self, path: &Path, digest: String, e: IntakeError, previous: Option<Rejection>) {
        let rejection = Rejection { digest, kind: e.kind() };
        if previous.as_ref() != Some(&rejection) {
            self.record_rejection(e.kind(), e.to_string(), path.display().to_string(), None);
        }
        self.rejected.insert(path.to_owned(), rejection);
        self.withdraw(path);
    }

    /// Re-reads the drop directory, the attestations kept from admissions, and the host
    /// attestation.
    pub(super) fn rescan_attestations(&mut self, recheck: Recheck) {
        let mut present: BTreeSet<PathBuf> = BTreeSet::new();
        // Directories that could not be listed: what they held before is not gone.
        let mut unlisted: Vec<PathBuf> = Vec::new();
        for dir in [self.config.drop_dir(), self.config.admitted_dir()] {
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    let mut failed = None;
                    for entry in entries {
                        match entry {
                            Ok(entry) if is_attestation_file(&entry.path()) => {
                                present.insert(entry.path());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    match failed {
                        Some(e) => {
                            self.read_failed(&dir, &e);
                            unlisted.push(dir);
                        }
                        None if self.read_failing.remove(&dir) => {
                            info!(dir = %dir.display(), "attestation directory readable again");
                        }
                        None => {}
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == self.config.admitted_dir() => {
                    self.read_failing.remove(&dir);
                }
                Err(e) if is_resource_error(&e) => {
                    self.read_failed(&dir, &e);
                    unlisted.push(dir);
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "cannot read an attestation directory"),
            }
        }
        let host_file = self.config.attestations.host_attestation.clone();
        // Paths in a directory that could not be listed stay known while they exist (`lstat`
        // needs no descriptor): a file deleted during the outage is still withdrawn.
        let kept = |p: &Path| {
            unlisted.iter().any(|d| p.parent() == Some(d.as_path())) && std::fs::symlink_metadata(p).is_ok()
        };
        let stale: Vec<PathBuf> = self
            .attestations
            .keys()
            .filter(|p| **p != host_file && !present.contains(*p) && !kept(p))
            .cloned()
            .collect();
        for path in stale.iter().chain(present.iter()) {
            self.ingest(path, false, recheck);
        }
        let fetched_copy = self.fetched_copy_path();
        self.rejected.retain(|p, _| {
            present.contains(p)
                || kept(p)
                || *p == host_file
                || *p == self.config.policy.file
                || *p == fetched_copy
        });
        if host_file.exists() || self.attestations.contains_key(&host_file) {
            self.ingest(&host_file, true, recheck);
        }
    }

    /// Moves attestations kept from admissions out of the admitted directory once they have
    /// expired (they can no longer attest anything; keeping them there would grow it
    /// forever) into [`crate::config::Config::expired_dir`], where intake never looks, and
    /// deletes archived ones `attestations.expired_retention_s` after their expiry. The
    /// archive is the record of who was admitted under which attestation (issue 19): an
    /// expired attestation is not a secret, and outside the admitted directory it cannot
    /// authorise anything, so nothing requires deleting it at once.
    pub(super) fn expire_admitted(&mut self) {
        let dir = self.config.admitted_dir();
        let now = self.now();
        let cutoff = now.saturating_sub(i64::try_from(self.config.clock_skew_s).unwrap_or(i64::MAX));
        let expired: Vec<(PathBuf, i64)> = self
            .attestations
            .iter()
            .filter(|(path, a)| path.parent() == Some(dir.as_path()) && a.claims.exp <= cutoff)
            .map(|(path, a)| (path.clone(), a.claims.exp))
            .collect();
        let retention = self.config.attestations.expired_retention_s;
        let archive = self.config.expired_dir();
        for (path, exp) in expired {
            let moved = if retention == 0 {
                std::fs::remove_file(&path)
            } else {
                super::archive::archive(&path, &archive, exp)
            };
            match moved {
                Ok(()) => self.ingest(&path, false, Recheck::IfChanged), // records the withdrawal
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot archive an expired admitted attestation")
                }
            }
        }
        if now >= self.archive_pruned_at.saturating_add(super::archive::PRUNE_INTERVAL_S) {
            self.archive_pruned_at = now;
            match super::archive::prune(&archive, now, retention) {
                Ok(0) => {}
                Ok(n) => {
                    info!(removed = n, dir = %archive.display(), "expired attestations past retention deleted")
                }
                Err(e) => warn!(dir = %archive.display(), error = %e, "cannot prune expired attestations"),
            }
        }
    }

    /// Answers an admission request (`kycctl admit`): the attestation it brings goes through
    /// the same verification as a delivered file and, once verified, is persisted in the
    /// admitted directory (so it survives restarts like any delivered attestation); then the
    /// workload is decided, recorded and the decision returned. Anything short of a
    /// recorded decision answers deny.
    pub fn admit(&mut self, admission: Admission) -> AdmitAnswer {
        let workload = admission.workload;
        // A domain named like a UUID could otherwise borrow an attestation bound to that
        // UUID: such a name is accepted only as the domain's own UUID.
        if workload.kind == WorkloadKind::LibvirtDomain && crate::discovery::cgroup::is_uuid(&workload.id) {
            let own = admission.libvirt_uuid.as_deref() == Some(workload.id.to_ascii_lowercase().as_str());
            if !own {
                return AdmitAnswer::deny(&workload, "a libvirt domain named like a UUID must be that UUID");
            }
        }
        // The UUID → name mapping lets an attestation bound by UUID apply before the domain
        // runs. It is kept only if the domain is admitted, and one name has one UUID.
        let previous_mapping = match (workload.kind, &admission.libvirt_uuid) {
            (WorkloadKind::LibvirtDomain, Some(uuid)) => {
                let previous = self.admitted_domains.clone();
                let now = self.now();
                self.admitted_domains.retain(|u, (name, _)| u == uuid || *name != workload.id);
                self.admitted_domains.insert(uuid.clone(), (workload.id.clone(), now));
                // Bindings by UUID may resolve differently now.
                self.all_stale();
                Some(previous)
            }
            _ => None,
        };
        let answer = self.admit_inner(&workload, admission.attestation);
        if answer.verdict == Verdict::Deny {
            if let Some(previous) = previous_mapping {
                self.admitted_domains = previous;
                self.all_stale();
            }
        }
        answer
    }

    fn admit_inner(&mut self, workload: &WorkloadId, attestation: Option<Vec<u8>>) -> AdmitAnswer {
        if let Some(bytes) = attestation {
            let bytes = tokens::strip_one_newline(bytes);
            let attested = match self.verify_attestation(&bytes, false) {
                Ok(a) => a,
                Err(e) => {
                    self.record_rejection(e.kind(), e.to_string(), "admission".into(), Some(workload));
                    self.flush_records();
                    return AdmitAnswer::deny(
                        workload,
                        format!("attestation rejected ({}): {e}", e.kind().as_str()),
                    );
                }
            };
            let bound = self.resolve(&attested.workload);
            if bound != *workload {
                let reason = format!("the attestation is bound to {bound}, not {workload}");
                self.record_rejection(
                    RejectKind::BindingMismatch,
                    reason.clone(),
                    "admission".into(),
                    Some(workload),
                );
                self.flush_records();
                return AdmitAnswer::deny(workload, reason);
            }
            let digest_prefix: String = attested.token_digest.chars().take(16).collect();
            let path = self.config.admitted_dir().join(format!("{digest_prefix}.jws"));
            if let Err(e) = crate::fsutil::write_atomic(&path, &bytes) {
                error!(path = %path.display(), error = %e, "admission: cannot persist the attestation");
                return AdmitAnswer::deny(workload, format!("cannot persist the attestation: {e}"));
            }
            self.accept(path, attested, Some("admission"));
        }
        self.ensure_workload(workload);
        self.stale.workloads.insert(workload.clone());
        self.evaluate();
        // A decision that could not be recorded is no answer: the one on record may be stale.
        if self.audit_failures > 0 {
            return AdmitAnswer::deny(
                workload,
                "the audit log cannot be written; decisions are not recorded",
            );
        }
        match self.decisions.get(workload) {
            Some(d) => AdmitAnswer {
                workload: workload.to_string(),
                verdict: d.verdict,
                decision: Some(d.clone()),
                error: None,
            },
            None => AdmitAnswer::deny(workload, "the decision could not be recorded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_dir_file_filter() {
        for ok in ["/d/tenant-1.jws", "/d/a.jws"] {
            assert!(is_attestation_file(Path::new(ok)), "{ok}");
        }
        for skip in ["/d/.tenant-1.jws", "/d/.jws", "/d/x.jws.tmp", "/d/x.jws~", "/d/x.json", "/d/x"] {
            assert!(!is_attestation_file(Path::new(skip)), "{skip}");
        }
    }
}
