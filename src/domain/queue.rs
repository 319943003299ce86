//! The fair pending queue: requests that asked to wait (`wait: true`) and did not fit wait here,
//! and are granted in order as capacity frees.
//!
//! - **Order**: priority first, FIFO within a priority. One FIFO per priority (a `BTreeMap` by
//!   the `queued` event's sequence number); the queue's order is the merge of the four heads by
//!   *effective* priority, then by age. Nothing is re-sorted per decision.
//! - **Aging**: after every `queue.aging_seconds` of waiting a request's effective priority rises
//!   one level, up to `critical`; computed from its enqueue time when compared, never stored.
//!   Bound: a request of priority `p` waits behind later arrivals for at most
//!   `(3 - rank(p)) * aging_seconds` (rank: low 0 .. critical 3); after that only requests that
//!   arrived before it are ahead of it.
//! - **Backfill** (Slurm's rule): the head's *reserved start* is the earliest active deadline by
//!   which enough would be free for it. A later request may start now only if it fits now and
//!   either ends (by its TTL) by the reserved start, or fits beside the head (what is free at the
//!   reserved start, less what the head needs, still covers it). At most `queue.backfill_depth`
//!   requests after the head are tried per decision (Slurm's `bf_max_job_test`), so a decision
//!   costs the same with 10 or 10,000 waiting. The reserved start counts workers, CPU and memory
//!   held by allocations; MCP server start costs are charged when a grant is made.
//!
//! Every outcome is an event (`queued`, `granted` with `queued_seq`, `rejected` with reason
//! `queue_timeout`, `cancelled`); replay folds them and never decides again.

use crate::domain::clock::{Micros, MICROS_PER_SECOND};
use crate::domain::decide::{place, price, price_queued, quota_rejection, shortfall, take_slots, Cost, Shortfall};
use crate::domain::event::{EventBody, Grant, RejectReason, Rejection};
use crate::domain::input::{validate, ResourceRequest};
use crate::domain::model::{AllocationId, Metadata, Priority, Resources};
use crate::domain::state::State;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// How the queue behaves (config field `queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// How long a request waits when it names no `queue_timeout_seconds`.
    pub default_timeout_seconds: u64,
    /// The longest wait a request may ask for.
    pub max_timeout_seconds: u64,
    /// A waiting request's effective priority rises one level per this many seconds (0: no
    /// aging).
    pub aging_seconds: u64,
    /// Requests after the head tried for backfill per decision.
    pub backfill_depth: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            default_timeout_seconds: 300,
            max_timeout_seconds: 86_400,
            aging_seconds: 300,
            backfill_depth: 64,
        }
    }
}

impl QueueConfig {
    /// Whether it is the default (the config then leaves it out of its JSON).
    pub fn is_default(&self) -> bool {
        *self == QueueConfig::default()
    }

    /// Checks the fields; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.max_timeout_seconds == 0 || self.max_timeout_seconds > 30 * 86_400 {
            return Err(Error::invalid("config.queue.max_timeout_seconds", "must lie between 1 and 2592000 (30 days)"));
        }
        if self.default_timeout_seconds == 0 || self.default_timeout_seconds > self.max_timeout_seconds {
            return Err(Error::invalid(
                "config.queue.default_timeout_seconds",
                format!("must lie between 1 and max_timeout_seconds ({})", self.max_timeout_seconds),
            ));
        }
        if self.aging_seconds > 30 * 86_400 {
            return Err(Error::invalid("config.queue.aging_seconds", "must be at most 2592000 (30 days)"));
        }
        if self.backfill_depth > 10_000 {
            return Err(Error::invalid("config.queue.backfill_depth", "must be at most 10000"));
        }
        Ok(())
    }

    fn aging_us(&self) -> i64 {
        i64::try_from(self.aging_seconds).unwrap_or(i64::MAX).saturating_mul(MICROS_PER_SECOND)
    }

    /// The aging bound for `priority`: after this long waiting, only earlier arrivals are ahead.
    pub fn aging_bound_seconds(&self, priority: Priority) -> u64 {
        u64::from(3 - rank(priority)) * self.aging_seconds
    }
}

