//! The size cap: merging the oldest sealed segments' unacknowledged records per (tenant,
//! workload) so that every seq stays covered exactly once (rules in the parent module's
//! docs).

use std::collections::BTreeMap;

use kycd_protocol::UsageRecord;
use tracing::warn;

use super::frame::{covered, encode_frame};
use super::state::sync_dir;
use super::{io_err, Spool, SpoolError};

impl Spool {
    /// Merges the oldest sealed segments (about half of the spool, at least two; with `seal`,
    /// a lone active segment is sealed first). Returns whether the spool shrank.
    pub(super) fn merge_oldest(&mut self, seal: bool) -> Result<bool, SpoolError> {
        if seal && self.segments.len() == 1 {
            // Seal the active segment so there is something to merge.
            self.active = None;
        }
        let sealed =
            if self.active.is_some() { self.segments.len().saturating_sub(1) } else { self.segments.len() };
        let half = self.used_bytes() / 2;
        let mut take = 0;
        let mut bytes = 0;
        while take < sealed && (bytes < half || take < 2) {
            bytes += self.segments[take].len;
            take += 1;
        }
        if take == 0 {
            return Ok(false);
        }
        let mut records = Vec::new();
        for i in 0..take {
            let loaded = self.load_segment(i)?;
            if self.segments[i].unrepaired {
                // Its damaged bytes are not in quarantine yet: do not rewrite or delete it.
                return Ok(false);
            }
            records.extend(loaded.into_iter().filter(|r| covered(r) > self.cursor));
        }
        // Loading may have cut damage out.
        let bytes: u64 = self.segments[..take].iter().map(|s| s.len).sum();
        let records_in = records.len();
        let merged = merge_records(records);
        let mut buf = Vec::new();
        for r in &merged {
            encode_frame(r, &mut buf)
                .map_err(|e| SpoolError::Corrupt { path: self.dir.clone(), reason: e.to_string() })?;
        }
        if buf.len() as u64 >= bytes {
            return Ok(false);
        }
        let target = self.segments[0].path.clone();
        crate::fsutil::write_atomic(&target, &buf).map_err(io_err(&target))?;
        let covered_max = merged.iter().map(covered).max().unwrap_or(0);
        for seg in self.segments.drain(1..take) {
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        if take == self.segments.len() {
            // The active segment was merged too.
            self.active = None;
        }
        let first = &mut self.segments[0];
        first.len = buf.len() as u64;
        first.records = merged.len();
        first.covered = covered_max;
        sync_dir(&self.dir)?;
        self.stats.merges += 1;
        self.stats.merged_away += (records_in - merged.len()) as u64;
        warn!(
            segments = take,
            records_in,
            records_out = merged.len(),
            bytes_before = bytes,
            bytes_after = buf.len(),
            "spool near its size cap: merged the oldest unacknowledged windows per (tenant, workload)"
        );
        Ok(true)
    }
}

/// Folds `records` (in seq order) per (tenant, workload); see the module docs for the rules.
pub fn merge_records(records: Vec<UsageRecord>) -> Vec<UsageRecord> {
    let Some(span_end) = records.iter().map(covered).max() else { return Vec::new() };
    let mut groups: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
    let mut out: Vec<UsageRecord> = Vec::new();
    for r in records {
        let key = (r.window.tenant.clone(), r.window.workload.clone());
        match groups.get(&key) {
            Some(&i) => {
                let m = &mut out[i].window;
                let w = &r.window;
                m.gpu_seconds += w.gpu_seconds;
                // Bounds are summed before the estimate is, so a window without them (an
                // older spool) contributes its estimate to each.
                m.ops_lower = Some(m.lower_ops() + w.lower_ops());
                m.ops_upper = Some(m.upper_ops() + w.upper_ops());
                m.estimated_ops += w.estimated_ops;
                m.shared_gpu_seconds += w.shared_gpu_seconds;
                m.guest_gap_gpu_seconds += w.guest_gap_gpu_seconds;
                m.gpus = m.gpus.max(w.gpus);
                m.max_concurrent_gpus = m.max_concurrent_gpus.max(w.max_concurrent_gpus);
                m.peak_flops = m.peak_flops.max(w.peak_flops);
                m.start = m.start.min(w.start);
                m.end = m.end.max(w.end);
                m.merged_windows = m.merged_windows.saturating_add(w.merged_windows.max(1));
                m.method = m.method.weakest(w.method);
                m.training_like |= w.training_like;
                m.foreign_person |= w.foreign_person;
                m.foreign_status = Some(m.foreign_status().merge(w.foreign_status()));
            }
            None => {
                groups.insert(key, out.len());
                out.push(r);
            }
        }
    }
    // Partition the span: each record stands for its seq up to the next record's seq − 1.
    let starts: Vec<u64> = out.iter().map(|r| r.seq).collect();
    for (i, r) in out.iter_mut().enumerate() {
        let end = starts.get(i + 1).map_or(span_end, |next| next - 1);
        r.last_seq = (end > r.seq).then_some(end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::window;
    use super::super::SpoolOptions;
    use super::*;
    use kycd_protocol::EstimationMethod;

    #[test]
    fn merge_under_cap_keeps_totals_and_covers_every_seq() {
        let dir = tempfile::tempdir().unwrap();
        // ~400 bytes a record: the cap holds about 25 of them.
        let options = SpoolOptions { segment_max_bytes: 2000, max_bytes: 10_000 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        let mut total_ops = 0.0;
        let mut total_gpu_s = 0.0;
        let (mut total_lower, mut total_upper, mut total_shared) = (0.0, 0.0, 0.0);
        for i in 0..200i64 {
            let mut w = window(if i % 2 == 0 { "a" } else { "b" }, "cgroup:/x", i * 60);
            w.estimated_ops = (i + 1) as f64;
            // Every third window from an older spool, without bounds (= its estimate).
            if i % 3 != 0 {
                (w.ops_lower, w.ops_upper, w.shared_gpu_seconds) =
                    (Some(i as f64 / 2.0), Some(4.0 * (i + 1) as f64), 1.0);
            }
            total_lower += w.lower_ops();
            total_upper += w.upper_ops();
            total_shared += w.shared_gpu_seconds;
            w.max_concurrent_gpus = u32::try_from(i % 7).unwrap();
            if i == 3 {
                w.method = EstimationMethod::UtilizationUpperBound;
            }
            total_ops += w.estimated_ops;
            total_gpu_s += w.gpu_seconds;
            spool.append(w).unwrap();
        }
        assert!(spool.stats().merges > 0, "merged near the cap");
        assert!(spool.used_bytes() <= options.max_bytes);
        let records = spool.read_from(1, 10_000).unwrap();
        // Every seq 1..=200 is covered by exactly one record.
        let mut next = 1;
        for r in &records {
            assert_eq!(r.seq, next, "records partition the seqs");
            next = covered(r) + 1;
        }
        assert_eq!(next, 201);
        let ops: f64 = records.iter().map(|r| r.window.estimated_ops).sum();
        let gpu_s: f64 = records.iter().map(|r| r.window.gpu_seconds).sum();
        let windows: u32 = records.iter().map(|r| r.window.merged_windows).sum();
        assert_eq!((ops, gpu_s, windows), (total_ops, total_gpu_s, 200));
        let lower: f64 = records.iter().map(|r| r.window.lower_ops()).sum();
        let upper: f64 = records.iter().map(|r| r.window.upper_ops()).sum();
        let shared: f64 = records.iter().map(|r| r.window.shared_gpu_seconds).sum();
        assert_eq!((lower, upper, shared), (total_lower, total_upper, total_shared), "bounds summed too");
        let merged_a = records
            .iter()
            .find(|r| r.window.merged_windows > 1 && r.window.tenant.as_deref() == Some("a"))
            .unwrap();
        assert!(records.iter().any(|r| r.last_seq.is_some()), "merged records cover ranges");
        assert!(merged_a.window.start < merged_a.window.end - 60);
        assert_eq!(merged_a.window.max_concurrent_gpus, 6);
        assert_eq!(merged_a.window.method, EstimationMethod::GpmTensor);
        assert!(records.iter().any(|r| r.window.method == EstimationMethod::UtilizationUpperBound));
        // The merged state survives a restart and numbering continues.
        drop(spool);
        let mut spool = Spool::open(dir.path(), options).unwrap();
        assert_eq!(spool.read_from(1, 10_000).unwrap(), records);
        assert_eq!(spool.append(window("a", "w", 0)).unwrap(), 201);
    }

    #[test]
    fn full_when_merging_cannot_help() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { segment_max_bytes: 1000, max_bytes: 4000 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        let mut err = None;
        for i in 0..100 {
            // Every window its own workload: nothing to fold.
            match spool.append(window("t", &format!("cgroup:/w{i}"), 0)) {
                Ok(_) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = err.expect("the cap is hit");
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        let next = spool.next_seq();
        spool.ack(next - 1).unwrap();
        assert_eq!(spool.append(window("t", "w", 0)).unwrap(), next, "room again once acked; no seq lost");
    }

    #[test]
    fn interrupted_merge_leftovers_are_skipped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { segment_max_bytes: 1000, max_bytes: 1 << 30 };
        let mut spool = Spool::open(dir.path(), options).unwrap();
        for i in 0..20 {
            spool.append(window("t", "w", i * 60)).unwrap();
        }
        let paths = spool.segment_paths();
        let second = std::fs::read(&paths[1]).unwrap();
        let before = spool.read_from(1, 100).unwrap();
        assert!(spool.merge_oldest(false).unwrap());
        drop(spool);
        // Resurrect a merged-away segment, as if the crash came before its deletion.
        std::fs::write(&paths[1], second).unwrap();
        let mut spool = Spool::open(dir.path(), options).unwrap();
        let after = spool.read_from(1, 100).unwrap();
        assert!(!paths[1].exists(), "leftover removed");
        assert_eq!(after.iter().map(|r| r.window.merged_windows).sum::<u32>(), 20);
        assert!(after.len() < before.len());
        assert_eq!(spool.next_seq(), 21);
    }
}
