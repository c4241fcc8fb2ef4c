//! The host side of guest telemetry: per running domain that holds passed-through GPUs, the
//! `org.kycd.telemetry.0` channel socket, the guest's latest accepted rates, and whether the
//! guest is reporting at all.
//!
//! Lives on the sampler thread ([`super::super::passthrough::PassthroughAccounting`] owns it):
//! every tick it reads what the guests have written, without blocking (non-blocking sockets,
//! at most [`READ_PER_TICK`] bytes per domain per tick, so a flooding guest is back-pressured,
//! never buffered without bound).
//!
//! How a report becomes usage: each GPU entry is matched to a GPU the domain holds of the
//! same model (PCI device ID, or name; the guest's PCI addresses are its own firmware's and
//! say nothing about the host's), keeping a guest UUID on the host GPU it first matched.
//! Entries that match no held GPU are refused. The figures become rates (÷ the reported
//! interval), capped at the host GPU's fastest peak, and the host books the latest rate over
//! its own ticks while it is fresh (twice the reported interval plus [`FRESH_SLACK_MS`], and
//! never longer than the gap timeout, so a GPU is never both booked and in a gap). A held GPU with no fresh guest rate is booked by
//! allocation; once none has come for the gap timeout (from when the domain began holding it,
//! or from its last report) it is in a *guest telemetry gap*.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{parse_line, GuestReport, GuestReportError, MAX_LINE};

/// The most bytes read from one guest per tick.
pub const READ_PER_TICK: usize = 64 * 1024;

/// Slack on a report's freshness beyond twice its interval.
pub const FRESH_SLACK_MS: i64 = 2_000;

/// How long to wait before connecting to a channel again.
pub const RECONNECT_MS: i64 = 5_000;

/// Rejections logged per domain at most once per this long (a bad guest must not flood the log).
const LOG_EVERY_MS: i64 = 60_000;

/// A GPU a domain holds, as the host knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldGpu {
    /// Host PCI address.
    pub address: String,
    /// `10de:2330`.
    pub pci_id: String,
    /// Model name from the PCI ID table.
    pub model: Option<String>,
    /// The fastest rate the GPU has (FLOP/s); `None` for an unknown model (nothing is then
    /// accepted for it: no bound to cap at).
    pub fastest: Option<f64>,
}

/// A guest's rate for one held GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestRate {
    /// Lower bound, FLOP/s.
    pub lower: f64,
    /// Point estimate, FLOP/s.
    pub point: f64,
    /// 0..=1.
    pub activity: f64,
    /// When the report came (host ms).
    pub at_ms: i64,
    /// Until when it is booked (host ms).
    pub fresh_until_ms: i64,
}

/// How a domain's guest telemetry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GuestState {
    /// The domain has the telemetry channel but holds no passed-through GPU: its channel is
    /// read, and anything its guest reports is refused (there is nothing to book it to).
    NoGpus,
    /// Every held GPU has a fresh guest rate.
    Reporting,
    /// Some held GPU has none, but the gap timeout has not passed.
    Waiting,
    /// Some held GPU has had no guest rate for the gap timeout.
    Gap,
}

impl GuestState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::NoGpus => "no_gpus",
            GuestState::Reporting => "reporting",
            GuestState::Waiting => "waiting",
            GuestState::Gap => "gap",
        }
    }
}

/// Why a domain is not reporting, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// The domain has no `org.kycd.telemetry.0` channel.
    NoChannel,
    /// The channel exists but no report was ever accepted.
    NeverReported,
    /// Reports stopped (or stopped covering some GPU).
    Stopped,
}

impl GapReason {
    /// The reason's name.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::NoChannel => "no_channel",
            GapReason::NeverReported => "never_reported",
            GapReason::Stopped => "stopped",
        }
    }
}

