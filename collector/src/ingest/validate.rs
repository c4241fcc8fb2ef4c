//! Step 4 of the pipeline: every record of a parsed batch is checked before any is stored
//! (see [`super`]): identifiers, sequence numbers, and the bounds of every number of a window
//! ([`check_window`]), under the upload's [`Limits`].

use kycd_protocol::{ReportBatch, UsageRecord, UsageWindow, MAX_OPS_PER_PEAK};

use super::error::{IngestError, WindowError};
#[cfg(doc)]
use crate::store::reports::Enrollment;
use crate::store::reports::ValidRecord;

/// Longest identifier (workload, tenant, host id) accepted in a report.
pub const MAX_ID_LEN: usize = kycd_protocol::MAX_ID_LEN;
/// Largest `X-Kycd-Signature` header accepted.
pub const MAX_SIGNATURE_BYTES: usize = 8 * 1024;
/// Seconds in a window are bounded (a window is normally 60 s; merged ones can be long,
/// but not longer than ten years).
pub const MAX_WINDOW_S: i64 = 10 * 365 * 24 * 3600;
/// Default of [`Limits::max_clock_skew_s`]: how far after the receive time a window may end.
/// Agents close a window at its end and send it after that, so only a clock running ahead
/// of the collector's makes a window end in the future; NTP keeps hosts within
/// milliseconds, and 5 minutes leaves room for a badly synchronised one without letting a
/// window claim a time that has not come (year 2500, `i64::MAX`).
pub const DEFAULT_MAX_CLOCK_SKEW_S: i64 = 300;
/// Default of [`Limits::max_pre_enrollment_s`]: how long before its epoch's enrollment a
/// window may start. An agent measures and spools from its first start, and the operator
/// enrolls its key afterwards (`kycctl host-key --public` needs the key the agent created;
/// a re-imaged host runs before it is re-enrolled); its spooled windows are legitimate. A
/// week covers an enrollment done days later; earlier starts (1970, a year before the key
/// existed) are refused.
pub const DEFAULT_MAX_PRE_ENROLLMENT_S: i64 = 7 * 24 * 3600;
/// Largest peak FLOP/s a window may claim per GPU (`gpus`, or `max_concurrent_gpus` if
/// larger): 1e17 = 100 PFLOP/s, about 20 times the fastest GPU in the agent's peak table
/// at FP8 dense (B200, 4.5e15; the agent reports BF16 dense, 2.25e15) and above any shipping
/// GPU at any precision, sparse FP4 included. Without an absolute cap the ops bound below
/// would follow whatever `peak_flops` a host claims, 1e308 included.
pub const MAX_PEAK_FLOPS_PER_GPU: f64 = 1e17;
/// Tolerance of the rate bounds: `estimated_ops` and `ops_upper` ≤ `peak_flops × (duration ×
/// 1.05 + 2 s) ×` [`MAX_OPS_PER_PEAK`], and `gpu_seconds ≤ gpus × (duration × 1.05 + 2 s)`.
/// Per tick the agent counts at most the peak of each pipe over `dt`, so a window cannot
/// exceed that summed over its ticks; the ticks of a window can begin up to one tick (≤ 2 s,
/// two intervals at the default 1 s sampling) before its start, which [`TICK_SLACK_S`]
/// covers for a short (flushed) window and 5 % covers per window in merged ones (≤ 2 s per
/// 60 s window is 3.3 %), with room for float rounding.
pub const RATE_TOLERANCE: f64 = 1.05;
/// Seconds added to a window's length in the rate bounds (see [`RATE_TOLERANCE`]).
pub const TICK_SLACK_S: f64 = 2.0;
/// Relative tolerance of the comparisons between figures the agent sums separately over the
/// same ticks (`ops_lower ≤ estimated_ops ≤ ops_upper`, `shared_gpu_seconds ≤ gpu_seconds`,
/// `guest_gap_gpu_seconds ≤ gpu_seconds`):
/// each tick's figures are in order, but sums taken in another order, or merged from several
/// windows in the spool, can differ by a few ulps per term. One part per million is far above
/// that rounding and far below anything that changes a finding.
pub const SUM_TOLERANCE: f64 = 1e-6;

/// `a ≤ b` within [`SUM_TOLERANCE`] of `b`.
fn at_most(a: f64, b: f64) -> bool {
    a <= b + b.abs() * SUM_TOLERANCE
}

