//! The queue in the what-if: recorded `wait` requests re-decided into the simulated queue,
//! granted as capacity frees there and timed out on the virtual clock; the caller's cancels
//! replayed. Each such request is counted once both sides have decided it (or at the window's
//! end, as still waiting), and its waits on each side go to the comparison's `waits`.

use super::Simulator;
use crate::domain::clock::{Micros, MICROS_PER_SECOND};
use crate::domain::event::{EventBody, RejectReason};
use crate::domain::input::ResourceRequest;
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::queue::Queued;
use crate::whatif::compare::{Outcome, Side, WaitEnd};
use std::cmp::Reverse;

/// A request that waited on at least one side, until both sides have decided it.
#[derive(Debug)]
pub(super) struct Waiting {
    job: String,
    tenant: Option<String>,
    workers: u32,
    /// When it joined the queue on each side (`None`: it did not wait there).
    entered: [Option<Micros>; 2],
    /// What became of it on each side, once decided.
    outcome: [Option<Outcome>; 2],
}

/// The request a `queued` event recorded, asking to wait as long as it did.
fn request_of_queued(q: &Queued, ts: Micros) -> ResourceRequest {
    let timeout_seconds = u64::try_from((q.timeout_us - ts).max(MICROS_PER_SECOND) / MICROS_PER_SECOND).unwrap_or(1);
    // Field by field over the default, so a field added to requests later keeps its default.
    let mut req = ResourceRequest::default();
    req.job_id.clone_from(&q.job_id);
    req.mcp_servers.clone_from(&q.mcp_servers);
    req.workers = q.workers;
    req.priority = q.priority;
    req.ttl_seconds = Some(q.ttl_seconds);
    req.metadata = q.metadata.to_map();
    req.idempotency_key = q.idempotency_key.as_deref().map(str::to_string);
    req.max_lifetime_seconds = q.max_lifetime_seconds;
    req.tenant.clone_from(&q.tenant);
    req.wait = true;
    req.queue_timeout_seconds = Some(timeout_seconds);
    req
}

/// How an event ends a wait: the allocation, how, and the outcome it gives.
fn wait_end_of(body: &EventBody) -> Option<(AllocationId, WaitEnd, Outcome)> {
    match body {
        EventBody::Granted(g) if g.queued_seq.is_some() => Some((g.allocation_id, WaitEnd::Granted, Outcome::Granted)),
        EventBody::Rejected(r) if r.reason == RejectReason::QueueTimeout => {
            Some((r.allocation_id, WaitEnd::TimedOut, Outcome::Rejected(r.reason.as_str())))
        }
        EventBody::Cancelled { allocation_id } => {
            Some((*allocation_id, WaitEnd::Cancelled, Outcome::Rejected(RejectReason::Cancelled.as_str())))
        }
        _ => None,
    }
}

