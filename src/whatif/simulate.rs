//! The virtual-clock run: the recorded events, in order, drive a second [`State`] that
//! re-decides every recorded request with the same decision code the ledger runs
//! (`State::decide_grant`) and folds its outcome with the same `State::evolve`, in memory.
//!
//! - A request is decided at the instant it arrived, with the id the ledger gave it.
//! - An allocation granted on both sides ends when reality's did: the `released` or `expired`
//!   event that ended it is folded into the what-if too (same deadline on both sides, since the
//!   grant's instant and lifetime are the same). Any other event that names an allocation (and
//!   kinds this build does not know, such as a lease renewal) is folded as recorded when the
//!   allocation it names is active in the what-if, and passed over when it is not.
//! - One granted only in the what-if is held as [`Hold`] says, then released (or expires at
//!   its deadline), at the first recorded event at or after that instant.
//! - With the recorded config, the what-if sees exactly the state the ledger saw before each
//!   decision (expiries are written before a decision, and are folded here in the same place),
//!   so it decides exactly what the ledger decided: same outcome, slots and endpoints.

use super::compare::{Compare, Outcome, Side};
use super::demand::{request_of, tenant_of};
use super::Hold;
use crate::domain::clock::Micros;
use crate::domain::config::Config;
use crate::domain::event::{Event, EventBody};
use crate::domain::model::{AllocationId, AllocationState, Resources};
use crate::domain::state::State;
use crate::{Error, Result};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

mod queue;

/// Sees both runs event by event (tests compare them; the report needs neither).
pub trait SimObserver {
    /// A recorded event the run read (every event up to the window's end).
    fn real(&mut self, _seq: u64, _event: &Event) {}
    /// An event the what-if folded, with its own sequence number and instant.
    fn what_if(&mut self, _seq: u64, _ts_us: Micros, _body: &EventBody) {}
}

impl SimObserver for () {}

/// Holding times kept per job for `--hold median-of-job` (the most recent ones).
const HOLDS_KEPT: usize = 64;

/// What reality holds, followed from the recorded events (cheaper than a second fold: only
/// the amounts, never the slots).
#[derive(Debug, Default)]
struct Reality {
    active: HashMap<AllocationId, Held>,
    running: HashMap<String, (u32, Resources)>,
    allocated: Resources,
    total: Resources,
    /// The config's drained slots, and those of them held (the worker total counts a drained
    /// slot until it is freed).
    drained: BTreeSet<u32>,
    draining: BTreeSet<u32>,
}

#[derive(Debug)]
struct Held {
    resources: Resources,
    slots: Box<[u32]>,
    mcp: Vec<String>,
    created_us: Micros,
    job: Option<String>,
}

impl Reality {
    /// What `state` (reality's fold at the window's start) holds.
    fn from_state(state: &State, keep_jobs: bool) -> Reality {
        let mut r = Reality { allocated: state.allocated(), total: state.total(), ..Reality::default() };
        r.drained.clone_from(&state.config.drained_workers);
        for a in state.allocations().filter(|a| a.state == AllocationState::Active) {
            r.draining.extend(a.workers.iter().map(|w| w.slot).filter(|s| r.drained.contains(s)));
            let held = Held {
                resources: a.resources,
                slots: a.workers.iter().map(|w| w.slot).collect(),
                mcp: a.mcp_servers.iter().map(|m| m.name.clone()).collect(),
                created_us: a.created_us,
                job: keep_jobs.then(|| a.job_id.clone()),
            };
            r.active.insert(a.id, held);
        }
        for (name, s) in state.running_servers() {
            let cost = Resources { cpu_millicores: s.cpu_millicores, memory_mib: s.memory_mib, workers: 0 };
            r.running.insert(name.clone(), (s.refcount, cost));
        }
        r
    }

    /// Folds one recorded event's amounts; returns the holding time of an allocation it ended
    /// (with its job, when kept).
    fn observe(&mut self, ts_us: Micros, body: &EventBody, keep_jobs: bool) -> Option<(Option<String>, i64)> {
        match body {
            EventBody::ConfigChanged { config } | EventBody::LedgerCreated { config, .. } => {
                self.drained.clone_from(&config.drained_workers);
                let drained = &self.drained;
                self.draining = self
                    .active
                    .values()
                    .flat_map(|h| h.slots.iter().copied())
                    .filter(|s| drained.contains(s))
                    .collect();
                self.total = total_of(config, self.draining.len());
                None
            }
            EventBody::Granted(g) => {
                let mut charge = g.resources;
                for m in &g.mcp_servers {
                    let cost = Resources { cpu_millicores: m.cpu_millicores, memory_mib: m.memory_mib, workers: 0 };
                    let entry = self.running.entry(m.name.clone()).or_insert((0, cost));
                    if entry.0 == 0 {
                        charge = plus(charge, entry.1);
                    }
                    entry.0 += 1;
                }
                self.allocated = plus(self.allocated, charge);
                let mcp = g.mcp_servers.iter().map(|m| m.name.clone()).collect();
                let job = keep_jobs.then(|| g.job_id.clone());
                let slots = g.workers.iter().map(|w| w.slot).collect();
                self.active
                    .insert(g.allocation_id, Held { resources: g.resources, slots, mcp, created_us: ts_us, job });
                None
            }
            EventBody::Released { allocation_id } => self.end(*allocation_id, ts_us),
            EventBody::Expired { allocation_id, deadline_us } => self.end(*allocation_id, *deadline_us),
            _ => None,
        }
    }

