//! Properties of the fair pending queue (issue 17, section 3) over random command sequences
//! with waits, releases, cancels, expiries, pool changes and clock advances (manual clock):
//! never over-commit; a request granted out of FIFO order is a backfill that does not move the
//! head's reserved start later; after every command nothing waiting can start (the head does not
//! fit); a request waiting beyond its aging bound that fits has only earlier arrivals ahead;
//! replay (the fold of the log) equals the live state at every step; a snapshot round trip
//! equals the state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    Admission, Config, EventBody, Ledger, LoggedEvent, ManualClock, Micros, Priority, ResourceRequest, State,
};
use common::{all_events, assert_capacity_accounting, fold, mem_options, MEM_DIR};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Request { workers: u32, priority: Priority, ttl: u64, wait: bool, timeout: u64 },
    Release(usize),
    Cancel(usize),
    Advance(i64),
    Pool(u32),
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High), Just(Priority::Critical)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1..=6u32, priority(), 60..=400u64, prop::bool::weighted(0.8), 30..=500u64)
            .prop_map(|(workers, priority, ttl, wait, timeout)| Op::Request { workers, priority, ttl, wait, timeout }),
        2 => (0..64usize).prop_map(Op::Release),
        1 => (0..64usize).prop_map(Op::Cancel),
        2 => (1..=150i64).prop_map(Op::Advance),
        1 => (8..=12u32).prop_map(Op::Pool),
    ]
}

fn config() -> Config {
    let mut c = Config { worker_slots: 10, ..Config::default() };
    // The queue alone: no preemption (tests/preemption_props.rs has it).
    c.preemption.high = allocation_ledger::PreemptPolicy::Never;
    c.preemption.critical = allocation_ledger::PreemptPolicy::Never;
    c.queue.aging_seconds = 90;
    c.queue.backfill_depth = 8;
    c
}

fn run(l: &Ledger, clock: &ManualClock, ids: &mut Vec<String>, op: &Op) {
    match op {
        Op::Request { workers, priority, ttl, wait, timeout } => {
            let mut req = ResourceRequest::new("j").workers(*workers).priority(*priority).ttl_seconds(*ttl);
            if *wait {
                req = req.wait(Some(*timeout));
            }
            let id = match l.request_or_queue(&req) {
                Ok(Admission::Decided(o)) => o.allocation_id().to_string(),
                Ok(Admission::Pending(p)) => p.allocation_id.to_string(),
                Err(e) => panic!("{e}"),
            };
            ids.push(id);
        }
        Op::Release(i) if !ids.is_empty() => {
            // A pending id is not an allocation yet: releasing it is an error (cancel it instead).
            let _ = l.release_resources(&ids[i % ids.len()]);
        }
        Op::Cancel(i) if !ids.is_empty() => {
            let _ = l.cancel_request(&ids[i % ids.len()]);
        }
        Op::Advance(s) => {
            clock.advance_seconds(*s);
            l.cleanup_expired().unwrap();
        }
        Op::Pool(n) => {
            let c = Config { worker_slots: *n, ..l.with_state(|s| s.config.clone()) };
            let _ = l.reconfigure(c);
        }
        _ => {}
    }
}

/// Every grant made while others waited, and that did not outrank the head, left the head's
/// reserved start where it was (or earlier).
fn check_backfills(events: &[LoggedEvent]) -> Result<(), TestCaseError> {
    let mut s = State::empty(Config::default());
    for e in events {
        let before = match &e.event.body {
            EventBody::Granted(g) => s.head_reservation(e.event.ts_us).and_then(|r| {
                let head = s.queue().get(r.head)?;
                let head_rank = head.effective_rank(e.event.ts_us, aging_us(&s));
                let outranks = g.queued_seq.is_none() && rank(g.priority) > head_rank;
                (r.head != g.allocation_id && !outranks).then_some(r)
            }),
            _ => None,
        };
        s.evolve(e.seq, e.event.ts_us, &e.event.body);
        if let Some(r) = before {
            let after = s.head_reservation(e.event.ts_us).filter(|a| a.head == r.head);
            if let Some(after) = after {
                let later = match (r.start_us, after.start_us) {
                    (Some(b), Some(a)) => a > b,
                    (Some(_), None) => true,
                    _ => false,
                };
                prop_assert!(!later, "grant at seq {} delayed head {}: {:?} -> {:?}", e.seq, r.head, r, after);
            }
        }
    }
    Ok(())
}

fn rank(p: Priority) -> u8 {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

fn aging_us(s: &State) -> i64 {
    i64::try_from(s.config.queue.aging_seconds).unwrap() * 1_000_000
}

/// After a command: nothing waiting can start, and a request waiting past its aging bound that
/// fits has only earlier arrivals ahead of it.
fn check_settled(s: &State, now: Micros) -> Result<(), TestCaseError> {
    prop_assert!(s.decide_queue_step(now).is_none(), "something waiting could start at {now:?}");
    let order: Vec<_> = s.queue().order(now, &s.config.queue).collect();
    for (i, e) in order.iter().enumerate() {
        let bound_us = i64::try_from(s.config.queue.aging_bound_seconds(e.request.priority)).unwrap() * 1_000_000;
        if now - e.queued_us >= bound_us && s.queued_fits_now(e, now) {
            for ahead in &order[..i] {
                prop_assert!(
                    ahead.seq < e.seq,
                    "{} waited past its bound behind the later {}",
                    e.request.allocation_id,
                    ahead.request.allocation_id
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_is_fair_and_replays(ops in prop::collection::vec(op(), 1..60)) {
        let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
        let l = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config())).unwrap();
        let mut ids = Vec::new();
        for op in &ops {
            run(&l, &clock, &mut ids, op);
            let live = l.with_state(Clone::clone);
            let c = l.get_capacity().unwrap();
            assert_capacity_accounting(&c);
            prop_assert!(c.allocated_workers <= c.total_workers);
            live.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert_eq!(&fold(&all_events(&l)), &live);
            prop_assert_eq!(&State::from_data(live.to_data()).unwrap(), &live);
            check_settled(&live, l.now_micros().max(live.last_ts_us + 1))?;
        }
        let events = all_events(&l);
        check_backfills(&events)?;
        if std::env::var_os("QUEUE_PROPS_STATS").is_some() {
            let count = |name: &str| events.iter().filter(|e| e.event.body.type_name() == name).count();
            let from_queue = events.iter().filter(|e| matches!(&e.event.body, EventBody::Granted(g) if g.queued_seq.is_some())).count();
            eprintln!("queued {} granted-from-queue {from_queue} cancelled {} rejected {}", count("queued"), count("cancelled"), count("rejected"));
        }
    }
}
