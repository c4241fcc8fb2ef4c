//! Co-located clusters: where enrolled hosts stand ([`Placement`]: a site and the network
//! fabric within it) and a tenant's peak concurrent capacity per cluster ([`ClusterUsage`]),
//! computed in the aggregation's pass beside the fleet-wide peak (see [`super::usage`]).
//!
//! The rule's "computing cluster" is co-located machines on one network: hosts of one
//! (site, fabric) form one cluster. Hosts placed nowhere count together as one cluster
//! (`unplaced`): co-location is not ruled out for them, so they are not split up, and a fleet
//! with no placements at all gets the fleet-wide figure as its one cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::usage::CAPACITY_BUCKET_S;

/// A tenant's peak concurrent capacity in one co-located cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterUsage {
    /// The site; none for the hosts placed nowhere (counted as one cluster: co-location is
    /// not ruled out, so they are not split up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The network fabric within the site; none with `site`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<String>,
    /// Largest concurrent FLOP/s in one minute on the cluster's hosts.
    pub peak_flops: f64,
    /// Start of that minute.
    pub peak_at: i64,
    /// The tenant's hosts in the cluster.
    pub hosts: u32,
}

impl ClusterUsage {
    /// `site/fabric`, or `unplaced`.
    pub fn name(&self) -> String {
        match (&self.site, &self.fabric) {
            (Some(site), Some(fabric)) => format!("{site}/{fabric}"),
            _ => "unplaced".to_owned(),
        }
    }
}

/// Where an enrolled host stands: its site and the network fabric that joins it to the
/// other hosts of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// Site (a data centre, a hall).
    pub site: String,
    /// Network fabric within the site (a high-bandwidth domain).
    pub fabric: String,
}

/// Each cluster's peak (earliest minute among equal peaks), largest first.
pub(super) fn cluster_peaks(
    capacity: &std::collections::HashMap<(u32, i64), f64>,
    host_clusters: &[u32],
    clusters: &[Option<Placement>],
) -> Vec<ClusterUsage> {
    let mut peaks: BTreeMap<u32, (f64, i64)> = BTreeMap::new();
    for ((cluster, minute), flops) in capacity {
        let at = minute * CAPACITY_BUCKET_S;
        let peak = peaks.entry(*cluster).or_insert((*flops, at));
        if *flops > peak.0 || (*flops == peak.0 && at < peak.1) {
            *peak = (*flops, at);
        }
    }
    let mut out: Vec<ClusterUsage> = peaks
        .into_iter()
        .map(|(cluster, (peak_flops, peak_at))| {
            let placement = clusters.get(usize::try_from(cluster).unwrap_or(usize::MAX)).cloned().flatten();
            let hosts = host_clusters.iter().filter(|c| **c == cluster).count();
            ClusterUsage {
                site: placement.as_ref().map(|p| p.site.clone()),
                fabric: placement.map(|p| p.fabric),
                peak_flops,
                peak_at,
                hosts: u32::try_from(hosts).unwrap_or(u32::MAX),
            }
        })
        .collect();
    out.sort_by(|a, b| b.peak_flops.total_cmp(&a.peak_flops).then_with(|| a.name().cmp(&b.name())));
    out
}
