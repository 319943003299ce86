//! What-if over a 1M-event history against a full replay of the same log, in the same run
//! (issue 19): the recorded demand re-decided under the recorded config (which must reproduce
//! every decision) and under a pool with 10% more workers (what-if-only grants held for their job's median holding
//! time), each timed against
//! `Ledger::open_read_only` with no snapshot (the parallel full replay). Target: what-if at
//! most 2x the replay's time.
//!
//! The log is built by the real `Ledger` on a `ManualClock` (fsyncs skipped while building,
//! everything fsynced once at the end) over a tight pool, so that requests are rejected for
//! lack of workers. `BENCH_QUICK=1` (or `--quick`) builds 20k events instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::{Clock, Config, Hold, Ledger, ManualClock, OpenOptions, ResourceRequest, WhatIfOptions};
use common::{fmt_secs, machine_note, quick, scratch_dir, sync_tree, CountingStorage, Report, Row, Timed};
use serde_json::json;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

const POOL: u32 = 1_000;

fn config() -> Config {
    Config {
        worker_slots: POOL,
        worker_base_port: 1024,
        total_cpu_millicores: u64::from(POOL) * 1000,
        total_memory_mib: u64::from(POOL) * 2048,
        snapshot_every: 0,
        ..Config::default()
    }
}

/// xorshift64*: repeatable without extra crates.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Builds a ledger of about `target` events: requests of 1 to 4 workers from 500 jobs of 5
/// tenants, the oldest released while more than 300 are held, a short one every 100 left to expire, and a
/// 40-worker one every 500 (often rejected). Returns the directory and the build's seconds.
fn build(target: u64) -> (tempfile::TempDir, u64, f64) {
    let t0 = Instant::now();
    let dir = scratch_dir("whatif-");
    let start = allocation_ledger::SystemClock.now_micros() - (target as i64) * 25_000 - 3_600_000_000;
    let clock = ManualClock::new(start);
    let opts =
        OpenOptions::default().config(config()).clock(Arc::new(clock.clone())).storage(CountingStorage::no_sync());
    let ledger = Ledger::open_with(dir.path(), opts).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut held: VecDeque<String> = VecDeque::new();
    let tenants = ["platform", "search", "ml-infra", "payments", "mobile"];
    let mut i = 0u64;
    while ledger.status().last_seq < target {
        i += 1;
        clock.advance_micros(20_000 + rng.below(20_000) as i64);
        let mut meta = serde_json::Map::new();
        meta.insert("tenant".into(), json!(tenants[(i % 5) as usize]));
        let mut req = ResourceRequest::new(format!("{}-job-{:03}", tenants[(i % 5) as usize], i % 500))
            .workers(1 + rng.below(4) as u32)
            .ttl_seconds(3_600 + rng.below(3_600))
            .metadata(meta);
        if i.is_multiple_of(3) {
            req = req.mcp_server("github");
        }
        let o = ledger.request_resources(&req).unwrap();
        if o.is_granted() {
            held.push_back(o.allocation_id().to_string());
        }
        while held.len() > 300 {
            ledger.release_resources(&held.pop_front().unwrap()).unwrap();
        }
        if i.is_multiple_of(100) {
            let short = ResourceRequest::new(format!("short-{}", i % 100)).workers(2).ttl_seconds(60 + rng.below(240));
            ledger.request_resources(&short).unwrap();
        }
        if i.is_multiple_of(500) {
            ledger
                .request_resources(&ResourceRequest::new(format!("big-{}", i % 50)).workers(40).ttl_seconds(60))
                .unwrap();
        }
    }
    let events = ledger.status().last_seq;
    drop(ledger);
    sync_tree(dir.path());
    (dir, events, t0.elapsed().as_secs_f64())
}

fn main() {
    let quick = quick();
    let mut report = Report::new("whatif");
    let target = if quick { 20_000u64 } else { 1_000_000 };
    report.section("What-if against full replay (issue 19)");
    machine_note(&mut report);
    eprintln!("[whatif] building a {target}-event ledger");
    let (dir, events, build_s) = build(target);
    let reps = if quick { 1 } else { 3 };
    let replay_t = Timed::of(reps, || {
        std::hint::black_box(Ledger::open_read_only(dir.path()).unwrap());
    });
    let ledger = Ledger::open_read_only(dir.path()).unwrap();
    assert_eq!(ledger.recovery_report().events_replayed, events);
    let mut recorded = None;
    let same_t = Timed::of(reps, || recorded = Some(ledger.what_if(&WhatIfOptions::default()).unwrap()));
    let recorded = recorded.unwrap();
    assert_eq!(recorded.reproduced, Some(true), "the recorded config must reproduce every decision");
    let mut patch = serde_json::Map::new();
    patch.insert("worker_slots".into(), json!(POOL + POOL / 10));
    patch.insert("total_cpu_millicores".into(), json!(u64::from(POOL + POOL / 10) * 1000));
    patch.insert("total_memory_mib".into(), json!(u64::from(POOL + POOL / 10) * 2048));
    // Requests granted only in the what-if are held for their job's median holding time (their
    // TTL, 1-2 h, would hold them far longer than this workload's grants are held).
    let opts = WhatIfOptions { config: Some(patch), hold: Hold::MedianOfJob, ..WhatIfOptions::default() };
    let mut larger = None;
    let larger_t = Timed::of(reps, || larger = Some(ledger.what_if(&opts).unwrap()));
    let larger = larger.unwrap();
    let c = &recorded.comparison;
    report.note(format!(
        "{events} events, built in {build_s:.1} s: {} requests, {} granted, {} rejected ({} for workers); with 10% more \
         workers: {} granted, {} rejected",
        c.requests,
        c.reality.granted,
        c.reality.rejected,
        c.reality.rejections.get("insufficient_workers").copied().unwrap_or(0),
        larger.comparison.what_if.granted,
        larger.comparison.what_if.rejected
    ));
    report.value(
        "replay_s",
        "full replay: Ledger::open_read_only, no snapshot",
        replay_t.best(),
        "s",
        replay_t.secs_shown(),
    );
    for (id, what, t) in [
        ("whatif_recorded_s", "what-if, recorded config (reproduces every decision)", &same_t),
        ("whatif_larger_s", "what-if, 10% more workers, CPU, memory; hold median-of-job", &larger_t),
    ] {
        let ratio = t.best() / replay_t.best();
        report.row(Row {
            id: id.into(),
            what: what.into(),
            value: t.best(),
            unit: "s".into(),
            shown: t.secs_shown(),
            against: format!("full replay {}", fmt_secs(replay_t.best())),
            ratio: Some(ratio),
            target: "<= 2x replay".into(),
            met: Some(ratio <= 2.0),
        });
    }
    report.note(format!("each measurement ran {reps} times; the best run is the figure, the median in parentheses"));
    report.finish();
}
