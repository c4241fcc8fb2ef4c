//! Usage aggregated across hosts and windows: [`UsageAccumulator`] streams every stored window
//! ([`WindowRow`]) into [`TenantUsage`] totals per tenant, and the windows no tenant is known
//! for (a workload without a valid attestation, run under the policy's `unverified: allow` or
//! `grace`) into [`UnattributedUsage`] per (host, workload) — the one definition both storage
//! backends use (the rules are in the parent module's docs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::clusters::{cluster_peaks, ClusterUsage, Placement};
use super::runs::{Activity, Run, RunWindow};

/// Width of a concurrency bucket, seconds (the agents' window length).
pub const CAPACITY_BUCKET_S: i64 = 60;

/// `total + value`, saturating at `f64::MAX` (+inf included); a `value` that is NaN or
/// negative (never stored by ingest) adds nothing. The result is always a finite number ≥ 0
/// when `total` is.
pub fn saturating_sum(total: f64, value: f64) -> f64 {
    if value.is_nan() || value <= 0.0 {
        return total;
    }
    (total + value).min(f64::MAX)
}

/// `value` as a finite number ≥ 0 (`f64::MAX` for +inf, 0 for NaN and below 0), for totals
/// read back or computed elsewhere before they are rendered.
pub fn finite(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, f64::MAX)
    }
}

/// One tenant's usage, aggregated over every host and window stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// Tenant id (the attestation `sub`).
    pub tenant: String,
    /// Cumulative lower bound of operations (each pipe at its slowest precision; 0 for work
    /// on a shared GPU).
    pub ops_lower: f64,
    /// Cumulative estimated operations (the point estimate).
    pub estimated_ops: f64,
    /// Cumulative upper bound of operations (each pipe at its fastest precision; the whole
    /// device for work on a shared GPU).
    pub ops_upper: f64,
    /// Cumulative GPU-seconds.
    pub gpu_seconds: f64,
    /// Of them, GPU-seconds in which the tenant shared a GPU with another workload without
    /// isolation (its operations there could not be attributed to it alone).
    pub shared_gpu_seconds: f64,
    /// Hosts on which it did, by host id.
    pub shared_gpu_hosts: Vec<String>,
    /// Of the GPU-seconds, those in which a VM of the tenant held passed-through GPUs while
    /// its guest sent no telemetry: for them only the allocation is known (point estimate and
    /// lower bound 0, upper bound the GPUs' fastest peak × the time held).
    pub guest_gap_gpu_seconds: f64,
    /// Hosts on which it did, by host id.
    pub guest_gap_hosts: Vec<String>,
    /// The workloads (VMs) whose guest was silent, as `host/workload`, sorted.
    pub guest_gap_workloads: Vec<String>,
    /// Largest concurrent FLOP/s capacity in one minute, summed across hosts.
    pub peak_flops: f64,
    /// Start of the minute of that peak (Unix seconds).
    pub peak_at: i64,
    /// Hosts that reported usage of the tenant.
    pub hosts: u32,
    /// Their ids, sorted.
    #[serde(default)]
    pub host_ids: Vec<String>,
    /// GPUs involved: per host the most used at once, summed over hosts.
    pub gpus: u32,
    /// Windows stored.
    pub windows: u64,
    /// Estimated operations by estimation method (wire names).
    pub ops_by_method: BTreeMap<String, f64>,
    /// Start of the first window.
    pub first_seen: i64,
    /// End of the last window.
    pub last_seen: i64,
    /// Whether any window marks the tenant a foreign person.
    pub foreign_person: bool,
    /// Busy segments, for [`TenantUsage::runs`] (not serialized).
    #[serde(skip)]
    pub activity: Activity,
    /// Concurrent capacity per minute (minute start, FLOP/s), by time (not serialized): every
    /// minute when aggregated from windows; read from the roll-ups, each busy segment's peak
    /// minute only, all [`TenantUsage::runs`] needs.
    #[serde(skip)]
    pub capacity: Vec<(i64, f64)>,

    /// Concurrent capacity per co-located cluster (site and network fabric the hosts were
    /// placed in; unplaced hosts together as one), largest peak first, beside the fleet-wide
    /// `peak_flops`.
    #[serde(default)]
    pub clusters: Vec<ClusterUsage>,
}