/// Size and time limits of one upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest compressed request body.
    pub max_body_bytes: usize,
    /// Largest decompressed body (the zip-bomb guard).
    pub max_decompressed_bytes: usize,
    /// Most records in one batch.
    pub max_records: usize,
    /// A window may end at most this many seconds after the receive time
    /// ([`DEFAULT_MAX_CLOCK_SKEW_S`]).
    pub max_clock_skew_s: i64,
    /// A window may start at most this many seconds before its epoch's enrollment
    /// ([`DEFAULT_MAX_PRE_ENROLLMENT_S`]).
    pub max_pre_enrollment_s: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_decompressed_bytes: 16 << 20,
            max_records: 10_000,
            max_clock_skew_s: DEFAULT_MAX_CLOCK_SKEW_S,
            max_pre_enrollment_s: DEFAULT_MAX_PRE_ENROLLMENT_S,
        }
    }
}

/// How far past [`Limits::max_clock_skew_s`] a window may end and still be answered "retry
/// later" (503, [`IngestError::ClockAhead`]) rather than refused for good: a host whose clock
/// runs fast by minutes or hours keeps its windows in its spool and delivers them once the
/// collector's clock has caught up. Further ahead than a day (year 2500, `i64::MAX`) is not a
/// clock error but a bad value, refused with 400.
pub const MAX_CLOCK_AHEAD_RETRY_S: i64 = 24 * 3600;

/// When a batch arrives and for which enrollment: what its windows' times are checked
/// against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The receive time (Unix seconds, the collector's clock).
    pub received_at: i64,
    /// When the epoch of the key that signed the batch began ([`Enrollment::enrolled_at`]).
    pub enrolled_at: i64,
}

