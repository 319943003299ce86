//! The queue's gaps closed (issue 17 §3-4): a keyed retry of a waiting request is answered by
//! it (never queued twice), a release of a waiting request cancels it, the async request waits,
//! cancelled allocations that left memory are rebuilt from the log, and the pending list pages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    Admission, AllocationState, Config, Error, Ledger, ListFilter, ManualClock, Priority, RejectReason, RequestOutcome,
    ResourceRequest,
};
use common::{all_events, fold, mem_options, MEM_DIR};
use std::sync::Arc;

fn open(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> Ledger {
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, config)).unwrap()
}

fn grant(l: &Ledger, job: &str, workers: u32, ttl: u64) -> String {
    match l.request_resources(&ResourceRequest::new(job).workers(workers).ttl_seconds(ttl)).unwrap() {
        RequestOutcome::Granted(g) => g.allocation_id.to_string(),
        RequestOutcome::Failed(f) => panic!("{job}: {}", f.error),
    }
}

fn admit(l: &Ledger, req: &ResourceRequest) -> allocation_ledger::PendingReport {
    match l.request_or_queue(req).unwrap() {
        Admission::Pending(p) => p,
        Admission::Decided(o) => panic!("decided: {o:?}"),
    }
}

/// Polls a future to completion on this thread (the ledger's futures need no runtime).
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
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
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r;
        }
        std::thread::park_timeout(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_keyed_retry_of_a_waiting_request_is_answered_by_it_and_writes_nothing() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 9, 3600);
    let _ahead = admit(&l, &ResourceRequest::new("ahead").workers(3).priority(Priority::High).wait(Some(600)));
    let req = ResourceRequest::new("w").workers(3).idempotency_key("k-1").wait(Some(600));
    let first = admit(&l, &req);
    assert!(!first.replayed);
    assert_eq!(first.queue_position, 2);
    let before = all_events(&l).len();
    clock.advance_seconds(1);
    let again = admit(&l, &req);
    assert!(again.replayed);
    assert_eq!((again.allocation_id, again.seq, again.queue_position), (first.allocation_id, first.seq, 2));
    assert_eq!(all_events(&l).len(), before, "nothing written");
    // The same key with another request: the usual mismatch.
    let other = ResourceRequest::new("w").workers(4).idempotency_key("k-1").wait(Some(600));
    let e = l.request_or_queue(&other).unwrap_err();
    assert!(e.to_string().contains("already used for a different request"), "{e}");
    assert!(l.plan_request(&other).is_err());
    let e = l.plan_request(&req).unwrap_err().to_string();
    assert!(e.contains("waits in the queue"), "{e}");
    // Across a snapshot and a restart.
    l.snapshot().unwrap();
    drop(l);
    let l = open(&storage, &clock, Config::default());
    assert!(admit(&l, &req).replayed);
    drop(l);
    let l = open(&storage, &clock, Config::default());
    assert_eq!(all_events(&l).len(), before);
    assert_eq!(l.list_allocations(Some(AllocationState::Pending), None).unwrap().len(), 2);
    // Granted later: the retry is answered by the grant.
    l.release_resources(&a).unwrap();
    let Admission::Decided(RequestOutcome::Granted(g)) = l.request_or_queue(&req).unwrap() else { panic!() };
    assert!(g.replayed);
    assert_eq!(g.allocation_id, first.allocation_id);
    // A retry without `wait` is answered the same way.
    let mut no_wait = req.clone();
    no_wait.wait = false;
    let RequestOutcome::Granted(g) = l.request_resources(&no_wait).unwrap() else { panic!() };
    assert_eq!(g.allocation_id, first.allocation_id);
    assert_eq!(fold(&all_events(&l)), l.with_state(Clone::clone));
}

