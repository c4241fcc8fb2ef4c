//! A fake `libnvidia-ml.so`: the NVML C functions kycd's agent calls, answered from a JSON
//! scenario instead of a driver.
//!
//! The agent loads this library through `nvml_wrapper::Nvml::builder().lib_path(..)`, the same
//! call a real host makes with the driver's library, so the production NVML code path (symbol
//! resolution, struct layouts, return codes, buffer-size negotiation) runs in CI without a GPU.
//!
//! # Where the scenario comes from
//! `nvmlInit_v2` reads the JSON file named by `KYCD_FAKE_NVML_SCENARIO`; when that variable is
//! unset it reads `scenario.json` in the directory this library was loaded from (found through
//! `/proc/self/maps`). Tests use the second form: each copies the library and its scenario into
//! its own temporary directory, so tests in one process get separate copies of the library, and
//! so separate state, without touching the environment.
//!
//! # Scenario format
//! ```json
//! {
//!   "init_error": "LIBRARY_NOT_FOUND",            // optional: nvmlInit_v2 fails with it
//!   "state_file": "/tmp/x/compute-modes.json",     // optional: compute modes persisted here
//!   "tick_us": 1000000,                            // optional: per-process sample spacing
//!   "count_delay_ms": 0,                           // optional: nvmlDeviceGetCount_v2 hangs this long
//!   "gpus": [{
//!     "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-…",
//!     "sm_count": 132, "max_sm_clock_mhz": 1980, "sm_clock_mhz": 1755,
//!     "compute_capability": [9, 0], "memory_total_mib": 81559, "power_mw": 350000,
//!     "compute_mode": "default",                   // default|exclusive_thread|prohibited|exclusive_process
//!     "mig": {"enabled": true, "instances": 2},    // optional
//!     "gpm": true,                                 // false: GPM calls answer NOT_SUPPORTED
//!     "process_utilization": true,                 // false: process samples NOT_SUPPORTED
//!     "lost_at_tick": 3,                           // optional: GPU_IS_LOST from this tick on
//!     "ticks": [{"util": 90, "mem_util": 40, "tensor": 55.0,
//!                "sm_clock_mhz": 1468, "power_mw": 692000,   // optional: override the GPU's
//!                "gpm": {"HMMA_TENSOR_UTIL": 93.5, "FP32_UTIL": 0.2},   // optional, see below
//!                "mig_gpm": {"1": {"HMMA_TENSOR_UTIL": 50.0}},           // per GPU instance id
//!                "processes": [{"pid": 4242, "used_mib": 1024, "sm_util": 90}]}],
//!     "vgpus": [{"uuid": "…", "vm_id": "<domain UUID>", "vm_id_type": "uuid",   // or "domain"
//!                "mdev_uuid": "…", "gpu_instance_id": 1}]                       // both optional
//!   }]
//! }
//! ```
//!
//! # vGPU
//! A GPU's `vgpus` are its active vGPU instances (`nvmlDeviceGetActiveVgpus`), instance id
//! `(GPU index + 1) × 1000 + position + 1`; `nvmlVgpuInstanceGetVmID`, `…GetUUID`,
//! `…GetMdevUUID` and `…GetGpuInstanceId` (`0xFFFFFFFF`, NVML's "invalid", when the vGPU is not
//! MIG-backed) answer from them.
//!
//! # GPM metrics
//! A tick's `gpm` maps `nvmlGpmMetricId_t` names without their `NVML_GPM_METRIC_` prefix
//! (`SM_UTIL`, `ANY_TENSOR_UTIL`, `HMMA_TENSOR_UTIL`, `IMMA_TENSOR_UTIL`, `DFMA_TENSOR_UTIL`,
//! `FP64_UTIL`, `FP32_UTIL`, `FP16_UTIL`, `INTEGER_UTIL`, `DRAM_BW_UTIL`, `SM_OCCUPANCY`) to
//! the value `nvmlGpmMetricsGet` returns for the interval ending at that tick; a metric not in
//! the map answers NOT_SUPPORTED. Without `gpm`, `ANY_TENSOR_UTIL` is `tensor` and `SM_UTIL` is
//! `util` (and every other metric NOT_SUPPORTED), the fake's behaviour before per-pipe metrics.
//! `mig_gpm` does the same for `nvmlGpmMigSampleGet` per GPU instance id. MIG instance *i*
//! (0-based) is GPU instance id *i* + 1: its device handle lists the processes whose
//! `gpu_instance_id` is that id.
//!
//! # Ticks (the deterministic clock)
//! Tick `t` is the number of `nvmlDeviceGetCount_v2` calls so far minus one: the agent calls it
//! exactly once at the start of every sample, so its *n*-th sample sees tick *n − 1*. A GPU's
//! `ticks` array is indexed modulo its length, so a short scenario repeats for long benchmarks.
//! Process utilization samples of tick `t` carry the timestamp `(t + 1) × tick_us` µs and are
//! returned only when newer than the caller's `lastSeenTimeStamp`, as NVML does.
//!
//! # Compute mode
//! `nvmlDeviceSetComputeMode` updates the library's memory and, when `state_file` is set, that
//! file (a JSON object `uuid → mode number`). `nvmlDeviceGetComputeMode` prefers the file, so a
//! test can simulate an operator changing the mode behind the agent's back by editing it.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nvml_wrapper_sys::bindings::*;
use serde::Deserialize;

