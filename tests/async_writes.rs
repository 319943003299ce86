//! Writes from async callers (`request_resources_async`, `release_resources_async`) beside
//! blocking ones: the futures resolve only once their events are durable, with the answer the
//! blocking call gives; nothing acknowledged is lost at power loss; a failed fsync resolves every
//! waiting future with the reason; invalid input resolves at once and writes nothing. The
//! futures need no particular runtime: most of these tests poll them with a ten-line executor
//! (`block_on` below); one runs them as tokio tasks, the way the MCP server does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::{Fault, FaultPlan, FaultyStorage, OpKind, Storage};
use allocation_ledger::{
    AllocationId, Config, Error, EventBody, Ledger, ManualClock, OpenOptions, RequestOutcome, ResourceRequest,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Polls `f` on this thread, parking between polls until its waker is called.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A waker that counts its wake-ups and does nothing else.
#[derive(Default)]
struct CountingWaker(AtomicUsize);
impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

const MEM_DIR: &str = "/mem-async";

fn pool_config(slots: u32) -> Config {
    let mut config = common::small_config(40);
    config.worker_slots = slots;
    config.total_cpu_millicores = u64::from(slots) * 1000;
    config.total_memory_mib = u64::from(slots) * 2048;
    config
}

fn open(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> Ledger {
    let opts: OpenOptions = common::opts(config, clock).storage(Arc::new(storage.clone()) as Arc<dyn Storage>);
    Ledger::open_with(MEM_DIR, opts).unwrap()
}

/// Fails the test instead of hanging it: a lost wake-up is what these tests look for.
fn watchdog(name: &'static str) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        for _ in 0..600 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if flag.load(Ordering::Relaxed) {
                return;
            }
        }
        eprintln!("{name}: no progress in 120 s (a waiter was never woken)");
        std::process::abort();
    });
    done
}

/// One caller's acknowledged operations: grants (id, seq, slots) and released ids.
type Acked = (Vec<(AllocationId, u64, Vec<u32>)>, BTreeSet<AllocationId>);

/// A caller that alternates grants and releases, through the futures (`use_async`) or the
/// blocking calls; stops at the first error and returns what was acknowledged before it.
fn caller(ledger: &Ledger, name: String, ops: usize, use_async: bool) -> (Acked, Option<Error>) {
    let mut acked: Acked = (Vec::new(), BTreeSet::new());
    let mut held: Vec<AllocationId> = Vec::new();
    for i in 0..ops {
        if i % 3 == 2 && !held.is_empty() {
            let id = held.remove(0).to_string();
            let r =
                if use_async { block_on(ledger.release_resources_async(&id)) } else { ledger.release_resources(&id) };
            match r {
                Ok(r) => {
                    assert_eq!(r.status, "released");
                    acked.1.insert(r.allocation_id);
                }
                Err(e) => return (acked, Some(e)),
            }
            continue;
        }
        let req = ResourceRequest::new(name.clone()).workers(1 + (i % 2) as u32);
        let r = if use_async { block_on(ledger.request_resources_async(&req)) } else { ledger.request_resources(&req) };
        match r {
            Ok(RequestOutcome::Granted(g)) => {
                let slots = g.workers_allocated.iter().map(|w| slot_of(&w.worker_id)).collect();
                acked.0.push((g.allocation_id, g.seq, slots));
                held.push(g.allocation_id);
            }
            Ok(RequestOutcome::Failed(f)) => assert_eq!(f.reason, "insufficient_workers"),
            Err(e) => return (acked, Some(e)),
        }
    }
    (acked, None)
}

fn slot_of(worker_id: &str) -> u32 {
    worker_id.rsplit('-').next().unwrap().parse().unwrap()
}

