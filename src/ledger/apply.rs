//! What one write does under the core lock: expire what is due, decide, append the events
//! (and fold them into the state). The commit pipeline (`commit.rs`) runs these commands and
//! makes them durable.

use super::{lock, Core, Durable, Ledger};
use crate::domain::clock::Micros;
use crate::domain::event::{Event, EventBody};
use crate::domain::model::AllocationId;
use crate::domain::state::State;
use crate::log::wal::AppendError;
use crate::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

impl Ledger {
    /// Runs `decide` as a command (see `commit.rs`) and returns its result once its events are
    /// durable; then writes the periodic snapshot if one is due. A first step, `check`, runs on
    /// the state before anything is written (before the expiries that are due): it may answer
    /// the command itself (an idempotent retry, an already-ended release) or refuse it (an
    /// `expected_seq` conflict).
    pub(super) fn write_checked<R: Send + 'static>(
        &self,
        check: impl FnOnce(&State, Micros) -> Result<Option<R>> + Send + 'static,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)> + Send + 'static,
    ) -> Result<R> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        let result = self.submit_and_wait(move |ledger, core| ledger.run_command(core, check, decide));
        if result.is_ok() {
            self.maybe_snapshot();
        }
        result
    }

    /// The same command as `write_checked`, as a future for async callers: the task that polls it may
    /// run queued commands (a short hold of the core lock), but never waits for an fsync or a
    /// lock held across one. The fsyncs are left to the flusher thread, which wakes the task
    /// when its events are durable. Periodic snapshots are not written by the future (that is
    /// blocking file I/O); see [`Ledger::snapshot_if_due`].
    pub(super) fn write_async_checked<R: Send + 'static>(
        &self,
        check: impl FnOnce(&State, Micros) -> Result<Option<R>> + Send + 'static,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)> + Send + 'static,
    ) -> Durable<R> {
        if self.shared.read_only {
            return Durable::ready(self, Err(Error::ReadOnly));
        }
        self.submit(move |ledger, core| ledger.run_command(core, check, decide))
    }

    /// One queued command, under the core lock. Returns its result and whether it appended.
    fn run_command<R>(
        &self,
        core: &mut Core,
        check: impl FnOnce(&State, Micros) -> Result<Option<R>>,
        decide: impl FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)>,
    ) -> (Result<R>, bool) {
        let before = core.state.last_seq;
        let result = (|| {
            if let Some(why) = &core.poisoned {
                return Err(Error::Poisoned(why.clone()));
            }
            if let Some(answer) = check(&core.state, self.next_ts(&core.state))? {
                return Ok(answer);
            }
            let expired = self.expire_due(core)?;
            self.settle_queue(core)?;
            let ts = self.next_ts(&core.state);
            let (bodies, r) = decide(&core.state, ts, &expired)?;
            let mut ts = ts;
            for body in bodies {
                self.append(core, ts, body)?;
                ts = self.next_ts(&core.state);
            }
            self.settle_queue(core)?;
            Ok(r)
        })();
        (result, core.state.last_seq != before)
    }

    /// The core lock of a ledger that accepts writes.
    pub(super) fn writable_core(&self) -> Result<MutexGuard<'_, Core>> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        let core = lock(&self.shared.core);
        if let Some(why) = &core.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        self.shared.commit.check_failed()?;
        Ok(core)
    }

    /// The timestamp the next event gets: the clock, but strictly after the last event.
    pub(super) fn next_ts(&self, state: &State) -> Micros {
        crate::domain::decide::next_event_ts(state, self.shared.clock.now_micros())
    }

    /// Appends one event and folds it into the state (and the capacity index, if built).
    pub(super) fn append(&self, core: &mut Core, ts: Micros, body: EventBody) -> Result<u64> {
        debug_assert!(ts > core.state.last_ts_us);
        let ev = Event::new(ts, body);
        let payload = ev.encode();
        if payload.len() > crate::log::record::MAX_PAYLOAD_LEN {
            return Err(Error::invalid("request", "the event would exceed the record size limit"));
        }
        // Evolve sees exactly what replay will see (checked in debug builds; the property tests
        // also compare live state with a replay).
        debug_assert_eq!(Event::decode(&payload).as_ref(), Ok(&ev));
        // Only a read-only ledger has no writer, and it never runs commands.
        let Some(wal) = core.wal.as_mut() else { return Err(Error::ReadOnly) };
        match wal.append(&payload) {
            Ok(seq) => {
                let indexed = core.capacity_index.as_mut().map(|ix| ix.observe(seq, ts, &ev.body));
                if indexed == Some(false) {
                    core.capacity_index = None;
                }
                self.shared.commit.metrics.on_event(&ev.body, crate::log::record::HEADER_LEN + payload.len());
                let note = super::queue::QueueNote::of(&ev.body);
                core.state.evolve_owned(seq, ts, ev.body);
                self.after_queue_event(core, seq, note);
                core.since_snapshot += 1;
                core.log_bytes_since_snapshot += (crate::log::record::CHAINED_OVERHEAD + payload.len()) as u64;
                if core.snapshot_is_due() {
                    self.shared.snapshots.due.store(true, Ordering::Relaxed);
                }
                Ok(seq)
            }
            Err(AppendError::Failed(e)) => Err(e),
            Err(AppendError::Poison(e)) => {
                let why = e.to_string();
                core.poisoned = Some(why.clone());
                // Events appended before this one may not be durable, and the failure may have
                // been an fsync (at rotation): latch it where waiters look, so that nothing
                // retries the fsync and acknowledges them. A replicated copy whose rotation the
                // shared log refused is `Unavailable`, as after a refused flush (it reloads).
                self.shared.commit.latch_error(&e);
                Err(match e {
                    Error::Unavailable(_) => e,
                    _ => Error::Poisoned(why),
                })
            }
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
}