fn check_id(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!("longer than {MAX_ID_LEN} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    Ok(())
}

fn check_amount(field: &'static str, value: f64) -> Result<(), WindowError> {
    if !value.is_finite() || value < 0.0 {
        return Err(WindowError::NotAnAmount { field });
    }
    Ok(())
}

/// Checks one window's fields and bounds (see the module docs).
pub fn check_window(w: &UsageWindow, limits: &Limits, admission: Admission) -> Result<(), WindowError> {
    check_id(&w.workload).map_err(|reason| WindowError::Id { field: "workload", reason })?;
    if let Some(tenant) = &w.tenant {
        check_id(tenant).map_err(|reason| WindowError::Id { field: "tenant", reason })?;
    }
    if w.start < 0 {
        return Err(WindowError::NegativeStart);
    }
    if w.end <= w.start {
        return Err(WindowError::EndNotAfterStart);
    }
    if w.end - w.start > MAX_WINDOW_S {
        return Err(WindowError::TooLong { max_s: MAX_WINDOW_S });
    }
    let latest_end = admission.received_at.saturating_add(limits.max_clock_skew_s);
    if w.end > latest_end {
        return Err(WindowError::EndAhead {
            end: w.end,
            skew_s: limits.max_clock_skew_s,
            received_at: admission.received_at,
        });
    }
    let earliest_start = admission.enrolled_at.saturating_sub(limits.max_pre_enrollment_s);
    if w.start < earliest_start {
        return Err(WindowError::StartBeforeEnrollment {
            start: w.start,
            allowed_s: limits.max_pre_enrollment_s,
            enrolled_at: admission.enrolled_at,
        });
    }
    check_amount("gpu_seconds", w.gpu_seconds)?;
    check_amount("estimated_ops", w.estimated_ops)?;
    // Absent bounds (an agent before 0.17) are the estimate, checked just above.
    if let Some(lower) = w.ops_lower {
        check_amount("ops_lower", lower)?;
    }
    if let Some(upper) = w.ops_upper {
        check_amount("ops_upper", upper)?;
    }
    check_amount("shared_gpu_seconds", w.shared_gpu_seconds)?;
    check_amount("guest_gap_gpu_seconds", w.guest_gap_gpu_seconds)?;
    check_amount("peak_flops", w.peak_flops)?;
    if w.merged_windows == 0 {
        return Err(WindowError::NoMergedWindows);
    }
    let gpus = f64::from(w.gpus.max(w.max_concurrent_gpus));
    let max_peak = gpus * MAX_PEAK_FLOPS_PER_GPU;
    if w.peak_flops > max_peak {
        return Err(WindowError::PeakTooHigh {
            peak_flops: w.peak_flops,
            per_gpu: MAX_PEAK_FLOPS_PER_GPU,
            gpus,
        });
    }
    let (lower, upper) = (w.lower_ops(), w.upper_ops());
    if !at_most(lower, w.estimated_ops) || !at_most(w.estimated_ops, upper) {
        return Err(WindowError::BoundsOutOfOrder {
            ops_lower: lower,
            estimated_ops: w.estimated_ops,
            ops_upper: upper,
        });
    }
    // Whole seconds of a window of at most MAX_WINDOW_S: exact in an f64.
    let duration_s = w.end - w.start;
    let seconds = duration_s as f64 * RATE_TOLERANCE + TICK_SLACK_S;
    // `peak_flops` is the summed dense BF16 tensor peak of the window's GPUs, but neither
    // figure is bounded by 1× of it any more: the upper bound counts each pipe at its fastest
    // precision (FP8 on Hopper's HMMA, FP4 on Blackwell's: up to 4× BF16; INT8 on IMMA), and
    // the point estimate (`gpm_pipes`) counts the CUDA-core and FP64 pipes beside HMMA. The
    // protocol's MAX_OPS_PER_PEAK is the most all of them together reach at full activity on
    // any GPU in the agent's peak table; with the cap on `peak_flops` per GPU above, a host
    // still cannot claim unbounded operations.
    let max_ops = w.peak_flops * seconds * MAX_OPS_PER_PEAK;
    for (field, ops) in [("estimated_ops", w.estimated_ops), ("ops_upper", upper)] {
        if ops > max_ops {
            return Err(WindowError::OpsAbovePeak {
                field,
                ops,
                peak_flops: w.peak_flops,
                duration_s,
                tolerance: RATE_TOLERANCE,
                slack_s: TICK_SLACK_S,
                per_peak: MAX_OPS_PER_PEAK,
                max_ops,
            });
        }
    }
    let max_gpu_seconds = gpus * seconds;
    if w.gpu_seconds > max_gpu_seconds {
        return Err(WindowError::GpuSecondsAboveDuration {
            gpu_seconds: w.gpu_seconds,
            gpus,
            duration_s,
            tolerance: RATE_TOLERANCE,
            slack_s: TICK_SLACK_S,
            max: max_gpu_seconds,
        });
    }
    // Shared seconds are some of the window's GPU-seconds, summed over the same ticks.
    if !at_most(w.shared_gpu_seconds, w.gpu_seconds) {
        return Err(WindowError::SharedAboveGpuSeconds {
            shared_gpu_seconds: w.shared_gpu_seconds,
            gpu_seconds: w.gpu_seconds,
        });
    }
    // So are the seconds a VM held passed-through GPUs with its guest silent. Nothing else is
    // method-specific: like `allocation` (point and lower bound 0, upper the allocation),
    // `guest_reported` is held to the rules of every window (`ops_lower ≤ estimated_ops ≤
    // ops_upper ≤ peak × length × MAX_OPS_PER_PEAK`); the guest's figures are the tenant's
    // own, and the host has already capped them at the allocation it reports as `ops_upper`.
    if !at_most(w.guest_gap_gpu_seconds, w.gpu_seconds) {
        return Err(WindowError::GuestGapAboveGpuSeconds {
            guest_gap_gpu_seconds: w.guest_gap_gpu_seconds,
            gpu_seconds: w.gpu_seconds,
        });
    }
    check_foreign_status(w)
}

/// The three-valued status agrees with the rest of the window: a tenant's `foreign_status`
/// (when sent) names the same side as `foreign_person` or is `unknown`; a window without a
/// tenant is `unknown` (stored as foreign: unknown counts as foreign for findings).
fn check_foreign_status(w: &UsageWindow) -> Result<(), WindowError> {
    use kycd_protocol::ForeignStatus;
    let contradiction = |status, what| Err(WindowError::ForeignStatusContradiction { status, what });
    match (w.tenant.is_some(), w.foreign_status, w.foreign_person) {
        (true, Some(ForeignStatus::Us), true) => contradiction("us", "foreign_person true"),
        (true, Some(ForeignStatus::Foreign), false) => contradiction("foreign", "foreign_person false"),
        (false, Some(ForeignStatus::Us), _) => contradiction("us", "a window without a tenant"),
        (false, Some(ForeignStatus::Foreign), _) => contradiction("foreign", "a window without a tenant"),
        _ => Ok(()),
    }
}

/// Validates one record after `previous_last` (the last seq of the record before it, 0 for
/// the first); returns its last seq.
fn check_record(
    record: &UsageRecord,
    previous_last: u64,
    limits: &Limits,
    admission: Admission,
) -> Result<u64, String> {
    let max = u64::try_from(i64::MAX).unwrap_or(u64::MAX);
    if record.seq == 0 {
        return Err("seq must be >= 1".into());
    }
    let last = record.last_seq.unwrap_or(record.seq);
    if last < record.seq {
        return Err("last_seq must be >= seq".into());
    }
    if last > max {
        return Err(format!("seq must be <= {max}"));
    }
    if record.seq <= previous_last {
        return Err(format!(
            "records must be in increasing, non-overlapping seq order (previous ends at {previous_last})"
        ));
    }
    check_window(&record.window, limits, admission).map_err(|e| e.to_string())?;
    Ok(last)
}

/// Validates a parsed batch received as `admission` says, turning it into records ready to
/// store.
pub fn validate_batch(
    batch: ReportBatch,
    limits: &Limits,
    admission: Admission,
) -> Result<Vec<ValidRecord>, IngestError> {
    if batch.records.len() > limits.max_records {
        return Err(IngestError::TooLarge { what: "record count", limit: limits.max_records });
    }
    // A clock running ahead is answered "later", before any other check can refuse the batch
    // for good; windows further ahead than a day fall through to the permanent refusal.
    let latest_end = admission.received_at.saturating_add(limits.max_clock_skew_s);
    for (index, record) in batch.records.iter().enumerate() {
        let ahead = record.window.end.saturating_sub(latest_end);
        if ahead > 0 && ahead <= MAX_CLOCK_AHEAD_RETRY_S {
            return Err(IngestError::ClockAhead { index, seq: record.seq, end: record.window.end, ahead });
        }
    }
    let mut previous_last = 0;
    let mut out = Vec::with_capacity(batch.records.len());
    for (index, record) in batch.records.into_iter().enumerate() {
        let invalid = |reason| IngestError::InvalidRecord { index, seq: record.seq, reason };
        let last_seq = check_record(&record, previous_last, limits, admission).map_err(invalid)?;
        previous_last = last_seq;
        let body_json = serde_json::to_string(&record).map_err(|e| IngestError::InvalidRecord {
            index,
            seq: record.seq,
            reason: e.to_string(),
        })?;
        out.push(ValidRecord { record, last_seq, body_json });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kycd_protocol::EstimationMethod;

    fn window() -> UsageWindow {
        UsageWindow {
            tenant: Some("t".into()),
            workload: "host:h".into(),
            foreign_person: false,
            foreign_status: None,
            start: 60,
            end: 120,
            gpu_seconds: 60.0,
            gpus: 1,
            max_concurrent_gpus: 1,
            estimated_ops: 1.0,
            ops_lower: None,
            ops_upper: None,
            shared_gpu_seconds: 0.0,
            guest_gap_gpu_seconds: 0.0,
            peak_flops: 1.0e15,
            method: EstimationMethod::Unknown,
            training_like: false,
            merged_windows: 1,
        }
    }

    /// Received at 1000, enrolled at 0: windows may end up to 1300 and start from -604800.
    const AT: Admission = Admission { received_at: 1000, enrolled_at: 0 };

    fn check(record: &UsageRecord, previous_last: u64) -> Result<u64, String> {
        check_record(record, previous_last, &Limits::default(), AT)
    }

    #[test]
    fn record_rules() {
        let ok = UsageRecord { seq: 1, last_seq: None, window: window() };
        assert_eq!(check(&ok, 0), Ok(1));
        assert!(check(&ok, 1).is_err(), "not increasing");
        assert!(check(&UsageRecord { seq: 0, ..ok.clone() }, 0).is_err());
        assert!(check(&UsageRecord { seq: 5, last_seq: Some(4), ..ok.clone() }, 0).is_err());
        assert_eq!(check(&UsageRecord { seq: 5, last_seq: Some(9), ..ok.clone() }, 4), Ok(9));
        assert!(check(&UsageRecord { seq: u64::MAX, ..ok.clone() }, 0).is_err());
        let bad = |f: fn(&mut UsageWindow)| {
            let mut w = window();
            f(&mut w);
            check(&UsageRecord { seq: 1, last_seq: None, window: w }, 0).is_err()
        };
        assert!(bad(|w| w.end = w.start));
        assert!(bad(|w| w.start = -1));
        assert!(bad(|w| w.gpu_seconds = f64::NAN));
        assert!(bad(|w| w.estimated_ops = -1.0));
        assert!(bad(|w| w.peak_flops = f64::INFINITY));
        assert!(bad(|w| w.workload.clear()));
        assert!(bad(|w| w.workload = "x".repeat(MAX_ID_LEN + 1)));
        assert!(bad(|w| w.tenant = Some(String::new())));
        assert!(bad(|w| w.merged_windows = 0));
    }

    /// The message of the first rule `f` breaks.
    fn refusal(f: impl FnOnce(&mut UsageWindow)) -> String {
        let mut w = window();
        f(&mut w);
        check_window(&w, &Limits::default(), AT).expect_err("refused").to_string()
    }

    /// The three-valued status: contradictions refused, `unknown` stored as foreign.
    #[test]
    fn foreign_status_must_agree_and_unknown_counts_as_foreign() {
        use kycd_protocol::ForeignStatus;
        let status = |tenant: bool, status: Option<ForeignStatus>, flag: bool| {
            let mut w = window();
            if !tenant {
                w.tenant = None;
            }
            (w.foreign_status, w.foreign_person) = (status, flag);
            (
                check_window(&w, &Limits::default(), AT).map_err(|e| e.to_string()),
                w.tenant_counts_as_foreign(),
            )
        };
        assert_eq!(status(true, Some(ForeignStatus::Unknown), false), (Ok(()), true));
        assert_eq!(status(true, Some(ForeignStatus::Us), false), (Ok(()), false));
        assert_eq!(status(true, None, true), (Ok(()), true), "old agent: the flag decides");
        assert_eq!(
            status(true, Some(ForeignStatus::Us), true).0,
            Err("foreign_status us contradicts foreign_person true".to_owned())
        );
        assert!(status(true, Some(ForeignStatus::Foreign), false).0.is_err());
        assert!(status(false, Some(ForeignStatus::Foreign), true).0.is_err());
        assert_eq!(status(false, Some(ForeignStatus::Unknown), false), (Ok(()), false));
    }

    /// The typed refusal of the first rule `f` breaks.
    fn refused(f: impl FnOnce(&mut UsageWindow)) -> WindowError {
        let mut w = window();
        f(&mut w);
        check_window(&w, &Limits::default(), AT).expect_err("refused")
    }

    /// Issue 15 item 6: every number of a window is bounded, and the message names the field.
    #[test]
    fn window_values_are_bounded() {
        // Times: no later than the receive time + skew, no earlier than enrollment - a week.
        assert!(
            check_window(&UsageWindow { start: 1240, end: 1300, ..window() }, &Limits::default(), AT).is_ok()
        );
        assert!(refusal(|w| (w.start, w.end) = (1241, 1301)).starts_with("end 1301 is more than 300 s after"));
        for end in [16_725_225_600, i64::MAX] {
            // Year 2500 and the largest time.
            assert!(refusal(|w| (w.start, w.end) = (end - 60, end)).starts_with(&format!("end {end} ")));
        }
        let enrolled = Admission { received_at: 10_000_000, enrolled_at: 5_000_000 };
        let at = |start: i64| {
            check_window(&UsageWindow { start, end: start + 60, ..window() }, &Limits::default(), enrolled)
        };
        assert!(at(5_000_000 - DEFAULT_MAX_PRE_ENROLLMENT_S).is_ok(), "spooled before enrollment");
        let e = at(5_000_000 - DEFAULT_MAX_PRE_ENROLLMENT_S - 1).unwrap_err().to_string();
        assert!(e.starts_with("start 4395199 is more than 604800 s before the host's enrollment"), "{e}");
        // Amounts: finite and not negative.
        for (field, f) in [
            ("gpu_seconds", (|w| w.gpu_seconds = f64::INFINITY) as fn(&mut UsageWindow)),
            ("gpu_seconds", |w| w.gpu_seconds = -1.0),
            ("estimated_ops", |w| w.estimated_ops = f64::NAN),
            ("estimated_ops", |w| w.estimated_ops = -1.0),
            ("peak_flops", |w| w.peak_flops = f64::INFINITY),
            ("peak_flops", |w| w.peak_flops = -0.5),
        ] {
            assert!(refusal(f).starts_with(field), "{field}");
        }
        // estimated_ops = 1e308 with a plausible peak; and with a peak claiming as much.
        let e = refusal(|w| w.estimated_ops = 1e308);
        assert!(e.starts_with("estimated_ops 1e308 exceeds peak_flops × duration"), "{e}");
        let e = refusal(|w| (w.estimated_ops, w.peak_flops) = (1e308, 1e307));
        assert!(e.starts_with("peak_flops 1e307 exceeds 1e17 FLOP/s per GPU for 1 GPUs"), "{e}");
        // The rate bounds, at their edges: 60 s × 1.05 + 2 s = 65 s of each GPU; of peak, × 5
        // (MAX_OPS_PER_PEAK).
        let fits = |w: UsageWindow| check_window(&w, &Limits::default(), AT);
        let w = UsageWindow { peak_flops: 1e15, gpus: 2, max_concurrent_gpus: 2, ..window() };
        assert!(fits(UsageWindow { estimated_ops: 325e15, gpu_seconds: 130.0, ..w.clone() }).is_ok());
        assert!(refusal(|x| {
            *x = UsageWindow { estimated_ops: 325.1e15, ..w.clone() };
        })
        .starts_with("estimated_ops "));
        assert!(refusal(|x| {
            *x = UsageWindow { gpu_seconds: 130.1, ..w.clone() };
        })
        .starts_with("gpu_seconds 130.1 exceeds gpus × duration"));
        assert!(fits(UsageWindow { peak_flops: 2e17, ..w.clone() }).is_ok(), "1e17 per GPU, 2 GPUs");
        assert!(refusal(|x| *x = UsageWindow { peak_flops: 2.1e17, ..w.clone() }).starts_with("peak_flops "));
        // Old records without max_concurrent_gpus, and no peak known (method unknown): no ops.
        assert!(fits(UsageWindow {
            max_concurrent_gpus: 0,
            estimated_ops: 0.0,
            ops_lower: None,
            ops_upper: None,
            shared_gpu_seconds: 0.0,
            guest_gap_gpu_seconds: 0.0,
            peak_flops: 0.0,
            ..w.clone()
        })
        .is_ok());
        assert!(refusal(|x| *x = UsageWindow { estimated_ops: 1.0, peak_flops: 0.0, ..w.clone() })
            .starts_with("estimated_ops "));
        // A merged record (the spool near its cap): 30 windows of one workload folded, peak and
        // GPUs the max, ops and GPU-seconds summed, start the min, end the max.
        let merged = UsageRecord {
            seq: 10,
            last_seq: Some(39),
            window: UsageWindow {
                start: 0,
                end: 1800,
                gpus: 8,
                max_concurrent_gpus: 8,
                gpu_seconds: 30.0 * 8.0 * 61.0,
                peak_flops: 8.0 * 989.4e12,
                estimated_ops: 30.0 * 0.9 * 8.0 * 989.4e12 * 61.0,
                ops_lower: None,
                ops_upper: None,
                shared_gpu_seconds: 0.0,
                guest_gap_gpu_seconds: 0.0,
                merged_windows: 30,
                ..window()
            },
        };
        let later = Admission { received_at: 2000, enrolled_at: 0 };
        assert_eq!(check_record(&merged, 9, &Limits::default(), later), Ok(39));
    }

    fn bounded(lower: Option<f64>, point: f64, upper: Option<f64>) -> impl FnOnce(&mut UsageWindow) {
        move |w| {
            (w.ops_lower, w.estimated_ops, w.ops_upper) = (lower, point, upper);
            w.peak_flops = 1e15;
        }
    }

    /// Issue 17: the bounds are amounts like the estimate.
    #[test]
    fn bounds_must_be_finite_amounts() {
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(
                refused(bounded(Some(bad), 1.0, None)),
                WindowError::NotAnAmount { field: "ops_lower" }
            );
            assert_eq!(
                refused(bounded(None, 1.0, Some(bad))),
                WindowError::NotAnAmount { field: "ops_upper" }
            );
            assert_eq!(
                refused(|w| w.shared_gpu_seconds = bad),
                WindowError::NotAnAmount { field: "shared_gpu_seconds" }
            );
            assert_eq!(
                refused(|w| w.guest_gap_gpu_seconds = bad),
                WindowError::NotAnAmount { field: "guest_gap_gpu_seconds" }
            );
        }
        assert_eq!(refusal(bounded(Some(-1.0), 1.0, None)), "ops_lower must be a finite number >= 0");
    }

    /// Issue 17: `ops_lower ≤ estimated_ops ≤ ops_upper`, up to float rounding; an absent
    /// bound is the estimate.
    #[test]
    fn bounds_must_enclose_the_estimate() {
        let fits = |f: fn(&mut UsageWindow)| {
            let mut w = window();
            f(&mut w);
            check_window(&w, &Limits::default(), AT)
        };
        assert!(fits(|w| bounded(Some(0.0), 1e16, Some(4e16))(w)).is_ok());
        assert!(fits(|w| bounded(Some(1e16), 1e16, Some(1e16))(w)).is_ok(), "all three equal");
        // Rounding of separately summed figures: a few ulps out of order is accepted.
        assert!(fits(|w| bounded(Some(1e16 * (1.0 + 1e-12)), 1e16, Some(1e16 * (1.0 - 1e-12)))(w)).is_ok());
        let e = refused(bounded(Some(2e16), 1e16, None));
        assert_eq!(
            e,
            WindowError::BoundsOutOfOrder { ops_lower: 2e16, estimated_ops: 1e16, ops_upper: 1e16 }
        );
        assert_eq!(e.to_string(), "ops_lower 2e16 <= estimated_ops 1e16 <= ops_upper 1e16 does not hold");
        assert!(matches!(
            refused(bounded(None, 1e16, Some(0.5e16))),
            WindowError::BoundsOutOfOrder { ops_upper, .. } if ops_upper == 0.5e16
        ));
        // 1 % out of order is not rounding.
        assert!(matches!(refused(bounded(Some(1.01e16), 1e16, None)), WindowError::BoundsOutOfOrder { .. }));
    }

    /// Issue 17: the point and the upper figure are bounded by `peak × length ×
    /// MAX_OPS_PER_PEAK` (60 s × 1.05 + 2 s = 65 s here), not by 1× the BF16 peak.
    #[test]
    fn ops_are_bounded_by_max_ops_per_peak() {
        let max = 1e15 * 65.0 * MAX_OPS_PER_PEAK;
        let w = |lower, point, upper| {
            let mut w = window();
            bounded(lower, point, upper)(&mut w);
            check_window(&w, &Limits::default(), AT)
        };
        // An FP8/FP4 upper bound above the BF16 peak is legitimate; so is a point estimate
        // that counts CUDA-core pipes beside HMMA.
        assert!(w(Some(0.0), 1e15 * 65.0 * 1.5, Some(max)).is_ok());
        match w(Some(0.0), 1e15, Some(max * 1.001)) {
            Err(WindowError::OpsAbovePeak { field: "ops_upper", max_ops, .. }) => assert_eq!(max_ops, max),
            other => panic!("{other:?}"),
        }
        let e = w(None, max * 1.001, None).unwrap_err();
        assert!(matches!(e, WindowError::OpsAbovePeak { field: "estimated_ops", .. }), "{e:?}");
        assert!(e.to_string().starts_with("estimated_ops 3.2532"), "{e}");
        assert!(e.to_string().contains("× 5 = 3.25e17"), "{e}");
    }

    /// Issue 17: shared GPU-seconds are some of the window's GPU-seconds.
    #[test]
    fn shared_gpu_seconds_are_at_most_gpu_seconds() {
        let fits = |shared: f64| {
            check_window(&UsageWindow { shared_gpu_seconds: shared, ..window() }, &Limits::default(), AT)
        };
        assert!(fits(60.0).is_ok());
        assert!(fits(60.0 * (1.0 + 1e-9)).is_ok(), "rounding");
        assert_eq!(
            fits(61.0),
            Err(WindowError::SharedAboveGpuSeconds { shared_gpu_seconds: 61.0, gpu_seconds: 60.0 })
        );
        assert_eq!(fits(61.0).unwrap_err().to_string(), "shared_gpu_seconds 61 exceeds gpu_seconds 60");
    }

    /// Issue 18: GPU-seconds a VM held with its guest silent are some of the window's
    /// GPU-seconds.
    #[test]
    fn guest_gap_gpu_seconds_are_at_most_gpu_seconds() {
        let fits = |gap: f64| {
            check_window(&UsageWindow { guest_gap_gpu_seconds: gap, ..window() }, &Limits::default(), AT)
        };
        assert!(fits(0.0).is_ok());
        assert!(fits(60.0).is_ok(), "silent for the whole window");
        assert!(fits(60.0 * (1.0 + 1e-9)).is_ok(), "rounding");
        assert_eq!(
            fits(61.0),
            Err(WindowError::GuestGapAboveGpuSeconds { guest_gap_gpu_seconds: 61.0, gpu_seconds: 60.0 })
        );
        assert_eq!(fits(61.0).unwrap_err().to_string(), "guest_gap_gpu_seconds 61 exceeds gpu_seconds 60");
        assert_eq!(
            refusal(|w| w.guest_gap_gpu_seconds = f64::NAN),
            "guest_gap_gpu_seconds must be a finite number >= 0"
        );
    }

    /// Issue 18: `guest_reported` is accepted under the rules of every window: the guest's
    /// point estimate and lower bound between 0 and the allocation upper bound; a point
    /// estimate above the upper bound is refused as for any method.
    #[test]
    fn guest_reported_windows_keep_their_bounds_in_order() {
        let guest = |lower, point, upper| {
            let mut w = UsageWindow { method: EstimationMethod::GuestReported, ..window() };
            bounded(lower, point, upper)(&mut w);
            check_window(&w, &Limits::default(), AT)
        };
        assert!(guest(Some(1e16), 2e16, Some(4e16)).is_ok());
        assert!(guest(Some(4e16), 4e16, Some(4e16)).is_ok(), "a guest at the cap");
        assert!(matches!(guest(Some(0.0), 5e16, Some(4e16)), Err(WindowError::BoundsOutOfOrder { .. })));
        let gap_and_guest = UsageWindow {
            method: EstimationMethod::GuestReported,
            guest_gap_gpu_seconds: 30.0,
            ops_lower: Some(0.0),
            ops_upper: Some(6e16),
            ..window()
        };
        assert!(check_window(&gap_and_guest, &Limits::default(), AT).is_ok());
        // The wire name, and the ingest path's canonical JSON keeps the gap.
        let record = UsageRecord { seq: 1, last_seq: None, window: gap_and_guest };
        let batch = ReportBatch { host_id: "h".into(), sent_at: 1000, records: vec![record] };
        let valid = validate_batch(batch, &Limits::default(), AT).unwrap();
        assert!(valid[0].body_json.contains(r#""method":"guest_reported""#), "{}", valid[0].body_json);
        assert!(valid[0].body_json.contains(r#""guest_gap_gpu_seconds":30.0"#), "{}", valid[0].body_json);
    }

    /// Issue 17: an old agent's window, without bounds or shared seconds, is accepted as
    /// before, and its canonical JSON still has no bounds (so its resends stay identical).
    #[test]
    fn an_old_agents_window_without_bounds_is_accepted() {
        let old: UsageRecord = serde_json::from_value(serde_json::json!({
            "seq": 1, "window": {"tenant": "t", "workload": "host:h", "start": 60, "end": 120,
            "gpu_seconds": 480.0, "gpus": 8, "estimated_ops": 4e17, "peak_flops": 7.9e15,
            "method": "gpm_tensor"}
        }))
        .unwrap();
        assert_eq!(
            (old.window.ops_lower, old.window.ops_upper, old.window.shared_gpu_seconds),
            (None, None, 0.0)
        );
        assert_eq!(old.window.guest_gap_gpu_seconds, 0.0);
        let batch = ReportBatch { host_id: "h".into(), sent_at: 1000, records: vec![old] };
        let valid = validate_batch(batch, &Limits::default(), AT).unwrap();
        assert_eq!((valid[0].record.window.lower_ops(), valid[0].record.window.upper_ops()), (4e17, 4e17));
        assert!(
            !valid[0].body_json.contains("ops_lower")
                && !valid[0].body_json.contains("shared")
                && !valid[0].body_json.contains("guest_gap"),
            "{}",
            valid[0].body_json
        );
    }
}
