//! Opening a ledger, as named steps: lock the directory, decide between creating and opening,
//! load the newest snapshot that belongs to the log, replay the log's tail, cut a torn tail,
//! and assemble the handle. A read-only open beside a live writer reads again when what looks
//! like damage may be the writer's write in flight.

use super::commit::{Commit, Flusher};
use super::replay::replay_into;
use super::snapshots::{Snapshots, SNAPSHOT_SPACED_ABOVE_BYTES};
use super::{Core, Ledger, OpenOptions, RecoveryReport, SetAside, Shared};
use crate::domain::clock::Micros;
use crate::domain::event::{Event, EventBody};
use crate::domain::state::State;
use crate::log::backend::{LocalWal, LogBackend, Replicator};
use crate::log::layout::{LOCK_FILE, QUARANTINE_DIR, SNAPSHOT_DIR, WAL_DIR, WAL_STAGING_DIR};
use crate::log::reader::{newest_loadable, retry_beside_writer, LogReader, LogRules, Wording};
use crate::log::snapshot;
use crate::log::storage::{LockGuard, Storage};
use crate::log::wal::{self, AppendError, WalWriter};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The shared log a replicated copy commits to first.
type ReplicatorRef = Arc<dyn Replicator>;

/// What makes an open the local copy of a replicated ledger (nothing, for a local one).
#[derive(Default)]
struct LocalCopy {
    replicator: Option<Arc<dyn Replicator>>,
    first_record: Option<Vec<u8>>,
}

/// What an open learned of the log and the snapshot it started from (all zero for a new
/// ledger), for the snapshot schedule.
#[derive(Debug, Default)]
struct OpenedLog {
    snapshot_seq: u64,
    last_snapshot_bytes: u64,
    log_bytes_since_snapshot: u64,
}

/// The places inside a ledger directory an open looks at.
struct Paths {
    dir: PathBuf,
    wal: PathBuf,
    snapshots: PathBuf,
    quarantine: PathBuf,
}

impl Paths {
    fn of(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_path_buf(),
            wal: dir.join(WAL_DIR),
            snapshots: dir.join(SNAPSHOT_DIR),
            quarantine: dir.join(QUARANTINE_DIR),
        }
    }
}

/// Where the replay starts: the newest snapshot that loaded and belongs to the log (or the
/// empty state), and where its last event sits in the log.
struct Start {
    state: State,
    hint: Option<wal::LogPosition>,
    loaded_from: Option<PathBuf>,
}

