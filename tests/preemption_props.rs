//! Property tests of preemption (issue 17 §2) over random command sequences on the manual
//! clock: only strictly lower priorities are ever preempted, never a non-preemptible
//! allocation, the pool is never over-committed, and a replay of the log equals the live state
//! at every step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{AllocationState, Config, EventBody, Ledger, ManualClock, Priority, ResourceRequest};
use common::{all_events, fold, mem_options, MEM_DIR};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Request { workers: u32, priority: Priority, protect: bool, wait: bool, ttl: u64 },
    Release(usize),
    Cancel(usize),
    Advance(i64),
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High), Just(Priority::Critical)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=6u32, priority(), any::<bool>(), any::<bool>(), prop_oneof![Just(60u64), Just(600)])
            .prop_map(|(workers, priority, protect, wait, ttl)| Op::Request { workers, priority, protect, wait, ttl }),
        2 => (0..16usize).prop_map(Op::Release),
        1 => (0..16usize).prop_map(Op::Cancel),
        2 => prop_oneof![Just(1i64), Just(15), Just(31), Just(61)].prop_map(Op::Advance),
    ]
}

fn run(l: &Ledger, clock: &ManualClock, op: &Op, ids: &mut Vec<String>) {
    match op {
        Op::Request { workers, priority, protect, wait, ttl } => {
            let mut req = ResourceRequest::new("j").workers(*workers).priority(*priority).ttl_seconds(*ttl);
            if *protect && *priority == Priority::Critical {
                req = req.preemptible(false);
            }
            if *wait {
                req = req.wait(Some(45));
            }
            // Never blocks: `request_or_queue` answers `pending` for a preemption in grace.
            match l.request_or_queue(&req).unwrap() {
                allocation_ledger::Admission::Decided(o) => ids.push(o.allocation_id().to_string()),
                allocation_ledger::Admission::Pending(p) => ids.push(p.allocation_id.to_string()),
            }
        }
        Op::Release(i) => {
            if let Some(id) = ids.get(i % ids.len().max(1)) {
                let _ = l.release_resources(id);
            }
        }
        Op::Cancel(i) => {
            if let Some(id) = ids.get(i % ids.len().max(1)) {
                let _ = l.cancel_request(id);
            }
        }
        Op::Advance(s) => {
            clock.advance_seconds(*s);
            l.cleanup_expired().unwrap();
        }
    }
}

fn check(l: &Ledger, seen: &mut usize) {
    let events = all_events(l);
    let replayed = fold(&events);
    let live = l.with_state(Clone::clone);
    assert_eq!(replayed, live, "replay equals the live state");
    let total = live.total();
    assert!(live.allocated().workers <= total.workers, "over-committed workers");
    assert!(live.allocated().cpu_millicores <= total.cpu_millicores, "over-committed CPU");
    assert!(live.allocated().memory_mib <= total.memory_mib, "over-committed memory");
    for e in &events[*seen..] {
        let (victims, by): (Vec<_>, Priority) = match &e.event.body {
            EventBody::Preempted(p) => (vec![p.allocation_id], p.preemptor_priority),
            EventBody::Preempting(p) => (p.victims.clone(), p.priority),
            _ => continue,
        };
        for v in victims {
            let a = live.allocation(v).expect("victims stay in memory in these short runs");
            assert!(a.priority < by, "{:?} preempted by {:?}", a.priority, by);
            assert!(a.preemptible, "a non-preemptible allocation was preempted");
        }
    }
    // Victims marked in grace belong to a waiting preemptor.
    for a in live.allocations().filter(|a| a.state == AllocationState::Active) {
        if let Some(m) = a.preempt {
            assert!(live.queue().get(m.by).is_some(), "{} marked by {} which does not wait", a.id, m.by);
        }
    }
    *seen = events.len();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn preemption_holds_its_rules(grace in prop_oneof![Just(0u64), Just(30)], ops in prop::collection::vec(op(), 1..40)) {
        let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
        let config = Config { preemption_grace_seconds: grace, ..Config::default() };
        let l = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config)).unwrap();
        let mut ids = Vec::new();
        let mut seen = 0;
        for op in &ops {
            run(&l, &clock, op, &mut ids);
            check(&l, &mut seen);
        }
    }
}