/// Every acknowledged grant is in `events` at its sequence number with its slots, released if
/// its release was acknowledged; no slot is ever granted twice at once.
fn check_acknowledged(events: &[allocation_ledger::LoggedEvent], results: &[Acked]) {
    let by_seq: BTreeMap<u64, &EventBody> = events.iter().map(|e| (e.seq, &e.event.body)).collect();
    let mut released_in_log = BTreeSet::new();
    let mut owner: BTreeMap<u32, AllocationId> = BTreeMap::new();
    let mut slots_of: BTreeMap<AllocationId, Vec<u32>> = BTreeMap::new();
    for e in events {
        match &e.event.body {
            EventBody::Granted(g) => {
                for w in &g.workers {
                    if let Some(other) = owner.insert(w.slot, g.allocation_id) {
                        panic!("seq {}: slot {} granted while {other} holds it", e.seq, w.slot);
                    }
                }
                slots_of.insert(g.allocation_id, g.workers.iter().map(|w| w.slot).collect());
            }
            EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => {
                released_in_log.insert(*allocation_id);
                for slot in slots_of.get(allocation_id).into_iter().flatten() {
                    assert_eq!(owner.remove(slot), Some(*allocation_id), "seq {}", e.seq);
                }
            }
            _ => {}
        }
    }
    let mut seqs = BTreeSet::new();
    for (grants, released) in results {
        for (id, seq, slots) in grants {
            assert!(seqs.insert(*seq), "sequence number {seq} acknowledged twice");
            match by_seq.get(seq) {
                Some(EventBody::Granted(g)) => {
                    assert_eq!(g.allocation_id, *id);
                    assert_eq!(&g.workers.iter().map(|w| w.slot).collect::<Vec<_>>(), slots);
                }
                other => panic!("acknowledged grant {id} at seq {seq}: the log has {other:?}"),
            }
        }
        for id in released {
            assert!(released_in_log.contains(id), "acknowledged release of {id} is not in the log");
        }
    }
}

/// After the callers are done: everything acknowledged is durable, the live state is the fold
/// of the log, and after power loss (`crash(seed)`) the reopened ledger has every event, every
/// acknowledged operation as it was answered, and the same state.
fn survives_power_loss(
    ledger: Ledger,
    storage: &FaultyStorage,
    clock: &ManualClock,
    config: Config,
    results: &[Acked],
    seed: u64,
) {
    let status = ledger.status();
    assert_eq!(status.durable_seq, status.last_seq, "everything acknowledged is durable");
    let live = ledger.with_state(std::clone::Clone::clone);
    assert_eq!(live, common::fold(&common::all_events(&ledger)));
    common::assert_capacity_accounting(&ledger.get_capacity().unwrap());
    drop(ledger);
    storage.crash(seed);
    let reopened = open(storage, clock, config);
    let events = common::all_events(&reopened);
    assert_eq!(events.len() as u64, status.last_seq, "seed {seed}: power loss lost acknowledged events");
    check_acknowledged(&events, results);
    assert_eq!(reopened.with_state(std::clone::Clone::clone), live);
}

