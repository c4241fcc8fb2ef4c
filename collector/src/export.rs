//! Regulatory exports (`kycd-collector export --since DATE --format csv|json`): one row per
//! tenant with usage in the period — tenant, legal name, countries, foreign flag, operations
//! (lower bound, point estimate, upper bound, side by side), GPU-hours and of them those on
//! GPUs shared without isolation, first/last seen, hosts, findings — for the provider's
//! filings. A filing that quotes only the point estimate would hide how much the measurement
//! allows: windows of agents before 0.17 count their estimate as both bounds.
//!
//! Usage figures cover windows that end after `since` (the filing period); the findings
//! column lists every finding about the tenant raised since then, open or resolved. Times are
//! RFC 3339 UTC. CSV follows RFC 4180 (header row, CRLF, quoted fields where needed); JSON is
//! one array of objects with the same fields, countries and findings as arrays.
//!
//! `--unattributed` exports instead the usage no tenant is known for (workloads without a
//! valid attestation, run under the policy's `unverified: allow` or `grace`), one row per
//! (host, workload) with the same figures and its `unattributed_training_scale` findings
//! ([`UnattributedRow`], [`UNATTRIBUTED_CSV_HEADER`]). A separate table, not rows with an
//! empty tenant in the tenants' one: a reader of that table keys it by tenant, and these rows
//! have none.
//!
//! **Formula injection.** Tenant ids come from attestations and legal names from host
//! statements: text the provider does not control, opened in a spreadsheet by whoever
//! prepares the filing. A CSV text cell that starts with `=`, `+`, `-`, `@`, a tab or a
//! carriage return would be taken for a formula (`=HYPERLINK(…)`, `=cmd|…`), so such a cell
//! is written with a leading `'` ([`neutralize`]), which spreadsheets show as text and do not
//! evaluate (OWASP's CSV injection advice). Number cells are never prefixed. JSON is exact:
//! it is data, not a sheet.

use serde::{Deserialize, Serialize};

use crate::fleet::{finite, FindingKind, FindingQuery, Period, TenantUsage, UnattributedUsage};
use crate::store::{Storage, StoreError};

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// RFC 4180 CSV with a header row.
    Csv,
    /// A JSON array.
    Json,
}

/// One exported row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRow {
    /// Tenant id.
    pub tenant: String,
    /// Verified legal name (empty if no host statement named the tenant yet).
    pub legal_name: String,
    /// The tenant's countries.
    pub countries: Vec<String>,
    /// Beneficial owners' countries.
    pub beneficial_owner_countries: Vec<String>,
    /// Foreign person.
    pub foreign_person: bool,
    /// Lower bound of operations in the period.
    pub ops_lower: f64,
    /// Estimated operations in the period (point estimate).
    pub estimated_ops: f64,
    /// Upper bound of operations in the period.
    pub ops_upper: f64,
    /// GPU-hours in the period.
    pub gpu_hours: f64,
    /// Of them, GPU-hours on GPUs shared with another workload without isolation.
    pub shared_gpu_hours: f64,
    /// Of them, GPU-hours in which a VM held passed-through GPUs while its guest sent no
    /// telemetry (only the allocation bounds the operations there).
    pub guest_gap_gpu_hours: f64,
    /// Peak concurrent FLOP/s in the period.
    pub peak_flops: f64,
    /// First window start in the period (RFC 3339).
    pub first_seen: String,
    /// Last window end in the period (RFC 3339).
    pub last_seen: String,
    /// Hosts that reported the tenant in the period.
    pub hosts: u32,
    /// Findings about the tenant raised in the period, as `kind#id`.
    pub findings: Vec<String>,
    /// Point estimate by estimation method (how the operations were estimated).
    #[serde(default)]
    pub ops_by_method: std::collections::BTreeMap<String, f64>,
    /// The hosts' ids.
    #[serde(default)]
    pub host_ids: Vec<String>,
    /// The resellers' countries (from the newest statement naming the tenant).
    #[serde(default)]
    pub reseller_countries: Vec<String>,
    /// The payment source's country.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_source_country: Option<String>,
    /// The link to the KYC record: the attestation's digest, its issuer and `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_digest: Option<String>,
    /// The attestation's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kyc_issuer: Option<String>,
    /// The attestation's `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kyc_jti: Option<String>,
    /// The version of the policy published when the export was made (its thresholds are
    /// the ones the findings were held against since then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// One exported row of usage without a tenant (`export --unattributed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnattributedRow {
    /// Reporting host.
    pub host_id: String,
    /// The workload (cgroup or VM) as the agent names it.
    pub workload: String,
    /// Lower bound of operations in the period.
    pub ops_lower: f64,
    /// Estimated operations in the period (point estimate).
    pub estimated_ops: f64,
    /// Upper bound of operations in the period.
    pub ops_upper: f64,
    /// GPU-hours in the period.
    pub gpu_hours: f64,
    /// Of them, GPU-hours on GPUs shared without isolation.
    pub shared_gpu_hours: f64,
    /// Of them, GPU-hours of a VM whose guest sent no telemetry.
    pub guest_gap_gpu_hours: f64,
    /// Peak FLOP/s capacity in one minute of the period.
    pub peak_flops: f64,
    /// Most GPUs used at once.
    pub gpus: u32,
    /// First window start in the period (RFC 3339).
    pub first_seen: String,
    /// Last window end in the period (RFC 3339).
    pub last_seen: String,
    /// `unattributed_training_scale` findings about it raised in the period, as `kind#id`.
    pub findings: Vec<String>,
}