    fn end(&mut self, id: AllocationId, ended_us: Micros) -> Option<(Option<String>, i64)> {
        let held = self.active.remove(&id)?;
        // A drained slot leaves the pool's worker total when it is freed.
        let freed_drained = held.slots.iter().filter(|s| self.draining.remove(s)).count() as u32;
        self.total.workers = self.total.workers.saturating_sub(freed_drained);
        let mut freed = held.resources;
        for name in &held.mcp {
            if let Some(entry) = self.running.get_mut(name) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    freed = plus(freed, entry.1);
                    self.running.remove(name);
                }
            }
        }
        self.allocated = minus(self.allocated, freed);
        Some((held.job, ended_us - held.created_us))
    }
}

fn plus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millicores: a.cpu_millicores.saturating_add(b.cpu_millicores),
        memory_mib: a.memory_mib.saturating_add(b.memory_mib),
        workers: a.workers.saturating_add(b.workers),
    }
}

fn minus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millicores: a.cpu_millicores.saturating_sub(b.cpu_millicores),
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
        workers: a.workers.saturating_sub(b.workers),
    }
}

fn total_of(config: &Config, held_drained: usize) -> Resources {
    Resources {
        cpu_millicores: config.total_cpu_millicores,
        memory_mib: config.total_memory_mib,
        workers: config.pool_workers(held_drained),
    }
}

/// Where the run is, and what it has counted.
pub struct Simulator<'o> {
    state: State,
    seq: u64,
    alternative: Option<serde_json::Map<String, serde_json::Value>>,
    hold: Hold,
    since: Micros,
    until: Micros,
    in_window: bool,
    /// Allocations granted only in the what-if: when each ends.
    sim_only_ends: BinaryHeap<Reverse<(Micros, AllocationId)>>,
    reality: Reality,
    holds: HashMap<String, VecDeque<i64>>,
    compare: Compare,
    /// Requests that waited in the queue on a side, until both sides decided them.
    waiting: HashMap<AllocationId, queue::Waiting>,
    observer: &'o mut dyn SimObserver,
    /// The what-if's config at the window's start.
    pub config: Option<Config>,
    /// Recorded config changes in the window that the what-if did not apply.
    pub config_changes_ignored: u64,
    /// Decisions that differ from the recorded ones (counted with the recorded config only).
    pub differing_decisions: u64,
    /// The first of them.
    pub first_difference_seq: Option<u64>,
}

/// The what-if's outcome of one request, as the comparison counts it.
fn outcome_of(body: &EventBody) -> Outcome {
    match body {
        EventBody::Rejected(r) => Outcome::Rejected(r.reason.as_str()),
        _ => Outcome::Granted,
    }
}