/// One domain's guest telemetry, for status, metrics and the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestStatus {
    /// The libvirt domain.
    pub domain: String,
    /// GPUs it holds.
    pub gpus_held: usize,
    /// Of them, with a fresh guest rate.
    pub gpus_reporting: usize,
    /// The channel socket, if the domain has one.
    pub channel: Option<PathBuf>,
    /// Connected to it now.
    pub connected: bool,
    /// When the last report was accepted (host Unix ms).
    pub last_report_ms: Option<i64>,
    /// Reports accepted / refused since the domain was first seen holding GPUs.
    pub accepted: u64,
    /// Refused reports (and GPU entries that matched no held GPU).
    pub refused: u64,
    /// Reports whose figures were above the allocation and were capped.
    pub capped: u64,
    /// The last refusal.
    pub last_error: Option<String>,
    /// The state.
    pub state: GuestState,
    /// Why, when not reporting.
    pub reason: Option<GapReason>,
}

#[derive(Debug)]
struct Domain {
    held: Vec<HeldGpu>,
    /// Since when each held GPU (by address) has been held (host ms).
    held_since: BTreeMap<String, i64>,
    channel: Option<PathBuf>,
    stream: Option<UnixStream>,
    buffer: Vec<u8>,
    /// Discarding up to the next newline after an over-long line.
    skipping: bool,
    /// No connection attempt before this (host ms).
    connect_after_ms: i64,
    /// guest UUID → host address.
    matched: BTreeMap<String, String>,
    /// Host address → the guest's latest accepted rate.
    rates: BTreeMap<String, GuestRate>,
    /// The last accepted report's session and sequence number (replays are refused).
    last: Option<(String, u64)>,
    /// When a report was last accepted (host ms).
    last_report_ms: Option<i64>,
    /// Reports accepted, refused (and GPU entries refused), capped.
    accepted: u64,
    refused: u64,
    capped: u64,
    /// The last refusal, for status.
    last_error: Option<String>,
    /// When a refusal was last logged (the log is rate-limited per domain).
    logged_at_ms: Option<i64>,
}

/// Guest telemetry of every domain holding GPUs.
#[derive(Debug)]
pub struct GuestTelemetry {
    timeout_ms: i64,
    domains: BTreeMap<String, Domain>,
}

impl GuestTelemetry {
    /// A domain whose guest has sent nothing for `timeout_ms` is in a gap.
    pub fn new(timeout_ms: i64) -> Self {
        GuestTelemetry { timeout_ms: timeout_ms.max(1), domains: BTreeMap::new() }
    }

    /// The domains holding GPUs or having the telemetry channel now, each with its GPUs and
    /// channel socket (from a rescan). Domains no longer listed are forgotten; a changed
    /// channel path reconnects.
    pub fn update(&mut self, now_ms: i64, holding: BTreeMap<String, (Vec<HeldGpu>, Option<PathBuf>)>) {
        self.domains.retain(|name, _| holding.contains_key(name));
        for (name, (held, channel)) in holding {
            let d = self.domains.entry(name).or_insert_with(|| Domain {
                held: Vec::new(),
                held_since: BTreeMap::new(),
                channel: None,
                stream: None,
                buffer: Vec::new(),
                skipping: false,
                connect_after_ms: now_ms,
                matched: BTreeMap::new(),
                rates: BTreeMap::new(),
                last: None,
                last_report_ms: None,
                accepted: 0,
                refused: 0,
                capped: 0,
                last_error: None,
                logged_at_ms: None,
            });
            d.held_since.retain(|a, _| held.iter().any(|g| &g.address == a));
            for g in &held {
                d.held_since.entry(g.address.clone()).or_insert(now_ms);
            }
            d.rates.retain(|a, _| held.iter().any(|g| &g.address == a));
            d.matched.retain(|_, a| held.iter().any(|g| &g.address == a));
            d.held = held;
            if d.channel != channel {
                d.stream = None;
                d.buffer.clear();
                d.skipping = false;
                d.connect_after_ms = now_ms;
                d.channel = channel;
            }
        }
    }