#[test]
fn async_and_blocking_callers_together_lose_nothing_at_power_loss_and_never_double_book() {
    let done = watchdog("async_and_blocking_callers_together");
    for seed in 0..3u64 {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let config = pool_config(64);
        let ledger = open(&storage, &clock, config.clone());
        // 24 callers on 64 slots (each holds at most 2 allocations of at most 2 workers).
        let results: Vec<Acked> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..24)
                .map(|t| {
                    let ledger = ledger.clone();
                    s.spawn(move || {
                        let (acked, err) = caller(&ledger, format!("caller-{t}"), 60, t % 3 != 0);
                        assert!(err.is_none(), "{err:?}");
                        acked
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        survives_power_loss(ledger, &storage, &clock, config, &results, seed);
    }
    done.store(true, Ordering::Relaxed);
}

#[test]
fn a_failed_fsync_resolves_every_waiting_future_with_the_reason_and_keeps_what_was_acknowledged() {
    let done = watchdog("a_failed_fsync_resolves_every_waiting_future");
    for nth in [3u64, 17, 60] {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        // No periodic snapshots: the failing fsync must be the log's. A snapshot's failed fsync
        // only fails the snapshot, and the callers went on forever (a CI run hung here).
        // No periodic snapshots: the failing fsync must be the log's. A snapshot's failed fsync
        // only fails the snapshot, and the callers went on forever (a CI run hung here; with
        // snapshots every 40 events, 4 runs in 40 had no caller fail).
        let config = Config { snapshot_every: 0, ..pool_config(64) };
        let ledger = open(&storage, &clock, config.clone());
        storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth, fault: Fault::Fail, sticky: false }));
        let outcomes: Vec<(Acked, Option<Error>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12)
                .map(|t| {
                    let ledger = ledger.clone();
                    // Until the failure stops them: how many fsyncs the callers' operations take
                    // depends on how they happen to share them. (Bounded, so that a failure that
                    // never comes fails the assertion below instead of hanging: each operation
                    // waits for an fsync, so a caller makes at most 60 before the 60th.)
                    s.spawn(move || caller(&ledger, format!("caller-{t}"), 2_000, t % 4 != 0))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (_, err) in &outcomes {
            let e = err.as_ref().expect("every caller ends with the failure");
            assert!(matches!(e, Error::Poisoned(m) if m.contains("fsync")), "nth {nth}: {e}");
        }
        // Refused at once from now on, with the reason, and nothing touches storage.
        let ops = storage.ops();
        let e = block_on(ledger.request_resources_async(&ResourceRequest::new("later").workers(1))).unwrap_err();
        assert!(matches!(&e, Error::Poisoned(m) if m.contains("fsync")), "{e}");
        assert_eq!(storage.ops(), ops);
        drop(ledger);
        storage.set_plan(None);
        storage.crash(nth);
        let reopened = open(&storage, &clock, config);
        let results: Vec<Acked> = outcomes.into_iter().map(|(a, _)| a).collect();
        check_acknowledged(&common::all_events(&reopened), &results);
    }
    done.store(true, Ordering::Relaxed);
}

#[test]
fn invalid_input_and_read_only_ledgers_resolve_at_once_and_write_nothing() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, pool_config(8));
    let before = common::all_events(&ledger);
    let e = block_on(ledger.release_resources_async("alloc-not-an-id")).unwrap_err();
    assert!(matches!(&e, Error::InvalidInput { field, .. } if field == "allocation_id"), "{e}");
    let e = block_on(ledger.request_resources_async(&ResourceRequest::new("too-big").workers(9))).unwrap_err();
    assert!(e.to_string().contains("workers"), "{e}");
    let unknown = AllocationId::for_seq(1, 999).to_string();
    assert!(matches!(block_on(ledger.release_resources_async(&unknown)), Err(Error::NotFound(_))));
    assert_eq!(common::all_events(&ledger), before, "invalid input wrote events");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    drop(Ledger::open_with(&dir, common::opts(pool_config(8), &clock)).unwrap());
    let reader = Ledger::open_read_only(&dir).unwrap();
    let e = block_on(reader.request_resources_async(&ResourceRequest::new("r").workers(1))).unwrap_err();
    assert!(matches!(e, Error::ReadOnly), "{e}");
}

#[test]
fn a_future_does_nothing_until_polled_and_a_polled_one_wakes_its_task_when_durable() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, pool_config(8));
    let before = common::all_events(&ledger);
    // Created and dropped without a poll: nothing is queued, nothing written.
    drop(ledger.request_resources_async(&ResourceRequest::new("never").workers(1)));
    assert_eq!(common::all_events(&ledger), before);
    assert_eq!(ledger.status().last_seq, before.len() as u64);

    // Polled once by hand: the command runs on this thread, the fsync is handed to the flusher
    // thread, and the task is woken (once the grant is durable) rather than polled in a loop.
    let counter = Arc::new(CountingWaker::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(ledger.request_resources_async(&ResourceRequest::new("polled").workers(1)));
    let first = fut.as_mut().poll(&mut cx);
    let outcome = match first {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while counter.0.load(Ordering::SeqCst) == 0 {
                assert!(std::time::Instant::now() < deadline, "the task was never woken");
                std::thread::yield_now();
            }
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => r.unwrap(),
                Poll::Pending => panic!("woken, but the grant is not durable"),
            }
        }
    };
    let RequestOutcome::Granted(g) = outcome else { panic!("{outcome:?}") };
    assert!(ledger.status().durable_seq >= g.seq);
    // The grant is there after power loss.
    drop(ledger);
    storage.crash(7);
    let reopened = open(&storage, &clock, pool_config(8));
    assert!(reopened.get_allocation(&g.allocation_id.to_string()).unwrap().is_some());
}