/// The CSV header of `export --unattributed`.
pub const UNATTRIBUTED_CSV_HEADER: [&str; 13] = [
    "host_id",
    "workload",
    "ops_lower",
    "estimated_ops",
    "ops_upper",
    "gpu_hours",
    "shared_gpu_hours",
    "guest_gap_gpu_hours",
    "peak_flops",
    "gpus",
    "first_seen",
    "last_seen",
    "findings",
];

/// Which rows an export holds: usage of windows ending after `since` and (with `until`)
/// starting before it; findings raised in that period; only foreign tenants (unknown status
/// counts as foreign: unattributed usage is always included) and only one tenant on request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// Start of the period.
    pub since: i64,
    /// End of the period (exclusive); none: open-ended.
    pub until: Option<i64>,
    /// Only tenants that are foreign persons.
    pub foreign_only: bool,
    /// Only this tenant.
    pub tenant: Option<String>,
}

impl ExportFilter {
    /// The period from `since` on, every tenant.
    pub fn since(since: i64) -> Self {
        ExportFilter { since, ..ExportFilter::default() }
    }

    fn raised_in(&self, at: i64) -> bool {
        at >= self.since && self.until.is_none_or(|until| at < until)
    }

    fn period(&self) -> Period {
        Period { since: Some(self.since), until: self.until }
    }
}

/// The rows without a tenant of the period starting at `since`, by host id and workload.
pub fn unattributed_rows(store: &dyn Storage, since: i64) -> Result<Vec<UnattributedRow>, StoreError> {
    unattributed_rows_in(store, &ExportFilter::since(since))
}

/// The rows without a tenant `filter` selects (its tenant and foreign conditions do not
/// apply: such usage has no tenant and is treated as foreign), by host id and workload.
pub fn unattributed_rows_in(
    store: &dyn Storage,
    filter: &ExportFilter,
) -> Result<Vec<UnattributedRow>, StoreError> {
    let mut findings: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    let query = FindingQuery {
        kind: Some(FindingKind::UnattributedTrainingScale),
        limit: 1000,
        ..FindingQuery::default()
    };
    crate::findings::for_each_finding(store, query, |f| {
        if filter.raised_in(f.raised_at) {
            findings.entry(f.finding.subject.clone()).or_default().push(format!(
                "{}#{}",
                f.finding.kind.as_str(),
                f.id
            ));
        }
        Ok::<_, StoreError>(())
    })?;
    Ok(store
        .fleet_usage_in(filter.period())?
        .unattributed
        .into_iter()
        .map(|u: UnattributedUsage| UnattributedRow {
            findings: findings.remove(&u.subject()).unwrap_or_default(),
            ops_lower: finite(u.ops_lower),
            estimated_ops: finite(u.estimated_ops),
            ops_upper: finite(u.ops_upper),
            gpu_hours: finite(u.gpu_hours()),
            shared_gpu_hours: finite(u.shared_gpu_seconds / 3600.0),
            guest_gap_gpu_hours: finite(u.guest_gap_gpu_seconds / 3600.0),
            peak_flops: finite(u.peak_flops),
            gpus: u.gpus,
            first_seen: rfc3339(u.first_seen),
            last_seen: rfc3339(u.last_seen),
            host_id: u.host_id,
            workload: u.workload,
        })
        .collect())
}

