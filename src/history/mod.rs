//! Time travel, audit history and usage accounting: the questions only a ledger can answer.
//! The semantics are in `docs/queries.md`.
//!
//! - [`Ledger::capacity_at`] answers from the in-memory [`CapacityIndex`] (a step function over
//!   holding-time, searched by binary search; no replay).
//! - [`Ledger::allocations_at`] loads the nearest snapshot at or before the instant and folds
//!   the events after it up to the instant.
//! - [`Ledger::allocation_history`], [`Ledger::job_history`] and [`Ledger::for_each_event`]
//!   read the log files (memory-mapped where the storage maps them), never a copy in RAM.
//! - [`Ledger::usage`] and [`Ledger::timeline`] integrate holding intervals and the step
//!   function in integer units; floats appear only in the reports.

mod queue;
mod step;
mod svg;
mod usage;

use crate::ledger::index::CapacityIndex;
pub use step::{LogPoint, PoolView, StateAt, Step, StepFilter};
pub use usage::{GroupBy, McpServerUsage, Timeline, TimelineBucket, UsageAmounts, UsageGroup, UsageReport};

use crate::domain::clock::{format_micros, Micros};
use crate::domain::event::{Event, EventBody, LoggedEvent};
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::state::{Allocation, State};
use crate::ledger::Ledger;
use crate::log::layout::{SNAPSHOT_DIR, WAL_DIR};
use crate::log::reader::{
    newest_loadable, rebuild_allocations, AllocationFilter, LogReader, LogRules, Wording, ENVELOPE_BYTES,
};
use crate::report::{AllocationDetails, AllocationSummary, CapacityReport};
use crate::{Config, Error, Result};
use serde::Serialize;
use std::collections::BTreeSet;

/// Progress of a long scan: (done, total), in events.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Most buckets one timeline may have.
pub const MAX_TIMELINE_BUCKETS: u64 = 10_000;

/// One event of an allocation's or a job's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEvent {
    /// The event's sequence number.
    pub seq: u64,
    /// The event's timestamp in RFC 3339.
    pub at: String,
    /// The event itself.
    #[serde(flatten)]
    pub event: Event,
    /// The event in words, where the event alone does not say it (a wait in the queue: where
    /// it joined, how long it waited, what ended the wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// The events of one allocation, or of every allocation of one job, in log order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct History {
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The allocation asked about (none for a job's history).
    pub allocation_id: Option<AllocationId>,
    /// The job asked about, or the allocation's job.
    pub job_id: String,
    /// The allocations the events are about, oldest first.
    pub allocation_ids: Vec<AllocationId>,
    /// The events, in log order.
    pub events: Vec<HistoryEvent>,
}

/// Which events [`Ledger::for_each_event`] visits: the intersection of a time range
/// `[since, until)` and a sequence-number range `[from_seq, to_seq]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventRange {
    /// Events at or after this instant.
    pub since: Option<Micros>,
    /// Events before this instant.
    pub until: Option<Micros>,
    /// Events with this sequence number or a later one.
    pub from_seq: Option<u64>,
    /// Events with this sequence number or an earlier one.
    pub to_seq: Option<u64>,
}

fn before_start(field: &str, t: Micros, start: Micros) -> Error {
    Error::invalid(
        field,
        format!(
            "{} is before the ledger begins: its first event is at {}; ask about an instant at or after it",
            format_micros(t),
            format_micros(start)
        ),
    )
}

/// Folds the log's events after `ix.last_seq()` up to `upto` into `ix`.
fn scan_into(ledger: &Ledger, ix: &mut CapacityIndex, upto: u64, progress: Progress<'_>) -> Result<()> {
    if ix.last_seq() >= upto {
        return Ok(());
    }
    let mut broken = None;
    let wal_dir = ledger.dir().join(WAL_DIR);
    let reader = LogReader::new(&**ledger.storage(), &wal_dir).after(ix.last_seq()).upto(upto);
    let mut rules = LogRules::resuming(ix.last_seq());
    reader.events(&mut rules, Wording::Open, &mut |pos, ev| {
        if !ix.observe(pos.seq, ev.ts_us, &ev.body) {
            broken = Some(pos.seq);
            return Ok(false);
        }
        if pos.seq.is_multiple_of(4096) || pos.seq == upto {
            progress(pos.seq, upto);
        }
        Ok(pos.seq < upto)
    })?;
    if let Some(seq) = broken {
        return Err(Error::Inconsistent {
            path: ledger.dir().join(WAL_DIR),
            message: format!("event {seq} is out of order (its timestamp is not after the previous event's)"),
        });
    }
    Ok(())
}

