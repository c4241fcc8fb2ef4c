//! The filing record as one self-contained HTML page ("PDF-ready": no scripts, no external
//! resources, print styles, page breaks between sections), for an operator to print or save
//! as PDF and attach to the filing. Every value from the store is escaped: tenant ids, legal
//! names and workload names are not the provider's text.

use std::fmt::Write as _;

use super::{FilingRecord, UsageSection};
use crate::dates::rfc3339;
use crate::fleet::ClusterUsage;
use crate::http::html::esc;

const STYLE: &str = "body{font:11pt/1.4 serif;margin:2cm;color:#000}h1{font-size:16pt}h2{font-size:13pt;\
border-bottom:1px solid #000;margin-top:1.5em;page-break-after:avoid}table{border-collapse:collapse;\
width:100%;margin:.5em 0;page-break-inside:auto}td,th{border:1px solid #777;padding:2pt 4pt;text-align:left;\
vertical-align:top;font-size:9.5pt}th{background:#eee;width:28%}tr{page-break-inside:avoid}\
.mono{font-family:monospace;word-break:break-all}@page{size:A4;margin:1.5cm}";

fn row(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(name), esc(value));
}

fn ops(value: f64) -> String {
    format!("{value:.4e}")
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The rows every usage scope has: its scope, first and last window, the three figures and
/// the point estimate by method.
fn figure_rows(
    out: &mut String,
    scope: &str,
    (first, last): (i64, i64),
    (lower, point, upper): (f64, f64, f64),
    by_method: &std::collections::BTreeMap<String, f64>,
) {
    row(out, "Scope", scope);
    row(out, "First window", &rfc3339(first));
    row(out, "Last window", &rfc3339(last));
    row(out, "Operations: lower bound", &ops(lower));
    row(out, "Operations: point estimate", &ops(point));
    row(out, "Operations: upper bound", &ops(upper));
    row(out, "Operations by method", &json(by_method));
}

/// GPU-hours, the fleet-wide peak concurrent capacity and the per-cluster peaks.
fn capacity_rows(out: &mut String, gpu_hours: f64, (peak, at): (f64, i64), clusters: &[ClusterUsage]) {
    row(out, "GPU-hours", &format!("{gpu_hours:.2}"));
    row(out, "Peak concurrent capacity (FLOP/s)", &format!("{} at {}", ops(peak), rfc3339(at)));
    for c in clusters {
        let value = format!("{} at {} on {} host(s)", ops(c.peak_flops), rfc3339(c.peak_at), c.hosts);
        row(out, &format!("Peak in cluster {}", c.name()), &value);
    }
}

/// The page.
pub fn render(record: &FilingRecord) -> String {
    let f = &record.finding;
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Finding {} — filing record</title>\
         <style>{STYLE}</style></head><body><h1>Filing record: finding {} ({})</h1>",
        f.id,
        f.id,
        esc(f.finding.kind.as_str())
    );
    out.push_str("<h2>Finding</h2><table>");
    row(&mut out, "Summary", &f.finding.summary);
    row(&mut out, "Subject", &f.finding.subject);
    row(&mut out, "State", f.state.as_str());
    row(&mut out, "Raised at", &rfc3339(f.raised_at));
    row(&mut out, "Due at", &f.finding.due_at.map(rfc3339).unwrap_or_else(|| "—".into()));
    if let Some(a) = &f.acknowledged {
        row(&mut out, "Acknowledged", &format!("by {} at {}", a.by, rfc3339(a.at)));
    }
    if let Some(filing) = &f.filed {
        row(
            &mut out,
            "Filed",
            &format!("reference {} by {} at {}", filing.reference, filing.by, rfc3339(filing.at)),
        );
    }
    if let Some(d) = &f.dismissed {
        row(&mut out, "Dismissed", &format!("{} (by {} at {})", d.reason, d.by, rfc3339(d.at)));
    }
    row(&mut out, "Record generated at", &rfc3339(record.generated_at));
    out.push_str("</table><h2>Customer</h2><table>");
    let c = &record.customer;
    row(&mut out, "Tenant", c.tenant.as_deref().unwrap_or("unknown (no verified attestation)"));
    row(&mut out, "Foreign status", c.foreign_status);
    match &c.identity {
        Some(i) => {
            row(&mut out, "Legal name", &i.legal_name);
            row(&mut out, "Countries", &json(&i.countries));
            row(&mut out, "Beneficial owners' countries", &json(&i.beneficial_owner_countries));
            row(&mut out, "Identity last stated", &rfc3339(i.seen_at));
            if let Some(d) = &i.detail {
                let s = &d.subject;
                if let Some(status) = &s.person_status {
                    row(&mut out, "Person status (basis)", &json(status));
                }
                let owners: Vec<String> = s
                    .beneficial_owners
                    .iter()
                    .map(|o| format!("{} ({})", o.name, json(&o.countries)))
                    .collect();
                if !owners.is_empty() {
                    row(&mut out, "Beneficial owners", &owners.join("; "));
                }
                let resellers: Vec<String> = s
                    .resellers
                    .iter()
                    .map(|r| {
                        let status = match r.foreign_person {
                            Some(true) => "foreign",
                            Some(false) => "U.S.",
                            None => "status unknown",
                        };
                        format!("{} ({}, {status})", r.name, r.country)
                    })
                    .collect();
                row(
                    &mut out,
                    "Resellers",
                    &if resellers.is_empty() { json(&s.reseller_countries) } else { resellers.join("; ") },
                );
                row(
                    &mut out,
                    "Payment source country",
                    &s.payment_source_country.map(|c| c.to_string()).unwrap_or_else(|| "—".into()),
                );
                row(&mut out, "Declared purposes", &json(&s.purposes));
                out.push_str("</table><h2>KYC record</h2><table>");
                if let Some(kyc) = &s.kyc {
                    row(&mut out, "Attestation issuer", &kyc.issuer);
                    row(&mut out, "Attestation jti", &kyc.jti);
                    row(&mut out, "Verified at", &kyc.verified_at.map(rfc3339).unwrap_or_else(|| "—".into()));
                    row(&mut out, "Verification method", kyc.method.as_deref().unwrap_or("—"));
                }
                row(&mut out, "Attestation digest (SHA-256)", d.attestation_digest.as_deref().unwrap_or("—"));
                row(
                    &mut out,
                    "Attestation expiry",
                    &d.attestation_exp.map(rfc3339).unwrap_or_else(|| "—".into()),
                );
                row(&mut out, "Stated by host / workload", &format!("{} / {}", d.host_id, d.workload));
            }
        }
        None => row(&mut out, "Identity", "not known to the collector"),
    }
    out.push_str("</table><h2>Usage</h2><table>");
    match &record.usage {
        Some(UsageSection::Run { run, run_gap_s }) => {
            let f = &run.figures;
            let scope = format!("training run (pauses up to {run_gap_s} s)");
            let span = (run.first_start, run.last_end);
            figure_rows(
                &mut out,
                &scope,
                span,
                (f.ops_lower, f.estimated_ops, f.ops_upper),
                &f.ops_by_method,
            );
            row(&mut out, "Still running", if run.still_running { "yes" } else { "no" });
            capacity_rows(&mut out, run.gpu_hours(), (run.peak_flops, run.peak_at), &[]);
            row(&mut out, "Windows", &f.windows.to_string());
        }
        Some(UsageSection::Tenant(u)) => {
            let bounds = (u.ops_lower, u.estimated_ops, u.ops_upper);
            let span = (u.first_seen, u.last_seen);
            figure_rows(&mut out, "all stored windows of the tenant", span, bounds, &u.ops_by_method);
            capacity_rows(&mut out, u.gpu_hours(), (u.peak_flops, u.peak_at), &u.clusters);
        }
        Some(UsageSection::Unattributed(u)) => {
            let scope = format!("workload {} without a verified tenant", u.subject());
            let bounds = (u.ops_lower, u.estimated_ops, u.ops_upper);
            figure_rows(&mut out, &scope, (u.first_seen, u.last_seen), bounds, &u.ops_by_method);
            capacity_rows(&mut out, u.gpu_hours(), (u.peak_flops, u.peak_at), &[]);
        }
        None => row(&mut out, "Scope", "no usage figures for this kind of finding"),
    }
    let hosts: Vec<String> = record
        .hosts
        .iter()
        .map(|h| match &h.placement {
            Some(p) => format!("{} ({}/{})", h.host_id, p.site, p.fabric),
            None => format!("{} (unplaced)", h.host_id),
        })
        .collect();
    row(&mut out, "Hosts (site/fabric)", &hosts.join(", "));
    out.push_str("</table><h2>Policy and threshold</h2><table>");
    let p = &record.policy;
    row(&mut out, "Policy version applied", &p.version.map_or_else(|| "—".into(), |v| v.to_string()));
    row(&mut out, "Threshold crossed", &json(&p.threshold));
    row(&mut out, "Held against", p.basis.as_deref().unwrap_or("—"));
    row(&mut out, "Published version now", &p.current_version.map_or_else(|| "—".into(), |v| v.to_string()));
    row(&mut out, "Evidence at raise", &json(&f.finding.evidence));
    out.push_str(
        "</table><h2>Evidence windows</h2><table><tr><th>Host</th><th>Epoch / seq</th><th>Window</th>\
                  <th>Operations (lower / point / upper)</th><th>Method</th></tr>",
    );
    for w in &record.evidence_windows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{} / {}</td><td>{} … {}</td><td>{} / {} / {}</td><td>{}</td></tr>",
            esc(&w.host_id),
            w.epoch,
            w.seq,
            rfc3339(w.start),
            rfc3339(w.end),
            ops(w.ops_lower),
            ops(w.estimated_ops),
            ops(w.ops_upper),
            esc(&w.method)
        );
    }
    out.push_str("</table><h2>Audit records</h2><table>");
    for record in &record.audit {
        let _ = write!(out, "<tr><td class=\"mono\">{}</td></tr>", esc(&record.to_string()));
    }
    out.push_str("</table></body></html>\n");
    out
}
