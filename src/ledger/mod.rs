//! The ledger: opens (snapshot + tail replay, torn-tail cut), decides commands against the
//! state, appends their events, and acknowledges only once they are durable. Concurrent
//! writers share fsyncs: whoever finds no fsync in flight becomes the leader and syncs
//! everything appended so far; the others wait for it (group commit).

pub(crate) mod index;

use crate::domain::clock::{Clock, Micros, SystemClock};
use crate::domain::config::Config;
use crate::domain::decide::{already_ended_report, decide_release, decide_request_outcome};
use crate::domain::event::{Event, EventBody, LoggedEvent};
use crate::domain::input::ResourceRequest;
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::state::{Allocation, State};
use crate::log::layout::{LOCK_FILE, QUARANTINE_DIR, SNAPSHOTS_KEPT, SNAPSHOT_DIR, WAL_DIR, WAL_STAGING_DIR};
use crate::log::reader::{
    newest_loadable, rebuild_allocations, retry_beside_writer, AllocationFilter, LogReader, LogRules, Wording,
};
use crate::log::snapshot;
use crate::log::storage::{FsStorage, LockGuard, Storage};
use crate::log::wal::{self, AppendError, TornTail, WalWriter};
use crate::report::*;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How to open a ledger.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Config for a ledger created by this open; an existing ledger keeps the config in its log.
    pub config: Option<Config>,
    pub clock: Arc<dyn Clock>,
    pub storage: Arc<dyn Storage>,
    /// Create the ledger if the directory holds none (read-write opens only).
    pub create: bool,
    /// Open without the write lock, beside a running writer; every write fails.
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            config: None,
            clock: Arc::new(SystemClock),
            storage: Arc::new(FsStorage { mmap_min_bytes: 1 << 20 }),
            create: true,
            read_only: false,
        }
    }
}

impl OpenOptions {
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            create: false,
            storage: Arc::new(FsStorage { mmap_min_bytes: 0 }),
            ..Default::default()
        }
    }

    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = storage;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SetAside {
    pub file: PathBuf,
    pub reason: String,
    /// Where it was moved (read-write opens only).
    pub moved_to: Option<PathBuf>,
}

/// What opening found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    pub created: bool,
    pub snapshot_seq: Option<u64>,
    pub events_replayed: u64,
    /// Replay started right after the snapshot's last event (the position it recorded checked
    /// out) rather than at the start of that event's segment.
    pub resumed_from_snapshot_position: bool,
    pub last_seq: u64,
    pub torn_tail: Option<TornTail>,
    pub snapshots_set_aside: Vec<SetAside>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    pub seq: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerStatus {
    pub data_dir: PathBuf,
    pub ledger_id: String,
    pub read_only: bool,
    pub last_seq: u64,
    pub durable_seq: u64,
    /// Why the ledger stopped accepting writes, if it did.
    pub poisoned: Option<String>,
    pub last_snapshot_error: Option<String>,
}

#[derive(Debug)]
struct Core {
    state: State,
    wal: Option<WalWriter>,
    poisoned: Option<String>,
    since_snapshot: u64,
    /// Log bytes (record frames) appended since the last snapshot, and that snapshot's size:
    /// a large state's snapshot waits until the log has grown by as much (`snapshot_is_due`).
    log_bytes_since_snapshot: u64,
    last_snapshot_bytes: u64,
    last_snapshot_error: Option<String>,
    /// Derived capacity index (see `history`); built on first use, kept current by `append`.
    capacity_index: Option<crate::ledger::index::CapacityIndex>,
}

/// Snapshots larger than this are spaced by the log they save replaying (see
/// `Core::snapshot_is_due`); below it a snapshot costs about a millisecond.
const SNAPSHOT_SPACED_ABOVE_BYTES: u64 = 1 << 20;

