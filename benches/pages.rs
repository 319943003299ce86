//! Pages of `list_allocations` on a 1M-event ledger (issue 16, §3): 500k request + release
//! pairs (about 1M events, plus the ledger's first event), 1,000 allocations active at the end,
//! the default `terminal_retained` (1,000 ended allocations in memory, the other ~499k only in
//! the log). Measured on a read-only handle over the real files (the CLI's case) and on the
//! writer that built them (the server's case):
//!
//! - the first page (one pass over the log builds the page index), reported apart;
//! - every page of 1,000 through the whole list (p50 / p99 per page), the target being
//!   ≤ 5 ms a page;
//! - pages of a filtered list (one job of 5, released only) and of one page deep into the
//!   list (the cursor of the 400th page), again per page;
//! - the unpaged `list_allocations` once, for comparison.
//!
//! The log is built by the real `Ledger` with a `ManualClock` on a storage that skips fsyncs
//! while building, then fsynced once. `BENCH_QUICK=1` (or `--quick`) builds 20k events instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::{
    AllocationState, Config, Ledger, ListFilter, ManualClock, Micros, OpenOptions, ResourceRequest,
};
use common::{fmt_secs, machine_note, quick, scratch_dir, sync_tree, CountingStorage, Report, Row, Samples};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const ACTIVE: usize = 1_000;
const PAGE: usize = 1_000;
const TARGET_S: f64 = 0.005;

fn config() -> Config {
    Config {
        worker_slots: 4_000,
        worker_base_port: 1024,
        total_cpu_millicores: 4_000_000,
        total_memory_mib: 8_000_000,
        snapshot_every: 100_000,
        ..Config::default()
    }
}

/// `pairs` request + release pairs, `ACTIVE` left active at the end; returns the writer.
fn build(dir: &Path, pairs: usize) -> (Ledger, f64) {
    let t0 = Instant::now();
    let start = Micros::from_micros(chrono::Utc::now().timestamp_micros()) - (pairs as i64) * 20_000 - 3_600_000_000;
    let clock = ManualClock::new(start);
    let opts =
        OpenOptions::default().config(config()).clock(Arc::new(clock.clone())).storage(CountingStorage::no_sync());
    let ledger = Ledger::open_with(dir, opts).unwrap();
    let mut held: VecDeque<String> = VecDeque::new();
    for i in 0..pairs + ACTIVE {
        clock.advance_micros(10_000);
        let req =
            ResourceRequest::new(format!("job-{}", i % 5)).workers(1).ttl_seconds(604_800).tenant(["a", "b"][i % 2]);
        held.push_back(ledger.request_resources(&req).unwrap().allocation_id().to_string());
        if held.len() > ACTIVE {
            clock.advance_micros(10_000);
            ledger.release_resources(&held.pop_front().unwrap()).unwrap();
        }
    }
    (ledger, t0.elapsed().as_secs_f64())
}

/// Every page of `filter`; the time of each.
fn page_through(l: &Ledger, filter: &ListFilter) -> (Samples, usize) {
    let mut times = Vec::new();
    let mut cursor: Option<String> = None;
    let mut n = 0;
    loop {
        let t = Instant::now();
        let page = l.list_page(filter, Some(PAGE), cursor.as_deref()).unwrap();
        times.push(t.elapsed().as_secs_f64());
        n += page.count;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    (Samples::new(times), n)
}

fn page_row(report: &mut Report, id: &str, what: &str, s: &Samples) {
    let p99 = s.pct(99.0);
    report.row(Row {
        id: id.into(),
        what: what.into(),
        value: s.pct(50.0),
        unit: "s".into(),
        shown: format!("p50 {} / p99 {}", fmt_secs(s.pct(50.0)), fmt_secs(p99)),
        against: format!("{} pages", s.len()),
        ratio: None,
        target: format!("≤ {} a page (p99)", fmt_secs(TARGET_S)),
        met: Some(p99 <= TARGET_S),
    });
}

fn measure(report: &mut Report, l: &Ledger, who: &str, total: usize) {
    let all = ListFilter::default();
    let t = Instant::now();
    let first = l.list_page(&all, Some(PAGE), None).unwrap();
    let first_s = t.elapsed().as_secs_f64();
    report.value(
        &format!("{who}_first_page"),
        &format!("{who}: first page (builds the page index)"),
        first_s,
        "s",
        fmt_secs(first_s),
    );
    assert_eq!(first.count, PAGE.min(total));
    let (s, n) = page_through(l, &all);
    assert_eq!(n, total, "every allocation once");
    page_row(report, &format!("{who}_page"), &format!("{who}: every page of {PAGE}, whole list"), &s);
    let released =
        ListFilter { job_id: Some("job-3".into()), state: Some(AllocationState::Released), ..Default::default() };
    let (s, _) = page_through(l, &released);
    page_row(report, &format!("{who}_filtered_page"), &format!("{who}: pages of {PAGE}, one job of 5, released"), &s);
}

fn main() {
    let quick = quick();
    let pairs = if quick { 10_000 } else { 500_000 };
    let mut report = Report::new("pages");
    report.section("Pages of list_allocations (issue 16, §3)");
    machine_note(&mut report);
    let dir = scratch_dir("pages-");
    eprintln!("[pages] building {pairs} request + release pairs");
    let (writer, build_s) = build(dir.path(), pairs);
    let events = writer.status().last_seq;
    let total = pairs + ACTIVE;
    report.note(format!(
        "{events} events: {total} grants, {pairs} releases, {ACTIVE} active at the end, default terminal_retained \
         (1,000); built in {build_s:.1} s by the real Ledger (ManualClock, fsync skipped, then fsynced once)"
    ));
    sync_tree(dir.path());

    let reader = Ledger::open_read_only(dir.path()).unwrap();
    measure(&mut report, &reader, "read-only handle", total);
    drop(reader);
    measure(&mut report, &writer, "writer", total);

    let t = Instant::now();
    let unpaged = writer.list_allocations(None, None).unwrap();
    let unpaged_s = t.elapsed().as_secs_f64();
    assert_eq!(unpaged.len(), total);
    report.value("unpaged", "for comparison: the unpaged list_allocations, once", unpaged_s, "s", fmt_secs(unpaged_s));
    report.finish();
}
