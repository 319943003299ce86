//! Allocations rebuilt from the log: the ones a ledger no longer keeps in memory (ended long
//! ago), found by reading the log and decoding only the records that can be about them.

use crate::domain::event::{Event, EventBody};
use crate::domain::model::{AllocationId, AllocationState};
use crate::domain::queue::QueueEntry;
use crate::domain::state::Allocation;
use crate::log::reader::LogReader;
use crate::Result;
use memchr::memmem::Finder;
use std::collections::HashMap;

/// How many bytes of a payload hold its envelope (`{"v":..,"ts_us":..,"type":".."`), where a
/// record's event type can be read without decoding it.
pub const ENVELOPE_BYTES: usize = 80;

/// Which allocations [`rebuild_allocations`] rebuilds.
#[derive(Clone, Copy)]
pub struct AllocationFilter<'a> {
    /// Only this one (the read stops at its end).
    pub allocation_id: Option<AllocationId>,
    /// Only this job's.
    pub job_id: Option<&'a str>,
    /// Leave these out (those the caller has in memory).
    pub skip: &'a dyn Fn(&AllocationId) -> bool,
}

impl std::fmt::Debug for AllocationFilter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllocationFilter")
            .field("allocation_id", &self.allocation_id)
            .field("job_id", &self.job_id)
            .finish()
    }
}

impl<'a> AllocationFilter<'a> {
    /// Just the allocation `id`.
    pub fn one(id: AllocationId) -> AllocationFilter<'a> {
        AllocationFilter { allocation_id: Some(id), job_id: None, skip: &|_| false }
    }

    /// Every allocation (of `job_id`, if given) except those `skip` names.
    pub fn all_but(job_id: Option<&'a str>, skip: &'a dyn Fn(&AllocationId) -> bool) -> AllocationFilter<'a> {
        AllocationFilter { allocation_id: None, job_id, skip }
    }

    fn skips(&self, id: &AllocationId) -> bool {
        self.allocation_id.is_some_and(|only| only != *id) || (self.skip)(id)
    }
}

/// Whether a payload can matter to a rebuild: the only allocation's id is in it; or, for a
/// job's allocations, the job's id is in it or it ends an allocation.
struct Prefilter {
    finder: Option<Finder<'static>>,
    /// Records that end an allocation matter whatever they mention.
    ends_matter: bool,
}

impl Prefilter {
    fn new(filter: &AllocationFilter<'_>) -> Prefilter {
        let needle = match (filter.allocation_id, filter.job_id) {
            (Some(id), _) => Some(format!("\"allocation_id\":\"{id}\"")),
            (None, Some(job)) => Some(format!("\"job_id\":{}", serde_json::Value::from(job))),
            (None, None) => None,
        };
        Prefilter {
            finder: needle.map(|n| Finder::new(n.as_bytes()).into_owned()),
            ends_matter: filter.allocation_id.is_none(),
        }
    }

    fn matters(&self, payload: &[u8]) -> bool {
        let Some(finder) = &self.finder else { return true };
        if self.ends_matter {
            let head = &payload[..payload.len().min(ENVELOPE_BYTES)];
            if memchr::memmem::find(head, b"\"type\":\"released\"").is_some()
                || memchr::memmem::find(head, b"\"type\":\"expired\"").is_some()
                || memchr::memmem::find(head, b"\"type\":\"cancelled\"").is_some()
            {
                return true;
            }
        }
        finder.find(payload).is_some()
    }
}

/// Rebuilds the allocations `filter` names from the records `reader` reads, as they were at
/// its last one. Only records that can be about them are decoded.
pub fn rebuild_allocations(
    reader: &LogReader<'_>,
    filter: &AllocationFilter<'_>,
) -> Result<HashMap<AllocationId, Allocation>> {
    let prefilter = Prefilter::new(filter);
    let mut found = HashMap::new();
    // Requests waiting in the queue as of the record being read: a `cancelled` event ends one.
    let mut waiting = HashMap::new();
    reader.records(&mut |pos, payload| {
        if !prefilter.matters(payload) {
            return Ok(true);
        }
        let ev = Event::decode(payload)?;
        // The only allocation wanted has ended: nothing later is about it.
        let done =
            filter.allocation_id.is_some_and(|id| ends_allocation(&ev.body) && ev.body.allocation_id() == Some(id));
        if !fold_waiting(&mut found, &mut waiting, |id| filter.skips(id), filter.job_id, pos.seq, &ev) {
            fold_rebuilt(&mut found, |id| filter.skips(id), filter.job_id, pos.seq, ev);
        }
        Ok(!done)
    })?;
    Ok(found)
}

