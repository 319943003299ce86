//! Every decision: a command is decided against the current state, and the result is the
//! event that records its outcome (which slots, which endpoints, which deadline). Pure: no I/O,
//! no clock (the caller passes the event's timestamp), no report shaping. Replay never runs
//! these; it folds the events they returned.
//!
//! A request goes through three steps: [`validate`] (input checks, `input.rs`), [`price`]
//! (what it would cost the pool now, and what its priority may take of it) and [`place`]
//! (which slots and endpoints, the deadline; or the rejection and its message).

use crate::domain::clock::{Micros, MICROS_PER_SECOND};
use crate::domain::config::Config;
use crate::domain::event::{EventBody, Grant, McpGrant, RejectReason, Rejection, Renewal, WorkerGrant};
use crate::domain::idempotency::{KeyRecord, RequestShape, MAX_IDEMPOTENCY_KEY_BYTES};
use crate::domain::input::{validate, ResourceRequest, ValidRequest};
use crate::domain::model::{cores, AllocationId, AllocationState, Priority, Resources};
use crate::domain::state::{Allocation, State};
use crate::{Error, Result};

/// What a valid request would take from the pool as it stands, and how much of the pool its
/// priority may take.
#[derive(Debug)]
pub struct Cost {
    /// What the workers hold (a grant's `resources`).
    pub workers: Resources,
    /// The workers plus the MCP servers this request would start (saturating: a sum beyond
    /// `u64` is rejected, never wrapped).
    pub needed: Resources,
    /// Each named server with its endpoint and cost, in the request's order.
    pub mcp_servers: Vec<McpGrant>,
    /// What is free, less what the reserve policy keeps from this priority.
    pub usable: Usable,
}

/// A whole, in percent.
const PERCENT: u64 = 100;

/// The reserve policy applied to what is free: what a request of one priority may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usable {
    /// Free worker slots this priority may take.
    pub workers: u64,
    /// Free CPU this priority may take.
    pub cpu_millicores: u64,
    /// Free memory this priority may take.
    pub memory_mib: u64,
    /// The pool's totals the reserve is a share of.
    pub total: Resources,
    /// Percent of each total kept free from this priority.
    pub reserve_percent: u64,
}

impl Usable {
    /// What is kept free of `total` (rounded up, so a reserve is never zero by rounding).
    fn reserve(&self, total: u64) -> u64 {
        (total * self.reserve_percent).div_ceil(PERCENT)
    }
}

/// The first resource a request needs more of than it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    /// Which resource.
    pub reason: RejectReason,
    /// What the request needs of it, in its unit (workers, millicores or MiB).
    pub needed: u64,
    /// What the request's priority may take of it.
    pub available: u64,
    /// The pool's total of it.
    pub total: u64,
}

/// Prices a valid request against `state`: the MCP servers it names (each one's endpoint and
/// what starting it costs), its workers, and what its priority may take.
pub fn price(valid: &ValidRequest<'_>, state: &State) -> Cost {
    let req = valid.request;
    price_of(state, &req.mcp_servers, req.workers, req.priority)
}

/// [`price`] for a request waiting in the queue (validated when it joined).
pub fn price_queued(state: &State, q: &crate::domain::queue::Queued) -> Cost {
    price_of(state, &q.mcp_servers, q.workers, q.priority)
}

fn price_of(state: &State, mcp_server_names: &[String], worker_count: u32, priority: Priority) -> Cost {
    let cfg = &state.config;
    let (mcp_servers, servers) = price_mcp_servers(mcp_server_names, state);
    let workers = Resources {
        cpu_millicores: cfg.worker_cpu_millicores * u64::from(worker_count),
        memory_mib: cfg.worker_memory_mib * u64::from(worker_count),
        workers: worker_count,
    };
    let needed = Resources {
        cpu_millicores: workers.cpu_millicores.saturating_add(servers.cpu_millicores),
        memory_mib: workers.memory_mib.saturating_add(servers.memory_mib),
        workers: workers.workers,
    };
    Cost { workers, needed, mcp_servers, usable: usable(state, priority) }
}

