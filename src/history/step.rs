//! Stepping through history: event by event, what each event changed (slots and endpoints
//! taken or given back, the pool before and after), and the whole state at an exact point.
//! Streams the log: memory is the state's, never the events'.

use super::Ledger;
use crate::domain::clock::{format_micros, parse_time, Micros};
use crate::domain::event::{Event, EventBody};
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::state::State;
use crate::log::layout::WAL_DIR;
use crate::log::reader::{LogReader, LogRules, Wording};
use crate::report::{AllocationDetails, CapacityReport};
use crate::{Config, Error, Result};
use serde::Serialize;

/// A point in the log: a sequence number, or an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogPoint {
    /// The event with this sequence number.
    Seq(u64),
    /// This instant.
    At(Micros),
}

impl LogPoint {
    /// A whole number is a sequence number; anything else an instant (RFC 3339, or relative to
    /// `now`: `-15m`); the error names `field`.
    pub fn parse(field: &str, text: &str, now: Micros) -> Result<LogPoint> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse()
                .map(LogPoint::Seq)
                .map_err(|_| Error::invalid(field, format!("{text:?} is too large for a sequence number")));
        }
        parse_time(field, text, now).map(LogPoint::At)
    }
}

/// The pool's amounts at one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolView {
    /// Worker slots held.
    pub allocated_workers: u32,
    /// Worker slots in the pool.
    pub total_workers: u32,
    /// CPU held (millicores).
    pub allocated_cpu_millicores: u64,
    /// CPU in the pool.
    pub total_cpu_millicores: u64,
    /// Memory held (MiB).
    pub allocated_memory_mib: u64,
    /// Memory in the pool.
    pub total_memory_mib: u64,
    /// Allocations active (as folded).
    pub active_allocations: u64,
}

impl PoolView {
    fn of(s: &State) -> PoolView {
        let (a, t) = (s.allocated(), s.total());
        PoolView {
            allocated_workers: a.workers,
            total_workers: t.workers,
            allocated_cpu_millicores: a.cpu_millicores,
            total_cpu_millicores: t.cpu_millicores,
            allocated_memory_mib: a.memory_mib,
            total_memory_mib: t.memory_mib,
            active_allocations: s.active_count() as u64,
        }
    }
}

/// What one event changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The event's sequence number.
    pub seq: u64,
    /// Its instant (RFC 3339).
    pub at: String,
    /// The event.
    pub event: Event,
    /// The pool before it.
    pub before: PoolView,
    /// The pool after it.
    pub after: PoolView,
    /// Worker slots it took.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slots_taken: Vec<u32>,
    /// Worker slots it gave back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slots_freed: Vec<u32>,
    /// MCP servers it started, as `name endpoint`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints_started: Vec<String>,
    /// MCP servers it stopped (their last user ended), as `name endpoint`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints_stopped: Vec<String>,
    /// A config change in words, against the config before it ("drained worker-03").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub config_change: Vec<String>,
}

/// Which events [`Ledger::replay_steps`] shows (all of them are folded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepFilter {
    /// Only events about this allocation.
    pub allocation: Option<AllocationId>,
    /// Only events about this job's allocations.
    pub job_id: Option<String>,
}

/// The whole state at one point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateAt {
    /// The last event folded.
    pub seq: u64,
    /// The instant the state is read at (RFC 3339).
    pub at: String,
    /// The pool.
    pub capacity: CapacityReport,
    /// The allocations active then, oldest first.
    pub allocations: Vec<AllocationDetails>,
    /// The reservations in force or upcoming then, by start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<crate::ledger::ReservationInfo>,
}

/// Whether `body` (folded into `s` next) is about what `filter` follows.
fn wanted(filter: &StepFilter, s: &State, body: &EventBody) -> bool {
    let id = body.allocation_id();
    if let Some(a) = filter.allocation {
        if id != Some(a) {
            return false;
        }
    }
    let Some(job) = &filter.job_id else { return true };
    match body {
        EventBody::Granted(g) => g.job_id == *job,
        EventBody::Rejected(r) => r.job_id == *job,
        _ => id.and_then(|id| s.allocation(id)).is_some_and(|a| a.job_id == *job),
    }
}

