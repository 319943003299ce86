//! The capacity index: a compact step function of what the pool held over time, in holding-time
//! (an allocation holds over `[granted_at, min(released_at, deadline))`, whenever its expiry
//! event was written), plus the timestamp of every event so that an instant maps to a sequence
//! number by binary search.
//!
//! It is built by one pass over the log and then kept current by the ledger after each append
//! ([`CapacityIndex::observe`]). It is derived data: nothing in it is not in the log.
//!
//! Memory: 8 bytes per event (its timestamp) plus one 48-byte [`Step`] per change of capacity
//! (grants, releases, expiries at their deadline, config changes; rejections change nothing),
//! plus small tables of distinct totals and distinct sets of running MCP servers, plus the
//! allocations active at the end of the log.

use crate::domain::clock::Micros;
use crate::domain::event::{EventBody, Grant};
use crate::domain::model::{AllocationId, Resources};
use crate::report::CapacityReport;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What the pool held from `t` until the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// When this step begins.
    pub t: Micros,
    /// Allocated CPU, MCP server costs included.
    pub cpu_millicores: u64,
    /// Allocated memory, MCP server costs included.
    pub memory_mib: u64,
    /// Worker slots held.
    pub workers: u32,
    /// Active allocations.
    pub active: u32,
    /// Index into `totals`.
    pub totals: u32,
    /// Index into `server_sets` (`u32::MAX` in steps computed past the end of the log, which
    /// only ever feed integrals).
    pub servers: u32,
    /// The pool's worker total: it steps when a drained slot is freed, not only at config
    /// changes.
    pub total_workers: u32,
    /// Index into `drain_sets` (`u32::MAX` past the end of the log, like `servers`).
    pub drains: u32,
}

impl Step {
    fn same_value(&self, o: &Step) -> bool {
        (self.cpu_millicores, self.memory_mib, self.workers, self.active, self.totals, self.servers)
            == (o.cpu_millicores, o.memory_mib, o.workers, o.active, o.totals, o.servers)
            && (self.total_workers, self.drains) == (o.total_workers, o.drains)
    }
}

#[derive(Debug, Clone)]
struct Held {
    deadline_us: Micros,
    resources: Resources,
    /// Name ids of the MCP servers it uses.
    servers: Vec<u32>,
    /// The worker slots it holds (a drained one leaves the pool when it ends).
    slots: Box<[u32]>,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    refcount: u32,
    cpu_millicores: u64,
    memory_mib: u64,
}

/// The fold's view at the end of the indexed log, in holding-time.
#[derive(Debug, Clone, Default)]
struct Sweep {
    deadlines: BTreeSet<(Micros, AllocationId)>,
    active: HashMap<AllocationId, Held>,
    running: BTreeMap<u32, Running>,
    allocated: Resources,
    totals: u32,
    servers: u32,
    servers_changed: bool,
    /// The config's drained slots, and those of them an active allocation holds.
    drained: BTreeSet<u32>,
    draining: BTreeSet<u32>,
    /// Slots not removed from the pool.
    in_pool: u32,
    drains: u32,
    drains_changed: bool,
}

/// What the pool held over the whole log, for capacity-at-an-instant and usage queries
/// without replaying the log (see the module's docs).
#[derive(Debug, Clone, Default)]
pub struct CapacityIndex {
    /// `ts[i]` is the timestamp of the event with sequence number `i + 1`.
    ts: Vec<Micros>,
    steps: Vec<Step>,
    totals: Vec<Resources>,
    names: Vec<String>,
    name_ids: HashMap<String, u32>,
    server_sets: Vec<Box<[u32]>>,
    server_set_ids: HashMap<Box<[u32]>, u32>,
    /// Distinct (draining, drained) slot lists.
    drain_sets: Vec<DrainSet>,
    drain_set_ids: HashMap<DrainSet, u32>,
    sweep: Sweep,
    /// Every reservation recorded: so that a capacity query knows when none can be in force
    /// (the common case) and needs no state as of then.
    reservations: Vec<ReservationSpan>,
    /// When each job was first named by a reservation event (`reserved` or
    /// `reservation_rejected`): where its history begins if before its first allocation.
    first_reservation_of_job: HashMap<String, Micros>,
}

/// When a reservation was recorded, its window and when it was cancelled.
#[derive(Debug, Clone)]
struct ReservationSpan {
    id: crate::domain::reservation::ReservationId,
    recorded_us: Micros,
    start_us: Micros,
    end_us: Micros,
    cancelled_us: Option<Micros>,
}

