//! The ledger: opens (snapshot + tail replay, torn-tail cut), decides commands against the
//! state, appends their events, and acknowledges only once they are durable. Concurrent
//! writers share fsyncs: whoever finds no fsync in flight becomes the leader and syncs
//! everything appended so far; the others wait for it (group commit).
//!
//! This file holds the handle and its public API, each method a thin step into the file that
//! does the work:
//!
//! | file | job |
//! |---|---|
//! | `options.rs` | the small public types: how to open, what an open or a status found |
//! | `open.rs` | open and recovery as named steps; creating a ledger; a reader's retry beside a writer |
//! | `replay.rs` | folding the log's tail into a state (decoded on several threads when long) |
//! | `apply.rs` | one write under the core lock: expire, decide, append |
//! | `commit.rs` | the commit pipeline: combining, group commit, the flusher thread, [`Durable`] |
//! | `contract.rs` | idempotent requests, lease renewal, plan and `expected_seq` ([`IfSeq`]) |
//! | `snapshots.rs` | when a snapshot is due, and writing one |
//! | `queries.rs` | reads of the state and of the log files |
//! | `index.rs` | the capacity index (derived data the history room asks for) |
//! | `reservation.rs` | advance reservations: reserve, cancel, list, and their reports |

mod apply;
mod commit;
mod contract;
pub(crate) mod index;
mod metrics;
mod open;
mod options;
mod page;
mod pool;
mod preempt;
mod queries;
mod queue;
mod replay;
mod replicated;
mod reservation;
mod snapshots;

pub use commit::Durable;
pub use contract::IfSeq;
pub use metrics::{HistogramSnapshot, LedgerMetrics, MetricsSnapshot};
pub use options::{LedgerStatus, OpenOptions, RecoveryReport, Replication, SetAside, SnapshotInfo};
pub use page::{
    log_cursor, log_cursor_seq, page_history, AllocationPage, ListFilter, PAGE_DEFAULT_LIMIT, PAGE_MAX_LIMIT,
};
pub use pool::{ConfigApplyReport, PoolChangeReport, PoolReport, PoolSlot};
pub use queue::{Admission, CancelReport, GrantWait, PendingReport, RequestFuture};
pub use replicated::WeakLedger;
pub use reservation::{CancelReservationReport, ReservationInfo, ReservationList, ReserveReport};

use crate::domain::clock::{Clock, Micros};
use crate::domain::config::Config;
use crate::domain::event::LoggedEvent;
use crate::domain::input::ResourceRequest;
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::state::{Allocation, State};
use crate::log::storage::{LockGuard, Storage};
use crate::log::wal::WalWriter;
use crate::report::already_ended_report;
use crate::report::{
    AllocationDetails, AllocationSummary, CapacityReport, CleanupReport, PlanReport, ReleaseReport, RenewReport,
    RequestOutcome,
};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the core lock guards: the state and everything that changes with it.
#[derive(Debug)]
struct Core {
    state: State,
    /// The log's writer; `None` for a read-only handle.
    wal: Option<WalWriter>,
    /// Why appending failed for good (the ledger then refuses writes).
    poisoned: Option<String>,
    /// Events appended since the last snapshot.
    since_snapshot: u64,
    /// Log bytes (record frames) appended since the last snapshot, and that snapshot's size:
    /// a large state's snapshot waits until the log has grown by as much (`snapshot_is_due`).
    log_bytes_since_snapshot: u64,
    last_snapshot_bytes: u64,
    /// Why the last periodic snapshot failed, for `status`.
    last_snapshot_error: Option<String>,
    /// Derived capacity index (see `history`); built on first use, kept current by `append`.
    capacity_index: Option<index::CapacityIndex>,
    /// When the pending queue needs its next decision (`queue.rs`).
    queue: queue::QueueWake,
}

/// What every handle shares, grouped by who uses it: the place (fixed at open), the state
/// side (the core lock, snapshots, the index build), and the commit pipeline's side (beside
/// the core lock, so that a flush never queues for it).
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    read_only: bool,
    recovery: RecoveryReport,
    core: Mutex<Core>,
    snapshots: snapshots::Snapshots,
    /// One capacity-index build at a time.
    index_build_lock: Mutex<()>,
    /// The index `list_page` serves ended allocations from (built on the first page).
    pages: Mutex<Option<page::PageIndex>>,
    /// Callers waiting for a queued request to be decided (`queue.rs`).
    queue_waiters: queue::Waiters,
    commit: commit::Commit,
    _lock: Option<Box<dyn LockGuard>>,
}

