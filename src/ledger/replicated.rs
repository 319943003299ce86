//! The ledger's side of replicated mode (`src/replica/`): a standby folds the records the
//! leader committed to the shared log into its own state and local files, and a copy that
//! lost leadership reloads its state from its files (`open.rs`, `Ledger::reload_from_files`).

use super::commit::Flusher;
use super::{lock, Core, Ledger, Shared};
use crate::domain::event::Event;
use crate::log::backend::SharedRecord;
use crate::log::chain::ChainValue;
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
    /// Folds records the shared log committed (in order) into the state and appends them to
    /// the local files, then waits until they are durable here. Records at or below the local
    /// end are skipped (the leader's own, seen again); a gap is an error. With `check_chain`,
    /// each record's chain value here is compared with the one the shared log carries for it
    /// *before* it is written: on a mismatch the copy diverged, and it stops (poisoned, the
    /// reason naming the record and both values), so it refuses writes and says why.
    /// Returns the last sequence number folded.
    pub(crate) fn apply_replicated(&self, records: &[SharedRecord], check_chain: bool) -> Result<u64> {
        let last = {
            let mut core = self.writable_core()?;
            let mut chain = if check_chain { self.local_chain(&core) } else { None };
            for r in records {
                let next = core.state.last_seq + 1;
                if r.seq < next {
                    continue;
                }
                if r.seq > next {
                    return Err(Error::Unavailable(format!(
                        "the shared log skips from {} to {}: this copy cannot follow it",
                        next - 1,
                        r.seq
                    )));
                }
                chain = chain.map(|c| crate::log::chain::chain_next(&c, r.seq, &r.payload));
                if let (Some(here), Some(there)) = (chain, r.chain) {
                    if here != there {
                        let why = crate::log::chain::diverged_reason(r.seq, &here, &there);
                        core.poisoned = Some(why.clone());
                        return Err(Error::Poisoned(why));
                    }
                }
                self.fold_replicated(&mut core, r)?;
            }
            self.shared.commit.write_appended(&mut core);
            core.state.last_seq
        };
        self.wait_durable(last)?;
        self.maybe_snapshot();
        Ok(last)
    }

    /// The chain value of the last record this copy holds, if its log is chained there.
    fn local_chain(&self, core: &Core) -> Option<ChainValue> {
        let last = core.wal.as_ref()?.last_record()?;
        (last.seq == core.state.last_seq).then_some(last.chain).flatten()
    }

    /// Appends one record of the shared log here and folds it.
    fn fold_replicated(&self, core: &mut Core, r: &SharedRecord) -> Result<()> {
        let ev = Event::decode(&r.payload)
            .map_err(|e| Error::Unavailable(format!("record {} of the shared log does not decode: {e}", r.seq)))?;
        let Some(wal) = core.wal.as_mut() else { return Err(Error::ReadOnly) };
        let got = wal.append(&r.payload).map_err(|e| match e {
            AppendError::Failed(e) | AppendError::Poison(e) => e,
        })?;
        debug_assert_eq!(got, r.seq, "the local writer follows the shared log");
        if core.capacity_index.as_mut().map(|ix| ix.observe(got, ev.ts_us, &ev.body)) == Some(false) {
            core.capacity_index = None;
        }
        let frame_bytes = crate::log::record::HEADER_LEN + r.payload.len();
        self.shared.commit.metrics.on_event(&ev.body, frame_bytes);
        core.state.evolve_owned(got, ev.ts_us, ev.body);
        core.since_snapshot += 1;
        core.log_bytes_since_snapshot += frame_bytes as u64;
        if core.snapshot_is_due() {
            self.shared.snapshots.due.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::Micros;
    use crate::domain::event::EventBody;
    use crate::log::chain::chain_next;
    use crate::log::storage::MemoryStorage;
    use crate::{OpenOptions, ResourceRequest};
    use std::sync::Arc;

    /// A ledger holding one grant, and the record that releases it as the shared log would
    /// carry it (seq 3), with its payload.
    fn ledger_and_release() -> (Ledger, u64, Vec<u8>) {
        let opts = OpenOptions::default().storage(Arc::new(MemoryStorage::new()));
        let ledger = Ledger::open_with("/l", opts).unwrap();
        let granted = ledger.request_resources(&ResourceRequest::new("j").workers(1)).unwrap();
        let last_ts = lock(&ledger.shared.core).state.last_ts_us;
        let body = EventBody::Released { allocation_id: granted.allocation_id() };
        let payload = Event::new(Micros::from_micros(last_ts.as_micros() + 1), body).encode();
        (ledger, 3, payload)
    }

    fn chain_now(ledger: &Ledger) -> ChainValue {
        let core = lock(&ledger.shared.core);
        ledger.local_chain(&core).unwrap()
    }

    #[test]
    fn a_record_that_chains_on_is_folded() {
        let (ledger, seq, payload) = ledger_and_release();
        let chain = Some(chain_next(&chain_now(&ledger), seq, &payload));
        assert_eq!(ledger.apply_replicated(&[SharedRecord { seq, payload, chain }], true).unwrap(), seq);
        assert_eq!(ledger.chain_at(seq).unwrap(), chain, "the local chain value is the shared log's");
        assert!(ledger.status().poisoned.is_none());
    }

    #[test]
    fn a_record_whose_chain_value_is_not_ours_is_refused_before_it_is_written() {
        let (ledger, seq, payload) = ledger_and_release();
        let ours = chain_next(&chain_now(&ledger), seq, &payload);
        let theirs = chain_next(&ChainValue::default(), seq, &payload);
        let record = SharedRecord { seq, payload, chain: Some(theirs) };
        let err = ledger.apply_replicated(std::slice::from_ref(&record), true).unwrap_err().to_string();
        assert!(err.contains("diverged from the shared log at record 3"), "{err}");
        assert!(err.contains(&ours.to_string()) && err.contains(&theirs.to_string()), "both values named: {err}");
        assert_eq!(ledger.last_seq(), 2, "nothing was folded or written");
        let status = ledger.status();
        assert!(status.poisoned.as_deref().is_some_and(|p| p.contains("diverged")), "health says why: {status:?}");
        assert!(ledger.request_resources(&ResourceRequest::new("k").workers(1)).is_err(), "no writes");
        // Without the check (a log that predates the chain) the same record is folded.
        let (ledger, seq, payload) = ledger_and_release();
        assert_eq!(ledger.apply_replicated(&[SharedRecord { seq, payload, chain: Some(theirs) }], false).unwrap(), 3);
    }
}