#[test]
fn an_allocation_that_left_memory_is_answered_from_the_log() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let mut config = pool_config(8);
    config.terminal_retained = 1;
    let ledger = open(&storage, &clock, config);
    let mut ids = Vec::new();
    for i in 0..4 {
        let req = ResourceRequest::new(format!("job-{i}")).workers(1);
        let RequestOutcome::Granted(g) = block_on(ledger.request_resources_async(&req)).unwrap() else {
            panic!("the pool has room")
        };
        block_on(ledger.release_resources_async(&g.allocation_id.to_string())).unwrap();
        ids.push(g.allocation_id);
    }
    // The first one ended long enough ago to have left memory: the future says NotFound, and
    // the blocking fallback (what the MCP server calls) reads the log.
    let first = ids[0];
    assert!(matches!(block_on(ledger.release_resources_async(&first.to_string())), Err(Error::NotFound(_))));
    let r = ledger.release_not_in_memory(first).unwrap();
    assert_eq!(r.status, "already_released");
    assert_eq!(ledger.release_resources(&first.to_string()).unwrap().status, "already_released");
}

/// 64 tokio tasks on 2 worker threads alternate grants and releases; returns what each task
/// saw acknowledged.
#[cfg(feature = "server")]
fn tokio_tasks(ledger: &Ledger, tasks: usize, ops: usize) -> Vec<Acked> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let ledger = ledger.clone();
            set.spawn(async move {
                let mut acked: Acked = (Vec::new(), BTreeSet::new());
                let mut held = None;
                for _ in 0..ops {
                    let req = ResourceRequest::new(format!("task-{t}")).workers(1);
                    let RequestOutcome::Granted(g) = ledger.request_resources_async(&req).await.unwrap() else {
                        panic!("the pool has room for every task")
                    };
                    let slots = g.workers_allocated.iter().map(|w| slot_of(&w.worker_id)).collect();
                    acked.0.push((g.allocation_id, g.seq, slots));
                    if let Some(id) = held.replace(g.allocation_id) {
                        let r = ledger.release_resources_async(&id.to_string()).await.unwrap();
                        assert_eq!(r.status, "released");
                        acked.1.insert(id);
                    }
                    if ledger.snapshot_due() {
                        let l = ledger.clone();
                        tokio::task::spawn_blocking(move || l.snapshot_if_due()).await.unwrap();
                    }
                }
                if let Some(id) = held {
                    ledger.release_resources_async(&id.to_string()).await.unwrap();
                    acked.1.insert(id);
                }
                acked
            });
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.push(r.unwrap());
        }
        all
    });
    drop(rt);
    results
}

/// In memory, fsyncs take no time, so flushes race with the commands being run as hard as they
/// can: a combiner whose own grant a flush already covered must still see that the grants it ran
/// after its own get flushed. A task left waiting for a flush nobody starts hangs this test; it
/// shows when no later command comes to start one, so the tasks stop, many times over.
#[cfg(feature = "server")]
#[test]
fn sixty_four_tokio_tasks_with_instant_fsyncs_all_finish_and_lose_nothing() {
    rounds_then_power_loss("sixty_four_tokio_tasks_with_instant_fsyncs", &|ledger, _| tokio_tasks(ledger, 64, 2));
}