/// Renders rows without a tenant in `format` (text cells neutralised in CSV, as
/// [`render`] does).
pub fn render_unattributed(rows: &[UnattributedRow], format: Format) -> Result<String, serde_json::Error> {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).map(|s| s + "\n"),
        Format::Csv => {
            let mut out = UNATTRIBUTED_CSV_HEADER.join(",") + "\r\n";
            for r in rows {
                let fields = [
                    neutralize(&r.host_id),
                    neutralize(&r.workload),
                    format!("{:e}", finite(r.ops_lower)),
                    format!("{:e}", finite(r.estimated_ops)),
                    format!("{:e}", finite(r.ops_upper)),
                    format!("{:.3}", finite(r.gpu_hours)),
                    format!("{:.3}", finite(r.shared_gpu_hours)),
                    format!("{:.3}", finite(r.guest_gap_gpu_hours)),
                    format!("{:e}", finite(r.peak_flops)),
                    r.gpus.to_string(),
                    neutralize(&r.first_seen),
                    neutralize(&r.last_seen),
                    neutralize(&r.findings.join(" ")),
                ];
                out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
                out.push_str("\r\n");
            }
            Ok(out)
        }
    }
}

pub use crate::dates::{parse_date, rfc3339, DateError};

/// The rows of the period starting at `since`, by tenant id.
pub fn rows(store: &dyn Storage, since: i64) -> Result<Vec<ExportRow>, StoreError> {
    rows_in(store, &ExportFilter::since(since))
}

/// The rows `filter` selects, by tenant id.
pub fn rows_in(store: &dyn Storage, filter: &ExportFilter) -> Result<Vec<ExportRow>, StoreError> {
    let identities: std::collections::BTreeMap<_, _> =
        store.tenant_identities()?.into_iter().map(|i| (i.tenant.clone(), i)).collect();
    let mut findings: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    let mut after_id = 0;
    loop {
        let page = store.list_findings(&FindingQuery { after_id, limit: 1000, ..FindingQuery::default() })?;
        let Some(last) = page.last() else { break };
        after_id = last.id;
        for f in page {
            if let (Some(tenant), true) = (f.finding.tenant.as_ref(), filter.raised_in(f.raised_at)) {
                findings.entry(tenant.clone()).or_default().push(format!(
                    "{}#{}",
                    f.finding.kind.as_str(),
                    f.id
                ));
            }
        }
    }
    let policy_version = store.current_policy()?.map(|p| p.version);
    Ok(store
        .tenant_usage_in(filter.tenant.as_deref(), filter.period())?
        .into_iter()
        .filter(|u| {
            !filter.foreign_only || identities.get(&u.tenant).map_or(u.foreign_person, |i| i.foreign_person)
        })
        .map(|u: TenantUsage| {
            let identity = identities.get(&u.tenant);
            let codes = |cs: &[kycd_protocol::CountryCode]| cs.iter().map(ToString::to_string).collect();
            let detail = identity.and_then(|i| i.detail.as_ref());
            let kyc = detail.and_then(|d| d.subject.kyc.as_ref());
            ExportRow {
                ops_by_method: u.ops_by_method.iter().map(|(m, ops)| (m.clone(), finite(*ops))).collect(),
                host_ids: u.host_ids.clone(),
                reseller_countries: detail.map(|d| codes(&d.subject.reseller_countries)).unwrap_or_default(),
                payment_source_country: detail
                    .and_then(|d| d.subject.payment_source_country)
                    .map(|c| c.to_string()),
                attestation_digest: detail.and_then(|d| d.attestation_digest.clone()),
                kyc_issuer: kyc.map(|k| k.issuer.clone()),
                kyc_jti: kyc.map(|k| k.jti.clone()),
                policy_version,
                legal_name: identity.map(|i| i.legal_name.clone()).unwrap_or_default(),
                countries: identity.map(|i| codes(&i.countries)).unwrap_or_default(),
                beneficial_owner_countries: identity
                    .map(|i| codes(&i.beneficial_owner_countries))
                    .unwrap_or_default(),
                foreign_person: identity.map_or(u.foreign_person, |i| i.foreign_person),
                // Finite whatever was stored: JSON would print a non-finite number as null.
                ops_lower: finite(u.ops_lower),
                estimated_ops: finite(u.estimated_ops),
                ops_upper: finite(u.ops_upper),
                gpu_hours: finite(u.gpu_hours()),
                shared_gpu_hours: finite(u.shared_gpu_seconds / 3600.0),
                guest_gap_gpu_hours: finite(u.guest_gap_gpu_seconds / 3600.0),
                peak_flops: finite(u.peak_flops),
                first_seen: rfc3339(u.first_seen),
                last_seen: rfc3339(u.last_seen),
                hosts: u.hosts,
                findings: findings.remove(&u.tenant).unwrap_or_default(),
                tenant: u.tenant,
            }
        })
        .collect())
}

