//! Opening a spool and handling damage: recovery on open (temp files, torn tails, leftovers
//! of an interrupted merge, the highwater), reading a segment around damaged bytes, and the
//! quarantine they are copied to before they are cut out. See the parent module's docs.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use kycd_protocol::UsageRecord;
use tracing::{error, info, warn};

use super::frame::{covered, decode_frames, Decoded};
use super::state::{read_json, sync_dir, CursorFile, HighwaterFile};
use super::{
    io_err, DamageKind, Segment, Spool, SpoolDamage, SpoolError, SpoolOptions, SpoolStats, CURSOR_FILE,
    DIR_MODE, FILE_MODE, HIGHWATER_FILE, MAX_PENDING_DAMAGE, QUARANTINE_DIR, SEGMENT_EXT,
};

/// Narrows what an older version left wider than 0700 (directories) / 0600 (files) in the
/// spool directory. Best effort: a failure is logged, not fatal.
fn restrict_modes(dir: &Path) {
    let restrict = |path: &Path| {
        let Ok(meta) = std::fs::symlink_metadata(path) else { return };
        let want = if meta.is_dir() {
            DIR_MODE
        } else if meta.is_file() {
            FILE_MODE
        } else {
            return;
        };
        match crate::fsutil::narrow_mode(path, &meta, want) {
            Ok(Some((from, to))) => {
                info!(path = %path.display(), from = format!("{from:04o}"), to = format!("{to:04o}"),
                      "narrowed the mode of a spool file")
            }
            Ok(None) => {}
            Err(e) => warn!(path = %path.display(), error = %e, "cannot narrow the mode of a spool file"),
        }
    };
    restrict(dir);
    for sub in [dir.to_owned(), dir.join(QUARANTINE_DIR)] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for entry in entries.flatten() {
                restrict(&entry.path());
            }
        }
    }
}

