//! The spool end to end through its API: appending, acknowledging, restarting, damage and
//! its recovery, file modes.

use std::fs::OpenOptions;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::PermissionsExt as _;

use kycd_protocol::{EstimationMethod, UsageWindow};

use super::frame::HEADER;
use super::state::read_json;
use super::*;

pub fn window(tenant: &str, workload: &str, start: i64) -> UsageWindow {
    UsageWindow {
        tenant: Some(tenant.into()),
        workload: workload.into(),
        foreign_person: false,
        foreign_status: None,
        start,
        end: start + 60,
        gpu_seconds: 60.0,
        gpus: 1,
        max_concurrent_gpus: 1,
        estimated_ops: 1e15,
        ops_lower: None,
        ops_upper: None,
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: 1e15,
        method: EstimationMethod::GpmTensor,
        training_like: false,
        merged_windows: 1,
    }
}

fn opts() -> SpoolOptions {
    SpoolOptions { segment_max_bytes: 2048, max_bytes: 1 << 30 }
}

fn seqs(records: &[UsageRecord]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

#[test]
fn append_read_ack_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    for i in 0..40 {
        assert_eq!(spool.append(window("t", "cgroup:/a", i * 60)).unwrap(), i as u64 + 1);
    }
    assert!(spool.segment_count() > 3, "rotated by size");
    let all = spool.read_from(1, 1000).unwrap();
    assert_eq!(seqs(&all), (1..=40).collect::<Vec<_>>());
    assert_eq!(seqs(&spool.read_from(11, 5).unwrap()), vec![11, 12, 13, 14, 15]);
    let before = spool.segment_count();
    assert!(spool.ack(20).unwrap());
    assert!(!spool.ack(10).unwrap(), "the cursor never goes back");
    assert!(spool.segment_count() < before, "acked segments deleted");
    assert_eq!(spool.read_from(21, 1000).unwrap().first().map(|r| r.seq), Some(21));
    spool.ack(40).unwrap();
    assert_eq!(spool.segment_count(), 0, "everything acked: no segment left");
    drop(spool);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(spool.acked_seq(), 40);
    assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 41, "seq continues after deleting every segment");
}

#[test]
fn inspect_lists_records_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    spool.append_batch(&[window("t", "w", 0), window("t", "w", 60), window("t", "w", 120)]).unwrap();
    spool.ack(1).unwrap();
    drop(spool);
    let seg = last_segment(dir.path());
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"torn").unwrap();
    drop(f);
    let before = std::fs::read(&seg).unwrap();
    let inspection = inspect(dir.path()).unwrap();
    assert_eq!(inspection.acked_seq, 1);
    assert_eq!(inspection.segments.len(), 1);
    assert_eq!(inspection.segments[0].records, vec![[1, 1], [2, 2], [3, 3]]);
    assert_eq!(inspection.segments[0].torn_bytes, 4);
    assert_eq!(inspection.segments[0].damaged_bytes, 0);
    assert!(inspection.quarantine.is_empty());
    assert_eq!(std::fs::read(&seg).unwrap(), before, "read-only");
}

#[test]
fn restart_continues_seq_and_keeps_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    let (a, b) = spool.append_batch(&[window("t", "w", 0), window("t", "w", 60)]).unwrap();
    assert_eq!((a, b), (1, 2));
    drop(spool);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(spool.append(window("t", "w", 120)).unwrap(), 3);
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3]);
    // The highwater file alone keeps the numbering when segments are gone.
    spool.ack(3).unwrap();
    drop(spool);
    std::fs::remove_file(dir.path().join(CURSOR_FILE)).unwrap();
    // A durable write a crash interrupted before its rename leaves a temp file: removed.
    let temp = dir.path().join(format!("{}abc123", crate::fsutil::TEMP_PREFIX));
    std::fs::write(&temp, b"{\"assigned_seq\":").unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert!(!temp.exists());
    assert_eq!(spool.append(window("t", "w", 180)).unwrap(), 4);
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Frame boundaries `(start, end)` of an intact segment.
fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push((at, at + HEADER + len));
        at += HEADER + len;
    }
    out
}