/// Each named server's endpoint and cost, and the cost of those this grant would start: a
/// running server keeps its endpoint and is charged already; a catalog server has its own;
/// a name seen before keeps the endpoint it was given; a new name gets the next port.
fn price_mcp_servers(names: &[String], state: &State) -> (Vec<McpGrant>, Resources) {
    let cfg = &state.config;
    let mut grants = Vec::with_capacity(names.len());
    let mut next_assigned = state.assigned_mcp_count;
    let mut starting = Resources::default();
    for name in names {
        let (endpoint, cpu_millicores, memory_mib, assigned) = if let Some(r) = state.running.get(name) {
            (r.endpoint.clone(), r.cpu_millicores, r.memory_mib, false)
        } else if let Some(e) = cfg.mcp_catalog.get(name) {
            (e.endpoint.clone(), e.cpu_millicores, e.memory_mib, false)
        } else if let Some(e) = state.assigned_mcp_endpoints.get(name) {
            (e.clone(), 0, 0, false)
        } else {
            let port = u64::from(cfg.mcp_base_port) + next_assigned;
            next_assigned += 1;
            (format!("http://localhost:{port}"), 0, 0, true)
        };
        let started = !state.running.contains_key(name);
        if started {
            starting.cpu_millicores += cpu_millicores;
            starting.memory_mib += memory_mib;
        }
        grants.push(McpGrant { name: name.clone(), endpoint, cpu_millicores, memory_mib, assigned, started });
    }
    (grants, starting)
}

/// The reserve policy: a request of `priority` may take what is free less the config's
/// reserve percent of each total.
fn usable(state: &State, priority: Priority) -> Usable {
    // What victims of a preemption in grace have freed is kept for its preemptor.
    let avail = crate::domain::preempt::sat_sub(state.available(), state.kept_for_preemptors());
    let total = state.total();
    let reserve_percent = u64::from(state.config.priority_reserve_percent.for_priority(priority));
    let mut u = Usable { workers: 0, cpu_millicores: 0, memory_mib: 0, total, reserve_percent };
    u.workers = u64::from(avail.workers).saturating_sub(u.reserve(u64::from(total.workers)));
    u.cpu_millicores = avail.cpu_millicores.saturating_sub(u.reserve(total.cpu_millicores));
    u.memory_mib = avail.memory_mib.saturating_sub(u.reserve(total.memory_mib));
    u
}

/// The first of workers, CPU and memory that `cost` needs more of than it may take.
pub fn shortfall(cost: &Cost) -> Option<Shortfall> {
    let (needed, usable, total) = (cost.needed, cost.usable, cost.usable.total);
    if u64::from(needed.workers) > usable.workers {
        Some(Shortfall {
            reason: RejectReason::InsufficientWorkers,
            needed: u64::from(needed.workers),
            available: usable.workers,
            total: u64::from(total.workers),
        })
    } else if needed.cpu_millicores > usable.cpu_millicores {
        Some(Shortfall {
            reason: RejectReason::InsufficientCpu,
            needed: needed.cpu_millicores,
            available: usable.cpu_millicores,
            total: total.cpu_millicores,
        })
    } else if needed.memory_mib > usable.memory_mib {
        Some(Shortfall {
            reason: RejectReason::InsufficientMemory,
            needed: needed.memory_mib,
            available: usable.memory_mib,
            total: total.memory_mib,
        })
    } else {
        None
    }
}

