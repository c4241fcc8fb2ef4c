//! The tenant page's chart, drawn on the server as inline SVG: cumulative operations over
//! time on a log scale, the band from the lower to the upper bound with the point estimate
//! inside it, the policy's thresholds as horizontal lines and the training runs as shaded
//! spans.
//!
//! Server-side SVG rather than a JavaScript chart library: nothing to vendor, audit or keep
//! up to date, no script the page's Content-Security-Policy must allow, the page works in a
//! browser with scripts off and prints as it shows, and the geometry is plain data a unit
//! test checks (every plotted point lies inside the band). Styling is by class, from the
//! console's stylesheet; every text is escaped.

use std::fmt::Write as _;

use super::units::si;
use crate::http::html::esc;

/// One point of the cumulative series: the totals at `at` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// When (the end of the day, or of the last window).
    pub at: i64,
    /// Cumulative lower bound.
    pub lower: f64,
    /// Cumulative point estimate.
    pub point: f64,
    /// Cumulative upper bound.
    pub upper: f64,
}

/// A horizontal threshold line.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// Its label.
    pub label: String,
    /// Operations.
    pub ops: f64,
    /// CSS class (`early-warning`, `training`, `bio`).
    pub class: &'static str,
}

/// A training run, shaded over its span.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpan {
    /// Start of its first window.
    pub start: i64,
    /// End of its last window.
    pub end: i64,
    /// Its tooltip.
    pub label: String,
}

/// What the chart shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    /// The cumulative series, by time.
    pub points: Vec<Point>,
    /// The thresholds.
    pub thresholds: Vec<Threshold>,
    /// The runs.
    pub runs: Vec<RunSpan>,
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 340.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 44.0;

/// The chart's scales: time to x, operations to y (log10), in SVG units.
#[derive(Debug, Clone, Copy)]
struct Scales {
    t0: i64,
    t1: i64,
    lo: i32,
    hi: i32,
}