impl TenantUsage {
    /// GPU-hours.
    pub fn gpu_hours(&self) -> f64 {
        self.gpu_seconds / 3600.0
    }

    /// The tenant's training runs: busy time with no pause longer than `gap_s` (see
    /// [`super::runs`]), each with its peak concurrent capacity; `now` tells which still run.
    pub fn runs(&self, gap_s: i64, now: i64) -> Vec<Run> {
        self.activity.runs(gap_s, now, |from, to| {
            // The minutes whose bucket starts within the run (its first window's minute on).
            let first = self
                .capacity
                .partition_point(|(at, _)| *at < from.div_euclid(CAPACITY_BUCKET_S) * CAPACITY_BUCKET_S);
            let last = self.capacity.partition_point(|(at, _)| *at < to);
            self.capacity[first..last.max(first)].iter().fold((0.0, from), |(peak, peak_at), (at, flops)| {
                if *flops > peak {
                    (*flops, *at)
                } else {
                    (peak, peak_at)
                }
            })
        })
    }
}

/// The usage of one workload on one host whose windows name no tenant (no valid attestation:
/// the policy's `unverified` path), aggregated by the tenants' rules. Nothing ties such a
/// workload to a customer across hosts, so it is kept per (host, workload); its foreign
/// status is unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnattributedUsage {
    /// Reporting host.
    pub host_id: String,
    /// The workload (cgroup or VM) as the agent names it.
    pub workload: String,
    /// Cumulative lower bound of operations.
    pub ops_lower: f64,
    /// Cumulative estimated operations (the point estimate).
    pub estimated_ops: f64,
    /// Cumulative upper bound of operations.
    pub ops_upper: f64,
    /// Cumulative GPU-seconds.
    pub gpu_seconds: f64,
    /// Of them, GPU-seconds on a GPU shared without isolation.
    pub shared_gpu_seconds: f64,
    /// Of them, GPU-seconds of a VM whose guest sent no telemetry.
    pub guest_gap_gpu_seconds: f64,
    /// Largest FLOP/s capacity in one minute (the tenants' per-minute bucket rule).
    pub peak_flops: f64,
    /// Start of the minute of that peak (Unix seconds).
    pub peak_at: i64,
    /// Most GPUs used at once.
    pub gpus: u32,
    /// Windows stored.
    pub windows: u64,
    /// Estimated operations by estimation method (wire names).
    pub ops_by_method: BTreeMap<String, f64>,
    /// Start of the first window.
    pub first_seen: i64,
    /// End of the last window.
    pub last_seen: i64,
}

impl UnattributedUsage {
    /// `host/workload`: the subject of its finding.
    pub fn subject(&self) -> String {
        format!("{}/{}", self.host_id, self.workload)
    }

    /// GPU-hours.
    pub fn gpu_hours(&self) -> f64 {
        self.gpu_seconds / 3600.0
    }

    pub(crate) fn from_usage(host_id: String, workload: String, u: TenantUsage) -> Self {
        UnattributedUsage {
            host_id,
            workload,
            ops_lower: u.ops_lower,
            estimated_ops: u.estimated_ops,
            ops_upper: u.ops_upper,
            gpu_seconds: u.gpu_seconds,
            shared_gpu_seconds: u.shared_gpu_seconds,
            guest_gap_gpu_seconds: u.guest_gap_gpu_seconds,
            peak_flops: u.peak_flops,
            peak_at: u.peak_at,
            gpus: u.gpus,
            windows: u.windows,
            ops_by_method: u.ops_by_method,
            first_seen: u.first_seen,
            last_seen: u.last_seen,
        }
    }
}

