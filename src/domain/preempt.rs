//! Priority preemption (issue 17 §2): which active allocations a request preempts, the grace
//! they get, and the events that record it (`preempting`, `preempted`); `docs/policy.md` §2.
//!
//! - **Grace 0**: the victims' `preempted` events and the preemptor's `granted` are written by
//!   the same command.
//! - **Grace > 0**: one `preempting` event queues the preemptor (it waits in the fair queue,
//!   `pending`) and marks its victims `preempting` until the deadline; they keep their
//!   resources so their jobs can checkpoint. What a victim frees early is kept for the
//!   preemptor ([`State::kept_for_preemptors`]); the queue's own decisions pass preemptors
//!   over. When the deadline passes (the expiry sweep) the victims still holding get
//!   `preempted` and the preemptor is granted in the same command; once every victim has
//!   ended early (released, expired) it is granted at once.
//! - The preemptor leaving the queue otherwise (cancelled, `queue_timeout`) ends the
//!   preemption: its victims are `active` again (the fold does it on that event).
//! - A victim in grace cannot be renewed (an error naming its state `preempting`), may be
//!   released, and expires at its own deadline if that comes first.
//!
//! The rule: a request whose priority's policy is `preempt_lower` and that does not fit may
//! preempt active allocations of *strictly lower* priority. Candidates are ordered lowest
//! priority first, then newest first (latest `created_us`, then the larger id: deterministic);
//! the shortest prefix of that order whose release makes the request fit is taken, then any
//! victim the request can do without is dropped again, latest chosen first (so the set is
//! minimal: no victim can be spared). If even every candidate together would not make it fit,
//! nothing is preempted.
//!
//! Default policy: `critical` and `high` preempt lower priorities, `normal` and `low` never. A
//! pool shared by teams needs urgent work to get through without an operator; `normal` work
//! preempting `low` would turn every busy hour into churn, and `low` has nothing below it.

use crate::domain::clock::{Micros, MICROS_PER_SECOND};
use crate::domain::event::{EventBody, Grant, RejectReason};
use crate::domain::input::ResourceRequest;
use crate::domain::model::{AllocationId, Priority, Resources};
use crate::domain::queue::Queued;
use crate::domain::state::{Allocation, State};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Serde's default for the `preemptible` flags.
pub(crate) fn yes() -> bool {
    true
}

/// The `preemptible` flags are written only when `false`.
#[allow(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
pub(crate) fn is_true(b: &bool) -> bool {
    *b
}

/// `a - b`, each resource at least 0.
pub(crate) fn sat_sub(a: Resources, b: Resources) -> Resources {
    Resources {
        workers: a.workers.saturating_sub(b.workers),
        cpu_millicores: a.cpu_millicores.saturating_sub(b.cpu_millicores),
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
    }
}

/// The `preempting` event: a request preempts `victims` with a grace period, and waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preempting {
    /// The preemptor: the allocation id its grant will have.
    pub preemptor: AllocationId,
    /// The preemptor's job.
    pub job_id: String,
    /// The preemptor's priority.
    pub priority: Priority,
    /// The allocations preempted, in the order chosen.
    pub victims: Vec<AllocationId>,
    /// The grace the victims get.
    pub grace_seconds: u64,
    /// When the grace ends: the victims still holding are then preempted.
    pub deadline_us: Micros,
    /// The preemptor's request, queued as a `queued` event would queue it.
    pub request: Queued,
}

/// The `preempted` event: a victim stopped holding its resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preempted {
    /// The victim.
    pub allocation_id: AllocationId,
    /// The allocation that preempted it.
    pub preemptor: AllocationId,
    /// The preemptor's job.
    pub preemptor_job_id: String,
    /// The preemptor's priority.
    pub preemptor_priority: Priority,
    /// The grace the victim had (0: preempted at once).
    pub grace_seconds: u64,
}

/// On a victim: who preempts it and when its grace ends (kept once it is preempted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreemptMark {
    /// The preemptor.
    pub by: AllocationId,
    /// The end of the grace.
    pub deadline_us: Micros,
}

/// A preemption in grace, as the state keeps it (snapshots carry it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPreemption {
    /// The preemptor (waiting in the queue).
    pub preemptor: AllocationId,
    /// Its job.
    pub job_id: String,
    /// Its priority.
    pub priority: Priority,
    /// The victims still holding their resources.
    pub victims: BTreeSet<AllocationId>,
    /// When the grace ends.
    pub deadline_us: Micros,
    /// The grace given.
    pub grace_seconds: u64,
    /// What the preemptor's workers need (kept for it as its victims free it).
    pub workers: Resources,
}