#[test]
fn a_keyed_retry_after_a_cancel_or_a_timeout_is_answered_as_it_ended() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let _a = grant(&l, "a", 10, 3600);
    let c = ResourceRequest::new("c").workers(2).idempotency_key("kc").wait(Some(100));
    let t = ResourceRequest::new("t").workers(2).idempotency_key("kt").wait(Some(50));
    let pc = admit(&l, &c);
    let pt = admit(&l, &t);
    l.cancel_request(&pc.allocation_id.to_string()).unwrap();
    clock.advance_seconds(51);
    l.cleanup_expired().unwrap();
    let n = all_events(&l).len();
    for _ in 0..2 {
        let Admission::Decided(RequestOutcome::Failed(f)) = l.request_or_queue(&c).unwrap() else { panic!() };
        assert_eq!(
            (f.allocation_id, f.reason, f.status),
            (pc.allocation_id, RejectReason::Cancelled, AllocationState::Cancelled)
        );
        assert!(f.replayed);
        let Admission::Decided(RequestOutcome::Failed(f)) = l.request_or_queue(&t).unwrap() else { panic!() };
        assert_eq!((f.allocation_id, f.reason), (pt.allocation_id, RejectReason::QueueTimeout));
        l.snapshot().unwrap();
        drop(l.clone());
    }
    let l = {
        drop(l);
        open(&storage, &clock, Config::default())
    };
    let RequestOutcome::Failed(f) = l.request_resources(&c).unwrap() else { panic!() };
    assert_eq!(f.reason, RejectReason::Cancelled);
    assert_eq!(all_events(&l).len(), n, "nothing written");
    assert_eq!(fold(&all_events(&l)), l.with_state(Clone::clone));
}

#[test]
fn a_blocking_retry_of_a_waiting_request_waits_for_the_same_one() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 10, 3600);
    let req = ResourceRequest::new("w").workers(3).idempotency_key("kw").wait(Some(600));
    let p = admit(&l, &req);
    // A retry that may not block is answered by the waiting request, which stays the only one.
    assert_eq!(admit(&l, &req).allocation_id, p.allocation_id);
    assert_eq!(l.list_allocations(Some(AllocationState::Pending), None).unwrap().len(), 1, "not queued twice");
    // A blocking retry waits for that same request, whether it starts before the release
    // or after it.
    let retry = {
        let (l, req) = (l.clone(), req.clone());
        std::thread::spawn(move || l.request_resources(&req).unwrap())
    };
    l.release_resources(&a).unwrap();
    let o = retry.join().unwrap();
    assert_eq!(o.allocation_id(), p.allocation_id);
    assert!(o.is_granted());
}

#[test]
fn releasing_a_waiting_request_cancels_it_and_again_is_idempotent() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let _a = grant(&l, "a", 10, 3600);
    let w = admit(&l, &ResourceRequest::new("w").workers(2).wait(Some(100))).allocation_id.to_string();
    let t = admit(&l, &ResourceRequest::new("t").workers(2).wait(Some(10))).allocation_id.to_string();
    let waiter = {
        let (l, w) = (l.clone(), w.clone());
        std::thread::spawn(move || l.wait_for_grant_blocking(&w).unwrap())
    };
    let r = l.release_resources(&w).unwrap();
    assert_eq!((r.status.as_str(), r.state), ("cancelled", AllocationState::Cancelled));
    assert_eq!(r.workers_released, 0);
    let RequestOutcome::Failed(f) = waiter.join().unwrap() else { panic!() };
    assert_eq!(f.reason, RejectReason::Cancelled);
    let last = all_events(&l).pop().unwrap();
    assert_eq!(last.event.body.type_name(), "cancelled", "recorded exactly as cancel_request does");
    let n = all_events(&l).len();
    let again = l.release_resources(&w).unwrap();
    assert_eq!((again.status.as_str(), again.state), ("already_cancelled", AllocationState::Cancelled));
    let again = block_on(l.release_resources_async(&w)).unwrap();
    assert_eq!(again.status.as_str(), "already_cancelled");
    clock.advance_seconds(11);
    l.cleanup_expired().unwrap();
    let n2 = all_events(&l).len();
    assert_eq!(n2, n + 1, "the timeout");
    let r = l.release_resources(&t).unwrap();
    assert_eq!((r.status.as_str(), r.state), ("already_failed", AllocationState::Failed));
    assert_eq!(all_events(&l).len(), n2);
}

