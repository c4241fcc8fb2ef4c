//! cgroup v2 freeze/kill enforcement.
//!
//! Owns the `cgroup.freeze` and `cgroup.kill` files of the cgroups it is asked to act on, and
//! a JSON state file listing every cgroup kycd froze together with the freeze state that
//! cgroup had *before* kycd touched it. Lifting restores exactly that: a cgroup somebody else
//! had already frozen stays frozen when kycd lets go of it. The state file is what lets a
//! restarted agent lift what an earlier run imposed.
//!
//! `cgroup.freeze` is the *requested* state, `cgroup.events`' `frozen` line the *effective*
//! one; freezing is asynchronous (tasks stop at their next return to user space), so a freeze
//! is confirmed by polling `cgroup.events` for a bounded time and otherwise reported as
//! pending, to be confirmed on a later call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kycd_protocol::clock::{Clock as _, SystemClock};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::EnforceError;

/// How long one [`CgroupEnforcer::reconcile`] waits, in total, for freezes to take effect.
const FREEZE_CONFIRM_BUDGET: Duration = Duration::from_millis(200);
const FREEZE_POLL: Duration = Duration::from_millis(5);
/// cgroup interface files are a few lines; anything longer is not what the kernel wrote.
const MAX_CGROUP_FILE: u64 = 4096;

/// What to do to a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupAction {
    /// Freeze every task in it (reversible).
    Freeze,
    /// Kill every task in it (`cgroup.kill`); not reversible, so there is nothing to lift.
    Kill,
}

/// What one [`CgroupEnforcer::reconcile`] did. Paths are cgroup directories.
#[derive(Debug, Default)]
pub struct CgroupReport {
    /// Frozen by this call and confirmed frozen (new freezes and drift repairs).
    pub frozen: Vec<PathBuf>,
    /// `cgroup.kill` written (the cgroup was populated).
    pub killed: Vec<PathBuf>,
    /// Thawed because kycd no longer wants them frozen and they were thawed before.
    pub thawed: Vec<PathBuf>,
    /// Released by kycd but left frozen, because they were frozen before kycd froze them.
    pub left_frozen: Vec<PathBuf>,
    /// Desired frozen, found thawed by someone else, and frozen again.
    pub drift: Vec<PathBuf>,
    /// Freeze requested but not yet effective within the wait budget.
    pub pending: Vec<PathBuf>,
    /// Cgroups that no longer exist; dropped from the state.
    pub vanished: Vec<PathBuf>,
    /// Per-cgroup failures; one cgroup failing never stops the others.
    pub errors: Vec<(PathBuf, EnforceError)>,
}

/// One cgroup kycd froze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Imposed {
    /// `cgroup.freeze` held 1 before kycd wrote it: lifting must leave it frozen.
    was_frozen: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    frozen: BTreeMap<PathBuf, Imposed>,
}

/// The cgroup v2 backend. See the module documentation.
#[derive(Debug)]
pub struct CgroupEnforcer {
    state_file: PathBuf,
    imposed: BTreeMap<PathBuf, Imposed>,
}

