//! The ledger's side of replicated mode (`src/replica/`): a standby folds the records the
//! leader committed to the shared log into its own state and local files, and a copy that
//! lost leadership reloads its state from its files (`open.rs`, `Ledger::reload_from_files`).

use super::commit::Flusher;
use super::{lock, Ledger, Shared};
use crate::domain::event::Event;
use crate::log::wal::AppendError;
use crate::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Weak;

/// A handle that does not keep the ledger open: the replica's background threads hold one,
/// so that dropping the last [`Ledger`] still closes it.
#[derive(Debug, Clone)]
pub struct WeakLedger {
    shared: Weak<Shared>,
    flusher: Weak<Flusher>,
}

impl WeakLedger {
    /// The ledger, if a handle to it is still open.
    pub fn upgrade(&self) -> Option<Ledger> {
        Some(Ledger { shared: self.shared.upgrade()?, flusher: self.flusher.upgrade()? })
    }
}

impl Ledger {
    /// A handle that does not keep the ledger open.
    pub fn downgrade(&self) -> WeakLedger {
        WeakLedger {
            shared: std::sync::Arc::downgrade(&self.shared),
            flusher: std::sync::Arc::downgrade(&self.flusher),
        }
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// The last sequence number folded into the state.
    pub(crate) fn last_seq(&self) -> u64 {
        lock(&self.shared.core).state.last_seq
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code, reason = "replicated mode (src/replica, feature etcd) uses it"))]
    /// Folds records the shared log committed (`(seq, payload)`, in order) into the state and
    /// appends them to the local files, then waits until they are durable here. Records at or
    /// below the local end are skipped (the leader's own, seen again); a gap is an error.
    /// Returns the last sequence number folded.
    pub(crate) fn apply_replicated(&self, records: &[(u64, Vec<u8>)]) -> Result<u64> {
        let last = {
            let mut core = self.writable_core()?;
            for (seq, payload) in records {
                let next = core.state.last_seq + 1;
                if *seq < next {
                    continue;
                }
                if *seq > next {
                    return Err(Error::Unavailable(format!(
                        "the shared log skips from {} to {seq}: this copy cannot follow it",
                        next - 1
                    )));
                }
                let ev = Event::decode(payload)
                    .map_err(|e| Error::Unavailable(format!("record {seq} of the shared log does not decode: {e}")))?;
                let Some(wal) = core.wal.as_mut() else { return Err(Error::ReadOnly) };
                let got = wal.append(payload).map_err(|e| match e {
                    AppendError::Failed(e) | AppendError::Poison(e) => e,
                })?;
                debug_assert_eq!(got, *seq, "the local writer follows the shared log");
                if core.capacity_index.as_mut().map(|ix| ix.observe(got, ev.ts_us, &ev.body)) == Some(false) {
                    core.capacity_index = None;
                }
                let frame_bytes = crate::log::record::HEADER_LEN + payload.len();
                self.shared.commit.metrics.on_event(&ev.body, frame_bytes);
                core.state.evolve_owned(got, ev.ts_us, ev.body);
                core.since_snapshot += 1;
                core.log_bytes_since_snapshot += frame_bytes as u64;
                if core.snapshot_is_due() {
                    self.shared.snapshots.due.store(true, Ordering::Relaxed);
                }
            }
            self.shared.commit.write_appended(&mut core);
            core.state.last_seq
        };
        self.wait_durable(last)?;
        self.maybe_snapshot();
        Ok(last)
    }
}