/// What one aggregation pass yields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetUsage {
    /// Per tenant, by tenant id.
    pub tenants: Vec<TenantUsage>,
    /// Windows without a tenant, per (host, workload), by host id then workload.
    pub unattributed: Vec<UnattributedUsage>,
}

/// Aggregates windows into [`TenantUsage`] (and [`UnattributedUsage`]) in one pass, in any
/// order: hash maps per tenant (totals, per-host GPU maxima, per-minute capacity sums), so a
/// backend streams its rows through [`UsageAccumulator::add`] instead of sorting them in
/// several GROUP BY passes. A window without a tenant goes through the same per-tenant code,
/// keyed by its (host, workload) instead. Memory grows with distinct (tenant, host) and
/// (tenant, minute) pairs (and the VMs whose guest was silent, and the unattributed
/// workloads' minutes), not with windows.
#[derive(Debug, Default)]
pub struct UsageAccumulator {
    hosts: std::collections::HashMap<String, u32>,
    /// Host ids by their index in `hosts`.
    host_ids: Vec<String>,
    /// Hosts' placements, by host id (hosts absent: unplaced).
    placements: std::collections::HashMap<String, Placement>,
    /// Each host's cluster (an index into `clusters`), by host index.
    host_cluster: Vec<u32>,
    /// The clusters seen: a placement, or none for the unplaced hosts.
    clusters: Vec<Option<Placement>>,
    tenants: std::collections::HashMap<String, TenantAccumulator>,
    /// Windows without a tenant: by host index, then workload.
    unattributed: std::collections::HashMap<u32, std::collections::HashMap<String, TenantAccumulator>>,
}

#[derive(Debug, Default)]
struct TenantAccumulator {
    usage: Option<TenantUsage>,
    /// Per host index: the most GPUs used at once, and the host's cluster index.
    host_gpus: std::collections::HashMap<u32, (u32, u32)>,
    capacity: std::collections::HashMap<i64, f64>,
    /// Hosts (indices) with GPU-seconds shared without isolation.
    shared_hosts: std::collections::BTreeSet<u32>,
    /// Workloads, by host index, whose guest was silent while holding GPUs.
    guest_gap_workloads: std::collections::BTreeSet<(u32, String)>,
    /// Capacity per (cluster index, minute); kept only when some host is placed (otherwise
    /// every host is in the one unplaced cluster, whose capacity is `capacity`).
    cluster_capacity: std::collections::HashMap<(u32, i64), f64>,
}

/// One window as [`UsageAccumulator::add`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct WindowRow<'a> {
    /// Tenant; `None` for a workload without a valid attestation (aggregated per host and
    /// workload, so `workload` must be given then).
    pub tenant: Option<&'a str>,
    /// Reporting host.
    pub host_id: &'a str,
    /// Start.
    pub start: i64,
    /// End.
    pub end: i64,
    /// GPU-seconds.
    pub gpu_seconds: f64,
    /// Most GPUs at once (max of `max_concurrent_gpus` and `gpus` for old records).
    pub gpus: u32,
    /// Lower bound of operations.
    pub ops_lower: f64,
    /// Estimated operations (point estimate).
    pub estimated_ops: f64,
    /// Upper bound of operations.
    pub ops_upper: f64,
    /// GPU-seconds shared without isolation.
    pub shared_gpu_seconds: f64,
    /// GPU-seconds a VM held passed-through GPUs while its guest sent no telemetry.
    pub guest_gap_gpu_seconds: f64,
    /// The window's workload. Only windows with `guest_gap_gpu_seconds > 0` or without a
    /// tenant need it (the backends read it only for them, so the aggregation scan does not
    /// carry every workload id); `None` otherwise.
    pub workload: Option<&'a str>,
    /// Peak FLOP/s capacity.
    pub peak_flops: f64,
    /// Estimation method (wire name).
    pub method: &'a str,
    /// Foreign person.
    pub foreign_person: bool,
}