impl<'o> Simulator<'o> {
    /// A run over `[since, until)` (until after since): the what-if's config is the recorded
    /// one with `alternative`'s fields put over it (none: the recorded config, changes and all).
    pub fn new(
        alternative: Option<serde_json::Map<String, serde_json::Value>>,
        hold: Hold,
        since: Micros,
        until: Micros,
        observer: &'o mut dyn SimObserver,
    ) -> Simulator<'o> {
        Simulator {
            state: State::empty(Config::default()),
            seq: 0,
            alternative,
            hold,
            since,
            until,
            in_window: false,
            sim_only_ends: BinaryHeap::new(),
            reality: Reality::default(),
            holds: HashMap::new(),
            compare: Compare::new(since, until),
            waiting: HashMap::new(),
            observer,
            config: None,
            config_changes_ignored: 0,
            differing_decisions: 0,
            first_difference_seq: None,
        }
    }

    /// Folds one event into the what-if with the next sequence number.
    fn fold(&mut self, ts_us: Micros, body: EventBody) {
        self.seq += 1;
        if self.in_window {
            self.what_if_wait_ends(ts_us, &body);
        }
        self.observer.what_if(self.seq, ts_us, &body);
        self.state.evolve_owned(self.seq, ts_us, body);
    }

    /// The recorded config with the alternative's fields over it.
    fn overlay(&self, recorded: &Config) -> Result<Option<Config>> {
        let Some(patch) = &self.alternative else { return Ok(None) };
        let Ok(serde_json::Value::Object(mut base)) = serde_json::to_value(recorded) else {
            return Err(Error::invalid("config", "the recorded config does not serialise"));
        };
        for (k, v) in patch {
            base.insert(k.clone(), v.clone());
        }
        Config::from_json(&serde_json::Value::Object(base).to_string()).map(Some)
    }

    /// Starts the window before `next` (the first event at or after `since`; none: the log
    /// ended first): reality's amounts from here on, and the what-if's config.
    fn enter(&mut self, next: Option<&EventBody>) -> Result<()> {
        self.in_window = true;
        let keep_jobs = self.hold == Hold::MedianOfJob;
        self.reality = Reality::from_state(&self.state, keep_jobs);
        if let Some(EventBody::LedgerCreated { config, .. }) = next {
            // The window starts with the ledger: the what-if starts with its own pool (folded
            // in place of the recorded one by `decide_or_mirror`).
            self.config = Some(self.overlay(config)?.unwrap_or_else(|| config.clone()));
            return Ok(());
        }
        let recorded = self.state.config.clone();
        self.config = Some(recorded.clone());
        if let Some(alt) = self.overlay(&recorded)? {
            let change = self.state.decide_config_change(alt.clone()).map_err(|e| {
                Error::invalid(
                    "config",
                    format!("the what-if's pool cannot hold what was active at the window's start: {e}"),
                )
            })?;
            let ts = self.since.max(self.state.last_ts_us);
            self.fold(ts, change);
            self.config = Some(alt);
        }
        self.compare.set(Side::Reality, self.reality.allocated, self.reality.total);
        self.compare.set(Side::WhatIf, self.state.allocated(), self.state.total());
        Ok(())
    }

    /// Reads one recorded event; false once the window is over.
    pub fn observe(&mut self, seq: u64, event: Event) -> Result<bool> {
        let ts = event.ts_us;
        if ts >= self.until {
            return Ok(false);
        }
        self.observer.real(seq, &event);
        if !self.in_window {
            if ts < self.since {
                self.fold(ts, event.body);
                return Ok(true);
            }
            self.enter(Some(&event.body))?;
        }
        self.end_sim_only(ts);
        self.compare.advance(ts);
        let keep_jobs = self.hold == Hold::MedianOfJob;
        if let Some((Some(job), held_us)) = self.reality.observe(ts, &event.body, keep_jobs) {
            let kept = self.holds.entry(job).or_default();
            if kept.len() == HOLDS_KEPT {
                kept.pop_front();
            }
            kept.push_back(held_us);
        }
        // As the ledger's write: expiries, then the queue (timeouts due, grants), then the
        // decision, then the queue again. Recorded expiries come as events of their own.
        let expiry = matches!(event.body, EventBody::Expired { .. });
        if !expiry {
            self.settle_queue(ts);
        }
        self.decide_or_mirror(seq, ts, event.body);
        if !expiry {
            self.settle_queue(ts);
        }
        self.compare.set(Side::Reality, self.reality.allocated, self.reality.total);
        self.compare.set(Side::WhatIf, self.state.allocated(), self.state.total());
        Ok(true)
    }

    fn decide_or_mirror(&mut self, seq: u64, ts: Micros, body: EventBody) {
        if self.reality_wait_ends(ts, &body) {
            return;
        }
        match body {
            EventBody::Queued(_) => self.queued_request(ts, &body),
            EventBody::Granted(_) | EventBody::Rejected(_) => self.request(seq, ts, body),
            EventBody::ConfigChanged { .. } if self.alternative.is_some() => self.config_changes_ignored += 1,
            EventBody::LedgerCreated { ledger_id, config } => {
                let config = self.config.clone().unwrap_or(config);
                self.fold(ts, EventBody::LedgerCreated { ledger_id, config });
            }
            other => {
                let ended = match &other {
                    EventBody::Released { .. } => Some(false),
                    EventBody::Expired { .. } => Some(true),
                    _ => None,
                };
                if let Some(expired) = ended {
                    self.compare.ended(Side::Reality, expired);
                }
                if let Some((id, end)) = end_of(&other, ts) {
                    self.compare.unhold(Side::Reality, id, end);
                }
                // An event about an allocation the what-if does not hold is passed over.
                let held = other
                    .allocation_id()
                    .is_none_or(|id| self.state.allocation(id).is_some_and(|a| a.state == AllocationState::Active));
                if held {
                    if let Some(expired) = ended {
                        self.compare.ended(Side::WhatIf, expired);
                    }
                    if let Some((id, end)) = end_of(&other, ts) {
                        self.compare.unhold(Side::WhatIf, id, end);
                    }
                    self.fold(ts, other);
                }
            }
        }
    }
}

