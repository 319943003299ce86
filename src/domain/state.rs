//! The state fold: `evolve(state, event)` is pure and total, and the queries read the
//! projection as of an instant (allocations past their deadline read as expired before their
//! expiry event is written). Decisions are in `decide.rs`; the report views of the state
//! (capacity, details, lists) in `report.rs`.

use crate::domain::clock::Micros;
use crate::domain::config::Config;
use crate::domain::event::{EventBody, Grant, McpGrant, Rejection, Renewal, WorkerGrant};
use crate::domain::idempotency::{grant_fingerprint, rejection_fingerprint, KeyRecord, KeyTable, SharedKeys};
use crate::domain::model::{AllocationId, AllocationState, Metadata, Priority, Resources};
use crate::domain::quota::{TenantUse, NO_TENANT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Ended allocations evicted from memory, awaiting their drop elsewhere (moved as they sit in
/// the state's table: a pointer each).
pub(crate) type Graveyard = Vec<Arc<Allocation>>;

/// The order allocations are written in snapshots: oldest first.
pub fn sort_for_snapshot(allocations: &mut [Arc<Allocation>]) {
    // The keys are read once into a table that is sorted instead: comparing through the
    // pointers went to memory for each of a large state's allocations at every step.
    allocations.sort_by_cached_key(|a| (a.created_us, a.id));
}

/// Up to this many workers, [`slots_distinct`] compares pairs instead of building a set.
const PAIRWISE_SLOT_CHECK_MAX: usize = 16;

/// Whether no slot appears twice among `workers`; without a heap set for the usual handful.
fn slots_distinct(workers: &[WorkerGrant]) -> bool {
    if workers.len() <= PAIRWISE_SLOT_CHECK_MAX {
        workers.iter().enumerate().all(|(i, w)| workers[..i].iter().all(|v| v.slot != w.slot))
    } else {
        let mut seen = BTreeSet::new();
        workers.iter().all(|w| seen.insert(w.slot))
    }
}

/// One allocation as the fold knows it. Failed requests are kept too (state `failed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Its id.
    pub id: AllocationId,
    /// The job it is for.
    pub job_id: String,
    /// The request's priority.
    pub priority: Priority,
    /// Its state as of the last event folded in (see [`Allocation::state_at`]).
    pub state: AllocationState,
    /// The granted (or, if it failed, requested) lifetime.
    pub ttl_seconds: u64,
    /// When it was granted or rejected.
    pub created_us: Micros,
    /// When it expires unless released first (its creation time if it failed).
    pub deadline_us: Micros,
    /// When it was released, or the deadline it expired at.
    #[serde(default)]
    pub ended_us: Option<Micros>,
    /// Sequence number of the event that ended it (its rejection, release or expiry).
    #[serde(default)]
    pub ended_seq: Option<u64>,
    /// The slots it holds (none if it failed).
    #[serde(default)]
    pub workers: Vec<WorkerGrant>,
    /// Its MCP servers (with no endpoint if it failed).
    #[serde(default)]
    pub mcp_servers: Vec<McpGrant>,
    /// What its workers hold (a failed one: the workers it asked for).
    pub resources: Resources,
    /// The request's metadata.
    #[serde(default)]
    pub metadata: Metadata,
    /// Why the request failed (failed allocations only).
    #[serde(default)]
    pub error: Option<String>,
    /// Renewals never move the deadline past `created_us` + this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<u64>,
    /// How many times the lease was renewed (each a `renewed` event).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
    /// The tenant whose quota it counts against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Whether a higher priority may preempt it (`preemptible: false` in the request: no).
    #[serde(default = "crate::domain::preempt::yes", skip_serializing_if = "crate::domain::preempt::is_true")]
    pub preemptible: bool,
    /// Set by a `preempting` event: who preempts it and when its grace ends (kept once it is
    /// preempted; cleared if the preemption is withdrawn or it ends otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt: Option<crate::domain::preempt::PreemptMark>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Allocation {
    /// The allocation a grant creates (also used to rebuild one from the log).
    pub fn from_grant(ts_us: Micros, g: &Grant) -> Allocation {
        Self::from_grant_owned(ts_us, g.clone())
    }

    /// [`Allocation::from_grant`] taking the grant by value (replay owns its events).
    pub fn from_grant_owned(ts_us: Micros, g: Grant) -> Allocation {
        Allocation {
            id: g.allocation_id,
            job_id: g.job_id,
            priority: g.priority,
            state: AllocationState::Active,
            ttl_seconds: g.ttl_seconds,
            created_us: ts_us,
            deadline_us: g.deadline_us,
            ended_us: None,
            ended_seq: None,
            workers: g.workers,
            mcp_servers: g.mcp_servers,
            resources: g.resources,
            metadata: g.metadata,
            error: None,
            max_lifetime_seconds: g.max_lifetime_seconds,
            renewals: 0,
            tenant: g.tenant,
            preemptible: g.preemptible,
            preempt: None,
        }
    }

    /// The failed allocation a rejection records.
    pub fn from_rejection(seq: u64, ts_us: Micros, r: &Rejection) -> Allocation {
        Allocation {
            id: r.allocation_id,
            job_id: r.job_id.clone(),
            priority: r.priority,
            state: AllocationState::Failed,
            ttl_seconds: r.ttl_seconds,
            created_us: ts_us,
            deadline_us: ts_us,
            ended_us: Some(ts_us),
            ended_seq: Some(seq),
            workers: Vec::new(),
            mcp_servers: r
                .mcp_servers
                .iter()
                .map(|name| McpGrant {
                    name: name.clone(),
                    endpoint: String::new(),
                    cpu_millicores: 0,
                    memory_mib: 0,
                    assigned: false,
                    started: false,
                })
                .collect(),
            resources: Resources { workers: r.workers, ..Resources::default() },
            metadata: r.metadata.clone(),
            error: Some(r.error.clone()),
            max_lifetime_seconds: r.max_lifetime_seconds,
            renewals: 0,
            tenant: r.tenant.clone(),
            preemptible: true,
            preempt: None,
        }
    }

    /// The ended allocation a cancelled wait leaves (state `cancelled`, nothing held).
    pub fn from_cancel(seq: u64, ts_us: Micros, e: &crate::domain::queue::QueueEntry) -> Allocation {
        let q = &e.request;
        let waited = (ts_us - e.queued_us).max(0) / crate::domain::clock::MICROS_PER_SECOND;
        let r = Rejection {
            allocation_id: q.allocation_id,
            job_id: q.job_id.clone(),
            priority: q.priority,
            ttl_seconds: q.ttl_seconds,
            workers: q.workers,
            mcp_servers: q.mcp_servers.clone(),
            reason: crate::domain::event::RejectReason::Cancelled,
            needed: 0,
            available: 0,
            error: format!("cancelled after waiting {waited} s in the queue"),
            metadata: q.metadata.clone(),
            idempotency_key: None,
            max_lifetime_seconds: q.max_lifetime_seconds,
            tenant: q.tenant.clone(),
            quota: None,
        };
        Allocation { state: AllocationState::Cancelled, ..Allocation::from_rejection(seq, ts_us, &r) }
    }

    /// The latest deadline a renewal may give it (`None`: only `max_ttl_seconds` bounds each
    /// renewal).
    pub fn lifetime_end(&self) -> Option<Micros> {
        let seconds = i64::try_from(self.max_lifetime_seconds?).unwrap_or(i64::MAX);
        Some(self.created_us + seconds.saturating_mul(crate::domain::clock::MICROS_PER_SECOND))
    }

    /// Moves an active allocation's deadline (a renewal).
    pub fn renew(&mut self, deadline_us: Micros) {
        debug_assert_eq!(self.state, AllocationState::Active);
        self.deadline_us = deadline_us;
        self.renewals = self.renewals.saturating_add(1);
    }

    /// Moves an active allocation to a terminal state (a release, or an expiry at its deadline).
    pub fn end(&mut self, seq: u64, ended_us: Micros, to: AllocationState) {
        debug_assert!(self.state == AllocationState::Active && to.is_terminal());
        self.state = to;
        self.ended_us = Some(ended_us);
        self.ended_seq = Some(seq);
    }

    /// Terminal state as seen at `now`: an active allocation past its deadline reads as expired;
    /// one a preemption's grace runs for reads as `preempting`.
    pub fn state_at(&self, now: Micros) -> AllocationState {
        if self.state == AllocationState::Active && now >= self.deadline_us {
            AllocationState::Expired
        } else if self.state == AllocationState::Active && self.preempt.is_some() {
            AllocationState::Preempting
        } else {
            self.state
        }
    }

    /// Whether it holds its resources at `now` (`active` or `preempting`).
    pub fn holds_at(&self, now: Micros) -> bool {
        matches!(self.state_at(now), AllocationState::Active | AllocationState::Preempting)
    }

    /// End of the interval over which the allocation held resources.
    pub fn held_until(&self) -> Micros {
        match self.ended_us {
            Some(end) => end.min(self.deadline_us),
            None => self.deadline_us,
        }
    }
}

/// An MCP server some active allocation uses: started by the first, stopped with the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningServer {
    /// How many active allocations use it.
    pub refcount: u32,
    /// Where it listens.
    pub endpoint: String,
    /// CPU charged while it runs.
    pub cpu_millicores: u64,
    /// Memory charged while it runs.
    pub memory_mib: u64,
}