impl CgroupEnforcer {
    /// Loads the state of earlier runs from `state_file` (absent = nothing imposed). A
    /// corrupt file is logged and treated as empty: kycd then cannot lift what an earlier run
    /// imposed, but it still enforces what is desired now.
    pub fn new(state_file: PathBuf) -> Self {
        let imposed = match std::fs::read(&state_file) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(state) => state.frozen,
                Err(e) => {
                    warn!(path = %state_file.display(), error = %e, "corrupt cgroup state file; starting empty");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                warn!(path = %state_file.display(), error = %e, "unreadable cgroup state file; starting empty");
                BTreeMap::new()
            }
        };
        Self { state_file, imposed }
    }

    /// The cgroups kycd currently holds frozen (from its state).
    pub fn imposed(&self) -> impl Iterator<Item = &Path> {
        self.imposed.keys().map(PathBuf::as_path)
    }

    /// Converges the cgroups in `desired` and every cgroup kycd froze earlier to the desired
    /// state; see the module documentation.
    pub fn reconcile(&mut self, desired: &BTreeMap<PathBuf, CgroupAction>) -> CgroupReport {
        let mut report = CgroupReport::default();
        let before = self.imposed.clone();
        // Freezes whose effect is still to be confirmed, and whether each was a repair.
        let mut to_confirm: Vec<(PathBuf, bool)> = Vec::new();

        // Record the prior state of cgroups about to be frozen *before* writing anything, so
        // a crash between the write and the save cannot lose what must be restored.
        let mut fresh: Vec<PathBuf> = Vec::new();
        for (cg, action) in desired {
            if *action != CgroupAction::Freeze || self.imposed.contains_key(cg) {
                continue;
            }
            match read_freeze(cg) {
                Ok(was_frozen) => {
                    self.imposed.insert(cg.clone(), Imposed { was_frozen });
                    fresh.push(cg.clone());
                }
                Err(EnforceError::CgroupGone { path }) => report.vanished.push(path),
                Err(e) => report.errors.push((cg.clone(), e)),
            }
        }
        if !fresh.is_empty() {
            self.save(&mut report);
        }

        for (cg, action) in desired {
            match action {
                CgroupAction::Freeze => {
                    if !self.imposed.contains_key(cg) {
                        continue; // vanished or unreadable above
                    }
                    let is_fresh = fresh.contains(cg);
                    match read_freeze(cg) {
                        Ok(true) => {
                            // Already requested frozen; confirm the effect below.
                            to_confirm.push((cg.clone(), false));
                        }
                        Ok(false) => match write_file(cg, "cgroup.freeze", "1") {
                            Ok(()) => {
                                if !is_fresh {
                                    warn!(cgroup = %cg.display(), "cgroup thawed behind kycd's back; refreezing");
                                    report.drift.push(cg.clone());
                                }
                                to_confirm.push((cg.clone(), true));
                            }
                            Err(e) => self.fail(cg, e, &mut report),
                        },
                        Err(e) => self.fail(cg, e, &mut report),
                    }
                }
                CgroupAction::Kill => match read_events(cg) {
                    Ok(ev) if ev.populated => match write_file(cg, "cgroup.kill", "1") {
                        Ok(()) => {
                            info!(cgroup = %cg.display(), "killed every task in cgroup");
                            report.killed.push(cg.clone());
                        }
                        Err(e) => self.fail(cg, e, &mut report),
                    },
                    Ok(_) => debug!(cgroup = %cg.display(), "kill: cgroup already empty"),
                    Err(e) => self.fail(cg, e, &mut report),
                },
            }
        }

        // Lift what is no longer desired frozen. A cgroup switched from Freeze to Kill keeps
        // its record: it is still under a kycd measure, and lifting the kill later must still
        // restore the freeze state it had.
        let released: Vec<PathBuf> =
            self.imposed.keys().filter(|cg| !desired.contains_key(*cg)).cloned().collect();
        for cg in released {
            let was_frozen = self.imposed.get(&cg).is_some_and(|i| i.was_frozen);
            if was_frozen {
                info!(cgroup = %cg.display(), "released; left frozen as it was before kycd");
                self.imposed.remove(&cg);
                report.left_frozen.push(cg);
                continue;
            }
            match write_file(&cg, "cgroup.freeze", "0") {
                Ok(()) => {
                    info!(cgroup = %cg.display(), "thawed");
                    self.imposed.remove(&cg);
                    report.thawed.push(cg);
                }
                Err(e) => self.fail(&cg, e, &mut report),
            }
        }

        self.confirm(to_confirm, &mut report);
        if self.imposed != before {
            self.save(&mut report);
        }
        report
    }

    /// Polls `cgroup.events` until every freeze in `pending` is effective or the budget is
    /// spent. Freezes written by this call go to `frozen`; unconfirmed ones to `pending`.
    fn confirm(&mut self, mut waiting: Vec<(PathBuf, bool)>, report: &mut CgroupReport) {
        let deadline = SystemClock.instant() + FREEZE_CONFIRM_BUDGET;
        loop {
            let mut still = Vec::new();
            for (cg, written) in waiting {
                match read_events(&cg) {
                    Ok(ev) if ev.frozen => {
                        if written {
                            info!(cgroup = %cg.display(), "frozen");
                            report.frozen.push(cg);
                        }
                    }
                    Ok(_) => still.push((cg, written)),
                    Err(e) => self.fail(&cg, e, report),
                }
            }
            waiting = still;
            if waiting.is_empty() || SystemClock.instant() >= deadline {
                break;
            }
            std::thread::sleep(FREEZE_POLL);
        }
        for (cg, _) in waiting {
            debug!(cgroup = %cg.display(), "freeze requested, not yet effective");
            report.pending.push(cg);
        }
    }

    /// Files `e` under `cg`; a vanished cgroup is dropped from the state instead.
    fn fail(&mut self, cg: &Path, e: EnforceError, report: &mut CgroupReport) {
        if let EnforceError::CgroupGone { .. } = e {
            info!(cgroup = %cg.display(), "cgroup vanished; forgetting it");
            self.imposed.remove(cg);
            report.vanished.push(cg.to_path_buf());
        } else {
            warn!(cgroup = %cg.display(), error = %e, kind = e.kind(), "cgroup enforcement failed");
            report.errors.push((cg.to_path_buf(), e));
        }
    }

    fn save(&self, report: &mut CgroupReport) {
        let state = StateFile { version: 1, frozen: self.imposed.clone() };
        let result = serde_json::to_vec_pretty(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fsutil::write_atomic(&self.state_file, &bytes));
        if let Err(source) = result {
            warn!(path = %self.state_file.display(), error = %source, "cannot save cgroup state");
            report.errors.push((
                self.state_file.clone(),
                EnforceError::State { path: self.state_file.clone(), source },
            ));
        }
    }
}

