//! The commit pipeline: how a write becomes durable, behind a small interface.
//!
//! The API hands a command to [`Ledger::submit`] (a [`Durable`] future) or
//! [`Ledger::submit_and_wait`] (blocking), and a reader waits for what it saw with
//! [`Ledger::wait_durable`]. Behind them, writers share both halves of a write:
//!
//! - *Combining:* commands queue in [`SyncState`]; a caller that finds nobody combining runs
//!   the queued commands, its own and others', in one hold of the core lock, so 64 callers do
//!   not hand that lock to each other 64 times (each hand-over a sleep and a wake-up).
//! - *Group commit:* a caller whose command has run and finds no flush in progress writes and
//!   fsyncs everything appended so far itself (a lone caller pays no hand-over between
//!   threads); if more records arrived during its fsync, it hands flushing over to the flusher
//!   thread, which flushes back to back while records keep arriving, so that callers released
//!   by one fsync gather into the next.
//!
//! A caller with nothing to do registers to be woken like a task (`SyncState::wakers`) and
//! parks (a thread) or returns `Pending` (a future): a flush wakes only the callers it settled.

use super::{lock, Core, Ledger, Shared};
use crate::log::backend::LogBackend;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A queued write: runs under the core lock, records its result in its `Call`, and returns
/// whether it appended anything.
type Command = Box<dyn FnOnce(&Ledger, &mut Core) -> bool + Send>;

/// Where `Ledger::advance` left a caller.
enum Step<'a> {
    Settled(Result<()>),
    /// Nothing to help with: wait (holding the sync lock) until woken.
    Wait(MutexGuard<'a, SyncState>),
}

/// `Call::target` of a command that has not run yet.
const PENDING: u64 = u64::MAX;

/// Commands one combiner runs at most before it lets another caller take over.
const COMBINE_MAX: usize = 512;

/// A queued command's outcome, filled in by whichever caller ran it.
struct Call<R> {
    /// The sequence number that must be durable before the result is given out: the last
    /// record when the command ran (its own, or earlier ones it may have observed).
    target: Arc<AtomicU64>,
    /// `Commit::epoch` when the command ran: a replicated ledger that lost leadership reloads
    /// its files (a new epoch), and nothing run before that may be acknowledged after it.
    epoch: AtomicU64,
    result: Mutex<Option<Outcome<R>>>,
}

enum Outcome<R> {
    Done(Result<R>),
    /// The command panicked on the thread that ran it (maybe another caller's): the panic is
    /// resumed on the caller's own thread, as if it had run the command itself.
    Panicked(Box<dyn std::any::Any + Send>),
}

impl<R> Call<R> {
    fn new() -> Arc<Call<R>> {
        Arc::new(Call { target: Arc::new(AtomicU64::new(PENDING)), epoch: AtomicU64::new(0), result: Mutex::new(None) })
    }

    fn target(&self) -> Option<u64> {
        let t = self.target.load(Ordering::Acquire);
        (t != PENDING).then_some(t)
    }

    /// The caller's answer once `settle` (or the future) finished with `settled`.
    fn finish(&self, settled: Result<()>, epoch: u64) -> Result<R> {
        let settled = match settled {
            Ok(()) if self.target().is_some() && self.epoch.load(Ordering::Acquire) != epoch => Err(Error::Unavailable(
                "this copy lost the leadership before the write was committed: it was not acknowledged (retry at the leader)"
                    .into(),
            )),
            other => other,
        };
        match (settled, lock(&self.result).take()) {
            (_, Some(Outcome::Panicked(payload))) => std::panic::resume_unwind(payload),
            // Not acknowledged: what it appended (or expired on the way) is not durable. A
            // refusal (invalid input, say) is no answer either: expiries written before it
            // was decided failed to become durable, and the caller must hear that the ledger
            // stopped, not a verdict on a state that is not durable.
            (Err(e), Some(Outcome::Done(_)) | None) => Err(e),
            (_, Some(Outcome::Done(r))) => r,
            (Ok(()), None) => unreachable!("a settled command has its result"),
        }
    }

