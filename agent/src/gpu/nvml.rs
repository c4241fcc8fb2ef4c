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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use kycd_protocol::clock::{Clock as _, SystemClock};
use nvml_wrapper::enum_wrappers::device::{Clock, ComputeMode as NvmlComputeMode};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, GpmSample, Nvml};

use super::{
    unix_ms_now, BackendState, ComputeMode, GpuBackend, GpuError, GpuProcess, GpuSnapshot, GpuState,
    MigInstance, ProcessUtilization, Sample,
};

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
    Sample(mpsc::SyncSender<Sample>),
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
            Request::Sample(_) => "Sample",
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
        let (tx, rx) = mpsc::sync_channel(options.queue.max(1));
        let reply_timeout = options.reply_timeout;
        let thread = std::thread::Builder::new()
            .name("kycd-nvml".into())
            .spawn(move || nvml_thread(&options, &rx))
            .map_err(NvmlBackendError::Spawn)?;
        let inner = Inner { requests: Some(tx), thread: Some(thread), reply_timeout };
        Ok(NvmlBackend { inner: std::sync::Arc::new(inner) })
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
        self.ask(Request::Sample).unwrap_or_else(|reason| {
            tracing::warn!(%reason, "NVML sample failed");
            Sample { at_ms: unix_ms_now(), backend: BackendState::Unavailable { reason }, gpus: Vec::new() }
        })
    }

    fn compute_mode(&mut self, uuid: &str) -> Result<ComputeMode, GpuError> {
        self.ask(|tx| Request::GetMode(uuid.to_owned(), tx)).map_err(GpuError::Unavailable)?
    }

    fn set_compute_mode(&mut self, uuid: &str, mode: ComputeMode) -> Result<(), GpuError> {
        self.ask(|tx| Request::SetMode(uuid.to_owned(), mode, tx)).map_err(GpuError::Unavailable)?
    }
}

/// The NVML thread: (re)initialise on demand, then serve until NVML needs re-initialising or
/// the backend is dropped.
fn nvml_thread(options: &NvmlOptions, requests: &mpsc::Receiver<Request>) {
    let mut pending: Option<Request> = None;
    loop {
        let Some(request) = pending.take().or_else(|| requests.recv().ok()) else { return };
        match Nvml::builder().lib_path(options.library.as_os_str()).init() {
            Ok(nvml) => {
                tracing::info!(library = %options.library.display(), "NVML initialised");
                match serve(&nvml, request, requests) {
                    Served::Closed => return,
                    Served::Reinit(next) => pending = Some(next),
                }
            }
            Err(e) => {
                let reason = format!("cannot load NVML from {}: {e}", options.library.display());
                tracing::debug!(%reason, "NVML unavailable");
                answer_unavailable(request, reason);
            }
        }
    }
}

fn answer_unavailable(request: Request, reason: String) {
    // A caller that gave up waiting has dropped its receiver; nothing to tell it then.
    match request {
        Request::Sample(tx) => {
            let _ = tx.send(Sample {
                at_ms: unix_ms_now(),
                backend: BackendState::Unavailable { reason },
                gpus: vec![],
            });
        }
        Request::GetMode(_, tx) => {
            let _ = tx.send(Err(GpuError::Unavailable(reason)));
        }
        Request::SetMode(_, _, tx) => {
            let _ = tx.send(Err(GpuError::Unavailable(reason)));
        }
    }
}

enum Served {
    /// The backend was dropped.
    Closed,
    /// NVML stopped answering as initialised (driver unloaded); re-initialise, then handle this.
    Reinit(Request),
}

/// What the thread remembers between samples of one initialised NVML.
struct Memory<'n> {
    /// Previous GPM sample per GPU UUID: GPM metrics are differences of two samples.
    gpm: HashMap<String, GpmSample<'n>>,
    /// Newest per-process utilization timestamp seen per GPU UUID.
    last_process_sample_us: HashMap<String, u64>,
    /// What does not change while NVML stays initialised (the index → GPU mapping is fixed
    /// for an NVML session), read once: fewer driver calls per tick, and a GPU that is lost
    /// can still be named.
    statics: HashMap<u32, Static>,
}

fn serve(nvml: &Nvml, first: Request, requests: &mpsc::Receiver<Request>) -> Served {
    let mut memory =
        Memory { gpm: HashMap::new(), last_process_sample_us: HashMap::new(), statics: HashMap::new() };
    let mut next = Some(first);
    // The request that came with a fresh initialisation is answered as is, so a library that
    // initialises but never works cannot spin this thread.
    let mut fresh = true;
    loop {
        let Some(request) = next.take().or_else(|| requests.recv().ok()) else { return Served::Closed };
        match request {
            Request::Sample(tx) => {
                let sample = sample_all(nvml, &mut memory);
                if let BackendState::Unavailable { reason } = &sample.backend {
                    if needs_reinit(reason) && !fresh {
                        return Served::Reinit(Request::Sample(tx));
                    }
                }
                let _ = tx.send(sample);
            }
            Request::GetMode(uuid, tx) => {
                let _ = tx.send(with_device(nvml, &uuid, |d| d.compute_mode().map(from_nvml_mode)));
            }
            Request::SetMode(uuid, mode, tx) => {
                let _ = tx.send(with_device(nvml, &uuid, |d| d.set_compute_mode(to_nvml_mode(mode))));
            }
        }
        fresh = false;
    }
}

