//! The fair pending queue's decision cost (issue 17, §3): with 10,000 active allocations (the
//! pool full) and 10,000 queued requests of mixed priorities, sizes and lifetimes, each
//! iteration releases one allocation and lets the queue decide (its grants, backfill included),
//! then queues one more request so the queue stays at 10,000. Target: a release that wakes the
//! queue decides in ≤ 100 µs p99.
//!
//! Two measurements:
//! - **decision**: the pure core alone (`State::decide_queue_step` until nothing more starts),
//!   the events folded outside the timing;
//! - **release**: the whole `Ledger::release_resources` on real files with fsync skipped: the
//!   release's event, the queue's decision and its grants appended in the same command, and the
//!   write; beside it the same release with nobody waiting (each release then re-fills the pool
//!   with a plain request, not timed).
//!
//! `BENCH_QUICK=1` runs 2,000 iterations instead of 20,000.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::{
    Admission, Config, EventBody, Ledger, ManualClock, Micros, OpenOptions, Priority, ResourceRequest, State,
};
use std::sync::Arc;
use std::time::Instant;

const ACTIVE: u32 = 10_000;
const QUEUED: usize = 10_000;

fn config() -> Config {
    let mut c = Config {
        worker_slots: ACTIVE,
        worker_base_port: 1024,
        total_cpu_millicores: u64::from(ACTIVE) * 1_000,
        total_memory_mib: u64::from(ACTIVE) * 2_048,
        snapshot_every: 0,
        ..Config::default()
    };
    c.priority_reserve_percent.low = 0;
    c.queue.max_timeout_seconds = 30 * 86_400;
    c.queue.default_timeout_seconds = 30 * 86_400;
    c
}

/// A deterministic mix: priorities, 1 to 4 workers, lifetimes 1 to 24 h.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn request(&mut self, i: usize) -> ResourceRequest {
        let priority = [Priority::Low, Priority::Normal, Priority::Normal, Priority::High][(self.next() % 4) as usize];
        ResourceRequest::new(format!("q-{i}"))
            .workers(1 + (self.next() % 4) as u32)
            .priority(priority)
            .ttl_seconds(3_600 + self.next() % 82_800)
            .wait(None)
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, v: &[f64], grants: usize) {
    let v = v.to_vec();
    println!(
        "{name:<17} n={} p50={:.1} µs p99={:.1} µs max={:.1} µs ({} grants from the queue)",
        v.len(),
        pct(v.clone(), 0.50),
        pct(v.clone(), 0.99),
        pct(v, 1.0),
        grants
    );
}

/// The pure core: a full pool and a full queue, then release → decide → refill.
fn decision(iterations: usize) {
    let mut s = State::empty(config());
    let mut ts = Micros::from_micros(1_767_225_600_000_000);
    let apply = |s: &mut State, ts: &mut Micros, body: EventBody| {
        *ts += 1;
        s.evolve_owned(s.last_seq + 1, *ts, body);
    };
    apply(&mut s, &mut ts, EventBody::LedgerCreated { ledger_id: "bench".into(), config: config() });
    let mut mix = Mix(0x9E37_79B9_7F4A_7C15);
    let mut active = Vec::new();
    for i in 0..ACTIVE as usize {
        let req = ResourceRequest::new(format!("a-{i}")).workers(1).ttl_seconds(3_600 + mix.next() % 82_800);
        let body = s.decide_admission(&req, ts + 1, s.next_allocation_id()).unwrap();
        let EventBody::Granted(g) = &body else { panic!("{body:?}") };
        active.push(g.allocation_id);
        apply(&mut s, &mut ts, body);
    }
    for i in 0..QUEUED {
        let body = s.decide_admission(&mix.request(i), ts + 1, s.next_allocation_id()).unwrap();
        assert!(matches!(body, EventBody::Queued(_)), "{body:?}");
        apply(&mut s, &mut ts, body);
    }
    let (mut times, mut grants) = (Vec::with_capacity(iterations), 0);
    for i in 0..iterations {
        let k = (mix.next() % active.len() as u64) as usize;
        let id = active.swap_remove(k);
        apply(&mut s, &mut ts, EventBody::Released { allocation_id: id });
        // Every decision of this wake (each grant, then the final "nothing more"), timed;
        // the grants are folded outside the timing.
        let mut took = 0.0;
        loop {
            let t0 = Instant::now();
            let next = s.decide_queue_step(ts + 1);
            took += t0.elapsed().as_secs_f64() * 1e6;
            let Some(g) = next else { break };
            active.push(g.allocation_id);
            grants += 1;
            apply(&mut s, &mut ts, EventBody::Granted(g));
        }
        times.push(took);
        while s.queue().len() < QUEUED {
            let body = s.decide_admission(&mix.request(QUEUED + i), ts + 1, s.next_allocation_id()).unwrap();
            if let EventBody::Granted(g) = &body {
                active.push(g.allocation_id);
            }
            apply(&mut s, &mut ts, body);
        }
    }
    report("decision", &times, grants);
}