/// The CSV header.
pub const CSV_HEADER: [&str; 24] = [
    "tenant",
    "legal_name",
    "countries",
    "beneficial_owner_countries",
    "foreign_person",
    "estimated_ops",
    "gpu_hours",
    "peak_flops",
    "first_seen",
    "last_seen",
    "hosts",
    "findings",
    // Added with the operation bounds: at the end, so readers by position keep working.
    "ops_lower",
    "ops_upper",
    "shared_gpu_hours",
    // Added with guest telemetry (issue 18): at the end for the same reason.
    "guest_gap_gpu_hours",
    // Added for filings (issue 19): how the operations were estimated, where, who else is
    // in the chain, the KYC record and the policy.
    "ops_by_method",
    "host_ids",
    "reseller_countries",
    "payment_source_country",
    "attestation_digest",
    "kyc_issuer",
    "kyc_jti",
    "policy_version",
];

/// A text cell as a spreadsheet cannot take it for a formula: prefixed with `'` when it starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return.
pub fn neutralize(value: &str) -> String {
    if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    }
}

/// One CSV field, quoted when it holds a separator, quote or line break (RFC 4180).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

impl ExportRow {
    /// The row with its numbers made finite ([`finite`]): serde_json writes a non-finite
    /// number as `null`, and CSV would read `inf`.
    fn with_finite_numbers(&self) -> ExportRow {
        ExportRow {
            ops_lower: finite(self.ops_lower),
            estimated_ops: finite(self.estimated_ops),
            ops_upper: finite(self.ops_upper),
            gpu_hours: finite(self.gpu_hours),
            shared_gpu_hours: finite(self.shared_gpu_hours),
            guest_gap_gpu_hours: finite(self.guest_gap_gpu_hours),
            peak_flops: finite(self.peak_flops),
            ..self.clone()
        }
    }
}

