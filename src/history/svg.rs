//! A self-contained SVG chart of a [`Timeline`]: allocated against total CPU, memory and
//! workers over time, one panel each (or one panel of workers when CPU and memory are a fixed
//! multiple of them, so that the three would be the same picture), with axes, ticks at round
//! times, marks for rejections and expiries, a title and a legend. It opens in any browser; no
//! scripts, no external resources.

use super::Timeline;
use crate::domain::clock::Micros;
use crate::domain::event::{EventBody, LoggedEvent};
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
const REJECTED_COLOR: &str = "#e67e22";
const EXPIRED_COLOR: &str = "#7f8c8d";
/// Preemptions: a circle where a grace begins, a triangle where a victim is preempted.
const PREEMPT_COLOR: &str = "#c0392b";
/// Reserved windows: a faint band behind the series.
const RESERVED_COLOR: &str = "#8e44ad";
const SECOND_US: i64 = 1_000_000;
const DAY_US: i64 = 86_400 * SECOND_US;
/// Tick spacings the x axis may use, in seconds: the first that gives at most `MAX_X_TICKS`
/// ticks is taken (beyond the last, whole multiples of a week).
const TICK_STEPS_SECONDS: [i64; 22] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200, 86_400, 172_800, 345_600,
    604_800, 1_209_600,
];
const MAX_X_TICKS: i64 = 8;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The spacing of the x ticks: a round duration giving at most `MAX_X_TICKS` ticks.
fn tick_step_us(span_us: i64) -> i64 {
    let span_us = span_us.max(1);
    for step in TICK_STEPS_SECONDS {
        if span_us / (step * SECOND_US) <= MAX_X_TICKS {
            return step * SECOND_US;
        }
    }
    let week = 7 * DAY_US;
    week * (span_us / week / MAX_X_TICKS + 1)
}

/// The x ticks of `[t0, t1]`: the multiples of the step (UTC midnights for days) inside it.
fn x_ticks(t0: Micros, t1: Micros) -> (Vec<Micros>, i64) {
    let step = tick_step_us(t1 - t0);
    let first = t0.as_micros().div_euclid(step) * step + if t0.as_micros().rem_euclid(step) == 0 { 0 } else { step };
    let ticks = (0..).map(|k| first + k * step).take_while(|t| *t <= t1.as_micros()).map(Micros::from_micros).collect();
    (ticks, step)
}

/// A tick's label: seconds only when the step has them, the date when the window spans days.
fn time_label(t: Micros, step_us: i64, span_us: i64) -> String {
    let Some(dt) = DateTime::<Utc>::from_timestamp_micros(t.as_micros()) else { return t.as_micros().to_string() };
    let format = if step_us >= DAY_US {
        "%Y-%m-%d"
    } else if span_us > DAY_US {
        "%m-%d %H:%M"
    } else if step_us % (60 * SECOND_US) == 0 {
        "%H:%M"
    } else {
        "%H:%M:%S"
    };
    dt.format(format).to_string()
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

/// A panel: its id, title, axis label, and (allocated, total) per bucket.
type Panel = (&'static str, String, String, Vec<(f64, f64)>);

/// A mark on the time axis: a rejection (at its event) or an expiry (at its deadline, when it
/// stopped holding resources).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mark {
    Rejected(Micros),
    Expired(Micros),
    /// A preemption's grace began (at its `preempting` event).
    Preempting(Micros),
    /// A victim stopped holding its resources (at its `preempted` event).
    Preempted(Micros),
}

impl Mark {
    /// When, and the class, colour and whether it is drawn as a triangle (else a circle).
    fn style(self) -> (Micros, &'static str, &'static str, bool) {
        match self {
            Mark::Rejected(t) => (t, "rejected", REJECTED_COLOR, true),
            Mark::Expired(t) => (t, "expired", EXPIRED_COLOR, false),
            Mark::Preempting(t) => (t, "preempting", PREEMPT_COLOR, false),
            Mark::Preempted(t) => (t, "preempted", PREEMPT_COLOR, true),
        }
    }
}

fn marks_of(events: &[LoggedEvent]) -> Vec<Mark> {
    events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::Rejected(_) => Some(Mark::Rejected(e.event.ts_us)),
            EventBody::Expired { deadline_us, .. } => Some(Mark::Expired(*deadline_us)),
            EventBody::Preempting(_) => Some(Mark::Preempting(e.event.ts_us)),
            EventBody::Preempted(_) => Some(Mark::Preempted(e.event.ts_us)),
            _ => None,
        })
        .collect()
}

