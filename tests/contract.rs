//! The scheduler's contract (issue 15) through the library: idempotent requests, lease
//! renewal, plan then act with `expected_seq`. Property tests over random interleavings on the
//! manual clock, and the races and restarts the contract promises to survive.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    AllocationState, Clock, Config, Error, EventBody, GroupBy, Ledger, ManualClock, Priority, RequestOutcome,
    ResourceRequest,
};
use common::{all_events, assert_capacity_accounting, fold, mem_options, MEM_DIR};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

fn open(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> Ledger {
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, config)).unwrap()
}

fn config() -> Config {
    Config { snapshot_every: 7, idempotency_window_seconds: 600, min_ttl_seconds: 10, ..Config::default() }
}

fn keyed(job: &str, workers: u32, key: &str) -> ResourceRequest {
    ResourceRequest::new(job).workers(workers).ttl_seconds(120).idempotency_key(key)
}

/// Granted events per idempotency key, each with its timestamp.
fn grants_by_key(ledger: &Ledger) -> BTreeMap<String, Vec<allocation_ledger::Micros>> {
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for e in all_events(ledger) {
        if let EventBody::Granted(g) = &e.event.body {
            if let Some(k) = &g.idempotency_key {
                out.entry(k.to_string()).or_default().push(e.event.ts_us);
            }
        }
    }
    out
}

#[test]
fn a_retry_answers_as_decided_and_writes_nothing_after_restart_and_snapshot() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, config());
    let req = keyed("train", 3, "7d3f-retry");
    let first = ledger.request_resources(&req).unwrap();
    let RequestOutcome::Granted(g) = &first else { panic!("{first:?}") };
    assert!(!g.replayed);
    let events = all_events(&ledger).len();
    clock.advance_seconds(5);
    let again = ledger.request_resources(&req).unwrap();
    let RequestOutcome::Granted(r) = &again else { panic!("{again:?}") };
    assert!(r.replayed);
    assert_eq!((r.allocation_id, &r.workers_allocated, r.seq), (g.allocation_id, &g.workers_allocated, g.seq));
    assert_eq!(all_events(&ledger).len(), events, "a retry writes nothing");

    // Through a snapshot and a restart, and after the allocation was released: still the
    // same answer, with the status as it is now.
    ledger.release_resources(&g.allocation_id.to_string()).unwrap();
    ledger.snapshot().unwrap();
    drop(ledger);
    let ledger = open(&storage, &clock, config());
    let after = ledger.request_resources(&req).unwrap();
    let RequestOutcome::Granted(a) = &after else { panic!("{after:?}") };
    assert!(a.replayed);
    assert_eq!(a.allocation_id, g.allocation_id);
    assert_eq!(a.status, AllocationState::Released);
    assert_eq!(a.mcp_servers, g.mcp_servers);

    // A different request under the same key is invalid input, and nothing is written.
    let before = all_events(&ledger).len();
    let err = ledger.request_resources(&keyed("train", 4, "7d3f-retry")).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput { field, .. } if field == "idempotency_key"), "{err}");
    assert!(err.to_string().contains("different request"), "{err}");
    assert_eq!(all_events(&ledger).len(), before);

    // After the window the key is new again.
    clock.advance_seconds(601);
    let fresh = ledger.request_resources(&keyed("train", 4, "7d3f-retry")).unwrap();
    assert!(fresh.is_granted());
    assert_ne!(fresh.allocation_id(), g.allocation_id);
}

#[test]
fn a_retry_of_an_allocation_that_left_memory_is_answered_from_the_log() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let cfg = Config { terminal_retained: 2, ..config() };
    let ledger = open(&storage, &clock, cfg.clone());
    let req = keyed("old", 1, "k-old");
    let first = ledger.request_resources(&req).unwrap();
    ledger.release_resources(&first.allocation_id().to_string()).unwrap();
    for i in 0..5 {
        let o = ledger.request_resources(&ResourceRequest::new(format!("filler-{i}")).workers(1)).unwrap();
        ledger.release_resources(&o.allocation_id().to_string()).unwrap();
    }
    assert!(ledger.with_state(|s| s.allocation(first.allocation_id()).is_none()), "evicted from memory");
    let again = ledger.request_resources(&req).unwrap();
    assert_eq!(again.allocation_id(), first.allocation_id());
    let RequestOutcome::Granted(g) = &again else { panic!("{again:?}") };
    assert!(g.replayed);
    assert_eq!(g.status, AllocationState::Released);
    // The async path says NotFound (it must not block on the log); the plan reads the log.
    let fut = ledger.request_resources_async(&req);
    assert!(matches!(futures_lite_block_on(fut), Err(Error::NotFound(_))));
    let plan = ledger.plan_request(&req).unwrap();
    assert_eq!(plan.outcome.allocation_id(), first.allocation_id());
}