    /// Reads what every guest wrote since the last tick and applies it.
    pub fn poll(&mut self, now_ms: i64) {
        for (name, d) in &mut self.domains {
            d.poll(name, now_ms, self.timeout_ms);
        }
    }

    /// The fresh guest rate for GPU `address` held by `domain`, if any.
    pub fn rate(&self, domain: &str, address: &str, now_ms: i64) -> Option<GuestRate> {
        let r = *self.domains.get(domain)?.rates.get(address)?;
        (now_ms <= r.fresh_until_ms).then_some(r)
    }

    /// GPU `address` of `domain` has had no guest rate for the gap timeout.
    pub fn in_gap(&self, domain: &str, address: &str, now_ms: i64) -> bool {
        self.domains.get(domain).is_some_and(|d| d.gpu_in_gap(address, now_ms, self.timeout_ms))
    }

    /// Every domain's state.
    pub fn status(&self, now_ms: i64) -> Vec<GuestStatus> {
        self.domains
            .iter()
            .map(|(name, d)| {
                let reporting =
                    d.held.iter().filter(|g| self.rate(name, &g.address, now_ms).is_some()).count();
                let gap = d.held.iter().any(|g| d.gpu_in_gap(&g.address, now_ms, self.timeout_ms));
                let state = if d.held.is_empty() {
                    GuestState::NoGpus
                } else if gap {
                    GuestState::Gap
                } else if reporting == d.held.len() {
                    GuestState::Reporting
                } else {
                    GuestState::Waiting
                };
                let waiting = matches!(state, GuestState::Waiting | GuestState::Gap);
                let reason = waiting.then_some(match (&d.channel, d.last_report_ms) {
                    (None, _) => GapReason::NoChannel,
                    (Some(_), None) => GapReason::NeverReported,
                    (Some(_), Some(_)) => GapReason::Stopped,
                });
                GuestStatus {
                    domain: name.clone(),
                    gpus_held: d.held.len(),
                    gpus_reporting: reporting,
                    channel: d.channel.clone(),
                    connected: d.stream.is_some(),
                    last_report_ms: d.last_report_ms,
                    accepted: d.accepted,
                    refused: d.refused,
                    capped: d.capped,
                    last_error: d.last_error.clone(),
                    state,
                    reason,
                }
            })
            .collect()
    }
}

impl Domain {
    fn gpu_in_gap(&self, address: &str, now_ms: i64, timeout_ms: i64) -> bool {
        let Some(since) = self.held_since.get(address) else { return false };
        let last = self.rates.get(address).map_or(*since, |r| r.at_ms.max(*since));
        now_ms - last > timeout_ms
    }

