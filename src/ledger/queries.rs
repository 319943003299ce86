//! Reads: of the state (waiting until what they saw is durable), and of the log files (the
//! event list, allocations no longer in memory, a read-only handle's refresh).

use super::replay::replay_into;
use super::{lock, Ledger};
use crate::domain::clock::Micros;
use crate::domain::event::LoggedEvent;
use crate::domain::model::AllocationId;
use crate::domain::state::{Allocation, State};
use crate::ledger::index::CapacityIndex;
use crate::log::layout::WAL_DIR;
use crate::log::reader::{rebuild_allocations, retry_beside_writer, AllocationFilter, LogReader, LogRules, Wording};
use crate::{Error, Result};
use std::collections::HashSet;

impl Ledger {
    /// Runs `f` on the state and the current instant, then waits until what it saw is durable:
    /// nobody ever sees an event that is not.
    pub(super) fn read<R>(&self, f: impl FnOnce(&State, Micros) -> R) -> Result<R> {
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
    pub(crate) fn read_history<R>(&self, f: impl FnOnce(&State, &mut Option<CapacityIndex>, Micros) -> R) -> Result<R> {
        let (r, seq) = {
            let mut core = lock(&self.shared.core);
            // `f` may read the log files up to the state's last event (the capacity index
            // catches up that way): those records must be in the files, not only queued.
            self.shared.commit.write_queued()?;
            let core = &mut *core;
            let now = self.shared.clock.now_micros().max(core.state.last_ts_us);
            (f(&core.state, &mut core.capacity_index, now), core.state.last_seq)
        };
        if !self.shared.read_only {
            self.wait_durable(seq)?;
        }
        Ok(r)
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

    /// Events with `seq >= from_seq`, at most `limit` of them, read from the log files, up to
    /// the state's last event once it is durable (a stopped ledger's files as they are).
    pub(super) fn read_events(&self, from_seq: u64, limit: usize) -> Result<Vec<LoggedEvent>> {
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

    /// Read-only handles: folds in what the writer appended since open or the last refresh;
    /// returns how many events that was.
    pub(super) fn refresh_from_log(&self) -> Result<u64> {
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

    /// Rebuilds an allocation that is no longer in memory from its events in the log. Only
    /// records that mention the id are decoded.
    pub(super) fn find_in_log_files(&self, id: AllocationId) -> Result<Option<Allocation>> {
        let ((), upto) = self.with_durable_state(|_| ())?;
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let reader = LogReader::new(&*self.shared.storage, &wal_dir).upto(upto);
        Ok(rebuild_allocations(&reader, &AllocationFilter::one(id))?.remove(&id))
    }

    /// Every allocation that is no longer in memory, from the log, filtered by job.
    pub(super) fn evicted_from_log(&self, job_id: Option<&str>) -> Result<Vec<Allocation>> {
        let (in_memory, upto): (HashSet<AllocationId>, u64) =
            self.with_durable_state(|s| s.allocations().map(|a| a.id).collect())?;
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let reader = LogReader::new(&*self.shared.storage, &wal_dir).upto(upto);
        let found = rebuild_allocations(&reader, &AllocationFilter::all_but(job_id, &|id| in_memory.contains(id)))?;
        Ok(found.into_values().collect())
    }
}