/// The rejection's message, in the original system's words and units (CPU in cores, memory
/// in MB), with a note on the reserve when the priority has one. Every rejection message is
/// built here.
pub fn rejection_message(s: &Shortfall, usable: &Usable, priority: Priority) -> String {
    let note = if usable.reserve_percent > 0 {
        format!(" ({} of {} kept free from {priority} priority requests)", usable.reserve(s.total), s.total)
    } else {
        String::new()
    };
    match s.reason {
        RejectReason::InsufficientWorkers => {
            format!("Insufficient workers: requested {}, available {}{note}", s.needed, s.available)
        }
        RejectReason::InsufficientCpu => {
            format!("Insufficient CPU: needed {:?}, available {:?}{note}", cores(s.needed), cores(s.available))
        }
        RejectReason::InsufficientMemory => {
            format!("Insufficient memory: needed {}MB, available {}MB{note}", s.needed, s.available)
        }
        // Quota rejections are worded by `quota::QuotaExceeded::message`; no shortfall has it.
        RejectReason::Quota => format!("exceeded quota: requested {}, available {}", s.needed, s.available),
        // Worded by `State::reserved_rejection`; no shortfall has it either.
        RejectReason::Reserved => format!("reserved: requested {}, available {}", s.needed, s.available),
        RejectReason::QueueTimeout | RejectReason::Cancelled => {
            format!("{}: requested {}, available {}", s.reason, s.needed, s.available)
        }
    }
}

/// Places a priced request at `now` as allocation `id`: the lowest free slots, the priced
/// endpoints and the deadline; or, if the pool cannot hold it, the rejection that says why.
#[allow(
    clippy::result_large_err,
    reason = "both outcomes are events of about the same size; boxing one costs a heap block"
)]
pub fn place(
    state: &State,
    valid: ValidRequest<'_>,
    cost: Cost,
    now: Micros,
    id: AllocationId,
) -> std::result::Result<Grant, Rejection> {
    let req = valid.request;
    if let Some(s) = shortfall(&cost) {
        let error = rejection_message(&s, &cost.usable, req.priority);
        return Err(valid.rejection(id, s.reason, s.needed, s.available, error));
    }
    let workers = take_slots(state, req.workers);
    Ok(Grant {
        allocation_id: id,
        job_id: req.job_id.clone(),
        priority: req.priority,
        ttl_seconds: valid.ttl_seconds,
        deadline_us: now + (valid.ttl_seconds as i64) * MICROS_PER_SECOND,
        workers,
        mcp_servers: cost.mcp_servers,
        resources: cost.workers,
        metadata: valid.metadata,
        idempotency_key: req.idempotency_key.as_deref().map(std::sync::Arc::from),
        max_lifetime_seconds: req.max_lifetime_seconds,
        tenant: valid.tenant,
        queued_seq: None,
        preemptible: req.is_preemptible(),
    })
}

/// The quota rule, before pricing: a request that would take its tenant past a limit of its
/// quota is rejected with reason `quota` (whatever the pool has free), naming the limit.
pub fn quota_rejection(state: &State, valid: &ValidRequest<'_>, id: AllocationId) -> Option<Rejection> {
    let cfg = &state.config;
    let quota = cfg.quota_of(valid.tenant.as_deref())?;
    let req = valid.request;
    let asked = Resources {
        cpu_millicores: cfg.worker_cpu_millicores * u64::from(req.workers),
        memory_mib: cfg.worker_memory_mib * u64::from(req.workers),
        workers: req.workers,
    };
    let tenant = valid.tenant.as_deref().unwrap_or(crate::domain::quota::NO_TENANT);
    let used = state.tenant_use(valid.tenant.as_deref());
    let exceeded = crate::domain::quota::first_exceeded(tenant, quota, &used, asked, &req.mcp_servers)?;
    let (needed, available) = (exceeded.requested, exceeded.limited.saturating_sub(exceeded.used));
    let error = exceeded.message();
    Some(Rejection { quota: Some(exceeded), ..valid.rejection(id, RejectReason::Quota, needed, available, error) })
}

