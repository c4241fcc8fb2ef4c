//! `GET /console/tenants/{id}`: one tenant: who it is, its cumulative operations per day
//! against the policy's thresholds (the chart), its training runs, and the breakdown per host
//! and per estimation method, with its findings. Read from the roll-ups (all-time sums, the
//! per-day tables, the per-host rows, the busy segments): the page costs the tenant's days,
//! hosts and runs, never its windows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use kycd_protocol::clock::{Clock as _, SystemClock};

use super::chart::{Chart, Point, RunSpan, Threshold};
use super::overview::share;
use super::units::{flop, flops, gpu_hours, time};
use super::{error_page, failed, finding_link, page, state_badge, Viewer, HOSTS_PAGE};
use crate::fleet::rollup::{Rollups, DAY_S};
use crate::fleet::{FindingQuery, Run};
use crate::http::html::esc;
use crate::http::read_api::MAX_PAGE;
use crate::http::response::blocking;
use crate::http::ApiState;

/// The cumulative series of the per-day sums: one point at the end of each day's last window.
pub(super) fn cumulative(rollups: &Rollups) -> Vec<Point> {
    let mut total = Point { at: i64::MIN, lower: 0.0, point: 0.0, upper: 0.0 };
    let mut out = Vec::with_capacity(rollups.days.len());
    for sums in rollups.days.values() {
        use crate::fleet::saturating_sum as add;
        total = Point {
            at: sums.last_end.max(total.at.saturating_add(1)),
            lower: add(total.lower, sums.ops_lower),
            point: add(total.point, sums.estimated_ops),
            upper: add(total.upper, sums.ops_upper),
        };
        out.push(total);
    }
    out
}

fn chart(rollups: &Rollups, runs: &[Run], policy: Option<&kycd_protocol::PolicyClaims>) -> Chart {
    let thresholds = policy.map_or_else(Vec::new, |p| {
        let t = &p.thresholds;
        vec![
            Threshold {
                label: "early warning".into(),
                ops: t.early_warning_fraction * t.training_ops,
                class: "early-warning",
            },
            Threshold { label: "training".into(), ops: t.training_ops, class: "training" },
            Threshold { label: "bio".into(), ops: t.bio_training_ops, class: "bio" },
        ]
    });
    let runs = runs
        .iter()
        .enumerate()
        .map(|(i, r)| RunSpan {
            start: r.first_start,
            end: r.last_end,
            label: format!("run {}: {} to {}", i + 1, time(Some(r.first_start)), time(Some(r.last_end))),
        })
        .collect();
    Chart { points: cumulative(rollups), thresholds, runs }
}

pub(super) async fn page_route(
    State(state): State<ApiState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    let store = Arc::clone(&state.store);
    let tenant = id.clone();
    let data = blocking(move || {
        let usage = store.tenant_usage(Some(&tenant), None)?.into_iter().next();
        let identity = store.tenant_identities()?.into_iter().find(|i| i.tenant == tenant);
        let rollups = store.tenant_rollups(&tenant)?;
        let query = FindingQuery { tenant: Some(tenant.clone()), limit: MAX_PAGE, ..FindingQuery::default() };
        Ok((usage, identity, rollups, store.list_findings(&query)?, store.current_policy()?))
    })
    .await;
    let (usage, identity, rollups, findings, policy) = match data {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let Some(usage) = usage else {
        return error_page(StatusCode::NOT_FOUND, &format!("No usage of tenant {id:?} is stored."));
    };
    let claims = policy.as_ref().map(|p| &p.claims);
    let gap_s = claims.map_or(kycd_protocol::DEFAULT_RUN_GAP_S, |c| c.thresholds.run_gap_s);
    let runs = usage.runs(i64::try_from(gap_s).unwrap_or(i64::MAX), SystemClock.unix_now());
    let bio = identity.as_ref().is_some_and(crate::fleet::TenantIdentity::declares_bio);
    let foreign = identity.as_ref().map_or(usage.foreign_person, |i| i.foreign_person);
    let mut h = String::new();
    let _ = write!(
        h,
        "<h1>Tenant {}</h1><p>{}{} · {}{}</p>",
        esc(&id),
        identity.as_ref().map_or_else(|| "no host statement named it yet".to_owned(), |i| esc(&i.legal_name)),
        identity.as_ref().map_or_else(String::new, |i| {
            let c: Vec<String> = i.countries.iter().map(ToString::to_string).collect();
            format!(" ({})", esc(&c.join(" ")))
        }),
        if foreign { "<span class=\"foreign\">foreign person</span>" } else { "domestic" },
        if bio { " · declares biological sequence data" } else { "" }
    );
    let training = claims.map_or(0.0, |c| c.thresholds.training_ops);
    let _ = write!(
        h,
        "<div class=\"cards\"><div class=\"card\">Operations<b id=\"ops-point\">{}</b>lower {} · upper {}</div>\
         <div class=\"card\">Of training threshold<b>{}</b>upper bound</div>\
         <div class=\"card\">GPU-hours<b id=\"gpu-hours\">{}</b>shared {} · no guest telemetry {}</div>\
         <div class=\"card\">Peak capacity<b>{}</b>at {}</div><div class=\"card\">Runs<b>{}</b>{} hosts · {} GPUs</div></div>",
        flop(usage.estimated_ops),
        flop(usage.ops_lower),
        flop(usage.ops_upper),
        share(usage.ops_upper, training),
        gpu_hours(usage.gpu_seconds),
        gpu_hours(usage.shared_gpu_seconds),
        gpu_hours(usage.guest_gap_gpu_seconds),
        flops(usage.peak_flops),
        time(Some(usage.peak_at)),
        runs.len(),
        usage.hosts,
        usage.gpus
    );
    let _ = write!(
        h,
        "<h2>Cumulative operations (log scale)</h2><p class=\"legend\"><span><i class=\"swatch band\"></i>lower to upper \
         bound</span><span><i class=\"swatch point\"></i>point estimate (end of each day's windows)</span>\
         <span><i class=\"swatch run\"></i>training run</span><span><i class=\"swatch early-warning\"></i>early warning</span>\
         <span><i class=\"swatch training\"></i>training</span><span><i class=\"swatch bio\"></i>biological sequence data</span></p>{}",
        super::chart::render(&chart(&rollups, &runs, claims))
    );
    if claims.is_none() {
        h.push_str("<p class=\"warn\">No policy is published: no thresholds to hold the tenant against.</p>");
    }
    runs_table(
        &mut h,
        &runs,
        claims.map(|c| if bio { c.thresholds.bio_training_ops } else { c.thresholds.training_ops }),
    );
    hosts_table(&mut h, &rollups, &runs);
    h.push_str("<h2>By estimation method</h2><table id=\"methods\"><tr><th>method</th><th>operations (point estimate)</th><th>share</th></tr>");
    for (method, ops) in &usage.ops_by_method {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(method),
            flop(*ops),
            share(*ops, usage.estimated_ops)
        );
    }
    h.push_str("</table><h2>Findings</h2><table id=\"tenant-findings\"><tr><th>finding</th><th>kind</th><th>subject</th><th>state</th><th>raised</th><th>summary</th></tr>");
    for f in &findings {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            finding_link(f.id),
            f.finding.kind.as_str(),
            esc(&f.finding.subject),
            state_badge(f.state),
            time(Some(f.raised_at)),
            esc(&f.finding.summary)
        );
    }
    h.push_str("</table>");
    page(StatusCode::OK, &format!("Tenant {id}"), Some(&viewer), &h)
}