/// The slots and endpoints `body` moves, read from `s` before it is folded.
fn moves(s: &State, body: &EventBody) -> (Vec<u32>, Vec<u32>, Vec<String>, Vec<String>) {
    let mut m = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    match body {
        EventBody::Granted(g) => {
            m.0 = g.workers.iter().map(|w| w.slot).collect();
            m.2 = g.mcp_servers.iter().filter(|x| x.started).map(|x| format!("{} {}", x.name, x.endpoint)).collect();
        }
        EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => {
            if let Some(a) = s.allocation(*allocation_id).filter(|a| a.state == AllocationState::Active) {
                m.1 = a.workers.iter().map(|w| w.slot).collect();
                let running = s.running_servers();
                m.3 = a
                    .mcp_servers
                    .iter()
                    .filter(|x| running.get(&x.name).is_some_and(|r| r.refcount == 1))
                    .map(|x| format!("{} {}", x.name, x.endpoint))
                    .collect();
            }
        }
        // Other kinds move no slot (a config change, or a kind this step does not know).
        _ => {}
    }
    m
}

impl Ledger {
    /// The range of sequence numbers `[from, to]` covers (from: its first event at or after an
    /// instant; to: its last at or before one).
    fn seq_range(&self, from: Option<LogPoint>, to: Option<LogPoint>) -> Result<(u64, u64)> {
        self.with_index(|s, ix, _| {
            let first = match from {
                None => 1,
                Some(LogPoint::Seq(q)) => q.max(1),
                Some(LogPoint::At(t)) => ix.seq_before(t) + 1,
            };
            let last = match to {
                None => s.last_seq,
                Some(LogPoint::Seq(q)) => q.min(s.last_seq),
                Some(LogPoint::At(t)) => ix.seq_at(t),
            };
            Ok((first, last))
        })
    }

    /// The fold of the log up to `seq` (0: before the first event).
    fn fold_to(&self, seq: u64) -> Result<State> {
        if seq == 0 {
            return Ok(State::empty(Config::default()));
        }
        let ledger_id = self.with_state(|s| s.ledger_id.clone());
        self.state_at_seq(seq, Micros::MAX, &ledger_id)
    }

    /// Folds the events from `from` to `to` (each end optional) and shows `visit` what each one
    /// that `filter` follows changed; `visit` returns false to stop.
    pub fn replay_steps(
        &self,
        from: Option<LogPoint>,
        to: Option<LogPoint>,
        filter: &StepFilter,
        visit: &mut dyn FnMut(&Step) -> bool,
    ) -> Result<()> {
        let (first, last) = self.seq_range(from, to)?;
        if first > last {
            return Ok(());
        }
        let mut state = self.fold_to(first - 1)?;
        let wal_dir = self.dir().join(WAL_DIR);
        let mut rules = LogRules::after(state.last_seq, state.last_ts_us);
        let reader = LogReader::new(&**self.storage(), &wal_dir).after(first - 1).upto(last);
        reader.events(&mut rules, Wording::Open, &mut |pos, event| {
            if !wanted(filter, &state, &event.body) {
                state.evolve_owned(pos.seq, event.ts_us, event.body);
                return Ok(pos.seq < last);
            }
            let before = PoolView::of(&state);
            let (slots_taken, slots_freed, endpoints_started, endpoints_stopped) = moves(&state, &event.body);
            let config_change = match &event.body {
                EventBody::ConfigChanged { config } => crate::domain::pool::describe_change(&state.config, config),
                _ => Vec::new(),
            };
            state.evolve(pos.seq, event.ts_us, &event.body);
            let step = Step {
                seq: pos.seq,
                at: format_micros(event.ts_us),
                event,
                before,
                after: PoolView::of(&state),
                slots_taken,
                slots_freed,
                endpoints_started,
                endpoints_stopped,
                config_change,
            };
            Ok(visit(&step) && pos.seq < last)
        })?;
        Ok(())
    }

    /// The whole state at `to`: after the event with that sequence number, or as of that
    /// instant (allocations past their deadline then read as expired).
    pub fn state_at_point(&self, to: LogPoint) -> Result<StateAt> {
        let view = |s: &State, t: Micros| {
            let mut active: Vec<_> = s.allocations().filter(|a| a.holds_at(t)).collect();
            active.sort_by_key(|a| (a.created_us, a.id));
            StateAt {
                seq: s.last_seq,
                at: format_micros(t),
                capacity: s.capacity(t),
                allocations: active.into_iter().filter_map(|a| s.details(a.id, t)).collect(),
                reservations: crate::ledger::ReservationList::of(s, t).reservations,
            }
        };
        match to {
            LogPoint::At(t) => self.with_state_at("to", t, view),
            LogPoint::Seq(seq) => {
                let last = self.with_durable_state(|_| ())?.1;
                if seq == 0 || seq > last {
                    return Err(Error::invalid("to", format!("sequence number {seq} is not in the log (1 to {last})")));
                }
                let s = self.fold_to(seq)?;
                Ok(view(&s, s.last_ts_us))
            }
        }
    }
}