/// The lowest `count` free slots as worker grants (the caller checked there are enough).
pub(crate) fn take_slots(state: &State, count: u32) -> Vec<WorkerGrant> {
    let cfg = &state.config;
    let workers = state
        .free_slots
        .iter()
        .take(count as usize)
        .map(|&slot| WorkerGrant {
            slot,
            worker_id: cfg.worker_id(slot),
            endpoint: cfg.worker_endpoint(slot),
            cpu_millicores: cfg.worker_cpu_millicores,
            memory_mib: cfg.worker_memory_mib,
        })
        .collect::<Vec<_>>();
    debug_assert_eq!(workers.len(), count as usize);
    workers
}

/// The timestamp the ledger gives its next event when its clock reads `clock`: strictly after
/// the last event, even if the clock stepped back.
pub fn next_event_ts(state: &State, clock: Micros) -> Micros {
    clock.max(state.last_ts_us + 1)
}

/// A request decided without writing: what the ledger would record if it ran now.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The timestamp the event would get.
    pub ts_us: Micros,
    /// The sequence number it would get (after the expiries due now).
    pub seq: u64,
    /// The grant, or the rejection and why.
    pub outcome: std::result::Result<Grant, Rejection>,
}

impl State {
    /// What `request_resources` would decide with the clock at `clock`, writing nothing: the
    /// expiries due then are folded into a copy first (as the real write records them first),
    /// then the request is decided exactly as a write decides it.
    pub fn plan_request(&self, req: &ResourceRequest, clock: Micros) -> Result<Planned> {
        let due = self.due_for_expiry(next_event_ts(self, clock));
        let expired;
        let state = if due.is_empty() {
            self
        } else {
            let mut copy = self.clone();
            for (allocation_id, deadline_us) in due {
                let ts = next_event_ts(&copy, clock);
                copy.evolve_owned(copy.last_seq + 1, ts, EventBody::Expired { allocation_id, deadline_us });
            }
            expired = copy;
            &expired
        };
        let ts_us = next_event_ts(state, clock);
        // Decided as a write without `wait` decides it (the queue's head, the reservations and
        // a preemption without grace included), as an answer now: a plan never queues.
        let mut now_only = req.clone();
        now_only.wait = false;
        let mut bodies = state.decide_admission_preempting(&now_only, ts_us, false)?;
        // Victims preempted at once come first: the decision is the last event.
        let seq = state.last_seq + bodies.len() as u64;
        let outcome = match bodies.pop() {
            Some(EventBody::Granted(g)) => Ok(g),
            Some(EventBody::Rejected(r)) => Err(r),
            other => {
                let kind = other.as_ref().map_or("nothing", EventBody::type_name);
                return Err(Error::invalid("wait", format!("a plan cannot be {kind}")));
            }
        };
        Ok(Planned { ts_us, seq, outcome })
    }

    /// Validates a request and decides it against this state at `now` (the event's timestamp).
    /// Invalid input is an error and no event; a request the pool cannot hold is a `Rejected`
    /// event. The caller must have written pending expiries first.
    pub fn decide_request(&self, req: &ResourceRequest, now: Micros, id: AllocationId) -> Result<EventBody> {
        Ok(match self.decide_grant(req, now, id)? {
            Ok(grant) => EventBody::Granted(grant),
            Err(rejection) => EventBody::Rejected(rejection),
        })
    }

    /// [`State::decide_request`] as validate → price → place, with the outcome typed.
    pub fn decide_grant(
        &self,
        req: &ResourceRequest,
        now: Micros,
        id: AllocationId,
    ) -> Result<std::result::Result<Grant, Rejection>> {
        let valid = validate(req, &self.config)?;
        if let Some(rejection) = quota_rejection(self, &valid, id) {
            return Ok(Err(rejection));
        }
        let cost = price(&valid, self);
        if shortfall(&cost).is_none() {
            if let Some(rejection) = self.reserved_rejection(&valid, &cost, now, id) {
                return Ok(Err(rejection));
            }
        }
        Ok(place(self, valid, cost, now, id))
    }