/// NVML's "no value" marker for unsigned fields (instance ids of non-MIG processes).
const NO_VALUE: c_uint = 0xFFFF_FFFF;
/// MIG device handles are `MIG_HANDLE_BASE + parent × 64 + index + 1`; GPU handles are
/// `index + 1`. Handles are opaque to callers and never dereferenced.
const MIG_HANDLE_BASE: usize = 0x10_0000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    #[serde(default)]
    init_error: Option<String>,
    #[serde(default)]
    state_file: Option<PathBuf>,
    #[serde(default = "default_tick_us")]
    tick_us: u64,
    #[serde(default)]
    count_delay_ms: u64,
    #[serde(default)]
    gpus: Vec<Gpu>,
}

fn default_tick_us() -> u64 {
    1_000_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gpu {
    name: String,
    uuid: String,
    #[serde(default = "default_sm_count")]
    sm_count: u32,
    #[serde(default = "default_max_clock")]
    max_sm_clock_mhz: u32,
    #[serde(default = "default_clock")]
    sm_clock_mhz: u32,
    #[serde(default = "default_cc")]
    compute_capability: [i32; 2],
    #[serde(default = "default_memory")]
    memory_total_mib: u64,
    #[serde(default = "default_power")]
    power_mw: u32,
    #[serde(default)]
    compute_mode: Option<String>,
    #[serde(default)]
    mig: Mig,
    #[serde(default = "yes")]
    gpm: bool,
    #[serde(default = "yes")]
    process_utilization: bool,
    #[serde(default)]
    lost_at_tick: Option<u64>,
    #[serde(default)]
    ticks: Vec<Tick>,
    #[serde(default)]
    vgpus: Vec<Vgpu>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vgpu {
    uuid: String,
    vm_id: String,
    #[serde(default = "default_vm_id_type")]
    vm_id_type: String,
    #[serde(default)]
    mdev_uuid: Option<String>,
    #[serde(default)]
    gpu_instance_id: Option<u32>,
}

fn default_vm_id_type() -> String {
    "uuid".into()
}

fn default_sm_count() -> u32 {
    132
}
fn default_max_clock() -> u32 {
    1980
}
fn default_clock() -> u32 {
    1755
}
fn default_cc() -> [i32; 2] {
    [9, 0]
}
fn default_memory() -> u64 {
    81_559
}
fn default_power() -> u32 {
    300_000
}
fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mig {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    instances: u32,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tick {
    #[serde(default)]
    util: u32,
    #[serde(default)]
    mem_util: u32,
    #[serde(default)]
    tensor: f64,
    #[serde(default)]
    sm_clock_mhz: Option<u32>,
    #[serde(default)]
    power_mw: Option<u32>,
    #[serde(default)]
    gpm: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    mig_gpm: BTreeMap<String, BTreeMap<String, f64>>,
    #[serde(default)]
    processes: Vec<Process>,
}

impl Tick {
    /// The GPM metric values of the interval ending at this tick, by metric id, for the whole
    /// GPU (`gi` `None`) or one GPU instance.
    fn gpm_values(&self, gi: Option<u32>) -> BTreeMap<nvmlGpmMetricId_t, f64> {
        let named = match gi {
            Some(gi) => self.mig_gpm.get(&gi.to_string()).cloned().unwrap_or_default(),
            None => match &self.gpm {
                Some(map) => map.clone(),
                None => BTreeMap::from([
                    ("ANY_TENSOR_UTIL".into(), self.tensor),
                    ("SM_UTIL".into(), f64::from(self.util)),
                ]),
            },
        };
        named.iter().filter_map(|(name, v)| Some((metric_id(name)?, *v))).collect()
    }
}

/// `nvmlGpmMetricId_t` of a metric name without its `NVML_GPM_METRIC_` prefix.
fn metric_id(name: &str) -> Option<nvmlGpmMetricId_t> {
    Some(match name {
        "SM_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_UTIL,
        "SM_OCCUPANCY" => nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_OCCUPANCY,
        "ANY_TENSOR_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL,
        "HMMA_TENSOR_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_HMMA_TENSOR_UTIL,
        "IMMA_TENSOR_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_IMMA_TENSOR_UTIL,
        "DFMA_TENSOR_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_DFMA_TENSOR_UTIL,
        "FP64_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_FP64_UTIL,
        "FP32_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_FP32_UTIL,
        "FP16_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_FP16_UTIL,
        "INTEGER_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_INTEGER_UTIL,
        "DRAM_BW_UTIL" => nvmlGpmMetricId_t_NVML_GPM_METRIC_DRAM_BW_UTIL,
        _ => return None,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Process {
    pid: u32,
    #[serde(default)]
    used_mib: u64,
    #[serde(default)]
    sm_util: u32,
    #[serde(default)]
    mem_util: u32,
    #[serde(default)]
    gpu_instance_id: Option<u32>,
}

/// Everything an initialised library knows.
#[derive(Debug)]
struct State {
    scenario: Scenario,
    /// `nvmlDeviceGetCount_v2` calls so far.
    count_calls: u64,
    /// In-memory compute modes, by GPU index.
    modes: Vec<c_uint>,
}

impl State {
    fn tick(&self) -> u64 {
        self.count_calls.saturating_sub(1)
    }

    fn tick_of(&self, gpu: &Gpu) -> Tick {
        if gpu.ticks.is_empty() {
            return Tick::default();
        }
        let len = gpu.ticks.len() as u64;
        gpu.ticks.get((self.tick() % len) as usize).cloned().unwrap_or_default()
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<State>> {
    // A panic cannot happen while the lock is held (no panicking code inside), but a poisoned
    // lock must not turn into an abort across the C boundary either.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a device handle stands for.
#[derive(Debug, Clone, Copy)]
enum Handle {
    Gpu(usize),
    Mig { parent: usize, index: u32 },
}

fn decode(device: nvmlDevice_t) -> Option<Handle> {
    let raw = device as usize;
    if raw > MIG_HANDLE_BASE {
        let v = raw - MIG_HANDLE_BASE - 1;
        Some(Handle::Mig { parent: v / 64, index: (v % 64) as u32 })
    } else if raw >= 1 {
        Some(Handle::Gpu(raw - 1))
    } else {
        None
    }
}

/// Runs `f` on the GPU a handle names, answering NVML's error codes for an uninitialised
/// library, a bad handle, or a GPU that has fallen off the bus.
fn with_gpu(device: nvmlDevice_t, f: impl FnOnce(&mut State, usize, Handle) -> nvmlReturn_t) -> nvmlReturn_t {
    let mut guard = lock();
    let Some(state) = guard.as_mut() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    let Some(handle) = decode(device) else { return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT };
    let index = match handle {
        Handle::Gpu(i) => i,
        Handle::Mig { parent, .. } => parent,
    };
    let Some(gpu) = state.scenario.gpus.get(index) else {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    };
    if let Handle::Mig { index: mig, .. } = handle {
        if !gpu.mig.enabled || mig >= gpu.mig.instances {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
    }
    if gpu.lost_at_tick.is_some_and(|t| state.tick() >= t) {
        return nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
    }
    f(state, index, handle)
}

fn error_code(name: &str) -> nvmlReturn_t {
    match name {
        "LIBRARY_NOT_FOUND" => nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND,
        "DRIVER_NOT_LOADED" => nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED,
        "NO_PERMISSION" => nvmlReturn_enum_NVML_ERROR_NO_PERMISSION,
        "GPU_IS_LOST" => nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
        "NOT_SUPPORTED" => nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
        _ => nvmlReturn_enum_NVML_ERROR_UNKNOWN,
    }
}

fn mode_number(name: &str) -> c_uint {
    match name {
        "exclusive_thread" => nvmlComputeMode_enum_NVML_COMPUTEMODE_EXCLUSIVE_THREAD,
        "prohibited" => nvmlComputeMode_enum_NVML_COMPUTEMODE_PROHIBITED,
        "exclusive_process" => nvmlComputeMode_enum_NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
        _ => nvmlComputeMode_enum_NVML_COMPUTEMODE_DEFAULT,
    }
}

/// The file this library was loaded from, by finding the mapping that holds its own code.
fn own_path() -> Option<PathBuf> {
    let here = nvmlInit_v2 as *const () as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (lo, hi) = fields.next()?.split_once('-')?;
        let (lo, hi) = (usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?);
        let path = fields.nth(4)?;
        (lo <= here && here < hi && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

fn scenario_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KYCD_FAKE_NVML_SCENARIO") {
        return Some(PathBuf::from(p));
    }
    Some(own_path()?.parent()?.join("scenario.json"))
}

fn load_scenario(path: &Path) -> Option<Scenario> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            // A broken scenario is a broken test: say why on stderr, then fail init.
            eprintln!("kycd-fake-nvml: {}: {e}", path.display());
            None
        }
    }
}

fn read_state_file(path: &Path) -> BTreeMap<String, c_uint> {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Copies `s` into a C buffer of `len` bytes, NUL-terminated.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
unsafe fn write_cstr(s: &str, buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller guarantees `len` writable bytes at `buf`; we write bytes.len() + 1 ≤ len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    nvmlReturn_enum_NVML_SUCCESS
}

/// Writes `value` through `out` if it is not null.
///
/// # Safety
/// `out` must be null or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null, and the caller guarantees it is valid for a write of T.
    unsafe { out.write(value) };
    nvmlReturn_enum_NVML_SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Library lifecycle

/// # Safety
/// Callable from C at any time.
#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    let Some(path) = scenario_path() else { return nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND };
    let Some(scenario) = load_scenario(&path) else { return nvmlReturn_enum_NVML_ERROR_UNKNOWN };
    if let Some(err) = &scenario.init_error {
        return error_code(err);
    }
    let modes =
        scenario.gpus.iter().map(|g| mode_number(g.compute_mode.as_deref().unwrap_or("default"))).collect();
    *lock() = Some(State { scenario, count_calls: 0, modes });
    nvmlReturn_enum_NVML_SUCCESS
}

/// # Safety
/// Callable from C at any time.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    // SAFETY: nvmlInit_v2 has no preconditions.
    unsafe { nvmlInit_v2() }
}

/// # Safety
/// Callable from C at any time.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    *lock() = None;
    nvmlReturn_enum_NVML_SUCCESS
}

/// # Safety
/// Callable from C at any time; the returned string is static.
#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(_result: nvmlReturn_t) -> *const c_char {
    c"fake NVML error".as_ptr()
}

/// # Safety
/// `version` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded caller guarantee.
    unsafe { write_cstr("999.0-kycd-fake", version, length) }
}

// ---------------------------------------------------------------------------------------------
// Devices

/// # Safety
/// `count` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    // A wedged driver: the call blocks (outside the lock, as a real ioctl would not hold ours).
    let delay = lock().as_ref().map_or(0, |s| s.scenario.count_delay_ms);
    if delay > 0 {
        std::thread::sleep(std::time::Duration::from_millis(delay));
    }
    let mut guard = lock();
    let Some(state) = guard.as_mut() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    state.count_calls += 1;
    // SAFETY: forwarded caller guarantee.
    unsafe { put(count, state.scenario.gpus.len() as c_uint) }
}

/// # Safety
/// `device` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let guard = lock();
    let Some(state) = guard.as_ref() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    if index as usize >= state.scenario.gpus.len() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded caller guarantee.
    unsafe { put(device, (index as usize + 1) as nvmlDevice_t) }
}

/// # Safety
/// `name` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, handle| {
        let gpu = &state.scenario.gpus[i];
        let text = match handle {
            Handle::Gpu(_) => gpu.name.clone(),
            Handle::Mig { .. } => format!("{} MIG", gpu.name),
        };
        // SAFETY: forwarded caller guarantee.
        unsafe { write_cstr(&text, name, length) }
    })
}