/// What a priority may do when it does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptPolicy {
    /// Wait or fail; never preempt.
    Never,
    /// Preempt allocations of strictly lower priority.
    PreemptLower,
}

/// The policy of each priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreemptionPolicy {
    /// `low` requests.
    pub low: PreemptPolicy,
    /// `normal` requests.
    pub normal: PreemptPolicy,
    /// `high` requests.
    pub high: PreemptPolicy,
    /// `critical` requests.
    pub critical: PreemptPolicy,
}

impl Default for PreemptionPolicy {
    fn default() -> Self {
        PreemptionPolicy {
            low: PreemptPolicy::Never,
            normal: PreemptPolicy::Never,
            high: PreemptPolicy::PreemptLower,
            critical: PreemptPolicy::PreemptLower,
        }
    }
}

impl PreemptionPolicy {
    /// The policy of `priority`.
    pub fn of(&self, priority: Priority) -> PreemptPolicy {
        match priority {
            Priority::Low => self.low,
            Priority::Normal => self.normal,
            Priority::High => self.high,
            Priority::Critical => self.critical,
        }
    }
}

fn covers(have: Resources, need: Resources) -> bool {
    need.workers <= have.workers && need.cpu_millicores <= have.cpu_millicores && need.memory_mib <= have.memory_mib
}

/// The preemption order: lowest priority first, then newest first.
fn order_key(a: &Allocation) -> (Priority, std::cmp::Reverse<(crate::Micros, AllocationId)>) {
    (a.priority, std::cmp::Reverse((a.created_us, a.id)))
}

impl State {
    /// The victims a request of `priority` needing `needed` would preempt, given `usable` (what
    /// its priority may take now): `None` if its policy is `never`, if it fits already, or if no
    /// set of strictly lower-priority allocations makes it fit. `protected` allocations are
    /// never chosen.
    pub fn choose_victims(
        &self,
        policy: &PreemptionPolicy,
        priority: Priority,
        needed: Resources,
        usable: Resources,
        protected: &dyn Fn(AllocationId) -> bool,
    ) -> Option<Vec<AllocationId>> {
        if policy.of(priority) == PreemptPolicy::Never || covers(usable, needed) {
            return None;
        }
        let mut candidates: Vec<&Allocation> = self
            .allocations()
            .filter(|a| a.state == crate::AllocationState::Active && a.priority < priority && !protected(a.id))
            .collect();
        candidates.sort_by_key(|a| order_key(a));
        let mut have = usable;
        let mut chosen = Vec::new();
        for a in candidates {
            have = have.checked_add(a.resources).unwrap_or(have);
            chosen.push(a);
            if covers(have, needed) {
                break;
            }
        }
        if !covers(have, needed) {
            return None;
        }
        // Spare whoever is not needed, latest chosen first.
        let mut i = chosen.len();
        while i > 0 {
            i -= 1;
            if let Some(without) = have.checked_sub(chosen[i].resources).filter(|w| covers(*w, needed)) {
                have = without;
                chosen.remove(i);
            }
        }
        Some(chosen.into_iter().map(|a| a.id).collect())
    }
}

impl State {
    /// Whether `id` waits for victims of its preemption to end (the queue passes it over).
    pub fn is_preempting_for(&self, id: AllocationId) -> bool {
        self.preemptions.get(&id).is_some_and(|p| !p.victims.is_empty())
    }

    /// The preemptions in grace, by preemptor.
    pub fn preemptions(&self) -> impl Iterator<Item = &PendingPreemption> {
        self.preemptions.values()
    }

    /// What is free but kept for preemptors in grace: for each, what it needs beyond what its
    /// victims still hold. Nobody else may take it (requests, the queue, backfill).
    pub fn kept_for_preemptors(&self) -> Resources {
        let mut kept = Resources::default();
        for p in self.preemptions.values().filter(|p| !p.victims.is_empty()) {
            let held = p
                .victims
                .iter()
                .filter_map(|v| self.allocation(*v))
                .fold(Resources::default(), |acc, a| acc.checked_add(a.resources).unwrap_or(acc));
            kept = kept.checked_add(sat_sub(p.workers, held)).unwrap_or(kept);
        }
        kept
    }

    /// The earliest end of a grace still running.
    pub fn next_preempt_deadline(&self) -> Option<Micros> {
        self.preemptions.values().filter(|p| !p.victims.is_empty()).map(|p| p.deadline_us).min()
    }

