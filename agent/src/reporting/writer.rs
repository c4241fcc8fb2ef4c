//! The spool writer task: usage windows from the GPU sampler's channel into the spool, one
//! fsync per group commit, retrying failed appends without losing windows.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kycd_protocol::UsageWindow;
use tracing::{error, info};

use super::spool::{SharedSpool, SpoolError};

/// Counters of the writer task.
#[derive(Debug, Default)]
pub struct WriterCounters {
    /// Failed append attempts (each retried).
    pub append_errors: std::sync::atomic::AtomicU64,
    /// Windows lost because appends still failed at shutdown.
    pub lost_at_shutdown: std::sync::atomic::AtomicU64,
}

/// Most windows held in memory while appends fail; beyond it the channel back-pressures.
const PENDING_MAX: usize = 4096;
/// Most windows in one group commit.
const BATCH_MAX: usize = 1024;

/// The spool writer: windows from `windows` into `spool`, one fsync per group commit (the
/// first window of a group waits at most `group_commit` for others). After each commit it
/// logs the seqs assigned (`usage windows spooled`, `first_seq`..=`last_seq`) and notifies
/// `committed` (the uploader). A failed append is logged, counted and retried with backoff;
/// windows keep being read (up to a bound) meanwhile. Ends when the channel closes, after
/// committing what it holds.
pub async fn run_writer(
    spool: SharedSpool,
    mut windows: crate::gpu::usage::WindowReceiver,
    group_commit: Duration,
    committed: Arc<tokio::sync::Notify>,
    counters: Arc<WriterCounters>,
    mut observe: impl FnMut(&UsageWindow) + Send,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut pending: Vec<UsageWindow> = Vec::new();
    let mut closed = false;
    let mut failures = 0u32;
    loop {
        if pending.is_empty() {
            match windows.recv().await {
                Some(w) => {
                    observe(&w);
                    pending.push(w);
                }
                None => break,
            }
            if !group_commit.is_zero() {
                let deadline = tokio::time::Instant::now() + group_commit;
                while pending.len() < BATCH_MAX {
                    match tokio::time::timeout_at(deadline, windows.recv()).await {
                        Ok(Some(w)) => {
                            observe(&w);
                            pending.push(w);
                        }
                        Ok(None) => {
                            closed = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        while pending.len() < BATCH_MAX && !closed {
            match windows.try_recv() {
                Ok(w) => {
                    observe(&w);
                    pending.push(w);
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        let n = pending.len().min(BATCH_MAX);
        let batch: Vec<UsageWindow> = pending[..n].to_vec();
        let s = Arc::clone(&spool);
        let result = tokio::task::spawn_blocking(move || match s.lock() {
            Ok(mut spool) => spool.append_batch(&batch),
            Err(_) => Err(SpoolError::TailPending { path: PathBuf::from("<poisoned spool lock>") }),
        })
        .await;
        match result {
            Ok(Ok((first, last))) => {
                failures = 0;
                pending.drain(..n);
                info!(first_seq = first, last_seq = last, windows = n, "usage windows spooled");
                committed.notify_one();
            }
            Ok(Err(e)) => {
                failures += 1;
                counters.append_errors.fetch_add(1, Relaxed);
                error!(error = %e, kind = e.kind(), windows = pending.len(), attempt = failures,
                       "cannot spool usage windows; keeping them in memory and retrying");
                if closed && failures >= 3 {
                    counters.lost_at_shutdown.fetch_add(pending.len() as u64, Relaxed);
                    error!(
                        windows = pending.len(),
                        "shutting down with usage windows that could not be spooled"
                    );
                    return;
                }
                let delay = Duration::from_millis(500u64 << failures.min(6));
                let until = tokio::time::Instant::now() + delay;
                // Keep draining the producer meanwhile, up to a bound.
                while !closed && pending.len() < PENDING_MAX {
                    match tokio::time::timeout_at(until, windows.recv()).await {
                        Ok(Some(w)) => {
                            observe(&w);
                            pending.push(w);
                        }
                        Ok(None) => closed = true,
                        Err(_) => break,
                    }
                }
                tokio::time::sleep_until(until).await;
            }
            Err(join) => {
                error!(error = %join, "spool writer task failed");
                return;
            }
        }
        if closed && pending.is_empty() {
            break;
        }
    }
}