    /// The boxed command that runs `run` (which returns its result and whether it appended)
    /// and records the outcome here.
    fn command(self: &Arc<Self>, run: impl FnOnce(&Ledger, &mut Core) -> (Result<R>, bool) + Send + 'static) -> Command
    where
        R: Send + 'static,
    {
        let call = self.clone();
        Box::new(move |ledger: &Ledger, core: &mut Core| {
            // A panic must not leave the combiner's own caller, and everyone queued behind it,
            // waiting forever: it is caught here and handed to the caller whose command it was.
            // (Appends are single calls, so the log is whole; see `lock`.)
            call.epoch.store(ledger.shared.commit.epoch.load(Ordering::Acquire), Ordering::Release);
            // A copy that may not decide (a replicated standby) refuses before deciding.
            let run = |ledger: &Ledger, core: &mut Core| match ledger.shared.commit.check_writable() {
                Ok(()) => run(ledger, core),
                Err(e) => (Err(e), false),
            };
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(ledger, core)));
            let (outcome, appended) = match ran {
                Ok((result, appended)) => (Outcome::Done(result), appended),
                // Whether it appended is unknown: report "nothing", which wakes every waiter to
                // look again.
                Err(payload) => (Outcome::Panicked(payload), false),
            };
            *lock(&call.result) = Some(outcome);
            call.target.store(core.state.last_seq, Ordering::Release);
            appended
        })
    }
}

/// Wakes a thread parked in `Ledger::settle`.
struct ThreadWake {
    thread: std::thread::Thread,
    woken: AtomicBool,
}

impl std::task::Wake for ThreadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// What the callers and the flusher thread share, behind `Commit::sync`. The lock may be
/// taken while holding the core lock, never the other way round. The protocol of its flags
/// (each change goes through the methods below, which check it in debug builds):
///
/// - `combining`: set by the one caller that found it clear and takes the queue
///   (`combine_then_flush`); cleared by that caller when `combine` ends. Only the combiner
///   takes commands out of `queue`.
/// - `flushing`: set by whoever starts a round while it is clear: a caller that flushes
///   itself (`lead_flush`) or hands flushing to the thread (`hand_flush_to_thread`). Cleared
///   only by whoever ran the round that found nothing more to flush. At most one flush round
///   runs at a time (`flush_round` checks that too).
/// - `thread_owns`: set while `flushing` is set, when flushing is handed to the flusher
///   thread; cleared by that thread together with `flushing`. It implies `flushing`.
/// - `durable_seq`: raised by flush rounds only; it never falls.
/// - `failed`: latched once (a failed write, fsync or rotation) and never cleared: after it
///   nothing is flushed or acknowledged again.
/// - `stop`: set once, when the last handle is gone; the flusher thread then ends.
#[derive(Default)]
pub(super) struct SyncState {
    durable_seq: u64,
    /// An fsync round is in progress (by a caller, or by the flusher thread).
    flushing: bool,
    /// The flusher thread has taken over flushing from the callers (see `Ledger::settle`).
    thread_owns: bool,
    /// The last handle is gone: the flusher thread ends.
    stop: bool,
    /// Commands waiting for a combiner (see `Ledger::settle`).
    queue: Vec<Command>,
    /// A caller is running queued commands.
    combining: bool,
    /// Tasks awaiting a `Durable` future, with the target their command recorded (`PENDING`
    /// until it ran). Woken when a flush covers the target, or when something else changed
    /// that they must look at (the ledger failed, combining ended with work left).
    wakers: Vec<(Arc<AtomicU64>, std::task::Waker)>,
    failed: Option<String>,
    /// `failed` is a replicated copy that could not commit (not the leader, no quorum), not a
    /// storage failure: callers get `Error::Unavailable`, and the copy reloads (`reset`).
    failed_unavailable: bool,
}

impl SyncState {
    fn begin_combining(&mut self) {
        debug_assert!(!self.combining, "two combiners at once");
        self.combining = true;
    }

    fn end_combining(&mut self) {
        debug_assert!(self.combining, "combining ended twice");
        self.combining = false;
    }

    fn begin_flush(&mut self) {
        debug_assert!(!self.flushing, "a flush started while another is in flight");
        debug_assert!(!self.thread_owns, "the flusher thread owns flushing without a flush in flight");
        self.flushing = true;
    }