impl Ledger {
    /// [`Ledger::open_with`]: a read-only open reads again while damage may be a live writer's
    /// write in flight.
    pub(super) fn open_dir(dir: &Path, mut opts: OpenOptions) -> Result<Ledger> {
        if let Some(replication) = opts.replication.take().filter(|_| !opts.read_only) {
            return replication.open(dir, opts);
        }
        if !opts.read_only {
            return Self::open_once(dir, opts, LocalCopy::default());
        }
        retry_beside_writer(&*opts.storage, &dir.join(WAL_DIR), || {
            Self::open_once(dir, opts.clone(), LocalCopy::default())
        })
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// Opens the local copy of a replicated ledger (`src/replica/`): the same files and open as
    /// a local ledger, with every batch committed to `replicator` before it is written here.
    /// An empty directory is created from `first_record` (the shared log's record 1) when
    /// given, else as a new ledger.
    pub(crate) fn open_local_copy(
        dir: &Path,
        opts: OpenOptions,
        replicator: Arc<dyn Replicator>,
        first_record: Option<Vec<u8>>,
    ) -> Result<Ledger> {
        Self::open_once(dir, opts, LocalCopy { replicator: Some(replicator), first_record })
    }

    /// One attempt at opening (or creating) the ledger in `dir`.
    fn open_once(dir: &Path, opts: OpenOptions, copy: LocalCopy) -> Result<Ledger> {
        let paths = Paths::of(dir);
        let storage = opts.storage.clone();
        let lock_guard = take_lock(&*storage, &paths.dir, &opts)?;
        if is_empty_place(&*storage, &paths.dir)? {
            if opts.read_only || !opts.create {
                return Err(Error::NoLedger { path: paths.dir });
            }
            return Self::create(paths.dir, opts, lock_guard, copy);
        }
        if !storage.exists(&paths.wal) {
            return Err(Error::Inconsistent {
                path: paths.wal,
                message: "the log directory is missing while snapshots exist: the log was lost (nothing was created or changed)".into(),
            });
        }
        let mut report = RecoveryReport::default();
        let mut start = load_newest_snapshot(&*storage, &paths, &opts, &mut report)?;
        let snapshot_seq = start.state.last_seq;
        let mut end = replay_tail(&*storage, &paths, &opts, &mut start, &mut report)?;
        check_log_end(&paths, &end, snapshot_seq)?;
        let wal = match opts.read_only {
            true => None,
            false => Some(resume_writer(&storage, &paths, &mut end, start.state.config.segment_size_bytes)?),
        };
        report.torn_tail = end.torn.clone();
        report.last_seq = start.state.last_seq;
        let opened = snapshot_schedule(&*storage, &paths, &end, &start, snapshot_seq);
        Ok(Self::assemble(paths.dir, opts, (lock_guard, copy.replicator), start.state, wal, report, opened))
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// The handle around a state opened (or created) at `dir`.
    /// A replicated copy that lost leadership (its last batch was refused by the shared log)
    /// drops what it folded but never committed: the state, writer and capacity index are
    /// rebuilt from the local files, which hold only committed records, and the commit
    /// pipeline starts a new epoch (nothing run before is acknowledged). Reads go on against
    /// the reloaded state.
    pub(crate) fn reload_from_files(&self) -> Result<()> {
        let shared = &self.shared;
        let paths = Paths::of(&shared.dir);
        let storage = shared.storage.clone();
        let opts = OpenOptions { storage: storage.clone(), clock: shared.clock.clone(), ..Default::default() };
        let mut core = super::lock(&shared.core);
        let mut report = RecoveryReport::default();
        let mut start = load_newest_snapshot(&*storage, &paths, &opts, &mut report)?;
        let snapshot_seq = start.state.last_seq;
        let mut end = replay_tail(&*storage, &paths, &opts, &mut start, &mut report)?;
        check_log_end(&paths, &end, snapshot_seq)?;
        let wal = resume_writer(&storage, &paths, &mut end, start.state.config.segment_size_bytes)?;
        let opened = snapshot_schedule(&*storage, &paths, &end, &start, snapshot_seq);
        shared.commit.reset(start.state.last_seq, wal.outbox().clone());
        *core = Core {
            since_snapshot: start.state.last_seq - opened.snapshot_seq,
            state: start.state,
            wal: Some(wal),
            poisoned: None,
            log_bytes_since_snapshot: opened.log_bytes_since_snapshot,
            last_snapshot_bytes: opened.last_snapshot_bytes,
            last_snapshot_error: None,
            capacity_index: None,
            // The reloaded queue decides once, as after an open.
            queue: super::queue::QueueWake::default(),
        };
        drop(core);
        *super::lock(&shared.pages) = None;
        Ok(())
    }

    fn assemble(
        dir: PathBuf,
        opts: OpenOptions,
        (lock_guard, replicator): (Option<Box<dyn LockGuard>>, Option<ReplicatorRef>),
        state: State,
        wal: Option<WalWriter>,
        recovery: RecoveryReport,
        opened: OpenedLog,
    ) -> Ledger {
        let durable = state.last_seq;
        let since_snapshot = state.last_seq - opened.snapshot_seq;
        let backend = wal.as_ref().map(|w: &WalWriter| {
            Arc::new(LocalWal::new(w.outbox().clone(), replicator.clone())) as Arc<dyn LogBackend>
        });
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
                queue: super::queue::QueueWake::default(),
            }),
            commit: Commit::new(durable, backend),
            snapshots: Snapshots::default(),
            index_build_lock: Mutex::new(()),
            pages: Mutex::new(None),
            queue_waiters: super::queue::Waiters::default(),
            recovery,
            _lock: lock_guard,
        });
        Ledger { flusher: Arc::new(Flusher::new(shared.clone())), shared }
    }

    /// Creates a new ledger in an empty place. The first segment, with the `ledger_created`
    /// record fsynced in it, is built in a staging directory that is then renamed to `wal/`: a
    /// log directory exists only with a durable first record, so one without is damage, never
    /// a ledger to create again.
    fn create(
        dir: PathBuf,
        opts: OpenOptions,
        lock_guard: Option<Box<dyn LockGuard>>,
        copy: LocalCopy,
    ) -> Result<Ledger> {
        let storage = opts.storage.clone();
        let (ts, body, payload) = first_record(&dir, &opts, copy.first_record.as_deref())?;
        let EventBody::LedgerCreated { config, .. } = &body else {
            return Err(Error::Inconsistent {
                path: dir,
                message: "the shared log's first record is not ledger_created".into(),
            });
        };
        let config = config.clone();
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
        Ok(Self::assemble(dir, opts, (lock_guard, copy.replicator), state, Some(w), report, OpenedLog::default()))
    }
}