/// CPU and memory per worker when, in every bucket, the CPU and memory allocated are that
/// multiple of the workers allocated (one worker size, no MCP server costs): then the three
/// panels' allocated areas are the same picture, and one panel is drawn. `None` when nothing
/// was allocated.
fn per_worker(tl: &Timeline) -> Option<(f64, f64)> {
    let workers: f64 = tl.buckets.iter().map(|b| b.allocated_workers).sum();
    if workers <= 0.0 {
        return None;
    }
    let cpu = tl.buckets.iter().map(|b| b.allocated_cpu).sum::<f64>() / workers;
    let memory = tl.buckets.iter().map(|b| b.allocated_memory).sum::<f64>() / workers;
    let same = |v: f64, workers: f64, per: f64| (v - workers * per).abs() <= 1e-9 * v.abs().max(1.0);
    let proportional = tl.buckets.iter().all(|b| {
        same(b.allocated_cpu, b.allocated_workers, cpu) && same(b.allocated_memory, b.allocated_workers, memory)
    });
    proportional.then_some((cpu, memory))
}

/// A number with at most two decimals, without trailing zeros.
fn exact(v: f64) -> String {
    format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
}

fn panels(tl: &Timeline) -> Vec<Panel> {
    let workers = tl.buckets.iter().map(|b| (b.allocated_workers, b.total_workers)).collect();
    if let Some((cpu, memory)) = per_worker(tl) {
        // The pools may hold more than the workers (room for MCP servers): say how much.
        let pool_cpu = tl.buckets.iter().map(|b| b.total_cpu).fold(0.0, f64::max);
        let pool_memory = tl.buckets.iter().map(|b| b.total_memory).fold(0.0, f64::max);
        let title = format!(
            "Workers: CPU and memory follow them (pools of {} CPU, {} MiB)",
            exact(pool_cpu),
            exact(pool_memory)
        );
        let label = format!("Workers (each {} CPU, {} MiB)", exact(cpu), exact(memory));
        return vec![("workers", title, label, workers)];
    }
    let cpu = tl.buckets.iter().map(|b| (b.allocated_cpu, b.total_cpu)).collect();
    let memory = tl.buckets.iter().map(|b| (b.allocated_memory, b.total_memory)).collect();
    vec![
        ("cpu", "CPU".into(), "CPU (cores)".into(), cpu),
        ("memory", "Memory".into(), "Memory (MiB)".into(), memory),
        ("workers", "Workers".into(), "Workers".into(), workers),
    ]
}

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

/// Renders `tl` as an SVG document, with `marks` on every panel.
fn render(tl: &Timeline, marks: &[Mark]) -> String {
    render_with_windows(tl, marks, &[])
}

/// The reservation windows among `events`: `(start, end, workers)` of each `reserved`, cut
/// short at its `reservation_cancelled` if that is among them too.
fn windows_of(events: &[LoggedEvent]) -> Vec<(Micros, Micros, u32)> {
    let mut windows: Vec<(crate::domain::reservation::ReservationId, Micros, Micros, u32)> = Vec::new();
    for e in events {
        match &e.event.body {
            EventBody::Reserved(r) => windows.push((r.reservation_id, r.start_us, r.end_us, r.resources.workers)),
            EventBody::ReservationCancelled { reservation_id } => {
                for w in windows.iter_mut().filter(|w| w.0 == *reservation_id) {
                    w.2 = w.2.min(e.event.ts_us.max(w.1));
                }
            }
            _ => {}
        }
    }
    windows.into_iter().filter(|w| w.2 > w.1).map(|(_, s, e, n)| (s, e, n)).collect()
}