/// # Safety
/// `uuid` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, handle| {
        let gpu = &state.scenario.gpus[i];
        let text = match handle {
            Handle::Gpu(_) => gpu.uuid.clone(),
            Handle::Mig { index, .. } => format!("MIG-{}-{index}", gpu.uuid.trim_start_matches("GPU-")),
        };
        // SAFETY: forwarded caller guarantee.
        unsafe { write_cstr(&text, uuid, length) }
    })
}

/// # Safety
/// `pci` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_gpu(device, |_, i, _| {
        let mut info = nvmlPciInfo_t {
            busIdLegacy: [0; 16],
            domain: 0,
            bus: 0x10 + i as c_uint,
            device: 0,
            pciDeviceId: 0x2330_10de,
            pciSubSystemId: 0x16c1_10de,
            busId: [0; 32],
        };
        let bus_id = format!("00000000:{:02X}:00.0", 0x10 + i);
        for (dst, src) in info.busId.iter_mut().zip(bus_id.bytes()) {
            *dst = src as c_char;
        }
        for (dst, src) in info.busIdLegacy.iter_mut().zip(bus_id.bytes().skip(4).take(15)) {
            *dst = src as c_char;
        }
        // SAFETY: forwarded caller guarantee.
        unsafe { put(pci, info) }
    })
}