fn quarantine_files(spool_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(spool_dir.join(QUARANTINE_DIR)) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn highwater_on_disk(dir: &Path) -> Option<u64> {
    read_json::<HighwaterFile>(&dir.join(HIGHWATER_FILE)).unwrap().map(|h| h.assigned_seq)
}

#[test]
fn highwater_is_durable_when_an_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(highwater_on_disk(dir.path()), None);
    let batch = [window("t", "w", 0), window("t", "w", 60), window("t", "w", 120)];
    assert_eq!(spool.append_batch(&batch).unwrap(), (1, 3));
    assert_eq!(highwater_on_disk(dir.path()), Some(3), "written before the batch counts as appended");
    assert_eq!(spool.append(window("t", "w", 180)).unwrap(), 4);
    assert_eq!(highwater_on_disk(dir.path()), Some(4));
    assert_eq!(spool.highwater(), 4);
}

/// Formerly `torn_tail_is_truncated_and_its_invisible_seq_reused`. Cutting an appended
/// record short is damage to a *visible* record (its append returned, the uploader may
/// have sent it): the highwater covers it, so its seq is never handed out again. Only a
/// write above the highwater is a torn tail whose seqs come back (next test).
#[test]
fn a_damaged_last_record_is_quarantined_and_its_seq_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
    for i in 0..5 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    drop(spool);
    let seg = last_segment(dir.path());
    let bytes = std::fs::read(&seg).unwrap();
    let (start, end) = *frames(&bytes).last().unwrap();
    let file = OpenOptions::new().write(true).open(&seg).unwrap();
    file.set_len(end as u64 - 20).unwrap();
    drop(file);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    let stats = spool.stats();
    assert_eq!((stats.damaged_regions, stats.damaged_bytes), (1, (end - start - 20) as u64));
    assert_eq!(stats.torn_tails, 0, "seq 5 was visible: not a torn write");
    let damage = spool.take_damage();
    assert_eq!(damage.len(), 1);
    assert_eq!(damage[0].kind, DamageKind::Corrupt);
    assert_eq!((damage[0].offset, damage[0].seq_before, damage[0].seq_after), (start as u64, 4, None));
    assert_eq!(std::fs::read(&damage[0].quarantined).unwrap(), &bytes[start..end - 20]);
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4]);
    assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 6, "seq 5 was visible: never reused");
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4, 6]);
    assert!(spool.take_damage().is_empty(), "reported once");
}

#[test]
fn a_torn_write_above_the_highwater_is_truncated_and_its_seq_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
    for i in 0..5 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    drop(spool);
    assert_eq!(highwater_on_disk(dir.path()), Some(5));
    // A crash while writing the batch 6..=7, before its highwater: frame 6 whole, 7 cut.
    let mut frames67 = Vec::new();
    for seq in [6, 7] {
        let record = UsageRecord { seq, last_seq: None, window: window("t", "w", 0) };
        encode_frame(&record, &mut frames67).unwrap();
    }
    let cut = frames67.len() - 30;
    let seg = last_segment(dir.path());
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&frames67[..cut]).unwrap();
    drop(f);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4, 5, 6], "the whole frame is kept");
    assert_eq!(highwater_on_disk(dir.path()), Some(6), "and covered before anyone sees it");
    let damage = spool.take_damage();
    assert_eq!(damage.len(), 1);
    assert_eq!((damage[0].kind, damage[0].seq_before), (DamageKind::TornTail, 6));
    let frame7 = frames(&frames67[..]).first().map(|&(_, end)| end).unwrap();
    assert_eq!(std::fs::read(&damage[0].quarantined).unwrap(), &frames67[frame7..cut]);
    assert_eq!((spool.stats().torn_tails, spool.stats().truncated_bytes), (1, (cut - frame7) as u64));
    assert_eq!(spool.stats().damaged_regions, 0);
    assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 7, "seq 7 was never visible");
    assert_eq!(spool.read_from(7, 1).unwrap()[0].window.start, 999);
    // A header cut short is a torn tail too.
    drop(spool);
    let seg = last_segment(dir.path());
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[7, 0, 0]).unwrap();
    drop(f);
    let spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(spool.stats().truncated_bytes, 3);
    assert_eq!(spool.next_seq(), 8);
    assert_eq!(quarantine_files(dir.path()).len(), 2);
}

#[test]
fn a_torn_first_write_of_a_new_segment_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    for i in 0..3 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    drop(spool);
    // The crash came while the first batch of a new segment was being written.
    let mut frame = Vec::new();
    encode_frame(&UsageRecord { seq: 4, last_seq: None, window: window("t", "w", 0) }, &mut frame).unwrap();
    let seg = dir.path().join(format!("{:020}.{SEGMENT_EXT}", 4));
    std::fs::write(&seg, &frame[..frame.len() / 2]).unwrap();
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    let damage = spool.take_damage();
    assert_eq!(damage.len(), 1);
    assert_eq!((damage[0].kind, damage[0].seq_before), (DamageKind::TornTail, 3));
    assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 4, "seq 4 was never visible");
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 3, 4]);
}

