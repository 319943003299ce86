//! The fair pending queue (issue 17, section 3): `wait: true` queues what does not fit, grants
//! in priority then FIFO order as capacity frees (in the same commit as the release), backfill
//! that cannot delay the head, aging, cancel, queue timeouts, waiting futures, snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;
mod mcp_common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    Admission, AllocationState, Config, EventBody, Ledger, ManualClock, Priority, RejectReason, RequestOutcome,
    ResourceRequest,
};
use common::{all_events, fold, mem_options, MEM_DIR};

fn open(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> Ledger {
    // The queue alone: no preemption (tests/preemption.rs has it).
    let never = allocation_ledger::PreemptionPolicy {
        high: allocation_ledger::PreemptPolicy::Never,
        critical: allocation_ledger::PreemptPolicy::Never,
        ..Default::default()
    };
    let config = Config { preemption: never, ..config };
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, config)).unwrap()
}

fn grant(l: &Ledger, job: &str, workers: u32, ttl: u64) -> String {
    match l.request_resources(&ResourceRequest::new(job).workers(workers).ttl_seconds(ttl)).unwrap() {
        RequestOutcome::Granted(g) => g.allocation_id.to_string(),
        RequestOutcome::Failed(f) => panic!("{job}: {}", f.error),
    }
}

fn pending(l: &Ledger, req: &ResourceRequest) -> String {
    match l.request_or_queue(req).unwrap() {
        Admission::Pending(p) => {
            assert_eq!(p.status, AllocationState::Pending);
            p.allocation_id.to_string()
        }
        Admission::Decided(o) => panic!("decided: {o:?}"),
    }
}

fn state_of(l: &Ledger, id: &str) -> AllocationState {
    l.get_allocation(id).unwrap().unwrap().state
}

#[test]
fn a_release_grants_the_waiting_head_in_the_same_commit() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 8, 600);
    let w = pending(&l, &ResourceRequest::new("w").workers(5).wait(Some(120)));
    let d = l.get_allocation(&w).unwrap().unwrap();
    assert_eq!(d.queue_position, Some(1));
    assert!(d.waiting_reason.as_deref().unwrap().contains("Insufficient workers: requested 5, available 2"), "{d:?}");
    assert_eq!(l.list_allocations(Some(AllocationState::Pending), None).unwrap().len(), 1);
    l.release_resources(&a).unwrap();
    assert_eq!(state_of(&l, &w), AllocationState::Active);
    let events = all_events(&l);
    let n = events.len();
    assert!(matches!(events[n - 2].event.body, EventBody::Released { .. }));
    let EventBody::Granted(g) = &events[n - 1].event.body else { panic!("{:?}", events[n - 1]) };
    assert_eq!(g.allocation_id.to_string(), w);
    let EventBody::Queued(q) = &events.iter().find(|e| e.event.body.type_name() == "queued").unwrap().event.body else {
        panic!()
    };
    assert_eq!(g.queued_seq, events.iter().find(|e| e.event.body.type_name() == "queued").map(|e| e.seq));
    assert_eq!(q.position, 1);
    assert_eq!(fold(&events), l.with_state(Clone::clone));
}

#[test]
fn priority_first_fifo_within_and_requests_that_never_fit_are_refused() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 10, 600);
    let n1 = pending(&l, &ResourceRequest::new("n1").workers(3).wait(None));
    clock.advance_seconds(1);
    let n2 = pending(&l, &ResourceRequest::new("n2").workers(3).wait(None));
    clock.advance_seconds(1);
    let h = pending(&l, &ResourceRequest::new("h").workers(3).priority(Priority::High).wait(None));
    let rows: Vec<String> = l
        .list_allocations(Some(AllocationState::Pending), None)
        .unwrap()
        .iter()
        .map(|r| r.allocation_id.to_string())
        .collect();
    assert_eq!(rows, vec![h.clone(), n1.clone(), n2.clone()]);
    let d = l.get_allocation(&n2).unwrap().unwrap();
    assert_eq!(d.queue_position, Some(3));
    assert!(d.waiting_reason.unwrap().starts_with("behind 1 higher-priority request(s)"));
    // More than the pool: refused at once even with wait.
    let never = l.request_or_queue(&ResourceRequest::new("x").workers(10).priority(Priority::Low).wait(None)).unwrap();
    assert!(matches!(never, Admission::Decided(RequestOutcome::Failed(_))), "{never:?}");
    l.release_resources(&a).unwrap();
    for id in [&h, &n1, &n2] {
        assert_eq!(state_of(&l, id), AllocationState::Active, "{id}");
    }
}