    /// Whether requests of `priority` may preempt (the config's policy).
    pub fn may_preempt(&self, priority: Priority) -> bool {
        self.config.preemption.of(priority) == PreemptPolicy::PreemptLower
    }

    /// [`State::decide_admission`] with preemption: a request that does not fit, whose
    /// priority preempts lower ones, takes the victims [`State::choose_victims`] picks if the
    /// request would then be granted (quota, reservations and the queue's head included).
    /// Grace 0: the victims' `preempted` events, then the grant. Grace > 0: one `preempting`
    /// event (only if `allow_grace`; otherwise, as when no victims make it fit, the decision
    /// without preemption).
    pub fn decide_admission_preempting(
        &self,
        req: &ResourceRequest,
        now: Micros,
        allow_grace: bool,
    ) -> Result<Vec<EventBody>> {
        let id = self.next_allocation_id();
        let base = self.decide_admission(req, now, id)?;
        let grace = self.config.preemption_grace_seconds;
        let quota = matches!(&base, EventBody::Rejected(r) if r.reason == RejectReason::Quota);
        if !self.may_preempt(req.priority)
            || quota
            || matches!(base, EventBody::Granted(_))
            || (grace > 0 && !allow_grace)
        {
            return Ok(vec![base]);
        }
        Ok(self.try_preemption(req, now, id, grace)?.unwrap_or_else(|| vec![base]))
    }

    fn try_preemption(
        &self,
        req: &ResourceRequest,
        now: Micros,
        id: AllocationId,
        grace: u64,
    ) -> Result<Option<Vec<EventBody>>> {
        let valid = crate::domain::input::validate(req, &self.config)?;
        let cost = crate::domain::decide::price(&valid, self);
        if crate::domain::decide::shortfall(&cost).is_none() {
            return Ok(None);
        }
        let u = cost.usable;
        let usable = Resources {
            workers: u32::try_from(u.workers).unwrap_or(u32::MAX),
            cpu_millicores: u.cpu_millicores,
            memory_mib: u.memory_mib,
        };
        let protected = |v: AllocationId| self.allocation(v).is_none_or(|a| !a.preemptible || a.preempt.is_some());
        let Some(victims) = self.choose_victims(&self.config.preemption, req.priority, cost.needed, usable, &protected)
        else {
            return Ok(None);
        };
        // Decided again as if the victims were gone: it must then be granted outright.
        let mut after = self.clone();
        let mut preempted: Vec<Preempted> = victims
            .iter()
            .map(|&v| Preempted {
                allocation_id: v,
                preemptor: id,
                preemptor_job_id: req.job_id.clone(),
                preemptor_priority: req.priority,
                grace_seconds: grace,
            })
            .collect();
        for p in &preempted {
            after.evolve_owned(after.last_seq + 1, now, EventBody::Preempted(p.clone()));
        }
        let mut now_only = req.clone();
        now_only.wait = false;
        let grant_id = if grace == 0 { after.next_allocation_id() } else { id };
        let EventBody::Granted(grant) = after.decide_admission(&now_only, now, grant_id)? else { return Ok(None) };
        if grace == 0 {
            let mut events: Vec<EventBody> =
                preempted.drain(..).map(|p| EventBody::Preempted(Preempted { preemptor: grant_id, ..p })).collect();
            events.push(EventBody::Granted(grant));
            return Ok(Some(events));
        }
        let mut waiting = req.clone();
        waiting.wait = true;
        let EventBody::Queued(mut request) = self.decide_admission(&waiting, now, id)? else { return Ok(None) };
        let deadline_us = now + i64::try_from(grace).unwrap_or(i64::MAX / 2 / MICROS_PER_SECOND) * MICROS_PER_SECOND;
        request.waiting_reason = format!(
            "preempting {} allocation(s) until {}",
            victims.len(),
            crate::domain::clock::format_micros(deadline_us)
        );
        Ok(Some(vec![EventBody::Preempting(Preempting {
            preemptor: id,
            job_id: req.job_id.clone(),
            priority: req.priority,
            victims,
            grace_seconds: grace,
            deadline_us,
            request,
        })]))
    }

    /// The `preempted` events of the victims whose grace is over at `now` (the expiry sweep).
    pub fn decide_preemptions_due(&self, now: Micros) -> Vec<EventBody> {
        let mut events = Vec::new();
        for p in self.preemptions.values().filter(|p| p.deadline_us <= now) {
            for &v in &p.victims {
                events.push(EventBody::Preempted(Preempted {
                    allocation_id: v,
                    preemptor: p.preemptor,
                    preemptor_job_id: p.job_id.clone(),
                    preemptor_priority: p.priority,
                    grace_seconds: p.grace_seconds,
                }));
            }
        }
        events
    }

