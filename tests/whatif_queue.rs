//! What-if with the fair queue and advance reservations (issue 17 §3-4): recorded `wait`
//! requests are re-decided into a simulated queue (granted as capacity frees there, timed out on
//! the virtual clock, cancelled when their caller cancelled), recorded reservations are
//! honoured, and the comparison reports each side's waits beside its rejections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::MemoryStorage;
use allocation_ledger::{
    Admission, Config, Event, EventBody, Ledger, ManualClock, Micros, OpenOptions, Priority, ReservationRequest,
    ResourceRequest, SimObserver, WhatIfOptions,
};
use proptest::prelude::*;
use std::sync::Arc;

fn open(clock: &ManualClock) -> Ledger {
    // The queue alone: what-if does not model preemption (docs/queries.md), so none happens.
    let never = allocation_ledger::PreemptionPolicy {
        high: allocation_ledger::PreemptPolicy::Never,
        critical: allocation_ledger::PreemptPolicy::Never,
        ..Default::default()
    };
    let config = Config { snapshot_every: 0, preemption: never, ..Config::default() };
    let opts =
        OpenOptions::default().config(config).storage(Arc::new(MemoryStorage::new())).clock(Arc::new(clock.clone()));
    Ledger::open_with("/ledger", opts).unwrap()
}

fn pool(workers: u32) -> WhatIfOptions {
    let mut patch = serde_json::Map::new();
    patch.insert("worker_slots".into(), workers.into());
    patch.insert("total_cpu_millicores".into(), (u64::from(workers) * 2_000).into());
    patch.insert("total_memory_mib".into(), (u64::from(workers) * 4_096).into());
    WhatIfOptions { config: Some(patch), ..WhatIfOptions::default() }
}

fn queue(l: &Ledger, req: &ResourceRequest) -> String {
    match l.request_or_queue(req).unwrap() {
        Admission::Pending(p) => p.allocation_id.to_string(),
        Admission::Decided(o) => panic!("{o:?}"),
    }
}

#[test]
fn a_wait_in_reality_is_no_wait_with_a_larger_pool() {
    let clock = ManualClock::at_default_epoch();
    let l = open(&clock);
    let a = l.request_resources(&ResourceRequest::new("a").workers(8).ttl_seconds(600)).unwrap();
    queue(&l, &ResourceRequest::new("w").workers(5).wait(Some(120)));
    clock.advance_seconds(30);
    l.release_resources(&a.allocation_id().to_string()).unwrap();
    clock.advance_seconds(1);

    let same = l.what_if(&WhatIfOptions::default()).unwrap();
    assert_eq!(same.reproduced, Some(true), "{same:?}");
    let c = &same.comparison;
    assert_eq!(c.reality.waits, c.what_if.waits);
    assert_eq!((c.reality.waits.count, c.reality.waits.granted), (1, 1));
    assert!((c.reality.waits.total_wait_seconds - 30.0).abs() < 0.01, "{:?}", c.reality.waits);
    assert_eq!((c.requests, c.reality.granted, c.what_if.granted), (2, 2, 2));

    let larger = l.what_if(&pool(13)).unwrap().comparison;
    assert_eq!(larger.reality.waits.count, 1);
    assert_eq!(larger.what_if.waits.count, 0, "it fits at once");
    assert_eq!((larger.what_if.granted, larger.changes.granted_in_both), (2, 2));
}

#[test]
fn timeouts_run_on_the_virtual_clock_and_cancels_are_replayed() {
    let clock = ManualClock::at_default_epoch();
    let l = open(&clock);
    let _a = l.request_resources(&ResourceRequest::new("a").workers(10).ttl_seconds(3600)).unwrap();
    queue(&l, &ResourceRequest::new("t").workers(4).wait(Some(60)));
    let c = queue(&l, &ResourceRequest::new("c").workers(4).priority(Priority::High).wait(Some(600)));
    clock.advance_seconds(20);
    l.cancel_request(&c).unwrap();
    clock.advance_seconds(50);
    l.cleanup_expired().unwrap();
    clock.advance_seconds(1);

    let same = l.what_if(&WhatIfOptions::default()).unwrap();
    assert_eq!(same.reproduced, Some(true));
    let w = &same.comparison.what_if.waits;
    assert_eq!((w.count, w.granted, w.timed_out, w.cancelled), (2, 0, 1, 1));
    assert_eq!(same.comparison.reality.waits, *w);
    // The timeout is written by the next write after it is due (the cleanup, at 70 s), in
    // reality and on the virtual clock alike.
    assert!((w.max_wait_seconds - 70.0).abs() < 1.0, "{w:?}");
    assert_eq!(same.comparison.what_if.rejections.get("queue_timeout"), Some(&1));

    // Two more workers: neither waits in the what-if... only one fits beside a's 10.
    let larger = l.what_if(&pool(14)).unwrap().comparison;
    assert_eq!(larger.what_if.waits.count, 1, "{:?}", larger.what_if.waits);
    assert_eq!(larger.changes.granted_only_in_what_if, 1);
    // A smaller pool: a (10 workers) is not even valid there, so t and c fit at once.
    let smaller = l.what_if(&pool(9)).unwrap().comparison;
    let w = &smaller.what_if;
    assert_eq!((w.invalid, w.granted, w.waits.count), (1, 2, 0), "{w:?}");
}