/// Copies `bytes` (damaged, from `segment` at `offset`) to a new file in `qdir` named by the
/// segment and the offset, mode 0600, fsync'd. A file of that name with the same content
/// (an earlier attempt that crashed before the segment was rewritten) is reused.
fn quarantine(qdir: &Path, segment: &Path, offset: usize, bytes: &[u8]) -> Result<PathBuf, SpoolError> {
    let stem = segment.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    for n in 0..1000u32 {
        let name = if n == 0 { format!("{stem}-{offset}.bad") } else { format!("{stem}-{offset}.{n}.bad") };
        let path = qdir.join(name);
        match OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&path) {
            Ok(mut file) => {
                return match file.write_all(bytes).and_then(|()| file.sync_all()) {
                    Ok(()) => Ok(path),
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        Err(io_err(&path)(e))
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
                    return Ok(path);
                }
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Err(SpoolError::Corrupt { path: qdir.to_owned(), reason: format!("no free name for {stem}-{offset}") })
}

impl Spool {
    /// Opens (creating) the spool in `dir` and recovers it: damage quarantined and cut out,
    /// torn tails truncated, duplicates of an interrupted merge removed, the next seq above
    /// everything ever visible.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        crate::fsutil::create_dir_durably(dir).map_err(io_err(dir))?;
        restrict_modes(dir);
        let cursor = read_json::<CursorFile>(&dir.join(CURSOR_FILE))?.map_or(0, |c| c.acked_seq);
        let highwater = read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE))?.map_or(0, |h| h.assigned_seq);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(crate::fsutil::TEMP_PREFIX) {
                // A durable write (highwater, cursor, merged segment) a crash interrupted
                // before its rename: never referenced.
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        info!(path = %path.display(), "removed an interrupted write's temp file from the spool")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot remove a temp file from the spool")
                    }
                }
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
                continue;
            }
            let Some(seq) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok())
            else {
                warn!(path = %path.display(), "ignoring a file in the spool that is not a segment");
                continue;
            };
            names.push((seq, path));
        }
        names.sort();
        let mut spool = Spool {
            dir: dir.to_owned(),
            options,
            segments: Vec::new(),
            active: None,
            next_seq: 0,
            cursor,
            highwater,
            tail_dirty: false,
            stats: SpoolStats::default(),
            damage: Vec::new(),
        };
        let newest = names.len();
        let mut covered_so_far = 0u64;
        for (i, (name_seq, path)) in names.into_iter().enumerate() {
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let mut seg = Segment {
                name_seq,
                path,
                len: bytes.len() as u64,
                covered: 0,
                records: 0,
                unrepaired: false,
                torn_tail_after: (i + 1 == newest).then_some(highwater),
            };
            let decoded = decode_frames(&bytes);
            if !decoded.bad.is_empty() {
                spool.cut_out(&mut seg, &bytes, &decoded, covered_so_far);
            }
            let records = decoded.records;
            let fresh = records.iter().filter(|r| r.seq > covered_so_far).count();
            if fresh < records.len() {
                // Left over from a merge interrupted before it deleted the merged segments.
                if fresh == 0 {
                    info!(path = %seg.path.display(), "removing a spool segment already merged into an earlier one");
                    std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
                    continue;
                }
                return Err(SpoolError::Corrupt {
                    path: seg.path,
                    reason: format!("records overlap seqs up to {covered_so_far} of an earlier segment"),
                });
            }
            seg.covered = records.iter().map(covered).max().unwrap_or(0);
            seg.records = records.len();
            covered_so_far = covered_so_far.max(seg.covered);
            spool.segments.push(seg);
        }
        sync_dir(dir)?;
        if covered_so_far > highwater {
            // Intact records above the mark: written before a crash that came before their
            // highwater (or by a version that wrote it later). Make them durable, then cover
            // them, before anything can see them.
            for seg in spool.segments.iter().filter(|s| s.covered > highwater) {
                File::open(&seg.path).and_then(|f| f.sync_all()).map_err(io_err(&seg.path))?;
            }
            spool.persist_highwater(covered_so_far)?;
        }
        spool.next_seq = covered_so_far.max(spool.highwater).max(cursor).saturating_add(1);
        spool.delete_acked()?;
        info!(dir = %dir.display(), next_seq = spool.next_seq, acked_seq = cursor, segments = spool.segments.len(),
              bytes = spool.used_bytes(), "spool opened");
        Ok(spool)
    }

    /// Quarantines the damaged bytes of `seg` (whose content is `bytes`, decoded as
    /// `decoded`; `floor`: the highest seq in earlier segments), then cuts them out of the
    /// file and reports them. When the quarantine cannot be written, the segment is left as
    /// it is and marked unrepaired.
    fn cut_out(&mut self, seg: &mut Segment, bytes: &[u8], decoded: &Decoded, floor: u64) {
        match self.try_cut_out(seg, bytes, decoded, floor) {
            Ok(found) => {
                seg.len = (bytes.len() - decoded.bad.iter().map(|b| b.end - b.start).sum::<usize>()) as u64;
                seg.unrepaired = false;
                seg.torn_tail_after = None;
                for d in found {
                    self.report(d);
                }
            }
            Err(e) => {
                self.stats.quarantine_failures += 1;
                seg.unrepaired = true;
                seg.len = bytes.len() as u64;
                let bad: usize = decoded.bad.iter().map(|b| b.end - b.start).sum();
                error!(path = %seg.path.display(), error = %e, damaged_bytes = bad,
                       "spool segment is damaged and the damaged bytes cannot be quarantined: left in place, read around them, retried later");
            }
        }
    }

    fn try_cut_out(
        &self,
        seg: &Segment,
        bytes: &[u8],
        decoded: &Decoded,
        floor: u64,
    ) -> Result<Vec<SpoolDamage>, SpoolError> {
        let qdir = self.dir.join(QUARANTINE_DIR);
        crate::fsutil::create_dir_durably(&qdir).map_err(io_err(&qdir))?;
        let now = kycd_protocol::clock::unix_now();
        let mut found = Vec::with_capacity(decoded.bad.len());
        for run in &decoded.bad {
            // The last intact seq before the run, in this segment or an earlier one.
            let before = run.seq_before.max(floor);
            let torn = run.seq_after.is_none() && seg.torn_tail_after.is_some_and(|hw| before >= hw);
            let quarantined = quarantine(&qdir, &seg.path, run.start, &bytes[run.start..run.end])?;
            found.push(SpoolDamage {
                kind: if torn { DamageKind::TornTail } else { DamageKind::Corrupt },
                segment: seg.path.clone(),
                offset: run.start as u64,
                len: (run.end - run.start) as u64,
                seq_before: before,
                seq_after: run.seq_after,
                quarantined,
                found_at: now,
            });
        }
        sync_dir(&qdir)?;
        match decoded.bad.as_slice() {
            [only] if only.seq_after.is_none() => {
                // Only a bad tail: truncate.
                let file = OpenOptions::new().write(true).open(&seg.path).map_err(io_err(&seg.path))?;
                file.set_len(only.start as u64).and_then(|()| file.sync_all()).map_err(io_err(&seg.path))?;
            }
            runs => {
                let mut clean = Vec::with_capacity(bytes.len());
                let mut from = 0;
                for run in runs {
                    clean.extend_from_slice(&bytes[from..run.start]);
                    from = run.end;
                }
                clean.extend_from_slice(&bytes[from..]);
                crate::fsutil::write_atomic(&seg.path, &clean).map_err(io_err(&seg.path))?;
            }
        }
        Ok(found)
    }

    /// Logs, counts and queues one damage report.
    fn report(&mut self, d: SpoolDamage) {
        let (segment, quarantined) = (d.segment.display(), d.quarantined.display());
        match d.kind {
            DamageKind::Corrupt => {
                self.stats.damaged_regions += 1;
                self.stats.damaged_bytes += d.len;
                error!(%segment, offset = d.offset, bytes = d.len, seq_before = d.seq_before, seq_after = ?d.seq_after,
                       %quarantined, "spool segment damaged: the damaged bytes were quarantined and cut out; the records after them are kept");
            }
            DamageKind::TornTail => {
                self.stats.torn_tails += 1;
                self.stats.truncated_bytes += d.len;
                warn!(%segment, offset = d.offset, bytes = d.len, last_seq = d.seq_before, %quarantined,
                      "spool segment has a torn tail (a write a crash interrupted; never acknowledged): quarantined and truncated");
            }
        }
        self.stats.last_damage_at = d.found_at;
        if self.damage.len() < MAX_PENDING_DAMAGE {
            self.damage.push(d);
        } else {
            warn!("too many spool damage reports pending: this one is counted and logged only");
        }
    }

    /// Damage found since the last call (on open and on reads), oldest first: for the audit
    /// log.
    pub fn take_damage(&mut self) -> Vec<SpoolDamage> {
        std::mem::take(&mut self.damage)
    }

    /// The records of segment `i`, read around any damage; damage found is quarantined, cut
    /// out and reported (or, when that fails, the segment is marked unrepaired).
    pub(super) fn load_segment(&mut self, i: usize) -> Result<Vec<UsageRecord>, SpoolError> {
        let Some(seg) = self.segments.get(i) else { return Ok(Vec::new()) };
        let mut bytes = Vec::with_capacity(usize::try_from(seg.len).unwrap_or(0));
        File::open(&seg.path)
            .and_then(|f| f.take(seg.len).read_to_end(&mut bytes))
            .map_err(io_err(&seg.path))?;
        let decoded = decode_frames(&bytes);
        if decoded.bad.is_empty() {
            return Ok(decoded.records);
        }
        let last = i + 1 == self.segments.len();
        let floor = self.segments[..i].iter().map(|s| s.covered).max().unwrap_or(0);
        let mut seg = self.segments.remove(i);
        self.cut_out(&mut seg, &bytes, &decoded, floor);
        if !seg.unrepaired {
            seg.records = decoded.records.len();
            seg.covered = decoded.records.iter().map(covered).max().unwrap_or(0);
            if last {
                // Rewritten or truncated under the append handle: reopen before appending.
                self.active = None;
                self.tail_dirty = false;
            }
        }
        self.segments.insert(i, seg);
        Ok(decoded.records)
    }
}