    /// Decides a release of `id`: the allocation, and the `Released` event if it is still
    /// active (`None`: it has ended, nothing is written). An id not in memory is `NotFound`.
    pub fn decide_release(&self, id: AllocationId) -> Result<(&Allocation, Option<EventBody>)> {
        let a = self.allocation(id).ok_or_else(|| Error::NotFound(id.to_string()))?;
        let event = (a.state == AllocationState::Active).then_some(EventBody::Released { allocation_id: id });
        Ok((a, event))
    }

    /// Validates a config change against what is held now: a change that takes away a slot,
    /// CPU or memory an active allocation holds is refused, naming that allocation (what is
    /// held is never revoked).
    pub fn decide_config_change(&self, config: Config) -> Result<EventBody> {
        config.validate()?;
        if let Some(slot) = self.slots.iter().rposition(Option::is_some) {
            if slot as u32 >= config.worker_slots {
                let holder = self.slot_owner(slot as u32).map(|id| self.holder_text(id)).unwrap_or_default();
                return Err(Error::invalid(
                    "config.worker_slots",
                    format!(
                        "{} would remove worker slot {slot}, which {holder} holds; worker_slots must be at least {} until it is released or expires",
                        config.worker_slots,
                        slot + 1
                    ),
                ));
            }
        }
        self.check_removals(&config)?;
        for (field, asked, held) in [
            ("config.total_cpu_millicores", config.total_cpu_millicores, self.allocated.cpu_millicores),
            ("config.total_memory_mib", config.total_memory_mib, self.allocated.memory_mib),
        ] {
            if asked < held {
                let newest = self
                    .allocations()
                    .filter(|a| a.state == AllocationState::Active)
                    .max_by_key(|a| (a.created_us, a.id));
                let blocker =
                    newest.map(|a| format!(" (the newest is {})", self.holder_text(a.id))).unwrap_or_default();
                return Err(Error::invalid(
                    field,
                    format!("{asked} is below the {held} that active allocations hold now{blocker}; what is held is never revoked: lower it once they end"),
                ));
            }
        }
        Ok(EventBody::ConfigChanged { config })
    }

    /// A slot leaves the pool only drained and idle, and once removed it stays removed (its
    /// id is never reused).
    fn check_removals(&self, config: &Config) -> Result<()> {
        let old = &self.config;
        if let Some(&slot) = old.removed_workers.iter().find(|s| !config.removed_workers.contains(s)) {
            return Err(Error::invalid(
                "config.removed_workers",
                format!(
                    "{} was removed from the pool; a removed worker id is never reused: keep it in removed_workers",
                    old.worker_id(slot)
                ),
            ));
        }
        for &slot in config.removed_workers.difference(&old.removed_workers) {
            let id = old.worker_id(slot);
            if let Some(holder) = self.slot_owner(slot) {
                return Err(Error::invalid(
                    "config.removed_workers",
                    format!("{id} is held by {}; a worker is removed only once nothing holds it: wait until it is released or expires", self.holder_text(holder)),
                ));
            }
            if !old.drained_workers.contains(&slot) {
                return Err(Error::invalid(
                    "config.removed_workers",
                    format!("{id} is not drained: drain it first (pool drain {id}), then remove it once it is idle"),
                ));
            }
        }
        Ok(())
    }

    /// "allocation alloc-… (job j, expires …)" for messages.
    fn holder_text(&self, id: AllocationId) -> String {
        match self.allocation(id) {
            Some(a) => format!(
                "allocation {id} (job {}, deadline {})",
                a.job_id,
                crate::domain::clock::format_micros(a.deadline_us)
            ),
            None => format!("allocation {id}"),
        }
    }