impl Drop for Shared {
    /// The last handle is gone: the commit pipeline writes and fsyncs what is still queued,
    /// unless the ledger failed.
    fn drop(&mut self) {
        let poisoned = self.core.get_mut().map_or(true, |c| c.poisoned.is_some());
        self.commit.close(poisoned);
    }
}

/// A handle to an open ledger; cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
    flusher: Arc<commit::Flusher>,
}

/// Locks `m`, carrying on past a panic of a former holder.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the log half-written (appends are single
    // calls), so keep going with the data as it is.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ledger {
    // ----- opening (open.rs) -----

    /// Opens (or creates) the ledger in `dir` with the default options.
    ///
    /// ```
    /// use allocation_ledger::Ledger;
    /// let dir = std::env::temp_dir().join(format!("ledger-doc-open-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let ledger = Ledger::open(&dir)?;
    /// assert_eq!(ledger.get_capacity()?.available_workers, 10); // the built-in pool
    /// drop(ledger);
    /// // Everything acknowledged is in the log: a second open finds it.
    /// let again = Ledger::open(&dir)?;
    /// assert!(again.status().last_seq >= 1);
    /// # drop(again); std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), allocation_ledger::Error>(())
    /// ```
    pub fn open(dir: impl AsRef<Path>) -> Result<Ledger> {
        Self::open_with(dir, OpenOptions::default())
    }

    /// Opens the ledger in `dir` for reading beside a running writer (see
    /// [`OpenOptions::read_only`]); [`Ledger::refresh`] folds in what the writer appends.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Ledger> {
        Self::open_with(dir, OpenOptions::read_only())
    }

    /// Opens (or, if `opts` allow, creates) the ledger in `dir`: loads the newest snapshot that
    /// belongs to the log, replays the log after it and cuts a torn tail (read-write only);
    /// [`Ledger::recovery_report`] says what it found.
    pub fn open_with(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<Ledger> {
        Self::open_dir(dir.as_ref(), opts)
    }

    /// The directory the ledger lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What the open found and did.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    /// Whether this handle was opened without the write lock (every write fails).
    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    /// The ledger's clock now (the timestamps of its events come from it).
    pub fn now_micros(&self) -> Micros {
        self.shared.clock.now_micros()
    }

    /// The ledger's health: where its log ends, what is durable, and why it stopped accepting
    /// writes or failed its last snapshot, if it did.
    pub fn status(&self) -> LedgerStatus {
        let core = lock(&self.shared.core);
        let (durable_seq, failed) = self.shared.commit.durable_and_failure();
        LedgerStatus {
            data_dir: self.shared.dir.clone(),
            ledger_id: core.state.ledger_id.clone(),
            read_only: self.shared.read_only,
            last_seq: core.state.last_seq,
            durable_seq,
            poisoned: core.poisoned.clone().or(failed),
            last_snapshot_error: core.last_snapshot_error.clone(),
            chain_head: core.wal.as_ref().and_then(WalWriter::durable_head),
        }
    }

    /// The head of the log's tamper-evident chain (`{seq, hash}`, as `verify` prints it): a
    /// writer's as far as it is durable; a read-only handle's read from the last segment. `None`
    /// while the log ends in an older, unchained segment. Not verified: `verify` recomputes it.
    pub fn chain_head(&self) -> Result<Option<crate::ChainHead>> {
        if let Some(head) = self.status().chain_head {
            return Ok(Some(head));
        }
        let wal_dir = self.shared.dir.join(crate::log::layout::WAL_DIR);
        let storage = &*self.shared.storage;
        crate::log::reader::retry_beside_writer(storage, &wal_dir, || {
            crate::log::reader::LogReader::new(storage, &wal_dir).head()
        })
    }

    /// The chain value stored with record `seq` (`None`: the log does not hold it, or it is not
    /// chained), to compare with another copy of the log. Reads only the segment holding it.
    pub fn chain_at(&self, seq: u64) -> Result<Option<crate::ChainValue>> {
        let wal_dir = self.shared.dir.join(crate::log::layout::WAL_DIR);
        let storage = &*self.shared.storage;
        crate::log::reader::retry_beside_writer(storage, &wal_dir, || {
            crate::log::reader::LogReader::new(storage, &wal_dir).chain_at(seq)
        })
    }

    /// What this handle counted since open (grants, rejections, fsyncs, snapshots...), for
    /// an exporter such as the server's `/metrics`.
    pub fn metrics(&self) -> &LedgerMetrics {
        &self.shared.commit.metrics
    }

    /// Runs `f` on the current state (a consistent point: nothing is half-applied).
    pub fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&lock(&self.shared.core).state)
    }

    // ----- writes (decided in domain/decide.rs, run by apply.rs, made durable by commit.rs) -----

    /// `request_resources`: grants the request or records why it cannot be granted. Returns
    /// once the event is durable (fdatasync); invalid input is an error and writes nothing.
    ///
    /// ```
    /// use allocation_ledger::storage::MemoryStorage;
    /// use allocation_ledger::{Ledger, OpenOptions, RequestOutcome, ResourceRequest};
    /// use std::sync::Arc;
    /// let opts = OpenOptions::default().storage(Arc::new(MemoryStorage::new()));
    /// let ledger = Ledger::open_with("/ledger", opts)?;
    /// match ledger.request_resources(&ResourceRequest::new("build-42").workers(4).mcp_server("github"))? {
    ///     RequestOutcome::Granted(g) => assert_eq!(g.workers_allocated.len(), 4),
    ///     RequestOutcome::Failed(f) => panic!("not granted: {}", f.error),
    /// }
    /// // Eight more do not fit in a pool of ten: a rejection, recorded in the log too.
    /// let outcome = ledger.request_resources(&ResourceRequest::new("too-big").workers(8))?;
    /// assert!(!outcome.is_granted());
    /// // More than the pool could ever hold is invalid input: an error, and nothing written.
    /// assert!(ledger.request_resources(&ResourceRequest::new("never").workers(11)).is_err());
    /// # Ok::<(), allocation_ledger::Error>(())
    /// ```
    pub fn request_resources(&self, req: &ResourceRequest) -> Result<RequestOutcome> {
        self.request_checked(req, None)
    }

    /// [`Ledger::request_resources`] for async callers: resolves once the outcome is durable;
    /// a request with `wait` that waits in the queue resolves when it is granted, timed out or
    /// cancelled ([`Ledger::wait_for_grant`]). A retry (same idempotency key) whose allocation
    /// has left memory resolves to `NotFound`: reading the log is blocking, and
    /// [`Ledger::request_resources`] answers it.
    pub fn request_resources_async(&self, req: &ResourceRequest) -> RequestFuture {
        self.request_checked_async(req, None)
    }

    /// `release_resources`. An unknown id is `NotFound`; an allocation already in a terminal
    /// state is reported as such and nothing is written, so a release is safe to retry.
    pub fn release_resources(&self, allocation_id: &str) -> Result<ReleaseReport> {
        self.release_checked(allocation_id, None)
    }

    /// [`Ledger::release_resources`] for async callers, except for an allocation that ended so
    /// long ago that it is no longer in memory: that comes back as `NotFound`, and
    /// [`Ledger::release_not_in_memory`] (which reads the log: blocking) gives the answer the
    /// blocking call gives.
    pub fn release_resources_async(&self, allocation_id: &str) -> Durable<ReleaseReport> {
        self.release_checked_async(allocation_id, None)
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

    /// `renew_allocation`: moves an active allocation's deadline to now + `ttl_seconds` (its
    /// own lifetime if `None`), within the config's TTL bounds and its `max_lifetime_seconds`;
    /// recorded as a `renewed` event. An allocation that has ended is [`Error::NotActive`]
    /// (naming its state) and nothing is written; an allocation whose deadline is now has
    /// expired (the expiry is written first).
    ///
    /// ```
    /// use allocation_ledger::storage::MemoryStorage;
    /// use allocation_ledger::{Ledger, OpenOptions, ResourceRequest};
    /// use std::sync::Arc;
    /// let ledger = Ledger::open_with("/l", OpenOptions::default().storage(Arc::new(MemoryStorage::new())))?;
    /// let id = ledger.request_resources(&ResourceRequest::new("train").workers(1).ttl_seconds(600))?.allocation_id();
    /// let renewed = ledger.renew_allocation(&id.to_string(), Some(1200))?;
    /// assert!(renewed.expires_at > renewed.previous_expires_at);
    /// ledger.release_resources(&id.to_string())?;
    /// assert!(ledger.renew_allocation(&id.to_string(), None).is_err()); // released: not active
    /// # Ok::<(), allocation_ledger::Error>(())
    /// ```
    pub fn renew_allocation(&self, allocation_id: &str, ttl_seconds: Option<u64>) -> Result<RenewReport> {
        self.renew_checked(allocation_id, ttl_seconds, None)
    }

    /// `plan_request`: what [`Ledger::request_resources`] would answer now (grant with its
    /// slots and endpoints, or the rejection's reason and message), and the ledger's
    /// `current_seq`; nothing is written. Pass `current_seq` to [`Ledger::if_seq`] to act only
    /// if nothing changed in between.
    pub fn plan_request(&self, req: &ResourceRequest) -> Result<PlanReport> {
        self.plan(req)
    }

    /// Writes that apply only while the ledger's last sequence number is `expected_seq` (the
    /// `current_seq` a plan or a read returned); see [`IfSeq`].
    pub fn if_seq(&self, expected_seq: u64) -> IfSeq<'_> {
        IfSeq { ledger: self, expected_seq }
    }

    /// `cleanup_expired`: writes the pending expiries and returns their ids.
    pub fn cleanup_expired(&self) -> Result<CleanupReport> {
        self.cleanup_checked(None)
    }

    /// Records a new config (validated against what is held now).
    pub fn reconfigure(&self, config: Config) -> Result<u64> {
        self.reconfigure_checked(config, None)
    }

    // ----- reads (queries.rs) -----

    /// Each tenant's use now against its quota (`capacity --by-tenant`).
    pub fn tenant_capacity(&self) -> Result<Vec<crate::report::TenantCapacity>> {
        self.read(State::tenant_capacity)
    }

    /// `get_capacity`: the pools' totals, what is in use and what is free, now.
    pub fn get_capacity(&self) -> Result<CapacityReport> {
        self.read(super::domain::state::State::capacity)
    }

    /// `get_allocation`: `Ok(None)` for a well-formed id the ledger does not know.
    pub fn get_allocation(&self, allocation_id: &str) -> Result<Option<AllocationDetails>> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        if let Some(pending) = self.pending_details(id)? {
            return Ok(Some(pending));
        }
        let (details, evicted, now) = self.read(|s, now| (s.details(id, now), s.evicted_count(), now))?;
        if details.is_some() || evicted == 0 {
            return Ok(details);
        }
        Ok(self.find_in_log(id)?.map(|a| a.details(now)))
    }

    /// `list_allocations`: allocations (optionally in one state, of one job), oldest first,
    /// including ended ones no longer in memory (read from the log).
    pub fn list_allocations(
        &self,
        state: Option<AllocationState>,
        job_id: Option<&str>,
    ) -> Result<Vec<AllocationSummary>> {
        if state == Some(AllocationState::Pending) {
            let rows = self.pending_rows()?;
            return Ok(rows.into_iter().filter(|r| job_id.is_none_or(|j| r.job_id == j)).collect());
        }
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
        let core = lock(&self.shared.core);
        let queue = core.state.queue().next_wakeup(self.now_micros(), &core.state.config.queue);
        [core.state.next_deadline(), queue, core.state.next_preempt_deadline()].into_iter().flatten().min()
    }

    /// Events with `seq >= from_seq`, at most `limit` of them, read from the log files, up to
    /// the state's last event once it is durable (a stopped ledger's files as they are).
    pub fn events(&self, from_seq: u64, limit: usize) -> Result<Vec<LoggedEvent>> {
        self.read_events(from_seq, limit)
    }

    /// Rebuilds an allocation that is no longer in memory from its events in the log. Only
    /// records that mention the id are decoded.
    pub fn find_in_log(&self, id: AllocationId) -> Result<Option<Allocation>> {
        self.find_in_log_files(id)
    }

    /// Read-only handles: folds in what the writer appended since open or the last refresh;
    /// returns how many events that was.
    pub fn refresh(&self) -> Result<u64> {
        self.refresh_from_log()
    }

    // ----- snapshots (snapshots.rs) -----

    /// Writes a snapshot of the current state (atomically) and prunes old ones.
    pub fn snapshot(&self) -> Result<SnapshotInfo> {
        self.write_snapshot()
    }

    /// Writes the periodic snapshot if `snapshot_every` events have been appended since the
    /// last one (blocking file I/O). The blocking calls do this themselves; async callers call
    /// it where blocking is allowed, e.g. after a write when [`Ledger::snapshot_due`] says so.
    pub fn snapshot_if_due(&self) {
        self.maybe_snapshot();
    }

    /// Whether a periodic snapshot is due (cheap; no lock).
    pub fn snapshot_due(&self) -> bool {
        self.snapshot_flagged()
    }

    // ----- for the history room -----

    /// The storage the log files are read through (the capacity index catches up from them).
    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.shared.storage
    }

    /// Held while the capacity index is built from the log, so that only one caller builds it.
    pub(crate) fn index_build_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.shared.index_build_lock)
    }
}
