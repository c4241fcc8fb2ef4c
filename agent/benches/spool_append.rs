//! Spool append throughput with group commit: windows/s through the real writer task
//! ([`kycd::reporting::writer::run_writer`]: bounded channel → `append_batch` → one `fdatasync` per
//! group) at `group_commit_ms` = 0, 10, 100, and, as the baseline, one `append` (one fsync)
//! per window.
//!
//!     cargo bench -p kycd --bench spool_append [-- --dir /var/lib/kycd-bench] [--windows N]
//!
//! The spool is created in a temporary directory under `--dir` (default: the system temp
//! dir; say which file system it is on when quoting figures — tmpfs makes fsync free).
//! The producer sends as fast as the bounded channel (256, as in the daemon) lets it.

use std::sync::Arc;
use std::time::Duration;

use kycd::reporting::spool::{Spool, SpoolOptions};
use kycd_protocol::{EstimationMethod, UsageWindow};

fn window(i: usize) -> UsageWindow {
    UsageWindow {
        tenant: Some(format!("tenant-{}", i % 100)),
        workload: format!("cgroup:/machine.slice/vm-{}.scope", i % 100),
        foreign_person: i % 3 == 0,
        foreign_status: None,
        start: 1_800_000_000 + (i as i64 / 100) * 60,
        end: 1_800_000_060 + (i as i64 / 100) * 60,
        gpu_seconds: 480.0,
        gpus: 8,
        max_concurrent_gpus: 8,
        estimated_ops: 1.2e19,
        ops_lower: None,
        ops_upper: None,
        shared_gpu_seconds: 0.0,
        guest_gap_gpu_seconds: 0.0,
        peak_flops: 7.9e15,
        method: EstimationMethod::GpmTensor,
        training_like: true,
        merged_windows: 1,
    }
}

fn options() -> SpoolOptions {
    SpoolOptions { segment_max_bytes: 4 << 20, max_bytes: 1 << 34 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let base = arg("--dir").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let n: usize = arg("--windows").and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    else {
        eprintln!("no runtime");
        return;
    };
    println!("spool append throughput, {n} windows, spool under {}", base.display());

    // Baseline: one fsync per window.
    let per_window = n.min(2_000);
    if let Ok(dir) = tempfile::tempdir_in(&base) {
        if let Ok(mut spool) = Spool::open(dir.path(), options()) {
            let t = kycd_protocol::clock::monotonic();
            for i in 0..per_window {
                if spool.append(window(i)).is_err() {
                    eprintln!("append failed");
                    return;
                }
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "append() per window (fsync each), {per_window} windows: {:>10.0} windows/s",
                per_window as f64 / s
            );
        }
    }

    for ms in [0u64, 10, 100] {
        let Ok(dir) = tempfile::tempdir_in(&base) else { return };
        let Ok(spool) = Spool::open(dir.path(), options()) else { return };
        let spool = Arc::new(std::sync::Mutex::new(spool));
        let counters = Arc::new(kycd::reporting::writer::WriterCounters::default());
        let committed = Arc::new(tokio::sync::Notify::new());
        let elapsed = runtime.block_on(async {
            let (tx, rx) = kycd::gpu::usage::window_channel(256);
            let t = kycd_protocol::clock::monotonic();
            let writer = tokio::spawn(kycd::reporting::writer::run_writer(
                Arc::clone(&spool),
                rx,
                Duration::from_millis(ms),
                committed,
                counters,
                |_| {},
            ));
            for i in 0..n {
                if tx.send(window(i)).await.is_err() {
                    break;
                }
            }
            drop(tx);
            let _ = writer.await;
            t.elapsed()
        });
        let Ok(spool) = spool.lock() else { return };
        assert_eq!(spool.last_seq(), n as u64);
        println!(
            "writer task, group_commit_ms = {ms:>3}: {:>10.0} windows/s ({} segments, {:.1} MiB)",
            n as f64 / elapsed.as_secs_f64(),
            spool.segment_count(),
            spool.used_bytes() as f64 / (1 << 20) as f64
        );
    }
}