/// Step 1: a read-write open takes the directory's lock (creating the directory if it may);
/// a read-only open takes none.
/// The first record of a new ledger: the shared log's (a replicated copy created from it), or
/// a new `ledger_created` with the options' config.
fn first_record(dir: &Path, opts: &OpenOptions, given: Option<&[u8]>) -> Result<(Micros, EventBody, Vec<u8>)> {
    let payload = match given {
        Some(first) => first.to_vec(),
        None => {
            let config = opts.config.clone().unwrap_or_default();
            let body = EventBody::LedgerCreated { ledger_id: uuid::Uuid::new_v4().to_string(), config };
            Event::new(opts.clock.now_micros(), body).encode()
        }
    };
    let ev = Event::decode(&payload).map_err(|e| Error::Inconsistent {
        path: dir.to_path_buf(),
        message: format!("the first record does not decode: {e}"),
    })?;
    Ok((ev.ts_us, ev.body, payload))
}

fn take_lock(storage: &dyn Storage, dir: &Path, opts: &OpenOptions) -> Result<Option<Box<dyn LockGuard>>> {
    if opts.read_only {
        return Ok(None);
    }
    if !storage.exists(dir) && !opts.create {
        return Err(Error::NoLedger { path: dir.to_path_buf() });
    }
    storage.create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    match storage.try_lock(&dir.join(LOCK_FILE)).map_err(|e| Error::io(format!("locking {}", dir.display()), e))? {
        Some(g) => Ok(Some(g)),
        None => Err(Error::Locked { path: dir.to_path_buf() }),
    }
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

/// Step 2: the newest snapshot that loads and belongs to the log; damaged ones (and other
/// logs') are set aside and reported (the log is the truth). The empty state if none does.
fn load_newest_snapshot(
    storage: &dyn Storage,
    paths: &Paths,
    opts: &OpenOptions,
    report: &mut RecoveryReport,
) -> Result<Start> {
    let log_id = log_ledger_id(storage, &paths.wal)?;
    let pick = newest_loadable(storage, &paths.snapshots, None, &mut |s, position| {
        snapshot_not_of_log(storage, &paths.wal, log_id.as_deref(), s, position).map_or(Ok(()), Err)
    })?;
    for passed in pick.passed {
        let path = passed.file.path;
        let moved_to = if opts.read_only { None } else { set_aside(storage, &path, &paths.quarantine) };
        report.snapshots_set_aside.push(SetAside { file: path, reason: passed.reason, moved_to });
    }
    match pick.loaded {
        Some(picked) => {
            report.snapshot_seq = Some(picked.file.seq);
            Ok(Start { state: picked.state, hint: picked.position, loaded_from: Some(picked.file.path) })
        }
        None => Ok(Start { state: empty_state(opts), hint: None, loaded_from: None }),
    }
}

/// The state before the log's first event.
fn empty_state(opts: &OpenOptions) -> State {
    State::empty(opts.config.clone().unwrap_or_default())
}

/// Step 3: folds the log after the starting state into it; returns where the log ends.
fn replay_tail(
    storage: &dyn Storage,
    paths: &Paths,
    opts: &OpenOptions,
    start: &mut Start,
    report: &mut RecoveryReport,
) -> Result<wal::LogEnd> {
    let snapshot_seq = start.state.last_seq;
    let loaded_from = &start.loaded_from;
    let reload = || match loaded_from {
        None => Ok(empty_state(opts)),
        Some(path) => snapshot::load(storage, path, snapshot_seq)
            .map(|(s, _)| s)
            .map_err(|e| Error::Inconsistent { path: path.clone(), message: format!("reading it again: {e}") }),
    };
    let (end, replayed) = replay_into(storage, &paths.wal, &mut start.state, start.hint, &reload)?;
    report.resumed_from_snapshot_position = end.resumed_from_hint;
    report.events_replayed = replayed;
    Ok(end)
}

/// Step 4: the log's end must hold a whole first record and reach the snapshot; anything else
/// is reported and nothing is changed.
fn check_log_end(paths: &Paths, end: &wal::LogEnd, snapshot_seq: u64) -> Result<()> {
    if end.segments.is_empty() {
        return Err(Error::Inconsistent {
            path: paths.wal.clone(),
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
            path: paths.wal.clone(),
            message: format!(
                "the newest snapshot is at sequence number {snapshot_seq} but the log ends at {}: records are missing from the log",
                end.last_seq
            ),
        });
    }
    Ok(())
}

/// Step 5 (read-write opens): cuts a torn tail off, resumes writing after the last record, and
/// makes what was read durable.
fn resume_writer(
    storage: &Arc<dyn Storage>,
    paths: &Paths,
    end: &mut wal::LogEnd,
    segment_size_bytes: u64,
) -> Result<WalWriter> {
    if let Some(torn) = end.torn.as_mut() {
        wal::cut_torn_tail(&**storage, &paths.quarantine, torn)?;
        if torn.offset == 0 {
            // The segment's own header was torn and the file is gone: the log now ends
            // with the segment before it, which was complete.
            end.segments.pop();
            end.last_valid_len = match end.segments.last() {
                Some(prev) => wal::valid_len(&**storage, prev)?,
                None => 0,
            };
        }
    }
    let w = WalWriter::resume(storage.clone(), &paths.wal, end, segment_size_bytes)?;
    // What we read may have come from the page cache of a process that died before its
    // fsync; make it durable before building on it. That includes the last segment's
    // directory entry: a process that died between creating a segment and syncing its
    // directory leaves a whole, empty segment whose name a power loss could still take,
    // with every record appended to it since.
    w.active_file().sync_data().map_err(|e| Error::io("fsync of the log on open", e))?;
    storage.sync_dir(&paths.wal).map_err(|e| Error::io("fsync of the log directory on open", e))?;
    Ok(w)
}

/// Step 6: what the rule for large snapshots needs (`Core::snapshot_is_due`): the snapshot's
/// size, and the log after it (less the zeros pre-filled after the last record).
fn snapshot_schedule(
    storage: &dyn Storage,
    paths: &Paths,
    end: &wal::LogEnd,
    start: &Start,
    snapshot_seq: u64,
) -> OpenedLog {
    let last_snapshot_bytes = match &start.loaded_from {
        Some(path) => storage.file_len(path).unwrap_or(0),
        None => 0,
    };
    let log_bytes_since_snapshot = if last_snapshot_bytes > SNAPSHOT_SPACED_ABOVE_BYTES {
        let zeros = end
            .segments
            .last()
            .and_then(|last| storage.file_len(&last.path).ok())
            .map_or(0, |len| len.saturating_sub(end.last_valid_len));
        wal::bytes_after(storage, &paths.wal, snapshot_seq, start.hint).map_or(u64::MAX, |b| b.saturating_sub(zeros))
    } else {
        0
    };
    OpenedLog { snapshot_seq, last_snapshot_bytes, log_bytes_since_snapshot }
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

/// Moves a snapshot that was not used into the quarantine directory; where it went, or
/// `None` if it could not be moved (it is then left where it is, and reported).
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
