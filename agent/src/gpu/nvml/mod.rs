//! The NVML backend: the driver's `libnvidia-ml.so`, through `nvml-wrapper`.
//!
//! NVML calls block (a wedged driver can hang them for seconds) and GPM samples borrow the
//! library handle, so everything NVML lives on one dedicated OS thread (`kycd-nvml`) that owns
//! the `Nvml` value. [`NvmlBackend`] talks to it through a bounded request queue and waits for
//! each answer at most [`NvmlOptions::reply_timeout`]; a full queue or a late answer becomes
//! [`BackendState::Unavailable`], so a stuck driver stalls GPU data, never the agent.
//!
//! The library is loaded from [`NvmlOptions::library`] (the `gpu.nvml_library` setting) with
//! `Nvml::builder().lib_path(..)`. When loading or `nvmlInit` fails, the thread retries on each
//! later request: a driver installed or loaded after the agent started is picked up.
//!
//! This file is the handle side ([`NvmlBackend`]); `thread` is the thread that owns NVML and
//! serves requests, `sample` reads one sample of every GPU on it.

mod sample;
mod thread;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use std::sync::Arc;

use kycd_protocol::clock::{Clock, SystemClock};

use super::{unix_ms, ComputeMode, GpuBackend, GpuError, Sample};
use thread::nvml_thread;

/// The library name NVML's own loader uses; resolved through the dynamic linker's path.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// How to reach NVML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlOptions {
    /// Path or bare name of `libnvidia-ml.so` (`gpu.nvml_library`).
    pub library: PathBuf,
    /// Requests that may wait for the NVML thread; more are refused rather than queued.
    pub queue: usize,
    /// How long a caller waits for an answer before reporting NVML unavailable.
    pub reply_timeout: Duration,
}

impl Default for NvmlOptions {
    fn default() -> Self {
        NvmlOptions {
            library: PathBuf::from(DEFAULT_LIBRARY),
            queue: 4,
            reply_timeout: Duration::from_secs(10),
        }
    }
}

enum Request {
    /// A sample, stamped with this time (Unix ms) from the backend's clock.
    Sample(i64, mpsc::SyncSender<Sample>),
    GetMode(String, mpsc::SyncSender<Result<ComputeMode, GpuError>>),
    SetMode(String, ComputeMode, mpsc::SyncSender<Result<(), GpuError>>),
}

/// [`GpuBackend`] over NVML, served by a dedicated thread.
///
/// A cheap handle: clones share the one NVML thread (the sampler and the compute-mode enforcer
/// each hold one). The thread stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct NvmlBackend {
    inner: std::sync::Arc<Inner>,
    /// Stamps samples; the system clock but in tests that replay recorded time.
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct Inner {
    requests: Option<mpsc::SyncSender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
    reply_timeout: Duration,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Sample(..) => "Sample",
            Request::GetMode(..) => "GetMode",
            Request::SetMode(..) => "SetMode",
        })
    }
}

/// Why the NVML thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NvmlBackendError {
    /// `std::thread::Builder::spawn` failed.
    #[error("cannot start the NVML thread")]
    Spawn(#[source] std::io::Error),
}

impl NvmlBackend {
    /// Starts the NVML thread. The library is loaded there, on the first request; failure to
    /// load is a state of later samples, not an error here.
    pub fn start(options: NvmlOptions) -> Result<Self, NvmlBackendError> {
        Self::start_with_clock(options, Arc::new(SystemClock))
    }

    /// [`NvmlBackend::start`] with samples stamped by `clock` (GPM activity is still the
    /// driver's, over whatever real time passed between two samples).
    pub fn start_with_clock(options: NvmlOptions, clock: Arc<dyn Clock>) -> Result<Self, NvmlBackendError> {
        let (tx, rx) = mpsc::sync_channel(options.queue.max(1));
        let reply_timeout = options.reply_timeout;
        let thread = std::thread::Builder::new()
            .name("kycd-nvml".into())
            .spawn(move || nvml_thread(&options, &rx))
            .map_err(NvmlBackendError::Spawn)?;
        let inner = Inner { requests: Some(tx), thread: Some(thread), reply_timeout };
        Ok(NvmlBackend { inner: Arc::new(inner), clock })
    }

    fn ask<T>(&self, make: impl FnOnce(mpsc::SyncSender<T>) -> Request) -> Result<T, String> {
        self.inner.ask(make)
    }
}

impl Inner {
    fn ask<T>(&self, make: impl FnOnce(mpsc::SyncSender<T>) -> Request) -> Result<T, String> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let Some(requests) = &self.requests else { return Err("NVML backend stopped".into()) };
        requests.try_send(make(reply_tx)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => "NVML thread busy (request queue full)".to_string(),
            mpsc::TrySendError::Disconnected(_) => "NVML thread exited".to_string(),
        })?;
        reply_rx.recv_timeout(self.reply_timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => format!("NVML did not answer within {:?}", self.reply_timeout),
            mpsc::RecvTimeoutError::Disconnected => "NVML thread exited".to_string(),
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the thread, which drops `Nvml` (nvmlShutdown, dlclose).
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            // Wait briefly so NVML is shut down cleanly; a thread stuck inside the driver is
            // left behind rather than hanging the agent's shutdown.
            let deadline = SystemClock.instant() + Duration::from_secs(1);
            while !thread.is_finished() && SystemClock.instant() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl GpuBackend for NvmlBackend {
    fn sample(&mut self) -> Sample {
        let at_ms = unix_ms(self.clock.as_ref());
        self.ask(|tx| Request::Sample(at_ms, tx)).unwrap_or_else(|reason| {
            tracing::warn!(%reason, "NVML sample failed");
            Sample::unavailable(at_ms, reason)
        })
    }

    fn compute_mode(&mut self, uuid: &str) -> Result<ComputeMode, GpuError> {
        self.ask(|tx| Request::GetMode(uuid.to_owned(), tx)).map_err(GpuError::Unavailable)?
    }

    fn set_compute_mode(&mut self, uuid: &str, mode: ComputeMode) -> Result<(), GpuError> {
        self.ask(|tx| Request::SetMode(uuid.to_owned(), mode, tx)).map_err(GpuError::Unavailable)?
    }
}
