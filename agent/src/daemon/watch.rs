//! The inotify watches: the drop directory and the directories of the policy file and the
//! host attestation. A directory that does not exist yet (or was replaced) is (re)watched
//! on the next tick; until then the tick's rescan covers it. The watcher never blocks on
//! the event channel: when it is full, a flag asks for a rescan instead, so nothing is lost.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::DaemonError;
use crate::config::Config;
use crate::core::{Event, StartError};

/// The watcher and the directories it should watch.
pub(super) struct Watches {
    watcher: notify::RecommendedWatcher,
    /// Directory → inode it had when watched.
    watched: BTreeMap<PathBuf, u64>,
    wanted: Vec<PathBuf>,
}

impl std::fmt::Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches").field("watched", &self.watched).finish()
    }
}

impl Watches {
    /// Starts the watcher, sending [`Event::DropDir`] and [`Event::ConfigFile`] into `tx`
    /// and setting `overflow` when an event was lost.
    pub(super) fn start(
        config: &Config,
        tx: mpsc::Sender<Event>,
        overflow: Arc<AtomicBool>,
    ) -> Result<Self, DaemonError> {
        let drop_dir = config.drop_dir();
        let files = [config.policy.file.clone(), config.attestations.host_attestation.clone()];
        let watched_files = files.clone();
        let dir_for_events = drop_dir.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let event = match res {
                Ok(ev) if !ev.need_rescan() => ev,
                _ => {
                    overflow.store(true, Ordering::Relaxed);
                    return;
                }
            };
            // Our own reads of a file raise access/open events; reacting to them would re-read
            // the file forever.
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            for path in event.paths {
                let msg = if path.parent() == Some(dir_for_events.as_path()) {
                    Event::DropDir(path)
                } else if watched_files.contains(&path) {
                    Event::ConfigFile(path)
                } else {
                    continue;
                };
                if tx.try_send(msg).is_err() {
                    overflow.store(true, Ordering::Relaxed);
                }
            }
        })?;
        crate::fsutil::create_dir_durably(&drop_dir)
            .map_err(|source| StartError::StateDir { path: drop_dir.clone(), source })?;
        let mut wanted = vec![drop_dir];
        for dir in files.iter().filter_map(|f| f.parent()) {
            if !wanted.iter().any(|w| w == dir) {
                wanted.push(dir.to_owned());
            }
        }
        let mut watches = Watches { watcher, watched: BTreeMap::new(), wanted };
        watches.ensure();
        Ok(watches)
    }

    /// (Re)watches every wanted directory that exists and is not watched as it is now.
    pub(super) fn ensure(&mut self) {
        use notify::Watcher as _;
        use std::os::unix::fs::MetadataExt as _;
        for dir in &self.wanted {
            let inode = std::fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| m.ino());
            let current = self.watched.get(dir).copied();
            if inode == current {
                continue;
            }
            if current.is_some() {
                let _ = self.watcher.unwatch(dir);
                self.watched.remove(dir);
            }
            let Some(inode) = inode else { continue };
            match self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    debug!(dir = %dir.display(), "watching");
                    self.watched.insert(dir.clone(), inode);
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot watch; the periodic rescan covers it")
                }
            }
        }
    }
}
