//! The pending queue on the write path: decided in `domain/queue.rs`, written here. Every
//! command that may free capacity (a release, an expiry, a config change, a cancel, a queue
//! timeout) wakes the queue in the same command, under the same hold of the core lock, so the
//! grants it makes are in the same commit as the event that freed the capacity. Waiting
//! callers get a future ([`GrantWait`]) woken by the append that decides their request.

use super::{lock, Core, Durable, Ledger};
use crate::domain::clock::{datetime, Micros, MICROS_PER_SECOND};
use crate::domain::event::{EventBody, RejectReason};
use crate::domain::input::ResourceRequest;
use crate::domain::model::{AllocationId, AllocationState, Priority};
use crate::domain::queue::{QueueEntry, Queued};
use crate::domain::state::{Allocation, State};
use crate::report::{
    replayed_outcome, rfc3339_micros, AllocationDetails, AllocationSummary, FailedReport, GrantReport, RequestOutcome,
};
use crate::{Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

mod request;
pub use request::RequestFuture;

/// When the queue needs its next decision: after an event that may let a request start, or at
/// the next timeout or aging step.
#[derive(Debug)]
pub(super) struct QueueWake {
    dirty: bool,
    next: Option<Micros>,
}

impl Default for QueueWake {
    /// A new handle decides once (it does not know what the last one did).
    fn default() -> Self {
        QueueWake { dirty: true, next: None }
    }
}

/// What an appended event means for the queue, noted before it is folded.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueNote {
    wakes: bool,
    resolves: Option<(AllocationId, Option<RejectReason>)>,
}

impl QueueNote {
    /// The note of `body`.
    pub(super) fn of(body: &EventBody) -> QueueNote {
        let resolves = match body {
            EventBody::Granted(g) if g.queued_seq.is_some() => Some((g.allocation_id, None)),
            EventBody::Rejected(r) if r.reason == RejectReason::QueueTimeout => Some((r.allocation_id, Some(r.reason))),
            EventBody::Cancelled { allocation_id } => Some((*allocation_id, Some(RejectReason::Cancelled))),
            _ => None,
        };
        QueueNote { wakes: crate::domain::queue::wakes_queue(body), resolves }
    }
}

/// How many decided waits [`Waiters`] remembers (a waiter that comes late still gets the
/// decision's sequence number).
const RESOLVED_KEPT: usize = 4096;

/// Callers waiting for a queued request's outcome, and the recent outcomes.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    inner: Mutex<WaitersInner>,
}

#[derive(Debug, Default)]
struct WaitersInner {
    wakers: HashMap<AllocationId, Vec<Waker>>,
    resolved: HashMap<AllocationId, (u64, Option<RejectReason>)>,
    order: VecDeque<AllocationId>,
}

impl Waiters {
    fn register(&self, id: AllocationId, waker: &Waker) {
        let mut w = lock(&self.inner);
        let list = w.wakers.entry(id).or_default();
        if !list.iter().any(|k| k.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    fn resolve(&self, id: AllocationId, seq: u64, reason: Option<RejectReason>) {
        let wakers = {
            let mut w = lock(&self.inner);
            w.resolved.insert(id, (seq, reason));
            w.order.push_back(id);
            while w.order.len() > RESOLVED_KEPT {
                if let Some(old) = w.order.pop_front() {
                    w.resolved.remove(&old);
                }
            }
            w.wakers.remove(&id)
        };
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    fn resolved(&self, id: AllocationId) -> Option<(u64, Option<RejectReason>)> {
        lock(&self.inner).resolved.get(&id).copied()
    }
}

/// `request_resources` with `wait: true` as first answered: decided now, or waiting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Admission {
    /// Granted or rejected now.
    Decided(RequestOutcome),
    /// Waiting in the queue: `status: "pending"`.
    Pending(PendingReport),
}

/// A request waiting in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PendingReport {
    /// The allocation id it will have; wait on it, cancel it, or `get` it.
    pub allocation_id: AllocationId,
    /// Always `pending`.
    pub status: AllocationState,
    /// The job it is for.
    pub job_id: String,
    /// Its priority (the effective one rises with aging).
    pub priority: Priority,
    /// Its place in the queue (1 = next).
    pub queue_position: u64,
    /// Why it waits.
    pub waiting_reason: String,
    /// When it joined the queue.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// When it is rejected with reason `queue_timeout` unless granted first.
    #[serde(with = "rfc3339_micros")]
    pub timeout_at: DateTime<Utc>,
    /// Sequence number of its `queued` event.
    pub seq: u64,
    /// This answers a retry (same idempotency key) of the request already waiting: nothing was
    /// written, and the position is the one it has now.
    #[serde(default)]
    pub replayed: bool,
}

impl PendingReport {
    fn of(q: &Queued, ts: Micros, seq: u64) -> PendingReport {
        PendingReport {
            allocation_id: q.allocation_id,
            status: AllocationState::Pending,
            job_id: q.job_id.clone(),
            priority: q.priority,
            queue_position: q.position,
            waiting_reason: waiting_words(q.position, q.behind_higher, &q.waiting_reason),
            created_at: datetime(ts),
            timeout_at: datetime(q.timeout_us),
            seq,
            replayed: false,
        }
    }