enum Subject<'a> {
    Allocation(AllocationId),
    Job(&'a str),
}

/// How [`Ledger::with_state_at`] answers: from the live state, or by replaying to `seq` (and
/// then calling `f`).
enum AtPlan<R, F> {
    Done(R),
    Replay { t: Micros, seq: u64, ledger_id: String, f: F },
}

impl Ledger {
    /// Builds the capacity index if this handle has none yet: one pass over the log, reporting
    /// progress as (events done, events total). Every query that needs the index calls this;
    /// call it first to show progress on a large log.
    pub fn prepare_history(&self, progress: Progress<'_>) -> Result<()> {
        let target = self.read_history(|s, ix, _| ix.is_none().then_some(s.last_seq))?;
        if target.is_none() {
            return Ok(());
        }
        let _one_build = self.index_build_lock();
        let Some(target) = self.read_history(|s, ix, _| ix.is_none().then_some(s.last_seq))? else {
            return Ok(());
        };
        let mut ix = CapacityIndex::new();
        scan_into(self, &mut ix, target, progress)?;
        self.read_history(|s, slot, _| {
            if slot.is_none() {
                // Catch up with what was appended during the build (a short tail).
                scan_into(self, &mut ix, s.last_seq, &mut |_, _| {})?;
                *slot = Some(ix);
            }
            Ok(())
        })?
    }

    /// Runs `f` on the state and the capacity index (built and caught up) under the core lock.
    fn with_index<R>(&self, f: impl FnOnce(&State, &CapacityIndex, Micros) -> Result<R>) -> Result<R> {
        self.prepare_history(&mut |_, _| {})?;
        self.read_history(|s, slot, now| {
            let stale = slot.as_ref().is_none_or(|ix| ix.last_seq() > s.last_seq);
            if stale {
                let mut ix = CapacityIndex::new();
                scan_into(self, &mut ix, s.last_seq, &mut |_, _| {})?;
                *slot = Some(ix);
            }
            // Present: there was one, or it was just built.
            let ix = slot.get_or_insert_with(CapacityIndex::new);
            // A read-only handle's state moves on with `refresh`; fold in what it folded.
            scan_into(self, ix, s.last_seq, &mut |_, _| {})?;
            f(s, ix, now)
        })?
    }

    /// When the ledger begins: the timestamp of its first event.
    pub fn ledger_start(&self) -> Micros {
        self.with_state(|s| s.created_us)
    }

    /// The capacity report as of instant `at` (microseconds since the epoch): totals in force
    /// then, what active allocations and running MCP servers held, the allocations past their
    /// deadline by then counted as expired. An instant before the ledger's first event is an
    /// error that says when it begins; an instant in the future answers with the current state.
    ///
    /// ```
    /// use allocation_ledger::storage::MemoryStorage;
    /// use allocation_ledger::{Ledger, ManualClock, OpenOptions, ResourceRequest};
    /// use std::sync::Arc;
    /// let clock = ManualClock::at_default_epoch();
    /// let opts = OpenOptions::default().storage(Arc::new(MemoryStorage::new())).clock(Arc::new(clock.clone()));
    /// let ledger = Ledger::open_with("/ledger", opts)?;
    /// clock.advance_seconds(10);
    /// let before = ledger.now_micros();
    /// clock.advance_seconds(10);
    /// let id = ledger.request_resources(&ResourceRequest::new("job").workers(3))?.allocation_id();
    /// clock.advance_seconds(10);
    /// ledger.release_resources(&id.to_string())?;
    /// // Time travel: the pool as it was before, during and after the allocation.
    /// assert_eq!(ledger.capacity_at(before)?.allocated_workers, 0);
    /// assert_eq!(ledger.capacity_at(ledger.now_micros() - 5_000_000)?.allocated_workers, 3);
    /// assert_eq!(ledger.capacity_at(ledger.now_micros())?.allocated_workers, 0);
    /// # Ok::<(), allocation_ledger::Error>(())
    /// ```
    pub fn capacity_at(&self, at: Micros) -> Result<CapacityReport> {
        let (mut report, t) = self.with_index(|s, ix, now| {
            if at < s.created_us {
                return Err(before_start("at", at, s.created_us));
            }
            let t = at.min(now);
            if t >= s.last_ts_us {
                return Ok((s.capacity(t), None));
            }
            let report =
                ix.capacity_at(t).ok_or_else(|| before_start("at", at, ix.first_ts().unwrap_or(s.created_us)))?;
            Ok((report, ix.reservation_may_be_in_force(t).then_some(t)))
        })?;
        if let Some(t) = t {
            // The index counts allocations only: the reservations in force then (and what their
            // holders held) come from the state as it was, rebuilt from a snapshot; only when a
            // reservation's window holds `t`.
            report.reserved = self.with_state_at("at", t, |s, t| s.capacity(t).reserved)?;
        }
        Ok(report)
    }