/// Whether `body` leaves its allocation in a terminal state (nothing later is about it).
fn ends_allocation(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::Rejected(_)
            | EventBody::Released { .. }
            | EventBody::Expired { .. }
            | EventBody::Cancelled { .. }
            | EventBody::Preempted(_)
    )
}

/// Folds the queue's events: a `queued` request (of `job_id`, not in `skip`) is remembered
/// until it is decided, and a `cancelled` one becomes the ended allocation the live fold keeps
/// (state `cancelled`). Grants and rejections from the queue are folded as any other; this
/// only forgets the wait. `false`: not a queue event, fold it as usual.
fn fold_waiting(
    found: &mut HashMap<AllocationId, Allocation>,
    waiting: &mut HashMap<AllocationId, QueueEntry>,
    skip: impl Fn(&AllocationId) -> bool,
    job_id: Option<&str>,
    seq: u64,
    ev: &Event,
) -> bool {
    match &ev.body {
        EventBody::Queued(q) => {
            if !skip(&q.allocation_id) && job_id.is_none_or(|j| q.job_id == j) {
                waiting.insert(q.allocation_id, QueueEntry { seq, queued_us: ev.ts_us, request: q.clone() });
            }
            true
        }
        EventBody::Cancelled { allocation_id } => {
            if let Some(e) = waiting.remove(allocation_id) {
                found.insert(*allocation_id, Allocation::from_cancel(seq, ev.ts_us, &e));
            }
            true
        }
        EventBody::Granted(g) => {
            waiting.remove(&g.allocation_id);
            false
        }
        EventBody::Rejected(r) => {
            waiting.remove(&r.allocation_id);
            false
        }
        _ => false,
    }
}

/// Folds one logged event into allocations being rebuilt from the log: grants and rejections
/// of `job_id` (any job if `None`) not in `skip` start one, releases and expiries end one.
fn fold_rebuilt(
    found: &mut HashMap<AllocationId, Allocation>,
    skip: impl Fn(&AllocationId) -> bool,
    job_id: Option<&str>,
    seq: u64,
    ev: Event,
) {
    match ev.body {
        EventBody::Granted(g) if !skip(&g.allocation_id) && job_id.is_none_or(|j| g.job_id == j) => {
            found.insert(g.allocation_id, Allocation::from_grant_owned(ev.ts_us, g));
        }
        EventBody::Rejected(r) if !skip(&r.allocation_id) && job_id.is_none_or(|j| r.job_id == j) => {
            found.insert(r.allocation_id, Allocation::from_rejection(seq, ev.ts_us, &r));
        }
        EventBody::Released { allocation_id } => {
            if let Some(a) = found.get_mut(&allocation_id).filter(|a| a.state == AllocationState::Active) {
                a.end(seq, ev.ts_us, AllocationState::Released);
            }
        }
        EventBody::Expired { allocation_id, deadline_us } => {
            if let Some(a) = found.get_mut(&allocation_id).filter(|a| a.state == AllocationState::Active) {
                a.end(seq, deadline_us, AllocationState::Expired);
            }
        }
        EventBody::Renewed(r) => {
            if let Some(a) = found.get_mut(&r.allocation_id).filter(|a| a.state == AllocationState::Active) {
                a.renew(r.deadline_us);
            }
        }
        EventBody::Preempted(p) => {
            if let Some(a) = found.get_mut(&p.allocation_id).filter(|a| a.state == AllocationState::Active) {
                a.preempt = Some(crate::domain::preempt::PreemptMark { by: p.preemptor, deadline_us: ev.ts_us });
                a.end(seq, ev.ts_us, AllocationState::Preempted);
            }
        }
        _ => {}
    }
}