/// Polls a future to completion on this thread (the ledger's futures need no runtime).
fn futures_lite_block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[test]
fn sixty_four_callers_racing_with_one_key_get_one_grant() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let req = ResourceRequest::new("race").workers(2).idempotency_key("one-key");
    let barrier = Arc::new(std::sync::Barrier::new(64));
    let answers: Vec<RequestOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| {
                let (ledger, req, barrier) = (ledger.clone(), req.clone(), barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    ledger.request_resources(&req).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let id = answers[0].allocation_id();
    assert!(answers.iter().all(|a| a.allocation_id() == id && a.is_granted()));
    assert_eq!(answers.iter().filter(|a| matches!(a, RequestOutcome::Granted(g) if !g.replayed)).count(), 1);
    assert_eq!(grants_by_key(&ledger)["one-key"].len(), 1);
    assert_eq!(ledger.get_capacity().unwrap().allocated_workers, 2);
}

#[test]
fn renewal_moves_the_deadline_and_an_expiry_at_the_same_instant_wins() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, config());
    let req = ResourceRequest::new("lease").workers(2).ttl_seconds(100).max_lifetime_seconds(250);
    let id = ledger.request_resources(&req).unwrap().allocation_id().to_string();
    clock.advance_seconds(60);
    let r1 = ledger.renew_allocation(&id, None).unwrap();
    assert_eq!((r1.renewals, r1.ttl_seconds, r1.capped_by_max_lifetime), (1, 100, false));
    // The grant was stamped 1 µs after the ledger's creation (timestamps strictly increase).
    let moved_us = (r1.expires_at - r1.previous_expires_at).num_microseconds().unwrap();
    assert!((moved_us - 60_000_000).abs() <= 1, "{moved_us}");
    clock.advance_seconds(90);
    // now = 150 s; now + 200 = 350 is past the lifetime end (250): cut short.
    let r2 = ledger.renew_allocation(&id, Some(200)).unwrap();
    assert!(r2.capped_by_max_lifetime);
    let moved_us = (r2.expires_at - r1.expires_at).num_microseconds().unwrap();
    assert!((moved_us - 90_000_000).abs() <= 1, "{moved_us}");
    // Bounds are checked and nothing is written for a refused renewal.
    let before = all_events(&ledger).len();
    let err = ledger.renew_allocation(&id, Some(5)).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput { field, .. } if field == "ttl_seconds"), "{err}");
    assert_eq!(all_events(&ledger).len(), before);
    // At the lifetime's end no renewal can move the deadline later: refused, nothing written.
    clock.advance_seconds(50);
    let err = ledger.renew_allocation(&id, None).unwrap_err();
    assert!(err.to_string().contains("max_lifetime_seconds"), "{err}");
    assert_eq!(all_events(&ledger).len(), before);
    // At the deadline exactly (the grant was stamped 1 µs after the start), the expiry is
    // recorded first: the renewal finds it expired.
    clock.advance_seconds(50);
    clock.advance_micros(1);
    let err = ledger.renew_allocation(&id, None).unwrap_err();
    assert!(matches!(&err, Error::NotActive { state, .. } if state == "expired"), "{err}");
    assert_eq!(err.exit_code().code(), 8);
    let events = all_events(&ledger);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.body.type_name()).collect();
    assert_eq!(kinds, ["ledger_created", "granted", "renewed", "renewed", "expired"]);
    let EventBody::Expired { deadline_us, .. } = events[4].event.body else { unreachable!() };
    assert_eq!(deadline_us, events[4].event.ts_us, "expired at its (renewed) deadline");
    // Released and unknown allocations.
    let other = ledger.request_resources(&ResourceRequest::new("x").workers(1)).unwrap().allocation_id().to_string();
    ledger.release_resources(&other).unwrap();
    let err = ledger.renew_allocation(&other, None).unwrap_err();
    assert!(matches!(&err, Error::NotActive { state, .. } if state == "released"), "{err}");
    assert!(matches!(ledger.renew_allocation("alloc-000000000001", None), Err(Error::NotFound(_))));
}