impl UsageAccumulator {
    /// Adds one window.
    pub fn add(&mut self, w: &WindowRow<'_>) {
        let next_host = u32::try_from(self.hosts.len()).unwrap_or(u32::MAX);
        let host = match self.hosts.get(w.host_id) {
            Some(id) => *id,
            None => {
                self.hosts.insert(w.host_id.to_owned(), next_host);
                self.host_ids.push(w.host_id.to_owned());
                let placement = self.placements.get(w.host_id).cloned();
                let cluster = match self.clusters.iter().position(|c| *c == placement) {
                    Some(i) => i,
                    None => {
                        self.clusters.push(placement);
                        self.clusters.len() - 1
                    }
                };
                self.host_cluster.push(u32::try_from(cluster).unwrap_or(u32::MAX));
                next_host
            }
        };
        let t = match w.tenant {
            Some(tenant) => {
                if !self.tenants.contains_key(tenant) {
                    self.tenants.insert(tenant.to_owned(), TenantAccumulator::default());
                }
                self.tenants.get_mut(tenant)
            }
            None => {
                let workloads = self.unattributed.entry(host).or_default();
                let workload = w.workload.unwrap_or_default();
                if !workloads.contains_key(workload) {
                    workloads.insert(workload.to_owned(), TenantAccumulator::default());
                }
                workloads.get_mut(workload)
            }
        };
        let cluster = self.host_cluster.get(usize::try_from(host).unwrap_or(usize::MAX)).copied();
        // No placements: one cluster, whose capacity is the fleet-wide one (not kept twice).
        let cluster = cluster.map(|c| (c, !self.placements.is_empty()));
        if let (Some(t), Some(cluster)) = (t, cluster) {
            t.add(host, cluster, w);
        }
    }

    /// An accumulator that also sums capacity per co-located cluster of `placements` (host
    /// id → placement; hosts absent are unplaced).
    pub fn with_placements(placements: impl IntoIterator<Item = (String, Placement)>) -> Self {
        UsageAccumulator { placements: placements.into_iter().collect(), ..UsageAccumulator::default() }
    }

    /// The per-tenant usage, by tenant id (windows without a tenant are left out: see
    /// [`UsageAccumulator::finish_fleet`]).
    pub fn finish(self) -> Vec<TenantUsage> {
        self.finish_fleet().tenants
    }

    /// The per-tenant usage, by tenant id, and the usage without a tenant, by host id and
    /// workload.
    pub fn finish_fleet(self) -> FleetUsage {
        let host_ids = self.host_ids;
        let clusters = self.clusters;
        // One table of host names, shared by every tenant's runs.
        let names: std::sync::Arc<[std::sync::Arc<str>]> =
            host_ids.iter().map(|h| std::sync::Arc::from(h.as_str())).collect();
        let mut tenants: Vec<TenantUsage> = self
            .tenants
            .into_values()
            .filter_map(|t| t.finish(&host_ids, &clusters))
            .map(|mut usage| {
                usage.activity.name_hosts(std::sync::Arc::clone(&names));
                usage
            })
            .collect();
        tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let mut unattributed: Vec<UnattributedUsage> = self
            .unattributed
            .into_iter()
            .filter_map(|(host, workloads)| Some((host_ids.get(usize::try_from(host).ok()?)?, workloads)))
            .flat_map(|(host_id, workloads)| {
                workloads.into_iter().filter_map(|(workload, t)| {
                    let usage = t.finish(&host_ids, &clusters)?;
                    Some(UnattributedUsage::from_usage(host_id.clone(), workload, usage))
                })
            })
            .collect();
        unattributed.sort_by(|a, b| (&a.host_id, &a.workload).cmp(&(&b.host_id, &b.workload)));
        FleetUsage { tenants, unattributed }
    }
}