#[test]
fn the_async_request_with_wait_resolves_when_decided() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let a = grant(&l, "a", 10, 3600);
    let waiter = {
        let l = l.clone();
        std::thread::spawn(move || {
            block_on(l.request_resources_async(&ResourceRequest::new("w").workers(3).wait(Some(600))))
        })
    };
    while l.list_allocations(Some(AllocationState::Pending), None).unwrap().is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    l.release_resources(&a).unwrap();
    let o = waiter.join().unwrap().unwrap();
    assert!(o.is_granted(), "{o:?}");
    // One that is cancelled resolves with the cancel.
    let _b = grant(&l, "b", 7, 3600);
    let waiter = {
        let l = l.clone();
        std::thread::spawn(move || {
            block_on(l.request_resources_async(&ResourceRequest::new("x").workers(3).wait(Some(600))))
        })
    };
    let id = loop {
        if let Some(r) = l.list_allocations(Some(AllocationState::Pending), None).unwrap().first() {
            break r.allocation_id.to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    l.cancel_request(&id).unwrap();
    let RequestOutcome::Failed(f) = waiter.join().unwrap().unwrap() else { panic!() };
    assert_eq!(f.reason, RejectReason::Cancelled);
    // Without wait nothing changed: decided at once.
    let o = block_on(l.request_resources_async(&ResourceRequest::new("y").workers(3))).unwrap();
    assert!(!o.is_granted());
    // With a stale precondition: a conflict.
    let stale = l.status().last_seq - 1;
    let e = block_on(l.if_seq(stale).request_resources_async(&ResourceRequest::new("z").workers(1).wait(None)))
        .unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e}");
}

#[test]
fn cancelled_allocations_that_left_memory_are_rebuilt_from_the_log() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let config = Config { terminal_retained: 2, ..Config::default() };
    let l = open(&storage, &clock, config.clone());
    let _a = grant(&l, "a", 10, 3600);
    let c = admit(&l, &ResourceRequest::new("old").workers(2).wait(Some(100))).allocation_id.to_string();
    let t = admit(&l, &ResourceRequest::new("late").workers(2).wait(Some(100))).allocation_id.to_string();
    clock.advance_seconds(1);
    l.cancel_request(&c).unwrap();
    let in_memory = l.get_allocation(&c).unwrap().unwrap();
    clock.advance_seconds(200);
    l.cleanup_expired().unwrap();
    for i in 0..4 {
        // Refused (the pool is full): ended at once, so older ended ones leave memory.
        assert!(!l.request_resources(&ResourceRequest::new(format!("f{i}")).workers(1)).unwrap().is_granted());
    }
    assert!(l.with_state(|s| s.allocation(c.parse().unwrap()).is_none()), "evicted");
    let mut d = l.get_allocation(&c).unwrap().unwrap();
    assert_eq!(d.state, AllocationState::Cancelled);
    assert_eq!(d.job_id, "old");
    d.timestamps.age_seconds = in_memory.timestamps.age_seconds;
    assert_eq!(d, in_memory, "as the live fold had it");
    assert_eq!(l.get_allocation(&t).unwrap().unwrap().state, AllocationState::Failed);
    let rows = l.list_allocations(Some(AllocationState::Cancelled), None).unwrap();
    assert_eq!(rows.iter().map(|r| r.allocation_id.to_string()).collect::<Vec<_>>(), [c.as_str()]);
    let filter = ListFilter { state: Some(AllocationState::Cancelled), ..Default::default() };
    let page = l.list_page(&filter, Some(10), None).unwrap();
    assert_eq!(page.allocations, rows);
    let r = l.release_resources(&c).unwrap();
    assert_eq!(r.status.as_str(), "already_cancelled");
    let rows = l.list_allocations(Some(AllocationState::Cancelled), Some("old")).unwrap();
    assert_eq!(rows.len(), 1);
}

