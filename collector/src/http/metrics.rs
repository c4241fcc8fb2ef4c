//! `GET /metrics`: the collector's Prometheus text, behind the read access rule (host ids and
//! finding counts are fleet data). Counters of the ingest endpoint since start
//! ([`crate::ingest::IngestCounters`], kept by [`super::ingest`]) and, read from storage on each scrape, the enrolled and dark hosts,
//! each host's last report, the active findings by kind and the published policy version:
//! what the packaged Grafana dashboard and Prometheus alerts (`packaging/grafana`,
//! `packaging/prometheus`) query.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use kycd_net::prometheus::{Exposition, Kind};

use super::read_api::host_summaries;
use super::response::blocking;
use super::ApiState;
use crate::fleet::FindingKind;
use crate::ingest::Ingestor;
use crate::store::{Storage, StoreError};

/// What `/metrics` reads.
#[derive(Debug, Clone)]
pub struct MetricsState {
    /// The ingest pipeline (its counters).
    pub ingestor: Arc<Ingestor>,
    /// The read API's state (storage; the access rule guards the route).
    pub api: ApiState,
}

/// The fleet gauges read from `store`.
pub fn fleet_metrics(store: &dyn Storage, out: &mut Exposition) -> Result<(), StoreError> {
    let hosts = host_summaries(store)?;
    out.single("kycd_collector_hosts", Kind::Gauge, "Hosts enrolled.", hosts.len());
    out.single(
        "kycd_collector_hosts_dark",
        Kind::Gauge,
        "Enrolled hosts with an active host_dark finding (neither a report nor a poll answer within the dark interval).",
        hosts.iter().filter(|h| h.dark).count(),
    );
    let name = "kycd_collector_host_last_report_timestamp_seconds";
    out.family(name, Kind::Gauge, "When each host's last report was stored (Unix seconds; absent: never).");
    for h in &hosts {
        if let Some(at) = h.last_report_at {
            out.sample(name, &[("host", &h.host_id)], at);
        }
    }
    let mut by_kind: BTreeMap<&str, u64> = FindingKind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    for f in crate::findings::active_findings(store)? {
        *by_kind.entry(f.finding.kind.as_str()).or_default() += 1;
    }
    let name = "kycd_collector_findings_active";
    out.family(name, Kind::Gauge, "Active (open or acknowledged) findings, by kind.");
    for (kind, n) in &by_kind {
        out.sample(name, &[("kind", kind)], n);
    }
    out.single(
        "kycd_collector_policy_version",
        Kind::Gauge,
        "Version of the published policy (0: none).",
        store.current_policy()?.map_or(0, |p| p.version),
    );
    Ok(())
}

pub(super) async fn metrics(State(state): State<MetricsState>) -> Response {
    let store = Arc::clone(&state.api.store);
    let fleet = blocking(move || {
        let mut out = Exposition::new();
        fleet_metrics(store.as_ref(), &mut out)?;
        Ok(out.finish())
    })
    .await;
    let fleet = match fleet {
        Ok(text) => text,
        Err(e) => return e.into_response(),
    };
    let mut out = Exposition::new();
    state.ingestor.counters().write(&mut out);
    out.append(&fleet);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.finish()).into_response()
}