    /// The grant of a preemptor none of whose victims holds anything any more, if it fits now.
    pub fn decide_preemptor_grant(&self, now: Micros) -> Option<Grant> {
        self.preemptions.values().filter(|p| p.victims.is_empty()).find_map(|p| {
            let e = self.queue().get(p.preemptor)?;
            self.queued_fits_now(e, now)
                .then(|| self.grant_queued(e, crate::domain::decide::price_queued(self, &e.request), now))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::Micros;
    use crate::domain::config::Config;
    use crate::domain::event::EventBody;
    use crate::domain::input::ResourceRequest;
    use proptest::prelude::*;

    const T0: Micros = Micros::from_micros(1_767_225_600_000_000);

    fn state_with(grants: &[(u32, Priority)]) -> State {
        let cfg = Config { priority_reserve_percent: Default::default(), ..Config::default() };
        let mut cfg = cfg;
        cfg.priority_reserve_percent.low = 0;
        let mut s = State::empty(cfg.clone());
        s.evolve(1, T0, &EventBody::LedgerCreated { ledger_id: "p".into(), config: cfg });
        for (i, &(workers, priority)) in grants.iter().enumerate() {
            let t = T0 + (i as i64 + 1) * 1_000;
            let req = ResourceRequest::new(format!("j{i}")).workers(workers).priority(priority);
            let body = s.decide_request(&req, t, s.next_allocation_id()).unwrap();
            s.evolve(s.last_seq + 1, t, &body);
        }
        s
    }

    fn free(s: &State) -> Resources {
        s.available()
    }

    fn need(workers: u32) -> Resources {
        Resources { workers, cpu_millicores: u64::from(workers) * 1_000, memory_mib: u64::from(workers) * 2_048 }
    }

    #[test]
    fn lowest_priority_then_newest_and_no_more_than_needed() {
        let s = state_with(&[(3, Priority::Low), (3, Priority::Normal), (2, Priority::Low), (2, Priority::High)]);
        let policy = PreemptionPolicy::default();
        let v = s.choose_victims(&policy, Priority::Critical, need(2), free(&s), &|_| false).unwrap();
        // Nothing is free; the newest low one (2 workers) is enough.
        let newest_low = s.allocations().filter(|a| a.priority == Priority::Low).max_by_key(|a| a.created_us).unwrap();
        assert_eq!(v, vec![newest_low.id]);
        // `normal` never preempts by default.
        assert!(s.choose_victims(&policy, Priority::Normal, need(2), free(&s), &|_| false).is_none());
        // `high` cannot make room for 9 from strictly lower priorities (8 held below high).
        assert!(s.choose_victims(&policy, Priority::High, need(9), free(&s), &|_| false).is_none());
    }

    fn priority() -> impl Strategy<Value = Priority> {
        prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High), Just(Priority::Critical)]
    }

    proptest! {
        /// Only strictly lower priorities are preempted; the victims make it fit and none of
        /// them could be spared; no victims means no strictly lower set would do.
        #[test]
        fn only_strictly_lower_priorities_are_preempted(
            grants in prop::collection::vec((1..=3u32, priority()), 0..8),
            asked in (1..=10u32, priority()),
        ) {
            let s = state_with(&grants);
            let policy = PreemptionPolicy { low: PreemptPolicy::PreemptLower, normal: PreemptPolicy::PreemptLower, ..Default::default() };
            let (workers, p) = asked;
            let usable = free(&s);
            let lower: Resources = s.allocations()
                .filter(|a| a.state == crate::AllocationState::Active && a.priority < p)
                .fold(usable, |acc, a| acc.checked_add(a.resources).unwrap());
            match s.choose_victims(&policy, p, need(workers), usable, &|_| false) {
                Some(v) => {
                    let mut have = usable;
                    for id in &v {
                        let a = s.allocation(*id).unwrap();
                        prop_assert!(a.priority < p, "{:?} preempted for {:?}", a.priority, p);
                        have = have.checked_add(a.resources).unwrap();
                    }
                    prop_assert!(covers(have, need(workers)));
                    for id in &v {
                        let spared = have.checked_sub(s.allocation(*id).unwrap().resources).unwrap();
                        prop_assert!(!covers(spared, need(workers)), "{} could be spared", id);
                    }
                }
                None => prop_assert!(covers(usable, need(workers)) || !covers(lower, need(workers))),
            }
        }
    }
}