/// The part of the state written to snapshots; every index is rebuilt from it on load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateData {
    /// The ledger's identity.
    pub ledger_id: String,
    /// When the ledger was created.
    pub created_us: Micros,
    /// The config in force.
    pub config: Config,
    /// Sequence number of the last event the state holds.
    pub last_seq: u64,
    /// Timestamp of that event.
    pub last_ts_us: Micros,
    /// Every allocation in memory, oldest first.
    pub allocations: Vec<Allocation>,
    /// Ended allocations no longer kept in memory (they are in the log).
    #[serde(default)]
    pub evicted: u64,
    /// Endpoints given to MCP names outside the catalog, in the order they were assigned.
    pub assigned_mcp_endpoints: BTreeMap<String, String>,
    /// How many endpoints have been assigned (the next one takes the next port).
    pub assigned_mcp_count: u64,
    /// The idempotency keys within the window, oldest first (snapshot v4 stores them in its
    /// binary part).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idempotency_keys: Vec<KeyRecord>,
    /// The reservations in force or upcoming as of the last event, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<crate::domain::reservation::Reservation>,
    /// The requests waiting in the queue, in `queued` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<crate::domain::queue::QueueEntry>,
    /// The preemptions in grace, by preemptor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preemptions: Vec<crate::domain::preempt::PendingPreemption>,
}

/// The in-memory projection of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The ledger's identity, from its first event.
    pub ledger_id: String,
    /// When the ledger was created.
    pub created_us: Micros,
    /// The config in force.
    pub config: Config,
    /// Sequence number of the last event folded in (0 before the first).
    pub last_seq: u64,
    /// Timestamp of the last event folded in.
    pub last_ts_us: Micros,
    /// Behind pointers: the table stays small (16 bytes a slot) so its probes stay in cache,
    /// and a resize moves pointers instead of 200-byte entries. Shared (`Arc`) so a snapshot
    /// takes its copy under the lock by counting references, and encodes it outside; the fold
    /// copies an allocation only if it changes while a snapshot still holds it.
    allocations: HashMap<AllocationId, Arc<Allocation>>,
    /// Active allocations by deadline, for expiry.
    by_deadline: BTreeSet<(Micros, AllocationId)>,
    /// Owner of each worker slot.
    pub(super) slots: Vec<Option<AllocationId>>,
    /// Free slots below `config.worker_slots`, so a decision takes the lowest ones in O(log n).
    pub(super) free_slots: BTreeSet<u32>,
    pub(super) assigned_mcp_endpoints: BTreeMap<String, String>,
    pub(super) assigned_mcp_count: u64,
    pub(super) running: BTreeMap<String, RunningServer>,
    /// What active allocations and running MCP servers hold.
    pub(super) allocated: Resources,
    /// Ended allocations still in memory, by the sequence number that ended them.
    ended: BTreeMap<u64, AllocationId>,
    /// Ended allocations dropped from memory (beyond `config.terminal_retained`).
    evicted: u64,
    /// Idempotency keys decided within the config's window.
    pub(super) keys: KeyTable,
    /// What each tenant's active allocations hold (`quota::NO_TENANT` for those without one).
    tenants: BTreeMap<String, TenantUse>,
    /// Reservations in force or upcoming as of the last event (`domain/reservation.rs`).
    pub(super) reservations: crate::domain::reservation::Reservations,
    /// The requests waiting for capacity (`domain/queue.rs`).
    pub(super) queue: crate::domain::queue::Queue,
    /// Preemptions in grace, by preemptor (`domain/preempt.rs`).
    pub(super) preemptions: BTreeMap<AllocationId, crate::domain::preempt::PendingPreemption>,
    /// Events that did not apply cleanly (an anomaly counter; evolve never panics).
    pub anomalies: u64,
}