    /// Runs `f` on the state as it was at `at` (and the instant, clamped to now): the live state
    /// when no event came after `at`, else the nearest snapshot at or before `at` plus the
    /// events after it up to `at`.
    pub fn with_state_at<R>(&self, field: &str, at: Micros, f: impl FnOnce(&State, Micros) -> R) -> Result<R> {
        let plan = self.with_index(|s, ix, now| {
            if at < s.created_us {
                return Err(before_start(field, at, s.created_us));
            }
            let t = at.min(now);
            if t >= s.last_ts_us {
                return Ok(AtPlan::Done(f(s, t)));
            }
            Ok(AtPlan::Replay { t, seq: ix.seq_at(t), ledger_id: s.ledger_id.clone(), f })
        })?;
        match plan {
            AtPlan::Done(r) => Ok(r),
            AtPlan::Replay { t, seq, ledger_id, f } => Ok(f(&self.state_at_seq(seq, t, &ledger_id)?, t)),
        }
    }

    /// The fold of the log up to `seq` (whose event is at or before `t`): the newest snapshot at
    /// or before it that loads and belongs to this ledger, then the events after it.
    fn state_at_seq(&self, seq: u64, t: Micros, ledger_id: &str) -> Result<State> {
        let storage = &**self.storage();
        let mut accept = |s: &State, _| {
            // Not a reason anybody reads: such a snapshot is passed over in silence.
            if s.ledger_id == ledger_id && s.last_ts_us <= t {
                Ok(())
            } else {
                Err(String::new())
            }
        };
        // Snapshots are a shortcut: none that can be listed, the log is read from its start.
        let pick = newest_loadable(storage, &self.dir().join(SNAPSHOT_DIR), Some(seq), &mut accept);
        let mut state = match pick.ok().and_then(|p| p.loaded) {
            Some(picked) => picked.state,
            None => State::empty(Config::default()),
        };
        let wal_dir = self.dir().join(WAL_DIR);
        let mut rules = LogRules::after(state.last_seq, state.last_ts_us);
        LogReader::new(storage, &wal_dir).after(state.last_seq).upto(seq).events(
            &mut rules,
            Wording::Open,
            &mut |pos, ev| {
                state.evolve(pos.seq, ev.ts_us, &ev.body);
                Ok(true)
            },
        )?;
        if state.last_seq != seq {
            return Err(Error::Inconsistent {
                path: self.dir().join(WAL_DIR),
                message: format!("the log ends at sequence number {} before {seq}", state.last_seq),
            });
        }
        Ok(state)
    }

    /// The reservations in force or upcoming at `at`, as the log had them then (time travel:
    /// `reservations --at`, `list_reservations` with `at`).
    pub fn reservations_at(&self, at: Micros) -> Result<crate::ledger::ReservationList> {
        self.with_state_at("at", at, crate::ledger::ReservationList::of)
    }

    /// The allocations active at `at`, as they were then (state, age and expiry as of `at`),
    /// oldest first.
    pub fn allocations_at(&self, at: Micros) -> Result<Vec<AllocationDetails>> {
        self.with_state_at("at", at, |s, t| {
            let mut active: Vec<_> = s.allocations().filter(|a| a.holds_at(t)).collect();
            active.sort_by_key(|a| (a.created_us, a.id));
            active.into_iter().filter_map(|a| s.details(a.id, t)).collect()
        })
    }