    /// The flusher thread takes over the flush in flight.
    fn hand_to_thread(&mut self) {
        debug_assert!(self.flushing, "flushing handed over without a flush in flight");
        debug_assert!(!self.thread_owns, "flushing handed to the flusher thread twice");
        self.thread_owns = true;
    }

    /// Flushing ends (nothing more to flush): by the flusher thread if `by_thread`, which
    /// gives it back to the callers, else by the caller that flushed.
    fn end_flush(&mut self, by_thread: bool) {
        debug_assert!(self.flushing, "a flush ended that was not in flight");
        debug_assert_eq!(self.thread_owns, by_thread, "flushing ended by one that does not own it");
        self.thread_owns = false;
        self.flushing = false;
    }

    fn raise_durable(&mut self, upto: u64) {
        let before = self.durable_seq;
        self.durable_seq = before.max(upto);
        debug_assert!(self.durable_seq >= before, "the durable sequence number fell");
    }

    /// Latches `why` unless a failure is latched already (the first reason stays).
    fn latch_failure(&mut self, why: impl FnOnce() -> String) {
        self.failed.get_or_insert_with(why);
        debug_assert!(self.failed.is_some());
    }

    /// Latches `e` (see `latch_failure`), remembering whether it was a replicated copy's
    /// refusal rather than a storage failure.
    fn latch_error(&mut self, e: &Error) {
        if self.failed.is_none() {
            self.failed_unavailable = matches!(e, Error::Unavailable(_));
        }
        self.latch_failure(|| match e {
            Error::Poisoned(why) | Error::Unavailable(why) => why.clone(),
            other => other.to_string(),
        });
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(why) if self.failed_unavailable => Err(Error::Unavailable(why.clone())),
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncState")
            .field("durable_seq", &self.durable_seq)
            .field("flushing", &self.flushing)
            .field("thread_owns", &self.thread_owns)
            .field("queued", &self.queue.len())
            .field("combining", &self.combining)
            .field("tasks_waiting", &self.wakers.len())
            .field("failed", &self.failed)
            .finish()
    }
}

/// The commit pipeline's part of the shared handle: what flushes use, all beside the core
/// lock so that a flush never queues for it.
#[derive(Debug)]
pub(super) struct Commit {
    sync: Mutex<SyncState>,
    /// Wakes the flusher thread when callers hand flushing over to it.
    flusher_wake: Condvar,
    /// Sequence number of the last record appended (durable or not); written under the core
    /// lock, read without it by a flush deciding whether another round is due.
    appended_seq: AtomicU64,
    /// Where flushes make the appended records durable (`log/backend.rs`: the local log, or
    /// the local log behind a replicated one), without taking the core lock (64 callers queue
    /// for that lock; a flush that waits its turn delays all of them). `None` for a read-only
    /// ledger.
    backend: Option<Arc<dyn LogBackend>>,
    /// Bumped when a replicated ledger reloads its files after losing leadership (see
    /// `Call::epoch`); always 0 for a local one.
    pub(super) epoch: AtomicU64,
    /// A flush round is running (checked in debug builds only: two at once is a bug).
    flush_in_flight: AtomicBool,
    /// The ledger's counters (`Ledger::metrics`); here because flush rounds feed them.
    pub(super) metrics: super::metrics::LedgerMetrics,
}

impl Commit {
    /// The pipeline of a ledger opened with everything up to `durable_seq` durable.
    pub(super) fn new(durable_seq: u64, backend: Option<Arc<dyn LogBackend>>) -> Commit {
        Commit {
            sync: Mutex::new(SyncState { durable_seq, ..Default::default() }),
            flusher_wake: Condvar::new(),
            appended_seq: AtomicU64::new(durable_seq),
            backend,
            epoch: AtomicU64::new(0),
            flush_in_flight: AtomicBool::new(false),
            metrics: super::metrics::LedgerMetrics::default(),
        }
    }

    /// The last handle is gone: records still queued belong to commands nobody waits for any
    /// more (a dropped future's); write and fsync them anyway, as a clean close would, unless
    /// the ledger failed (`poisoned`: the core saw a failure).
    pub(super) fn close(&mut self, poisoned: bool) {
        let appended = *self.appended_seq.get_mut();
        let (failed, unflushed) =
            self.sync.get_mut().map_or((true, false), |s| (s.failed.is_some(), appended > s.durable_seq));
        if let (Some(backend), true, false, false) = (&self.backend, unflushed, failed, poisoned) {
            backend.close();
        }
    }