#[test]
fn recorded_reservations_are_honoured() {
    let clock = ManualClock::at_default_epoch();
    let l = open(&clock);
    assert!(l.reserve(&ReservationRequest::for_tenant("team-a", 6).window_seconds(0, 3600)).unwrap().is_reserved());
    let o = l.request_resources(&ResourceRequest::new("other").workers(5).ttl_seconds(600)).unwrap();
    assert!(!o.is_granted(), "only 4 outside the reservation");
    let w = queue(&l, &ResourceRequest::new("waits").workers(5).ttl_seconds(600).wait(Some(7200)));
    clock.advance_seconds(3601);
    l.cleanup_expired().unwrap();
    assert!(l.get_allocation(&w).unwrap().unwrap().state.as_str() == "active", "granted when the window closed");
    clock.advance_seconds(1);
    let same = l.what_if(&WhatIfOptions::default()).unwrap();
    assert_eq!(same.reproduced, Some(true));
    let c = &same.comparison;
    assert_eq!(c.what_if.rejections.get("reserved"), Some(&1), "{:?}", c.what_if);
    assert_eq!((c.what_if.waits.count, c.what_if.waits.granted), (1, 1));
    assert!(c.what_if.waits.total_wait_seconds >= 3600.0);
    // With room beside the reservation, nobody is refused or waits.
    let larger = l.what_if(&pool(16)).unwrap().comparison;
    assert_eq!((larger.what_if.rejected, larger.what_if.waits.count), (0, 0));
}

#[derive(Default)]
struct Both {
    real: Vec<(u64, Micros, EventBody)>,
    what_if: Vec<(u64, Micros, EventBody)>,
}

impl SimObserver for Both {
    fn real(&mut self, seq: u64, event: &Event) {
        self.real.push((seq, event.ts_us, event.body.clone()));
    }
    fn what_if(&mut self, seq: u64, ts_us: Micros, body: &EventBody) {
        self.what_if.push((seq, ts_us, body.clone()));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Request { workers: u32, priority: u8, ttl: u64, wait: Option<u64> },
    Release(usize),
    Cancel(usize),
    Advance(u64),
    Cleanup,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..7, 0u8..4, 60u64..400, prop::option::weighted(0.6, 10u64..300))
            .prop_map(|(workers, priority, ttl, wait)| Op::Request { workers, priority, ttl, wait }),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
        3 => (1u64..120).prop_map(Op::Advance),
        1 => Just(Op::Cleanup),
    ]
}

fn run(ops: &[Op]) -> Ledger {
    let clock = ManualClock::at_default_epoch();
    let l = open(&clock);
    let mut ids = Vec::new();
    for op in ops {
        match op {
            Op::Request { workers, priority, ttl, wait } => {
                let p = [Priority::Low, Priority::Normal, Priority::High, Priority::Critical][*priority as usize];
                let mut req =
                    ResourceRequest::new(format!("j{workers}")).workers(*workers).priority(p).ttl_seconds(*ttl);
                if let Some(t) = wait {
                    req = req.wait(Some(*t));
                }
                match l.request_or_queue(&req) {
                    Ok(Admission::Decided(o)) => ids.push(o.allocation_id().to_string()),
                    Ok(Admission::Pending(p)) => ids.push(p.allocation_id.to_string()),
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Release(i) if !ids.is_empty() => {
                l.release_resources(&ids[i % ids.len()]).unwrap();
            }
            Op::Cancel(i) if !ids.is_empty() => {
                let _ = l.cancel_request(&ids[i % ids.len()]);
            }
            Op::Advance(s) => clock.advance_seconds(*s as i64),
            Op::Cleanup => {
                l.cleanup_expired().unwrap();
            }
            _ => {}
        }
    }
    clock.advance_seconds(1);
    l
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// With the recorded config every admission (granted, rejected or queued) is decided as
    /// recorded, and as many requests wait on both sides.
    #[test]
    fn the_recorded_config_reproduces_the_queue(ops in prop::collection::vec(op(), 1..80)) {
        let l = run(&ops);
        let mut both = Both::default();
        let report = l.what_if_observed(&WhatIfOptions::default(), &mut both).unwrap();
        prop_assert_eq!(report.reproduced, Some(true));
        // Every admission decided as recorded (the queue's own timeouts may fall a microsecond
        // apart from reality's when one is due at the instant of a decision: left to compare).
        let (r, w) = (&report.comparison.reality, &report.comparison.what_if);
        prop_assert_eq!(r.waits.count, w.waits.count);
    }
}