/// A request that waits: recorded whole, so the grant that ends the wait needs nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// The allocation id it will have (granted or not).
    pub allocation_id: AllocationId,
    /// The job it is for.
    pub job_id: String,
    /// Its priority (the effective one rises with aging).
    pub priority: Priority,
    /// The lifetime it gets once granted.
    pub ttl_seconds: u64,
    /// Workers asked for.
    pub workers: u32,
    /// MCP servers asked for, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<String>,
    /// The request's metadata.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// The caller's retry key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<Arc<str>>,
    /// The lifetime bound across renewals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<u64>,
    /// The tenant it counts against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// When it is rejected with reason `queue_timeout` unless granted or cancelled first.
    pub timeout_us: Micros,
    /// Its place in the queue when it joined (1 = the head).
    pub position: u64,
    /// How many of those ahead of it had a higher effective priority.
    pub behind_higher: u64,
    /// Why it waits, in words (which resource is short, or who is ahead).
    pub waiting_reason: String,
    /// Whether the allocation may be preempted once granted (written only when `false`).
    #[serde(default = "crate::domain::preempt::yes", skip_serializing_if = "crate::domain::preempt::is_true")]
    pub preemptible: bool,
}

/// One waiting request: its `queued` event and where that sits in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// Sequence number of its `queued` event (the FIFO order).
    pub seq: u64,
    /// When it joined.
    pub queued_us: Micros,
    /// The request.
    pub request: Queued,
}

/// The waiting requests, indexed for the decisions (see the module's docs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Queue {
    /// One FIFO per priority (index: `rank`), by `queued` sequence number.
    classes: [BTreeMap<u64, QueueEntry>; 4],
    by_id: HashMap<AllocationId, (u8, u64)>,
    by_timeout: BTreeSet<(Micros, AllocationId)>,
    /// Idempotency key to the waiting request that carries it: a keyed retry of a waiting
    /// request is answered by it, never queued twice. Derived from the entries (a snapshot
    /// rebuilds it).
    by_key: HashMap<Arc<str>, AllocationId>,
}

/// A priority's rank: low 0, normal 1, high 2, critical 3.
pub fn rank(p: Priority) -> u8 {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

impl QueueEntry {
    /// Its effective rank at `now`: its priority's, raised one per `aging_us` waited.
    pub fn effective_rank(&self, now: Micros, aging_us: i64) -> u8 {
        let base = rank(self.request.priority);
        if aging_us <= 0 || now <= self.queued_us {
            return base;
        }
        let steps = (now - self.queued_us) / aging_us;
        (i64::from(base) + steps).min(3) as u8
    }

    /// Its order key at `now`: smaller is earlier.
    fn key(&self, now: Micros, aging_us: i64) -> (std::cmp::Reverse<u8>, u64) {
        (std::cmp::Reverse(self.effective_rank(now, aging_us)), self.seq)
    }

    /// The deadline it would get if granted at `now`.
    pub fn deadline_if_granted(&self, now: Micros) -> Micros {
        now + i64::try_from(self.request.ttl_seconds).unwrap_or(i64::MAX / 2 / MICROS_PER_SECOND) * MICROS_PER_SECOND
    }
}

/// The queue in decision order at one instant (a lazy merge of the four FIFOs).
pub struct QueueOrder<'a> {
    heads: [std::iter::Peekable<std::collections::btree_map::Values<'a, u64, QueueEntry>>; 4],
    now: Micros,
    aging_us: i64,
}

impl<'a> Iterator for QueueOrder<'a> {
    type Item = &'a QueueEntry;
    fn next(&mut self) -> Option<&'a QueueEntry> {
        let (now, aging_us) = (self.now, self.aging_us);
        let best =
            (0..4).filter_map(|i| self.heads[i].peek().map(|e| (e.key(now, aging_us), i))).min().map(|(_, i)| i)?;
        self.heads[best].next()
    }
}

impl Queue {
    /// How many requests wait.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The waiting request `id`.
    pub fn get(&self, id: AllocationId) -> Option<&QueueEntry> {
        let &(class, seq) = self.by_id.get(&id)?;
        self.classes[usize::from(class)].get(&seq)
    }