    /// `Err` when this copy may not decide writes (a replicated standby names its leader).
    pub(super) fn check_writable(&self) -> Result<()> {
        self.backend.as_ref().map_or(Ok(()), |b| b.check_writable())
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// A replicated ledger reloaded its files (`open.rs`, after it lost leadership): a new
    /// epoch (nothing run before it is acknowledged), the failure that stopped it cleared, the
    /// durable end where the files end, the new writer's outbox. Called holding the core lock,
    /// so no command runs; waits for a flush round in flight (one that saw the failure ends
    /// at once).
    pub(super) fn reset(&self, last_seq: u64, outbox: Arc<crate::log::wal::Outbox>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut s = lock(&self.sync);
        while s.flushing {
            drop(s);
            std::thread::sleep(std::time::Duration::from_millis(1));
            s = lock(&self.sync);
        }
        if let Some(backend) = &self.backend {
            backend.reopened(outbox);
        }
        s.failed = None;
        s.failed_unavailable = false;
        s.durable_seq = s.durable_seq.max(last_seq);
        self.appended_seq.store(last_seq.max(s.durable_seq), Ordering::Release);
        wake_settled(s, true);
    }

    /// `Err(Poisoned)` once a write, fsync or rotation failed.
    pub(super) fn check_failed(&self) -> Result<()> {
        lock(&self.sync).check_failed()
    }

    /// Stops the ledger for `e` (the first failure's reason stays): nothing is flushed or
    /// acknowledged any more, so nothing retries an fsync and acknowledges what it lost.
    /// Remembers whether it was a replicated copy's refusal (callers then get `Unavailable`).
    pub(super) fn latch_error(&self, e: &Error) {
        lock(&self.sync).latch_error(e);
    }

    /// The durable sequence number, and why the ledger failed if it did.
    pub(super) fn durable_and_failure(&self) -> (u64, Option<String>) {
        let s = lock(&self.sync);
        (s.durable_seq, s.failed.clone())
    }

    /// Writes the records queued for the next flush now (no fsync), so that a reader of the log
    /// files finds every event folded so far. Call holding the core lock, under which nothing
    /// is appended. A failed write stops the ledger, as in a flush.
    pub(super) fn write_queued(&self) -> Result<()> {
        let Some(backend) = &self.backend else { return Ok(()) };
        self.check_failed()?;
        backend.write_queued().map_err(|e| {
            let mut s = lock(&self.sync);
            s.latch_error(&e);
            s.check_failed().err().unwrap_or(e)
        })
    }

    /// Hands the records the commands just run appended to the outbox, where the next flush
    /// writes them, and only then publishes them to the flush (`appended_seq`). Called before
    /// the core lock is let go, so the flush never sees an event without its record.
    pub(super) fn write_appended(&self, core: &mut Core) {
        if core.poisoned.is_some() {
            // Records of commands run before the failure are never written now; their
            // callers see the latched reason.
            return;
        }
        let Some(wal) = core.wal.as_mut() else { return };
        wal.hand_off();
        let last = wal.next_seq() - 1;
        if last > self.appended_seq.load(Ordering::Relaxed) {
            self.appended_seq.store(last, Ordering::Release);
        }
    }

    /// One group-commit round: writes what is queued and fsyncs the active segment, which
    /// covers every record appended so far (a rotation fsyncs the segment it leaves), and
    /// publishes the durable sequence number. Returns holding the sync lock, and whether
    /// records were appended during the fsync; the caller decides who flushes next and then
    /// wakes the waiters, in that order, so that a caller that saw a flush in progress is never
    /// left waiting for one that ended. Called with `SyncState::flushing` set, by exactly one
    /// thread at a time.
    fn flush_round(&self) -> (MutexGuard<'_, SyncState>, bool) {
        {
            let s = lock(&self.sync);
            debug_assert!(s.flushing, "a flush round runs only with flushing set");
            if s.failed.is_some() {
                // A failed fsync (or rotation) is never followed by another: it could "succeed"
                // for data the kernel already dropped.
                return (s, false);
            }
        }
        debug_assert!(!self.flush_in_flight.swap(true, Ordering::AcqRel), "two flush rounds at once");
        let started = std::time::Instant::now();
        let result = self.write_and_sync();
        debug_assert!(self.flush_in_flight.swap(false, Ordering::AcqRel), "a flush round ended twice");
        let mut s = lock(&self.sync);
        match result {
            // A failure latched while this fsync ran (a rotation's fsync) leaves what it covers
            // unproven: the durable sequence number stays.
            Ok(upto) if s.failed.is_none() => {
                self.metrics.on_fsync(started.elapsed(), upto.saturating_sub(s.durable_seq));
                s.raise_durable(upto);
            }
            Ok(_) => {}
            // Never retried: after a failed write or fsync the page cache may have dropped the
            // data, so a later "successful" fsync would prove nothing.
            Err(e) => s.latch_error(&e),
        }
        let more = s.failed.is_none() && self.appended_seq.load(Ordering::Acquire) > s.durable_seq;
        (s, more)
    }

    /// The I/O of a flush round, outside every lock. The outbox names the last record appended
    /// together with the file whose fsync makes it durable (a rotation fsynced the segment
    /// before it), and writes what is still queued. Returns the sequence number now durable.
    fn write_and_sync(&self) -> Result<u64> {
        self.backend.as_ref().map_or(Ok(0), |backend| backend.sync())
    }

    /// The flusher thread: once callers hand flushing over, flushes back to back until a round
    /// finds nothing new, then hands flushing back to the callers and sleeps.
    fn flusher_loop(&self) {
        let mut s = lock(&self.sync);
        loop {
            while !s.thread_owns && !s.stop {
                s = self.flusher_wake.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if s.stop {
                return;
            }
            debug_assert!(s.flushing, "the flusher thread owns flushing without a flush in flight");
            drop(s);
            let (mut after, more) = self.flush_round();
            if !more {
                after.end_flush(true);
            }
            wake_settled(after, false);
            s = lock(&self.sync);
        }
    }
}

/// After a flush: wakes the waiting callers (tasks and blocked threads) the flush settled, or
/// all of them if the ledger failed or `everyone` asks for it. Unlocked before waking: the
/// woken callers need the lock, and while they queue for it the next round gathers their new
/// records instead of starting with one.
fn wake_settled(mut s: MutexGuard<'_, SyncState>, everyone: bool) {
    let (durable, failed) = (s.durable_seq, s.failed.is_some());
    let mut tasks = Vec::new();
    s.wakers.retain(|(target, waker)| {
        let t = target.load(Ordering::Acquire);
        let settled = everyone || failed || (t != PENDING && t <= durable);
        if settled {
            tasks.push(waker.clone());
        }
        !settled
    });
    drop(s);
    tasks.into_iter().for_each(std::task::Waker::wake);
}

/// The flusher thread, started the first time callers arrive faster than one fsync at a time
/// (see `Ledger::settle`); it ends when the last handle is dropped.
#[derive(Debug)]
pub(super) struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Flusher {
    /// The flusher of `shared`, not started yet.
    pub(super) fn new(shared: Arc<Shared>) -> Flusher {
        Flusher { shared, thread: Mutex::new(None) }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let commit = &self.shared.commit;
        lock(&commit.sync).stop = true;
        commit.flusher_wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Ledger {
    /// Queues `run` for the combiner and returns a future that resolves once it has run and
    /// what it appended is durable. `run` runs under the core lock (maybe on another caller's
    /// thread) and returns its result and whether it appended anything.
    pub(super) fn submit<R: Send + 'static>(
        &self,
        run: impl FnOnce(&Ledger, &mut Core) -> (Result<R>, bool) + Send + 'static,
    ) -> Durable<R> {
        let call = Call::new();
        let command = call.command(run);
        Durable { ledger: self.clone(), call, command: Some(command), ready: None, finished: false }
    }

    /// [`Ledger::submit`] for a blocking caller: returns the result once it is durable,
    /// helping (combining, flushing) on the way.
    pub(super) fn submit_and_wait<R: Send + 'static>(
        &self,
        run: impl FnOnce(&Ledger, &mut Core) -> (Result<R>, bool) + Send + 'static,
    ) -> Result<R> {
        let call = Call::new();
        let mut s = lock(&self.shared.commit.sync);
        Self::enqueue(&mut s, call.command(run))?;
        let settled = self.settle(s, &call.target);
        call.finish(settled, self.shared.commit.epoch.load(Ordering::Acquire))
    }

    /// Returns once every event up to `seq` is durable.
    pub(super) fn wait_durable(&self, seq: u64) -> Result<()> {
        self.settle(lock(&self.shared.commit.sync), &Arc::new(AtomicU64::new(seq)))
    }

    /// Waits, helping as it goes (see the module's docs), until `target` names a sequence
    /// number (`PENDING` until the caller's command has run) and everything up to it is
    /// durable. A caller with nothing to do registers to be woken like a task and parks: a
    /// flush wakes only the callers it settled, where a condition variable woke every blocked
    /// thread on every flush and most of them went back to sleep.
    fn settle<'a>(&'a self, mut s: MutexGuard<'a, SyncState>, target: &Arc<AtomicU64>) -> Result<()> {
        let get = || {
            let t = target.load(Ordering::Acquire);
            (t != PENDING).then_some(t)
        };
        loop {
            match self.advance(s, &get, true) {
                Step::Settled(r) => return r,
                Step::Wait(mut g) => {
                    let wake = Arc::new(ThreadWake { thread: std::thread::current(), woken: AtomicBool::new(false) });
                    g.wakers.push((target.clone(), std::task::Waker::from(wake.clone())));
                    drop(g);
                    // `park` may return without an `unpark`; the flag says whether it was woken.
                    while !wake.woken.load(Ordering::Acquire) {
                        std::thread::park();
                    }
                    s = lock(&self.shared.commit.sync);
                }
            }
        }
    }

    /// The part of `settle` that the blocking calls and the futures share: helps (combines,
    /// flushes) until the caller's command is durable, the ledger has failed, or there is
    /// nothing left to do but wait. A blocking caller (`lead`) fsyncs itself; an async one
    /// hands every fsync to the flusher thread.
    fn advance<'a>(
        &'a self,
        mut s: MutexGuard<'a, SyncState>,
        target: &impl Fn() -> Option<u64>,
        lead: bool,
    ) -> Step<'a> {
        loop {
            let done = target();
            if let Some(t) = done {
                if s.durable_seq >= t {
                    return Step::Settled(Ok(()));
                }
            }
            if let Err(e) = s.check_failed() {
                return Step::Settled(Err(e));
            }
            s = match done {
                None if !s.combining => self.combine_then_flush(s, lead),
                Some(_) if !s.flushing && lead => self.lead_flush(s),
                Some(_) if !s.flushing => self.hand_flush_to_thread(s),
                _ => return Step::Wait(s),
            };
        }
    }

    /// Queues `command` unless the ledger has failed.
    fn enqueue(s: &mut SyncState, command: Command) -> Result<()> {
        s.check_failed()?;
        s.queue.push(command);
        Ok(())
    }

    /// Combines (`combining` must be clear), then sees to a flush of what it appended if none is
    /// in progress: its own command may be durable already while the ones it ran after it are
    /// not. A blocking caller flushes itself (`lead`); an async one hands the flush over.
    fn combine_then_flush<'a>(&'a self, mut s: MutexGuard<'a, SyncState>, lead: bool) -> MutexGuard<'a, SyncState> {
        s.begin_combining();
        let (s, owe_flush) = self.combine(s);
        match (owe_flush && !s.flushing, lead) {
            (false, _) => s,
            (true, true) => self.lead_flush(s),
            (true, false) => self.hand_flush_to_thread(s),
        }
    }

    /// One flush round led by this caller (`flushing` must be clear); if records arrived
    /// during it, the flusher thread takes over. Wakes the waiters it settled.
    fn lead_flush<'a>(&'a self, mut s: MutexGuard<'a, SyncState>) -> MutexGuard<'a, SyncState> {
        let commit = &self.shared.commit;
        s.begin_flush();
        drop(s);
        let (mut after, more) = commit.flush_round();
        let stranded = if more && self.start_flusher() {
            after.hand_to_thread();
            commit.flusher_wake.notify_one();
            false
        } else {
            after.end_flush(false);
            // No flusher thread could be started: the callers whose records arrived meanwhile
            // must flush them themselves, so they all look again.
            more
        };
        wake_settled(after, stranded);
        lock(&commit.sync)
    }

    /// For async callers, which never fsync themselves: hands flushing to the flusher thread
    /// (`flushing` must be clear), or flushes here if the thread cannot be started.
    fn hand_flush_to_thread<'a>(&'a self, mut s: MutexGuard<'a, SyncState>) -> MutexGuard<'a, SyncState> {
        if self.start_flusher() {
            s.begin_flush();
            s.hand_to_thread();
            self.shared.commit.flusher_wake.notify_one();
            s
        } else {
            self.lead_flush(s)
        }
    }

    /// Runs queued commands under one hold of the core lock, batch after batch while more
    /// arrive (a bounded number, so that one caller does not combine for everyone forever).
    /// Called with `combining` set; returns with it cleared, and whether records it appended
    /// wait for a flush that nobody has started (the caller must then see to one).
    fn combine<'a>(&'a self, mut s: MutexGuard<'a, SyncState>) -> (MutexGuard<'a, SyncState>, bool) {
        let sh = &self.shared;
        let mut ran = 0;
        let mut wake = false;
        while !s.queue.is_empty() && ran < COMBINE_MAX {
            if s.failed.is_some() {
                // After a failed fsync nothing more is written; the callers see why.
                s.queue.clear();
                wake = true;
                break;
            }
            let mut batch = std::mem::take(&mut s.queue);
            sh.commit.metrics.on_combine(batch.len());
            drop(s);
            {
                let mut core = lock(&sh.core);
                for command in batch.drain(..) {
                    // A command that appends nothing may be settled already: wake its caller.
                    wake |= !command(self, &mut core);
                    ran += 1;
                }
                sh.commit.write_appended(&mut core);
            }
            s = lock(&sh.commit.sync);
            if s.queue.is_empty() {
                // Hand the emptied vector back to the queue (no allocation for the next batch).
                s.queue = batch;
            }
        }
        s.end_combining();
        // Commands still queued need a new combiner; commands that appended nothing (or
        // failed) need their callers to look again.
        if wake || !s.queue.is_empty() {
            let tasks = std::mem::take(&mut s.wakers);
            drop(s);
            tasks.into_iter().for_each(|(_, w)| w.wake());
            s = lock(&sh.commit.sync);
        }
        // If a flush is in progress, its final look at `appended_seq` (under this lock, after
        // this point) sees these records and goes on; otherwise the caller must start one.
        let owe_flush = !s.flushing && sh.commit.appended_seq.load(Ordering::Acquire) > s.durable_seq;
        (s, owe_flush)
    }

    /// Starts the flusher thread if it is not running; false if it cannot be started (the
    /// callers then go on flushing themselves).
    fn start_flusher(&self) -> bool {
        let mut thread = lock(&self.flusher.thread);
        if thread.is_some() {
            return true;
        }
        let sh = self.shared.clone();
        match std::thread::Builder::new().name("ledger-flusher".into()).spawn(move || sh.commit.flusher_loop()) {
            Ok(t) => {
                *thread = Some(t);
                true
            }
            Err(_) => false,
        }
    }
}