#[test]
fn the_pending_list_pages_in_queue_order() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, Config::default());
    let _a = grant(&l, "a", 10, 3600);
    let mut expected_high = Vec::new();
    let mut expected_normal = Vec::new();
    for i in 0..25 {
        let high = i % 3 == 0;
        let p = if high { Priority::High } else { Priority::Normal };
        let id =
            admit(&l, &ResourceRequest::new(format!("j{i}")).workers(1).priority(p).wait(Some(3000))).allocation_id;
        if high {
            expected_high.push(id);
        } else {
            expected_normal.push(id);
        }
        clock.advance_micros(10);
    }
    let expected: Vec<_> = expected_high.into_iter().chain(expected_normal).collect();
    let whole: Vec<_> =
        l.list_allocations(Some(AllocationState::Pending), None).unwrap().iter().map(|r| r.allocation_id).collect();
    assert_eq!(whole, expected);
    let filter = ListFilter { state: Some(AllocationState::Pending), ..Default::default() };
    let (mut seen, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = l.list_page(&filter, Some(10), cursor.as_deref()).unwrap();
        pages += 1;
        assert!(page.count <= 10);
        seen.extend(page.allocations.iter().map(|r| r.allocation_id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);
    // A request granted between pages does not disturb the next page.
    let first = l.list_page(&filter, Some(5), None).unwrap();
    l.cancel_request(&first.allocations[4].allocation_id.to_string()).unwrap();
    let second = l.list_page(&filter, Some(5), first.next_cursor.as_deref()).unwrap();
    assert_eq!(second.allocations.iter().map(|r| r.allocation_id).collect::<Vec<_>>(), expected[5..10]);
    // A cursor of another listing is refused.
    let other = ListFilter { state: Some(AllocationState::Pending), job_id: Some("j1".into()), ..Default::default() };
    assert!(l.list_page(&other, Some(5), first.next_cursor.as_deref()).is_err());
}

mod props {
    use super::*;
    use allocation_ledger::EventBody;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A keyed request (key index, workers: a different count with the same key is a mismatch).
        Keyed {
            key: u8,
            workers: u32,
            wait: bool,
        },
        Release(usize),
        Cancel(usize),
        Advance(i64),
        Snapshot,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4u8, 2..=5u32, prop::bool::weighted(0.8)).prop_map(|(key, workers, wait)| Op::Keyed { key, workers, wait }),
            2 => (0..32usize).prop_map(Op::Release),
            1 => (0..32usize).prop_map(Op::Cancel),
            2 => (1..=120i64).prop_map(Op::Advance),
            1 => Just(Op::Snapshot),
            1 => Just(Op::Reopen),
        ]
    }

    /// Every key names one allocation across the whole log (the window outlasts the run), and
    /// the queue never holds two entries of one key.
    fn check_keys(l: &Ledger) {
        let mut owner: std::collections::HashMap<String, allocation_ledger::AllocationId> = Default::default();
        for e in all_events(l) {
            let (key, id) = match &e.event.body {
                EventBody::Granted(g) => (g.idempotency_key.clone(), g.allocation_id),
                EventBody::Rejected(r) => (r.idempotency_key.clone(), r.allocation_id),
                EventBody::Queued(q) => (q.idempotency_key.clone(), q.allocation_id),
                _ => continue,
            };
            let Some(key) = key else { continue };
            let first = *owner.entry(key.to_string()).or_insert(id);
            assert_eq!(first, id, "key {key} decided twice (event {})", e.seq);
        }
        let waiting = l.list_allocations(Some(AllocationState::Pending), None).unwrap();
        let mut ids: Vec<_> = waiting.iter().map(|r| r.allocation_id).collect();
        ids.dedup();
        assert_eq!(ids.len(), waiting.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn never_two_queue_entries_or_grants_for_one_key(ops in prop::collection::vec(op(), 1..40)) {
            let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
            let config = Config { worker_slots: 8, ..Config::default() };
            let mut l = open(&storage, &clock, config.clone());
            let mut ids: Vec<String> = Vec::new();
            for op in &ops {
                match op {
                    Op::Keyed { key, workers, wait } => {
                        // Mostly the key's own shape; sometimes another (a mismatch).
                        let shape = if *workers == 5 { 5 } else { u32::from(*key) + 2 };
                        let mut req = ResourceRequest::new(format!("job-{key}")).workers(shape).ttl_seconds(300).idempotency_key(format!("key-{key}"));
                        if *wait {
                            req = req.wait(Some(200));
                        }
                        match l.request_or_queue(&req) {
                            Ok(Admission::Decided(o)) => ids.push(o.allocation_id().to_string()),
                            Ok(Admission::Pending(p)) => ids.push(p.allocation_id.to_string()),
                            Err(Error::InvalidInput { field, .. }) => prop_assert_eq!(field, "idempotency_key"),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Op::Release(i) if !ids.is_empty() => { l.release_resources(&ids[i % ids.len()]).unwrap(); }
                    Op::Cancel(i) if !ids.is_empty() => { let _ = l.cancel_request(&ids[i % ids.len()]); }
                    Op::Advance(s) => { clock.advance_seconds(*s); l.cleanup_expired().unwrap(); }
                    Op::Snapshot => { l.snapshot().unwrap(); }
                    Op::Reopen => { drop(l); l = open(&storage, &clock, config.clone()); }
                    _ => {}
                }
                check_keys(&l);
            }
            prop_assert_eq!(fold(&all_events(&l)), l.with_state(Clone::clone));
        }
    }
}

mod cli {
    use serde_json::Value;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    fn bin() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
        c.env_remove("ALLOCATION_LEDGER_DIR");
        c
    }

    fn json(dir: &Path, args: &[&str]) -> (i32, Value) {
        let o = bin().arg("--data-dir").arg(dir).arg("--json").args(args).output().unwrap();
        let stdout = String::from_utf8(o.stdout).unwrap();
        let v = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?} {}", String::from_utf8_lossy(&o.stderr)));
        (o.status.code().unwrap(), v)
    }

    fn waiter(dir: &Path, job: &str) -> Child {
        bin()
            .arg("--data-dir")
            .arg(dir)
            .args(["--json", "request", "--job-id", job, "--workers", "2", "--wait", "--timeout", "120"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn pending(dir: &Path) -> Vec<Value> {
        json(dir, &["list", "--state", "pending"]).1.as_array().unwrap().clone()
    }

    #[test]
    fn release_of_a_waiting_request_and_the_pending_pages_through_the_binary() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(json(d, &["init"]).0, 0);
        let (code, _) = json(d, &["request", "--job-id", "big", "--workers", "10", "--ttl-seconds", "600"]);
        assert_eq!(code, 0);
        let mut children = Vec::new();
        for (n, job) in ["w0", "w1", "w2"].into_iter().enumerate() {
            children.push(waiter(d, job));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while pending(d).len() <= n {
                assert!(std::time::Instant::now() < deadline, "{job} never queued");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        // Pages of the queue, in queue order.
        let (code, first) = json(d, &["list", "--state", "pending", "--limit", "2"]);
        assert_eq!(code, 0, "{first}");
        let jobs: Vec<&str> =
            first["allocations"].as_array().unwrap().iter().map(|r| r["job_id"].as_str().unwrap()).collect();
        assert_eq!(jobs, ["w0", "w1"]);
        let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();
        let (_, second) = json(d, &["list", "--state", "pending", "--limit", "2", "--cursor", &cursor]);
        assert_eq!(second["allocations"][0]["job_id"], "w2");
        assert!(second["next_cursor"].is_null());
        // Releasing a waiting request cancels it; its waiting command ends (exit 3, cancelled).
        let id = first["allocations"][0]["allocation_id"].as_str().unwrap().to_string();
        let (code, r) = json(d, &["release", &id]);
        assert_eq!((code, r["status"].as_str(), r["state"].as_str()), (0, Some("cancelled"), Some("cancelled")), "{r}");
        let out = children.remove(0).wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(3));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["reason"], "cancelled", "{v}");
        let (code, r) = json(d, &["release", &id]);
        assert_eq!((code, r["status"].as_str()), (0, Some("already_cancelled")), "{r}");
        let (_, rows) = json(d, &["list", "--state", "cancelled"]);
        assert_eq!(rows.as_array().unwrap().len(), 1);
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