    /// Adds the request a `queued` event at `seq`, `ts` recorded; `false` if its id waits already.
    pub fn push(&mut self, seq: u64, ts: Micros, request: Queued) -> bool {
        let id = request.allocation_id;
        if self.by_id.contains_key(&id) {
            return false;
        }
        let class = rank(request.priority);
        self.by_id.insert(id, (class, seq));
        self.by_timeout.insert((request.timeout_us, id));
        if let Some(key) = &request.idempotency_key {
            self.by_key.insert(key.clone(), id);
        }
        self.classes[usize::from(class)].insert(seq, QueueEntry { seq, queued_us: ts, request });
        true
    }

    /// The waiting request that carries idempotency key `key`.
    pub fn by_key(&self, key: &str) -> Option<&QueueEntry> {
        self.get(*self.by_key.get(key)?)
    }

    /// Takes `id` out of the queue (granted, timed out or cancelled).
    pub fn remove(&mut self, id: AllocationId) -> Option<QueueEntry> {
        let (class, seq) = self.by_id.remove(&id)?;
        let e = self.classes[usize::from(class)].remove(&seq)?;
        self.by_timeout.remove(&(e.request.timeout_us, id));
        if let Some(key) = &e.request.idempotency_key {
            if self.by_key.get(key) == Some(&id) {
                self.by_key.remove(key);
            }
        }
        Some(e)
    }

    /// The queue in decision order at `now`.
    pub fn order(&self, now: Micros, config: &QueueConfig) -> QueueOrder<'_> {
        QueueOrder { heads: self.classes.each_ref().map(|c| c.values().peekable()), now, aging_us: config.aging_us() }
    }

    /// Requests whose wait ends by `now`, earliest first.
    pub fn timeouts_due(&self, now: Micros) -> Vec<AllocationId> {
        self.by_timeout.range(..=(now, AllocationId::from_u64(AllocationId::MAX))).map(|&(_, id)| id).collect()
    }

    /// When the queue next needs a decision with nothing else happening: the earliest wait that
    /// ends, or the next aging step of a FIFO's head (a new head may fit).
    pub fn next_wakeup(&self, now: Micros, config: &QueueConfig) -> Option<Micros> {
        let timeout = self.by_timeout.first().map(|&(t, _)| t);
        let aging_us = config.aging_us();
        let promotion = (aging_us > 0)
            .then(|| {
                self.classes
                    .iter()
                    .filter_map(|c| c.values().next())
                    .filter(|e| e.effective_rank(now, aging_us) < 3)
                    .map(|e| {
                        let steps = (now - e.queued_us).max(0) / aging_us;
                        e.queued_us + (steps + 1).saturating_mul(aging_us)
                    })
                    .min()
            })
            .flatten();
        [timeout, promotion].into_iter().flatten().min()
    }

    /// Where `id` stands at `now`: its 1-based position and how many ahead of it have a higher
    /// effective priority.
    pub fn position(&self, id: AllocationId, now: Micros, config: &QueueConfig) -> Option<(u64, u64)> {
        let target = self.get(id)?;
        let aging_us = config.aging_us();
        let mine = target.effective_rank(now, aging_us);
        let mut higher = 0;
        for (i, e) in self.order(now, config).enumerate() {
            if e.request.allocation_id == id {
                return Some((i as u64 + 1, higher));
            }
            if e.effective_rank(now, aging_us) > mine {
                higher += 1;
            }
        }
        None
    }

    /// Where a new request of `priority` would join at `now`: (position, ahead with a higher
    /// effective priority). Counts the FIFOs it is behind whole, and only the aged prefix of
    /// the lower ones.
    pub fn join_position(&self, priority: Priority, now: Micros, config: &QueueConfig) -> (u64, u64) {
        let mine = rank(priority);
        let aging_us = config.aging_us();
        let (mut ahead, mut higher) = (0u64, 0u64);
        for (class, fifo) in self.classes.iter().enumerate() {
            if class as u8 >= mine {
                ahead += fifo.len() as u64;
                higher += if class as u8 > mine {
                    fifo.len() as u64
                } else {
                    fifo.values().take_while(|e| e.effective_rank(now, aging_us) > mine).count() as u64
                };
            } else {
                for e in fifo.values() {
                    let r = e.effective_rank(now, aging_us);
                    if r < mine {
                        break;
                    }
                    ahead += 1;
                    higher += u64::from(r > mine);
                }
            }
        }
        (ahead + 1, higher)
    }

    /// Every waiting request, in `queued` order (for snapshots).
    pub fn entries(&self) -> Vec<QueueEntry> {
        let mut all: Vec<QueueEntry> = self.classes.iter().flat_map(|c| c.values().cloned()).collect();
        all.sort_by_key(|e| e.seq);
        all
    }

    /// Cross-checks the indexes.
    pub fn check(&self) -> std::result::Result<(), String> {
        let total: usize = self.classes.iter().map(BTreeMap::len).sum();
        if total != self.by_id.len() || total != self.by_timeout.len() {
            return Err("the queue's indexes disagree".into());
        }
        for (class, fifo) in self.classes.iter().enumerate() {
            for (seq, e) in fifo {
                let id = e.request.allocation_id;
                if rank(e.request.priority) as usize != class
                    || self.by_id.get(&id) != Some(&(class as u8, *seq))
                    || !self.by_timeout.contains(&(e.request.timeout_us, id))
                {
                    return Err(format!("queued request {id} is indexed wrongly"));
                }
            }
        }
        Ok(())
    }
}

