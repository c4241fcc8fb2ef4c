//! Guest telemetry: a VM's own GPU measurement, sent to the host agent.
//!
//! A GPU passed through to a VM is invisible to the host's driver; only the guest's driver
//! sees its activity. `kycd guest` ([`sender`]) runs the agent's sampler inside the VM and
//! writes one [`GuestReport`] per interval, a JSON line, to the virtio-serial port
//! `org.kycd.telemetry.0` (`/dev/virtio-ports/org.kycd.telemetry.0`). On the host, libvirt
//! binds that channel to a Unix socket named in the domain's live XML; the host agent
//! ([`host`]) connects to it, reads the lines and books them to the domain's tenant.
//!
//! The guest is the tenant's, so nothing it says is trusted beyond what the host can bound:
//! each line is size-limited and validated here ([`parse_line`]), the host accepts figures
//! only for GPUs the domain holds, books the guest's *rate* over its own clock (a guest cannot
//! book time that did not pass) capped at each GPU's fastest peak, and keeps the allocation
//! as the upper bound.

pub mod host;
pub mod sender;

use serde::{Deserialize, Serialize};

/// The report format version this agent writes and reads.
pub const GUEST_REPORT_VERSION: u32 = 1;

/// The longest line the host reads from a guest; longer ones are refused.
pub const MAX_LINE: usize = 16 * 1024;

/// At most this many GPUs in one report (no VM holds more).
pub const MAX_GPUS: usize = 64;

/// The shortest and longest interval a report may cover (ms).
pub const INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=600_000;

/// One report: what the guest's GPUs did over its last interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestReport {
    /// [`GUEST_REPORT_VERSION`].
    pub v: u32,
    /// Random per `kycd guest` run: a restarted guest agent starts a new sequence.
    pub session: String,
    /// Strictly increasing within a session.
    pub seq: u64,
    /// The interval the figures cover, by the guest's clock (ms).
    pub interval_ms: u64,
    /// Per GPU.
    pub gpus: Vec<GuestGpu>,
}

/// One GPU's figures in a [`GuestReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestGpu {
    /// The GPU's UUID as the guest's NVML reports it.
    pub uuid: String,
    /// Its model name as the guest's NVML reports it.
    pub name: String,
    /// Its PCI device ID (`10de:2335`), when NVML gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
    /// Operations over the interval: lower bound, point estimate, upper bound
    /// (docs/estimates.md).
    pub ops_lower: f64,
    /// Point estimate.
    pub ops: f64,
    /// Upper bound.
    pub ops_upper: f64,
    /// How busy the GPU was, 0..=1 (the training rule's X).
    pub activity: f64,
}

/// Why a guest's line was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuestReportError {
    /// Longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not a report.
    #[error("not a guest report: {0}")]
    Malformed(String),
    /// Another format version.
    #[error("report version {0}, this agent reads {GUEST_REPORT_VERSION}")]
    Version(u32),
    /// The session id is empty, too long or not printable.
    #[error("invalid session id")]
    Session,
    /// The interval is out of [`INTERVAL_MS`].
    #[error("interval {0} ms out of range")]
    Interval(u64),
    /// More than [`MAX_GPUS`] GPUs.
    #[error("{0} GPUs in one report")]
    TooManyGpus(usize),
    /// A GPU entry's identifiers are empty, too long or not printable.
    #[error("invalid GPU identifier")]
    GpuId,
    /// A figure is negative or not a number, or the three are out of order.
    #[error("GPU {uuid}: figures not finite, negative or out of order")]
    Figures {
        /// The GPU.
        uuid: String,
    },
    /// The domain holds no passed-through GPU: there is nothing to book a report to.
    #[error("the domain holds no passed-through GPU")]
    NothingHeld,
    /// The same session's sequence number again, or an older one (a replay).
    #[error("sequence {seq} not after {last}")]
    Replayed {
        /// This report's.
        seq: u64,
        /// The last accepted.
        last: u64,
    },
}

