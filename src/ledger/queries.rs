//! Reads: of the state (waiting until what they saw is durable), and of the log files (the
//! event list, allocations no longer in memory, a read-only handle's refresh).

use super::open::retry_damage_beside_writer;
use super::replay::replay_into;
use super::{lock, Ledger};
use crate::domain::clock::Micros;
use crate::domain::event::{Event, EventBody, LoggedEvent};
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::state::{Allocation, State};
use crate::ledger::index::CapacityIndex;
use crate::log::layout::WAL_DIR;
use crate::log::wal;
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};

/// The envelope of an encoded event (`{"v":..,"ts_us":..,"type":".."`) fits in this many
/// first bytes of its payload.
const ENVELOPE_MAX_BYTES: usize = 64;

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
        wal::scan_log_upto(
            &*self.shared.storage,
            &self.shared.dir.join(WAL_DIR),
            from_seq.saturating_sub(1),
            upto,
            &mut |pos, payload| {
                out.push(LoggedEvent { seq: pos.seq, event: Event::decode(payload)? });
                Ok(out.len() < limit)
            },
        )?;
        Ok(out)
    }

    /// Read-only handles: folds in what the writer appended since open or the last refresh;
    /// returns how many events that was.
    pub(super) fn refresh_from_log(&self) -> Result<u64> {
        let mut core = lock(&self.shared.core);
        let before = core.state.last_seq;
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let state = retry_damage_beside_writer(&*self.shared.storage, &wal_dir, || {
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
        let needle = format!("\"allocation_id\":\"{id}\"");
        let finder = memchr::memmem::Finder::new(needle.as_bytes());
        let ((), upto) = self.with_durable_state(|_| ())?;
        let mut found: Option<Allocation> = None;
        wal::scan_log_upto(&*self.shared.storage, &self.shared.dir.join(WAL_DIR), 0, upto, &mut |pos, payload| {
            if finder.find(payload).is_none() {
                return Ok(true);
            }
            let ev = Event::decode(payload)?;
            match ev.body {
                EventBody::Granted(g) if g.allocation_id == id => found = Some(Allocation::from_grant(ev.ts_us, &g)),
                EventBody::Rejected(r) if r.allocation_id == id => {
                    found = Some(Allocation::from_rejection(pos.seq, ev.ts_us, &r));
                    return Ok(false);
                }
                EventBody::Released { allocation_id } if allocation_id == id => {
                    if let Some(a) = found.as_mut().filter(|a| a.state == AllocationState::Active) {
                        a.end(pos.seq, ev.ts_us, AllocationState::Released);
                    }
                    return Ok(false);
                }
                EventBody::Expired { allocation_id, deadline_us } if allocation_id == id => {
                    if let Some(a) = found.as_mut().filter(|a| a.state == AllocationState::Active) {
                        a.end(pos.seq, deadline_us, AllocationState::Expired);
                    }
                    return Ok(false);
                }
                _ => {}
            }
            Ok(true)
        })?;
        Ok(found)
    }

    /// Every allocation that is no longer in memory, from the log, filtered by job.
    pub(super) fn evicted_from_log(&self, job_id: Option<&str>) -> Result<Vec<Allocation>> {
        let (in_memory, upto): (HashSet<AllocationId>, u64) =
            self.with_durable_state(|s| s.allocations().map(|a| a.id).collect())?;
        let job_needle = job_id.map(|j| format!("\"job_id\":{}", serde_json::Value::from(j)));
        let job_finder = job_needle.as_ref().map(|n| memchr::memmem::Finder::new(n.as_bytes()).into_owned());
        let mut found: HashMap<AllocationId, Allocation> = HashMap::new();
        wal::scan_log_upto(&*self.shared.storage, &self.shared.dir.join(WAL_DIR), 0, upto, &mut |pos, payload| {
            let head = &payload[..payload.len().min(ENVELOPE_MAX_BYTES)];
            let starts = memchr::memmem::find(head, b"\"type\":\"granted\"").is_some()
                || memchr::memmem::find(head, b"\"type\":\"rejected\"").is_some();
            if starts && job_finder.as_ref().is_some_and(|f| f.find(payload).is_none()) {
                return Ok(true);
            }
            crate::domain::state::fold_rebuilt(
                &mut found,
                |id| in_memory.contains(id),
                job_id,
                pos.seq,
                Event::decode(payload)?,
            );
            Ok(true)
        })?;
        Ok(found.into_values().collect())
    }
}
