//! The `kycd-nvml` thread: owns the `Nvml` value, (re)initialises it on demand and serves
//! the backend's requests one at a time.

use std::sync::mpsc;

use nvml_wrapper::enum_wrappers::device::ComputeMode as NvmlComputeMode;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::sample::{sample_all, Memory};
use super::{NvmlOptions, Request};
use crate::gpu::{BackendState, ComputeMode, GpuError, Sample};

/// The NVML thread: (re)initialise on demand, then serve until NVML needs re-initialising or
/// the backend is dropped.
pub(super) fn nvml_thread(options: &NvmlOptions, requests: &mpsc::Receiver<Request>) {
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
        Request::Sample(at_ms, tx) => {
            let _ = tx.send(Sample::unavailable(at_ms, reason));
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

fn serve(nvml: &Nvml, first: Request, requests: &mpsc::Receiver<Request>) -> Served {
    let mut memory = Memory::new();
    let mut next = Some(first);
    // The request that came with a fresh initialisation is answered as is, so a library that
    // initialises but never works cannot spin this thread.
    let mut fresh = true;
    loop {
        let Some(request) = next.take().or_else(|| requests.recv().ok()) else { return Served::Closed };
        match request {
            Request::Sample(at_ms, tx) => {
                let sample = sample_all(nvml, at_ms, &mut memory);
                if let BackendState::Unavailable { reason } = &sample.backend {
                    if needs_reinit(reason) && !fresh {
                        return Served::Reinit(Request::Sample(at_ms, tx));
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

pub(super) const UNINITIALIZED: &str = "NVML uninitialised";

fn needs_reinit(reason: &str) -> bool {
    reason.starts_with(UNINITIALIZED)
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

pub(super) fn from_nvml_mode(m: NvmlComputeMode) -> ComputeMode {
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