/// # Safety
/// `utilization` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let tick = state.tick_of(&state.scenario.gpus[i]);
        // SAFETY: forwarded caller guarantee.
        unsafe { put(utilization, nvmlUtilization_t { gpu: tick.util, memory: tick.mem_util }) }
    })
}

/// # Safety
/// `memory` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, handle| {
        let gpu = &state.scenario.gpus[i];
        let tick = state.tick_of(gpu);
        let mib = 1u64 << 20;
        let (total, used) = match handle {
            Handle::Gpu(_) => {
                (gpu.memory_total_mib * mib, tick.processes.iter().map(|p| p.used_mib * mib).sum())
            }
            Handle::Mig { .. } => (gpu.memory_total_mib * mib / u64::from(gpu.mig.instances.max(1)), 0),
        };
        let version = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
        let info = nvmlMemory_v2_t { version, total, reserved: 0, free: total.saturating_sub(used), used };
        // SAFETY: forwarded caller guarantee.
        unsafe { put(memory, info) }
    })
}

/// # Safety
/// `clock` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        let now = state.tick_of(gpu).sm_clock_mhz.unwrap_or(gpu.sm_clock_mhz);
        let value = if clock_type == nvmlClockType_enum_NVML_CLOCK_MEM { 2619 } else { now };
        // SAFETY: forwarded caller guarantee.
        unsafe { put(clock, value) }
    })
}