impl Scales {
    fn of(chart: &Chart) -> Scales {
        let times = chart.points.iter().map(|p| p.at).chain(chart.runs.iter().flat_map(|r| [r.start, r.end]));
        let (t0, t1) = times.fold((i64::MAX, i64::MIN), |(a, b), t| (a.min(t), b.max(t)));
        let (t0, t1) = if t0 > t1 { (0, 86_400) } else { (t0, t1.max(t0.saturating_add(3600))) };
        let values = chart
            .points
            .iter()
            .flat_map(|p| [p.lower, p.point, p.upper])
            .chain(chart.thresholds.iter().map(|t| t.ops))
            .filter(|v| v.is_finite() && *v > 0.0);
        let (min, max) = values.fold((f64::MAX, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if max <= 0.0 {
            (0, 1)
        } else {
            let lo = min.log10().floor() as i32;
            (lo, (max.log10().ceil() as i32).max(lo + 1))
        };
        Scales { t0, t1, lo, hi }
    }

    fn x(&self, t: i64) -> f64 {
        let span = (self.t1 - self.t0).max(1) as f64;
        LEFT + (t.clamp(self.t0, self.t1) - self.t0) as f64 / span * (WIDTH - LEFT - RIGHT)
    }

    /// Values at or below the bottom decade (a lower bound of 0) sit on the axis.
    fn y(&self, v: f64) -> f64 {
        let bottom = HEIGHT - BOTTOM;
        if !v.is_finite() || v <= 0.0 {
            return bottom;
        }
        let f = ((v.log10() - f64::from(self.lo)) / f64::from(self.hi - self.lo)).clamp(0.0, 1.0);
        bottom - f * (bottom - TOP)
    }
}

fn xy(x: f64, y: f64) -> String {
    format!("{x:.1},{y:.1}")
}

/// The chart as an `<svg>` element.
pub fn render(chart: &Chart) -> String {
    let s = Scales::of(chart);
    let (bottom, right) = (HEIGHT - BOTTOM, WIDTH - RIGHT);
    let mut h = String::new();
    let _ = write!(
        h,
        "<svg class=\"chart\" id=\"ops-chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"cumulative operations over time, log scale\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    for run in &chart.runs {
        let (x0, x1) = (s.x(run.start), s.x(run.end));
        let _ = write!(
            h,
            "<rect class=\"run\" x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\"><title>{}</title></rect>",
            (x1 - x0).max(2.0),
            bottom - TOP,
            esc(&run.label)
        );
    }
    for decade in s.lo..=s.hi {
        let y = s.y(10f64.powi(decade));
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\"/>\
             <text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y + 4.0,
            si(10f64.powi(decade), "FLOP")
        );
    }
    let ticks = 6;
    for i in 0..=ticks {
        let t = s.t0 + (s.t1 - s.t0) * i / ticks;
        let x = s.x(t);
        let label = crate::dates::rfc3339(t);
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{bottom}\"/>\
             <text class=\"axis\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text class=\"axis\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            bottom + 16.0,
            esc(label.get(..10).unwrap_or_default()),
            bottom + 30.0,
            esc(label.get(11..16).unwrap_or_default())
        );
    }
    if !chart.points.is_empty() {
        let upper: Vec<String> = chart.points.iter().map(|p| xy(s.x(p.at), s.y(p.upper))).collect();
        let lower: Vec<String> = chart.points.iter().rev().map(|p| xy(s.x(p.at), s.y(p.lower))).collect();
        let _ = write!(h, "<polygon class=\"band\" points=\"{} {}\"/>", upper.join(" "), lower.join(" "));
        let line: Vec<String> = chart.points.iter().map(|p| xy(s.x(p.at), s.y(p.point))).collect();
        let _ = write!(h, "<polyline class=\"point-series\" points=\"{}\"/>", line.join(" "));
        for p in &chart.points {
            let _ = write!(
                h,
                "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{}: {} (lower {}, upper {})</title></circle>",
                s.x(p.at),
                s.y(p.point),
                esc(&crate::dates::rfc3339(p.at)),
                si(p.point, "FLOP"),
                si(p.lower, "FLOP"),
                si(p.upper, "FLOP")
            );
        }
    }
    for t in &chart.thresholds {
        let y = s.y(t.ops);
        let _ = write!(
            h,
            "<line class=\"threshold {}\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\"/>\
             <text class=\"threshold-label {}\" x=\"{:.1}\" y=\"{:.1}\">{} {}</text>",
            t.class,
            t.class,
            right + 6.0,
            y + 4.0,
            esc(&t.label),
            si(t.ops, "FLOP")
        );
    }
    let _ = write!(
        h,
        "<line class=\"axis-line\" x1=\"{LEFT}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\"/>\
         <line class=\"axis-line\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{bottom}\"/></svg>"
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(svg: &str, element: &str, attr: &str) -> Vec<Vec<f64>> {
        svg.split(&format!("<{element} "))
            .skip(1)
            .map(|el| {
                let start = el.find(&format!("{attr}=\"")).unwrap() + attr.len() + 2;
                let value = &el[start..start + el[start..].find('"').unwrap()];
                value.split([' ', ',']).map(|n| n.parse().unwrap()).collect()
            })
            .collect()
    }

    /// Whether (x, y) lies inside (or on) the polygon, by ray casting with a tolerance.
    fn inside(poly: &[(f64, f64)], (x, y): (f64, f64)) -> bool {
        let on_edge = poly.iter().zip(poly.iter().cycle().skip(1)).any(|(a, b)| {
            let cross = (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0);
            let within = x >= a.0.min(b.0) - 0.05 && x <= a.0.max(b.0) + 0.05;
            within && y >= a.1.min(b.1) - 0.05 && y <= a.1.max(b.1) + 0.05 && cross.abs() < 0.5
        });
        let mut crossings = false;
        for (a, b) in poly.iter().zip(poly.iter().cycle().skip(1)) {
            if (a.1 > y) != (b.1 > y) && x < (b.0 - a.0) * (y - a.1) / (b.1 - a.1) + a.0 {
                crossings = !crossings;
            }
        }
        on_edge || crossings
    }

    #[test]
    fn every_point_lies_in_the_band_and_thresholds_are_drawn() {
        let day = 86_400;
        let mut total = (0.0, 0.0, 0.0);
        let points: Vec<Point> = (0..5)
            .map(|d| {
                total = (total.0 + 1e19 * f64::from(d), total.1 + 3e19 + 1e19 * f64::from(d), total.2 + 9e19);
                Point { at: day * (d as i64 + 1), lower: total.0, point: total.1, upper: total.2 }
            })
            .collect();
        let chart = Chart {
            points: points.clone(),
            thresholds: vec![
                Threshold { label: "early warning".into(), ops: 5e20, class: "early-warning" },
                Threshold { label: "training <b>".into(), ops: 1e21, class: "training" },
            ],
            runs: vec![RunSpan { start: day, end: 2 * day, label: "run 1".into() }],
        };
        let svg = render(&chart);
        let band = numbers(&svg, "polygon", "points").remove(0);
        let band: Vec<(f64, f64)> = band.chunks(2).map(|c| (c[0], c[1])).collect();
        assert_eq!(band.len(), 2 * points.len());
        let cx = numbers(&svg, "circle", "cx");
        let cy = numbers(&svg, "circle", "cy");
        assert_eq!(cx.len(), points.len());
        for (x, y) in cx.iter().zip(&cy) {
            assert!(inside(&band, (x[0], y[0])), "({}, {}) outside {band:?}", x[0], y[0]);
        }
        // The first day's lower bound is 0: drawn on the axis, below its point.
        assert!(band.last().unwrap().1 >= cy[0][0]);
        // A point above the upper bound would be outside: the check can fail.
        assert!(!inside(&band, (cx[2][0], Scales::of(&chart).y(1e21))));
        assert!(svg.contains("class=\"threshold training\"") && svg.contains("training &lt;b&gt; 1.0 ZFLOP"));
        assert!(svg.contains("<rect class=\"run\""));
        let scales = Scales::of(&chart);
        assert_eq!((scales.lo, scales.hi), (19, 21));
        assert!(scales.y(1e21) < scales.y(5e20) && scales.y(5e20) < scales.y(1e19));
    }

    #[test]
    fn an_empty_chart_still_draws_axes() {
        let svg = render(&Chart::default());
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(!svg.contains("<polygon"));
    }
}
