//! Priority preemption (issue 17 §2), the pure decision only: which active allocations a
//! request would preempt. Not wired into the write path yet (no `preempting` state, grace or
//! `preempted` events): see the report of the helper that wrote it.
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

use crate::domain::model::{AllocationId, Priority, Resources};
use crate::domain::state::{Allocation, State};
use serde::{Deserialize, Serialize};

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