impl Core {
    /// A periodic snapshot is due every `snapshot_every` events; for a state whose snapshot is
    /// larger than 1 MiB, also only once the log has grown by that snapshot's size since it. So
    /// snapshots never write more than the log does (a 60000-allocation state is 12 MB, which
    /// 10000 grants' records are not), and an open replays at most one snapshot's worth of log
    /// beyond `snapshot_every` events. Redis rewrites its append-only file on the same rule.
    fn snapshot_is_due(&self) -> bool {
        let every = self.state.config.snapshot_every;
        every > 0
            && self.since_snapshot >= every
            && (self.last_snapshot_bytes <= SNAPSHOT_SPACED_ABOVE_BYTES
                || self.log_bytes_since_snapshot >= self.last_snapshot_bytes)
    }
}

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
        Arc::new(Call { target: Arc::new(AtomicU64::new(PENDING)), result: Mutex::new(None) })
    }

    fn target(&self) -> Option<u64> {
        let t = self.target.load(Ordering::Acquire);
        (t != PENDING).then_some(t)
    }

    /// The caller's answer once `settle` (or the future) finished with `settled`.
    fn finish(&self, settled: Result<()>) -> Result<R> {
        match (settled, lock(&self.result).take()) {
            (_, Some(Outcome::Panicked(payload))) => std::panic::resume_unwind(payload),
            // Not acknowledged: what it appended (or expired on the way) is not durable.
            (Err(e), Some(Outcome::Done(Ok(_)))) | (Err(e), None) => Err(e),
            (_, Some(Outcome::Done(r))) => r,
            (Ok(()), None) => unreachable!("a settled command has its result"),
        }
    }

    /// The boxed command that runs `decide` and records the outcome here.
    fn command(
        self: &Arc<Self>,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)> + Send + 'static,
    ) -> Command
    where
        R: Send + 'static,
    {
        let call = self.clone();
        Box::new(move |ledger: &Ledger, core: &mut Core| {
            // A panic must not leave the combiner's own caller, and everyone queued behind it,
            // waiting forever: it is caught here and handed to the caller whose command it was.
            // (Appends are single calls, so the log is whole; see `lock`.)
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ledger.run_command(core, decide)));
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

#[derive(Default)]
struct SyncState {
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

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    read_only: bool,
    core: Mutex<Core>,
    sync: Mutex<SyncState>,
    /// Wakes the flusher thread when callers hand flushing over to it.
    flusher_wake: Condvar,
    /// Sequence number of the last record appended (durable or not); written under the core
    /// lock, read without it by a flush deciding whether another round is due.
    appended_seq: AtomicU64,
    /// Appended records for flushes to write and fsync without taking the core lock (64
    /// callers queue for that lock; a flush that waits its turn delays all of them). `None`
    /// for a read-only ledger.
    outbox: Option<Arc<wal::Outbox>>,
    /// `Core::since_snapshot` reached `snapshot_every`: read after every write without the core
    /// lock, which a combiner may be holding for a whole batch.
    snapshot_due: AtomicBool,
    /// One snapshot at a time; holds what the next one can reuse of the last one's encoding.
    snapshot_lock: Mutex<snapshot::EncodingCache>,
    /// One capacity-index build at a time.
    index_build_lock: Mutex<()>,
    recovery: RecoveryReport,
    _lock: Option<Box<dyn LockGuard>>,
}

impl Drop for Shared {
    /// The last handle is gone: records still queued belong to commands nobody waits for any
    /// more (a dropped future's); write and fsync them anyway, as a clean close would, unless
    /// the ledger failed.
    fn drop(&mut self) {
        let appended = *self.appended_seq.get_mut();
        let (failed, unflushed) =
            self.sync.get_mut().map_or((true, false), |s| (s.failed.is_some(), appended > s.durable_seq));
        let poisoned = self.core.get_mut().map_or(true, |c| c.poisoned.is_some());
        if let (Some(outbox), true, false, false) = (&self.outbox, unflushed, failed, poisoned) {
            if let Ok(written) = outbox.write_out() {
                let _ = outbox.sync(&written);
            }
        }
    }
}

/// What an open learned of the log and the snapshot it started from (all zero for a new
/// ledger), for the snapshot schedule.
#[derive(Debug, Default)]
struct OpenedLog {
    snapshot_seq: u64,
    last_snapshot_bytes: u64,
    log_bytes_since_snapshot: u64,
}

/// A place where a ledger may be created: no log directory and no snapshot. Anything else
/// holds (or held) a ledger, damaged or not, and is never replaced.
fn is_empty_place(storage: &dyn Storage, dir: &Path) -> Result<bool> {
    if storage.exists(&dir.join(WAL_DIR)) {
        return Ok(false);
    }
    let snap_dir = dir.join(SNAPSHOT_DIR);
    if !storage.exists(&snap_dir) {
        return Ok(true);
    }
    let snaps = snapshot::list(storage, &snap_dir).map_err(|e| Error::io("listing snapshots", e))?;
    Ok(snaps.is_empty())
}

/// The `ledger_id` in the log's first record. `None` when the first segment is missing (the
/// replay reports the gap); damage in the first record is an error: the ledger's identity
/// cannot be checked, whatever a snapshot would let an open skip.
fn log_ledger_id(storage: &dyn Storage, wal_dir: &Path) -> Result<Option<String>> {
    let first = wal::list_segments(storage, wal_dir)?.into_iter().next().filter(|s| s.first_seq == 1);
    if first.is_none() {
        return Ok(None);
    }
    let mut id = None;
    // Torn before its first record, or empty: no id, and the replay says which.
    LogReader::new(storage, wal_dir).upto(1).events(&mut LogRules::from_start(), Wording::Open, &mut |_, ev| {
        if let EventBody::LedgerCreated { ledger_id, .. } = ev.body {
            id = Some(ledger_id);
        }
        Ok(false)
    })?;
    Ok(id)
}

/// Why a snapshot that loaded does not belong to the log beside it: another ledger's (its
/// `ledger_id` differs from the log's first record), or another history's (the record it was
/// taken after, at its recorded position, is not the one in the log). A log that does not
/// reach the snapshot's record is left to the replay, which reports the missing records.
fn snapshot_not_of_log(
    storage: &dyn Storage,
    wal_dir: &Path,
    log_id: Option<&str>,
    state: &State,
    position: Option<wal::LogPosition>,
) -> Option<String> {
    if let Some(id) = log_id.filter(|id| *id != state.ledger_id) {
        return Some(format!(
            "the snapshot belongs to another ledger (ledger_id {}, the log's is {id})",
            state.ledger_id
        ));
    }
    let (p, crc) = position.and_then(|p| Some((p, p.record_crc?)))?;
    match wal::read_record_at(storage, wal_dir, p.segment_first_seq, p.offset) {
        Some((seq, _, found)) if seq == p.seq && found != crc => Some(format!(
            "the snapshot does not match the log: record {seq} (offset {} of segment {}) has checksum {found:#010x}, \
             the snapshot was taken after one with {crc:#010x}",
            p.offset,
            crate::log::segment::file_name(p.segment_first_seq)
        )),
        _ => None,
    }
}

/// A handle to an open ledger; cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
    flusher: Arc<Flusher>,
}