/// The head's reserved start (Slurm's term; not an advance reservation, `domain/reservation.rs`):
/// when it can start at the earliest, and what is left beside it then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadStart {
    /// The head waiting for it.
    pub head: AllocationId,
    /// The earliest active deadline by which the head fits (`None`: not even once every active
    /// allocation has ended).
    pub start_us: Option<Micros>,
    /// What is free at `start_us` beyond the head's needs and its priority's reserve.
    pub extra: Resources,
}

impl HeadStart {
    /// Whether a request needing `needed` until `deadline_us` cannot delay the head.
    pub fn allows(&self, deadline_us: Micros, needed: Resources) -> bool {
        self.start_us.is_none_or(|s| deadline_us <= s) || covers(self.extra, needed)
    }
}

fn covers(have: Resources, need: Resources) -> bool {
    need.workers <= have.workers && need.cpu_millicores <= have.cpu_millicores && need.memory_mib <= have.memory_mib
}

/// What a queued request's admission decided.
enum Blocked {
    /// A resource is short now.
    Short(Shortfall),
    /// It fits, but would delay the head's reserved start.
    Head(AllocationId, Resources),
    /// It fits the pool, but not beside an advance reservation (`domain/reservation.rs`).
    Reserved(Box<Rejection>),
}

impl State {
    /// The queue's config.
    fn qcfg(&self) -> &QueueConfig {
        &self.config.queue
    }

    /// The waiting requests.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The head's reserved start (see [`HeadStart`]), the head priced as `cost`.
    pub fn head_start_of(&self, head: &QueueEntry, cost: &Cost) -> HeadStart {
        let need = cost.needed;
        let u = cost.usable;
        let mut have =
            Resources { workers: u.workers as u32, cpu_millicores: u.cpu_millicores, memory_mib: u.memory_mib };
        let extra_of = |have: Resources| Resources {
            workers: have.workers.saturating_sub(need.workers),
            cpu_millicores: have.cpu_millicores.saturating_sub(need.cpu_millicores),
            memory_mib: have.memory_mib.saturating_sub(need.memory_mib),
        };
        let id = head.request.allocation_id;
        if covers(have, need) {
            return HeadStart { head: id, start_us: Some(Micros::MIN), extra: extra_of(have) };
        }
        for (deadline, a) in self.active_by_deadline() {
            have = have.checked_add(a.resources).unwrap_or(have);
            if covers(have, need) {
                return HeadStart { head: id, start_us: Some(deadline), extra: extra_of(have) };
            }
        }
        HeadStart { head: id, start_us: None, extra: extra_of(have) }
    }

    /// The head of the queue at `now` and its reservation (`None`: nobody waits).
    pub fn head_reservation(&self, now: Micros) -> Option<HeadStart> {
        let head = self.queue.order(now, self.qcfg()).find(|e| !self.is_preempting_for(e.request.allocation_id))?;
        Some(self.head_start_of(head, &price_queued(self, &head.request)))
    }

    /// Whether the waiting request `e` could be granted now (nothing short, within its quota),
    /// whatever waits ahead of it.
    pub fn queued_fits_now(&self, e: &QueueEntry, now: Micros) -> bool {
        self.queued_fits(e, &price_queued(self, &e.request), now)
    }