/// Reserved windows as bands across a panel (clipped to the chart), each titled with its size.
fn render_windows(s: &mut String, frame: &Frame, top: f64, windows: &[(Micros, Micros, u32)]) {
    if windows.is_empty() {
        return;
    }
    let t1 = frame.t0 + frame.span;
    let _ = writeln!(s, r#"<g class="reserved">"#);
    for &(start, end, workers) in windows {
        if end <= frame.t0 || start >= t1 {
            continue;
        }
        let (x0, x1) = (frame.x_of(start.max(frame.t0)), frame.x_of(end.min(t1)));
        let _ = writeln!(
            s,
            r#"<rect class="reserved" x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{PANEL_H:.1}" fill="{RESERVED_COLOR}" fill-opacity="0.12"><title>{workers} workers reserved</title></rect>"#,
            (x1 - x0).max(1.0)
        );
    }
    let _ = writeln!(s, "</g>");
}

/// [`render`] with reservation `windows` shaded behind every panel's marks.
fn render_with_windows(tl: &Timeline, marks: &[Mark], windows: &[(Micros, Micros, u32)]) -> String {
    let panels = panels(tl);
    let height = TOP + panels.len() as f64 * (PANEL_H + PANEL_GAP);
    let plot_w = WIDTH - LEFT - RIGHT;
    let (t0, t1) = (tl.since_us, tl.until_us.max(tl.since_us + 1));
    let frame = Frame { t0, span: t1 - t0, plot_w };
    let marks: Vec<Mark> = marks.iter().copied().filter(|m| (t0..=t1).contains(&m.style().0)).collect();
    let mut s = String::new();
    render_header(&mut s, tl, height, &marks);
    for (i, panel) in panels.iter().enumerate() {
        render_panel(&mut s, tl, &frame, i, panel);
        render_windows(&mut s, &frame, TOP + i as f64 * (PANEL_H + PANEL_GAP), windows);
        render_marks(&mut s, &frame, TOP + i as f64 * (PANEL_H + PANEL_GAP), &marks);
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// Rejections (orange triangles) and expiries (grey circles) along the top of a panel, with
/// a faint line down through it; at most one of each kind per pixel column.
fn render_marks(s: &mut String, frame: &Frame, top: f64, marks: &[Mark]) {
    let mut drawn = std::collections::HashSet::new();
    let _ = writeln!(s, r#"<g class="marks">"#);
    for m in marks {
        let (t, class, color, rejected) = m.style();
        let x = frame.x_of(t);
        #[allow(clippy::cast_possible_truncation, reason = "a pixel column of a 1000-wide chart")]
        if !drawn.insert((x.round() as i64, class)) {
            continue;
        }
        let bottom = top + PANEL_H;
        let _ = writeln!(
            s,
            r#"<line class="{class}" x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="{color}" stroke-opacity="0.35"/>"#
        );
        if rejected {
            let _ = writeln!(
                s,
                r#"<path class="{class}" d="M{:.1},{top:.1} L{:.1},{top:.1} L{x:.1},{:.1} Z" fill="{color}"/>"#,
                x - 4.0,
                x + 4.0,
                top + 7.0
            );
        } else {
            let _ =
                writeln!(s, r#"<circle class="{class}" cx="{x:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#, top + 4.0);
        }
    }
    let _ = writeln!(s, "</g>");
}

/// The document's opening, title and legend.
fn render_header(s: &mut String, tl: &Timeline, height: f64, marks: &[Mark]) {
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
    let rejections = marks.iter().filter(|m| matches!(m, Mark::Rejected(_))).count();
    let expiries = marks.iter().filter(|m| matches!(m, Mark::Expired(_))).count();
    if !marks.is_empty() {
        // On the legend's row, left of it.
        let _ = writeln!(
            s,
            r#"<path d="M{:.1},61 L{:.1},61 L{:.1},68 Z" fill="{REJECTED_COLOR}"/>"#,
            lx - 254.0,
            lx - 246.0,
            lx - 250.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="70">rejections ({rejections})</text>"#, lx - 240.0);
        let _ = writeln!(s, r#"<circle cx="{}" cy="65" r="3.5" fill="{EXPIRED_COLOR}"/>"#, lx - 120.0);
        let _ = writeln!(s, r#"<text x="{}" y="70">expiries ({expiries})</text>"#, lx - 112.0);
    }
    let _ = writeln!(s, "</g>");
}

/// One resource's panel: grid, ticks, the allocated area, the total line and the axes.
fn render_panel(s: &mut String, tl: &Timeline, frame: &Frame, i: usize, (id, title, label, values): &Panel) {
    let (plot_w, t0, span) = (frame.plot_w, frame.t0, frame.span);
    let x_of = |t: Micros| frame.x_of(t);
    let top = TOP + i as f64 * (PANEL_H + PANEL_GAP);
    let bottom = top + PANEL_H;
    let ymax = nice_max(values.iter().map(|v| v.0.max(v.1)).fold(0.0, f64::max));
    let y_of = |v: f64| bottom - v / ymax * PANEL_H;
    let _ = writeln!(s, r#"<g class="panel" id="{id}">"#);
    let _ =
        writeln!(s, r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{}</text>"#, top - 8.0, esc(title));
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
        r#"<text x="22" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 22 {cy:.1})">{}</text>"#,
        esc(label)
    );
    // X ticks, at round times.
    let (ticks, step) = x_ticks(t0, t0 + span);
    for t in ticks {
        let x = x_of(t);
        let _ =
            writeln!(s, r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" stroke="#333"/>"##, bottom + 5.0);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            bottom + 18.0,
            esc(&time_label(t, step, span))
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
        render(self, &[])
    }

    /// [`Timeline::to_svg`] with the window's rejections and expiries marked, and the windows
    /// of the reservations recorded among `events` shaded; `events` may be any events (the
    /// others are ignored), e.g. those `Ledger::for_each_event` gives for the window.
    pub fn to_svg_with_events(&self, events: &[LoggedEvent]) -> String {
        render_with_windows(self, &marks_of(events), &windows_of(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{Event, RejectReason, Rejection};
    use crate::domain::model::{AllocationId, Priority};
    use crate::history::TimelineBucket;

    const HOUR_US: i64 = 3600 * SECOND_US;

    fn bucket(start_us: i64, end_us: i64, workers: f64, cpu: f64, memory: f64) -> TimelineBucket {
        TimelineBucket {
            start: String::new(),
            end: String::new(),
            start_us: Micros::from_micros(start_us),
            end_us: Micros::from_micros(end_us),
            allocated_cpu: cpu,
            total_cpu: 16.0,
            cpu_utilisation: Some(cpu / 16.0),
            allocated_memory: memory,
            total_memory: 32768.0,
            memory_utilisation: Some(memory / 32768.0),
            allocated_workers: workers,
            total_workers: 10.0,
            worker_utilisation: Some(workers / 10.0),
            peak_allocated_cpu: cpu,
            peak_allocated_memory: 0,
            peak_allocated_workers: 0,
            integrals: [0; 6],
        }
    }

    fn timeline(buckets: Vec<TimelineBucket>) -> Timeline {
        let (since_us, until_us) = (buckets[0].start_us, buckets[buckets.len() - 1].end_us);
        Timeline { since: String::new(), until: String::new(), since_us, until_us, bucket_seconds: 1800.0, buckets }
    }

    #[test]
    fn ticks_fall_on_round_times() {
        // 10:07:13 to 13:52:01: hourly ticks at 11:00, 12:00, 13:00... every 30 min here.
        let t0 = Micros::from_micros(1_796_378_833_000_000);
        let t1 = t0 + (3 * HOUR_US + 45 * 60 * SECOND_US);
        let (ticks, step) = x_ticks(t0, t1);
        assert_eq!(step, 1800 * SECOND_US);
        assert!(ticks.iter().all(|t| t.as_micros() % step == 0), "{ticks:?}");
        assert!(ticks.len() <= 8 && ticks.len() >= 6);
        assert_eq!(time_label(ticks[0], step, t1 - t0).len(), "HH:MM".len());
        let (ticks, step) = x_ticks(t0, t0 + 90 * SECOND_US);
        assert_eq!(step, 15 * SECOND_US);
        assert!(time_label(ticks[0], step, 90 * SECOND_US).ends_with(":15") || ticks[0].as_micros() % step == 0);
        let (ticks, step) = x_ticks(t0, t0 + 20 * DAY_US);
        assert_eq!(step, 4 * DAY_US);
        assert_eq!(time_label(ticks[0], step, 20 * DAY_US).len(), "YYYY-MM-DD".len());
    }

    #[test]
    fn one_panel_when_cpu_and_memory_follow_workers() {
        let h = HOUR_US;
        let prop = timeline(vec![bucket(0, h, 2.0, 3.2, 6553.6), bucket(h, 2 * h, 5.0, 8.0, 16384.0)]);
        let (cpu, memory) = per_worker(&prop).unwrap();
        assert!((cpu - 1.6).abs() < 1e-9 && (memory - 3276.8).abs() < 1e-9);
        let svg = prop.to_svg();
        assert_eq!(svg.matches(r#"class="panel""#).count(), 1);
        assert!(svg.contains("Workers (each 1.6 CPU, 3276.8 MiB)"), "{svg}");
        assert!(svg.contains("pools of 16 CPU, 32768 MiB"), "{svg}");
        // The built-in pool: workers of 1 CPU and 2048 MiB in pools of 16 CPU and 32768 MiB
        // (room for MCP servers): the allocated areas still coincide.
        let builtin = timeline(vec![bucket(0, h, 2.0, 2.0, 4096.0), bucket(h, 2 * h, 7.5, 7.5, 15360.0)]);
        assert_eq!(per_worker(&builtin), Some((1.0, 2048.0)));
        assert_eq!(builtin.to_svg().matches(r#"class="panel""#).count(), 1);
        // Nothing allocated: the three panels.
        let idle = timeline(vec![bucket(0, h, 0.0, 0.0, 0.0)]);
        assert_eq!(per_worker(&idle), None);
        assert!(!svg.contains("Workers (workers)"));
        // An MCP server's cost: CPU no longer follows workers.
        let mixed = timeline(vec![bucket(0, h, 2.0, 3.7, 6553.6), bucket(h, 2 * h, 5.0, 8.0, 16384.0)]);
        assert_eq!(per_worker(&mixed), None);
        let svg = mixed.to_svg();
        assert_eq!(svg.matches(r#"class="panel""#).count(), 3);
        assert!(svg.contains("CPU (cores)") && svg.contains("Memory (MiB)") && svg.contains(">Workers</text>"));
    }

    #[test]
    fn rejections_and_expiries_are_marked() {
        let h = HOUR_US;
        let tl = timeline(vec![bucket(0, h, 2.0, 3.2, 6553.6)]);
        let id = AllocationId::from_u64(1);
        let rejection = Rejection {
            allocation_id: id,
            job_id: "j".into(),
            priority: Priority::Normal,
            ttl_seconds: 60,
            workers: 20,
            mcp_servers: vec![],
            reason: RejectReason::InsufficientWorkers,
            needed: 20,
            available: 8,
            error: "no".into(),
            metadata: Default::default(),
            idempotency_key: None,
            max_lifetime_seconds: None,
            tenant: None,
            quota: None,
        };
        let events = vec![
            LoggedEvent { seq: 2, event: Event::new(Micros::from_micros(h / 4), EventBody::Rejected(rejection)) },
            LoggedEvent {
                seq: 3,
                event: Event::new(
                    Micros::from_micros(h),
                    EventBody::Expired { allocation_id: id, deadline_us: Micros::from_micros(h / 2) },
                ),
            },
            LoggedEvent {
                seq: 4,
                event: Event::new(Micros::from_micros(h / 2), EventBody::Released { allocation_id: id }),
            },
        ];
        let svg = tl.to_svg_with_events(&events);
        assert_eq!(svg.matches(r#"<path class="rejected""#).count(), 1);
        assert_eq!(svg.matches(r#"<circle class="expired""#).count(), 1);
        assert!(svg.contains("rejections (1)") && svg.contains("expiries (1)"));
        assert!(!tl.to_svg().contains("rejections ("), "no legend entry without marks");
    }
}
