//! Appending: group commit (one `write` and one `fdatasync` a batch, then the highwater),
//! segment rotation, the size cap check, and undoing a batch whose write failed.

use std::fs::OpenOptions;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;

use kycd_protocol::{UsageRecord, UsageWindow};
use tracing::warn;

use super::frame::encode_frame;
use super::state::sync_dir;
use super::{io_err, Segment, Spool, SpoolError, FILE_MODE, SEGMENT_EXT};

impl Spool {
    /// Appends one window; see [`Spool::append_batch`].
    pub fn append(&mut self, window: UsageWindow) -> Result<u64, SpoolError> {
        self.append_batch(std::slice::from_ref(&window)).map(|(first, _)| first)
    }

    /// Appends `windows` with one write and one fsync (then the highwater), returning the
    /// first and last seq assigned. On error nothing was appended and no seq was consumed;
    /// the caller keeps the windows and retries.
    pub fn append_batch(&mut self, windows: &[UsageWindow]) -> Result<(u64, u64), SpoolError> {
        let result = self.try_append(windows);
        if let Err(e) = &result {
            self.stats.append_failures += 1;
            if matches!(e, SpoolError::NoSpace { .. }) && !self.tail_dirty {
                // Merging may free space (it also needs some, so it may fail too).
                match self.merge_oldest(true) {
                    Ok(true) => {
                        return self.try_append(windows).inspect_err(|_| self.stats.append_failures += 1)
                    }
                    Ok(false) => {}
                    Err(merge) => warn!(error = %merge, "merging the spool to free space failed"),
                }
            }
        }
        result
    }

    fn try_append(&mut self, windows: &[UsageWindow]) -> Result<(u64, u64), SpoolError> {
        if windows.is_empty() {
            return Ok((self.next_seq, self.next_seq - 1));
        }
        self.repair_tail()?;
        let first = self.next_seq;
        let last = first + windows.len() as u64 - 1;
        let mut buf = Vec::with_capacity(windows.len() * 512);
        for (i, window) in windows.iter().enumerate() {
            let record = UsageRecord { seq: first + i as u64, last_seq: None, window: window.clone() };
            encode_frame(&record, &mut buf)
                .map_err(|e| SpoolError::Corrupt { path: self.dir.clone(), reason: e.to_string() })?;
        }
        let incoming = buf.len() as u64;
        if self.used_bytes() + incoming > self.options.max_bytes / 10 * 8 {
            while self.used_bytes() + incoming > self.options.max_bytes / 10 * 8 {
                if !self.merge_oldest(false)? {
                    break;
                }
            }
            if self.used_bytes() + incoming > self.options.max_bytes {
                return Err(SpoolError::Full { used: self.used_bytes(), max: self.options.max_bytes });
            }
        }
        let rotate =
            self.segments.last().is_none_or(|s| s.len >= self.options.segment_max_bytes || s.unrepaired);
        if self.active.is_none() || rotate {
            self.open_segment(first, rotate)?;
        }
        let Some((path, len)) = self.segments.last().map(|s| (s.path.clone(), s.len)) else {
            return Err(SpoolError::TailPending { path: self.dir.clone() });
        };
        let Some(file) = self.active.as_mut() else {
            return Err(SpoolError::TailPending { path });
        };
        let mut written = file.write_all(&buf).and_then(|()| file.sync_data()).map_err(io_err(&path));
        if written.is_ok() {
            // Durable frames first, then the mark that makes them visible for good.
            written = self.persist_highwater(last);
        }
        if let Err(e) = written {
            self.undo_write(len);
            return Err(e);
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.len += incoming;
            seg.covered = last;
            seg.records += windows.len();
        }
        self.next_seq = last + 1;
        self.stats.appended += windows.len() as u64;
        Ok((first, last))
    }

    /// Truncates the active segment back to `len` after a failed batch.
    fn undo_write(&mut self, len: u64) {
        let undone = match self.active.as_mut() {
            Some(file) => file
                .set_len(len)
                .and_then(|()| file.seek(SeekFrom::Start(len)))
                .and_then(|_| file.sync_data())
                .is_ok(),
            None => false,
        };
        if !undone {
            self.tail_dirty = true;
        }
    }

    fn repair_tail(&mut self) -> Result<(), SpoolError> {
        if !self.tail_dirty {
            return Ok(());
        }
        let (Some(file), Some(seg)) = (self.active.as_mut(), self.segments.last()) else {
            self.tail_dirty = false;
            return Ok(());
        };
        let len = seg.len;
        file.set_len(len)
            .and_then(|()| file.seek(SeekFrom::Start(len)))
            .and_then(|_| file.sync_data())
            .map_err(|_| SpoolError::TailPending { path: seg.path.clone() })?;
        self.tail_dirty = false;
        Ok(())
    }

    /// Opens the last segment for appending, or starts a new one named `first`.
    fn open_segment(&mut self, first: u64, new: bool) -> Result<(), SpoolError> {
        if !new {
            if let Some(seg) = self.segments.last() {
                let mut file = OpenOptions::new().write(true).open(&seg.path).map_err(io_err(&seg.path))?;
                file.seek(SeekFrom::Start(seg.len)).map_err(io_err(&seg.path))?;
                self.active = Some(file);
                return Ok(());
            }
        }
        self.active = None;
        let path = self.dir.join(format!("{first:020}.{SEGMENT_EXT}"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            name_seq: first,
            path,
            len: 0,
            covered: 0,
            records: 0,
            unrepaired: false,
            torn_tail_after: None,
        });
        self.active = Some(file);
        Ok(())
    }
}