impl Simulator<'_> {
    /// A recorded `queued` request: decided again at its instant, with the id it was given
    /// (granted now, rejected, or queued in the what-if).
    pub(super) fn queued_request(&mut self, ts: Micros, recorded: &EventBody) {
        let EventBody::Queued(q) = recorded else { return };
        let id = q.allocation_id;
        let req = request_of_queued(q, ts);
        let mut w = Waiting {
            job: q.job_id.clone(),
            tenant: super::tenant_of(&req).map(str::to_string),
            workers: q.workers,
            entered: [Some(ts), None],
            outcome: [None, None],
        };
        self.compare.queued(Side::Reality);
        let decided = self.state.decide_admission(&req, ts, id);
        if self.alternative.is_none() && decided.as_ref().ok() != Some(recorded) {
            self.differing_decisions += 1;
            self.first_difference_seq.get_or_insert(self.state.last_seq + 1);
        }
        let body = match decided {
            Err(_) => {
                w.outcome[1] = Some(Outcome::Invalid);
                None
            }
            Ok(EventBody::Granted(g)) => {
                w.outcome[1] = Some(Outcome::Granted);
                self.compare.hold(Side::WhatIf, id, &w.job, w.tenant.as_deref(), g.resources.workers, ts);
                Some(EventBody::Granted(g))
            }
            Ok(EventBody::Rejected(r)) => {
                w.outcome[1] = Some(Outcome::Rejected(r.reason.as_str()));
                Some(EventBody::Rejected(r))
            }
            Ok(other) => {
                w.entered[1] = Some(ts);
                self.compare.queued(Side::WhatIf);
                Some(other)
            }
        };
        self.waiting.insert(id, w);
        if let Some(body) = body {
            self.fold(ts, body);
        }
    }

    /// Notes a what-if event that ends a wait there (called by `fold` before folding it).
    pub(super) fn what_if_wait_ends(&mut self, ts: Micros, body: &EventBody) {
        let Some((id, end, outcome)) = wait_end_of(body) else { return };
        let Some(w) = self.waiting.get_mut(&id) else { return };
        let (Some(at), None) = (w.entered[1], w.outcome[1]) else { return };
        w.outcome[1] = Some(outcome);
        self.compare.wait_ended(Side::WhatIf, end, ts - at);
        if end == WaitEnd::Granted {
            let (job, tenant, workers) = (w.job.clone(), w.tenant.clone(), w.workers);
            self.compare.hold(Side::WhatIf, id, &job, tenant.as_deref(), workers, ts);
            // Reality gave up on it already: the what-if holds it as a what-if-only grant.
            if w.outcome[0].is_some_and(|o| o != Outcome::Granted) {
                self.end_later(id);
            }
        }
        self.count_if_decided(id);
    }

    /// A recorded event that ends a wait in reality (`true`: handled here, not decided again):
    /// a grant from the queue, a queue timeout, a cancel. A cancel is replayed in the what-if
    /// if the request still waits there.
    pub(super) fn reality_wait_ends(&mut self, ts: Micros, body: &EventBody) -> bool {
        let Some((id, end, outcome)) = wait_end_of(body) else { return false };
        if let EventBody::Granted(g) = body {
            let tenant = g.tenant.clone();
            self.compare.hold(Side::Reality, id, &g.job_id, tenant.as_deref(), g.resources.workers, ts);
        }
        let Some(w) = self.waiting.get_mut(&id) else {
            // Queued before the window: the what-if replays the cancel all the same.
            if end == WaitEnd::Cancelled && self.state.queue().get(id).is_some() {
                self.fold(ts.max(self.state.last_ts_us + 1), EventBody::Cancelled { allocation_id: id });
            }
            return true;
        };
        if w.outcome[0].is_none() {
            w.outcome[0] = Some(outcome);
            if let Some(at) = w.entered[0] {
                self.compare.wait_ended(Side::Reality, end, ts - at);
            }
        }
        if end != WaitEnd::Granted {
            if self.state.queue().get(id).is_some() && end == WaitEnd::Cancelled {
                self.fold(ts.max(self.state.last_ts_us + 1), EventBody::Cancelled { allocation_id: id });
            } else {
                self.end_later(id);
            }
        }
        self.count_if_decided(id);
        true
    }

    /// Schedules the end of `id` if the what-if holds it (a what-if-only grant).
    fn end_later(&mut self, id: AllocationId) {
        let Some(a) = self.state.allocation(id).filter(|a| a.state == AllocationState::Active) else { return };
        let (job, created, deadline) = (a.job_id.clone(), a.created_us, a.deadline_us);
        let end = self.held_until(&job, created, deadline);
        self.sim_only_ends.push(Reverse((end, id)));
    }

    /// Counts `id` in the comparison once both sides have decided it.
    fn count_if_decided(&mut self, id: AllocationId) {
        let Some(w) = self.waiting.get(&id) else { return };
        let [Some(reality), Some(what_if)] = w.outcome else { return };
        let tenant = w.tenant.clone();
        self.compare.request(&w.job.clone(), tenant.as_deref(), reality, what_if);
        self.waiting.remove(&id);
    }

    /// Writes the what-if's queue timeouts due by `ts` and grants what its queue decides then,
    /// as the ledger does after every write.
    pub(super) fn settle_queue(&mut self, ts: Micros) {
        if self.state.queue().is_empty() {
            return;
        }
        let now = ts.max(self.state.last_ts_us + 1);
        for body in self.state.decide_queue_timeouts(now) {
            let t = now.max(self.state.last_ts_us + 1);
            self.fold(t, body);
        }
        loop {
            let t = now.max(self.state.last_ts_us + 1);
            let Some(grant) = self.state.decide_queue_step(t) else { break };
            // Held from its own instant: both sides' levels so far count up to it.
            self.compare.set(Side::Reality, self.reality.allocated, self.reality.total);
            self.compare.set(Side::WhatIf, self.state.allocated(), self.state.total());
            self.compare.advance(t);
            self.fold(t, EventBody::Granted(grant));
            self.compare.set(Side::WhatIf, self.state.allocated(), self.state.total());
        }
    }

    /// At the window's end: the waits still open on either side are counted as waiting.
    pub(super) fn close_waits(&mut self) {
        let until = self.until;
        let open: Vec<AllocationId> = self.waiting.keys().copied().collect();
        for id in open {
            let Some(w) = self.waiting.get_mut(&id) else { continue };
            for (i, side) in [Side::Reality, Side::WhatIf].into_iter().enumerate() {
                if w.outcome[i].is_none() {
                    w.outcome[i] = Some(Outcome::Rejected("still_waiting"));
                    if let Some(at) = w.entered[i] {
                        self.compare.wait_ended(side, WaitEnd::Open, until - at);
                    }
                }
            }
            self.count_if_decided(id);
        }
    }
}