/// Formerly `crc_corruption_ends_the_segment`, which truncated records 3 *and 4* and
/// numbered the next append 3 again.
#[test]
fn a_damaged_record_costs_only_itself_and_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
    for i in 0..4 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    drop(spool);
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let (start, end) = frames(&bytes)[2];
    // Flip a byte inside record 3's payload.
    bytes[start + HEADER + 3] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    let inspection = inspect(dir.path()).unwrap();
    assert_eq!(inspection.segments[0].damaged_bytes, (end - start) as u64);
    assert_eq!(inspection.segments[0].records, vec![[1, 1], [2, 2], [4, 4]]);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 4]);
    let mut expected = bytes[..start].to_vec();
    expected.extend_from_slice(&bytes[end..]);
    assert_eq!(std::fs::read(&seg).unwrap(), expected, "cut out of the segment");
    let damage = spool.take_damage();
    assert_eq!(damage.len(), 1);
    let d = &damage[0];
    assert_eq!(d.kind, DamageKind::Corrupt);
    assert_eq!((d.segment.clone(), d.offset, d.len), (seg.clone(), start as u64, (end - start) as u64));
    assert_eq!((d.seq_before, d.seq_after), (2, Some(4)));
    let stem = seg.file_stem().unwrap().to_string_lossy().into_owned();
    assert_eq!(d.quarantined, dir.path().join(QUARANTINE_DIR).join(format!("{stem}-{start}.bad")));
    assert_eq!(std::fs::read(&d.quarantined).unwrap(), &bytes[start..end], "nothing destroyed");
    assert_eq!(mode(&d.quarantined), 0o600);
    assert_eq!((spool.stats().damaged_regions, spool.stats().damaged_bytes), (1, (end - start) as u64));
    assert!(spool.stats().last_damage_at > 0);
    assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 5, "seq 3 is never reused");
    drop(spool);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert!(spool.take_damage().is_empty(), "repaired for good");
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 4, 5]);
    assert_eq!(inspect(dir.path()).unwrap().quarantine, vec![format!("{stem}-{start}.bad")]);
}

#[test]
fn damage_found_while_running_is_cut_out_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), SpoolOptions { segment_max_bytes: 1 << 20, ..opts() }).unwrap();
    for i in 0..10 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    let seg = last_segment(dir.path());
    let bytes = std::fs::read(&seg).unwrap();
    let (start, end) = frames(&bytes)[4];
    // Bit rot in record 5's CRC while the spool is open.
    let mut f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.seek(SeekFrom::Start(start as u64 + 5)).unwrap();
    f.write_all(&[bytes[start + 5] ^ 0xff]).unwrap();
    drop(f);
    assert_eq!(seqs(&spool.read_from(1, 100).unwrap()), vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    let damage = spool.take_damage();
    assert_eq!(damage.len(), 1);
    assert_eq!(
        (damage[0].kind, damage[0].seq_before, damage[0].seq_after),
        (DamageKind::Corrupt, 4, Some(6))
    );
    assert_eq!(damage[0].len, (end - start) as u64);
    // Appending goes on after the rewrite, in the same segment.
    assert_eq!(spool.append(window("t", "w", 999)).unwrap(), 11);
    assert_eq!(spool.segment_count(), 1);
    let all = seqs(&spool.read_from(1, 100).unwrap());
    assert_eq!(all, vec![1, 2, 3, 4, 6, 7, 8, 9, 10, 11]);
    drop(spool);
    let mut spool = Spool::open(dir.path(), opts()).unwrap();
    assert_eq!(seqs(&spool.read_from(1, 100).unwrap()), all);
    assert!(spool.take_damage().is_empty());
}