#[test]
fn backfill_only_when_it_cannot_delay_the_head() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    // 8 held until +600 s, 1 until +120 s; 1 free.
    let _long = grant(&l, "long", 8, 600);
    let _short = grant(&l, "short", 1, 120);
    // The head needs 2: its reserved start is +120 s (when `short` ends).
    let head = pending(&l, &ResourceRequest::new("head").workers(2).wait(Some(3600)));
    // A 1-worker request that would run past +120 s would take the head's second worker: it waits.
    let late = l.request_or_queue(&ResourceRequest::new("late").workers(1).ttl_seconds(300).wait(Some(3600))).unwrap();
    assert!(matches!(late, Admission::Pending(_)), "{late:?}");
    // Without wait it is refused, saying why.
    let refused = l.request_resources(&ResourceRequest::new("late2").workers(1).ttl_seconds(300)).unwrap();
    let RequestOutcome::Failed(f) = refused else { panic!() };
    assert!(f.error.contains("held for queued request"), "{}", f.error);
    // One that ends by +120 s starts now (backfill).
    let quick = l.request_resources(&ResourceRequest::new("quick").workers(1).ttl_seconds(60)).unwrap();
    assert!(quick.is_granted(), "{quick:?}");
    // At +120 s `short` expires: the head starts then, in the same command as the expiry.
    clock.advance_seconds(121);
    l.cleanup_expired().unwrap();
    assert_eq!(state_of(&l, &head), AllocationState::Active);
}

#[test]
fn aging_lifts_a_waiting_low_request_above_later_normal_ones() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let mut config = Config::default();
    config.priority_reserve_percent.low = 0;
    config.queue.aging_seconds = 60;
    let l = open(&storage, &clock, config);
    let a = grant(&l, "a", 10, 3600);
    let low = pending(&l, &ResourceRequest::new("low").workers(4).priority(Priority::Low).wait(Some(3600)));
    clock.advance_seconds(61);
    let normal = pending(&l, &ResourceRequest::new("normal").workers(4).wait(Some(3600)));
    // The low one has waited one aging step: it is normal now, and older.
    let rows = l.list_allocations(Some(AllocationState::Pending), None).unwrap();
    assert_eq!(rows[0].allocation_id.to_string(), low);
    assert_eq!(rows[1].allocation_id.to_string(), normal);
    l.release_resources(&a).unwrap();
    assert_eq!(state_of(&l, &low), AllocationState::Active);
}

#[test]
fn cancel_and_timeout_are_recorded_and_wake_waiters() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let _a = grant(&l, "a", 10, 3600);
    let c = pending(&l, &ResourceRequest::new("c").workers(2).wait(Some(100)));
    let t = pending(&l, &ResourceRequest::new("t").workers(2).wait(Some(100)));
    let waiter = {
        let l = l.clone();
        let c = c.clone();
        std::thread::spawn(move || l.wait_for_grant_blocking(&c).unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let r = l.cancel_request(&c).unwrap();
    assert_eq!(r.status, AllocationState::Cancelled);
    let RequestOutcome::Failed(f) = waiter.join().unwrap() else { panic!() };
    assert_eq!((f.reason, f.status), (RejectReason::Cancelled, AllocationState::Cancelled));
    // Cancelling again, or an active one, is a clear error.
    let e = l.cancel_request(&c).unwrap_err().to_string();
    assert!(e.contains("is cancelled, not pending"), "{e}");
    let e = l.cancel_request(&_a).unwrap_err().to_string();
    assert!(e.contains("is active, not pending"), "{e}");
    // The timeout is written by the expiry machinery once due.
    clock.advance_seconds(101);
    assert!(l.next_deadline().unwrap() <= l.now_micros());
    l.cleanup_expired().unwrap();
    let d = l.get_allocation(&t).unwrap().unwrap();
    assert_eq!(d.state, AllocationState::Failed);
    let error = d.error.unwrap();
    assert!(error.starts_with("queue_timeout: waited 101 s"), "{error}");
    let o = l.wait_for_grant_blocking(&t).unwrap();
    let RequestOutcome::Failed(f) = o else { panic!() };
    assert_eq!(f.reason, RejectReason::QueueTimeout);
    let h = l.allocation_history(&t).unwrap();
    assert_eq!(h.events.last().unwrap().explanation.as_deref(), Some("rejected: waited 101 s, queue_timeout"));
    let h = l.allocation_history(&c).unwrap();
    assert_eq!(h.events.last().unwrap().explanation.as_deref(), Some("cancelled by its caller after 0 s in the queue"));
    assert_eq!(fold(&all_events(&l)), l.with_state(Clone::clone));
}

#[test]
fn a_blocking_waiting_request_returns_when_granted() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 10, 3600);
    let waiter = {
        let l = l.clone();
        std::thread::spawn(move || l.request_resources(&ResourceRequest::new("w").workers(3).wait(Some(600))).unwrap())
    };
    while l.list_allocations(Some(AllocationState::Pending), None).unwrap().is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    l.release_resources(&a).unwrap();
    let o = waiter.join().unwrap();
    assert!(o.is_granted(), "{o:?}");
}