impl State {
    /// The state before the first event: nothing but a config.
    pub fn empty(config: Config) -> Self {
        let slots = vec![None; config.worker_slots as usize];
        let free_slots = (0..config.worker_slots).filter(|&i| config.grantable(i)).collect();
        State {
            ledger_id: String::new(),
            created_us: Micros::EPOCH,
            config,
            last_seq: 0,
            last_ts_us: Micros::EPOCH,
            allocations: HashMap::new(),
            by_deadline: BTreeSet::new(),
            slots,
            free_slots,
            assigned_mcp_endpoints: BTreeMap::new(),
            assigned_mcp_count: 0,
            running: BTreeMap::new(),
            allocated: Resources::default(),
            ended: BTreeMap::new(),
            evicted: 0,
            keys: KeyTable::default(),
            tenants: BTreeMap::new(),
            reservations: crate::domain::reservation::Reservations::default(),
            queue: crate::domain::queue::Queue::default(),
            preemptions: BTreeMap::new(),
            anomalies: 0,
        }
    }

    /// The pool: the config's totals, and the slots in it: every slot not removed, less the
    /// drained ones nobody holds (a drained slot still held counts until it is freed).
    pub fn total(&self) -> Resources {
        // Held slots plus grantable free ones is exactly that count (`check_invariants`
        // verifies it against the config), without walking the drained set.
        Resources {
            cpu_millicores: self.config.total_cpu_millicores,
            memory_mib: self.config.total_memory_mib,
            workers: self.allocated.workers + self.free_slot_count(),
        }
    }

    /// The drained slots as of `now`: those an allocation active at `now` still holds
    /// (draining), and the idle ones (drained), each in slot order.
    pub fn drained_slots_at(&self, now: Micros) -> (Vec<u32>, Vec<u32>) {
        let mut held = Vec::new();
        let mut idle = Vec::new();
        for &slot in &self.config.drained_workers {
            let holder = self.slot_owner(slot).and_then(|id| self.allocation(id));
            if holder.is_some_and(|a| a.state_at(now) == AllocationState::Active) {
                held.push(slot);
            } else {
                idle.push(slot);
            }
        }
        (held, idle)
    }

    /// What active allocations and running MCP servers hold, as folded (allocations past their deadline included until their expiry is written).
    pub fn allocated(&self) -> Resources {
        self.allocated
    }

    /// What is free, as folded.
    pub fn available(&self) -> Resources {
        // Saturating: a config change may shrink the pool below what is held.
        let t = self.total();
        Resources {
            cpu_millicores: t.cpu_millicores.saturating_sub(self.allocated.cpu_millicores),
            memory_mib: t.memory_mib.saturating_sub(self.allocated.memory_mib),
            workers: self.free_slot_count(),
        }
    }

    fn free_slot_count(&self) -> u32 {
        self.free_slots.len() as u32
    }

    /// The allocation `id`, if memory holds it.
    pub fn allocation(&self, id: AllocationId) -> Option<&Allocation> {
        self.allocations.get(&id).map(|a| &**a)
    }