    /// Whether a priced queued request may be granted at `now`: nothing short, its lease fits
    /// beside the advance reservations, and within its tenant's quota.
    fn queued_fits(&self, e: &QueueEntry, cost: &Cost, now: Micros) -> bool {
        if shortfall(cost).is_some() {
            return false;
        }
        let q = &e.request;
        if self.reserved_breach(&q.job_id, q.tenant.as_deref(), cost, now, e.deadline_if_granted(now)).is_some() {
            return false;
        }
        let Some(quota) = self.config.quota_of(q.tenant.as_deref()) else { return true };
        let tenant = q.tenant.as_deref().unwrap_or(crate::domain::quota::NO_TENANT);
        let used = self.tenant_use(q.tenant.as_deref());
        crate::domain::quota::first_exceeded(tenant, quota, &used, cost.workers, &q.mcp_servers).is_none()
    }

    /// The queue's next decision at `now`: the grant of the head if it fits, else of the first
    /// of the next `backfill_depth` requests that fits and cannot delay the head. `None`:
    /// nothing waiting can start now.
    pub fn decide_queue_step(&self, now: Micros) -> Option<Grant> {
        // A preemptor waits for its victims, not its turn (`domain/preempt.rs`).
        let mut order = self.queue.order(now, self.qcfg()).filter(|e| !self.is_preempting_for(e.request.allocation_id));
        let head = order.next()?;
        let head_cost = price_queued(self, &head.request);
        if self.queued_fits(head, &head_cost, now) {
            return Some(self.grant_queued(head, head_cost, now));
        }
        let free = self.available();
        let mut reservation = None;
        for e in order.take(self.qcfg().backfill_depth as usize) {
            if e.request.workers > free.workers {
                continue;
            }
            let cost = price_queued(self, &e.request);
            if !self.queued_fits(e, &cost, now) {
                continue;
            }
            let r = *reservation.get_or_insert_with(|| self.head_start_of(head, &head_cost));
            if r.allows(e.deadline_if_granted(now), cost.needed) {
                return Some(self.grant_queued(e, cost, now));
            }
        }
        None
    }

    pub(crate) fn grant_queued(&self, e: &QueueEntry, cost: Cost, now: Micros) -> Grant {
        let q = &e.request;
        Grant {
            allocation_id: q.allocation_id,
            job_id: q.job_id.clone(),
            priority: q.priority,
            ttl_seconds: q.ttl_seconds,
            deadline_us: e.deadline_if_granted(now),
            workers: take_slots(self, q.workers),
            mcp_servers: cost.mcp_servers,
            resources: cost.workers,
            metadata: q.metadata.clone(),
            idempotency_key: q.idempotency_key.clone(),
            max_lifetime_seconds: q.max_lifetime_seconds,
            tenant: q.tenant.clone(),
            queued_seq: Some(e.seq),
            preemptible: q.preemptible,
        }
    }

    /// The `rejected` events (reason `queue_timeout`) of the waits that end by `now`.
    pub fn decide_queue_timeouts(&self, now: Micros) -> Vec<EventBody> {
        self.queue
            .timeouts_due(now)
            .into_iter()
            .filter_map(|id| self.queue.get(id))
            .map(|e| {
                let q = &e.request;
                let waited = ((now - e.queued_us).max(0) + MICROS_PER_SECOND / 2) / MICROS_PER_SECOND;
                EventBody::Rejected(Rejection {
                    allocation_id: q.allocation_id,
                    job_id: q.job_id.clone(),
                    priority: q.priority,
                    ttl_seconds: q.ttl_seconds,
                    workers: q.workers,
                    mcp_servers: q.mcp_servers.clone(),
                    reason: RejectReason::QueueTimeout,
                    needed: u64::from(q.workers),
                    available: u64::from(self.available().workers),
                    error: format!(
                        "queue_timeout: waited {waited} s in the queue without fitting ({})",
                        q.waiting_reason
                    ),
                    metadata: q.metadata.clone(),
                    idempotency_key: q.idempotency_key.clone(),
                    max_lifetime_seconds: q.max_lifetime_seconds,
                    tenant: q.tenant.clone(),
                    quota: None,
                })
            })
            .collect()
    }