    /// `list_allocations` as of `at`: every allocation known then, filtered by its state then
    /// and by job. Ended allocations the state no longer keeps in memory are read from the log.
    pub fn list_allocations_at(
        &self,
        at: Micros,
        state: Option<AllocationState>,
        job_id: Option<&str>,
    ) -> Result<Vec<AllocationSummary>> {
        let (mut rows, evicted, upto, t) = self.with_state_at("at", at, |s, t| {
            let rows = s.list(state, job_id, t);
            let evicted = s.evicted_count() > 0 && state != Some(AllocationState::Active);
            let known: BTreeSet<AllocationId> =
                if evicted { s.allocations().map(|a| a.id).collect() } else { BTreeSet::new() };
            (rows, evicted.then_some(known), s.last_seq, t)
        })?;
        if let Some(known) = evicted {
            for a in self.ended_from_log(upto, job_id, &known)? {
                if state.is_none_or(|st| a.state_at(t) == st) {
                    rows.push(a.summary(t));
                }
            }
            rows.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.allocation_id.cmp(&b.allocation_id)));
        }
        Ok(rows)
    }

    /// Allocations of the log up to `upto` that are not in `known`, as they were at `upto`
    /// (only records of the job, if given, and end events are decoded).
    fn ended_from_log(
        &self,
        upto: u64,
        job_id: Option<&str>,
        known: &BTreeSet<AllocationId>,
    ) -> Result<Vec<Allocation>> {
        let wal_dir = self.dir().join(WAL_DIR);
        let reader = LogReader::new(&**self.storage(), &wal_dir).upto(upto);
        let found = rebuild_allocations(&reader, &AllocationFilter::all_but(job_id, &|id| known.contains(id)))?;
        Ok(found.into_values().collect())
    }

    /// Where a scan for events at or after `t` may start (`after_seq`), from the index if this
    /// handle has one; a writer (a long-lived process) builds it.
    fn seq_hint(&self, t: Micros) -> Result<u64> {
        if !self.is_read_only() {
            self.prepare_history(&mut |_, _| {})?;
        }
        self.read_history(|_, ix, _| ix.as_ref().map_or(0, |ix| ix.seq_before(t)))
    }

    /// Visits the events in `range` in log order, read from the log files; `visit` returns false
    /// to stop. Only events already folded into this handle's state are visited.
    pub fn for_each_event(&self, range: EventRange, visit: &mut dyn FnMut(&LoggedEvent) -> bool) -> Result<()> {
        let upto = self.with_durable_state(|_| ())?.1.min(range.to_seq.unwrap_or(u64::MAX));
        let mut after = range.from_seq.unwrap_or(1).max(1) - 1;
        if let Some(since) = range.since {
            after = after.max(self.seq_hint(since)?);
        }
        if after >= upto {
            return Ok(());
        }
        let wal_dir = self.dir().join(WAL_DIR);
        let reader = LogReader::new(&**self.storage(), &wal_dir).after(after).upto(upto);
        reader.events(&mut LogRules::resuming(after), Wording::Open, &mut |pos, event| {
            if range.until.is_some_and(|u| event.ts_us >= u) {
                return Ok(false);
            }
            if range.since.is_some_and(|s| event.ts_us < s) {
                return Ok(true);
            }
            Ok(visit(&LoggedEvent { seq: pos.seq, event }))
        })?;
        Ok(())
    }

    /// The events with timestamps in `[since, until)`, in log order.
    pub fn events_between(&self, since: Micros, until: Micros) -> Result<Vec<LoggedEvent>> {
        let mut out = Vec::new();
        self.for_each_event(EventRange { since: Some(since), until: Some(until), ..Default::default() }, &mut |e| {
            out.push(e.clone());
            true
        })?;
        Ok(out)
    }

    /// Scans the log after `after` up to `upto` for the events of one allocation or of one job,
    /// decoding only the records that can be about them. `stop_when_done`: the ids expected
    /// and whether each has ended (lets the scan stop after the last terminal event).
    fn history_scan(
        &self,
        subject: &Subject<'_>,
        after: u64,
        upto: u64,
        stop_when_done: Option<&[(AllocationId, bool)]>,
    ) -> Result<(Vec<HistoryEvent>, Vec<AllocationId>)> {
        let mut out = Vec::new();
        let mut ids: Vec<AllocationId> = Vec::new();
        let mut wanted: BTreeSet<AllocationId> = BTreeSet::new();
        let mut reservations = BTreeSet::new();
        if let Subject::Allocation(id) = subject {
            wanted.insert(*id);
            ids.push(*id);
        }
        let (any_active, mut pending) = match stop_when_done {
            Some(list) => (list.iter().any(|x| !x.1), list.iter().filter(|x| x.1).map(|x| x.0).collect()),
            None => (true, BTreeSet::new()),
        };
        let needle = match subject {
            Subject::Allocation(id) => format!("\"allocation_id\":\"{id}\""),
            Subject::Job(j) => format!("\"job_id\":{}", serde_json::Value::from(*j)),
        };
        let finder = memchr::memmem::Finder::new(needle.as_bytes());
        // A victim is named in a `preempting` event's list, not as its `allocation_id`.
        let victim = match subject {
            Subject::Allocation(id) => format!("\"{id}\""),
            Subject::Job(_) => String::new(),
        };
        let victim_finder = memchr::memmem::Finder::new(victim.as_bytes());
        if after >= upto {
            return Ok((out, ids));
        }
        let wal_dir = self.dir().join(WAL_DIR);
        LogReader::new(&**self.storage(), &wal_dir).after(after).upto(upto).records(&mut |pos, payload| {
            let relevant = may_concern(subject, payload, &finder, &victim_finder);
            if !relevant {
                return Ok(pos.seq < upto);
            }
            let event = Event::decode(payload)?;
            if job_reservation_event(&event.body, subject, &mut reservations) {
                out.push(HistoryEvent { seq: pos.seq, at: format_micros(event.ts_us), event, explanation: None });
                return Ok(pos.seq < upto);
            }
            let about = match (&event.body, subject) {
                (EventBody::Granted(g), Subject::Job(j)) if g.job_id == *j => Some(g.allocation_id),
                (EventBody::Rejected(r), Subject::Job(j)) if r.job_id == *j => Some(r.allocation_id),
                (EventBody::Queued(q), Subject::Job(j)) if q.job_id == *j => Some(q.allocation_id),
                (EventBody::Preempting(p), Subject::Job(j)) if p.job_id == *j => Some(p.preemptor),
                (EventBody::Preempting(p), Subject::Allocation(v)) if p.victims.contains(v) => Some(*v),
                (body, _) => body.allocation_id().filter(|id| wanted.contains(id)),
            };
            let Some(id) = about else { return Ok(pos.seq < upto) };
            if wanted.insert(id) {
                ids.push(id);
            }
            let terminal = !matches!(
                event.body,
                EventBody::Granted(_) | EventBody::Renewed(_) | EventBody::Queued(_) | EventBody::Preempting(_)
            );
            out.push(HistoryEvent { seq: pos.seq, at: format_micros(event.ts_us), event, explanation: None });
            if stop_when_done.is_some() && terminal && pending.remove(&id) && !any_active && pending.is_empty() {
                return Ok(false);
            }
            Ok(pos.seq < upto)
        })?;
        Ok((out, ids))
    }

    /// Whether the job `job_id` holds a reservation in force or upcoming now (its history then
    /// reads the whole log: the reservation may be older than its allocations).
    fn job_holds_reservations(s: &State, job_id: &str) -> bool {
        s.reservations_at(s.last_ts_us).iter().any(|r| r.job_id.as_deref() == Some(job_id))
    }

    /// Every event about one allocation, in order, with timestamps. One that ended long ago
    /// (no longer in memory) is found in the log.
    pub fn allocation_history(&self, allocation_id: &str) -> Result<History> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        let (known, upto) = self.with_durable_state(|s| {
            s.allocation(id).map(|a| (a.job_id.clone(), a.created_us, a.state.is_terminal()))
        })?;
        let subject = Subject::Allocation(id);
        let (events, job_id) = match known {
            Some((job_id, created, ended)) => {
                let after = self.seq_hint(created)?;
                (self.history_scan(&subject, after, upto, Some(&[(id, ended)]))?.0, job_id)
            }
            None => {
                let (events, _) = self.history_scan(&subject, 0, upto, None)?;
                let job_id = match events.first().map(|e| &e.event.body) {
                    Some(EventBody::Granted(g)) => g.job_id.clone(),
                    Some(EventBody::Rejected(r)) => r.job_id.clone(),
                    Some(EventBody::Queued(q)) => q.job_id.clone(),
                    _ => return Err(Error::NotFound(id.to_string())),
                };
                (events, job_id)
            }
        };
        let mut events = events;
        self.explain_waits(&mut events)?;
        Ok(History { allocation_id: Some(id), job_id, allocation_ids: vec![id], events })
    }

    /// Every event about every allocation of one job (granted or rejected), in log order. A job
    /// the ledger never saw has an empty history.
    ///
    /// ```
    /// use allocation_ledger::storage::MemoryStorage;
    /// use allocation_ledger::{EventBody, Ledger, OpenOptions, ResourceRequest};
    /// use std::sync::Arc;
    /// let ledger = Ledger::open_with("/ledger", OpenOptions::default().storage(Arc::new(MemoryStorage::new())))?;
    /// let id = ledger.request_resources(&ResourceRequest::new("nightly").workers(2))?.allocation_id();
    /// ledger.release_resources(&id.to_string())?;
    /// let history = ledger.job_history("nightly")?;
    /// assert_eq!(history.allocation_ids, vec![id]);
    /// assert!(matches!(history.events[0].event.body, EventBody::Granted(_)));
    /// assert!(matches!(history.events[1].event.body, EventBody::Released { .. }));
    /// # Ok::<(), allocation_ledger::Error>(())
    /// ```
    pub fn job_history(&self, job_id: &str) -> Result<History> {
        crate::domain::input::validate_job_id("job_id", job_id)?;
        let ((known, evicted), upto) = self.with_durable_state(|s| {
            let known: Vec<(AllocationId, Micros, bool)> = s
                .list(None, Some(job_id), s.last_ts_us)
                .iter()
                .filter_map(|row| s.allocation(row.allocation_id))
                .map(|a| (a.id, a.created_us, a.state.is_terminal()))
                .collect();
            (known, s.evicted_count() > 0 || Self::job_holds_reservations(s, job_id))
        })?;
        let subject = Subject::Job(job_id);
        // A reservation of the job (held, cancelled, over or refused) may come before its
        // first allocation in memory: the capacity index knows when the first one was.
        let first_reservation = if known.is_empty() || evicted {
            None // read from the start anyway
        } else {
            self.with_index(|_, ix, _| Ok(ix.first_reservation_of_job(job_id)))?
        };
        let first = known.iter().map(|x| x.1).chain(first_reservation).min();
        let (events, ids) = match first {
            // Older allocations of the job may be only in the log, and a job with nothing in
            // memory may have held reservations: read all of it.
            _ if evicted => self.history_scan(&subject, 0, upto, None)?,
            None => self.history_scan(&subject, 0, upto, None)?,
            // From its first allocation in memory or first reservation event to the end (not
            // stopping at its last end: a reservation of the job may come later).
            Some(first) => self.history_scan(&subject, self.seq_hint(first)?, upto, None)?,
        };
        let mut events = events;
        self.explain_waits(&mut events)?;
        Ok(History { allocation_id: None, job_id: job_id.to_string(), allocation_ids: ids, events })
    }

    /// Clamps a window to the ledger's life: `since` before the first event starts at it,
    /// `until` in the future ends now. An empty result is invalid input.
    fn window(s: &State, since: Micros, until: Micros, now: Micros) -> Result<(Micros, Micros)> {
        if until <= since {
            return Err(Error::invalid(
                "until",
                format!("{} is not after since ({})", format_micros(until), format_micros(since)),
            ));
        }
        let (a, b) = (since.max(s.created_us), until.min(now));
        if b <= a {
            return Err(Error::invalid(
                "since",
                format!(
                    "the window [{}, {}) holds no part of the ledger's life ({} to now, {})",
                    format_micros(since),
                    format_micros(until),
                    format_micros(s.created_us),
                    format_micros(now)
                ),
            ));
        }
        Ok((a, b))
    }

    /// Usage over `[since, until)`, grouped by job or by a metadata key: CPU-seconds,
    /// memory-MiB-seconds, worker-seconds and allocation counts, each holding interval clipped
    /// to the window; rejections by reason; releases and expiries. MCP server costs (charged
    /// once per running server) are reported per server, and included in the totals.
    pub fn usage(&self, since: Micros, until: Micros, by: &GroupBy) -> Result<UsageReport> {
        self.usage_with_progress(since, until, by, &mut |_, _| {})
    }

    /// [`Ledger::usage`], reporting progress through the window's events as (done, total).
    /// It reads the state just before the window (nearest snapshot plus the events after it)
    /// and then the window's events from the log.
    pub fn usage_with_progress(
        &self,
        since: Micros,
        until: Micros,
        by: &GroupBy,
        progress: Progress<'_>,
    ) -> Result<UsageReport> {
        let (a, b, start, first_seq, last_seq) = self.with_index(|s, ix, now| {
            let (a, b) = Self::window(s, since, until, now)?;
            Ok((a, b, s.created_us, ix.seq_before(a) + 1, ix.seq_before(b)))
        })?;
        let mut u = usage::UsageBuilder::new(a, b, by);
        if a > start {
            self.with_state_at("since", a - 1, |s, _| {
                for al in s.allocations() {
                    u.add_before(al);
                }
            })?;
        }
        let total = last_seq.saturating_sub(first_seq) + 1;
        self.for_each_event(EventRange { since: Some(a), until: Some(b), ..Default::default() }, &mut |e| {
            u.observe(e.event.ts_us, &e.event.body);
            let done = e.seq.saturating_sub(first_seq) + 1;
            if done.is_multiple_of(4096) || done == total {
                progress(done, total);
            }
            true
        })?;
        Ok(u.finish())
    }

    /// Utilisation per bucket of `bucket_us` over `[since, until)`: time-weighted mean of what
    /// was allocated and of the totals, for CPU, memory and workers. The last bucket may be
    /// shorter.
    pub fn timeline(&self, since: Micros, until: Micros, bucket_us: i64) -> Result<Timeline> {
        if bucket_us <= 0 {
            return Err(Error::invalid("bucket", "must be a positive duration, e.g. 5m or 1h"));
        }
        self.with_index(|s, ix, now| {
            let (a, b) = Self::window(s, since, until, now)?;
            let n = ((b - a) as u64).div_ceil(bucket_us as u64);
            if n > MAX_TIMELINE_BUCKETS {
                return Err(Error::invalid(
                    "bucket",
                    format!(
                        "{} s over this window makes {n} buckets; at most {MAX_TIMELINE_BUCKETS} are allowed: use a wider bucket",
                        bucket_us as f64 / 1e6
                    ),
                ));
            }
            Ok(usage::timeline(ix, a, b, bucket_us))
        })
    }

    /// How large this handle's capacity index is: (events, steps, approximate bytes), or None
    /// when it is not built.
    pub fn history_index_stats(&self) -> Result<Option<(u64, usize, usize)>> {
        self.read_history(|_, ix, _| ix.as_ref().map(|ix| (ix.last_seq(), ix.step_count(), ix.approx_bytes())))
    }

    /// Drops this handle's capacity index (it is rebuilt from the log on next use).
    pub fn drop_history_index(&self) -> Result<()> {
        self.read_history(|_, ix, _| *ix = None)
    }
}