/// # Safety
/// `clock` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        let value = if clock_type == nvmlClockType_enum_NVML_CLOCK_MEM { 2619 } else { gpu.max_sm_clock_mhz };
        // SAFETY: forwarded caller guarantee.
        unsafe { put(clock, value) }
    })
}

/// # Safety
/// `power` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: nvmlDevice_t, power: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded caller guarantee.
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        let now = state.tick_of(gpu).power_mw.unwrap_or(gpu.power_mw);
        // SAFETY: forwarded caller guarantee.
        unsafe { put(power, now) }
    })
}

/// # Safety
/// `major` and `minor` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let [ma, mi] = state.scenario.gpus[i].compute_capability;
        // SAFETY: forwarded caller guarantee.
        match unsafe { put(major, ma) } {
            r if r == nvmlReturn_enum_NVML_SUCCESS => {
                // SAFETY: forwarded caller guarantee.
                unsafe { put(minor, mi) }
            }
            r => r,
        }
    })
}

/// # Safety
/// `attributes` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetAttributes_v2(
    device: nvmlDevice_t,
    attributes: *mut nvmlDeviceAttributes_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, handle| {
        let gpu = &state.scenario.gpus[i];
        let sm = match handle {
            Handle::Gpu(_) => gpu.sm_count,
            Handle::Mig { .. } => gpu.sm_count / gpu.mig.instances.max(1),
        };
        let attrs = nvmlDeviceAttributes_t {
            multiprocessorCount: sm,
            sharedCopyEngineCount: 1,
            sharedDecoderCount: 1,
            sharedEncoderCount: 0,
            sharedJpegCount: 1,
            sharedOfaCount: 0,
            gpuInstanceSliceCount: 1,
            computeInstanceSliceCount: 1,
            memorySizeMB: gpu.memory_total_mib,
        };
        // SAFETY: forwarded caller guarantee.
        unsafe { put(attributes, attrs) }
    })
}