#[test]
fn history_usage_and_time_travel_see_one_renewed_interval() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, config());
    let t0 = clock.now_micros();
    let id = ledger
        .request_resources(&ResourceRequest::new("long").workers(2).ttl_seconds(100))
        .unwrap()
        .allocation_id()
        .to_string();
    clock.advance_seconds(80);
    ledger.renew_allocation(&id, None).unwrap(); // deadline 180 s
    clock.advance_seconds(80);
    ledger.renew_allocation(&id, None).unwrap(); // deadline 260 s
    clock.advance_seconds(200);
    ledger.cleanup_expired().unwrap();
    // Held at 150 s and 250 s (past the first and second deadlines), free at 270 s.
    for (at_seconds, held) in [(150, 2), (250, 2), (270, 0)] {
        let c = ledger.capacity_at(t0 + at_seconds * 1_000_000).unwrap();
        assert_eq!(c.allocated_workers, held, "at {at_seconds} s");
    }
    let usage = ledger.usage(t0, clock.now_micros(), &GroupBy::Job).unwrap();
    let long = usage.groups.iter().find(|g| g.group == "long").unwrap();
    assert_eq!(long.usage.allocations, 1, "one allocation");
    assert_eq!(long.usage.expired, 1);
    assert!((long.usage.worker_seconds - 2.0 * 260.0).abs() < 1e-3, "{:?}", long.usage);
    let history = ledger.allocation_history(&id).unwrap();
    let kinds: Vec<&str> = history.events.iter().map(|e| e.event.body.type_name()).collect();
    assert_eq!(kinds, ["granted", "renewed", "renewed", "expired"]);
}

#[test]
fn plan_then_act_with_expected_seq() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, config());
    let req = ResourceRequest::new("planned").workers(4).mcp_server("github");
    let plan = ledger.plan_request(&req).unwrap();
    assert!(plan.would_grant);
    assert_eq!(all_events(&ledger).len() as u64, plan.current_seq, "a plan writes nothing");
    // Someone else writes first: the plan is stale.
    ledger.request_resources(&ResourceRequest::new("other").workers(1)).unwrap();
    let err = ledger.if_seq(plan.current_seq).request_resources(&req).unwrap_err();
    let Error::Conflict { expected_seq, current_seq } = err else { panic!("{err:?}") };
    assert_eq!((expected_seq, current_seq), (plan.current_seq, plan.current_seq + 1));
    assert_eq!(Error::Conflict { expected_seq, current_seq }.exit_code().code(), 7);
    // Plan again and act: the outcome is the plan's.
    let plan = ledger.plan_request(&req).unwrap();
    let done = ledger.if_seq(plan.current_seq).request_resources(&req).unwrap();
    assert_eq!(done, plan.outcome);
    // Releases and renewals take the precondition too; an ended allocation's release does not
    // need it (it writes nothing).
    let id = done.allocation_id().to_string();
    let stale = plan.current_seq;
    assert!(matches!(ledger.if_seq(stale).renew_allocation(&id, None), Err(Error::Conflict { .. })));
    assert!(matches!(ledger.if_seq(stale).release_resources(&id), Err(Error::Conflict { .. })));
    let now = ledger.status().last_seq;
    assert_eq!(ledger.if_seq(now).release_resources(&id).unwrap().status, "released");
    assert_eq!(ledger.if_seq(stale).release_resources(&id).unwrap().status, "already_released");
}

/// The precondition is checked before the request is validated (docs/policy.md, section 3): a
/// stale `expected_seq` is a conflict whatever the fields say, an invalid key included; at the
/// current seq the invalid field is named. Nothing is written either way.
#[test]
fn a_stale_seq_is_a_conflict_before_an_invalid_key_is_named() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, config());
    ledger.request_resources(&ResourceRequest::new("first").workers(1)).unwrap();
    let now = ledger.status().last_seq;
    for bad_key in ["", " padded", "tab\tinside", &"k".repeat(129)] {
        let req = keyed("bad-key", 1, bad_key);
        let err = ledger.if_seq(now - 1).request_resources(&req).unwrap_err();
        assert!(matches!(err, Error::Conflict { current_seq, .. } if current_seq == now), "{bad_key:?}: {err:?}");
        let err = ledger.if_seq(now).request_resources(&req).unwrap_err();
        assert!(err.to_string().contains("idempotency_key"), "{bad_key:?}: {err}");
        assert_eq!(err.exit_code().code(), 2, "{bad_key:?}");
        assert_eq!(ledger.status().last_seq, now, "{bad_key:?}: nothing written");
    }
}

// ---------------------------------------------------------------------------------------------
// Properties over random interleavings.