/// A write submitted by an async caller ([`Ledger::request_resources_async`],
/// [`Ledger::release_resources_async`]): resolves once the command has run and its events are
/// durable, with the same result the blocking call returns. It does not need a particular
/// runtime. Dropped before it resolves, the command may still run (like a client that went
/// away after asking): a grant nobody saw ends at its deadline.
#[must_use = "a write does nothing until it is awaited"]
pub struct Durable<R> {
    ledger: Ledger,
    call: Arc<Call<R>>,
    /// Until the first poll queues it.
    command: Option<Command>,
    /// Decided before queueing (invalid arguments, a read-only ledger).
    ready: Option<Result<R>>,
    /// It has resolved; polling it again is a bug in the caller.
    finished: bool,
}

// No field is pinned structurally: `poll` only moves the result out.
impl<R> Unpin for Durable<R> {}

impl<R> Durable<R> {
    /// A future that resolves at once with `r`, decided without queueing anything.
    pub(super) fn ready(ledger: &Ledger, r: Result<R>) -> Durable<R> {
        Durable { ledger: ledger.clone(), call: Call::new(), command: None, ready: Some(r), finished: false }
    }
}

impl<R> std::fmt::Debug for Durable<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").field("target", &self.call.target()).finish_non_exhaustive()
    }
}

