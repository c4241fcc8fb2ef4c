//! The guest side: `kycd guest`. Runs the agent's sampler on the VM's own GPUs (the guest's
//! NVML sees the passed-through GPUs the host cannot) and writes one [`GuestReport`] per
//! report interval to the virtio-serial port `org.kycd.telemetry.0`.
//!
//! The port is a character device in the guest (`/dev/virtio-ports/org.kycd.telemetry.0`); a
//! Unix socket path is connected to instead (a vsock or TCP relay, or a test standing in for
//! QEMU). The device is opened non-blocking: while the host side is not connected, virtio's
//! console driver would block a write, and so the sampling, indefinitely. A port that cannot
//! be opened or written (host not connected, a partial line) is reopened at the next report;
//! reports meanwhile are dropped (the host notices the silence: `guest_telemetry_gap`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kycd_protocol::clock::{Clock as _, SystemClock};

use super::{GuestGpu, GuestReport, GUEST_REPORT_VERSION};
use crate::gpu::estimate::Bounds;
use crate::gpu::sampler::{GpuSampler, TenantMap, TickReport};

/// Where `kycd guest` writes by default.
pub const DEFAULT_PORT: &str = "/dev/virtio-ports/org.kycd.telemetry.0";

/// `kycd guest` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderOptions {
    /// The virtio-serial port (or a Unix socket).
    pub port: PathBuf,
    /// Sampling interval.
    pub interval: Duration,
    /// Report interval (a whole number of sampling intervals in practice).
    pub report_every: Duration,
    /// Stop after this many reports (`None`: run until killed).
    pub reports: Option<u64>,
}

/// Why `kycd guest` stopped.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The report interval is out of range.
    #[error("report interval {0:?} out of range (100 ms to 10 min)")]
    Interval(Duration),
}

/// Per-GPU sums over one report interval.
#[derive(Debug, Clone, Default)]
struct Sums {
    name: String,
    pci_id: Option<String>,
    ops: Bounds,
    /// Activity × seconds.
    busy_s: f64,
}

/// Accumulates sampler ticks into reports.
#[derive(Debug)]
pub struct ReportBuilder {
    session: String,
    seq: u64,
    elapsed_ms: u64,
    gpus: BTreeMap<String, Sums>,
}

impl ReportBuilder {
    /// A builder for a new session.
    pub fn new(session: String) -> Self {
        ReportBuilder { session, seq: 0, elapsed_ms: 0, gpus: BTreeMap::new() }
    }

    /// Adds one tick (nothing for the priming tick).
    pub fn add(&mut self, tick: &TickReport) {
        let dt_s = tick.dt.as_secs_f64();
        if dt_s == 0.0 {
            return;
        }
        self.elapsed_ms += u64::try_from(tick.dt.as_millis()).unwrap_or(u64::MAX);
        for estimate in &tick.gpus {
            let snapshot = tick.sample.gpus.iter().find(|g| g.uuid == estimate.uuid);
            let sums = self.gpus.entry(estimate.uuid.clone()).or_default();
            if let Some(s) = snapshot {
                sums.name.clone_from(&s.name);
                sums.pci_id.clone_from(&s.pci_id);
            }
            if let Some(ops) = estimate.ops {
                sums.ops.add(ops);
            }
            sums.busy_s += estimate.rate.map_or(0.0, |r| r.activity) * dt_s;
        }
    }

    /// The interval covered so far.
    pub fn elapsed(&self) -> Duration {
        Duration::from_millis(self.elapsed_ms)
    }