/// 150 rounds of callers on a fresh in-memory ledger (instant fsyncs), twice, each followed by
/// power loss; a hang (a lost wake-up) trips the watchdog.
fn rounds_then_power_loss(name: &'static str, round: &dyn Fn(&Ledger, usize) -> Vec<Acked>) {
    let done = watchdog(name);
    for seed in 0..2u64 {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let config = pool_config(256);
        let ledger = open(&storage, &clock, config.clone());
        let mut results = Vec::new();
        for r in 0..150 {
            results.extend(round(&ledger, r));
        }
        survives_power_loss(ledger, &storage, &clock, config, &results, seed);
    }
    done.store(true, Ordering::Relaxed);
}

/// The blocking callers' half of the test above: 64 threads park until a flush settles them
/// (or until they must combine or flush themselves); with instant fsyncs the rounds are short
/// and the hand-overs many, which is where a wake-up would get lost. Rounds end and start 150
/// times.
#[test]
fn sixty_four_threads_with_instant_fsyncs_all_finish_and_lose_nothing() {
    rounds_then_power_loss("sixty_four_threads_with_instant_fsyncs", &|ledger, round| {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..64)
                .map(|t| {
                    s.spawn(move || {
                        let (acked, err) = caller(ledger, format!("thread-{round}-{t}"), 2, false);
                        assert!(err.is_none(), "{err:?}");
                        acked
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    });
}

#[cfg(feature = "server")]
#[test]
fn sixty_four_tokio_tasks_on_two_threads_share_fsyncs_on_real_files() {
    let done = watchdog("sixty_four_tokio_tasks");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    let clock = ManualClock::at_default_epoch();
    let config = pool_config(256);
    let ledger = Ledger::open_with(&dir, common::opts(config.clone(), &clock)).unwrap();
    let results = tokio_tasks(&ledger, 64, 20);
    let status = ledger.status();
    assert_eq!(status.durable_seq, status.last_seq);
    let live = ledger.with_state(std::clone::Clone::clone);
    drop(ledger);
    let reopened = Ledger::open_with(&dir, common::opts(config, &clock)).unwrap();
    assert!(reopened.recovery_report().snapshot_seq.is_some(), "periodic snapshots were written");
    let events = common::all_events(&reopened);
    check_acknowledged(&events, &results);
    assert_eq!(reopened.with_state(std::clone::Clone::clone), live);
    assert_eq!(live, common::fold(&events));
    done.store(true, Ordering::Relaxed);
}

/// `FaultyStorage` whose fsyncs of appended files wait while a gate is closed, to hold a flush
/// in progress while a test arranges what happens meanwhile.
#[derive(Debug, Clone)]
struct GatedStorage {
    inner: FaultyStorage,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    /// fsyncs waiting at the closed gate.
    waiting: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct GatedFile {
    inner: Box<dyn allocation_ledger::storage::AppendFile>,
    storage: GatedStorage,
}

impl GatedStorage {
    fn set_open(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
}

impl allocation_ledger::storage::AppendFile for GatedFile {
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.append(buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let (open, changed) = &*self.storage.gate;
        let mut open = open.lock().unwrap();
        if !*open {
            self.storage.waiting.fetch_add(1, Ordering::SeqCst);
            while !*open {
                open = changed.wait(open).unwrap();
            }
            self.storage.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        drop(open);
        self.inner.sync_data()
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.inner.truncate(len)
    }
}

impl Storage for GatedStorage {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn exists(&self, path: &std::path::Path) -> bool {
        self.inner.exists(path)
    }
    fn open_append(
        &self,
        path: &std::path::Path,
        create_new: bool,
    ) -> std::io::Result<Box<dyn allocation_ledger::storage::AppendFile>> {
        Ok(Box::new(GatedFile { inner: self.inner.open_append(path, create_new)?, storage: self.clone() }))
    }
    fn read(&self, path: &std::path::Path) -> std::io::Result<allocation_ledger::storage::FileBytes> {
        self.inner.read(path)
    }
    fn read_range(&self, path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.inner.read_range(path, offset, len)
    }
    fn file_len(&self, path: &std::path::Path) -> std::io::Result<u64> {
        self.inner.file_len(path)
    }
    fn set_len(&self, path: &std::path::Path, len: u64) -> std::io::Result<()> {
        self.inner.set_len(path, len)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn try_lock(
        &self,
        path: &std::path::Path,
    ) -> std::io::Result<Option<Box<dyn allocation_ledger::storage::LockGuard>>> {
        self.inner.try_lock(path)
    }
}

/// Records wait in the outbox while a flush is in progress; a reader of the log files that
/// starts then (the event list, an allocation's history, the capacity index catching up) still
/// sees every event the state has folded, once it is durable, and never one that is not.
#[test]
fn log_readers_see_records_that_were_queued_behind_a_flush() {
    let done = watchdog("log_readers_see_records_that_were_queued_behind_a_flush");
    let storage = GatedStorage {
        inner: FaultyStorage::new(),
        gate: Arc::new((std::sync::Mutex::new(true), std::sync::Condvar::new())),
        waiting: Arc::new(AtomicUsize::new(0)),
    };
    let clock = ManualClock::at_default_epoch();
    let opts = common::opts(pool_config(16), &clock).storage(Arc::new(storage.clone()));
    let ledger = Ledger::open_with(common::MEM_DIR, opts).unwrap();
    ledger.request_resources(&ResourceRequest::new("before").workers(1)).unwrap();
    ledger.capacity_at(ledger.now_micros()).unwrap();
    let spin_until = |what: &str, cond: &dyn Fn() -> bool| {
        for _ in 0..2_000_000 {
            if cond() {
                return;
            }
            std::thread::yield_now();
        }
        panic!("{what} never happened");
    };
    storage.set_open(false);
    std::thread::scope(|s| {
        // A: its flush is stuck in fsync.
        let a = s.spawn(|| ledger.request_resources(&ResourceRequest::new("a").workers(1)).unwrap());
        spin_until("a flush waiting at the gate", &|| storage.waiting.load(Ordering::SeqCst) == 1);
        // B: runs and queues its record while that flush is in progress.
        let before = ledger.status().last_seq;
        let b = s.spawn(|| ledger.request_resources(&ResourceRequest::new("b").workers(1)).unwrap());
        spin_until("b's command ran", &|| ledger.status().last_seq == before + 1);
        let b_seq = before + 1;
        assert!(ledger.status().durable_seq < b_seq);
        let events = s.spawn(|| ledger.events(0, 1000).unwrap());
        let history = s.spawn(|| ledger.job_history("b").unwrap());
        // An instant after every event: the state as of now.
        let at = s.spawn(|| ledger.capacity_at(ledger.now_micros() + 3_600_000_000).unwrap());
        // Give the readers the time to answer early, which they must not: they wait for b.
        for _ in 0..20_000 {
            if events.is_finished() && history.is_finished() && at.is_finished() {
                break;
            }
            std::thread::yield_now();
        }
        let answered_early = [events.is_finished(), history.is_finished(), at.is_finished()];
        storage.set_open(true);
        assert_eq!(answered_early, [false; 3], "a reader answered before b was durable");
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let events = events.join().unwrap();
        assert_eq!(events.last().map(|e| e.seq), Some(b_seq), "the event list ends with b's grant");
        assert_eq!(events.last().and_then(|e| e.event.body.allocation_id()), Some(b.allocation_id()));
        assert!(events.iter().any(|e| e.event.body.allocation_id() == Some(a.allocation_id())));
        assert_eq!(history.join().unwrap().allocation_ids, vec![b.allocation_id()]);
        let at = at.join().unwrap();
        assert_eq!((at.allocated_workers, at.seq), (3, b_seq), "before, a and b hold a worker each");
    });
    done.store(true, Ordering::Relaxed);
}