    fn poll(&mut self, name: &str, now_ms: i64, timeout_ms: i64) {
        if self.stream.is_none() {
            self.connect(name, now_ms);
        }
        let Some(mut stream) = self.stream.take() else { return };
        let mut chunk = [0u8; 8192];
        let mut read = 0;
        let mut closed = None;
        while read < READ_PER_TICK {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = Some("the channel closed (QEMU closed the socket)".to_owned());
                    break;
                }
                Ok(n) => {
                    read += n;
                    self.take(name, (now_ms, timeout_ms), &chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    closed = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(why) = closed {
            tracing::info!(domain = %name, reason = %why, "guest telemetry channel closed; reconnecting");
            self.buffer.clear();
            self.skipping = false;
            self.connect_after_ms = now_ms + RECONNECT_MS;
        } else {
            self.stream = Some(stream);
        }
    }

    fn connect(&mut self, name: &str, now_ms: i64) {
        let Some(path) = &self.channel else { return };
        if now_ms < self.connect_after_ms {
            return;
        }
        self.connect_after_ms = now_ms + RECONNECT_MS;
        match connect_nonblocking(path) {
            Ok(s) => {
                tracing::info!(domain = %name, channel = %path.display(), "guest telemetry channel connected");
                self.stream = Some(s);
            }
            Err(e) => {
                tracing::debug!(domain = %name, channel = %path.display(), error = %e, "guest telemetry channel not connectable")
            }
        }
    }

    /// Splits `bytes` into lines and applies each.
    fn take(&mut self, name: &str, (now_ms, timeout_ms): (i64, i64), mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            let (head, rest) = bytes.split_at(nl);
            bytes = &rest[1..];
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            let line = if self.buffer.is_empty() {
                head.to_vec()
            } else {
                let mut l = std::mem::take(&mut self.buffer);
                l.extend_from_slice(head);
                l
            };
            self.line(name, (now_ms, timeout_ms), &line);
        }
        if self.skipping {
            return;
        }
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() > MAX_LINE {
            self.buffer.clear();
            self.skipping = true;
            self.refuse(name, now_ms, &GuestReportError::TooLong);
        }
    }

    fn line(&mut self, name: &str, (now_ms, timeout_ms): (i64, i64), line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let checked = parse_line(line).and_then(|r| self.check_sequence(r)).and_then(|r| {
            if self.held.is_empty() {
                Err(GuestReportError::NothingHeld)
            } else {
                Ok(r)
            }
        });
        match checked {
            Ok(report) => self.apply(name, (now_ms, timeout_ms), &report),
            Err(e) => self.refuse(name, now_ms, &e),
        }
    }

    fn check_sequence(&self, report: GuestReport) -> Result<GuestReport, GuestReportError> {
        match &self.last {
            Some((session, last)) if *session == report.session && report.seq <= *last => {
                Err(GuestReportError::Replayed { seq: report.seq, last: *last })
            }
            _ => Ok(report),
        }
    }

    fn apply(&mut self, name: &str, (now_ms, timeout_ms): (i64, i64), report: &GuestReport) {
        self.last = Some((report.session.clone(), report.seq));
        self.accepted += 1;
        self.last_report_ms = Some(now_ms);
        let interval_s = report.interval_ms as f64 / 1000.0;
        // Never past the gap timeout: a GPU is either booked from the guest or in a gap.
        let fresh_for = (2 * i64::try_from(report.interval_ms).unwrap_or(i64::MAX / 4) + FRESH_SLACK_MS)
            .clamp(0, timeout_ms);
        let mut capped = false;
        for g in &report.gpus {
            let Some(held) = self.match_gpu(g) else {
                self.refused += 1;
                let e = format!("GPU {} ({}) is not one the domain holds", g.uuid, g.name);
                self.log_refusal(name, now_ms, "not_held", &e);
                self.last_error = Some(e);
                continue;
            };
            let Some(fastest) = held.fastest else {
                // No peak, nothing to cap at: refused, and said, so a domain "reporting" into
                // a gap is explained.
                self.refused += 1;
                let e =
                    format!("GPU {} is a model without known peaks: its figures cannot be bounded", g.uuid);
                self.log_refusal(name, now_ms, "unknown_model", &e);
                self.last_error = Some(e);
                continue;
            };
            let point = (g.ops / interval_s).min(fastest);
            capped |= g.ops / interval_s > fastest * (1.0 + 1e-9);
            let rate = GuestRate {
                lower: (g.ops_lower / interval_s).min(point),
                point,
                activity: g.activity,
                at_ms: now_ms,
                fresh_until_ms: now_ms + fresh_for,
            };
            self.rates.insert(held.address.clone(), rate);
        }
        if capped {
            self.capped += 1;
            self.log_refusal(
                name,
                now_ms,
                "capped",
                "guest reported more operations than its GPUs' peak allows; capped",
            );
        }
    }

    /// The held GPU guest GPU `g` stands for: the one it matched before, or a free one of
    /// the same model.
    fn match_gpu(&mut self, g: &super::GuestGpu) -> Option<HeldGpu> {
        if let Some(address) = self.matched.get(&g.uuid) {
            return self.held.iter().find(|h| &h.address == address).cloned();
        }
        let same_model = |h: &HeldGpu| match &g.pci_id {
            Some(id) => id.eq_ignore_ascii_case(&h.pci_id),
            None => h.model.as_deref() == Some(g.name.as_str()),
        };
        let taken: Vec<&String> = self.matched.values().collect();
        let free = self.held.iter().find(|h| same_model(h) && !taken.contains(&&h.address))?.clone();
        self.matched.insert(g.uuid.clone(), free.address.clone());
        Some(free)
    }

    fn refuse(&mut self, name: &str, now_ms: i64, e: &GuestReportError) {
        self.refused += 1;
        self.last_error = Some(e.to_string());
        self.log_refusal(name, now_ms, e.kind(), &e.to_string());
    }

    fn log_refusal(&mut self, name: &str, now_ms: i64, kind: &str, error: &str) {
        if self.logged_at_ms.is_some_and(|at| now_ms - at < LOG_EVERY_MS) {
            return;
        }
        self.logged_at_ms = Some(now_ms);
        tracing::warn!(domain = %name, kind, %error, refused = self.refused,
            "guest telemetry refused (further refusals from this domain are counted, logged at most once a minute)");
    }
}

/// A non-blocking connection to the Unix socket at `path`. `UnixStream::connect` blocks while
/// the listener's backlog is full (QEMU's chardev listens with a backlog of 1 and accepts one
/// client at a time), which would stall the sampler thread; here a full backlog is `EAGAIN`,
/// tried again at the next rescan.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd as _;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::net::UnixListener;