/// The drained slots still held, and the idle ones, in slot order.
type DrainSet = (Box<[u32]>, Box<[u32]>);

impl CapacityIndex {
    /// An index of no events, ready to fold the log from its first event.
    pub(crate) fn new() -> Self {
        let mut ix = CapacityIndex::default();
        ix.server_sets.push(Box::new([]));
        ix.server_set_ids.insert(Box::new([]), 0);
        let none: DrainSet = (Box::new([]), Box::new([]));
        ix.drain_sets.push(none.clone());
        ix.drain_set_ids.insert(none, 0);
        ix
    }

    /// Sequence number of the last event folded in.
    pub(crate) fn last_seq(&self) -> u64 {
        self.ts.len() as u64
    }

    /// Timestamp of the first event (the ledger's creation).
    pub(crate) fn first_ts(&self) -> Option<Micros> {
        self.ts.first().copied()
    }

    /// The sequence number of the last event at or before `t` (0 if none).
    pub(crate) fn seq_at(&self, t: Micros) -> u64 {
        self.ts.partition_point(|&x| x <= t) as u64
    }

    /// The sequence number of the last event strictly before `t` (0 if none).
    pub(crate) fn seq_before(&self, t: Micros) -> u64 {
        self.ts.partition_point(|&x| x < t) as u64
    }

    /// Whether a reservation may be in force at `t`: one recorded by then whose window holds
    /// `t` and that was not cancelled before `t`. When false, none is (the state as of `t`
    /// would report none); when true, only that state can tell.
    pub(crate) fn reservation_may_be_in_force(&self, t: Micros) -> bool {
        self.reservations
            .iter()
            .any(|r| r.recorded_us <= t && r.start_us <= t && t < r.end_us && r.cancelled_us.is_none_or(|c| c >= t))
    }

    /// When a reservation event first named `job_id`, if one did.
    pub(crate) fn first_reservation_of_job(&self, job_id: &str) -> Option<Micros> {
        self.first_reservation_of_job.get(job_id).copied()
    }

    fn note_job_reservation(&mut self, job_id: Option<&str>, ts_us: Micros) {
        if let Some(job) = job_id {
            if !self.first_reservation_of_job.contains_key(job) {
                self.first_reservation_of_job.insert(job.to_string(), ts_us);
            }
        }
    }

    /// Every change of what the pool held, in time order.
    pub(crate) fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The pool's totals (its config, and the workers in the pool then) during `step`.
    pub(crate) fn totals_of(&self, step: &Step) -> Resources {
        Resources { workers: step.total_workers, ..self.totals[step.totals as usize] }
    }

    /// Approximate heap footprint, for the docs' numbers.
    pub fn approx_bytes(&self) -> usize {
        self.ts.capacity() * 8
            + self.steps.capacity() * std::mem::size_of::<Step>()
            + self.server_sets.iter().map(|s| s.len() * 4 + 16).sum::<usize>() * 2
            + self.names.iter().map(|n| n.len() + 48).sum::<usize>()
    }

    /// How many steps the index holds (for its size in reports and benchmarks).
    pub(crate) fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// Folds the event with sequence number `seq`. Returns false (and changes nothing) when
    /// `seq` is not the next one: the caller drops the index and it is rebuilt from the log.
    pub(crate) fn observe(&mut self, seq: u64, ts_us: Micros, body: &EventBody) -> bool {
        if seq != self.last_seq() + 1 || self.ts.last().is_some_and(|&l| ts_us <= l) {
            return false;
        }
        self.advance_to(ts_us);
        self.ts.push(ts_us);
        match body {
            EventBody::LedgerCreated { config, .. } | EventBody::ConfigChanged { config } => {
                let t = Resources {
                    cpu_millicores: config.total_cpu_millicores,
                    memory_mib: config.total_memory_mib,
                    workers: config.in_pool_slots(),
                };
                self.set_drained(config);
                self.sweep.totals = match self.totals.iter().position(|&x| x == t) {
                    Some(i) => i as u32,
                    None => {
                        self.totals.push(t);
                        (self.totals.len() - 1) as u32
                    }
                };
            }
            EventBody::Granted(g) => self.grant(g),
            EventBody::Rejected(_) | EventBody::Queued(_) | EventBody::Cancelled { .. } | EventBody::Preempting(_) => {}
            EventBody::Preempted(p) => self.end(p.allocation_id),
            // An expiry ended the holding at its deadline, which `advance_to` has passed.
            EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => {
                self.end(*allocation_id);
            }
            // Nothing changes hands at a renewal; the holding now ends at the new deadline.
            EventBody::Renewed(r) => self.renew(r.allocation_id, r.deadline_us),
            // A reservation holds nothing until an allocation does; its window is kept.
            EventBody::Reserved(r) => {
                self.note_job_reservation(r.job_id.as_deref(), ts_us);
                self.reservations.push(ReservationSpan {
                    id: r.reservation_id,
                    recorded_us: ts_us,
                    start_us: r.start_us,
                    end_us: r.end_us,
                    cancelled_us: None,
                });
            }
            EventBody::ReservationCancelled { reservation_id } => {
                if let Some(span) = self.reservations.iter_mut().rev().find(|r| r.id == *reservation_id) {
                    span.cancelled_us.get_or_insert(ts_us);
                }
            }
            EventBody::ReservationRejected(r) => self.note_job_reservation(r.job_id.as_deref(), ts_us),
        }
        self.push_step(ts_us);
        true
    }

