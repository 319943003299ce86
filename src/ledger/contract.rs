//! The scheduler's contract: retry-safe requests (idempotency keys), lease renewal, and plan
//! then act with `expected_seq` (check-and-set). Decided in `domain/decide.rs` and
//! `domain/idempotency.rs`; here they meet the write path (`apply.rs`) and the log.

use super::{lock, Durable, Ledger, RequestFuture};
use crate::domain::idempotency::KeyRecord;
use crate::domain::input::ResourceRequest;
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::state::State;
use crate::report::{
    decide_release, decide_renewal, decide_request_outcome, plan_report, replayed_outcome, CleanupReport, PlanReport,
    ReleaseReport, RenewReport, RequestOutcome,
};
use crate::{Config, Error, Result};
use std::sync::Arc;

/// A request command's answer under the core lock.
pub(super) enum RequestAnswer {
    /// Decided now, or a retry whose allocation is in memory.
    Outcome(RequestOutcome),
    /// A retry whose allocation has left memory: the log has it.
    InLog(KeyRecord),
    /// A retry of a request that waits in the queue: answered by its outcome.
    Waiting(AllocationId),
}

/// The first step of a request: a retry of a decided key is answered as decided (even with a
/// stale `expected_seq`: the retry of a write that succeeded must not fail); then the
/// precondition.
fn check_request(
    state: &State,
    now: crate::Micros,
    req: &ResourceRequest,
    expected_seq: Option<u64>,
) -> Result<Option<RequestAnswer>> {
    if let Some(record) = state.decide_replay(req, now)? {
        if state.queue().get(record.allocation_id).is_some() {
            return Ok(Some(RequestAnswer::Waiting(record.allocation_id)));
        }
        return Ok(Some(match state.allocation(record.allocation_id) {
            Some(a) => RequestAnswer::Outcome(replayed_outcome(a, &record, now)),
            None => RequestAnswer::InLog(record),
        }));
    }
    state.check_expected_seq(expected_seq)?;
    Ok(None)
}

/// The first step of a release: one of an allocation that has ended writes nothing of its own
/// (it is answered `already_*` by the decision, after the expiries due), so it needs no
/// precondition; otherwise the precondition.
fn check_release(state: &State, id: AllocationId, expected_seq: Option<u64>) -> Result<Option<ReleaseReport>> {
    if state.allocation(id).is_some_and(|a| a.state != AllocationState::Active) {
        return Ok(None);
    }
    state.check_expected_seq(expected_seq)?;
    Ok(None)
}

impl Ledger {
    /// `request_resources` with an optional precondition; see [`Ledger::request_resources`].
    pub(super) fn request_checked(&self, req: &ResourceRequest, expected_seq: Option<u64>) -> Result<RequestOutcome> {
        if req.wait {
            match self.request_and_wait(req) {
                // A retry whose allocation left memory: the log has it (below).
                Err(Error::NotFound(_)) if req.idempotency_key.is_some() => {}
                other => return other,
            }
        }
        let req = Arc::new(req.clone());
        let for_decide = req.clone();
        let answer = self.write_checked(
            move |state, now| check_request(state, now, &req, expected_seq),
            // Without `wait`, a preemption with a grace period is not decided here (the call
            // would block on the ledger's clock): `request_or_queue` and `wait` decide it.
            move |state, ts, _| {
                decide_request_outcome(state, ts, &for_decide).map(|(e, o)| (e, RequestAnswer::Outcome(o)))
            },
        )?;
        match answer {
            RequestAnswer::Outcome(o) => Ok(o),
            RequestAnswer::InLog(record) => self.replay_from_log(&record),
            RequestAnswer::Waiting(id) => self.wait_for_grant_blocking(&id.to_string()),
        }
    }