    const FASTEST: f64 = 1.979e15;

    fn held(n: usize) -> Vec<HeldGpu> {
        (0..n)
            .map(|i| HeldGpu {
                address: format!("0000:{:02x}:00.0", 0x17 + i),
                pci_id: "10de:2330".into(),
                model: Some("NVIDIA H100 80GB HBM3".into()),
                fastest: Some(FASTEST),
            })
            .collect()
    }

    fn report(seq: u64, gpus: &[(&str, f64)]) -> String {
        let gpus: Vec<String> = gpus
            .iter()
            .map(|(uuid, ops)| {
                format!(
                    r#"{{"uuid":"{uuid}","name":"NVIDIA H100 80GB HBM3","pci_id":"10de:2330","ops_lower":{},"ops":{ops},"ops_upper":{},"activity":0.9}}"#,
                    ops / 2.0,
                    ops * 2.0
                )
            })
            .collect();
        format!(
            "{{\"v\":1,\"session\":\"s\",\"seq\":{seq},\"interval_ms\":10000,\"gpus\":[{}]}}\n",
            gpus.join(",")
        )
    }

    /// A channel socket as libvirt's QEMU binds it, and the guest's end once the host connects.
    struct Channel {
        path: PathBuf,
        listener: UnixListener,
        _dir: tempfile::TempDir,
    }

