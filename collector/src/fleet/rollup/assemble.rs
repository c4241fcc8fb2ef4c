//! The stored roll-ups as the fleet view ([`FleetUsage`]): what the raw windows'
//! aggregation ([`crate::fleet::UsageAccumulator`]) yields, from rows whose number does not
//! grow with the windows. The day tables and capacity buckets are not needed for it: the
//! peaks are kept, and a run's peak is the largest of its segments' peaks (each segment's
//! peak stands in [`TenantUsage::capacity`] as its one bucket, which is all
//! [`TenantUsage::runs`] reads).

use std::collections::{BTreeMap, BTreeSet};

use super::{Peak, Rollups, Subject, FLEET, UNPLACED};
use crate::fleet::runs::Activity;
use crate::fleet::{ClusterUsage, FleetUsage, TenantUsage, UnattributedUsage};

/// The fleet view the rows of `rollups` hold (its subjects, methods, hosts, guest-gap
/// workloads, peaks and segments are read; a tenant without segments has no runs).
pub fn assemble(rollups: &Rollups) -> FleetUsage {
    let mut fleet = FleetUsage::default();
    for (subject, sums) in &rollups.subjects {
        let methods: BTreeMap<String, f64> = rollups
            .methods
            .range((subject.clone(), String::new())..)
            .take_while(|((s, _), _)| s == subject)
            .map(|((_, method), ops)| (method.clone(), *ops))
            .collect();
        let hosts: Vec<(&String, &super::HostSums)> = rollups
            .hosts
            .range((subject.clone(), String::new())..)
            .take_while(|((s, _), _)| s == subject)
            .map(|((_, host), sums)| (host, sums))
            .collect();
        let peak = rollups
            .peaks
            .get(&(subject.clone(), FLEET.to_owned()))
            .copied()
            .unwrap_or(Peak { flops: 0.0, at: 0 });
        let mut usage = TenantUsage {
            tenant: subject.tenant.clone(),
            ops_lower: sums.ops_lower,
            estimated_ops: sums.estimated_ops,
            ops_upper: sums.ops_upper,
            gpu_seconds: sums.gpu_seconds,
            shared_gpu_seconds: sums.shared_gpu_seconds,
            shared_gpu_hosts: hosts
                .iter()
                .filter(|(_, h)| h.shared_gpu_seconds > 0.0)
                .map(|(h, _)| (*h).clone())
                .collect(),
            guest_gap_gpu_seconds: sums.guest_gap_gpu_seconds,
            guest_gap_hosts: hosts
                .iter()
                .filter(|(_, h)| h.guest_gap_gpu_seconds > 0.0)
                .map(|(h, _)| (*h).clone())
                .collect(),
            guest_gap_workloads: gap_workloads(rollups, subject),
            peak_flops: peak.flops,
            peak_at: peak.at,
            hosts: u32::try_from(hosts.len()).unwrap_or(u32::MAX),
            host_ids: hosts.iter().map(|(h, _)| (*h).clone()).collect(),
            gpus: hosts.iter().fold(0u32, |a, (_, h)| a.saturating_add(h.gpus)),
            windows: sums.windows,
            ops_by_method: methods,
            first_seen: sums.first_start,
            last_seen: sums.last_end,
            foreign_person: sums.foreign_person,
            activity: Activity::default(),
            capacity: Vec::new(),
            clusters: clusters(rollups, subject, &hosts),
        };
        if !subject.is_tenant() {
            fleet.unattributed.push(UnattributedUsage::from_usage(
                subject.host_id.clone(),
                subject.workload.clone(),
                usage,
            ));
            continue;
        }
        if let Some(segments) = rollups.segments.get(&subject.tenant) {
            usage.capacity = segments.values().map(|s| (s.peak.at, s.peak.flops)).collect();
            usage.capacity.sort_by_key(|(at, _)| *at);
            usage.activity = Activity::from_segments(
                segments
                    .values()
                    .map(|s| (s.start, s.end, s.figures.clone(), s.hosts.iter().cloned().collect())),
            );
        }
        fleet.tenants.push(usage);
    }
    fleet
}

fn gap_workloads(rollups: &Rollups, subject: &Subject) -> Vec<String> {
    let mut out: Vec<String> = rollups
        .gap_workloads
        .range((subject.clone(), String::new(), String::new())..)
        .take_while(|((s, ..), _)| s == subject)
        .filter(|((_, _, workload), _)| !workload.is_empty())
        .map(|((_, host, workload), _)| format!("{host}/{workload}"))
        .collect();
    out.sort();
    out
}

/// The subject's peak per co-located cluster, largest first (as
/// [`crate::fleet::clusters`] orders them), with its hosts there.
fn clusters(
    rollups: &Rollups,
    subject: &Subject,
    hosts: &[(&String, &super::HostSums)],
) -> Vec<ClusterUsage> {
    if !subject.is_tenant() {
        return Vec::new();
    }
    let mut out: Vec<ClusterUsage> = rollups
        .peaks
        .range((subject.clone(), String::new())..)
        .take_while(|((s, _), _)| s == subject)
        .filter(|((_, cluster), _)| cluster != FLEET)
        .map(|((_, cluster), peak)| {
            let (site, fabric) = match cluster.split_once('/') {
                Some((site, fabric)) if cluster != UNPLACED => {
                    (Some(site.to_owned()), Some(fabric.to_owned()))
                }
                _ => (None, None),
            };
            let in_cluster: BTreeSet<&String> =
                hosts.iter().filter(|(_, h)| h.cluster == *cluster).map(|(h, _)| *h).collect();
            ClusterUsage {
                site,
                fabric,
                peak_flops: peak.flops,
                peak_at: peak.at,
                hosts: u32::try_from(in_cluster.len()).unwrap_or(u32::MAX),
            }
        })
        .collect();
    out.sort_by(|a, b| b.peak_flops.total_cmp(&a.peak_flops).then_with(|| a.name().cmp(&b.name())));
    out
}