    /// The async form of [`Ledger::request_checked`], `wait` included. A retry whose allocation
    /// has left memory resolves to `NotFound` (the log must be read: blocking);
    /// [`Ledger::request_resources`] answers it.
    pub(super) fn request_checked_async(&self, req: &ResourceRequest, expected_seq: Option<u64>) -> RequestFuture {
        self.request_future(req, expected_seq)
    }

    /// The answer to a retry of `record` whose allocation is no longer in memory, rebuilt from
    /// the log (blocking).
    pub(super) fn replay_from_log(&self, record: &KeyRecord) -> Result<RequestOutcome> {
        let now = self.now_micros();
        match self.find_in_log(record.allocation_id)? {
            Some(a) => Ok(replayed_outcome(&a, record, now)),
            None => Err(Error::NotFound(record.allocation_id.to_string())),
        }
    }

    /// `release_resources` with an optional precondition; see [`Ledger::release_resources`].
    pub(super) fn release_checked(&self, allocation_id: &str, expected_seq: Option<u64>) -> Result<ReleaseReport> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        let result = self.write_checked(
            move |state, _| check_release(state, id, expected_seq),
            move |state, ts, _| decide_release(state, ts, id),
        );
        match result {
            // An allocation that ended long ago is no longer in memory; the log has it.
            Err(Error::NotFound(_)) => self.release_not_in_memory(id),
            other => other,
        }
    }

    /// The async form of [`Ledger::release_checked`] (see [`Ledger::release_resources_async`]).
    pub(super) fn release_checked_async(
        &self,
        allocation_id: &str,
        expected_seq: Option<u64>,
    ) -> Durable<ReleaseReport> {
        match AllocationId::parse("allocation_id", allocation_id) {
            Ok(id) => self.write_async_checked(
                move |state, _| check_release(state, id, expected_seq),
                move |state, ts, _| decide_release(state, ts, id),
            ),
            Err(e) => Durable::ready(self, Err(e)),
        }
    }

    /// `renew_allocation` with an optional precondition; see [`Ledger::renew_allocation`].
    pub(super) fn renew_checked(
        &self,
        allocation_id: &str,
        ttl_seconds: Option<u64>,
        expected_seq: Option<u64>,
    ) -> Result<RenewReport> {
        let id = AllocationId::parse("allocation_id", allocation_id)?;
        let result = self.write_checked(
            move |state, _| state.check_expected_seq(expected_seq).map(|()| None),
            move |state, ts, _| decide_renewal(state, ts, id, ttl_seconds),
        );
        match result {
            // Not in memory: it ended long ago (or never was); the log says which.
            Err(Error::NotFound(_)) => match self.find_in_log(id)? {
                Some(a) => Err(Error::NotActive { allocation_id: id.to_string(), state: a.state.as_str().to_string() }),
                None => Err(Error::NotFound(id.to_string())),
            },
            other => other,
        }
    }

    /// `cleanup_expired` with an optional precondition.
    pub(super) fn cleanup_checked(&self, expected_seq: Option<u64>) -> Result<CleanupReport> {
        self.write_checked(
            move |state, _| state.check_expected_seq(expected_seq).map(|()| None),
            |_, _, expired| Ok((Vec::new(), CleanupReport { cleaned_up: expired.to_vec(), count: expired.len() })),
        )
    }

    /// `reconfigure` with an optional precondition.
    pub(super) fn reconfigure_checked(&self, config: Config, expected_seq: Option<u64>) -> Result<u64> {
        let seq = self.write_checked(
            move |state, _| state.check_expected_seq(expected_seq).map(|()| None),
            move |state, _, _| {
                let body = state.decide_config_change(config)?;
                Ok((vec![body], state.last_seq + 1))
            },
        )?;
        let mut core = lock(&self.shared.core);
        let size = core.state.config.segment_size_bytes;
        if let Some(w) = core.wal.as_mut() {
            w.set_segment_size(size);
        }
        Ok(seq)
    }

    /// `plan_request`; see [`Ledger::plan_request`].
    pub(super) fn plan(&self, req: &ResourceRequest) -> Result<PlanReport> {
        let (planned, seq) = {
            let core = lock(&self.shared.core);
            (plan_report(&core.state, self.shared.clock.now_micros(), req)?, core.state.last_seq)
        };
        if !self.shared.read_only {
            // Like every read: never show a state that is not yet durable.
            self.wait_durable(seq)?;
        }
        match planned {
            Ok(report) => Ok(report),
            // A retry whose allocation has left memory: answered from the log.
            Err(record) => {
                let outcome = self.replay_from_log(&record)?;
                Ok(PlanReport { would_grant: outcome.is_granted(), current_seq: seq, outcome })
            }
        }
    }
}