    fn grant(&mut self, g: &Grant) {
        if self.sweep.active.contains_key(&g.allocation_id) {
            return;
        }
        let mut servers = Vec::with_capacity(g.mcp_servers.len());
        let mut charged = g.resources;
        for m in &g.mcp_servers {
            let id = match self.name_ids.get(&m.name) {
                Some(&id) => id,
                None => {
                    let id = self.names.len() as u32;
                    self.names.push(m.name.clone());
                    self.name_ids.insert(m.name.clone(), id);
                    id
                }
            };
            servers.push(id);
            let r = self.sweep.running.entry(id).or_insert(Running {
                refcount: 0,
                cpu_millicores: m.cpu_millicores,
                memory_mib: m.memory_mib,
            });
            if r.refcount == 0 {
                charged.cpu_millicores += r.cpu_millicores;
                charged.memory_mib += r.memory_mib;
                self.sweep.servers_changed = true;
            }
            r.refcount += 1;
        }
        self.sweep.allocated = self.sweep.allocated.checked_add(charged).unwrap_or(self.sweep.allocated);
        self.sweep.deadlines.insert((g.deadline_us, g.allocation_id));
        let slots = g.workers.iter().map(|w| w.slot).collect();
        self.sweep
            .active
            .insert(g.allocation_id, Held { deadline_us: g.deadline_us, resources: g.resources, servers, slots });
    }

    /// A config's pool: its drained slots, and which of them are held now.
    fn set_drained(&mut self, config: &crate::domain::config::Config) {
        let sweep = &mut self.sweep;
        sweep.in_pool = config.in_pool_slots();
        if sweep.drained.is_empty() && config.drained_workers.is_empty() {
            return;
        }
        sweep.drained.clone_from(&config.drained_workers);
        sweep.draining =
            sweep.active.values().flat_map(|h| h.slots.iter().copied()).filter(|s| sweep.drained.contains(s)).collect();
        sweep.drains_changed = true;
    }

    fn intern_drains(&mut self) -> u32 {
        let sweep = &self.sweep;
        let set: DrainSet =
            (sweep.draining.iter().copied().collect(), sweep.drained.difference(&sweep.draining).copied().collect());
        if let Some(&id) = self.drain_set_ids.get(&set) {
            return id;
        }
        let id = self.drain_sets.len() as u32;
        self.drain_sets.push(set.clone());
        self.drain_set_ids.insert(set, id);
        id
    }

    fn end(&mut self, id: AllocationId) {
        end_in(&mut self.sweep, id);
    }

    fn renew(&mut self, id: AllocationId, deadline_us: Micros) {
        let Some(held) = self.sweep.active.get_mut(&id) else { return };
        self.sweep.deadlines.remove(&(held.deadline_us, id));
        held.deadline_us = deadline_us;
        self.sweep.deadlines.insert((deadline_us, id));
    }

    /// Ends every holding whose deadline is at or before `t`, with a step at each deadline.
    fn advance_to(&mut self, t: Micros) {
        while let Some(&(d, id)) = self.sweep.deadlines.first() {
            if d > t {
                break;
            }
            self.end(id);
            self.push_step(d);
        }
    }