    /// Every allocation memory holds, in no order.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values().map(|a| &**a)
    }

    /// How many ended allocations were dropped from memory; when it is 0 the state knows every
    /// allocation the ledger ever had.
    pub fn evicted_count(&self) -> u64 {
        self.evicted
    }

    /// How many allocations are active, as folded.
    pub fn active_count(&self) -> usize {
        self.by_deadline.len()
    }

    /// The allocation holding worker slot `slot`, if any.
    pub fn slot_owner(&self, slot: u32) -> Option<AllocationId> {
        self.slots.get(slot as usize).copied().flatten()
    }

    /// The MCP servers active allocations use, by name.
    pub fn running_servers(&self) -> &BTreeMap<String, RunningServer> {
        &self.running
    }

    /// Active allocations whose deadline is at or before `now`, earliest first.
    pub fn due_for_expiry(&self, now: Micros) -> Vec<(AllocationId, Micros)> {
        self.by_deadline.range(..=(now, AllocationId::from_u64(AllocationId::MAX))).map(|&(d, id)| (id, d)).collect()
    }

    /// Active allocations by deadline, earliest first (the queue's reserved start).
    pub(crate) fn active_by_deadline(&self) -> impl Iterator<Item = (Micros, &Allocation)> {
        self.by_deadline.iter().filter_map(|&(d, id)| self.allocations.get(&id).map(|a| (d, &**a)))
    }

    /// The earliest deadline of an active allocation.
    pub fn next_deadline(&self) -> Option<Micros> {
        self.by_deadline.iter().next().map(|&(d, _)| d)
    }

    // ----- evolve -----

    /// Folds one event into the state. Total: an event that does not fit (which a valid log
    /// never holds) is counted as an anomaly and otherwise ignored, never a panic.
    pub fn evolve(&mut self, seq: u64, ts_us: Micros, body: &EventBody) {
        self.evolve_owned(seq, ts_us, body.clone());
    }

    /// [`State::evolve`] taking the event by value, so its strings move into the state instead
    /// of being copied (replay and the write path own their events).
    pub fn evolve_owned(&mut self, seq: u64, ts_us: Micros, body: EventBody) {
        self.evolve_collecting(seq, ts_us, body, None);
    }

    /// A waiting request was cancelled: it leaves the queue and becomes an ended allocation
    /// (state `cancelled`). `false`: it was not waiting (an anomaly).
    fn apply_cancel(&mut self, seq: u64, ts_us: Micros, allocation_id: AllocationId) -> bool {
        let Some(e) = self.queue.remove(allocation_id) else { return false };
        self.end_preemption(allocation_id);
        self.ended.insert(seq, allocation_id);
        self.allocations.insert(allocation_id, Arc::new(Allocation::from_cancel(seq, ts_us, &e)));
        // A keyed retry of a cancelled wait is answered `cancelled`, not queued again.
        let key = e
            .request
            .idempotency_key
            .clone()
            .map(|k| (k, allocation_id, crate::domain::idempotency::queued_fingerprint(&e.request)));
        self.remember_key(key, seq, ts_us, Some(crate::domain::event::RejectReason::Cancelled));
        true
    }

    /// [`State::evolve_owned`] that hands ended allocations leaving memory to `graveyard`
    /// instead of dropping them: the parallel replay has them dropped by the decoder thread
    /// that allocated their strings, which most allocators free much faster than a free from
    /// another thread.
    pub(crate) fn evolve_collecting(
        &mut self,
        seq: u64,
        ts_us: Micros,
        body: EventBody,
        graveyard: Option<&mut Graveyard>,
    ) {
        debug_assert!(seq > self.last_seq, "sequence numbers increase");
        self.last_seq = seq;
        self.last_ts_us = ts_us;
        match body {
            EventBody::LedgerCreated { ledger_id, config } => {
                self.ledger_id = ledger_id;
                self.created_us = ts_us;
                self.apply_config(config);
            }
            EventBody::ConfigChanged { config } => self.apply_config(config),
            EventBody::Granted(mut g) => {
                // The allocation keeps no key: the table takes it (no copy of the string).
                let fingerprint = g.idempotency_key.is_some().then(|| grant_fingerprint(&g));
                let key = g.idempotency_key.take().zip(fingerprint).map(|(k, f)| (k, g.allocation_id, f));
                let id = g.allocation_id;
                if self.apply_grant(ts_us, g) {
                    self.queue.remove(id);
                    self.end_preemption(id);
                    self.remember_key(key, seq, ts_us, None);
                }
            }
            EventBody::Rejected(r) => {
                if self.apply_rejection(seq, ts_us, &r) {
                    self.queue.remove(r.allocation_id);
                    self.end_preemption(r.allocation_id);
                    let key =
                        r.idempotency_key.as_ref().map(|k| (k.clone(), r.allocation_id, rejection_fingerprint(&r)));
                    self.remember_key(key, seq, ts_us, Some(r.reason));
                }
            }
            EventBody::Renewed(r) => self.apply_renewal(&r),
            EventBody::Queued(q) => {
                if self.allocations.contains_key(&q.allocation_id) || !self.queue.push(seq, ts_us, q) {
                    self.anomalies += 1;
                }
            }
            EventBody::Cancelled { allocation_id } => {
                if !self.apply_cancel(seq, ts_us, allocation_id) {
                    self.anomalies += 1;
                }
            }
            EventBody::Released { allocation_id } => {
                self.unmark_victim(allocation_id);
                self.apply_end(seq, allocation_id, ts_us, AllocationState::Released);
            }
            EventBody::Expired { allocation_id, deadline_us } => {
                self.unmark_victim(allocation_id);
                self.apply_end(seq, allocation_id, deadline_us, AllocationState::Expired);
            }
            body @ (EventBody::Preempting(_) | EventBody::Preempted(_)) => {
                if !self.fold_preemption(seq, ts_us, body) {
                    self.anomalies += 1;
                }
            }
            reservation @ (EventBody::Reserved(_)
            | EventBody::ReservationRejected(_)
            | EventBody::ReservationCancelled { .. }) => {
                if !self.fold_reservation(&reservation) {
                    self.anomalies += 1;
                }
            }
        }
        self.forget_reservations_over(ts_us);
        self.evict_ended(graveyard);
        self.keys.forget_older(ts_us, self.config.idempotency_window_seconds);
        debug_assert!(self.check_invariants().is_ok(), "{:?}", self.check_invariants());
    }

    /// A `preempting` or `preempted` event; `false` if it does not apply (an anomaly).
    fn fold_preemption(&mut self, seq: u64, ts_us: Micros, body: EventBody) -> bool {
        match body {
            EventBody::Preempting(p) => self.apply_preempting(seq, ts_us, p),
            EventBody::Preempted(p) => self.apply_preempted(seq, ts_us, &p),
            _ => false,
        }
    }

    /// A `preempting` event: the preemptor joins the queue and its victims (active,
    /// preemptible, not preempted already) are marked; `false` (nothing applied) otherwise.
    fn apply_preempting(&mut self, seq: u64, ts_us: Micros, p: crate::domain::preempt::Preempting) -> bool {
        let mark = crate::domain::preempt::PreemptMark { by: p.preemptor, deadline_us: p.deadline_us };
        let victims: BTreeSet<AllocationId> = p.victims.iter().copied().collect();
        let valid = victims.len() == p.victims.len()
            && p.request.allocation_id == p.preemptor
            && !self.allocations.contains_key(&p.preemptor)
            && self.queue.get(p.preemptor).is_none()
            && victims.iter().all(|v| {
                self.allocation(*v).is_some_and(|a| {
                    a.state == AllocationState::Active
                        && a.preemptible
                        && a.preempt.is_none()
                        && a.priority < p.priority
                })
            });
        if !valid {
            return false;
        }
        for v in &victims {
            if let Some(shared) = self.allocations.get_mut(v) {
                Arc::make_mut(shared).preempt = Some(mark);
            }
        }
        let cfg = &self.config;
        let n = p.request.workers;
        let workers = Resources {
            workers: n,
            cpu_millicores: cfg.worker_cpu_millicores * u64::from(n),
            memory_mib: cfg.worker_memory_mib * u64::from(n),
        };
        let pending = crate::domain::preempt::PendingPreemption {
            preemptor: p.preemptor,
            job_id: p.job_id,
            priority: p.priority,
            victims,
            deadline_us: p.deadline_us,
            grace_seconds: p.grace_seconds,
            workers,
        };
        self.preemptions.insert(p.preemptor, pending);
        self.queue.push(seq, ts_us, p.request)
    }

    /// A `preempted` event: the victim (active) ends, holding its resources until now.
    fn apply_preempted(&mut self, seq: u64, ts_us: Micros, p: &crate::domain::preempt::Preempted) -> bool {
        let Some(a) = self.allocation(p.allocation_id) else { return false };
        if a.state != AllocationState::Active || a.preempt.is_some_and(|m| m.by != p.preemptor) {
            return false;
        }
        if let Some(pending) = self.preemptions.get_mut(&p.preemptor) {
            pending.victims.remove(&p.allocation_id);
        }
        self.apply_end(seq, p.allocation_id, ts_us, AllocationState::Preempted);
        // The ended allocation keeps who preempted it, and when (as a rebuild from the log does).
        if let Some(shared) = self.allocations.get_mut(&p.allocation_id) {
            Arc::make_mut(shared).preempt =
                Some(crate::domain::preempt::PreemptMark { by: p.preemptor, deadline_us: ts_us });
        }
        true
    }

    /// An active victim in grace that ends otherwise (released, expired) leaves its preemption.
    fn unmark_victim(&mut self, id: AllocationId) {
        // The release and expiry path: nothing to look up while no preemption is in grace.
        if self.preemptions.is_empty() {
            return;
        }
        let Some(shared) = self.allocations.get_mut(&id) else { return };
        let Some(mark) = shared.preempt.filter(|_| shared.state == AllocationState::Active) else { return };
        Arc::make_mut(shared).preempt = None;
        if let Some(p) = self.preemptions.get_mut(&mark.by) {
            p.victims.remove(&id);
        }
    }

    /// The preemptor `id` left the queue (granted, timed out, cancelled): its preemption ends
    /// and the victims still holding are `active` again.
    fn end_preemption(&mut self, id: AllocationId) {
        let Some(p) = self.preemptions.remove(&id) else { return };
        for v in p.victims {
            if let Some(shared) = self.allocations.get_mut(&v) {
                Arc::make_mut(shared).preempt = None;
            }
        }
    }

    /// The preemptions agree with the marks on their victims and with the queue.
    fn check_preemptions(&self) -> std::result::Result<(), String> {
        let mut marked = 0usize;
        for a in self.allocations.values().filter(|a| a.state == AllocationState::Active) {
            if let Some(m) = a.preempt {
                marked += 1;
                if !self
                    .preemptions
                    .get(&m.by)
                    .is_some_and(|p| p.victims.contains(&a.id) && p.deadline_us == m.deadline_us)
                {
                    return Err(format!("{} is marked preempting by {} which does not list it", a.id, m.by));
                }
            }
        }
        let listed: usize = self.preemptions.values().map(|p| p.victims.len()).sum();
        if listed != marked {
            return Err(format!("preemptions list {listed} victims but {marked} are marked"));
        }
        if let Some(p) = self.preemptions.values().find(|p| self.queue.get(p.preemptor).is_none()) {
            return Err(format!("preemptor {} is not in the queue", p.preemptor));
        }
        Ok(())
    }

    /// Records the idempotency key of the request event `seq` decided, if it had one.
    fn remember_key(
        &mut self,
        key: Option<(Arc<str>, AllocationId, u64)>,
        seq: u64,
        ts_us: Micros,
        rejected: Option<crate::domain::event::RejectReason>,
    ) {
        if let Some((key, allocation_id, fingerprint)) = key {
            self.keys.insert(KeyRecord { key, ts_us, seq, allocation_id, rejected, fingerprint });
        }
    }

    /// The idempotency keys remembered now.
    pub fn idempotency_key_count(&self) -> usize {
        self.keys.len()
    }

    /// What `tenant`'s active allocations hold now.
    pub fn tenant_use(&self, tenant: Option<&str>) -> TenantUse {
        self.tenants.get(tenant.unwrap_or(NO_TENANT)).cloned().unwrap_or_default()
    }

    /// Every tenant holding something now, by name.
    pub fn tenants_in_use(&self) -> &BTreeMap<String, TenantUse> {
        &self.tenants
    }

    /// Counts `a` (active) toward its tenant's use.
    fn charge_tenant(tenants: &mut BTreeMap<String, TenantUse>, a: &Allocation) {
        let names = a.mcp_servers.iter().map(|m| m.name.as_str());
        let key = a.tenant.as_deref().unwrap_or(NO_TENANT);
        // Looked up before inserting: the hot path (a tenant that holds something already)
        // allocates no key.
        match tenants.get_mut(key) {
            Some(u) => u.add(a.resources, names),
            None => {
                let mut u = TenantUse::default();
                u.add(a.resources, names);
                tenants.insert(key.to_string(), u);
            }
        }
    }

    /// Heap bytes the idempotency key table holds (for the memory bound in docs/benchmarks.md).
    pub fn idempotency_heap_bytes(&self) -> usize {
        self.keys.heap_bytes()
    }

    /// The record of an idempotency key decided within the window before `now`.
    pub fn idempotency_key(&self, key: &str, now: Micros) -> Option<KeyRecord> {
        self.keys.get(key, now, self.config.idempotency_window_seconds)
    }

    /// Drops the oldest ended allocations beyond `terminal_retained` (they stay in the log).
    fn evict_ended(&mut self, mut graveyard: Option<&mut Graveyard>) {
        while self.ended.len() as u64 > self.config.terminal_retained {
            let Some((_, id)) = self.ended.pop_first() else { break };
            if let (Some(a), Some(g)) = (self.allocations.remove(&id), graveyard.as_deref_mut()) {
                g.push(a);
            }
            self.evicted += 1;
        }
    }

    fn apply_config(&mut self, config: Config) {
        // The ledger writes only configs that validate; one that does not (say, billions of
        // worker slots) is an anomaly and is not applied.
        // Nor does it write one that takes away what active allocations hold.
        let n = config.worker_slots as usize;
        if config.validate().is_err()
            || (n < self.slots.len() && self.slots[n..].iter().any(Option::is_some))
            || config.removed_workers.iter().any(|&i| self.slot_owner(i).is_some())
            || config.total_cpu_millicores < self.allocated.cpu_millicores
            || config.total_memory_mib < self.allocated.memory_mib
        {
            self.anomalies += 1;
            return;
        }
        self.slots.resize(n.max(self.slots.iter().rposition(Option::is_some).map_or(0, |p| p + 1)), None);
        self.free_slots = (0..n as u32).filter(|&i| self.slots[i as usize].is_none() && config.grantable(i)).collect();
        self.config = config;
    }

    fn apply_grant(&mut self, ts_us: Micros, g: Grant) -> bool {
        // A grant must agree with itself (one entry per slot, as many slots as it says it holds)
        // and with the state (every slot free, the pool big enough for what it charges); one
        // that does not is an anomaly, not applied.
        let mut starting = BTreeSet::new();
        let mut charge = Some(g.resources);
        for m in &g.mcp_servers {
            if !self.running.contains_key(&m.name) && starting.insert(m.name.as_str()) {
                let cost = Resources { cpu_millicores: m.cpu_millicores, memory_mib: m.memory_mib, workers: 0 };
                charge = charge.and_then(|c| c.checked_add(cost));
            }
        }
        let fits = charge.and_then(|c| self.allocated.checked_add(c)).is_some_and(|after| {
            after.cpu_millicores <= self.config.total_cpu_millicores && after.memory_mib <= self.config.total_memory_mib
        });
        if self.allocations.contains_key(&g.allocation_id)
            || !fits
            || g.resources.workers as usize != g.workers.len()
            || !slots_distinct(&g.workers)
            || g.workers
                .iter()
                .any(|w| self.slots.get(w.slot as usize) != Some(&None) || !self.config.grantable(w.slot))
        {
            self.anomalies += 1;
            return false;
        }
        for w in &g.workers {
            self.slots[w.slot as usize] = Some(g.allocation_id);
            self.free_slots.remove(&w.slot);
        }
        let mut charged = g.resources;
        for m in &g.mcp_servers {
            if m.assigned && !self.assigned_mcp_endpoints.contains_key(&m.name) {
                self.assigned_mcp_endpoints.insert(m.name.clone(), m.endpoint.clone());
                self.assigned_mcp_count += 1;
            }
            if !self.running.contains_key(&m.name) {
                let server = RunningServer {
                    refcount: 0,
                    endpoint: m.endpoint.clone(),
                    cpu_millicores: m.cpu_millicores,
                    memory_mib: m.memory_mib,
                };
                self.running.insert(m.name.clone(), server);
            }
            let Some(entry) = self.running.get_mut(&m.name) else {
                debug_assert!(false, "inserted above");
                continue;
            };
            if entry.refcount == 0 {
                charged.cpu_millicores += entry.cpu_millicores;
                charged.memory_mib += entry.memory_mib;
            }
            entry.refcount += 1;
        }
        self.allocated = self.allocated.checked_add(charged).unwrap_or_else(|| {
            self.anomalies += 1;
            self.allocated
        });
        self.by_deadline.insert((g.deadline_us, g.allocation_id));
        let a = Allocation::from_grant_owned(ts_us, g);
        Self::charge_tenant(&mut self.tenants, &a);
        self.allocations.insert(a.id, Arc::new(a));
        true
    }

    fn apply_rejection(&mut self, seq: u64, ts_us: Micros, r: &Rejection) -> bool {
        if self.allocations.contains_key(&r.allocation_id) {
            self.anomalies += 1;
            return false;
        }
        self.ended.insert(seq, r.allocation_id);
        self.allocations.insert(r.allocation_id, Arc::new(Allocation::from_rejection(seq, ts_us, r)));
        true
    }

    /// A renewal moves an active allocation's deadline (and its place in the expiry order);
    /// one of an allocation that is not active, or that does not say the deadline it moves
    /// from, is an anomaly.
    fn apply_renewal(&mut self, r: &Renewal) {
        let Some(shared) = self.allocations.get_mut(&r.allocation_id) else {
            self.anomalies += 1;
            return;
        };
        if shared.state != AllocationState::Active || shared.deadline_us != r.previous_deadline_us {
            self.anomalies += 1;
            return;
        }
        let a = Arc::make_mut(shared);
        self.by_deadline.remove(&(a.deadline_us, a.id));
        a.renew(r.deadline_us);
        self.by_deadline.insert((a.deadline_us, a.id));
    }

    fn apply_end(&mut self, seq: u64, id: AllocationId, ended_us: Micros, to: AllocationState) {
        let Some(shared) = self.allocations.get_mut(&id) else {
            self.anomalies += 1;
            return;
        };
        if shared.state != AllocationState::Active {
            // Terminal states never change.
            self.anomalies += 1;
            return;
        }
        let a = Arc::make_mut(shared);
        a.end(seq, ended_us, to);
        self.ended.insert(seq, id);
        self.by_deadline.remove(&(a.deadline_us, id));
        for w in &a.workers {
            if let Some(s) = self.slots.get_mut(w.slot as usize) {
                if *s == Some(id) {
                    *s = None;
                    // A drained slot leaves the pool here: it is not free again.
                    if self.config.grantable(w.slot) {
                        self.free_slots.insert(w.slot);
                    }
                }
            }
        }
        let key = a.tenant.as_deref().unwrap_or(NO_TENANT);
        if let Some(t) = self.tenants.get_mut(key) {
            t.remove(a.resources, a.mcp_servers.iter().map(|m| m.name.as_str()));
            if t.is_empty() {
                self.tenants.remove(key);
            }
        }
        let mut freed = a.resources;
        for m in &a.mcp_servers {
            if let Some(r) = self.running.get_mut(&m.name) {
                r.refcount -= 1;
                if r.refcount == 0 {
                    freed.cpu_millicores += r.cpu_millicores;
                    freed.memory_mib += r.memory_mib;
                    self.running.remove(&m.name);
                }
            }
        }
        match self.allocated.checked_sub(freed) {
            Some(left) => self.allocated = left,
            None => {
                self.anomalies += 1;
                self.allocated = Resources::default();
            }
        }
    }

    /// Cross-checks every index against the allocations; used by tests, debug builds and snapshot
    /// loading.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut held = Resources::default();
        let mut slot_seen = vec![None; self.slots.len()];
        let mut running: BTreeMap<&str, u32> = BTreeMap::new();
        let mut active = 0usize;
        for a in self.allocations.values() {
            if a.state != AllocationState::Active {
                match a.ended_seq {
                    Some(seq) if self.ended.get(&seq) == Some(&a.id) => {}
                    _ => return Err(format!("ended allocation {} is missing from the ended index", a.id)),
                }
                continue;
            }
            active += 1;
            if !self.by_deadline.contains(&(a.deadline_us, a.id)) {
                return Err(format!("{} missing from the deadline index", a.id));
            }
            held = held.checked_add(a.resources).ok_or("overflow")?;
            for w in &a.workers {
                match slot_seen.get_mut(w.slot as usize) {
                    Some(s @ None) => *s = Some(a.id),
                    Some(Some(other)) => return Err(format!("slot {} held by {} and {}", w.slot, other, a.id)),
                    None => return Err(format!("slot {} out of range", w.slot)),
                }
            }
            for m in &a.mcp_servers {
                *running.entry(m.name.as_str()).or_default() += 1;
            }
        }
        if self.ended.len() + active != self.allocations.len() {
            return Err("the ended index disagrees with the allocations".into());
        }
        if active != self.by_deadline.len() {
            return Err(format!("{} active but {} in the deadline index", active, self.by_deadline.len()));
        }
        if slot_seen != self.slots {
            return Err("slot table disagrees with the allocations".into());
        }
        self.check_pool_slots()?;
        for (name, r) in &self.running {
            if running.get(name.as_str()) != Some(&r.refcount) {
                return Err(format!("MCP server {name} refcount {} is wrong", r.refcount));
            }
            held.cpu_millicores += r.cpu_millicores;
            held.memory_mib += r.memory_mib;
        }
        if running.len() != self.running.len() {
            return Err("running MCP servers disagree with the allocations".into());
        }
        self.check_tenants()?;
        self.queue.check()?;
        self.check_preemptions()?;
        if let Some(e) = self.queue.entries().iter().find(|e| self.allocations.contains_key(&e.request.allocation_id)) {
            return Err(format!("{} is both queued and an allocation", e.request.allocation_id));
        }
        held.workers = self.slots.iter().filter(|s| s.is_some()).count() as u32;
        if held != self.allocated {
            return Err(format!("allocated {:?} but allocations hold {:?}", self.allocated, held));
        }
        let a = self.allocated;
        let v = self.available();
        if self.anomalies == 0
            && (a.cpu_millicores + v.cpu_millicores != self.config.total_cpu_millicores
                || a.memory_mib + v.memory_mib != self.config.total_memory_mib)
        {
            return Err("allocated + available != total".into());
        }
        Ok(())
    }

    /// The free-slot set, the removed slots (never held) and the pool's worker count agree
    /// with the slot table and the config.
    fn check_pool_slots(&self) -> std::result::Result<(), String> {
        let free: BTreeSet<u32> = (0..self.config.worker_slots.min(self.slots.len() as u32))
            .filter(|&i| self.slots[i as usize].is_none() && self.config.grantable(i))
            .collect();
        if free != self.free_slots {
            return Err("free-slot set disagrees with the slot table".into());
        }
        if let Some(slot) = self.config.removed_workers.iter().find(|&&i| self.slot_owner(i).is_some()) {
            return Err(format!("removed slot {slot} is held"));
        }
        let held_drained = self.config.drained_workers.iter().filter(|&&i| self.slot_owner(i).is_some()).count();
        let pool = self.config.pool_workers(held_drained);
        if self.allocated.workers + self.available().workers != pool || self.total().workers != pool {
            return Err(format!("allocated + available workers != the pool's {pool}"));
        }
        Ok(())
    }

    /// The per-tenant use equals what the active allocations hold, tenant by tenant.
    fn check_tenants(&self) -> std::result::Result<(), String> {
        let mut tenants = BTreeMap::new();
        for a in self.allocations.values().filter(|a| a.state == AllocationState::Active) {
            Self::charge_tenant(&mut tenants, a);
        }
        if tenants != self.tenants {
            return Err("per-tenant use disagrees with the active allocations".into());
        }
        Ok(())
    }

    // ----- snapshots -----

    /// The state as snapshot data, allocations oldest first.
    pub fn to_data(&self) -> StateData {
        let (mut data, mut shared) = self.snapshot_parts();
        sort_for_snapshot(&mut shared);
        data.allocations = shared.iter().map(|a| (**a).clone()).collect();
        data
    }

    /// What a snapshot needs, cheaply (under the ledger's lock): everything but the
    /// allocations in `StateData`, and the allocations shared, in no order (see
    /// `sort_for_snapshot`).
    pub fn snapshot_parts(&self) -> (StateData, Vec<Arc<Allocation>>) {
        let (mut data, shared, keys) = self.snapshot_parts_shared();
        data.idempotency_keys = keys.records();
        (data, shared)
    }

    /// [`State::snapshot_parts`] with the idempotency keys left out of the data and shared
    /// instead (a pointer per chunk): the ledger reads them into the data outside its lock, a
    /// busy window's keys being as many as its allocations.
    pub fn snapshot_parts_shared(&self) -> (StateData, Vec<Arc<Allocation>>, SharedKeys) {
        let shared: Vec<Arc<Allocation>> = self.allocations.values().cloned().collect();
        let data = StateData {
            ledger_id: self.ledger_id.clone(),
            created_us: self.created_us,
            config: self.config.clone(),
            last_seq: self.last_seq,
            last_ts_us: self.last_ts_us,
            allocations: Vec::new(),
            evicted: self.evicted,
            assigned_mcp_endpoints: self.assigned_mcp_endpoints.clone(),
            assigned_mcp_count: self.assigned_mcp_count,
            idempotency_keys: Vec::new(),
            reservations: self.reservations.list(),
            queue: self.queue.entries(),
            preemptions: self.preemptions.values().cloned().collect(),
        };
        (data, shared, self.keys.shared())
    }

    /// Rebuilds every index from snapshot data and checks the invariants.
    pub fn from_data(mut data: StateData) -> std::result::Result<State, String> {
        let allocations = std::mem::take(&mut data.allocations);
        let mut loader = StateLoader::new(data, allocations.len())?;
        for a in allocations {
            loader.add(a)?;
        }
        loader.finish()
    }

    // ----- queries -----

    /// Resources and servers that allocations past their deadline at `now` still hold in the
    /// fold but no longer hold in truth.
    pub(crate) fn pending_expiry_effect(&self, now: Micros) -> (Resources, BTreeMap<&str, u32>, usize) {
        let mut freed = Resources::default();
        let mut stopped: BTreeMap<&str, u32> = BTreeMap::new();
        let mut count = 0;
        for &(_, id) in self.by_deadline.range(..=(now, AllocationId::from_u64(AllocationId::MAX))) {
            let a = &self.allocations[&id];
            count += 1;
            freed = freed.checked_add(a.resources).unwrap_or(freed);
            for m in &a.mcp_servers {
                *stopped.entry(m.name.as_str()).or_default() += 1;
            }
        }
        (freed, stopped, count)
    }
}