/// # Safety
/// `count` must be valid for a read and a write; `infos` null or valid for `*count` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, handle| {
        if count.is_null() {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        let all = state.tick_of(&state.scenario.gpus[i]).processes;
        let procs = match handle {
            Handle::Gpu(_) => all,
            // MIG instance `index` is GPU instance id `index + 1`.
            Handle::Mig { index, .. } => {
                all.into_iter().filter(|p| p.gpu_instance_id == Some(index + 1)).collect()
            }
        };
        // SAFETY: count is non-null and valid per the caller.
        let room = unsafe { *count } as usize;
        // SAFETY: as above.
        unsafe { *count = procs.len() as c_uint };
        if procs.is_empty() {
            return nvmlReturn_enum_NVML_SUCCESS;
        }
        if infos.is_null() || room < procs.len() {
            return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
        }
        for (k, p) in procs.iter().enumerate() {
            let info = nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used_mib << 20,
                gpuInstanceId: p.gpu_instance_id.unwrap_or(NO_VALUE),
                computeInstanceId: if p.gpu_instance_id.is_some() { 0 } else { NO_VALUE },
            };
            // SAFETY: k < procs.len() ≤ room, and `infos` holds `room` entries per the caller.
            unsafe { infos.add(k).write(info) };
        }
        nvmlReturn_enum_NVML_SUCCESS
    })
}

/// # Safety
/// `count` must be valid for a read and a write; `samples` null or valid for `*count` entries.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        if !gpu.process_utilization {
            return nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
        }
        if count.is_null() {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        let stamp = (state.tick() + 1) * state.scenario.tick_us;
        let procs = if stamp > last_seen { state.tick_of(gpu).processes } else { Vec::new() };
        // SAFETY: count is non-null and valid per the caller.
        let room = unsafe { *count } as usize;
        // SAFETY: as above.
        unsafe { *count = procs.len() as c_uint };
        if procs.is_empty() {
            return nvmlReturn_enum_NVML_SUCCESS;
        }
        if samples.is_null() || room < procs.len() {
            return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
        }
        for (k, p) in procs.iter().enumerate() {
            let sample = nvmlProcessUtilizationSample_t {
                pid: p.pid,
                timeStamp: stamp,
                smUtil: p.sm_util,
                memUtil: p.mem_util,
                encUtil: 0,
                decUtil: 0,
            };
            // SAFETY: k < procs.len() ≤ room entries at `samples`, per the caller.
            unsafe { samples.add(k).write(sample) };
        }
        nvmlReturn_enum_NVML_SUCCESS
    })
}

/// # Safety
/// `mode` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeMode(
    device: nvmlDevice_t,
    mode: *mut nvmlComputeMode_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let mut value = state.modes[i];
        if let Some(file) = &state.scenario.state_file {
            if let Some(v) = read_state_file(file).get(&state.scenario.gpus[i].uuid) {
                value = *v;
                state.modes[i] = value;
            }
        }
        // SAFETY: forwarded caller guarantee.
        unsafe { put(mode, value) }
    })
}

/// # Safety
/// Callable from C with any handle.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceSetComputeMode(
    device: nvmlDevice_t,
    mode: nvmlComputeMode_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        if mode >= nvmlComputeMode_enum_NVML_COMPUTEMODE_COUNT {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        state.modes[i] = mode;
        if let Some(file) = &state.scenario.state_file {
            let mut all = read_state_file(file);
            all.insert(state.scenario.gpus[i].uuid.clone(), mode);
            let text = serde_json::to_string(&all).unwrap_or_default();
            if std::fs::write(file, text).is_err() {
                return nvmlReturn_enum_NVML_ERROR_UNKNOWN;
            }
        }
        nvmlReturn_enum_NVML_SUCCESS
    })
}

/// # Safety
/// `current` and `pending` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let on = c_uint::from(state.scenario.gpus[i].mig.enabled);
        // SAFETY: forwarded caller guarantee.
        match unsafe { put(current, on) } {
            r if r == nvmlReturn_enum_NVML_SUCCESS => {
                // SAFETY: forwarded caller guarantee.
                unsafe { put(pending, on) }
            }
            r => r,
        }
    })
}