#[test]
fn damage_that_cannot_be_quarantined_stays_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions { segment_max_bytes: 1 << 20, ..opts() };
    let mut spool = Spool::open(dir.path(), options).unwrap();
    for i in 0..6 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    drop(spool);
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let (start, _) = frames(&bytes)[2];
    bytes[start + HEADER + 1] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    // A file where the quarantine directory should be: the quarantine cannot be written.
    let blocker = dir.path().join(QUARANTINE_DIR);
    std::fs::write(&blocker, b"in the way").unwrap();
    let mut spool = Spool::open(dir.path(), options).unwrap();
    assert_eq!(spool.stats().quarantine_failures, 1);
    assert!(spool.take_damage().is_empty(), "not cut out, so not reported as handled");
    assert_eq!(seqs(&spool.read_from(1, 10).unwrap()), vec![1, 2, 4, 5, 6], "read around the damage");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "the damaged bytes stay where they are");
    assert_eq!(spool.append(window("t", "w", 0)).unwrap(), 7);
    assert_eq!(spool.segment_count(), 2, "never appended to: a new segment");
    spool.ack(7).unwrap();
    assert!(seg.exists(), "never deleted before its damage is in quarantine");
    std::fs::remove_file(&blocker).unwrap();
    spool.append(window("t", "w", 60)).unwrap();
    spool.ack(8).unwrap();
    assert!(!seg.exists(), "deleted once quarantined");
    let damage = spool.take_damage();
    assert_eq!(damage.len(), 1);
    assert_eq!(damage[0].seq_before, 2);
    assert_eq!(quarantine_files(dir.path()), vec![damage[0].quarantined.clone()]);
}

/// Every file the spool writes is 0600 and every directory 0700, set at creation (not
/// left to the umask: the test process's 022 would give 0644/0755), and an older spool's
/// wider modes are narrowed on open.
#[test]
fn spool_files_are_0600_and_directories_0700() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("state/spool");
    let mut spool = Spool::open(&dir, opts()).unwrap();
    for i in 0..20 {
        spool.append(window("t", "w", i * 60)).unwrap();
    }
    assert!(spool.segment_count() > 2);
    spool.ack(3).unwrap();
    drop(spool);
    let seg = last_segment(&dir);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[HEADER + 2] ^= 4;
    std::fs::write(&seg, &bytes).unwrap();
    std::fs::set_permissions(&seg, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut spool = Spool::open(&dir, opts()).unwrap();
    assert_eq!(spool.take_damage().len(), 1);
    spool.append(window("t", "w", 0)).unwrap();
    let mut checked = 0;
    let mut stack = vec![state.path().join("state")];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            assert_eq!(mode(&path), 0o700, "{}", path.display());
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
        checked += 1;
    }
    assert!(checked > 6, "state, spool, quarantine, segments, cursor, highwater: {checked}");
}

/// One spool of 1,000 records in several segments, built once; each case copies it,
/// XORs bytes at random positions, reopens it and checks that the damage cost exactly the
/// damaged records, that their bytes are in quarantine, and that later appends number
/// above every seq ever assigned.
struct Template {
    dir: tempfile::TempDir,
    records: Vec<UsageRecord>,
    segments: Vec<TemplateSegment>,
}

struct TemplateSegment {
    name: String,
    bytes: Vec<u8>,
    /// Frame boundaries.
    frames: Vec<(usize, usize)>,
}

fn template() -> Template {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions { segment_max_bytes: 64 << 10, max_bytes: 1 << 30 };
    let mut spool = Spool::open(dir.path(), options).unwrap();
    for batch in 0..40i64 {
        let windows: Vec<UsageWindow> =
            (0..25).map(|i| window(&format!("t{}", i % 7), "cgroup:/w", (batch * 25 + i) * 60)).collect();
        spool.append_batch(&windows).unwrap();
    }
    let records = spool.read_from(1, 2000).unwrap();
    assert_eq!(seqs(&records), (1..=1000).collect::<Vec<_>>());
    let segments: Vec<_> = spool
        .segment_paths()
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let f = frames(&bytes);
            TemplateSegment { name: p.file_name().unwrap().to_string_lossy().into_owned(), bytes, frames: f }
        })
        .collect();
    assert!(segments.len() >= 4, "several segments: {}", segments.len());
    assert_eq!(segments.iter().map(|s| s.frames.len()).sum::<usize>(), 1000);
    Template { dir, records, segments }
}