/// Rebuilds a state from snapshot data one allocation at a time, so a decoder can hand each
/// over as it reads it instead of holding them all in a list first (that list would double
/// the memory a large state takes while it loads). Every index is rebuilt and checked.
pub struct StateLoader {
    s: State,
}

impl StateLoader {
    /// `data.allocations` is ignored; `expected` sizes the table.
    pub fn new(data: StateData, expected: usize) -> std::result::Result<StateLoader, String> {
        data.config.validate().map_err(|e| e.to_string())?;
        let mut s = State::empty(data.config);
        s.ledger_id = data.ledger_id;
        s.created_us = data.created_us;
        s.last_seq = data.last_seq;
        s.last_ts_us = data.last_ts_us;
        s.assigned_mcp_endpoints = data.assigned_mcp_endpoints;
        s.assigned_mcp_count = data.assigned_mcp_count;
        s.evicted = data.evicted;
        s.keys = KeyTable::from_records(data.idempotency_keys)?;
        s.reservations = crate::domain::reservation::Reservations::from_list(data.reservations);
        for e in data.queue {
            if !s.queue.push(e.seq, e.queued_us, e.request) {
                return Err("a request is queued twice".into());
            }
        }
        s.preemptions = data.preemptions.into_iter().map(|p| (p.preemptor, p)).collect();
        s.allocations.reserve(expected.min(1 << 24));
        Ok(StateLoader { s })
    }