/// The flusher thread, started the first time callers arrive faster than one fsync at a time
/// (see `Ledger::settle`); it ends when the last handle is dropped.
#[derive(Debug)]
struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.sync).stop = true;
        self.shared.flusher_wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the log half-written (appends are single
    // calls), so keep going with the data as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records decoded per batch by the replay's decoder threads. Batches in flight (queued,
/// being decoded, decoded and waiting to be folded) are what a full replay holds beyond the
/// state: with 2048 records (and 1 MiB) per batch its peak RSS on the 1M-event benchmark
/// ledger was 2.6 KiB per active allocation, with 256 (and 128 KiB) 1.8 KiB, at the same rate.
const REPLAY_BATCH: usize = 256;

/// Replays the log after `state.last_seq` into `state`, checking each event. Decoding runs on
/// several threads while the fold stays sequential; if anything is wrong the sequential path
/// runs instead, so damage is reported with its exact file, offset and sequence number.
///
/// `hint` is where the state's last event sits in the log (from its snapshot). `reload` gives
/// the starting state again: a parallel attempt that fails has folded part of the log into
/// `state`, and keeping a copy instead would double the memory a large state takes.
fn replay_into(
    storage: &dyn Storage,
    wal_dir: &Path,
    state: &mut State,
    hint: Option<wal::LogPosition>,
    reload: &dyn Fn() -> Result<State>,
) -> Result<(wal::LogEnd, u64)> {
    // The fold keeps one core; the others decode.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let decoders = (cores - 1).clamp(1, 3);
    // Threads pay off only for a long tail (a few MiB of log).
    if cores > 1 && wal::bytes_after(storage, wal_dir, state.last_seq, hint)? >= 4 << 20 {
        if let Some(done) = replay_parallel(storage, wal_dir, state, hint, decoders) {
            return Ok(done);
        }
        *state = reload()?;
    }
    let mut replayed = 0u64;
    let mut rules = LogRules::after(state.last_seq, state.last_ts_us);
    let reader = LogReader::new(storage, wal_dir).after(state.last_seq).hint(hint);
    let end = reader.events(&mut rules, Wording::Open, &mut |pos, ev| {
        state.evolve_owned(pos.seq, ev.ts_us, ev.body);
        replayed += 1;
        Ok(true)
    })?;
    Ok((end, replayed))
}

type Decoded = std::result::Result<Vec<(u64, Event)>, String>;

/// Payloads copied out of the log for a decoder thread: one buffer per batch, recycled, so the
/// copy costs no allocation per record.
#[derive(Default)]
struct PayloadBatch {
    bytes: Vec<u8>,
    /// (sequence number, start, end) in `bytes`.
    records: Vec<(u64, usize, usize)>,
    /// Allocations the fold evicted, for the decoder thread to drop (see
    /// `State::evolve_collecting`).
    graveyard: crate::domain::state::Graveyard,
}

/// Whether the parallel replay hands evicted allocations back to a decoder thread to drop.
/// With the system allocator (glibc) a free from another thread than the one that allocated
/// is slow, and this took full replay of the 1M-event benchmark log from 500-560k to 575-710k
/// events/s; with mimalloc (the binary's allocator, feature `mimalloc`) such frees are cheap
/// and the hand-back costs more than it saves (1.0-1.1M without, 0.78-0.95M with).
const HAND_BACK_EVICTED: bool = !cfg!(feature = "mimalloc");

/// Bytes of payload per batch before it is handed over.
const REPLAY_BATCH_BYTES: usize = 128 << 10;

/// The parallel replay: this thread reads and checks records and folds; `decoders` threads
/// turn batches of payloads into events. `None` means "use the sequential path".
fn replay_parallel(
    storage: &dyn Storage,
    wal_dir: &Path,
    state: &mut State,
    hint: Option<wal::LogPosition>,
    decoders: usize,
) -> Option<(wal::LogEnd, u64)> {
    use std::collections::BTreeMap;
    use std::sync::mpsc;
    /// Decoded batches waiting for their turn, folded strictly in order.
    struct Folder {
        pending: BTreeMap<usize, Decoded>,
        folded: usize,
        replayed: u64,
        spare: Vec<PayloadBatch>,
        graveyard: crate::domain::state::Graveyard,
        rules: LogRules,
    }
    impl Folder {
        fn take(&mut self, index: usize, decoded: Decoded, mut spare: PayloadBatch) {
            spare.bytes.clear();
            spare.records.clear();
            self.spare.push(spare);
            self.pending.insert(index, decoded);
        }
        fn fold_ready(&mut self, state: &mut State) -> std::result::Result<(), String> {
            while let Some(batch) = self.pending.remove(&self.folded) {
                for (seq, ev) in batch? {
                    let graveyard = if HAND_BACK_EVICTED { Some(&mut self.graveyard) } else { None };
                    self.rules.check(seq, ev.ts_us, &ev.body).map_err(|b| b.message(Wording::Open))?;
                    state.evolve_collecting(seq, ev.ts_us, ev.body, graveyard);
                    self.replayed += 1;
                }
                self.folded += 1;
            }
            Ok(())
        }
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<(usize, PayloadBatch)>(decoders * 2);
    let work_rx = Mutex::new(work_rx);
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<(usize, Decoded, PayloadBatch)>();
        for _ in 0..decoders {
            let (work_rx, done_tx) = (&work_rx, done_tx.clone());
            scope.spawn(move || loop {
                let job = lock(work_rx).recv();
                let Ok((index, mut batch)) = job else { break };
                batch.graveyard.clear();
                let decoded = batch
                    .records
                    .iter()
                    .map(|&(seq, start, end)| Event::decode(&batch.bytes[start..end]).map(|e| (seq, e)))
                    .collect();
                if done_tx.send((index, decoded, batch)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);

        let rules = LogRules::after(state.last_seq, state.last_ts_us);
        let mut folder = Folder {
            pending: BTreeMap::new(),
            folded: 0,
            replayed: 0,
            spare: Vec::new(),
            graveyard: Vec::new(),
            rules,
        };
        let mut sent = 0usize;
        let mut batch = PayloadBatch::default();
        let reader = LogReader::new(storage, wal_dir).after(state.last_seq).hint(hint);
        let scanned = reader.records(&mut |pos, payload| {
            let start = batch.bytes.len();
            batch.bytes.extend_from_slice(payload);
            batch.records.push((pos.seq, start, batch.bytes.len()));
            if batch.records.len() == REPLAY_BATCH || batch.bytes.len() >= REPLAY_BATCH_BYTES {
                let next = folder.spare.pop().unwrap_or_default();
                std::mem::swap(&mut batch.graveyard, &mut folder.graveyard);
                work_tx.send((sent, std::mem::replace(&mut batch, next))).map_err(|_| "decoder stopped".to_string())?;
                sent += 1;
                while let Ok((i, d, spare)) = done_rx.try_recv() {
                    folder.take(i, d, spare);
                }
                folder.fold_ready(state)?;
            }
            Ok(true)
        });
        let result = scanned.ok().and_then(|end| {
            if !batch.records.is_empty() {
                work_tx.send((sent, std::mem::take(&mut batch))).ok()?;
                sent += 1;
            }
            drop(work_tx);
            while folder.folded < sent {
                let (i, d, spare) = done_rx.recv().ok()?;
                folder.take(i, d, spare);
                folder.fold_ready(state).ok()?;
            }
            Some(end)
        });
        result.map(|end| (end, folder.replayed))
    })
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir` with the default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Ledger> {
        Self::open_with(dir, OpenOptions::default())
    }

    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Ledger> {
        Self::open_with(dir, OpenOptions::read_only())
    }

    pub fn open_with(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<Ledger> {
        let dir = dir.as_ref();
        if !opts.read_only {
            return Self::open_once(dir, opts);
        }
        retry_beside_writer(&*opts.storage, &dir.join(WAL_DIR), || Self::open_once(dir, opts.clone()))
    }

    fn open_once(dir: &Path, opts: OpenOptions) -> Result<Ledger> {
        let dir = dir.to_path_buf();
        let storage = opts.storage.clone();
        let wal_dir = dir.join(WAL_DIR);
        let snap_dir = dir.join(SNAPSHOT_DIR);
        let quarantine = dir.join(QUARANTINE_DIR);
        let mut report = RecoveryReport::default();

        let lock_guard = if opts.read_only {
            None
        } else {
            if !storage.exists(&dir) && !opts.create {
                return Err(Error::NoLedger { path: dir });
            }
            storage.create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            match storage
                .try_lock(&dir.join(LOCK_FILE))
                .map_err(|e| Error::io(format!("locking {}", dir.display()), e))?
            {
                Some(g) => Some(g),
                None => return Err(Error::Locked { path: dir }),
            }
        };

        if is_empty_place(&*storage, &dir)? {
            if opts.read_only || !opts.create {
                return Err(Error::NoLedger { path: dir });
            }
            return Self::create(dir, opts, lock_guard);
        }
        if !storage.exists(&wal_dir) {
            return Err(Error::Inconsistent {
                path: wal_dir,
                message: "the log directory is missing while snapshots exist: the log was lost (nothing was created or changed)".into(),
            });
        }

        // Newest snapshot that loads; damaged ones are set aside (the log is the truth).
        let empty = || State::empty(opts.config.clone().unwrap_or_default());
        let mut state = empty();
        let mut hint = None;
        let mut loaded_from = None;
        let log_id = log_ledger_id(&*storage, &wal_dir)?;
        let pick = newest_loadable(&*storage, &snap_dir, None, &mut |s, position| {
            snapshot_not_of_log(&*storage, &wal_dir, log_id.as_deref(), s, position).map_or(Ok(()), Err)
        })?;
        for passed in pick.passed {
            let path = passed.file.path;
            let moved_to = if opts.read_only { None } else { set_aside(&*storage, &path, &quarantine) };
            report.snapshots_set_aside.push(SetAside { file: path, reason: passed.reason, moved_to });
        }
        if let Some(picked) = pick.loaded {
            report.snapshot_seq = Some(picked.file.seq);
            state = picked.state;
            hint = picked.position;
            loaded_from = Some(picked.file.path);
        }
        let snapshot_seq = state.last_seq;
        let reload = || match &loaded_from {
            None => Ok(empty()),
            Some(path) => snapshot::load(&*storage, path, snapshot_seq)
                .map(|(s, _)| s)
                .map_err(|e| Error::Inconsistent { path: path.clone(), message: format!("reading it again: {e}") }),
        };
        let (mut end, replayed) = replay_into(&*storage, &wal_dir, &mut state, hint, &reload)?;
        report.resumed_from_snapshot_position = end.resumed_from_hint;
        report.events_replayed = replayed;
        if end.segments.is_empty() {
            return Err(Error::Inconsistent {
                path: wal_dir,
                message: "the log directory holds no segment: the log was lost (nothing was created or changed)".into(),
            });
        }
        if end.last_seq == 0 {
            // A ledger is created with its first record durable before its log directory gets
            // its name, so a log without a whole first record is damaged, not a new ledger.
            let first = &end.segments[0].path;
            return Err(Error::Damaged(crate::error::Damage {
                file: first.clone(),
                offset: end.torn.as_ref().map_or(crate::log::segment::HEADER_LEN as u64, |t| t.offset),
                seq: 1,
                reason: "the first record (ledger_created) is incomplete: the ledger's identity and config are lost; \
                         nothing was cut or created (move the directory aside to start a new ledger)"
                    .into(),
            }));
        }
        if end.last_seq < snapshot_seq {
            return Err(Error::Inconsistent {
                path: wal_dir,
                message: format!(
                    "the newest snapshot is at sequence number {snapshot_seq} but the log ends at {}: records are missing from the log",
                    end.last_seq
                ),
            });
        }

        let mut wal = None;
        if !opts.read_only {
            if let Some(torn) = end.torn.as_mut() {
                wal::cut_torn_tail(&*storage, &quarantine, torn)?;
                if torn.offset == 0 {
                    // The segment's own header was torn and the file is gone: the log now ends
                    // with the segment before it, which was complete.
                    end.segments.pop();
                    end.last_valid_len = match end.segments.last() {
                        Some(prev) => wal::valid_len(&*storage, prev)?,
                        None => 0,
                    };
                }
            }
            let w = WalWriter::resume(storage.clone(), &wal_dir, &end, state.config.segment_size_bytes)?;
            // What we read may have come from the page cache of a process that died before its
            // fsync; make it durable before building on it. That includes the last segment's
            // directory entry: a process that died between creating a segment and syncing its
            // directory leaves a whole, empty segment whose name a power loss could still take,
            // with every record appended to it since.
            w.active_file().sync_data().map_err(|e| Error::io("fsync of the log on open", e))?;
            storage.sync_dir(&wal_dir).map_err(|e| Error::io("fsync of the log directory on open", e))?;
            wal = Some(w);
        }
        report.torn_tail = end.torn.clone();
        report.last_seq = state.last_seq;
        // What the rule for large snapshots needs: the log after the snapshot (less the zeros
        // pre-filled after the last record).
        let last_snapshot_bytes = match &loaded_from {
            Some(path) => storage.file_len(path).unwrap_or(0),
            None => 0,
        };
        let log_bytes_since_snapshot = if last_snapshot_bytes > SNAPSHOT_SPACED_ABOVE_BYTES {
            let zeros = end
                .segments
                .last()
                .and_then(|last| storage.file_len(&last.path).ok())
                .map_or(0, |len| len.saturating_sub(end.last_valid_len));
            wal::bytes_after(&*storage, &wal_dir, snapshot_seq, hint).map_or(u64::MAX, |b| b.saturating_sub(zeros))
        } else {
            0
        };
        let opened = OpenedLog { snapshot_seq, last_snapshot_bytes, log_bytes_since_snapshot };
        Ok(Self::assemble(dir, opts, lock_guard, state, wal, report, opened))
    }

    /// The handle around a state opened (or created) at `dir`.
    fn assemble(
        dir: PathBuf,
        opts: OpenOptions,
        lock_guard: Option<Box<dyn LockGuard>>,
        state: State,
        wal: Option<WalWriter>,
        recovery: RecoveryReport,
        opened: OpenedLog,
    ) -> Ledger {
        let durable = state.last_seq;
        let since_snapshot = state.last_seq - opened.snapshot_seq;
        let outbox = wal.as_ref().map(|w: &WalWriter| w.outbox().clone());
        let shared = Arc::new(Shared {
            dir,
            storage: opts.storage,
            clock: opts.clock,
            read_only: opts.read_only,
            core: Mutex::new(Core {
                state,
                wal,
                poisoned: None,
                since_snapshot,
                log_bytes_since_snapshot: opened.log_bytes_since_snapshot,
                last_snapshot_bytes: opened.last_snapshot_bytes,
                last_snapshot_error: None,
                capacity_index: None,
            }),
            sync: Mutex::new(SyncState { durable_seq: durable, ..Default::default() }),
            flusher_wake: Condvar::new(),
            appended_seq: AtomicU64::new(durable),
            outbox,
            snapshot_due: AtomicBool::new(false),
            snapshot_lock: Mutex::new(snapshot::EncodingCache::default()),
            index_build_lock: Mutex::new(()),
            recovery,
            _lock: lock_guard,
        });
        Ledger { flusher: Arc::new(Flusher { shared: shared.clone(), thread: Mutex::new(None) }), shared }
    }

    /// Creates a new ledger in an empty place. The first segment, with the `ledger_created`
    /// record fsynced in it, is built in a staging directory that is then renamed to `wal/`: a
    /// log directory exists only with a durable first record, so one without is damage, never
    /// a ledger to create again.
    fn create(dir: PathBuf, opts: OpenOptions, lock_guard: Option<Box<dyn LockGuard>>) -> Result<Ledger> {
        let storage = opts.storage.clone();
        let config = opts.config.clone().unwrap_or_default();
        config.validate()?;
        let staging = dir.join(WAL_STAGING_DIR);
        let io = |what: &str, e| Error::io(format!("{what} {}", staging.display()), e);
        // Left by a creation that was interrupted: nothing in it was ever acknowledged.
        if storage.exists(&staging) {
            for name in storage.list(&staging).map_err(|e| io("listing", e))? {
                storage.remove(&staging.join(name)).map_err(|e| io("clearing", e))?;
            }
        }
        let mut w = WalWriter::create(storage.clone(), &staging, config.segment_size_bytes)?;
        let ts = opts.clock.now_micros();
        let body = EventBody::LedgerCreated { ledger_id: uuid::Uuid::new_v4().to_string(), config: config.clone() };
        let payload = Event::new(ts, body.clone()).encode();
        let seq = w.append(&payload).map_err(|e| match e {
            AppendError::Failed(e) | AppendError::Poison(e) => e,
        })?;
        w.hand_off();
        let written = w.outbox().write_out()?;
        w.outbox().sync(&written).map_err(|e| Error::io("fsync of the new ledger", e))?;
        let wal_dir = dir.join(WAL_DIR);
        storage.rename(&staging, &wal_dir).map_err(|e| io("renaming the new log", e))?;
        storage.sync_dir(&dir).map_err(|e| Error::io(format!("fsync of {}", dir.display()), e))?;
        w.moved_to(&wal_dir);
        let mut state = State::empty(config);
        state.evolve(seq, ts, &body);
        let report = RecoveryReport { created: true, last_seq: state.last_seq, ..Default::default() };
        Ok(Self::assemble(dir, opts, lock_guard, state, Some(w), report, OpenedLog::default()))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    pub fn now_micros(&self) -> Micros {
        self.shared.clock.now_micros()
    }

    pub fn status(&self) -> LedgerStatus {
        let core = lock(&self.shared.core);
        let sync = lock(&self.shared.sync);
        LedgerStatus {
            data_dir: self.shared.dir.clone(),
            ledger_id: core.state.ledger_id.clone(),
            read_only: self.shared.read_only,
            last_seq: core.state.last_seq,
            durable_seq: sync.durable_seq,
            poisoned: core.poisoned.clone().or_else(|| sync.failed.clone()),
            last_snapshot_error: core.last_snapshot_error.clone(),
        }
    }

    /// Runs `f` on the current state (a consistent point: nothing is half-applied).
    pub fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&lock(&self.shared.core).state)
    }

    // ----- writing -----

    fn writable_core(&self) -> Result<MutexGuard<'_, Core>> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        let core = lock(&self.shared.core);
        if let Some(why) = &core.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        if let Some(why) = &lock(&self.shared.sync).failed {
            return Err(Error::Poisoned(why.clone()));
        }
        Ok(core)
    }

    /// The timestamp the next event gets: the clock, but strictly after the last event.
    fn next_ts(&self, state: &State) -> Micros {
        self.shared.clock.now_micros().max(state.last_ts_us + 1)
    }

    fn append(&self, core: &mut Core, ts: Micros, body: EventBody) -> Result<u64> {
        debug_assert!(ts > core.state.last_ts_us);
        let ev = Event::new(ts, body);
        let payload = ev.encode();
        if payload.len() > crate::log::record::MAX_PAYLOAD_LEN {
            return Err(Error::invalid("request", "the event would exceed the record size limit"));
        }
        // Evolve sees exactly what replay will see (checked in debug builds; the property tests
        // also compare live state with a replay).
        debug_assert_eq!(Event::decode(&payload).as_ref(), Ok(&ev));
        let wal = core.wal.as_mut().expect("writable ledgers have a log writer");
        match wal.append(&payload) {
            Ok(seq) => {
                let indexed = core.capacity_index.as_mut().map(|ix| ix.observe(seq, ts, &ev.body));
                if indexed == Some(false) {
                    core.capacity_index = None;
                }
                core.state.evolve_owned(seq, ts, ev.body);
                core.since_snapshot += 1;
                core.log_bytes_since_snapshot += (crate::log::record::HEADER_LEN + payload.len()) as u64;
                if core.snapshot_is_due() {
                    self.shared.snapshot_due.store(true, Ordering::Relaxed);
                }
                Ok(seq)
            }
            Err(AppendError::Failed(e)) => Err(e),
            Err(AppendError::Poison(e)) => {
                let why = e.to_string();
                core.poisoned = Some(why.clone());
                // Events appended before this one may not be durable, and the failure may have
                // been an fsync (at rotation): latch it where waiters look, so that nothing
                // retries the fsync and acknowledges them.
                lock(&self.shared.sync).failed.get_or_insert_with(|| why.clone());
                Err(Error::Poisoned(why))
            }
        }
    }

    /// Hands the records the commands just run appended to the outbox, where the next flush
    /// writes them, and only then publishes them to the flush (`appended_seq`). Called before
    /// the core lock is let go, so the flush never sees an event without its record.
    fn write_appended(&self, core: &mut Core) {
        if core.poisoned.is_some() {
            // Records of commands run before the failure are never written now; their
            // callers see the latched reason.
            return;
        }
        let Some(wal) = core.wal.as_mut() else { return };
        wal.hand_off();
        let last = wal.next_seq() - 1;
        if last > self.shared.appended_seq.load(Ordering::Relaxed) {
            self.shared.appended_seq.store(last, Ordering::Release);
        }
    }

    /// Writes expiry events for every allocation past its deadline; returns their ids.
    fn expire_due(&self, core: &mut Core) -> Result<Vec<AllocationId>> {
        let now = self.next_ts(&core.state);
        let due = core.state.due_for_expiry(now);
        let mut ids = Vec::with_capacity(due.len());
        for (allocation_id, deadline_us) in due {
            let ts = self.next_ts(&core.state);
            self.append(core, ts, EventBody::Expired { allocation_id, deadline_us })?;
            ids.push(allocation_id);
        }
        Ok(ids)
    }

    /// Returns once every event up to `seq` is durable.
    fn wait_durable(&self, seq: u64) -> Result<()> {
        self.settle(lock(&self.shared.sync), &Arc::new(AtomicU64::new(seq)))
    }

    /// Waits, helping as it goes, until `target()` names a sequence number (the caller's
    /// command has run) and everything up to it is durable.
    ///
    /// Writers share both halves of a write. *Combining:* commands queue in `SyncState`; a
    /// caller that finds nobody combining runs the queued commands, its own and others', in one
    /// hold of the core lock, so 64 callers do not hand that lock to each other 64 times (each
    /// hand-over a sleep and a wake-up). *Group commit:* a caller whose command has run and
    /// finds no flush in progress fsyncs everything appended so far itself (a lone caller pays
    /// no hand-over between threads); if more records arrived during its fsync, it hands
    /// flushing over to the flusher thread, which flushes back to back while records keep
    /// arriving, so that callers released by one fsync gather into the next.
    ///
    /// `target` holds the sequence number to wait for (`PENDING` until the caller's command has
    /// run). A caller with nothing to do registers to be woken like a task (`SyncState::wakers`)
    /// and parks: a flush wakes only the callers it settled, where a condition variable woke
    /// every blocked thread on every flush and most of them went back to sleep.
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
                    s = lock(&self.shared.sync);
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
            if let Some(why) = &s.failed {
                return Step::Settled(Err(Error::Poisoned(why.clone())));
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
        if let Some(why) = &s.failed {
            return Err(Error::Poisoned(why.clone()));
        }
        s.queue.push(command);
        Ok(())
    }

    /// Combines (`combining` must be clear), then sees to a flush of what it appended if none is
    /// in progress: its own command may be durable already while the ones it ran after it are
    /// not. A blocking caller flushes itself (`lead`); an async one hands the flush over.
    fn combine_then_flush<'a>(&'a self, mut s: MutexGuard<'a, SyncState>, lead: bool) -> MutexGuard<'a, SyncState> {
        s.combining = true;
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
        let sh = &self.shared;
        debug_assert!(!s.flushing);
        s.flushing = true;
        drop(s);
        let (mut after, more) = flush_round(sh);
        let stranded = if more && self.start_flusher() {
            after.thread_owns = true;
            sh.flusher_wake.notify_one();
            false
        } else {
            after.flushing = false;
            // No flusher thread could be started: the callers whose records arrived meanwhile
            // must flush them themselves, so they all look again.
            more
        };
        wake_settled(after, stranded);
        lock(&sh.sync)
    }

    /// For async callers, which never fsync themselves: hands flushing to the flusher thread
    /// (`flushing` must be clear), or flushes here if the thread cannot be started.
    fn hand_flush_to_thread<'a>(&'a self, mut s: MutexGuard<'a, SyncState>) -> MutexGuard<'a, SyncState> {
        if self.start_flusher() {
            s.flushing = true;
            s.thread_owns = true;
            self.shared.flusher_wake.notify_one();
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
            drop(s);
            {
                let mut core = lock(&sh.core);
                for command in batch.drain(..) {
                    // A command that appends nothing may be settled already: wake its caller.
                    wake |= !command(self, &mut core);
                    ran += 1;
                }
                self.write_appended(&mut core);
            }
            s = lock(&sh.sync);
            if s.queue.is_empty() {
                // Hand the emptied vector back to the queue (no allocation for the next batch).
                s.queue = batch;
            }
        }
        s.combining = false;
        // Commands still queued need a new combiner; commands that appended nothing (or
        // failed) need their callers to look again.
        if wake || !s.queue.is_empty() {
            let tasks = std::mem::take(&mut s.wakers);
            drop(s);
            tasks.into_iter().for_each(|(_, w)| w.wake());
            s = lock(&sh.sync);
        }
        // If a flush is in progress, its final look at `appended_seq` (under this lock, after
        // this point) sees these records and goes on; otherwise the caller must start one.
        let owe_flush = !s.flushing && sh.appended_seq.load(Ordering::Acquire) > s.durable_seq;
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
        match std::thread::Builder::new().name("ledger-flusher".into()).spawn(move || flusher_loop(&sh)) {
            Ok(t) => {
                *thread = Some(t);
                true
            }
            Err(_) => false,
        }
    }

    /// Queues a command for the combiner (see `settle`): expire what is due, run `decide` on the
    /// resulting state, append the events it returns. Returns its result once they are durable.
    fn write<R: Send + 'static>(
        &self,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)> + Send + 'static,
    ) -> Result<R> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        let call = Call::new();
        let mut s = lock(&self.shared.sync);
        Self::enqueue(&mut s, call.command(decide))?;
        let settled = self.settle(s, &call.target);
        let result = call.finish(settled);
        if result.is_ok() {
            self.maybe_snapshot();
        }
        result
    }

    /// The same command as `write`, as a future for async callers: the task that polls it may
    /// run queued commands (a short hold of the core lock), but never waits for an fsync or a
    /// lock held across one. The fsyncs are left to the flusher thread, which wakes the task
    /// when its events are durable. Periodic snapshots are not written by the future (that is
    /// blocking file I/O); see [`Ledger::snapshot_if_due`].
    fn write_async<R: Send + 'static>(
        &self,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)> + Send + 'static,
    ) -> Durable<R> {
        if self.shared.read_only {
            return Durable::ready(self, Err(Error::ReadOnly));
        }
        let call = Call::new();
        let command = call.command(decide);
        Durable { ledger: self.clone(), call, command: Some(command), ready: None, finished: false }
    }

    /// One queued command, under the core lock. Returns its result and whether it appended.
    fn run_command<R>(
        &self,
        core: &mut Core,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)>,
    ) -> (Result<R>, bool) {
        let before = core.state.last_seq;
        let result = (|| {
            if let Some(why) = &core.poisoned {
                return Err(Error::Poisoned(why.clone()));
            }
            let expired = self.expire_due(core)?;
            let ts = self.next_ts(&core.state);
            let (bodies, r) = decide(&core.state, ts, &expired)?;
            let mut ts = ts;
            for body in bodies {
                self.append(core, ts, body)?;
                ts = self.next_ts(&core.state);
            }
            Ok(r)
        })();
        (result, core.state.last_seq != before)
    }

    fn read<R>(&self, f: impl FnOnce(&State, Micros) -> R) -> Result<R> {
        let (r, seq) = {
            let core = lock(&self.shared.core);
            let now = self.shared.clock.now_micros().max(core.state.last_ts_us);
            (f(&core.state, now), core.state.last_seq)
        };
        if !self.shared.read_only {
            // Never show an event that is not yet durable.
            self.wait_durable(seq)?;
        }
        Ok(r)
    }

    /// For the history room: runs `f` on the state, the capacity index slot and the current
    /// instant under the core lock, then (like every read) waits until what it saw is durable.
    pub(crate) fn read_history<R>(
        &self,
        f: impl FnOnce(&State, &mut Option<crate::ledger::index::CapacityIndex>, Micros) -> R,
    ) -> Result<R> {
        let (r, seq) = {
            let mut core = lock(&self.shared.core);
            // `f` may read the log files up to the state's last event (the capacity index
            // catches up that way): those records must be in the files, not only queued.
            self.write_queued()?;
            let core = &mut *core;
            let now = self.shared.clock.now_micros().max(core.state.last_ts_us);
            (f(&core.state, &mut core.capacity_index, now), core.state.last_seq)
        };
        if !self.shared.read_only {
            self.wait_durable(seq)?;
        }
        Ok(r)
    }

    /// Writes the records queued for the next flush now (no fsync), so that a reader of the log
    /// files finds every event folded so far. Call holding the core lock, under which nothing
    /// is appended. A failed write stops the ledger, as in a flush.
    fn write_queued(&self) -> Result<()> {
        let Some(outbox) = &self.shared.outbox else { return Ok(()) };
        if let Some(why) = &lock(&self.shared.sync).failed {
            return Err(Error::Poisoned(why.clone()));
        }
        outbox.write_out().map(drop).map_err(|e| {
            let why = e.to_string();
            lock(&self.shared.sync).failed.get_or_insert_with(|| why.clone());
            Error::Poisoned(why)
        })
    }

    /// The last sequence number of the state once it is durable (and so in the log files), for
    /// readers of the files; with what `f` reads of the state at that point. A ledger that has
    /// stopped (a failed write or fsync) writes nothing more: its files are read as they are,
    /// for diagnosis, up to where they end.
    pub(crate) fn with_durable_state<R>(&self, f: impl FnOnce(&State) -> R) -> Result<(R, u64)> {
        let (r, seq) = self.with_state(|s| (f(s), s.last_seq));
        match self.shared.read_only {
            true => Ok((r, seq)),
            false => match self.wait_durable(seq) {
                Ok(()) | Err(Error::Poisoned(_)) => Ok((r, seq)),
                Err(e) => Err(e),
            },
        }
    }

    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.shared.storage
    }

    pub(crate) fn index_build_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.shared.index_build_lock)
    }

    // ----- operations -----

    /// `request_resources`: grants the request or records why it cannot be granted.
    pub fn request_resources(&self, req: &ResourceRequest) -> Result<RequestOutcome> {
        // Owned: the command may run on another caller's thread (see `settle`).
        let req = req.clone();
        self.write(move |state, ts, _| decide_request_outcome(state, ts, &req))
    }

    /// [`Ledger::request_resources`] for async callers: resolves once the outcome is durable.
    pub fn request_resources_async(&self, req: &ResourceRequest) -> Durable<RequestOutcome> {
        let req = req.clone();
        self.write_async(move |state, ts, _| decide_request_outcome(state, ts, &req))
    }

    /// [`Ledger::release_resources`] for async callers, except for an allocation that ended so
    /// long ago that it is no longer in memory: that comes back as `NotFound`, and
    /// [`Ledger::release_not_in_memory`] (which reads the log: blocking) gives the answer the
    /// blocking call gives.
    pub fn release_resources_async(&self, allocation_id: &str) -> Durable<ReleaseReport> {
        match AllocationId::parse("allocation_id", allocation_id) {
            Ok(id) => self.write_async(move |state, ts, _| decide_release(state, ts, id)),
            Err(e) => Durable::ready(self, Err(e)),
        }
    }

    /// What `release_resources` answers for an id that is not in memory: the allocation's end,
    /// read from the log, or `NotFound`. Reads the log files (blocking).
    pub fn release_not_in_memory(&self, allocation_id: AllocationId) -> Result<ReleaseReport> {
        if self.with_state(|s| s.evicted_count() == 0) {
            return Err(Error::NotFound(allocation_id.to_string()));
        }
        match self.find_in_log(allocation_id)? {
            Some(a) => Ok(already_ended_report(&a)),
            None => Err(Error::NotFound(allocation_id.to_string())),
        }
    }

    /// Writes the periodic snapshot if `snapshot_every` events have been appended since the
    /// last one (blocking file I/O). The blocking calls do this themselves; async callers call
    /// it where blocking is allowed, e.g. after a write when [`Ledger::snapshot_due`] says so.
    pub fn snapshot_if_due(&self) {
        self.maybe_snapshot();
    }

    /// Whether a periodic snapshot is due (cheap; no lock).
    pub fn snapshot_due(&self) -> bool {
        self.shared.snapshot_due.load(Ordering::Relaxed)
    }

    /// `release_resources`. An unknown id is `NotFound`; an allocation already in a terminal
    /// state is reported as such and nothing is written.
    pub fn release_resources(&self, allocation_id: &str) -> Result<ReleaseReport> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        match self.write(move |state, ts, _| decide_release(state, ts, id)) {
            // An allocation that ended long ago is no longer in memory; the log has it.
            Err(Error::NotFound(_)) => self.release_not_in_memory(id),
            other => other,
        }
    }

    /// Rebuilds an allocation that is no longer in memory from its events in the log. Only
    /// records that mention the id are decoded.
    pub fn find_in_log(&self, id: AllocationId) -> Result<Option<Allocation>> {
        let ((), upto) = self.with_durable_state(|_| ())?;
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let reader = LogReader::new(&*self.shared.storage, &wal_dir).upto(upto);
        Ok(rebuild_allocations(&reader, &AllocationFilter::one(id))?.remove(&id))
    }

    /// Every allocation that is no longer in memory, from the log, filtered by job.
    fn evicted_from_log(&self, job_id: Option<&str>) -> Result<Vec<Allocation>> {
        let (in_memory, upto): (std::collections::HashSet<AllocationId>, u64) =
            self.with_durable_state(|s| s.allocations().map(|a| a.id).collect())?;
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let reader = LogReader::new(&*self.shared.storage, &wal_dir).upto(upto);
        let found = rebuild_allocations(&reader, &AllocationFilter::all_but(job_id, &|id| in_memory.contains(id)))?;
        Ok(found.into_values().collect())
    }

    /// `cleanup_expired`: writes the pending expiries and returns their ids.
    pub fn cleanup_expired(&self) -> Result<CleanupReport> {
        self.write(|_, _, expired| {
            Ok((Vec::new(), CleanupReport { cleaned_up: expired.to_vec(), count: expired.len() }))
        })
    }

    /// Records a new config (validated against what is held now).
    pub fn reconfigure(&self, config: Config) -> Result<u64> {
        let seq = self.write(move |state, _, _| {
            let body = state.decide_config_change(config)?;
            Ok((vec![body], state.last_seq + 1))
        })?;
        let mut core = lock(&self.shared.core);
        let size = core.state.config.segment_size_bytes;
        if let Some(w) = core.wal.as_mut() {
            w.set_segment_size(size);
        }
        Ok(seq)
    }

    pub fn get_capacity(&self) -> Result<CapacityReport> {
        self.read(|s, now| s.capacity(now))
    }

    /// `get_allocation`: `Ok(None)` for a well-formed id the ledger does not know.
    pub fn get_allocation(&self, allocation_id: &str) -> Result<Option<AllocationDetails>> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        let (details, evicted, now) = self.read(|s, now| (s.details(id, now), s.evicted_count(), now))?;
        if details.is_some() || evicted == 0 {
            return Ok(details);
        }
        Ok(self.find_in_log(id)?.map(|a| a.details(now)))
    }

    pub fn list_allocations(
        &self,
        state: Option<AllocationState>,
        job_id: Option<&str>,
    ) -> Result<Vec<AllocationSummary>> {
        let (mut rows, evicted, now) = self.read(|s, now| (s.list(state, job_id, now), s.evicted_count(), now))?;
        // Ended allocations beyond the in-memory window are read from the log; active ones are
        // always in memory.
        if evicted > 0 && state != Some(AllocationState::Active) {
            let known: std::collections::HashSet<AllocationId> = rows.iter().map(|r| r.allocation_id).collect();
            for a in self.evicted_from_log(job_id)? {
                if !known.contains(&a.id) && state.is_none_or(|s| a.state_at(now) == s) {
                    rows.push(a.summary(now));
                }
            }
            rows.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.allocation_id.cmp(&b.allocation_id)));
        }
        Ok(rows)
    }

    /// The earliest deadline among active allocations (for an expiry timer).
    pub fn next_deadline(&self) -> Option<Micros> {
        lock(&self.shared.core).state.next_deadline()
    }

    // ----- snapshots -----

    fn maybe_snapshot(&self) {
        let due = |core: &Core| core.snapshot_is_due();
        if !self.shared.snapshot_due.load(Ordering::Relaxed) {
            return;
        }
        // One snapshot at a time, and only if it is still due once we hold the right to write
        // it: otherwise every writer that saw the counter cross the line writes its own.
        let guard = match self.shared.snapshot_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if !due(&lock(&self.shared.core)) {
            return;
        }
        if let Err(e) = self.snapshot_holding(guard) {
            // Snapshots are derived data; the operation that triggered this one succeeded.
            lock(&self.shared.core).last_snapshot_error = Some(e.to_string());
        }
    }

    /// Writes a snapshot of the current state (atomically) and prunes old ones.
    pub fn snapshot(&self) -> Result<SnapshotInfo> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        self.snapshot_holding(lock(&self.shared.snapshot_lock))
    }

    fn snapshot_holding(&self, mut cache: MutexGuard<'_, snapshot::EncodingCache>) -> Result<SnapshotInfo> {
        // Under the lock only the references are copied; sorting and encoding happen outside
        // it while writers go on (an allocation they end is copied then, not shared).
        let (data, mut shared, position) = {
            let mut core = self.writable_core()?;
            core.since_snapshot = 0;
            core.log_bytes_since_snapshot = 0;
            self.shared.snapshot_due.store(false, Ordering::Relaxed);
            let (data, shared) = core.state.snapshot_parts();
            let position = core.wal.as_ref().and_then(|w| w.last_record()).filter(|p| p.seq == data.last_seq);
            (data, shared, position)
        };
        crate::domain::state::sort_for_snapshot(&mut shared);
        let bytes = snapshot::encode_parts_cached(&data, &shared, position, &mut cache);
        drop(shared);
        lock(&self.shared.core).last_snapshot_bytes = bytes.len() as u64;
        // A snapshot must never be ahead of the durable log.
        self.wait_durable(data.last_seq)?;
        let dir = self.shared.dir.join(SNAPSHOT_DIR);
        let storage = &*self.shared.storage;
        let path = snapshot::write_encoded(storage, &dir, data.last_seq, &bytes)
            .map_err(|e| Error::io(format!("writing snapshot {}", data.last_seq), e))?;
        if let Ok(all) = snapshot::list(storage, &dir) {
            for (_, old) in all.into_iter().skip(SNAPSHOTS_KEPT) {
                let _ = storage.remove(&old);
            }
        }
        lock(&self.shared.core).last_snapshot_error = None;
        Ok(SnapshotInfo { seq: data.last_seq, path })
    }

    // ----- reading the log -----

    /// Events with `seq >= from_seq`, at most `limit` of them, read from the log files, up to
    /// the state's last event once it is durable (a stopped ledger's files as they are).
    pub fn events(&self, from_seq: u64, limit: usize) -> Result<Vec<LoggedEvent>> {
        let ((), upto) = self.with_durable_state(|_| ())?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let after = from_seq.saturating_sub(1);
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let reader = LogReader::new(&*self.shared.storage, &wal_dir).after(after).upto(upto);
        reader.events(&mut LogRules::resuming(after), Wording::Open, &mut |pos, event| {
            out.push(LoggedEvent { seq: pos.seq, event });
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Read-only handles: folds in what the writer appended since open or the last refresh.
    pub fn refresh(&self) -> Result<u64> {
        let mut core = lock(&self.shared.core);
        let before = core.state.last_seq;
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let state = retry_beside_writer(&*self.shared.storage, &wal_dir, || {
            let mut state = core.state.clone();
            let reload = || Ok(core.state.clone());
            replay_into(&*self.shared.storage, &wal_dir, &mut state, None, &reload)?;
            Ok(state)
        })?;
        core.state = state;
        Ok(core.state.last_seq - before)
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
    fn ready(ledger: &Ledger, r: Result<R>) -> Durable<R> {
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
        let mut s = lock(&this.ledger.shared.sync);
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
                Poll::Ready(call.finish(settled))
            }
            Step::Wait(mut s) => {
                s.wakers.push((call.target.clone(), cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// One group-commit round: fsyncs the active segment, which covers every record appended so
/// far (a rotation fsyncs the segment it leaves), and publishes the durable sequence number.
/// Returns holding the sync lock, and whether records were appended during the fsync; the
/// caller decides who flushes next and then wakes the waiters, in that order, so that a caller
/// that saw a flush in progress is never left waiting for one that ended. Called with
/// `SyncState::flushing` set, by exactly one thread at a time.
fn flush_round(sh: &Shared) -> (MutexGuard<'_, SyncState>, bool) {
    {
        let s = lock(&sh.sync);
        if s.failed.is_some() {
            // A failed fsync (or rotation) is never followed by another: it could "succeed"
            // for data the kernel already dropped.
            return (s, false);
        }
    }
    // The outbox names the last record appended together with the file whose fsync makes it
    // durable (a rotation fsynced the segment before it), and writes what is still queued.
    let result = match &sh.outbox {
        Some(outbox) => outbox.write_out().map_err(|e| e.to_string()).and_then(|written| {
            outbox.sync(&written).map(|()| written.last_seq).map_err(|e| format!("fsync of the log failed: {e}"))
        }),
        None => Ok(0),
    };
    let mut s = lock(&sh.sync);
    match result {
        // A failure latched while this fsync ran (a rotation's fsync) leaves what it covers
        // unproven: the durable sequence number stays.
        Ok(upto) if s.failed.is_none() => s.durable_seq = s.durable_seq.max(upto),
        Ok(_) => {}
        Err(why) => {
            // Never retried: after a failed write or fsync the page cache may have dropped the
            // data, so a later "successful" fsync would prove nothing.
            s.failed.get_or_insert(why);
        }
    }
    let more = s.failed.is_none() && sh.appended_seq.load(Ordering::Acquire) > s.durable_seq;
    (s, more)
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

/// The flusher thread: once callers hand flushing over, flushes back to back until a round
/// finds nothing new, then hands flushing back to the callers and sleeps.
fn flusher_loop(sh: &Shared) {
    let mut s = lock(&sh.sync);
    loop {
        while !s.thread_owns && !s.stop {
            s = sh.flusher_wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.stop {
            return;
        }
        debug_assert!(s.flushing);
        drop(s);
        let (mut after, more) = flush_round(sh);
        if !more {
            after.thread_owns = false;
            after.flushing = false;
        }
        wake_settled(after, false);
        s = lock(&sh.sync);
    }
}

fn set_aside(storage: &dyn Storage, path: &Path, quarantine: &Path) -> Option<PathBuf> {
    storage.create_dir_all(quarantine).ok()?;
    let _ = storage.sync_dir(quarantine.parent()?);
    let name = path.file_name()?.to_str()?;
    let to = quarantine.join(format!("{name}.damaged"));
    storage.rename(path, &to).ok()?;
    let _ = storage.sync_dir(path.parent()?);
    let _ = storage.sync_dir(quarantine);
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::ManualClock;
    use crate::log::storage::FaultyStorage;
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
        wait_for("the first caller to combine", || lock(&ledger.shared.sync).combining);
        let panicking = std::thread::spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                b.write(|_, _, _| -> Result<(Vec<EventBody>, ())> { panic!("boom in a command") })
            }))
        });
        wait_for("the second command to queue", || lock(&ledger.shared.sync).queue.len() == 1);
        drop(held);

        let granted = combiner.join().expect("the combiner's caller does not panic").unwrap();
        assert!(matches!(granted, RequestOutcome::Granted(_)), "{granted:?}");
        let payload = panicking.join().unwrap().expect_err("the panicking command's caller panics");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in a command"));

        // Nothing is stuck: the next write runs and is durable.
        let s = lock(&ledger.shared.sync);
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