#[derive(Debug, Clone)]
enum Op {
    /// A request with key `key` (of a small pool, so keys repeat) for `workers`.
    Request {
        key: u8,
        workers: u32,
        priority: Priority,
    },
    /// A request without a key.
    Unkeyed {
        workers: u32,
    },
    Release(usize),
    Renew(usize, Option<u64>),
    Advance(i64),
    Plan {
        workers: u32,
    },
    Snapshot,
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let priority = prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High)];
    prop_oneof![
        4 => (0u8..6, 1u32..5, priority).prop_map(|(key, workers, priority)| Op::Request { key, workers, priority }),
        1 => (1u32..4).prop_map(|workers| Op::Unkeyed { workers }),
        2 => (0usize..32).prop_map(Op::Release),
        2 => (0usize..32, prop::option::of(10u64..300)).prop_map(|(i, t)| Op::Renew(i, t)),
        2 => (1i64..400).prop_map(Op::Advance),
        1 => (1u32..6).prop_map(|workers| Op::Plan { workers }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
    ]
}

/// The request a key stands for: the same key always asks the same, except that key 5 asks
/// for a different number of workers each time (the different-request rule).
fn request_for(key: u8, workers: u32, priority: Priority) -> ResourceRequest {
    let (workers, priority) = if key == 5 { (workers, priority) } else { (u32::from(key % 3) + 1, Priority::Normal) };
    ResourceRequest::new(format!("job-{key}"))
        .workers(workers)
        .priority(priority)
        .ttl_seconds(120)
        .idempotency_key(format!("key-{key}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Never two grants for one key within the window; renewals and everything else keep
    /// allocated + available == total; replay equals the live state; a plan acted on with its
    /// `current_seq` gives the outcome planned.
    #[test]
    fn the_contract_holds_over_random_interleavings(ops in prop::collection::vec(op_strategy(), 1..60)) {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let mut ledger = open(&storage, &clock, config());
        let mut ids: Vec<String> = Vec::new();
        for op in ops {
            match op {
                Op::Request { key, workers, priority } => {
                    let req = request_for(key, workers, priority);
                    match ledger.request_resources(&req) {
                        Ok(o) => ids.push(o.allocation_id().to_string()),
                        Err(Error::InvalidInput { field, .. }) => prop_assert_eq!(field, "idempotency_key"),
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Unkeyed { workers } => {
                    let o = ledger.request_resources(&ResourceRequest::new("free").workers(workers)).unwrap();
                    ids.push(o.allocation_id().to_string());
                }
                Op::Release(i) if !ids.is_empty() => {
                    ledger.release_resources(&ids[i % ids.len()]).unwrap();
                }
                Op::Renew(i, ttl) if !ids.is_empty() => {
                    match ledger.renew_allocation(&ids[i % ids.len()], ttl) {
                        Ok(r) => prop_assert!(r.expires_at > clock_now(&clock)),
                        Err(Error::NotActive { .. } | Error::InvalidInput { .. }) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Advance(s) => clock.advance_seconds(s),
                Op::Plan { workers } => {
                    let req = ResourceRequest::new("planned").workers(workers);
                    let plan = ledger.plan_request(&req).unwrap();
                    prop_assert_eq!(all_events(&ledger).len() as u64, plan.current_seq);
                    let done = ledger.if_seq(plan.current_seq).request_resources(&req).unwrap();
                    prop_assert_eq!(&done, &plan.outcome);
                    ids.push(done.allocation_id().to_string());
                }
                Op::Snapshot => {
                    ledger.snapshot().unwrap();
                }
                Op::Reopen => {
                    drop(ledger);
                    ledger = open(&storage, &clock, config());
                }
                Op::Release(_) | Op::Renew(..) => {}
            }
            assert_capacity_accounting(&ledger.get_capacity().unwrap());
        }
        // Never two grants for one key within the window.
        for (key, times) in grants_by_key(&ledger) {
            for w in times.windows(2) {
                prop_assert!(w[1] - w[0] > 600 * 1_000_000, "key {} granted twice within the window", key);
            }
        }
        // Replay equals the live state (the key table included).
        let live = ledger.with_state(Clone::clone);
        let replayed = fold(&all_events(&ledger));
        prop_assert_eq!(live.idempotency_key_count(), replayed.idempotency_key_count());
        drop(ledger);
        let reopened = open(&storage, &clock, config());
        prop_assert_eq!(reopened.with_state(Clone::clone), live);
    }
}

fn clock_now(clock: &ManualClock) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(clock.now_micros().as_micros()).unwrap()
}