/// # Safety
/// `count` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        let n = if gpu.mig.enabled { gpu.mig.instances } else { 0 };
        // SAFETY: forwarded caller guarantee.
        unsafe { put(count, n) }
    })
}

/// # Safety
/// `mig_device` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        if !gpu.mig.enabled || index >= gpu.mig.instances || index >= 64 {
            return nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
        }
        let handle = (MIG_HANDLE_BASE + i * 64 + index as usize + 1) as nvmlDevice_t;
        // SAFETY: forwarded caller guarantee.
        unsafe { put(mig_device, handle) }
    })
}

// ---------------------------------------------------------------------------------------------
// vGPU

/// Runs `f` on the vGPU an instance id names.
fn with_vgpu(instance: nvmlVgpuInstance_t, f: impl FnOnce(&Vgpu) -> nvmlReturn_t) -> nvmlReturn_t {
    let guard = lock();
    let Some(state) = guard.as_ref() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    let (gpu, position) = ((instance / 1000) as usize, (instance % 1000) as usize);
    let vgpu = gpu
        .checked_sub(1)
        .and_then(|g| state.scenario.gpus.get(g))
        .and_then(|g| position.checked_sub(1).and_then(|p| g.vgpus.get(p)));
    match vgpu {
        Some(v) => f(v),
        None => nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
    }
}

/// # Safety
/// `count` must be valid for reads and writes; `instances` null or valid for `*count` writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetActiveVgpus(
    device: nvmlDevice_t,
    count: *mut c_uint,
    instances: *mut nvmlVgpuInstance_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        if count.is_null() {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        let n = state.scenario.gpus[i].vgpus.len();
        // SAFETY: non-null, valid per the caller.
        let room = unsafe { *count } as usize;
        // SAFETY: as above.
        unsafe { *count = n as c_uint };
        if n == 0 {
            return nvmlReturn_enum_NVML_SUCCESS;
        }
        if instances.is_null() || room < n {
            return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
        }
        for k in 0..n {
            // SAFETY: room ≥ n writable entries, per the caller.
            unsafe { *instances.add(k) = ((i + 1) * 1000 + k + 1) as nvmlVgpuInstance_t };
        }
        nvmlReturn_enum_NVML_SUCCESS
    })
}

/// # Safety
/// `buf` valid for `size` bytes, `id_type` for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlVgpuInstanceGetVmID(
    instance: nvmlVgpuInstance_t,
    buf: *mut c_char,
    size: c_uint,
    id_type: *mut nvmlVgpuVmIdType_t,
) -> nvmlReturn_t {
    with_vgpu(instance, |v| {
        let kind = if v.vm_id_type == "domain" {
            nvmlVgpuVmIdType_NVML_VGPU_VM_ID_DOMAIN_ID
        } else {
            nvmlVgpuVmIdType_NVML_VGPU_VM_ID_UUID
        };
        // SAFETY: forwarded caller guarantees.
        let written = unsafe { write_cstr(&v.vm_id, buf, size) };
        if written != nvmlReturn_enum_NVML_SUCCESS {
            return written;
        }
        // SAFETY: forwarded caller guarantee.
        unsafe { put(id_type, kind) }
    })
}

/// # Safety
/// `buf` valid for `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlVgpuInstanceGetUUID(
    instance: nvmlVgpuInstance_t,
    buf: *mut c_char,
    size: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller guarantee.
    with_vgpu(instance, |v| unsafe { write_cstr(&v.uuid, buf, size) })
}

/// # Safety
/// `buf` valid for `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlVgpuInstanceGetMdevUUID(
    instance: nvmlVgpuInstance_t,
    buf: *mut c_char,
    size: c_uint,
) -> nvmlReturn_t {
    with_vgpu(instance, |v| match &v.mdev_uuid {
        // SAFETY: forwarded caller guarantee.
        Some(m) => unsafe { write_cstr(m, buf, size) },
        None => nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
    })
}

/// # Safety
/// `id` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlVgpuInstanceGetGpuInstanceId(
    instance: nvmlVgpuInstance_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller guarantee.
    with_vgpu(instance, |v| unsafe { put(id, v.gpu_instance_id.unwrap_or(0xFFFF_FFFF)) })
}

// ---------------------------------------------------------------------------------------------
// GPM (GPU performance monitoring, Hopper+)