    impl Channel {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("org.kycd.telemetry.0");
            let listener = UnixListener::bind(&path).unwrap();
            Channel { path, listener, _dir: dir }
        }
        fn guest(&self) -> UnixStream {
            self.listener.accept().unwrap().0
        }
    }

    fn telemetry(channel: &Channel, gpus: usize) -> GuestTelemetry {
        let mut t = GuestTelemetry::new(60_000);
        t.update(0, BTreeMap::from([("vm".to_owned(), (held(gpus), Some(channel.path.clone())))]));
        t
    }

    #[test]
    fn books_a_guests_rate_for_held_gpus_capped_at_their_peak() {
        let channel = Channel::new();
        let mut t = telemetry(&channel, 2);
        t.poll(0);
        let mut guest = channel.guest();
        // GPU-a at 1e15 FLOP/s; GPU-b claims 10× the GPU's fastest peak; GPU-c is one more
        // H100 than the domain holds.
        guest
            .write_all(
                report(1, &[("GPU-a", 1e16), ("GPU-b", 10.0 * FASTEST * 10.0), ("GPU-c", 1.0)]).as_bytes(),
            )
            .unwrap();
        t.poll(1_000);
        let a = t.rate("vm", "0000:17:00.0", 1_000).unwrap();
        assert_eq!((a.lower, a.point, a.activity), (5e14, 1e15, 0.9));
        let b = t.rate("vm", "0000:18:00.0", 1_000).unwrap();
        assert_eq!((b.lower, b.point), (FASTEST, FASTEST), "capped at the allocation");
        let s = &t.status(1_000)[0];
        assert_eq!(
            (s.state, s.accepted, s.refused, s.capped, s.connected),
            (GuestState::Reporting, 1, 1, 1, true)
        );
        assert!(s.last_error.as_deref().unwrap().contains("GPU-c"), "{s:?}");
        // Fresh for twice the interval plus slack, then allocation again (waiting), then a gap
        // once the timeout has passed since the report.
        assert!(t.rate("vm", "0000:17:00.0", 23_000).is_some());
        assert!(t.rate("vm", "0000:17:00.0", 23_001).is_none());
        assert_eq!(t.status(30_000)[0].state, GuestState::Waiting);
        assert!(!t.in_gap("vm", "0000:17:00.0", 61_000));
        assert!(t.in_gap("vm", "0000:17:00.0", 61_001));
        let s = &t.status(61_001)[0];
        assert_eq!((s.state, s.reason), (GuestState::Gap, Some(GapReason::Stopped)));
    }

    #[test]
    fn a_long_interval_never_books_into_a_gap_and_a_domain_without_gpus_refuses_reports() {
        let channel = Channel::new();
        let mut t = telemetry(&channel, 1);
        t.poll(0);
        let mut guest = channel.guest();
        // 600 s claimed: fresh for the gap timeout (60 s), not 1,202 s.
        guest
            .write_all(
                report(1, &[("GPU-a", 1e16)])
                    .replace("\"interval_ms\":10000", "\"interval_ms\":600000")
                    .as_bytes(),
            )
            .unwrap();
        t.poll(1_000);
        assert!(t.rate("vm", "0000:17:00.0", 61_000).is_some());
        assert!(t.rate("vm", "0000:17:00.0", 61_001).is_none());
        assert!(t.in_gap("vm", "0000:17:00.0", 61_001));
        // The domain releases its GPU but keeps the channel: reports are refused whole.
        t.update(62_000, BTreeMap::from([("vm".to_owned(), (Vec::new(), Some(channel.path.clone())))]));
        guest.write_all(report(2, &[("GPU-a", 1e16)]).as_bytes()).unwrap();
        guest.write_all(report(3, &[]).as_bytes()).unwrap();
        t.poll(63_000);
        let s = &t.status(63_000)[0];
        assert_eq!((s.state, s.accepted, s.refused), (GuestState::NoGpus, 1, 2), "{s:?}");
        assert_eq!(s.last_error.as_deref(), Some("the domain holds no passed-through GPU"));
    }

    #[test]
    fn refuses_replays_garbage_and_overlong_lines_and_keeps_reading() {
        let channel = Channel::new();
        let mut t = telemetry(&channel, 1);
        t.poll(0);
        let mut guest = channel.guest();
        let first = report(5, &[("GPU-a", 1e16)]);
        let long = format!("{}\n", "x".repeat(MAX_LINE + 10));
        let text =
            [first.as_str(), first.as_str(), "garbage\n", &long, &report(4, &[("GPU-a", 1.0)])].concat();
        guest.write_all(text.as_bytes()).unwrap();
        // Written in pieces across ticks: a line split over two reads is one line.
        let next = report(6, &[("GPU-a", 1.5e16)]);
        let (x, y) = next.split_at(30);
        guest.write_all(x.as_bytes()).unwrap();
        for tick in 1..8 {
            t.poll(tick * 1_000);
        }
        guest.write_all(y.as_bytes()).unwrap();
        t.poll(9_000);
        let s = &t.status(9_000)[0];
        assert_eq!((s.accepted, s.refused), (2, 4), "{s:?}");
        assert_eq!(t.rate("vm", "0000:17:00.0", 9_000).unwrap().point, 1.5e15);
    }

    #[test]
    fn a_listener_with_a_full_backlog_does_not_block_the_connect() {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.sock");
        // QEMU's chardev: a listener that accepts nothing while its one client stays.
        let listener = socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None).unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let attempts: Vec<std::io::Result<UnixStream>> = (0..4).map(|_| connect_nonblocking(&path)).collect();
        assert!(attempts[0].is_ok());
        let full = attempts.iter().filter_map(|a| a.as_ref().err()).next().expect("a full backlog");
        assert_eq!(full.kind(), std::io::ErrorKind::WouldBlock, "{full}");
    }

    #[test]
    fn states_and_reasons_without_reports() {
        let mut t = GuestTelemetry::new(60_000);
        let dir = tempfile::tempdir().unwrap();
        t.update(
            0,
            BTreeMap::from([
                ("bare".to_owned(), (held(1), None)),
                ("silent".to_owned(), (held(1), Some(dir.path().join("absent.sock")))),
            ]),
        );
        t.poll(0);
        let s = t.status(1_000);
        assert_eq!((s[0].state, s[0].reason), (GuestState::Waiting, Some(GapReason::NoChannel)));
        assert_eq!(
            (s[1].state, s[1].reason, s[1].connected),
            (GuestState::Waiting, Some(GapReason::NeverReported), false)
        );
        let s = t.status(60_001);
        assert_eq!((s[0].state, s[1].state), (GuestState::Gap, GuestState::Gap));
        // A domain with the channel and no GPUs: read, never in a gap.
        let mut c = GuestTelemetry::new(60_000);
        c.update(
            0,
            BTreeMap::from([("plain".to_owned(), (Vec::new(), Some(dir.path().join("absent.sock"))))]),
        );
        let s = &c.status(120_000)[0];
        assert_eq!((s.state, s.reason, s.gpus_held), (GuestState::NoGpus, None, 0));
        // A domain that stops holding GPUs is forgotten; one that starts holding a new GPU
        // waits for it from then.
        let mut more = held(2);
        more[1].address = "0000:99:00.0".into();
        t.update(70_000, BTreeMap::from([("silent".to_owned(), (more, None))]));
        assert_eq!(t.status(70_000).len(), 1);
        assert!(!t.in_gap("silent", "0000:99:00.0", 130_000));
        assert!(t.in_gap("silent", "0000:17:00.0", 130_000), "held since 0");
    }

    #[test]
    fn a_closed_channel_is_reconnected_and_a_new_session_restarts_the_sequence() {
        let channel = Channel::new();
        let mut t = telemetry(&channel, 1);
        t.poll(0);
        let mut guest = channel.guest();
        guest.write_all(report(9, &[("GPU-a", 1e16)]).as_bytes()).unwrap();
        drop(guest);
        t.poll(1_000);
        assert!(!t.status(1_000)[0].connected);
        t.poll(1_000 + RECONNECT_MS);
        let mut guest = channel.guest();
        guest.write_all(report(1, &[("GPU-a", 1.2e16)]).replace("\"s\"", "\"s2\"").as_bytes()).unwrap();
        t.poll(7_000);
        let s = &t.status(7_000)[0];
        assert_eq!((s.accepted, s.refused, s.connected), (2, 0, true), "{s:?}");
        assert_eq!(t.rate("vm", "0000:17:00.0", 7_000).unwrap().point, 1.2e15);
    }
}