/// The whole release through the ledger (real files, fsync skipped: the decision and the
/// write path, not the disk), with `queued` requests waiting.
fn release(iterations: usize, queued: usize) {
    let clock = ManualClock::at_default_epoch();
    let dir = common::scratch_dir("queue-bench");
    let opts = OpenOptions::default()
        .config(config())
        .clock(Arc::new(clock.clone()))
        .storage(common::CountingStorage::no_sync());
    let l = Ledger::open_with(dir.path(), opts).unwrap();
    let mut mix = Mix(0x2545_F491_4F6C_DD1D);
    let mut active = Vec::new();
    for i in 0..ACTIVE as usize {
        let req = ResourceRequest::new(format!("a-{i}")).workers(1).ttl_seconds(3_600 + mix.next() % 82_800);
        active.push(l.request_resources(&req).unwrap().allocation_id().to_string());
    }
    let mut pending = 0;
    for i in 0..queued {
        if let Admission::Pending(_) = l.request_or_queue(&mix.request(i)).unwrap() {
            pending += 1;
        }
    }
    assert_eq!(pending, queued);
    let (mut times, before) = (Vec::with_capacity(iterations), l.metrics().snapshot().grants);
    for i in 0..iterations {
        let k = (mix.next() % active.len() as u64) as usize;
        let id = active.swap_remove(k);
        let t0 = Instant::now();
        l.release_resources(&id).unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e6);
        // Refill: the queue's grants are active now; find them by the ledger's list.
        if queued == 0 {
            let req = ResourceRequest::new(format!("r-{i}")).workers(1).ttl_seconds(3_600 + mix.next() % 82_800);
            active.push(l.request_resources(&req).unwrap().allocation_id().to_string());
            continue;
        }
        if i % 64 == 63 || l.with_state(|s| s.queue().len()) < queued - 64 {
            active = l.with_state(|s| {
                s.allocations()
                    .filter(|a| a.state == allocation_ledger::AllocationState::Active)
                    .map(|a| a.id.to_string())
                    .collect()
            });
            let n = queued - l.with_state(|s| s.queue().len());
            for j in 0..n {
                let _ = l.request_or_queue(&mix.request(QUEUED + i * 64 + j)).unwrap();
            }
        }
    }
    let grants = if queued == 0 { 0 } else { (l.metrics().snapshot().grants - before) as usize };
    report(if queued == 0 { "release, no queue" } else { "release" }, &times, grants);
}

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some() || std::env::args().any(|a| a == "--quick");
    let iterations = if quick { 2_000 } else { 20_000 };
    println!("queue bench: {ACTIVE} active allocations, {QUEUED} queued requests, {iterations} releases");
    decision(iterations);
    release(iterations, QUEUED);
    release(iterations, 0);
}