    /// A keyed retry's answer: the waiting request `e` as it stands at `now`.
    pub(super) fn replay_of(s: &State, e: &QueueEntry, now: Micros) -> PendingReport {
        let (position, higher) = s.queue().position(e.request.allocation_id, now, &s.config.queue).unwrap_or((0, 0));
        PendingReport {
            queue_position: position,
            waiting_reason: waiting_words(position, higher, &current_reason(s, e)),
            replayed: true,
            ..PendingReport::of(&e.request, e.queued_us, e.seq)
        }
    }
}

/// "behind 2 higher-priority requests (...)" or the resource that is short.
fn waiting_words(position: u64, behind_higher: u64, reason: &str) -> String {
    if behind_higher > 0 {
        format!("behind {behind_higher} higher-priority request(s) ({reason})")
    } else if position > 1 {
        format!("behind {} earlier request(s) ({reason})", position - 1)
    } else {
        reason.to_string()
    }
}

/// `cancel_request`: the waiting request withdrawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CancelReport {
    /// The request cancelled.
    pub allocation_id: AllocationId,
    /// Always `cancelled`.
    pub status: AllocationState,
    /// The job it was for.
    pub job_id: String,
    /// How long it waited, seconds.
    pub waited_seconds: f64,
    /// Sequence number of the `cancelled` event.
    pub seq: u64,
}

impl Ledger {
    /// Notes an appended event for the queue: wakes it on the next settle if capacity may have
    /// freed, and wakes the callers waiting on a request it decided.
    pub(super) fn after_queue_event(&self, core: &mut Core, seq: u64, note: QueueNote) {
        if note.wakes {
            core.queue.dirty = true;
        }
        if let Some((id, reason)) = note.resolves {
            self.shared.queue_waiters.resolve(id, seq, reason);
        }
    }

    /// Writes the queue timeouts due, then grants what the queue decides, one event at a time
    /// (each decision sees the grants before it), until nothing is due at the instant the next
    /// event would get: each event written moves that instant on, and a wait that times out by
    /// it ends before the decision that follows is stamped (a replay decides it there).
    pub(super) fn settle_queue(&self, core: &mut Core) -> Result<()> {
        if core.state.queue().is_empty() {
            return Ok(());
        }
        self.settle_preemptions(core)?;
        loop {
            let before = core.state.last_seq;
            self.settle_queue_at(core, self.next_ts(&core.state))?;
            if core.state.last_seq == before || core.state.queue().is_empty() {
                return Ok(());
            }
        }
    }

    /// One pass of [`Ledger::settle_queue`] with the clock at `now`.
    fn settle_queue_at(&self, core: &mut Core, now: Micros) -> Result<()> {
        for body in core.state.decide_queue_timeouts(now) {
            let ts = self.next_ts(&core.state);
            self.append(core, ts, body)?;
        }
        if !core.queue.dirty && core.queue.next.is_none_or(|t| now < t) {
            return Ok(());
        }
        loop {
            let ts = self.next_ts(&core.state);
            let Some(grant) = core.state.decide_queue_step(ts) else { break };
            self.append(core, ts, EventBody::Granted(grant))?;
        }
        core.queue.dirty = false;
        core.queue.next = core.state.queue().next_wakeup(now, &core.state.config.queue);
        Ok(())
    }