impl GuestReportError {
    /// A short name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestReportError::TooLong => "too_long",
            GuestReportError::Malformed(_) => "malformed",
            GuestReportError::Version(_) => "version",
            GuestReportError::Session => "session",
            GuestReportError::Interval(_) => "interval",
            GuestReportError::TooManyGpus(_) => "too_many_gpus",
            GuestReportError::GpuId => "gpu_id",
            GuestReportError::Figures { .. } => "figures",
            GuestReportError::NothingHeld => "nothing_held",
            GuestReportError::Replayed { .. } => "replayed",
        }
    }
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// Parses and validates one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<GuestReport, GuestReportError> {
    if line.len() > MAX_LINE {
        return Err(GuestReportError::TooLong);
    }
    // serde's message quotes the guest's own text (an unknown field's name, newlines and all):
    // only its kind and position go to the log.
    let report: GuestReport = serde_json::from_slice(line).map_err(|e| {
        GuestReportError::Malformed(format!("{:?} error at column {}", e.classify(), e.column()))
    })?;
    if report.v != GUEST_REPORT_VERSION {
        return Err(GuestReportError::Version(report.v));
    }
    if !printable(&report.session, 64) {
        return Err(GuestReportError::Session);
    }
    if !INTERVAL_MS.contains(&report.interval_ms) {
        return Err(GuestReportError::Interval(report.interval_ms));
    }
    if report.gpus.len() > MAX_GPUS {
        return Err(GuestReportError::TooManyGpus(report.gpus.len()));
    }
    for g in &report.gpus {
        if !printable(&g.uuid, 96)
            || !printable(&g.name, 96)
            || g.pci_id.as_deref().is_some_and(|p| !printable(p, 16))
        {
            return Err(GuestReportError::GpuId);
        }
        let finite = [g.ops_lower, g.ops, g.ops_upper, g.activity].iter().all(|v| v.is_finite() && *v >= 0.0);
        if !finite || g.ops_lower > g.ops || g.ops > g.ops_upper || g.activity > 1.0 {
            return Err(GuestReportError::Figures { uuid: g.uuid.clone() });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(gpus: &str) -> String {
        format!(r#"{{"v":1,"session":"a1","seq":3,"interval_ms":10000,"gpus":[{gpus}]}}"#)
    }
    const GPU: &str = r#"{"uuid":"GPU-1","name":"NVIDIA H100 80GB HBM3","pci_id":"10de:2330","ops_lower":1,"ops":2,"ops_upper":3,"activity":0.5}"#;

    #[test]
    fn accepts_a_well_formed_report() {
        let r = parse_line(line(GPU).as_bytes()).unwrap();
        assert_eq!((r.seq, r.interval_ms, r.gpus.len(), r.gpus[0].ops), (3, 10_000, 1, 2.0));
        let again = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_line(again.as_bytes()).unwrap(), r);
    }

    #[test]
    fn refuses_what_a_guest_must_not_send() {
        let kind = |text: &str| parse_line(text.as_bytes()).unwrap_err().kind();
        assert_eq!(kind(&"x".repeat(MAX_LINE + 1)), "too_long");
        assert_eq!(kind("not json"), "malformed");
        assert_eq!(kind(&line(GPU).replace("\"gpus\"", "\"extra\":1,\"gpus\"")), "malformed");
        // A guest's text never reaches the log through the error message.
        let injected =
            parse_line(line(GPU).replace("\"gpus\"", "\"x\\nFAKE log line\":1,\"gpus\"").as_bytes());
        let message = injected.unwrap_err().to_string();
        assert!(!message.contains('\n') && !message.contains("FAKE"), "{message}");
        assert_eq!(kind(&line(GPU).replace("\"v\":1", "\"v\":2")), "version");
        assert_eq!(kind(&line(GPU).replace("\"a1\"", "\"\"")), "session");
        assert_eq!(kind(&line(GPU).replace("10000", "5")), "interval");
        assert_eq!(kind(&line(GPU).replace("10000", "600001")), "interval");
        assert_eq!(kind(&line(&vec![GPU; MAX_GPUS + 1].join(","))), "too_many_gpus");
        assert_eq!(kind(&line(&GPU.replace("GPU-1", "GPU\\n1"))), "gpu_id");
        assert_eq!(kind(&line(&GPU.replace("\"ops\":2", "\"ops\":-2"))), "figures");
        assert_eq!(kind(&line(&GPU.replace("\"ops\":2", "\"ops\":4"))), "figures");
        assert_eq!(kind(&line(&GPU.replace("0.5", "1.5"))), "figures");
        assert_eq!(kind(&line(&GPU.replace("\"ops_upper\":3", "\"ops_upper\":1e999"))), "malformed");
    }
}