    /// The idempotency rule, checked before anything else (a retry is answered even when its
    /// `expected_seq` is stale): `Some` is the decision the request's key already has, to be
    /// answered again with nothing written; `None`, the request is new (no key, or one not seen
    /// within the window). The same key with a different request is invalid input.
    pub fn decide_replay(&self, req: &ResourceRequest, now: Micros) -> Result<Option<KeyRecord>> {
        let Some(key) = &req.idempotency_key else { return Ok(None) };
        // Only valid keys are ever recorded, so an invalid one is simply not found here; the
        // decision that follows validates the whole request and names it (once per request,
        // under the state lock). Too long a key is not even hashed.
        if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Ok(None);
        }
        // A key decided within the window; else one a waiting request carries (its record as
        // of its `queued` event: the caller finds it in the queue, not among the allocations).
        let record = self.keys.get(key, now, self.config.idempotency_window_seconds).or_else(|| {
            self.queue.by_key(key).map(|e| KeyRecord {
                key: std::sync::Arc::from(key.as_str()),
                ts_us: e.queued_us,
                seq: e.seq,
                allocation_id: e.request.allocation_id,
                rejected: None,
                fingerprint: crate::domain::idempotency::queued_fingerprint(&e.request),
            })
        });
        let Some(record) = record else { return Ok(None) };
        // Fingerprinted as decided (the lifetime resolved), without the rest of validation: a
        // retry is answered even if the config has changed since.
        let names: Vec<&str> = req.mcp_servers.iter().map(String::as_str).collect();
        let metadata = crate::domain::model::Metadata::from_map(&req.metadata);
        let tenant = crate::domain::input::resolve_tenant(req, &self.config).ok().flatten();
        let shape = RequestShape {
            job_id: &req.job_id,
            workers: req.workers,
            mcp_servers: &names,
            priority: req.priority,
            ttl_seconds: req.ttl_seconds.unwrap_or(self.config.default_ttl_seconds),
            metadata: &metadata,
            max_lifetime_seconds: req.max_lifetime_seconds,
            tenant: tenant.as_deref(),
        };
        if shape.fingerprint() != record.fingerprint {
            return Err(Error::invalid(
                "idempotency_key",
                format!(
                    "{key:?} was already used for a different request (allocation {}, event {}); a retry must repeat the request exactly, and a new request needs a new key",
                    record.allocation_id, record.seq
                ),
            ));
        }
        Ok(Some(record))
    }

    /// The write precondition: `expected_seq`, if given, must be the last sequence number.
    pub fn check_expected_seq(&self, expected_seq: Option<u64>) -> Result<()> {
        match expected_seq {
            Some(expected_seq) if expected_seq != self.last_seq => {
                Err(Error::Conflict { expected_seq, current_seq: self.last_seq })
            }
            _ => Ok(()),
        }
    }

    /// Decides a lease renewal of `id` at `now`: the deadline moves to `now + ttl` (the
    /// allocation's own lifetime when `ttl_seconds` is `None`), within the config's TTL bounds
    /// and never past creation + `max_lifetime_seconds`. The caller must have written pending
    /// expiries first, so an allocation whose deadline is `now` has expired (log order decides).
    pub fn decide_renewal(&self, id: AllocationId, ttl_seconds: Option<u64>, now: Micros) -> Result<Renewal> {
        let a = self.allocation(id).ok_or_else(|| Error::NotFound(id.to_string()))?;
        let state = a.state_at(now);
        if state != AllocationState::Active {
            return Err(Error::NotActive { allocation_id: id.to_string(), state: state.as_str().to_string() });
        }
        let cfg = &self.config;
        let ttl = ttl_seconds.unwrap_or(a.ttl_seconds);
        if ttl < cfg.min_ttl_seconds || ttl > cfg.max_ttl_seconds {
            return Err(Error::invalid(
                "ttl_seconds",
                format!(
                    "{ttl} is out of range; allowed values: {} to {} seconds",
                    cfg.min_ttl_seconds, cfg.max_ttl_seconds
                ),
            ));
        }
        let wanted_us = now + (ttl as i64) * MICROS_PER_SECOND;
        let deadline_us = a.lifetime_end().map_or(wanted_us, |end| wanted_us.min(end));
        if deadline_us < wanted_us && deadline_us <= a.deadline_us {
            return Err(Error::invalid(
                "ttl_seconds",
                format!(
                    "allocation {id} has reached its max_lifetime_seconds ({}): its deadline cannot move later; release it when done, or request a new allocation",
                    a.max_lifetime_seconds.unwrap_or_default()
                ),
            ));
        }
        debug_assert!(deadline_us > now, "an active allocation's lifetime end is after now");
        self.check_renewal_reservations(a, deadline_us, now)?;
        Ok(Renewal { allocation_id: id, previous_deadline_us: a.deadline_us, deadline_us, ttl_seconds: ttl })
    }

    /// The id of the allocation the next event would decide (derived from its sequence number).
    pub fn next_allocation_id(&self) -> AllocationId {
        let mut id = AllocationId::for_seq(AllocationId::ledger_key(&self.ledger_id), self.last_seq + 1);
        // Only a ledger written by an older build (random ids) can hold this one already.
        while self.allocation(id).is_some() {
            id = AllocationId::random();
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::EventBody;
    use crate::Error;

    const T0: Micros = Micros::from_micros(1_767_225_600_000_000);

    fn created() -> State {
        let mut s = State::empty(Config::default());
        s.evolve(1, T0, &EventBody::LedgerCreated { ledger_id: "test".into(), config: Config::default() });
        s
    }

    fn apply(s: &mut State, req: &ResourceRequest, t: Micros, id: u64) -> EventBody {
        let ev = s.decide_request(req, t, AllocationId::from_u64(id)).unwrap();
        s.evolve(s.last_seq + 1, t, &ev);
        ev
    }

    #[test]
    fn grant_release_and_messages() {
        let mut s = created();
        let ev = apply(&mut s, &ResourceRequest::new("j").workers(7), T0 + 1, 1);
        assert!(matches!(ev, EventBody::Granted(_)));
        let ev = apply(&mut s, &ResourceRequest::new("j").workers(5), T0 + 2, 2);
        match ev {
            EventBody::Rejected(r) => assert_eq!(r.error, "Insufficient workers: requested 5, available 3"),
            other => panic!("{other:?}"),
        }
        let cap = s.capacity(T0 + 3);
        assert_eq!((cap.allocated_workers, cap.available_workers), (7, 3));
        assert_eq!(cap.allocated_cpu, 7.0);
        s.evolve(s.last_seq + 1, T0 + 4, &EventBody::Released { allocation_id: AllocationId::from_u64(1) });
        assert_eq!(s.capacity(T0 + 5).available_workers, 10);
        s.check_invariants().unwrap();
    }

    #[test]
    fn cpu_and_memory_messages_use_original_units() {
        let cfg = Config {
            total_cpu_millicores: 2_000,
            total_memory_mib: 4096,
            worker_cpu_millicores: 1_000,
            worker_memory_mib: 1024,
            ..Config::default()
        };
        let mut s = State::empty(cfg.clone());
        s.evolve(1, T0, &EventBody::LedgerCreated { ledger_id: "x".into(), config: cfg });
        match s.decide_request(&ResourceRequest::new("j").workers(4), T0, AllocationId::from_u64(1)).unwrap() {
            EventBody::Rejected(r) => assert_eq!(r.error, "Insufficient CPU: needed 4.0, available 2.0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn low_priority_keeps_a_reserve_free() {
        let s = created();
        match s
            .decide_request(
                &ResourceRequest::new("j").workers(8).priority(Priority::Low),
                T0,
                AllocationId::from_u64(1),
            )
            .unwrap()
        {
            EventBody::Rejected(r) => {
                assert!(r.error.starts_with("Insufficient workers: requested 8, available 7"), "{}", r.error);
            }
            other => panic!("{other:?}"),
        }
        let ev = s.decide_request(&ResourceRequest::new("j").workers(8), T0, AllocationId::from_u64(1)).unwrap();
        assert!(matches!(ev, EventBody::Granted(_)));
    }

    #[test]
    fn mcp_endpoints_are_shared_and_stop_with_the_last_user() {
        let mut s = created();
        let ev1 = apply(&mut s, &ResourceRequest::new("a").mcp_server("github"), T0 + 1, 1);
        let ev2 = apply(&mut s, &ResourceRequest::new("b").mcp_server("github").mcp_server("slack"), T0 + 2, 2);
        let (EventBody::Granted(g1), EventBody::Granted(g2)) = (ev1, ev2) else { panic!() };
        assert_eq!(g1.mcp_servers[0].endpoint, "http://localhost:9000");
        assert_eq!(g2.mcp_servers[0].endpoint, "http://localhost:9000");
        assert_eq!(g2.mcp_servers[1].endpoint, "http://localhost:9001");
        assert_eq!(s.capacity(T0 + 3).running_mcp_servers, vec!["github", "slack"]);
        s.evolve(s.last_seq + 1, T0 + 4, &EventBody::Released { allocation_id: AllocationId::from_u64(2) });
        assert_eq!(s.capacity(T0 + 5).running_mcp_servers, vec!["github"]);
        s.evolve(s.last_seq + 1, T0 + 6, &EventBody::Released { allocation_id: AllocationId::from_u64(1) });
        assert!(s.capacity(T0 + 7).running_mcp_servers.is_empty());
        // The endpoint stays the name's.
        let ev = apply(&mut s, &ResourceRequest::new("c").mcp_server("slack"), T0 + 8, 3);
        let EventBody::Granted(g) = ev else { panic!() };
        assert_eq!(g.mcp_servers[0].endpoint, "http://localhost:9001");
    }

    #[test]
    fn past_deadline_reads_as_expired_before_the_event() {
        let mut s = created();
        apply(&mut s, &ResourceRequest::new("a").workers(2).ttl_seconds(60), T0 + 1, 1);
        let later = T0 + 1 + 61_000_000;
        let d = s.details(AllocationId::from_u64(1), later).unwrap();
        assert_eq!(d.state, AllocationState::Expired);
        assert!(d.is_expired);
        assert_eq!(s.capacity(later).available_workers, 10);
        assert_eq!(s.capacity(later).active_allocations, 0);
        assert_eq!(s.due_for_expiry(later).len(), 1);
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let s = created();
        let cases: Vec<(ResourceRequest, &str)> = vec![
            (ResourceRequest::new("").workers(1), "job_id"),
            (ResourceRequest::new("a\u{7}b").workers(1), "job_id"),
            (ResourceRequest::new("x".repeat(300)).workers(1), "job_id"),
            (ResourceRequest::new("j").workers(11), "workers"),
            (ResourceRequest::new("j"), "workers"),
            (ResourceRequest::new("j").workers(1).ttl_seconds(59), "ttl_seconds"),
            (ResourceRequest::new("j").workers(1).ttl_seconds(604_801), "ttl_seconds"),
            (ResourceRequest::new("j").mcp_server("bad name"), "mcp_servers[0]"),
            (ResourceRequest::new("j").mcp_server("a").mcp_server("a"), "mcp_servers[1]"),
        ];
        for (req, field) in cases {
            match s.decide_request(&req, T0, AllocationId::from_u64(1)) {
                Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field, "{req:?}"),
                other => panic!("{req:?}: {other:?}"),
            }
        }
    }

    /// The reserve's note, as docs/mcp.md shows it.
    #[test]
    fn reserve_note_names_what_is_kept_free() {
        let s = created();
        let req = ResourceRequest::new("j").workers(8).priority(Priority::Low);
        match s.decide_request(&req, T0, AllocationId::from_u64(1)).unwrap() {
            EventBody::Rejected(r) => {
                assert_eq!(
                    r.error,
                    "Insufficient workers: requested 8, available 7 (3 of 10 kept free from low priority requests)"
                );
                assert_eq!((r.needed, r.available), (8, 7));
            }
            other => panic!("{other:?}"),
        }
    }
}