/// The parsed `cgroup.events` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Events {
    populated: bool,
    frozen: bool,
}

fn read_small(path: &Path) -> Result<String, EnforceError> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CGROUP_FILE).read_to_string(&mut text))
        .map_err(|e| EnforceError::cgroup_io(path.to_path_buf(), e))?;
    Ok(text)
}

fn parse_flag(path: &Path, value: &str) -> Result<bool, EnforceError> {
    match value.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(EnforceError::CgroupParse {
            path: path.to_path_buf(),
            content: other.chars().take(64).collect(),
        }),
    }
}

/// The requested freeze state (`cgroup.freeze`).
fn read_freeze(cg: &Path) -> Result<bool, EnforceError> {
    let path = cg.join("cgroup.freeze");
    let text = read_small(&path)?;
    parse_flag(&path, &text)
}

fn read_events(cg: &Path) -> Result<Events, EnforceError> {
    let path = cg.join("cgroup.events");
    let text = read_small(&path)?;
    parse_events(&path, &text)
}

fn parse_events(path: &Path, text: &str) -> Result<Events, EnforceError> {
    let (mut populated, mut frozen) = (None, None);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("populated", v)) => populated = Some(parse_flag(path, v)?),
            Some(("frozen", v)) => frozen = Some(parse_flag(path, v)?),
            _ => {} // newer kernels may add keys
        }
    }
    match (populated, frozen) {
        (Some(populated), Some(frozen)) => Ok(Events { populated, frozen }),
        _ => Err(EnforceError::CgroupParse {
            path: path.to_path_buf(),
            content: text.chars().take(64).collect(),
        }),
    }
}

fn write_file(cg: &Path, file: &str, value: &str) -> Result<(), EnforceError> {
    let path = cg.join(file);
    // Open without O_CREAT: a missing file means the cgroup is gone (or the kernel lacks the
    // feature), never something to create.
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| EnforceError::cgroup_io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_events() {
        let p = Path::new("/x/cgroup.events");
        assert_eq!(
            parse_events(p, "populated 1\nfrozen 0\n").unwrap(),
            Events { populated: true, frozen: false }
        );
        assert_eq!(
            parse_events(p, "populated 0\nfrozen 1\nfuture 7\n").unwrap(),
            Events { populated: false, frozen: true }
        );
        assert!(matches!(parse_events(p, "populated 1\n"), Err(EnforceError::CgroupParse { .. })));
        assert!(matches!(parse_events(p, "populated x\nfrozen 0\n"), Err(EnforceError::CgroupParse { .. })));
    }

    #[test]
    fn gone_cgroup_is_vanished_not_error_and_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let mut e = CgroupEnforcer::new(state.clone());
        let mut desired = BTreeMap::new();
        desired.insert(dir.path().join("absent"), CgroupAction::Freeze);
        let r = e.reconcile(&desired);
        assert_eq!(r.vanished, vec![dir.path().join("absent")]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);

        // A fake cgroup dir (regular files): freezing writes the file; confirmation never
        // comes because no kernel updates cgroup.events, so it stays pending.
        let cg = dir.path().join("cg");
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(cg.join("cgroup.freeze"), "0\n").unwrap();
        std::fs::write(cg.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let mut desired = BTreeMap::new();
        desired.insert(cg.clone(), CgroupAction::Freeze);
        let r = e.reconcile(&desired);
        assert_eq!(r.pending, vec![cg.clone()]);
        assert_eq!(std::fs::read_to_string(cg.join("cgroup.freeze")).unwrap().trim(), "1");
        let again = CgroupEnforcer::new(state);
        assert_eq!(again.imposed().collect::<Vec<_>>(), vec![cg.as_path()]);
    }
}
