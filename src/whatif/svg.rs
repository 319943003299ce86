//! Reality and the what-if on one chart: per resource, what each held (mean per bucket) and
//! each pool's size. Standalone SVG: no scripts, no external resources.

use super::WhatIfReport;
use crate::domain::clock::Micros;
use std::fmt::Write;

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 90.0;
const PANEL_H: f64 = 170.0;
const PANEL_GAP: f64 = 60.0;
/// (series, colour, dashed): reality held, what-if held, reality pool, what-if pool.
const SERIES: [(&str, &str, bool); 4] = [
    ("reality: allocated", "#3b7dd8", false),
    ("what-if: allocated", "#e67e22", false),
    ("reality: pool", "#3b7dd8", true),
    ("what-if: pool", "#e67e22", true),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn nice_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|v| *v >= max * 1.05)
        .unwrap_or(10.0 * mag)
}

/// The chart.
pub fn render(r: &WhatIfReport) -> String {
    let c = &r.comparison;
    let height = TOP + 3.0 * (PANEL_H + PANEL_GAP);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, "<title>allocation-ledger what-if {} to {}</title>", esc(&c.since), esc(&c.until));
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="28" font-size="18" font-weight="bold">Reality vs what-if</text>"#);
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="48" fill="#555">{} to {} UTC; granted {} vs {}, rejected {} vs {}</text>"##,
        esc(&c.since),
        esc(&c.until),
        c.reality.granted,
        c.what_if.granted,
        c.reality.rejected,
        c.what_if.rejected + c.what_if.invalid
    );
    for (k, (name, colour, dashed)) in SERIES.iter().enumerate() {
        let x = LEFT + k as f64 * 200.0;
        let dash = if *dashed { r#" stroke-dasharray="6 3""# } else { "" };
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="65" x2="{}" y2="65" stroke="{colour}" stroke-width="2"{dash}/>"#,
            x + 24.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="70">{name}</text>"#, x + 30.0);
    }
    for (i, (name, unit)) in [("Workers", "workers"), ("CPU", "cores"), ("Memory", "MiB")].iter().enumerate() {
        panel(&mut s, r, i, name, unit);
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// One resource's panel: four step lines over the window.
fn panel(s: &mut String, r: &WhatIfReport, i: usize, name: &str, unit: &str) {
    let c = &r.comparison;
    let top = TOP + i as f64 * (PANEL_H + PANEL_GAP);
    let bottom = top + PANEL_H;
    let plot_w = WIDTH - LEFT - RIGHT;
    let series: [Vec<f64>; 4] = [
        c.timeline.iter().map(|b| b.reality_allocated[i]).collect(),
        c.timeline.iter().map(|b| b.what_if_allocated[i]).collect(),
        c.timeline.iter().map(|b| b.reality_total[i]).collect(),
        c.timeline.iter().map(|b| b.what_if_total[i]).collect(),
    ];
    let ymax = nice_max(series.iter().flatten().copied().fold(0.0, f64::max));
    let span = (c.until_us - c.since_us).max(1) as f64;
    let x_of = |t: Micros| LEFT + (t - c.since_us) as f64 / span * plot_w;
    let y_of = |v: f64| bottom - v / ymax * PANEL_H;
    let _ = writeln!(s, r#"<g class="panel" id="{}">"#, name.to_lowercase());
    let _ =
        writeln!(s, r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{name} ({unit})</text>"#, top - 8.0);
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let y = y_of(v);
        let _ =
            writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##, LEFT + plot_w);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.1}</text>"#, LEFT - 6.0, y + 4.0);
    }
    for (k, values) in series.iter().enumerate() {
        let (label, colour, dashed) = SERIES[k];
        let mut d = String::new();
        for (b, v) in c.timeline.iter().zip(values) {
            let cmd = if d.is_empty() { "M" } else { "L" };
            let _ = write!(d, "{cmd}{:.1},{:.1} L{:.1},{:.1} ", x_of(b.start_us), y_of(*v), x_of(b.end_us), y_of(*v));
        }
        let dash = if dashed { r#" stroke-dasharray="6 3""# } else { "" };
        let _ = writeln!(
            s,
            r#"<path class="{}" d="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            label.replace([':', ' '], ""),
            d.trim_end()
        );
    }
    let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/>"##);
    let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{bottom}" x2="{:.1}" y2="{bottom}" stroke="#333"/>"##, LEFT + plot_w);
    let _ = writeln!(s, "</g>");
}