    pub fn add(&mut self, a: Allocation) -> std::result::Result<(), String> {
        let s = &mut self.s;
        if s.allocations.contains_key(&a.id) {
            return Err(format!("allocation {} appears twice", a.id));
        }
        if a.state == AllocationState::Active {
            let mut charged = a.resources;
            for w in &a.workers {
                match s.slots.get_mut(w.slot as usize) {
                    Some(slot @ None) if !s.config.removed_workers.contains(&w.slot) => {
                        *slot = Some(a.id);
                        s.free_slots.remove(&w.slot);
                    }
                    _ => return Err(format!("slot {} of {} is taken or out of range", w.slot, a.id)),
                }
            }
            for m in &a.mcp_servers {
                let r = s.running.entry(m.name.clone()).or_insert_with(|| RunningServer {
                    refcount: 0,
                    endpoint: m.endpoint.clone(),
                    cpu_millicores: m.cpu_millicores,
                    memory_mib: m.memory_mib,
                });
                if r.refcount == 0 {
                    let cost = Resources { cpu_millicores: r.cpu_millicores, memory_mib: r.memory_mib, workers: 0 };
                    charged = charged.checked_add(cost).ok_or("MCP server costs overflow")?;
                }
                r.refcount = r.refcount.checked_add(1).ok_or("MCP server refcount overflows")?;
            }
            s.allocated = s.allocated.checked_add(charged).ok_or("overflow")?;
            s.by_deadline.insert((a.deadline_us, a.id));
            State::charge_tenant(&mut s.tenants, &a);
        } else {
            let seq = a.ended_seq.ok_or_else(|| format!("ended allocation {} has no ended_seq", a.id))?;
            if s.ended.insert(seq, a.id).is_some() {
                return Err(format!("two allocations ended at sequence number {seq}"));
            }
            if s.ended.len() as u64 > s.config.terminal_retained {
                return Err("more ended allocations than terminal_retained".into());
            }
        }
        s.allocations.insert(a.id, Arc::new(a));
        Ok(())
    }

    /// The idempotency keys (oldest first), when they are read after the allocations.
    pub fn set_idempotency_keys(&mut self, records: Vec<KeyRecord>) -> std::result::Result<(), String> {
        self.s.keys = KeyTable::from_records(records)?;
        Ok(())
    }

    pub fn finish(self) -> std::result::Result<State, String> {
        self.s.check_invariants()?;
        Ok(self.s)
    }
}