/// Writes that apply only if the ledger's last sequence number is still `expected_seq`
/// ([`Ledger::if_seq`]); otherwise they fail with [`Error::Conflict`] and write nothing.
///
/// ```
/// use allocation_ledger::storage::MemoryStorage;
/// use allocation_ledger::{Error, Ledger, OpenOptions, ResourceRequest};
/// use std::sync::Arc;
/// let ledger = Ledger::open_with("/l", OpenOptions::default().storage(Arc::new(MemoryStorage::new())))?;
/// let req = ResourceRequest::new("build-42").workers(4);
/// let plan = ledger.plan_request(&req)?;
/// assert!(plan.would_grant);
/// // Act on the plan only if nothing was written since.
/// let granted = ledger.if_seq(plan.current_seq).request_resources(&req)?;
/// assert!(granted.is_granted());
/// // The same precondition again is stale now: a conflict, and nothing written.
/// let stale = ledger.if_seq(plan.current_seq).request_resources(&req);
/// assert!(matches!(stale, Err(Error::Conflict { .. })));
/// # Ok::<(), allocation_ledger::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct IfSeq<'a> {
    pub(super) ledger: &'a Ledger,
    pub(super) expected_seq: u64,
}

impl IfSeq<'_> {
    /// [`Ledger::request_resources`], if the ledger is still at `expected_seq`. A retry of a
    /// request whose idempotency key was decided is answered as decided, whatever the seq.
    pub fn request_resources(&self, req: &ResourceRequest) -> Result<RequestOutcome> {
        self.ledger.request_checked(req, Some(self.expected_seq))
    }

    /// [`Ledger::request_resources_async`], if the ledger is still at `expected_seq`.
    pub fn request_resources_async(&self, req: &ResourceRequest) -> RequestFuture {
        self.ledger.request_checked_async(req, Some(self.expected_seq))
    }

    /// [`Ledger::release_resources`], if the ledger is still at `expected_seq`. Releasing an
    /// allocation that has ended writes nothing and is answered whatever the seq.
    pub fn release_resources(&self, allocation_id: &str) -> Result<ReleaseReport> {
        self.ledger.release_checked(allocation_id, Some(self.expected_seq))
    }

    /// [`Ledger::release_resources_async`], if the ledger is still at `expected_seq`.
    pub fn release_resources_async(&self, allocation_id: &str) -> Durable<ReleaseReport> {
        self.ledger.release_checked_async(allocation_id, Some(self.expected_seq))
    }

    /// [`Ledger::renew_allocation`], if the ledger is still at `expected_seq`.
    pub fn renew_allocation(&self, allocation_id: &str, ttl_seconds: Option<u64>) -> Result<RenewReport> {
        self.ledger.renew_checked(allocation_id, ttl_seconds, Some(self.expected_seq))
    }

    /// [`Ledger::cleanup_expired`], if the ledger is still at `expected_seq`.
    pub fn cleanup_expired(&self) -> Result<CleanupReport> {
        self.ledger.cleanup_checked(Some(self.expected_seq))
    }

    /// [`Ledger::reconfigure`], if the ledger is still at `expected_seq`.
    pub fn reconfigure(&self, config: Config) -> Result<u64> {
        self.ledger.reconfigure_checked(config, Some(self.expected_seq))
    }
}