const UNINITIALIZED: &str = "NVML uninitialised";

fn needs_reinit(reason: &str) -> bool {
    reason.starts_with(UNINITIALIZED)
}

fn sample_all<'n>(nvml: &'n Nvml, memory: &mut Memory<'n>) -> Sample {
    let at_ms = unix_ms_now();
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(NvmlError::Uninitialized) => {
            return Sample {
                at_ms,
                backend: BackendState::Unavailable { reason: UNINITIALIZED.into() },
                gpus: vec![],
            }
        }
        Err(e) => {
            return Sample {
                at_ms,
                backend: BackendState::Unavailable { reason: format!("nvmlDeviceGetCount: {e}") },
                gpus: vec![],
            }
        }
    };
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        gpus.push(sample_gpu(nvml, index, memory));
    }
    Sample { at_ms, backend: BackendState::Ok, gpus }
}

/// Field reader: `NotSupported` and friends become `None`; `GpuLost` also flags the GPU.
struct Reader {
    lost: bool,
}

impl Reader {
    fn get<T>(&mut self, what: &'static str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                None
            }
            Err(NvmlError::NotSupported | NvmlError::NotFound) => None,
            Err(e) => {
                tracing::debug!(field = what, error = %e, "NVML field unreadable");
                None
            }
        }
    }
}

/// Per-GPU facts read once per NVML session.
#[derive(Debug, Clone, Default)]
struct Static {
    uuid: String,
    name: String,
    pci_bus_id: Option<String>,
    compute_capability: Option<[i32; 2]>,
    sm_count: Option<u32>,
    max_sm_clock_mhz: Option<u32>,
    gpm_supported: Option<bool>,
}

fn read_static(device: &Device<'_>, r: &mut Reader) -> Option<Static> {
    let st = Static {
        uuid: r.get("uuid", device.uuid())?,
        name: r.get("name", device.name())?,
        pci_bus_id: r.get("pci_info", device.pci_info()).map(|p| p.bus_id),
        compute_capability: r
            .get("compute_capability", device.cuda_compute_capability())
            .map(|c| [c.major, c.minor]),
        sm_count: r.get("attributes", device.attributes()).map(|a| a.multiprocessor_count),
        max_sm_clock_mhz: r.get("max_sm_clock", device.max_clock_info(Clock::SM)),
        gpm_supported: r.get("gpm_support", device.gpm_support()),
    };
    (!r.lost).then_some(st)
}

fn sample_gpu<'n>(nvml: &'n Nvml, index: u32, memory: &mut Memory<'n>) -> GpuSnapshot {
    let known = memory.statics.get(&index).cloned();
    let lost = |memory: &mut Memory<'n>, st: Option<Static>| {
        let st = st.unwrap_or_default();
        tracing::warn!(index, uuid = %st.uuid, "GPU lost");
        memory.gpm.remove(&st.uuid);
        GpuSnapshot::bare(index, st.uuid, st.name, GpuState::Lost)
    };
    let device = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(index, error = %e, "no handle for GPU");
            return lost(memory, known);
        }
    };
    let mut r = Reader { lost: false };
    let st = match known {
        Some(st) => st,
        None => match read_static(&device, &mut r) {
            Some(st) => {
                memory.statics.insert(index, st.clone());
                st
            }
            None => return lost(memory, None),
        },
    };
    let uuid = st.uuid.clone();
    let mut snap = GpuSnapshot::bare(index, uuid.clone(), st.name.clone(), GpuState::Ok);
    snap.pci_bus_id = st.pci_bus_id.clone();
    snap.compute_capability = st.compute_capability;
    snap.sm_count = st.sm_count;
    snap.max_sm_clock_mhz = st.max_sm_clock_mhz;
    if let Some(u) = r.get("utilization", device.utilization_rates()) {
        snap.utilization_gpu_pct = Some(u.gpu);
        snap.utilization_memory_pct = Some(u.memory);
    }
    if let Some(m) = r.get("memory", device.memory_info()) {
        snap.memory_used_bytes = Some(m.used);
        snap.memory_total_bytes = Some(m.total);
    }
    snap.sm_clock_mhz = r.get("sm_clock", device.clock_info(Clock::SM));
    snap.power_mw = r.get("power", device.power_usage());
    snap.compute_mode = r.get("compute_mode", device.compute_mode()).map(from_nvml_mode);
    snap.processes = r
        .get("processes", device.running_compute_processes())
        .unwrap_or_default()
        .into_iter()
        .map(|p| GpuProcess {
            pid: p.pid,
            used_memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            },
            gpu_instance_id: p.gpu_instance_id,
        })
        .collect();
    snap.process_utilization = process_utilization(&device, &uuid, memory, &mut r);
    snap.mig_enabled = r.get("mig_mode", device.mig_mode()).map(|m| m.current == 1);
    if snap.mig_enabled == Some(true) {
        snap.mig_instances = mig_instances(&device, &mut r);
    }
    snap.gpm_supported = st.gpm_supported;
    if st.gpm_supported == Some(true) {
        snap.gpm_tensor_activity_pct = gpm_tensor_activity(nvml, &device, &uuid, memory, &mut r);
    }
    if r.lost {
        return lost(memory, Some(st));
    }
    snap
}