/// A GPM sample: which GPU (and GPU instance) it was taken of, and the metric values of the
/// interval ending at the tick it was taken at.
#[derive(Debug, Default)]
struct Sample {
    gpu: Option<(usize, Option<u32>)>,
    values: BTreeMap<nvmlGpmMetricId_t, f64>,
}

/// # Safety
/// `support` must be valid for a read and a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let supported = c_uint::from(state.scenario.gpus[i].gpm);
        // SAFETY: forwarded caller guarantee.
        unsafe {
            put(support, nvmlGpmSupport_t { version: NVML_GPM_SUPPORT_VERSION, isSupportedDevice: supported })
        }
    })
}

/// # Safety
/// `sample` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    let raw = Box::into_raw(Box::<Sample>::default()).cast::<nvmlGpmSample_st>();
    // SAFETY: forwarded caller guarantee.
    let r = unsafe { put(sample, raw) };
    if r != nvmlReturn_enum_NVML_SUCCESS {
        // SAFETY: `raw` came from Box::into_raw above and was not handed out.
        drop(unsafe { Box::from_raw(raw.cast::<Sample>()) });
    }
    r
}

/// # Safety
/// `sample` must come from `nvmlGpmSampleAlloc` and not have been freed.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    if sample.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a pointer from nvmlGpmSampleAlloc (a Box<Sample>) exactly once.
    drop(unsafe { Box::from_raw(sample.cast::<Sample>()) });
    nvmlReturn_enum_NVML_SUCCESS
}

/// Fills `sample` with GPU `device`'s (or its GPU instance `gi`'s) values at the current tick.
///
/// # Safety
/// `sample` must come from `nvmlGpmSampleAlloc` and not have been freed.
unsafe fn take_gpm_sample(device: nvmlDevice_t, gi: Option<u32>, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    with_gpu(device, |state, i, _| {
        let gpu = &state.scenario.gpus[i];
        if !gpu.gpm || (gi.is_some() && !gpu.mig.enabled) {
            return nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
        }
        if sample.is_null() || gi.is_some_and(|gi| gi == 0 || gi > gpu.mig.instances) {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        let values = state.tick_of(gpu).gpm_values(gi);
        // SAFETY: a live Box<Sample> from nvmlGpmSampleAlloc, per the caller; nothing else
        // references it during this call.
        let s = unsafe { &mut *sample.cast::<Sample>() };
        *s = Sample { gpu: Some((i, gi)), values };
        nvmlReturn_enum_NVML_SUCCESS
    })
}

/// # Safety
/// `sample` must come from `nvmlGpmSampleAlloc` and not have been freed.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleGet(device: nvmlDevice_t, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    // SAFETY: forwarded caller guarantee.
    unsafe { take_gpm_sample(device, None, sample) }
}

/// # Safety
/// `sample` must come from `nvmlGpmSampleAlloc` and not have been freed.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMigSampleGet(
    device: nvmlDevice_t,
    gpu_instance_id: c_uint,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller guarantee.
    unsafe { take_gpm_sample(device, Some(gpu_instance_id), sample) }
}

/// # Safety
/// `metrics` must be valid for a read and a write, its samples from `nvmlGpmSampleAlloc`.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMetricsGet(metrics: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    if metrics.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and valid per the caller.
    let request = unsafe { &mut *metrics };
    if request.sample1.is_null() || request.sample2.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: both are live Box<Sample>s from nvmlGpmSampleAlloc, per the caller.
    let (first, second) = unsafe { (&*request.sample1.cast::<Sample>(), &*request.sample2.cast::<Sample>()) };
    let Some((gpu, _)) = second.gpu else { return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT };
    if first.gpu != second.gpu {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    {
        let guard = lock();
        let Some(state) = guard.as_ref() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
        if !state.scenario.gpus.get(gpu).is_some_and(|g| g.gpm) {
            return nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
        }
    }
    let n = (request.numMetrics as usize).min(request.metrics.len());
    for metric in request.metrics.iter_mut().take(n) {
        // The activity over the interval is the later sample's tick value: the fake's ticks
        // describe what happened up to that tick.
        match second.values.get(&metric.metricId).copied() {
            Some(v) => {
                metric.nvmlReturn = nvmlReturn_enum_NVML_SUCCESS;
                metric.value = v;
            }
            None => metric.nvmlReturn = nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
        }
    }
    nvmlReturn_enum_NVML_SUCCESS
}
