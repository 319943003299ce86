//! A self-contained SVG chart of a [`Timeline`]: allocated against total CPU, memory and
//! workers over time, one panel each, with axes, tick labels, a title and a legend. It opens in
//! any browser; no scripts, no external resources.

use super::Timeline;
use crate::domain::clock::Micros;
use chrono::{DateTime, Utc};
use std::fmt::Write;

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 60.0;
const TOP: f64 = 90.0;
const PANEL_H: f64 = 190.0;
const PANEL_GAP: f64 = 70.0;
const ALLOCATED_COLOR: &str = "#3b7dd8";
const TOTAL_COLOR: &str = "#c0392b";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn time_label(t: Micros, span_us: i64) -> String {
    let Some(dt) = DateTime::<Utc>::from_timestamp_micros(t.as_micros()) else { return t.as_micros().to_string() };
    if span_us <= 2 * 3_600_000_000 {
        dt.format("%H:%M:%S").to_string()
    } else if span_us <= 3 * 86_400_000_000 {
        dt.format("%m-%d %H:%M").to_string()
    } else {
        dt.format("%Y-%m-%d").to_string()
    }
}

fn full_time(t: Micros) -> String {
    DateTime::<Utc>::from_timestamp_micros(t.as_micros())
        .map_or_else(|| t.as_micros().to_string(), |dt| dt.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// A round upper bound for an axis whose data reach `max`.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    for m in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if m * mag >= max * 1.05 {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A panel: name, unit, and (allocated, total) per bucket.
type Panel = (&'static str, &'static str, Vec<(f64, f64)>);

/// Where instants fall on the plot's x axis.
struct Frame {
    t0: Micros,
    span: i64,
    plot_w: f64,
}

impl Frame {
    fn x_of(&self, t: Micros) -> f64 {
        LEFT + (t - self.t0) as f64 / self.span as f64 * self.plot_w
    }
}

/// Renders `tl` as an SVG document.
fn render(tl: &Timeline) -> String {
    let panels: [Panel; 3] = [
        ("CPU", "cores", tl.buckets.iter().map(|b| (b.allocated_cpu, b.total_cpu)).collect()),
        ("Memory", "MiB", tl.buckets.iter().map(|b| (b.allocated_memory, b.total_memory)).collect()),
        ("Workers", "workers", tl.buckets.iter().map(|b| (b.allocated_workers, b.total_workers)).collect()),
    ];
    let height = TOP + 3.0 * PANEL_H + 3.0 * PANEL_GAP;
    let plot_w = WIDTH - LEFT - RIGHT;
    let (t0, t1) = (tl.since_us, tl.until_us.max(tl.since_us + 1));
    let frame = Frame { t0, span: t1 - t0, plot_w };
    let mut s = String::new();
    render_header(&mut s, tl, height);
    for (i, panel) in panels.iter().enumerate() {
        render_panel(&mut s, tl, &frame, i, panel);
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// The document's opening, title and legend.
fn render_header(s: &mut String, tl: &Timeline, height: f64) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r"<title>allocation-ledger utilisation {} to {}</title>", esc(&tl.since), esc(&tl.until));
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#);
    let _ =
        writeln!(s, r#"<text x="{LEFT}" y="28" font-size="18" font-weight="bold">Allocated vs total capacity</text>"#);
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="48" fill="#555">{} to {} UTC, mean per bucket of {} s</text>"##,
        esc(&full_time(tl.since_us)),
        esc(&full_time(tl.until_us)),
        fmt_num(tl.bucket_seconds)
    );
    // Legend.
    let lx = WIDTH - RIGHT - 290.0;
    let _ = writeln!(s, r#"<g class="legend">"#);
    let _ = writeln!(
        s,
        r#"<rect x="{lx}" y="60" width="14" height="10" fill="{ALLOCATED_COLOR}" fill-opacity="0.45" stroke="{ALLOCATED_COLOR}"/>"#
    );
    let _ = writeln!(s, r#"<text x="{}" y="70">allocated</text>"#, lx + 20.0);
    let _ = writeln!(
        s,
        r#"<line x1="{}" y1="65" x2="{}" y2="65" stroke="{TOTAL_COLOR}" stroke-width="2" stroke-dasharray="6 3"/>"#,
        lx + 110.0,
        lx + 135.0
    );
    let _ = writeln!(s, r#"<text x="{}" y="70">total (pool size)</text>"#, lx + 141.0);
    let _ = writeln!(s, "</g>");
}

/// One resource's panel: grid, ticks, the allocated area, the total line and the axes.
fn render_panel(s: &mut String, tl: &Timeline, frame: &Frame, i: usize, (name, unit, values): &Panel) {
    let (plot_w, t0, span) = (frame.plot_w, frame.t0, frame.span);
    let x_of = |t: Micros| frame.x_of(t);
    let top = TOP + i as f64 * (PANEL_H + PANEL_GAP);
    let bottom = top + PANEL_H;
    let ymax = nice_max(values.iter().map(|v| v.0.max(v.1)).fold(0.0, f64::max));
    let y_of = |v: f64| bottom - v / ymax * PANEL_H;
    let _ = writeln!(s, r#"<g class="panel" id="{}">"#, name.to_lowercase());
    let _ = writeln!(s, r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{name}</text>"#, top - 8.0);
    // Grid and y ticks.
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let y = y_of(v);
        let _ =
            writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##, LEFT + plot_w);
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, fmt_num(v));
    }
    // Y axis label.
    let cy = top + PANEL_H / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="22" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 22 {cy:.1})">{name} ({unit})</text>"#
    );
    // X ticks.
    for k in 0..=5 {
        let t = t0 + span * k / 5;
        let x = x_of(t);
        let _ =
            writeln!(s, r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" stroke="#333"/>"##, bottom + 5.0);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            bottom + 18.0,
            esc(&time_label(t, span))
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">time (UTC)</text>"##,
        LEFT + plot_w / 2.0,
        bottom + 34.0
    );
    render_series(s, tl, values, &x_of, &y_of, bottom);
    // Axes.
    let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/>"##);
    let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{bottom}" x2="{:.1}" y2="{bottom}" stroke="#333"/>"##, LEFT + plot_w);
    let _ = writeln!(s, "</g>");
}

/// The allocated values as a filled step area and the totals as a dashed line.
fn render_series(
    s: &mut String,
    tl: &Timeline,
    values: &[(f64, f64)],
    x_of: &dyn Fn(Micros) -> f64,
    y_of: &dyn Fn(f64) -> f64,
    bottom: f64,
) {
    // Allocated: a filled step area.
    if !tl.buckets.is_empty() {
        let mut area = format!("M{:.1},{bottom:.1}", x_of(tl.buckets[0].start_us));
        let mut total = String::new();
        for (b, v) in tl.buckets.iter().zip(values.iter()) {
            let (xa, xb) = (x_of(b.start_us), x_of(b.end_us));
            let _ = write!(area, " L{xa:.1},{:.1} L{xb:.1},{:.1}", y_of(v.0), y_of(v.0));
            let cmd = if total.is_empty() { "M" } else { "L" };
            let _ = write!(total, "{cmd}{xa:.1},{:.1} L{xb:.1},{:.1} ", y_of(v.1), y_of(v.1));
        }
        let _ = write!(area, " L{:.1},{bottom:.1} Z", x_of(tl.buckets[tl.buckets.len() - 1].end_us));
        let _ = writeln!(
            s,
            r#"<path class="allocated" d="{area}" fill="{ALLOCATED_COLOR}" fill-opacity="0.45" stroke="{ALLOCATED_COLOR}" stroke-width="1"/>"#
        );
        let _ = writeln!(
            s,
            r#"<path class="total" d="{}" fill="none" stroke="{TOTAL_COLOR}" stroke-width="2" stroke-dasharray="6 3"/>"#,
            total.trim_end()
        );
    }
}

impl Timeline {
    /// The timeline as a standalone SVG chart: one panel per resource, allocated against total.
    pub fn to_svg(&self) -> String {
        render(self)
    }
}