/// The allocation an event ends and when it stopped holding: a release at its time, an expiry
/// at its deadline.
fn end_of(body: &EventBody, ts: Micros) -> Option<(crate::domain::model::AllocationId, Micros)> {
    match body {
        EventBody::Released { allocation_id } => Some((*allocation_id, ts)),
        EventBody::Expired { allocation_id, deadline_us } => Some((*allocation_id, *deadline_us)),
        _ => None,
    }
}

impl Simulator<'_> {
    /// Re-decides one recorded request at the instant it arrived, with the id it was given.
    fn request(&mut self, seq: u64, ts: Micros, recorded: EventBody) {
        let Some((id, req)) = request_of(&recorded) else { return };
        let reality = outcome_of(&recorded);
        // Decided as the ledger decides a request that does not wait: the queue's head and
        // the reservations count.
        let (what_if, body) = match self.state.decide_admission(&req, ts, id) {
            Ok(EventBody::Granted(grant)) => {
                if reality != Outcome::Granted {
                    let end = self.held_until(&req.job_id, ts, grant.deadline_us);
                    self.sim_only_ends.push(Reverse((end, id)));
                }
                (Outcome::Granted, Some(EventBody::Granted(grant)))
            }
            Ok(EventBody::Rejected(rejection)) => {
                (Outcome::Rejected(rejection.reason.as_str()), Some(EventBody::Rejected(rejection)))
            }
            Ok(_) | Err(_) => (Outcome::Invalid, None),
        };
        if self.alternative.is_none() && body.as_ref() != Some(&recorded) {
            self.differing_decisions += 1;
            self.first_difference_seq.get_or_insert(seq);
        }
        self.compare.request(&req.job_id, tenant_of(&req), reality, what_if);
        if let EventBody::Granted(g) = &recorded {
            self.compare.hold(Side::Reality, id, &req.job_id, tenant_of(&req), g.resources.workers, ts);
        }
        if let Some(EventBody::Granted(g)) = &body {
            self.compare.hold(Side::WhatIf, id, &req.job_id, tenant_of(&req), g.resources.workers, ts);
        }
        if let Some(body) = body {
            self.fold(ts, body);
        }
    }

    /// When an allocation granted only in the what-if ends (never after its deadline).
    fn held_until(&self, job: &str, ts: Micros, deadline_us: Micros) -> Micros {
        let held_us = match self.hold {
            Hold::Ttl => None,
            Hold::Fixed(us) => Some(us),
            Hold::MedianOfJob => self.holds.get(job).and_then(|kept| {
                let mut v: Vec<i64> = kept.iter().copied().collect();
                v.sort_unstable();
                v.get(v.len() / 2).copied()
            }),
        };
        held_us.map_or(deadline_us, |h| ts.saturating_add(h).min(deadline_us))
    }

    /// Ends the what-if-only allocations due at or before `t`, each at its own instant.
    fn end_sim_only(&mut self, t: Micros) {
        while let Some(&Reverse((end, id))) = self.sim_only_ends.peek() {
            if end > t {
                break;
            }
            self.sim_only_ends.pop();
            let Some(deadline_us) =
                self.state.allocation(id).filter(|a| a.state == AllocationState::Active).map(|a| a.deadline_us)
            else {
                continue;
            };
            self.compare.advance(end);
            let expired = end >= deadline_us;
            let body = if expired {
                EventBody::Expired { allocation_id: id, deadline_us }
            } else {
                EventBody::Released { allocation_id: id }
            };
            self.compare.ended(Side::WhatIf, expired);
            self.compare.unhold(Side::WhatIf, id, end.min(deadline_us));
            self.fold(end.max(self.state.last_ts_us + 1), body);
            self.compare.set(Side::WhatIf, self.state.allocated(), self.state.total());
        }
    }

    /// Closes the window: what is still held is held to its end.
    pub fn finish(mut self) -> Result<super::WhatIfReport> {
        if !self.in_window {
            self.enter(None)?;
        }
        self.end_sim_only(self.until - 1);
        self.close_waits();
        let comparison = self.compare.finish();
        Ok(super::WhatIfReport {
            hold: self.hold.to_string(),
            recorded_config: self.alternative.is_none(),
            config: self.config,
            reproduced: self.alternative.is_none().then_some(self.differing_decisions == 0),
            differing_decisions: self.differing_decisions,
            first_difference_seq: self.first_difference_seq,
            config_changes_ignored: self.config_changes_ignored,
            comparison,
        })
    }
}