    /// `request_resources` with `wait`: granted or rejected now, or queued (`pending`, with its
    /// position). A request that can never fit, or past its tenant's quota, is rejected at once.
    pub fn request_or_queue(&self, req: &ResourceRequest) -> Result<Admission> {
        let (check, decide) = admission_command(req, None);
        match self.write_checked(check, decide) {
            // A keyed retry whose allocation has left memory: the log has it.
            Err(Error::NotFound(_)) if req.idempotency_key.is_some() => {
                let mut now_only = req.clone();
                now_only.wait = false;
                self.request_checked(&now_only, None).map(Admission::Decided)
            }
            other => other,
        }
    }

    /// [`Ledger::request_or_queue`] for async callers. A keyed retry whose allocation has left
    /// memory resolves to `NotFound` (the log must be read: blocking); the blocking call
    /// answers it.
    pub fn request_or_queue_async(&self, req: &ResourceRequest) -> Durable<Admission> {
        let (check, decide) = admission_command(req, None);
        self.write_async_checked(check, decide)
    }

    /// `request_resources_async` with an optional precondition: admitted, then waited for if
    /// it waits in the queue.
    pub(super) fn request_future(&self, req: &ResourceRequest, expected_seq: Option<u64>) -> RequestFuture {
        let (check, decide) = admission_command(req, expected_seq);
        RequestFuture::new(self, self.write_async_checked(check, decide))
    }

    /// `cancel_request`: withdraws a waiting request (a `cancelled` event). One that is not
    /// waiting is invalid input naming its state; an unknown id is `NotFound`.
    pub fn cancel_request(&self, allocation_id: &str) -> Result<CancelReport> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        self.write_checked(|_, _| Ok(None), move |state, ts, _| decide_cancel(state, ts, id))
    }

    /// [`Ledger::cancel_request`] for async callers.
    pub fn cancel_request_async(&self, allocation_id: &str) -> Durable<CancelReport> {
        match AllocationId::parse("allocation_id", allocation_id) {
            Ok(id) => self.write_async_checked(|_, _| Ok(None), move |state, ts, _| decide_cancel(state, ts, id)),
            Err(e) => Durable::ready(self, Err(e)),
        }
    }

    /// A future that resolves when the waiting request `allocation_id` is decided: granted,
    /// timed out (`queue_timeout`) or cancelled, once that event is durable. No polling: the
    /// append that decides it wakes the future. Something must write the timeout when it is
    /// due (the MCP server's timer, [`Ledger::cleanup_expired`], any write, or
    /// [`Ledger::wait_for_grant_blocking`]).
    pub fn wait_for_grant(&self, allocation_id: &str) -> GrantWait {
        GrantWait { ledger: self.clone(), id: AllocationId::parse("allocation_id", allocation_id), inner: None }
    }

    /// [`Ledger::wait_for_grant`] for a blocking caller; it writes the queue's timeouts itself
    /// when they fall due (so a lone process needs no timer).
    pub fn wait_for_grant_blocking(&self, allocation_id: &str) -> Result<RequestOutcome> {
        let mut fut = self.wait_for_grant(allocation_id);
        let wake = Arc::new(ThreadWake(std::thread::current()));
        let waker = Waker::from(wake);
        let mut cx = std::task::Context::from_waker(&waker);
        loop {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut fut).poll(&mut cx) {
                return r;
            }
            let now = self.now_micros();
            match self.next_deadline() {
                Some(t) if t <= now && !self.is_read_only() => {
                    self.cleanup_expired()?;
                }
                Some(t) => std::thread::park_timeout(park_for(t - now)),
                None => std::thread::park_timeout(std::time::Duration::from_millis(100)),
            }
        }
    }

    /// A waiting request's outcome if it has been decided (`None`: it still waits), writing the
    /// queue's timeouts that are due first. For a caller that cannot keep the ledger open while
    /// it waits (the CLI beside other processes): it asks again later.
    pub fn queued_outcome(&self, allocation_id: &str) -> Result<Option<RequestOutcome>> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        if self.next_deadline().is_some_and(|t| t <= self.now_micros()) {
            self.cleanup_expired()?;
        }
        let known = self.shared.queue_waiters.resolved(id);
        self.read(|s, now| resolution(s, id, now, known)).and_then(Option::transpose)
    }

    /// `request_resources` with `wait` for a blocking caller: returns once granted, timed out
    /// or cancelled.
    pub(super) fn request_and_wait(&self, req: &ResourceRequest) -> Result<RequestOutcome> {
        match self.request_or_queue(req)? {
            Admission::Decided(o) => Ok(o),
            Admission::Pending(p) => self.wait_for_grant_blocking(&p.allocation_id.to_string()),
        }
    }

    /// The pending rows of `list --state pending`, in queue order.
    pub(super) fn pending_rows(&self) -> Result<Vec<AllocationSummary>> {
        self.read(|s, now| {
            s.queue().order(now, &s.config.queue).map(|e| pending_allocation(s, e).summary(now)).collect()
        })
    }

    /// `get` of a waiting request: its place and why it waits.
    pub(super) fn pending_details(&self, id: AllocationId) -> Result<Option<AllocationDetails>> {
        self.read(|s, now| pending_details(s, id, now))
    }
}