    /// The report for the interval so far, starting the next; `None` when nothing was
    /// sampled.
    pub fn take(&mut self) -> Option<GuestReport> {
        if self.elapsed_ms == 0 {
            return None;
        }
        let interval_s = self.elapsed_ms as f64 / 1000.0;
        self.seq += 1;
        let gpus = std::mem::take(&mut self.gpus)
            .into_iter()
            .filter(|(_, s)| !s.name.is_empty())
            .map(|(uuid, s)| GuestGpu {
                uuid,
                name: s.name,
                pci_id: s.pci_id,
                ops_lower: s.ops.lower,
                ops: s.ops.point,
                ops_upper: s.ops.upper,
                activity: (s.busy_s / interval_s).clamp(0.0, 1.0),
            })
            .collect();
        let report = GuestReport {
            v: GUEST_REPORT_VERSION,
            session: self.session.clone(),
            seq: self.seq,
            interval_ms: std::mem::take(&mut self.elapsed_ms),
            gpus,
        };
        Some(report)
    }
}

/// A random session id (16 hex digits).
pub fn new_session() -> String {
    use std::io::Read as _;
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Uniqueness is all a session needs: the time and pid are unique enough.
        let nanos = SystemClock.now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let t = (nanos as u64) ^ (u64::from(std::process::id()) << 48);
        bytes = t.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The open port.
enum Port {
    Device(std::fs::File),
    Socket(std::os::unix::net::UnixStream),
}

impl Port {
    fn open(path: &Path) -> std::io::Result<Port> {
        use std::os::unix::fs::FileTypeExt as _;
        if std::fs::metadata(path)?.file_type().is_socket() {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            // A host that stops reading must not stall sampling for long.
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            Ok(Port::Socket(s))
        } else {
            use std::os::unix::fs::OpenOptionsExt as _;
            let device = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(path)?;
            Ok(Port::Device(device))
        }
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Port::Device(f) => f.write_all(line).and_then(|()| f.flush()),
            Port::Socket(s) => s.write_all(line),
        }
    }
}

/// Runs until `options.reports` reports were written (or forever): samples every
/// `options.interval`, writes a report every `options.report_every`.
pub fn run(mut sampler: GpuSampler, options: &SenderOptions) -> Result<(), SenderError> {
    let report_ms = u64::try_from(options.report_every.as_millis()).unwrap_or(u64::MAX);
    if !super::INTERVAL_MS.contains(&report_ms) {
        return Err(SenderError::Interval(options.report_every));
    }
    let tenants = TenantMap::new();
    let mut builder = ReportBuilder::new(new_session());
    let mut port: Option<Port> = None;
    let mut written = 0u64;
    let mut due = SystemClock.instant();
    tracing::info!(port = %options.port.display(), every = ?options.report_every, "kycd guest: reporting GPU usage to the host");
    let mut available = None;
    while options.reports.is_none_or(|n| written < n) {
        let tick = sampler.tick(&tenants);
        // Said once per change: without NVML nothing is reported, and the host sees a gap.
        let ok = tick.sample.backend == crate::gpu::BackendState::Ok;
        if available != Some(ok) {
            match &tick.sample.backend {
                crate::gpu::BackendState::Unavailable { reason } => {
                    tracing::warn!(%reason, "GPU backend unavailable: nothing to report until it is")
                }
                crate::gpu::BackendState::Ok => {
                    tracing::info!(gpus = tick.sample.gpus.len(), "GPU backend available")
                }
            }
            available = Some(ok);
        }
        builder.add(&tick);
        if builder.elapsed() >= options.report_every {
            if let Some(report) = builder.take() {
                let mut line = serde_json::to_vec(&report).unwrap_or_default();
                line.push(b'\n');
                let result = match &mut port {
                    Some(p) => p.write_line(&line),
                    None => Port::open(&options.port).and_then(|mut p| {
                        let r = p.write_line(&line);
                        port = Some(p);
                        r
                    }),
                };
                match result {
                    Ok(()) => {
                        written += 1;
                        tracing::debug!(seq = report.seq, gpus = report.gpus.len(), "guest report written");
                    }
                    Err(e) => {
                        tracing::warn!(port = %options.port.display(), error = %e, seq = report.seq,
                            "cannot write the guest report (dropped; the port is reopened for the next)");
                        port = None;
                    }
                }
            }
        }
        due += options.interval;
        let now = SystemClock.instant();
        if due < now {
            due = now;
        }
        std::thread::sleep(due.saturating_duration_since(now));
    }
    Ok(())
}