/// Renders rows in `format`.
pub fn render(rows: &[ExportRow], format: Format) -> Result<String, serde_json::Error> {
    let rows: Vec<ExportRow> = rows.iter().map(ExportRow::with_finite_numbers).collect();
    match format {
        Format::Json => serde_json::to_string_pretty(&rows).map(|s| s + "\n"),
        Format::Csv => {
            let mut out = CSV_HEADER.join(",") + "\r\n";
            for r in &rows {
                // Text cells neutralised, numbers as they are.
                let fields = [
                    neutralize(&r.tenant),
                    neutralize(&r.legal_name),
                    neutralize(&r.countries.join(" ")),
                    neutralize(&r.beneficial_owner_countries.join(" ")),
                    r.foreign_person.to_string(),
                    format!("{:e}", r.estimated_ops),
                    format!("{:.3}", r.gpu_hours),
                    format!("{:e}", r.peak_flops),
                    neutralize(&r.first_seen),
                    neutralize(&r.last_seen),
                    r.hosts.to_string(),
                    neutralize(&r.findings.join(" ")),
                    format!("{:e}", r.ops_lower),
                    format!("{:e}", r.ops_upper),
                    format!("{:.3}", r.shared_gpu_hours),
                    format!("{:.3}", r.guest_gap_gpu_hours),
                    neutralize(
                        &r.ops_by_method
                            .iter()
                            .map(|(method, ops)| format!("{method}={:e}", finite(*ops)))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    neutralize(&r.host_ids.join(" ")),
                    neutralize(&r.reseller_countries.join(" ")),
                    neutralize(r.payment_source_country.as_deref().unwrap_or_default()),
                    neutralize(r.attestation_digest.as_deref().unwrap_or_default()),
                    neutralize(r.kyc_issuer.as_deref().unwrap_or_default()),
                    neutralize(r.kyc_jti.as_deref().unwrap_or_default()),
                    r.policy_version.map(|v| v.to_string()).unwrap_or_default(),
                ];
                out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
                out.push_str("\r\n");
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_and_format() {
        assert_eq!(parse_date("2026-01-31").unwrap(), 1_769_817_600);
        assert_eq!(parse_date("2026-01-31T00:00:00Z").unwrap(), 1_769_817_600);
        assert_eq!(parse_date("2026-01-31T01:00:00+01:00").unwrap(), 1_769_817_600);
        assert_eq!(parse_date("1769817600").unwrap(), 1_769_817_600);
        for bad in ["", "yesterday", "2026-13-01", "2026-01-31T25:00:00Z", "-5"] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
        assert_eq!(rfc3339(1_769_817_600), "2026-01-31T00:00:00Z");
    }

    fn row(tenant: &str, legal_name: &str) -> ExportRow {
        ExportRow {
            tenant: tenant.into(),
            legal_name: legal_name.into(),
            countries: vec!["SG".into()],
            beneficial_owner_countries: vec![],
            foreign_person: true,
            ops_lower: 1e20,
            estimated_ops: 1.5e20,
            ops_upper: 6e20,
            gpu_hours: 2.0,
            shared_gpu_hours: 0.25,
            guest_gap_gpu_hours: 0.5,
            peak_flops: 7.9e15,
            first_seen: rfc3339(1_769_817_600),
            last_seen: rfc3339(1_769_817_660),
            hosts: 1,
            findings: vec!["early_warning#3".into()],
            ops_by_method: [("gpm_pipes".to_owned(), 1.5e20)].into(),
            host_ids: vec!["h1".into()],
            reseller_countries: vec![],
            payment_source_country: None,
            attestation_digest: None,
            kyc_issuer: Some("=cmd|x".into()),
            kyc_jti: None,
            policy_version: Some(3),
        }
    }

    /// Issue 15 item 7: cells a spreadsheet would evaluate are written as text in CSV; JSON
    /// keeps the exact values.
    #[test]
    fn csv_neutralises_formula_cells_and_json_stays_exact() {
        let hostile = [
            ("=HYPERLINK(\"http://x\",\"y\")", "+SUM(A1:A9)"),
            ("-2+3", "@SUM(1)"),
            ("\t=1", "\r=1"),
            ("=cmd|' /C calc'!A0", "Plain Ltd"),
        ];
        let rows: Vec<ExportRow> = hostile.iter().map(|(t, n)| row(t, n)).collect();
        let csv = render(&rows, Format::Csv).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[1],
            r#""'=HYPERLINK(""http://x"",""y"")",'+SUM(A1:A9),SG,,true,1.5e20,2.000,7.9e15,2026-01-31T00:00:00Z,2026-01-31T00:01:00Z,1,early_warning#3,1e20,6e20,0.250,0.500,gpm_pipes=1.5e20,h1,,,,'=cmd|x,,3"#
        );
        assert!(lines[2].starts_with("'-2+3,'@SUM(1),SG,"), "{}", lines[2]);
        assert!(lines[3].starts_with("'\t=1,\"'\r=1\",SG,"), "{:?}", lines[3]);
        assert!(lines[4].starts_with("'=cmd|' /C calc'!A0,Plain Ltd,"), "{}", lines[4]);
        // Every cell of every data row: none starts with a formula character.
        for line in &lines[1..5] {
            for cell in line.split(',') {
                let cell = cell.trim_start_matches('"');
                assert!(!cell.starts_with(['=', '+', '-', '@', '\t', '\r']), "{cell:?} in {line:?}");
            }
        }
        // JSON: the values as they are.
        let json = render(&rows, Format::Json).unwrap();
        let parsed: Vec<ExportRow> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, rows);
        assert_eq!(parsed[0].tenant, "=HYPERLINK(\"http://x\",\"y\")");
        assert_eq!(parsed[2].legal_name, "\r=1");
        // Ordinary values are untouched, numbers are never prefixed.
        assert_eq!(neutralize("Acme GmbH"), "Acme GmbH");
        assert_eq!(neutralize(""), "");
        assert_eq!(neutralize("a=b"), "a=b");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("A, B \"C\""), "\"A, B \"\"C\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