    /// `cancel_request`: the `cancelled` event of a waiting request. An allocation that is not
    /// waiting is invalid input naming its state; an unknown id is `NotFound`.
    pub fn decide_cancel(&self, id: AllocationId, now: Micros) -> Result<EventBody> {
        if self.queue.get(id).is_some() {
            return Ok(EventBody::Cancelled { allocation_id: id });
        }
        match self.allocation(id) {
            Some(a) => Err(Error::invalid(
                "allocation_id",
                format!(
                    "{id} is {}, not pending: only a request waiting in the queue can be cancelled{}",
                    a.state_at(now).as_str(),
                    if a.state_at(now).is_terminal() { "" } else { " (release it instead)" }
                ),
            )),
            None => Err(Error::NotFound(id.to_string())),
        }
    }

    /// A new request decided with the queue in mind: granted if it fits and cannot delay the
    /// queue's head (or outranks it); otherwise queued if it asked to wait and could ever fit,
    /// else rejected. Invalid input is an error; a quota breach is rejected at once.
    pub fn decide_admission(&self, req: &ResourceRequest, now: Micros, id: AllocationId) -> Result<EventBody> {
        let valid = validate(req, &self.config)?;
        let timeout_seconds = self.queue_timeout_of(req)?;
        if let Some(rejection) = quota_rejection(self, &valid, id) {
            return Ok(EventBody::Rejected(rejection));
        }
        let cost = price(&valid, self);
        let deadline_us = now + (valid.ttl_seconds as i64) * MICROS_PER_SECOND;
        let blocked = match shortfall(&cost) {
            Some(s) => Blocked::Short(s),
            None => match self.blocking_head(req.priority, now, deadline_us, cost.needed) {
                Some((head, extra)) => Blocked::Head(head, extra),
                None => match self.reserved_rejection(&valid, &cost, now, id) {
                    None => return Ok(place_granted(self, valid, cost, now, id)),
                    Some(rejection) => Blocked::Reserved(Box::new(rejection)),
                },
            },
        };
        if !req.wait || !self.could_ever_fit(&cost, req.priority) {
            return Ok(EventBody::Rejected(self.rejection_of(&blocked, &valid, &cost, id)));
        }
        let (position, behind_higher) = self.queue.join_position(req.priority, now, self.qcfg());
        let waiting_reason = match &blocked {
            Blocked::Short(s) => crate::domain::decide::rejection_message(s, &cost.usable, req.priority),
            Blocked::Head(head, _) => format!("behind queued request {head}: starting now would delay it"),
            Blocked::Reserved(r) => r.error.clone(),
        };
        Ok(EventBody::Queued(Queued {
            allocation_id: id,
            job_id: req.job_id.clone(),
            priority: req.priority,
            ttl_seconds: valid.ttl_seconds,
            workers: req.workers,
            mcp_servers: req.mcp_servers.clone(),
            metadata: valid.metadata,
            idempotency_key: req.idempotency_key.as_deref().map(Arc::from),
            max_lifetime_seconds: req.max_lifetime_seconds,
            tenant: valid.tenant,
            timeout_us: now
                + i64::try_from(timeout_seconds).unwrap_or(i64::MAX / 2 / MICROS_PER_SECOND) * MICROS_PER_SECOND,
            position,
            behind_higher,
            waiting_reason,
            preemptible: req.is_preemptible(),
        }))
    }

    /// The queue's head, and what is left beside it, if a request of `priority` needing
    /// `needed` until `deadline_us` must not start now for its sake.
    fn blocking_head(
        &self,
        priority: Priority,
        now: Micros,
        deadline_us: Micros,
        needed: Resources,
    ) -> Option<(AllocationId, Resources)> {
        let head = self.queue.order(now, self.qcfg()).find(|e| !self.is_preempting_for(e.request.allocation_id))?;
        if rank(priority) > head.effective_rank(now, self.qcfg().aging_us()) {
            return None;
        }
        let r = self.head_start_of(head, &price_queued(self, &head.request));
        (!r.allows(deadline_us, needed)).then_some((r.head, r.extra))
    }