fn check_damage(t: &Template, hits: &[(usize, u8)]) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prop_assert;
    use proptest::prop_assert_eq;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(t.dir.path().join(HIGHWATER_FILE), dir.join(HIGHWATER_FILE)).unwrap();
    // Corrupt: a position counts over all segments' bytes together.
    let mut files: Vec<Vec<u8>> = t.segments.iter().map(|s| s.bytes.clone()).collect();
    let mut damaged_frames = std::collections::BTreeSet::new(); // (segment, frame index)
    for &(pos, mask) in hits {
        let mut at = pos;
        let mut s = 0;
        while at >= files[s].len() {
            at -= files[s].len();
            s += 1;
        }
        files[s][at] ^= mask;
        let f = t.segments[s].frames.iter().position(|&(a, b)| a <= at && at < b).unwrap();
        damaged_frames.insert((s, f));
    }
    for (seg, bytes) in t.segments.iter().zip(&files) {
        std::fs::write(dir.join(&seg.name), bytes).unwrap();
    }
    let options = SpoolOptions { segment_max_bytes: 64 << 10, max_bytes: 1 << 30 };
    let mut spool = Spool::open(&dir, options).unwrap();
    let got = spool.read_from(1, 5000).unwrap();
    // The records that survive are exactly the undamaged ones, unchanged.
    let mut lost = std::collections::BTreeSet::new();
    let mut k = 0;
    for (s, seg) in t.segments.iter().enumerate() {
        for f in 0..seg.frames.len() {
            if damaged_frames.contains(&(s, f)) {
                lost.insert(t.records[k].seq);
            }
            k += 1;
        }
    }
    let expected: Vec<&UsageRecord> = t.records.iter().filter(|r| !lost.contains(&r.seq)).collect();
    prop_assert_eq!(got.iter().collect::<Vec<_>>(), expected.clone());
    // Reported: exactly the damaged frames' bytes, as corrupt (every seq was visible).
    let damage = spool.take_damage();
    let damaged_len: usize =
        damaged_frames.iter().map(|&(s, f)| t.segments[s].frames[f].1 - t.segments[s].frames[f].0).sum();
    prop_assert_eq!(damage.iter().map(|d| d.len).sum::<u64>(), damaged_len as u64);
    prop_assert!(damage.iter().all(|d| d.kind == DamageKind::Corrupt), "{damage:?}");
    prop_assert_eq!(spool.stats().damaged_bytes, damaged_len as u64);
    // Quarantined: each damaged frame's bytes (as found) are in a quarantine file named
    // after its segment and an offset at or before it.
    let quarantined: Vec<(String, usize, Vec<u8>)> = quarantine_files(&dir)
        .iter()
        .map(|p| {
            assert_eq!(mode(p), 0o600);
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let (stem, rest) = name.split_once('-').unwrap();
            let offset: usize = rest.split('.').next().unwrap().parse().unwrap();
            (stem.to_owned(), offset, std::fs::read(p).unwrap())
        })
        .collect();
    for &(s, f) in &damaged_frames {
        let (a, b) = t.segments[s].frames[f];
        let stem = t.segments[s].name.trim_end_matches(".seg");
        let found = quarantined.iter().any(|(qs, o, bytes)| {
            qs == stem && *o <= a && b <= o + bytes.len() && bytes[a - o..b - o] == files[s][a..b]
        });
        prop_assert!(found, "segment {} frame {}..{} not in quarantine", stem, a, b);
    }
    // No seq is ever reused: appends number above every seq ever assigned.
    let batch = [window("new", "w", 0), window("new", "w", 60), window("new", "w", 120)];
    prop_assert_eq!(spool.append_batch(&batch).unwrap(), (1001, 1003));
    drop(spool);
    let mut spool = Spool::open(&dir, options).unwrap();
    prop_assert!(spool.take_damage().is_empty(), "repaired on the first open");
    let after = spool.read_from(1, 5000).unwrap();
    prop_assert_eq!(&after[..expected.len()], &got[..]);
    prop_assert_eq!(seqs(&after[expected.len()..]), vec![1001, 1002, 1003]);
    prop_assert_eq!(spool.append(window("new", "w", 180)).unwrap(), 1004);
    Ok(())
}

#[test]
fn property_damage_costs_only_the_damaged_records_and_no_seq_is_reused() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let t = template();
    let total: usize = t.segments.iter().map(|s| s.bytes.len()).sum();
    let config = |cases| Config { cases, failure_persistence: None, ..Config::default() };
    // One flipped byte anywhere.
    TestRunner::new(config(24))
        .run(&(0..total, 1u8..=255), |(pos, mask)| check_damage(&t, &[(pos, mask)]))
        .unwrap();
    // A few bytes at several positions.
    TestRunner::new(config(12))
        .run(&prop::collection::vec((0..total, 1u8..=255), 2..=6), |hits| check_damage(&t, &hits))
        .unwrap();
    // A burst of consecutive bytes (may span frames and segment boundaries).
    TestRunner::new(config(8))
        .run(&(0..total, prop::collection::vec(1u8..=255, 2..64)), |(pos, masks)| {
            let hits: Vec<(usize, u8)> =
                masks.iter().enumerate().map(|(i, &m)| (pos + i, m)).filter(|&(p, _)| p < total).collect();
            check_damage(&t, &hits)
        })
        .unwrap();
}