#[test]
fn snapshots_carry_the_queue() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 9, 3600);
    let w = pending(&l, &ResourceRequest::new("w").workers(3).wait(Some(600)));
    l.snapshot().unwrap();
    let live = l.with_state(Clone::clone);
    drop(l);
    let l = open(&storage, &clock, Config::default());
    assert_eq!(l.with_state(Clone::clone), live);
    assert_eq!(l.get_allocation(&w).unwrap().unwrap().queue_position, Some(1));
    l.release_resources(&a).unwrap();
    assert_eq!(state_of(&l, &w), AllocationState::Active);
}

#[test]
fn history_explains_every_wait_in_words() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 9, 3600);
    let _h1 = pending(&l, &ResourceRequest::new("h1").workers(2).priority(Priority::High).wait(Some(600)));
    let w = pending(&l, &ResourceRequest::new("w").workers(2).wait(Some(600)));
    let t = pending(&l, &ResourceRequest::new("t").workers(2).wait(Some(60)));
    clock.advance_seconds(41);
    l.release_resources(&a).unwrap();
    let h = l.allocation_history(&w).unwrap();
    let words: Vec<String> = h.events.iter().filter_map(|e| e.explanation.clone()).collect();
    assert!(words[0].starts_with("queued at position 2 behind 1 higher-priority request(s)"), "{words:?}");
    assert_eq!(words[1], format!("granted after 41 s in the queue when {a} released"));
    let _ = t;
    let h = l.allocation_history(&t).unwrap();
    assert!(h.events.iter().any(|e| e.explanation.as_deref().is_some_and(|w| w.contains("granted after 41 s"))));
}

/// Over MCP, a `wait: true` call stays open and returns the grant once a release frees room,
/// and the cancelled result once `cancel_request` withdraws it: no polling.
#[test]
fn a_waiting_mcp_call_returns_when_granted_or_cancelled() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let mut s = mcp_common::StdioServer::start(dir.path(), &[]);
    s.initialize();
    let a = s.call("request_resources", json!({"job_id": "a", "mcp_servers": [], "workers": 9}));
    let a = a["structuredContent"]["allocation_id"].as_str().unwrap().to_string();
    let call = |id: u64, job: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "request_resources",
            "arguments": {"job_id": job, "mcp_servers": [], "workers": 3, "wait": true, "queue_timeout_seconds": 600}}})
    };
    s.send(&call(9001, "w"));
    s.send(&call(9002, "c"));
    // Both wait: the list shows them in queue order.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let ids = loop {
        let l = s.call("list_allocations", json!({"state": "pending"}));
        let rows = l["structuredContent"]["allocations"].as_array().unwrap().clone();
        if rows.len() == 2 {
            break rows.iter().map(|r| r["allocation_id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        }
        assert!(std::time::Instant::now() < deadline, "{l}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let jobs: Vec<String> = ids
        .iter()
        .map(|id| {
            s.call("get_allocation", json!({"allocation_id": id}))["structuredContent"]["job_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let c = &ids[jobs.iter().position(|j| j == "c").unwrap()];
    let cancelled = s.call("cancel_request", json!({"allocation_id": c}));
    assert_eq!(cancelled["structuredContent"]["status"], "cancelled", "{cancelled}");
    let r = s.recv_id(&json!(9002));
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(r["result"]["structuredContent"]["reason"], "cancelled", "{r}");
    s.call("release_resources", json!({"allocation_id": a}));
    let r = s.recv_id(&json!(9001));
    assert_eq!(r["result"]["structuredContent"]["status"], "active", "{r}");
}
