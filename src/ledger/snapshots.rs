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
        let started = std::time::Instant::now();
        // Under the lock only the references are copied; sorting and encoding happen outside
        // it while writers go on (an allocation they end is copied then, not shared).
        let (data, mut shared, keys, position) = {
            let mut core = self.writable_core()?;
            core.since_snapshot = 0;
            core.log_bytes_since_snapshot = 0;
            self.shared.snapshots.due.store(false, Ordering::Relaxed);
            let (data, shared, keys) = core.state.snapshot_parts_shared();
            let position = core
                .wal
                .as_ref()
                .and_then(super::super::log::wal::WalWriter::last_record)
                .filter(|p| p.seq == data.last_seq);
            (data, shared, keys, position)
        };
        crate::domain::state::sort_for_snapshot(&mut shared);
        let bytes = snapshot::encode_parts_cached(&data, &shared, &keys, position, &mut cache);
        drop((shared, keys));
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
        self.shared.commit.metrics.on_snapshot(started.elapsed(), bytes.len());
        Ok(SnapshotInfo { seq: data.last_seq, path })
    }
}

/// The snapshot encoding of states the ledger builds (here, not in `log/`, because they need a
/// ledger to build them and `log/` never imports the ledger).
#[cfg(test)]
mod tests {
    /// Snapshots encoded with the cache are byte for byte the ones encoded without it, while
    /// allocations are granted, released, expire and leave memory between snapshots; the cache
    /// keeps only the last snapshot's allocations.
    #[test]
    fn cached_encoding_matches_a_fresh_one() {
        use crate::domain::clock::ManualClock;
        use crate::domain::config::Config;
        use crate::domain::input::ResourceRequest;
        use crate::ledger::{Ledger, OpenOptions};
        use crate::log::snapshot::*;
        use crate::log::storage::FaultyStorage;
        use std::sync::Arc;

        let clock = ManualClock::at_default_epoch();
        let config = Config { snapshot_every: 0, worker_slots: 64, terminal_retained: 5, ..Config::default() };
        let opts = OpenOptions::default()
            .storage(Arc::new(FaultyStorage::new()))
            .clock(Arc::new(clock.clone()))
            .config(config);
        let ledger = Ledger::open_with("/l", opts).unwrap();
        let mut cache = EncodingCache::default();
        let mut held = Vec::new();
        let mut reused_some = false;
        for round in 0..12u32 {
            for i in 0..7u32 {
                let req = ResourceRequest::new(format!("job-{round}-{i}"))
                    .workers(i % 3)
                    .mcp_server("github")
                    .ttl_seconds(60 + 30 * u64::from(i));
                // Keys of both encodings: canonical UUIDs and others.
                let req = match i % 3 {
                    0 => req,
                    1 => req.idempotency_key(uuid::Uuid::new_v4().to_string()),
                    _ => req.idempotency_key(format!("key-{round}-{i}")),
                };
                held.push(ledger.request_resources(&req).unwrap().allocation_id());
            }
            for _ in 0..3 {
                let id = held.remove((round as usize * 5) % held.len());
                let _ = ledger.release_resources(&id.to_string());
            }
            clock.advance_seconds(45);
            ledger.cleanup_expired().unwrap();
            let before = cache.len();
            let (mut data, mut shared, keys) = ledger.with_state(crate::domain::state::State::snapshot_parts_shared);
            crate::domain::state::sort_for_snapshot(&mut shared);
            let cached = encode_parts_cached(&data, &shared, &keys, None, &mut cache);
            data.idempotency_keys = keys.records();
            assert!(!data.idempotency_keys.is_empty());
            assert_eq!(cached, encode_parts(&data, &shared, None), "round {round}");
            assert_eq!(cache.len(), shared.len(), "round {round}");
            reused_some |= before > 0;
        }
        assert!(reused_some);
    }

    /// The chunked loader gives what the whole-file decoder gives, whatever the chunk size
    /// (values and strings straddle chunk boundaries), and refuses damage the same way.
    #[test]
    fn chunked_load_matches_whole_file_decode() {
        use crate::domain::clock::ManualClock;
        use crate::domain::config::Config;
        use crate::domain::input::ResourceRequest;
        use crate::ledger::{Ledger, OpenOptions};
        use crate::log::snapshot::*;
        use crate::log::storage::FaultyStorage;
        use std::sync::Arc;

        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let config = Config { snapshot_every: 0, worker_slots: 64, terminal_retained: 20, ..Config::default() };
        let opts =
            OpenOptions::default().storage(Arc::new(storage.clone())).clock(Arc::new(clock.clone())).config(config);
        let ledger = Ledger::open_with("/l", opts).unwrap();
        let mut ids = Vec::new();
        for i in 0..60u32 {
            let mut meta = serde_json::Map::new();
            meta.insert("k".into(), format!("value {i} \u{e9}").into());
            let req = ResourceRequest::new(format!("job-{i}")).workers(i % 3).mcp_server("github").metadata(meta);
            ids.push(ledger.request_resources(&req).unwrap().allocation_id());
            clock.advance_seconds(1);
            if i % 2 == 1 {
                ledger.release_resources(&ids[i as usize - 1].to_string()).unwrap();
            }
        }
        let info = ledger.snapshot().unwrap();
        let expected = ledger.with_state(std::clone::Clone::clone);
        let bytes = storage.files()[&info.path].clone();
        assert_eq!(decode_with_position(&bytes, info.seq).unwrap().0, expected);
        for chunk in [1, 3, 7, 64, 1000, 1 << 20] {
            let (state, position) = load_chunked(&storage, &info.path, info.seq, chunk).unwrap();
            assert_eq!(state, expected, "chunk {chunk}");
            assert_eq!(position.map(|p| p.seq), Some(info.seq));
        }
        assert!(load(&storage, &info.path, info.seq + 1).is_err(), "a name that disagrees");
        for at in (0..bytes.len()).step_by(3) {
            let mut d = bytes.clone();
            d[at] ^= 0x24;
            storage.put_file(&info.path, d);
            let err = load_chunked(&storage, &info.path, info.seq, 97).unwrap_err();
            if at >= HEADER_LEN {
                assert_eq!(err, "snapshot checksum mismatch", "byte {at}");
            }
        }
        storage.put_file(&info.path, bytes[..bytes.len() - 5].to_vec());
        assert!(load(&storage, &info.path, info.seq).is_err());
    }
}