    /// The wait a request asks for, within the config's bound.
    fn queue_timeout_of(&self, req: &ResourceRequest) -> Result<u64> {
        let c = self.qcfg();
        let t = req.queue_timeout_seconds.unwrap_or(c.default_timeout_seconds);
        if t == 0 || t > c.max_timeout_seconds {
            return Err(Error::invalid(
                "queue_timeout_seconds",
                format!("{t} is out of range; allowed values: 1 to {} seconds", c.max_timeout_seconds),
            ));
        }
        Ok(t)
    }

    /// Whether the request fits the pool once everything else has ended (its MCP servers at
    /// their catalog cost).
    fn could_ever_fit(&self, cost: &Cost, priority: Priority) -> bool {
        let total = self.total();
        let pct = u64::from(self.config.priority_reserve_percent.for_priority(priority));
        let keep = |t: u64| (t * pct).div_ceil(100);
        let servers = cost.mcp_servers.iter().fold(Resources::default(), |acc, m| {
            let (cpu, mem) = self.config.mcp_catalog.get(&m.name).map_or((0, 0), |e| (e.cpu_millicores, e.memory_mib));
            Resources { workers: 0, cpu_millicores: acc.cpu_millicores + cpu, memory_mib: acc.memory_mib + mem }
        });
        let need = cost.workers.checked_add(servers).unwrap_or(Resources { workers: u32::MAX, ..Resources::default() });
        u64::from(need.workers) <= u64::from(total.workers) - keep(u64::from(total.workers))
            && need.cpu_millicores <= total.cpu_millicores - keep(total.cpu_millicores)
            && need.memory_mib <= total.memory_mib - keep(total.memory_mib)
    }

    fn rejection_of(
        &self,
        blocked: &Blocked,
        valid: &crate::domain::input::ValidRequest<'_>,
        cost: &Cost,
        id: AllocationId,
    ) -> Rejection {
        let req = valid.request;
        let (s, error) = match *blocked {
            Blocked::Reserved(ref rejection) => return (**rejection).clone(),
            Blocked::Short(s) => (s, crate::domain::decide::rejection_message(&s, &cost.usable, req.priority)),
            Blocked::Head(head, extra) => {
                let s = beside_shortfall(cost.needed, extra);
                let what = match s.reason {
                    RejectReason::InsufficientCpu => "CPU",
                    RejectReason::InsufficientMemory => "memory",
                    _ => "workers",
                };
                let msg = format!(
                    "Insufficient {what}: requested {}, available {} (the rest is held for queued request {head}, which would start later if this were granted)",
                    s.needed, s.available
                );
                (s, msg)
            }
        };
        valid.rejection(id, s.reason, s.needed, s.available, error)
    }
}

/// The first resource `needed` takes more of than `extra` leaves beside the head.
fn beside_shortfall(needed: Resources, extra: Resources) -> Shortfall {
    let (reason, n, a) = if needed.workers > extra.workers {
        (RejectReason::InsufficientWorkers, u64::from(needed.workers), u64::from(extra.workers))
    } else if needed.cpu_millicores > extra.cpu_millicores {
        (RejectReason::InsufficientCpu, needed.cpu_millicores, extra.cpu_millicores)
    } else {
        (RejectReason::InsufficientMemory, needed.memory_mib, extra.memory_mib)
    };
    Shortfall { reason, needed: n, available: a, total: 0 }
}

fn place_granted(
    state: &State,
    valid: crate::domain::input::ValidRequest<'_>,
    cost: Cost,
    now: Micros,
    id: AllocationId,
) -> EventBody {
    match place(state, valid, cost, now, id) {
        Ok(g) => EventBody::Granted(g),
        Err(r) => EventBody::Rejected(r),
    }
}

/// Whether an event can let a waiting request start (capacity freed, the pool changed, the
/// queue's order or a reserved start changed, a new request whose aging steps must be timed).
/// A grant that did not come from the queue counts: one that outranked the head may have moved
/// the head's reserved start later, which lets more requests backfill.
pub fn wakes_queue(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::Granted(Grant { queued_seq: None, .. })
            | EventBody::Released { .. }
            | EventBody::Expired { .. }
            | EventBody::ConfigChanged { .. }
            | EventBody::Cancelled { .. }
            | EventBody::Queued(_)
            | EventBody::Renewed(_)
            | EventBody::Rejected(Rejection { reason: RejectReason::QueueTimeout, .. })
    )
}