/// Whether `body` is a reservation event of the job `subject` names: `reserved` or
/// `reservation_rejected` with the job as holder, or the `reservation_cancelled` of one of its
/// reservations (`ids`: those seen so far).
fn job_reservation_event(
    body: &EventBody,
    subject: &Subject<'_>,
    ids: &mut BTreeSet<crate::domain::reservation::ReservationId>,
) -> bool {
    let Subject::Job(job) = subject else { return false };
    match body {
        EventBody::Reserved(r) if r.job_id.as_deref() == Some(*job) => {
            ids.insert(r.reservation_id);
            true
        }
        EventBody::ReservationRejected(r) => r.job_id.as_deref() == Some(*job),
        EventBody::ReservationCancelled { reservation_id, .. } => ids.contains(reservation_id),
        _ => false,
    }
}

/// Whether the record `payload` can be about `subject`, without decoding it: it names the
/// allocation (`finder`) or job, or it is a `preempting` event naming the allocation as a victim
/// (`victim_finder`), or (for a job) an event that names only an allocation id.
fn may_concern(
    subject: &Subject<'_>,
    payload: &[u8],
    finder: &memchr::memmem::Finder<'_>,
    victim_finder: &memchr::memmem::Finder<'_>,
) -> bool {
    let head = &payload[..payload.len().min(ENVELOPE_BYTES)];
    let is = |kind: &[u8]| memchr::memmem::find(head, kind).is_some();
    match subject {
        Subject::Allocation(_) => {
            finder.find(payload).is_some() || (is(b"\"type\":\"preempting\"") && victim_finder.find(payload).is_some())
        }
        Subject::Job(_) => {
            finder.find(payload).is_some()
                || is(b"\"type\":\"released\"")
                || is(b"\"type\":\"expired\"")
                || is(b"\"type\":\"renewed\"")
                || is(b"\"type\":\"cancelled\"")
                || is(b"\"type\":\"preempted\"")
                || is(b"\"type\":\"reservation_cancelled\"")
        }
    }
}