    fn intern_servers(&mut self) -> u32 {
        let mut set: Vec<u32> = self.sweep.running.keys().copied().collect();
        set.sort_by(|a, b| self.names[*a as usize].cmp(&self.names[*b as usize]));
        let set: Box<[u32]> = set.into();
        if let Some(&id) = self.server_set_ids.get(&set) {
            return id;
        }
        let id = self.server_sets.len() as u32;
        self.server_sets.push(set.clone());
        self.server_set_ids.insert(set, id);
        id
    }

    fn push_step(&mut self, t: Micros) {
        if self.sweep.servers_changed {
            self.sweep.servers = self.intern_servers();
            self.sweep.servers_changed = false;
        }
        if self.sweep.drains_changed {
            self.sweep.drains = self.intern_drains();
            self.sweep.drains_changed = false;
        }
        let step = step_of(&self.sweep, t);
        push(&mut self.steps, step);
    }

    /// Steps past the end of the indexed log up to `until`: the deadlines of allocations still
    /// active then (no event is written between the last one and now, so only these change
    /// anything). Their `servers` field is `u32::MAX`.
    pub(crate) fn tail_steps(&self, until: Micros) -> Vec<Step> {
        let mut sweep = self.sweep.clone();
        let mut out = Vec::new();
        while let Some(&(d, id)) = sweep.deadlines.first() {
            if d > until {
                break;
            }
            end_in(&mut sweep, id);
            let mut s = step_of(&sweep, d);
            s.servers = u32::MAX;
            s.drains = u32::MAX;
            push(&mut out, s);
        }
        out
    }

    /// The capacity report as of `t`, which must lie at or after the first event. Allocations
    /// whose deadline is at or before `t` no longer hold anything.
    pub(crate) fn capacity_at(&self, t: Micros) -> Option<CapacityReport> {
        let i = self.steps.partition_point(|s| s.t <= t).checked_sub(1)?;
        let step = &self.steps[i];
        let total = self.totals_of(step);
        let allocated =
            Resources { cpu_millicores: step.cpu_millicores, memory_mib: step.memory_mib, workers: step.workers };
        let running = self.server_sets[step.servers as usize].iter().map(|&n| self.names[n as usize].clone()).collect();
        let report = CapacityReport::new(total, allocated, running, u64::from(step.active), t, self.seq_at(t));
        let (draining, drained) = self.drain_sets.get(step.drains as usize).cloned().unwrap_or_default();
        let ids = |slots: &[u32]| slots.iter().map(|&s| crate::domain::config::worker_id_of(s)).collect();
        Some(CapacityReport { draining: ids(&draining), drained: ids(&drained), ..report })
    }
}

fn end_in(sweep: &mut Sweep, id: AllocationId) {
    let Some(held) = sweep.active.remove(&id) else { return };
    sweep.deadlines.remove(&(held.deadline_us, id));
    if !sweep.draining.is_empty() {
        for s in &held.slots {
            sweep.drains_changed |= sweep.draining.remove(s);
        }
    }
    let mut freed = held.resources;
    for n in &held.servers {
        if let Some(r) = sweep.running.get_mut(n) {
            r.refcount -= 1;
            if r.refcount == 0 {
                freed.cpu_millicores += r.cpu_millicores;
                freed.memory_mib += r.memory_mib;
                sweep.running.remove(n);
                sweep.servers_changed = true;
            }
        }
    }
    sweep.allocated = sweep.allocated.checked_sub(freed).unwrap_or_default();
}

fn step_of(sweep: &Sweep, t: Micros) -> Step {
    Step {
        t,
        cpu_millicores: sweep.allocated.cpu_millicores,
        memory_mib: sweep.allocated.memory_mib,
        workers: sweep.allocated.workers,
        active: sweep.active.len() as u32,
        totals: sweep.totals,
        servers: sweep.servers,
        total_workers: sweep.in_pool.saturating_sub((sweep.drained.len() - sweep.draining.len()) as u32),
        drains: sweep.drains,
    }
}

/// Appends `step`, merging it into the last one when they share an instant and dropping it
/// when it changes nothing.
fn push(steps: &mut Vec<Step>, step: Step) {
    if let Some(last) = steps.last_mut() {
        if last.t == step.t {
            *last = step;
            let n = steps.len();
            if n >= 2 && steps[n - 2].same_value(&steps[n - 1]) {
                steps.pop();
            }
            return;
        }
        if last.same_value(&step) {
            return;
        }
    }
    steps.push(step);
}