/// A waiting request's row in `list --state pending`.
pub(super) fn pending_summary(s: &State, e: &QueueEntry, now: Micros) -> AllocationSummary {
    pending_allocation(s, e).summary(now)
}

/// Waits at most this long between looks at the clock (a manual clock moves without waking).
fn park_for(micros: i64) -> std::time::Duration {
    std::time::Duration::from_micros(u64::try_from(micros.clamp(1_000, 100_000)).unwrap_or(100_000))
}

struct ThreadWake(std::thread::Thread);

impl std::task::Wake for ThreadWake {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

type Check<R> = Box<dyn FnOnce(&State, Micros) -> Result<Option<R>> + Send>;
type Decide<R> = Box<dyn FnOnce(&State, Micros, &[AllocationId]) -> Result<(Vec<EventBody>, R)> + Send>;

/// The check (an idempotent retry is answered as decided, or as it waits now; then the
/// precondition) and decision of a request that may wait. A retry whose allocation has left
/// memory is `NotFound`: the log has it.
fn admission_command(req: &ResourceRequest, expected_seq: Option<u64>) -> (Check<Admission>, Decide<Admission>) {
    let req = Arc::new(req.clone());
    let for_decide = req.clone();
    let check: Check<Admission> = Box::new(move |state, now| {
        let Some(record) = state.decide_replay(&req, now)? else {
            return state.check_expected_seq(expected_seq).map(|()| None);
        };
        if let Some(e) = state.queue().get(record.allocation_id) {
            return Ok(Some(Admission::Pending(PendingReport::replay_of(state, e, now))));
        }
        match state.allocation(record.allocation_id) {
            Some(a) => Ok(Some(Admission::Decided(replayed_outcome(a, &record, now)))),
            // Left memory: the log has it (`request_resources` reads it); never decided again.
            None => Err(Error::NotFound(record.allocation_id.to_string())),
        }
    });
    let decide: Decide<Admission> = Box::new(move |state, ts, _| {
        let mut bodies = state.decide_admission_preempting(&for_decide, ts, true)?;
        // Victims preempted at once (grace 0) come before the grant.
        let seq = state.last_seq + bodies.len() as u64;
        let Some(body) = bodies.pop() else { return Err(Error::invalid("request", "no decision")) };
        let answer = match &body {
            EventBody::Granted(g) => Admission::Decided(RequestOutcome::Granted(GrantReport::from_grant(g, ts, seq))),
            EventBody::Rejected(r) => {
                Admission::Decided(RequestOutcome::Failed(FailedReport::from_rejection(r, ts, seq)))
            }
            EventBody::Queued(q) => Admission::Pending(PendingReport::of(q, ts, seq)),
            EventBody::Preempting(p) => Admission::Pending(PendingReport::of(&p.request, ts, seq)),
            _ => return Err(Error::invalid("request", "unexpected decision")),
        };
        bodies.push(body);
        Ok((bodies, answer))
    });
    (check, decide)
}

fn decide_cancel(state: &State, ts: Micros, id: AllocationId) -> Result<(Vec<EventBody>, CancelReport)> {
    let body = state.decide_cancel(id, ts)?;
    let e = state.queue().get(id).ok_or_else(|| Error::NotFound(id.to_string()))?;
    let report = CancelReport {
        allocation_id: id,
        status: AllocationState::Cancelled,
        job_id: e.request.job_id.clone(),
        waited_seconds: (ts - e.queued_us) as f64 / MICROS_PER_SECOND as f64,
        seq: state.last_seq + 1,
    };
    Ok((vec![body], report))
}

/// A waiting request as an allocation row (state `pending`, nothing held; `resources` what its
/// workers will hold).
fn pending_allocation(s: &State, e: &QueueEntry) -> Allocation {
    let mut a = Allocation::from_cancel(e.seq, e.queued_us, e);
    a.resources = crate::domain::decide::price_queued(s, &e.request).workers;
    a.state = AllocationState::Pending;
    a.preemptible = e.request.preemptible;
    a.created_us = e.queued_us;
    a.ended_us = None;
    a.ended_seq = None;
    a.error = None;
    a
}

fn pending_details(s: &State, id: AllocationId, now: Micros) -> Option<AllocationDetails> {
    let e = s.queue().get(id)?;
    let (position, higher) = s.queue().position(id, now, &s.config.queue)?;
    let mut d = pending_allocation(s, e).details(now);
    d.timestamps.activated_at = None;
    d.timestamps.expires_at = None;
    d.queue_position = Some(position);
    d.waiting_reason = Some(waiting_words(position, higher, &current_reason(s, e)));
    Some(d)
}

/// Why `e` waits now: what is short for it, or that it waits its turn.
fn current_reason(s: &State, e: &QueueEntry) -> String {
    let cost = crate::domain::decide::price_queued(s, &e.request);
    match crate::domain::decide::shortfall(&cost) {
        Some(short) => crate::domain::decide::rejection_message(&short, &cost.usable, e.request.priority),
        None => "it fits, but starting it now would delay the head of the queue".to_string(),
    }
}

/// The outcome of a decided wait, from the state (`None`: still waiting).
fn resolution(
    s: &State,
    id: AllocationId,
    now: Micros,
    known: Option<(u64, Option<RejectReason>)>,
) -> Option<Result<RequestOutcome>> {
    if s.queue().get(id).is_some() {
        return None;
    }
    let Some(a) = s.allocation(id) else { return Some(Err(Error::NotFound(id.to_string()))) };
    let seq = known.map_or_else(|| a.ended_seq.unwrap_or(0), |(seq, _)| seq);
    Some(Ok(match a.state {
        AllocationState::Failed | AllocationState::Cancelled => {
            let reason = known.and_then(|(_, r)| r).unwrap_or(if a.state == AllocationState::Cancelled {
                RejectReason::Cancelled
            } else if a.error.as_deref().is_some_and(|e| e.starts_with("queue_timeout")) {
                RejectReason::QueueTimeout
            } else {
                RejectReason::InsufficientWorkers
            });
            let mut f = FailedReport::replay_of(a, reason, seq);
            f.replayed = false;
            f.status = a.state;
            RequestOutcome::Failed(f)
        }
        _ => {
            let mut g = GrantReport::replay_of(a, seq, now);
            g.replayed = false;
            RequestOutcome::Granted(g)
        }
    }))
}

/// The future of [`Ledger::wait_for_grant`]: resolves with the grant, or the failed report of a
/// queue timeout (reason `queue_timeout`) or a cancel (reason `cancelled`), once durable.
#[must_use = "a wait does nothing until it is awaited"]
pub struct GrantWait {
    ledger: Ledger,
    id: Result<AllocationId>,
    inner: Option<Durable<RequestOutcome>>,
}

impl std::fmt::Debug for GrantWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantWait").field("id", &self.id.as_ref().ok()).finish_non_exhaustive()
    }
}

impl Unpin for GrantWait {}

impl std::future::Future for GrantWait {
    type Output = Result<RequestOutcome>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Result<RequestOutcome>> {
        let this = self.get_mut();
        if let Some(d) = this.inner.as_mut() {
            return std::pin::Pin::new(d).poll(cx);
        }
        let id = match &this.id {
            Ok(id) => *id,
            Err(e) => return Poll::Ready(Err(Error::invalid("allocation_id", e.to_string()))),
        };
        // Registered before looking, so the append that decides it cannot slip in between.
        this.ledger.shared.queue_waiters.register(id, cx.waker());
        let known = this.ledger.shared.queue_waiters.resolved(id);
        let found = {
            let core = lock(&this.ledger.shared.core);
            let now = this.ledger.now_micros().max(core.state.last_ts_us);
            resolution(&core.state, id, now, known)
        };
        match found {
            None => Poll::Pending,
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(outcome)) => {
                // Answered once what decided it is durable: a command that writes nothing and
                // waits for the log's end.
                let mut d = this.ledger.submit(move |_, _| (Ok(outcome), false));
                let r = std::pin::Pin::new(&mut d).poll(cx);
                this.inner = Some(d);
                r
            }
        }
    }
}
