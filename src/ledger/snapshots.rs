//! Snapshot scheduling and writing: when a periodic snapshot is due, and how one is written
//! (encoded outside the core lock, never ahead of the durable log, old ones pruned).

use super::{lock, Core, Ledger, SnapshotInfo};
use crate::log::layout::{SNAPSHOTS_KEPT, SNAPSHOT_DIR};
use crate::log::snapshot;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Snapshots larger than this are spaced by the log they save replaying (see
/// `Core::snapshot_is_due`); below it a snapshot costs about a millisecond.
pub(super) const SNAPSHOT_SPACED_ABOVE_BYTES: u64 = 1 << 20;

/// The snapshot side of the shared handle.
#[derive(Debug, Default)]
pub(super) struct Snapshots {
    /// `Core::since_snapshot` reached `snapshot_every`: read after every write without the core
    /// lock, which a combiner may be holding for a whole batch.
    pub(super) due: AtomicBool,
    /// One snapshot at a time; holds what the next one can reuse of the last one's encoding.
    lock: Mutex<snapshot::EncodingCache>,
}

impl Core {
    /// A periodic snapshot is due every `snapshot_every` events; for a state whose snapshot is
    /// larger than 1 MiB, also only once the log has grown by that snapshot's size since it. So
    /// snapshots never write more than the log does (a 60000-allocation state is 12 MB, which
    /// 10000 grants' records are not), and an open replays at most one snapshot's worth of log
    /// beyond `snapshot_every` events. Redis rewrites its append-only file on the same rule.
    pub(super) fn snapshot_is_due(&self) -> bool {
        let every = self.state.config.snapshot_every;
        every > 0
            && self.since_snapshot >= every
            && (self.last_snapshot_bytes <= SNAPSHOT_SPACED_ABOVE_BYTES
                || self.log_bytes_since_snapshot >= self.last_snapshot_bytes)
    }
}

impl Ledger {
    /// Whether a periodic snapshot is due (cheap; no lock).
    pub(super) fn snapshot_flagged(&self) -> bool {
        self.shared.snapshots.due.load(Ordering::Relaxed)
    }

    /// Writes the periodic snapshot if it is due and nobody else is writing one; a failure is
    /// kept for `status` (snapshots are derived data; the write that triggered it succeeded).
    pub(super) fn maybe_snapshot(&self) {
        if !self.snapshot_flagged() {
            return;
        }
        // One snapshot at a time, and only if it is still due once we hold the right to write
        // it: otherwise every writer that saw the counter cross the line writes its own.
        let guard = match self.shared.snapshots.lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if !lock(&self.shared.core).snapshot_is_due() {
            return;
        }
        if let Err(e) = self.snapshot_holding(guard) {
            lock(&self.shared.core).last_snapshot_error = Some(e.to_string());
        }
    }

    /// Writes a snapshot now, waiting for one in progress to finish first.
    pub(super) fn write_snapshot(&self) -> Result<SnapshotInfo> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        self.snapshot_holding(lock(&self.shared.snapshots.lock))
    }

    /// Writes a snapshot of the current state (atomically) and prunes old ones, holding the
    /// right to (`cache`).
    fn snapshot_holding(&self, mut cache: MutexGuard<'_, snapshot::EncodingCache>) -> Result<SnapshotInfo> {
        // Under the lock only the references are copied; sorting and encoding happen outside
        // it while writers go on (an allocation they end is copied then, not shared).
        let (data, mut shared, position) = {
            let mut core = self.writable_core()?;
            core.since_snapshot = 0;
            core.log_bytes_since_snapshot = 0;
            self.shared.snapshots.due.store(false, Ordering::Relaxed);
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
}