impl TenantAccumulator {
    /// Adds one window reported by host `host` (an index), in cluster `cluster` (an index;
    /// `by_cluster`: whether per-cluster capacity is kept).
    fn add(&mut self, host: u32, (cluster, by_cluster): (u32, bool), w: &WindowRow<'_>) {
        let t = self;
        let usage = t.usage.get_or_insert_with(|| TenantUsage {
            tenant: w.tenant.unwrap_or_default().to_owned(),
            ops_lower: 0.0,
            estimated_ops: 0.0,
            ops_upper: 0.0,
            gpu_seconds: 0.0,
            shared_gpu_seconds: 0.0,
            shared_gpu_hosts: Vec::new(),
            guest_gap_gpu_seconds: 0.0,
            guest_gap_hosts: Vec::new(),
            guest_gap_workloads: Vec::new(),
            peak_flops: 0.0,
            peak_at: 0,
            hosts: 0,
            host_ids: Vec::new(),
            gpus: 0,
            windows: 0,
            ops_by_method: BTreeMap::new(),
            first_seen: w.start,
            last_seen: w.end,
            foreign_person: false,
            activity: Activity::default(),
            capacity: Vec::new(),
            clusters: Vec::new(),
        });
        usage.ops_lower = saturating_sum(usage.ops_lower, w.ops_lower);
        usage.estimated_ops = saturating_sum(usage.estimated_ops, w.estimated_ops);
        usage.ops_upper = saturating_sum(usage.ops_upper, w.ops_upper);
        usage.gpu_seconds = saturating_sum(usage.gpu_seconds, w.gpu_seconds);
        usage.shared_gpu_seconds = saturating_sum(usage.shared_gpu_seconds, w.shared_gpu_seconds);
        if w.shared_gpu_seconds > 0.0 {
            t.shared_hosts.insert(host);
        }
        usage.guest_gap_gpu_seconds = saturating_sum(usage.guest_gap_gpu_seconds, w.guest_gap_gpu_seconds);
        if w.guest_gap_gpu_seconds > 0.0 {
            // A window without its workload still names its host (through the empty id).
            t.guest_gap_workloads.insert((host, w.workload.unwrap_or_default().to_owned()));
        }
        usage.windows = usage.windows.saturating_add(1);
        usage.first_seen = usage.first_seen.min(w.start);
        usage.last_seen = usage.last_seen.max(w.end);
        usage.foreign_person |= w.foreign_person;
        if w.estimated_ops > 0.0 {
            match usage.ops_by_method.get_mut(w.method) {
                Some(ops) => *ops = saturating_sum(*ops, w.estimated_ops),
                None => {
                    usage.ops_by_method.insert(w.method.to_owned(), saturating_sum(0.0, w.estimated_ops));
                }
            }
        }
        usage.activity.add(&RunWindow {
            host,
            start: w.start,
            end: w.end,
            ops_lower: w.ops_lower,
            estimated_ops: w.estimated_ops,
            ops_upper: w.ops_upper,
            gpu_seconds: w.gpu_seconds,
            method: w.method,
        });
        let gpus = t.host_gpus.entry(host).or_insert((0, cluster));
        gpus.0 = gpus.0.max(w.gpus);
        let share = (w.end.saturating_sub(w.start) as f64 / CAPACITY_BUCKET_S as f64).clamp(0.0, 1.0);
        let minute = w.start.div_euclid(CAPACITY_BUCKET_S);
        let bucket = t.capacity.entry(minute).or_insert(0.0);
        *bucket = saturating_sum(*bucket, w.peak_flops * share);
        if by_cluster {
            let bucket = t.cluster_capacity.entry((cluster, minute)).or_insert(0.0);
            *bucket = saturating_sum(*bucket, w.peak_flops * share);
        }
    }