fn runs_table(h: &mut String, runs: &[Run], run_threshold: Option<f64>) {
    h.push_str(
        "<h2>Training runs</h2><table id=\"runs\"><tr><th>run</th><th>first window</th><th>last window</th>\
         <th>operations (lower · point · upper)</th><th>of the run threshold</th><th>GPU-hours</th>\
         <th>peak capacity</th><th>hosts</th></tr>",
    );
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td class=\"num\">{} · {} · {}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            i + 1,
            if r.still_running { " (running)" } else { "" },
            time(Some(r.first_start)),
            time(Some(r.last_end)),
            flop(r.figures.ops_lower),
            flop(r.figures.estimated_ops),
            flop(r.figures.ops_upper),
            share(r.figures.estimated_ops, run_threshold.unwrap_or(0.0)),
            gpu_hours(r.figures.gpu_seconds),
            flops(r.peak_flops),
            esc(&r.hosts.join(", "))
        );
    }
    h.push_str("</table>");
}

fn hosts_table(h: &mut String, rollups: &Rollups, runs: &[Run]) {
    let mut days: BTreeMap<&str, (u32, i64)> = BTreeMap::new();
    for (_, day, host) in &rollups.day_hosts {
        let entry = days.entry(host.as_str()).or_insert((0, *day));
        *entry = (entry.0 + 1, entry.1.max(*day));
    }
    h.push_str(
        "<h2>By host</h2><table id=\"hosts\"><tr><th>host</th><th>cluster</th><th>most GPUs at once</th>\
         <th>days active</th><th>last day active</th><th>runs</th><th>shared GPU-hours</th>\
         <th>GPU-hours without guest telemetry</th></tr>",
    );
    for ((subject, host), sums) in &rollups.hosts {
        if !subject.is_tenant() {
            continue;
        }
        let (active, last) = days.get(host.as_str()).copied().unwrap_or((0, 0));
        let in_runs = runs.iter().filter(|r| r.hosts.contains(host)).count();
        let _ = write!(
            h,
            "<tr><td><a href=\"{HOSTS_PAGE}#host-{}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{active}</td>\
             <td>{}</td><td class=\"num\">{in_runs}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            super::units::segment(host),
            esc(host),
            esc(&sums.cluster),
            sums.gpus,
            if active > 0 { time(Some(last * DAY_S)).get(..10).unwrap_or_default().to_owned() } else { String::new() },
            gpu_hours(sums.shared_gpu_seconds),
            gpu_hours(sums.guest_gap_gpu_seconds)
        );
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::rollup::{Subject, Sums};

    #[test]
    fn the_cumulative_series_adds_up_the_days() {
        let subject = Subject { tenant: "t".into(), host_id: String::new(), workload: String::new() };
        let mut rollups = Rollups::default();
        for (day, ops) in [(10, 1e18), (12, 3e18)] {
            let sums = Sums {
                ops_lower: ops / 2.0,
                estimated_ops: ops,
                ops_upper: ops * 2.0,
                last_end: day * DAY_S + 600,
                ..Sums::default()
            };
            rollups.days.insert((subject.clone(), day), sums);
        }
        let points = cumulative(&rollups);
        assert_eq!(points.len(), 2);
        assert_eq!((points[1].lower, points[1].point, points[1].upper), (2e18, 4e18, 8e18));
        assert_eq!(points[1].at, 12 * DAY_S + 600);
    }
}