fn process_utilization(
    device: &Device<'_>,
    uuid: &str,
    memory: &mut Memory<'_>,
    r: &mut Reader,
) -> Option<Vec<ProcessUtilization>> {
    let last = memory.last_process_sample_us.get(uuid).copied().unwrap_or(0);
    let samples = match device.process_utilization_stats(last) {
        Ok(s) => s,
        // NVML answers NOT_FOUND when there is no sample newer than `last`.
        Err(NvmlError::NotFound) => Vec::new(),
        Err(e) => {
            r.get::<()>("process_utilization", Err(e));
            return None;
        }
    };
    if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
        memory.last_process_sample_us.insert(uuid.to_owned(), newest.max(last));
    }
    Some(
        samples
            .into_iter()
            .map(|s| ProcessUtilization {
                pid: s.pid,
                timestamp_us: s.timestamp,
                sm_util_pct: s.sm_util,
                mem_util_pct: s.mem_util,
            })
            .collect(),
    )
}

fn mig_instances(device: &Device<'_>, r: &mut Reader) -> Vec<MigInstance> {
    let max = r.get("mig_device_count", device.mig_device_count()).unwrap_or(0);
    (0..max)
        .filter_map(|index| {
            // Slots without an instance answer NOT_FOUND.
            let mig = device.mig_device_by_index(index).ok()?;
            Some(MigInstance {
                index,
                uuid: r.get("mig_uuid", mig.uuid())?,
                sm_count: r.get("mig_attributes", mig.attributes()).map(|a| a.multiprocessor_count),
                memory_total_bytes: r.get("mig_memory", mig.memory_info()).map(|m| m.total),
            })
        })
        .collect()
}

/// Tensor activity % since the previous sample, on a GPU with GPM.
fn gpm_tensor_activity<'n>(
    nvml: &'n Nvml,
    device: &Device<'n>,
    uuid: &str,
    memory: &mut Memory<'n>,
    r: &mut Reader,
) -> Option<f64> {
    let Some(now) = r.get("gpm_sample", device.gpm_sample()) else {
        memory.gpm.remove(uuid);
        return None;
    };
    let activity = memory.gpm.remove(uuid).and_then(|before| {
        let results = r.get(
            "gpm_metrics",
            nvml_wrapper::gpm::gpm_metrics_get(nvml, &before, &now, &[GpmMetricId::AnyTensorUtil]),
        )?;
        let first = results.into_iter().next()?;
        r.get("gpm_tensor_metric", first).map(|m| m.value)
    });
    memory.gpm.insert(uuid.to_owned(), now);
    activity
}

fn with_device<T>(
    nvml: &Nvml,
    uuid: &str,
    f: impl FnOnce(&mut Device<'_>) -> Result<T, NvmlError>,
) -> Result<T, GpuError> {
    // Looked up by index and UUID rather than nvmlDeviceGetHandleByUUID: the same two calls the
    // sampler makes, so a GPU visible to sampling is visible to enforcement.
    let count = nvml.device_count().map_err(|e| GpuError::Unavailable(e.to_string()))?;
    for index in 0..count {
        let Ok(mut device) = nvml.device_by_index(index) else { continue };
        match device.uuid() {
            Ok(u) if u == uuid => {
                return f(&mut device).map_err(|e| match e {
                    NvmlError::GpuLost => GpuError::Lost(uuid.to_owned()),
                    other => GpuError::Driver(other.to_string()),
                })
            }
            _ => continue,
        }
    }
    Err(GpuError::NoSuchGpu(uuid.to_owned()))
}

fn from_nvml_mode(m: NvmlComputeMode) -> ComputeMode {
    match m {
        NvmlComputeMode::Default => ComputeMode::Default,
        NvmlComputeMode::ExclusiveThread => ComputeMode::ExclusiveThread,
        NvmlComputeMode::Prohibited => ComputeMode::Prohibited,
        NvmlComputeMode::ExclusiveProcess => ComputeMode::ExclusiveProcess,
    }
}

fn to_nvml_mode(m: ComputeMode) -> NvmlComputeMode {
    match m {
        ComputeMode::Default => NvmlComputeMode::Default,
        ComputeMode::ExclusiveThread => NvmlComputeMode::ExclusiveThread,
        ComputeMode::Prohibited => NvmlComputeMode::Prohibited,
        ComputeMode::ExclusiveProcess => NvmlComputeMode::ExclusiveProcess,
    }
}