    /// The totals, with host indices resolved through `host_ids` and cluster indices through
    /// `clusters`.
    fn finish(self, host_ids: &[String], clusters: &[Option<Placement>]) -> Option<TenantUsage> {
        let t = self;
        let mut usage = t.usage?;
        let host_id = |i: u32| host_ids.get(usize::try_from(i).ok()?).map(String::as_str);
        let mut shared: Vec<String> =
            t.shared_hosts.iter().filter_map(|i| host_id(*i).map(str::to_owned)).collect();
        shared.sort();
        usage.shared_gpu_hosts = shared;
        let mut gap_hosts = std::collections::BTreeSet::new();
        let mut gap_workloads = Vec::new();
        for (i, workload) in &t.guest_gap_workloads {
            let Some(host) = host_id(*i) else { continue };
            gap_hosts.insert(host.to_owned());
            if !workload.is_empty() {
                gap_workloads.push(format!("{host}/{workload}"));
            }
        }
        gap_workloads.sort();
        usage.guest_gap_hosts = gap_hosts.into_iter().collect();
        usage.guest_gap_workloads = gap_workloads;
        usage.hosts = u32::try_from(t.host_gpus.len()).unwrap_or(u32::MAX);
        let mut ids: Vec<String> =
            t.host_gpus.keys().filter_map(|i| host_id(*i).map(str::to_owned)).collect();
        ids.sort();
        usage.host_ids = ids;
        usage.gpus = t.host_gpus.values().fold(0u32, |a, g| a.saturating_add(g.0));
        // Earliest bucket among equal peaks, so the result does not depend on order.
        let mut capacity: Vec<(i64, f64)> =
            t.capacity.into_iter().map(|(bucket, flops)| (bucket * CAPACITY_BUCKET_S, flops)).collect();
        capacity.sort_by_key(|(at, _)| *at);
        for (at, flops) in &capacity {
            if *flops > usage.peak_flops {
                usage.peak_flops = *flops;
                usage.peak_at = *at;
            }
        }
        let host_clusters: Vec<u32> = t.host_gpus.values().map(|g| g.1).collect();
        let mut by_cluster = t.cluster_capacity;
        if by_cluster.is_empty() {
            // Every host in one cluster: its capacity is the fleet-wide one.
            let cluster = host_clusters.first().copied().unwrap_or(0);
            by_cluster =
                capacity.iter().map(|(at, f)| ((cluster, at.div_euclid(CAPACITY_BUCKET_S)), *f)).collect();
        }
        usage.capacity = capacity;
        usage.clusters = cluster_peaks(&by_cluster, &host_clusters, clusters);
        Some(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(tenant: &'a str, host: &'a str, start: i64, len: i64, flops: f64) -> WindowRow<'a> {
        WindowRow {
            tenant: Some(tenant),
            host_id: host,
            start,
            end: start + len,
            gpu_seconds: 8.0 * len as f64,
            gpus: 8,
            ops_lower: 0.5e15 * len as f64,
            estimated_ops: 1e15 * len as f64,
            ops_upper: 2e15 * len as f64,
            shared_gpu_seconds: 0.0,
            guest_gap_gpu_seconds: 0.0,
            workload: None,
            peak_flops: flops,
            method: "gpm_tensor",
            foreign_person: false,
        }
    }

    #[test]
    fn capacity_sums_hosts_per_minute_whatever_the_window_length() {
        let mut acc = UsageAccumulator::default();
        // Host a: one 60 s window per minute; host b: six 10 s windows in minute 1 only.
        for minute in 0..3 {
            acc.add(&row("t", "a", 6000 + 60 * minute, 60, 8e15));
        }
        for k in 0..6 {
            acc.add(&row("t", "b", 6060 + 10 * k, 10, 4e15));
        }
        acc.add(&row("u", "a", 6000, 60, 1e15));
        let usage = acc.finish();
        assert_eq!(usage.iter().map(|u| u.tenant.as_str()).collect::<Vec<_>>(), ["t", "u"]);
        let t = &usage[0];
        assert!((t.peak_flops / 12e15 - 1.0).abs() < 1e-9, "{t:?}");
        assert_eq!((t.peak_at, t.hosts, t.gpus, t.windows), (6060, 2, 16, 9));
        assert_eq!((t.first_seen, t.last_seen), (6000, 6180));
        assert!((t.estimated_ops - 1e15 * 240.0).abs() < 1.0);
        assert_eq!(t.ops_by_method.len(), 1);
    }

    #[test]
    fn three_figures_and_shared_gpu_seconds_sum_per_tenant() {
        let mut acc = UsageAccumulator::default();
        acc.add(&row("t", "a", 0, 60, 1e15));
        acc.add(&WindowRow { shared_gpu_seconds: 30.0, ..row("t", "b", 60, 60, 1e15) });
        acc.add(&WindowRow { shared_gpu_seconds: 5.0, ..row("t", "c", 120, 60, 1e15) });
        acc.add(&WindowRow { shared_gpu_seconds: 7.0, ..row("u", "a", 0, 60, 1e15) });
        let usage = acc.finish();
        let t = &usage[0];
        assert_eq!((t.ops_lower, t.estimated_ops, t.ops_upper), (0.5e15 * 180.0, 1e15 * 180.0, 2e15 * 180.0));
        assert_eq!(
            (t.shared_gpu_seconds, t.shared_gpu_hosts.as_slice()),
            (35.0, ["b".to_owned(), "c".to_owned()].as_slice())
        );
        assert_eq!(
            (usage[1].shared_gpu_seconds, usage[1].shared_gpu_hosts.as_slice()),
            (7.0, ["a".to_owned()].as_slice())
        );
    }

    #[test]
    fn guest_gap_seconds_hosts_and_workloads_sum_per_tenant() {
        let mut acc = UsageAccumulator::default();
        let gap = |host, workload, seconds: f64| WindowRow {
            guest_gap_gpu_seconds: seconds,
            workload: Some(workload),
            method: "allocation",
            ..row("t", host, 0, 60, 1e15)
        };
        acc.add(&row("t", "a", 0, 60, 1e15));
        acc.add(&gap("b", "vm:x", 60.0));
        acc.add(&gap("b", "vm:x", 30.0));
        acc.add(&gap("a", "vm:y", 10.0));
        acc.add(&WindowRow { guest_gap_gpu_seconds: 5.0, workload: None, ..row("t", "c", 0, 60, 1e15) });
        acc.add(&WindowRow { workload: Some("vm:z"), ..row("t", "d", 0, 60, 1e15) });
        acc.add(&WindowRow {
            guest_gap_gpu_seconds: 7.0,
            workload: Some("vm:u"),
            ..row("u", "a", 0, 60, 1e15)
        });
        let usage = acc.finish();
        let t = &usage[0];
        assert_eq!(t.guest_gap_gpu_seconds, 105.0);
        assert_eq!(t.guest_gap_hosts, ["a", "b", "c"]);
        assert_eq!(t.guest_gap_workloads, ["a/vm:y", "b/vm:x"]);
        assert_eq!((t.shared_gpu_seconds, t.shared_gpu_hosts.len()), (0.0, 0));
        assert_eq!(
            (usage[1].guest_gap_gpu_seconds, usage[1].guest_gap_workloads.as_slice()),
            (7.0, ["a/vm:u".to_owned()].as_slice())
        );
    }

    /// Capacity per co-located cluster: hosts of one site and fabric sum, other placements
    /// apart, the unplaced hosts together; the fleet-wide peak sums them all.
    #[test]
    fn capacity_is_also_summed_per_site_and_fabric() {
        let place = |host: &str, site: &str, fabric: &str| {
            (host.to_owned(), Placement { site: site.into(), fabric: fabric.into() })
        };
        let mut acc = UsageAccumulator::with_placements([
            place("a", "fra", "ib-1"),
            place("b", "fra", "ib-1"),
            place("c", "fra", "ib-2"),
        ]);
        for host in ["a", "b", "c", "d", "e"] {
            acc.add(&row("t", host, 6000, 60, 4e15));
        }
        acc.add(&row("t", "c", 6060, 60, 9e15));
        let usage = acc.finish();
        let t = &usage[0];
        assert!((t.peak_flops / 20e15 - 1.0).abs() < 1e-9, "fleet-wide: {t:?}");
        let clusters: Vec<(String, f64, i64, u32)> =
            t.clusters.iter().map(|c| (c.name(), c.peak_flops, c.peak_at, c.hosts)).collect();
        assert_eq!(
            clusters,
            [
                ("fra/ib-2".to_owned(), 9e15, 6060, 1),
                ("fra/ib-1".to_owned(), 8e15, 6000, 2),
                ("unplaced".to_owned(), 8e15, 6000, 2),
            ]
        );
    }

    /// Windows without a tenant: per (host, workload), by the tenants' rules (three figures,
    /// GPU-seconds, the per-minute capacity bucket, first/last window), and never in a tenant.
    #[test]
    fn windows_without_a_tenant_aggregate_per_host_and_workload() {
        let mut acc = UsageAccumulator::default();
        let anon = |host, workload, start, len, flops| WindowRow {
            tenant: None,
            workload: Some(workload),
            method: "gpm_pipes",
            ..row("ignored", host, start, len, flops)
        };
        // a/vm:x: one 60 s window in minute 0, six 10 s windows in minute 1 (peak 6e15 there).
        acc.add(&anon("a", "vm:x", 6000, 60, 4e15));
        for k in 0..6 {
            acc.add(&anon("a", "vm:x", 6060 + 10 * k, 10, 6e15));
        }
        // The same workload id on another host is another workload; a second one on a.
        acc.add(&anon("b", "vm:x", 6000, 60, 1e15));
        acc.add(&anon("a", "cgroup:/y", 6120, 60, 2e15));
        acc.add(&WindowRow { tenant: None, workload: None, ..row("ignored", "c", 6000, 60, 1e15) });
        acc.add(&row("t", "a", 6000, 60, 8e15));
        let fleet = acc.finish_fleet();
        assert_eq!(fleet.tenants.len(), 1);
        let t = &fleet.tenants[0];
        assert_eq!((t.tenant.as_str(), t.windows, t.estimated_ops), ("t", 1, 60e15), "{t:?}");
        let subjects: Vec<String> = fleet.unattributed.iter().map(UnattributedUsage::subject).collect();
        assert_eq!(subjects, ["a/cgroup:/y", "a/vm:x", "b/vm:x", "c/"]);
        let x = &fleet.unattributed[1];
        assert_eq!((x.ops_lower, x.estimated_ops, x.ops_upper), (0.5e15 * 120.0, 1e15 * 120.0, 2e15 * 120.0));
        assert_eq!((x.gpu_seconds, x.windows, x.gpus), (8.0 * 120.0, 7, 8));
        assert!((x.peak_flops / 6e15 - 1.0).abs() < 1e-9, "{x:?}");
        assert_eq!((x.peak_at, x.first_seen, x.last_seen), (6060, 6000, 6120));
        assert_eq!(x.ops_by_method.get("gpm_pipes").copied(), Some(1e15 * 120.0));
        assert!((x.gpu_hours() - 960.0 / 3600.0).abs() < 1e-12);
        assert_eq!((fleet.unattributed[2].estimated_ops, fleet.unattributed[2].peak_flops), (60e15, 1e15));
        // `finish` keeps its meaning: tenants only.
        let mut acc = UsageAccumulator::default();
        acc.add(&anon("a", "vm:x", 0, 60, 1e15));
        assert!(acc.finish().is_empty());
    }
}