impl<R> std::future::Future for Durable<R> {
    type Output = Result<R>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<R>> {
        use std::task::Poll;
        let this = self.get_mut();
        assert!(!this.finished, "a Durable future was polled after it resolved");
        if let Some(r) = this.ready.take() {
            this.finished = true;
            return Poll::Ready(r);
        }
        let mut s = lock(&this.ledger.shared.commit.sync);
        if let Some(command) = this.command.take() {
            if let Err(e) = Ledger::enqueue(&mut s, command) {
                this.finished = true;
                return Poll::Ready(Err(e));
            }
        }
        let call = &this.call;
        match this.ledger.advance(s, &|| call.target(), false) {
            Step::Settled(settled) => {
                this.finished = true;
                Poll::Ready(call.finish(settled, this.ledger.shared.commit.epoch.load(Ordering::Acquire)))
            }
            Step::Wait(mut s) => {
                s.wakers.push((call.target.clone(), cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::ManualClock;
    use crate::domain::config::Config;
    use crate::domain::event::EventBody;
    use crate::domain::input::ResourceRequest;
    use crate::ledger::OpenOptions;
    use crate::log::storage::FaultyStorage;
    use crate::report::RequestOutcome;
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// Another caller's command panics while this caller combines: the panic reaches the caller
    /// whose command it was (on its own thread), the combiner gets its own result, and the ledger
    /// goes on. Without the hand-over, the combiner's caller would panic instead, `combining`
    /// would stay set, and every later write would wait forever.
    #[test]
    fn a_command_that_panics_panics_its_own_caller_and_the_ledger_goes_on() {
        let storage = FaultyStorage::new();
        let opts = OpenOptions::default()
            .storage(Arc::new(storage.clone()))
            .clock(Arc::new(ManualClock::at_default_epoch()))
            .config(Config::default());
        let ledger = Ledger::open_with("/mem-panic", opts).unwrap();
        let req = ResourceRequest::new("combiner").workers(1);

        // Holding the state lock keeps the first caller combining, so the second queues behind it.
        let held = lock(&ledger.shared.core);
        let (a, b) = (ledger.clone(), ledger.clone());
        let combiner = std::thread::spawn(move || a.request_resources(&req));
        wait_for("the first caller to combine", || lock(&ledger.shared.commit.sync).combining);
        let panicking = std::thread::spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                b.write_checked(
                    |_, _| Ok(None),
                    |_, _, _| -> Result<(Vec<EventBody>, ())> { panic!("boom in a command") },
                )
            }))
        });
        wait_for("the second command to queue", || lock(&ledger.shared.commit.sync).queue.len() == 1);
        drop(held);

        let granted = combiner.join().expect("the combiner's caller does not panic").unwrap();
        assert!(matches!(granted, RequestOutcome::Granted(_)), "{granted:?}");
        let payload = panicking.join().unwrap().expect_err("the panicking command's caller panics");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in a command"));

        // Nothing is stuck: the next write runs and is durable.
        let s = lock(&ledger.shared.commit.sync);
        assert!(!s.combining && s.queue.is_empty() && s.failed.is_none(), "{s:?}");
        drop(s);
        let again = ledger.request_resources(&ResourceRequest::new("after").workers(1)).unwrap();
        assert!(matches!(again, RequestOutcome::Granted(_)));
        assert_eq!(ledger.status().durable_seq, ledger.status().last_seq);
    }

    #[test]
    #[should_panic(expected = "polled after it resolved")]
    fn a_durable_future_polled_after_it_resolved_says_so() {
        use std::future::Future;
        let opts = OpenOptions::default()
            .storage(Arc::new(FaultyStorage::new()))
            .clock(Arc::new(ManualClock::at_default_epoch()));
        let ledger = Ledger::open_with("/mem-poll", opts).unwrap();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(ledger.release_resources_async("not-an-id"));
        assert!(matches!(fut.as_mut().poll(&mut cx), std::task::Poll::Ready(Err(Error::InvalidInput { .. }))));
        let _ = fut.as_mut().poll(&mut cx);
    }
}
