//! Advance reservations under random sequences of reserve, cancel, request, release, renew and
//! clock advances (manual clock): the pool is never over-committed counting reservations (at
//! every instant from now on, what is held plus what reservations keep unused fits the pool),
//! nobody but a holder holds reserved capacity during a window, replay equals the live state
//! at every step, and a snapshot round trip gives the same state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::testing::snapshot;
use allocation_ledger::{
    AllocationState, Clock, Config, Ledger, ManualClock, Micros, ReservationRequest, ResourceRequest, State,
};
use common::{all_events, fold, mem_options, MEM_DIR};
use proptest::prelude::*;
use std::collections::BTreeMap;

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
/// Job `j{k}` always runs for tenant `t{k % 3}`.
const JOBS: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Reserve { job: Option<usize>, tenant: usize, workers: u32, start_in: u64, duration: u64 },
    Cancel(usize),
    Request { job: usize, workers: u32, ttl: u64 },
    Release(usize),
    Renew(usize, u64),
    Advance(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (prop::option::of(0..JOBS), 0..3usize, 1u32..7, 0u64..900, 30u64..900).prop_map(
            |(job, tenant, workers, start_in, duration)| Op::Reserve { job, tenant, workers, start_in, duration }
        ),
        1 => (0usize..16).prop_map(Op::Cancel),
        5 => (0..JOBS, 1u32..6, 10u64..900).prop_map(|(job, workers, ttl)| Op::Request { job, workers, ttl }),
        2 => (0usize..32).prop_map(Op::Release),
        1 => (0usize..32, 10u64..900).prop_map(|(i, ttl)| Op::Renew(i, ttl)),
        2 => (1i64..400).prop_map(Op::Advance),
    ]
}

fn config() -> Config {
    Config { min_ttl_seconds: 10, snapshot_every: 0, ..Config::default() }
}

fn job_name(k: usize) -> String {
    format!("j{k}")
}

fn tenant_of_job(job: &str) -> &'static str {
    let k: usize = job[1..].parse().unwrap();
    TENANTS[k % 3]
}

/// The rule checked independently of the ledger's code: at `t`, workers held by allocations
/// alive then plus what the reservations in force leave unused (job reservations filled first
/// by their job's allocations, then tenant ones by the rest of the tenant's), against the
/// pool; and the workers held by allocations no reservation in force covers, against the pool
/// less everything reserved.
fn check_at(state: &State, t: Micros) -> Result<(), String> {
    let pool = state.config.worker_slots;
    let alive: Vec<_> =
        state.allocations().filter(|a| a.state == AllocationState::Active && a.deadline_us > t).collect();
    let held: u32 = alive.iter().map(|a| a.resources.workers).sum();
    let in_force: Vec<_> = state.reservations_at(t).into_iter().filter(|r| r.in_force_at(t)).collect();
    let mut job_left: BTreeMap<String, u32> = BTreeMap::new();
    let mut tenant_left: BTreeMap<String, u32> = BTreeMap::new();
    for r in &in_force {
        match (&r.job_id, &r.tenant) {
            (Some(j), _) => *job_left.entry(j.clone()).or_default() += r.resources.workers,
            (None, Some(x)) => *tenant_left.entry(x.clone()).or_default() += r.resources.workers,
            _ => unreachable!(),
        }
    }
    let reserved: u32 = job_left.values().chain(tenant_left.values()).sum();
    let mut uncovered = 0;
    for a in &alive {
        let mut rest = a.resources.workers;
        let covered_job = job_left.contains_key(&a.job_id);
        let covered_tenant = a.tenant.as_ref().is_some_and(|x| tenant_left.contains_key(x));
        if let Some(left) = job_left.get_mut(&a.job_id) {
            let take = (*left).min(rest);
            *left -= take;
            rest -= take;
        }
        if let Some(left) = a.tenant.as_ref().and_then(|x| tenant_left.get_mut(x)) {
            let take = (*left).min(rest);
            *left -= take;
        }
        if !covered_job && !covered_tenant {
            uncovered += a.resources.workers;
        }
    }
    let unused: u32 = job_left.values().chain(tenant_left.values()).sum();
    if held + unused > pool {
        return Err(format!("at {t:?}: held {held} + reserved unused {unused} > pool {pool}"));
    }
    if uncovered > pool.saturating_sub(reserved) {
        return Err(format!("at {t:?}: non-holders hold {uncovered}, more than the {pool} - {reserved} unreserved"));
    }
    Ok(())
}

/// The rule at every instant from `from` on where the left side can change.
fn check_from(state: &State, from: Micros) -> Result<(), String> {
    let mut instants = vec![from];
    instants.extend(state.reservations_at(from).iter().flat_map(|r| [r.start_us, r.end_us]));
    instants.extend(state.allocations().filter(|a| a.state == AllocationState::Active).map(|a| a.deadline_us));
    instants.retain(|&t| t >= from);
    for t in instants {
        check_at(state, t)?;
    }
    Ok(())
}

fn apply(ledger: &Ledger, clock: &ManualClock, op: &Op, reservations: &mut Vec<String>, allocs: &mut Vec<String>) {
    match op {
        Op::Reserve { job, tenant, workers, start_in, duration } => {
            let req = match job {
                Some(k) => ReservationRequest::for_job(job_name(*k), *workers),
                None => ReservationRequest::for_tenant(TENANTS[*tenant], *workers),
            };
            let r = ledger.reserve(&req.window_seconds(*start_in, *duration)).unwrap();
            reservations.push(r.reservation.reservation_id);
        }
        Op::Cancel(i) => {
            if let Some(id) = reservations.get(*i % reservations.len().max(1)) {
                // Cancelled or over already: invalid input, nothing written.
                let _ = ledger.cancel_reservation(id);
            }
        }
        Op::Request { job, workers, ttl } => {
            let name = job_name(*job);
            let req =
                ResourceRequest::new(name.clone()).workers(*workers).ttl_seconds(*ttl).tenant(tenant_of_job(&name));
            let o = ledger.request_resources(&req).unwrap();
            if o.is_granted() {
                allocs.push(o.allocation_id().to_string());
            }
        }
        Op::Release(i) => {
            if let Some(id) = allocs.get(*i % allocs.len().max(1)) {
                ledger.release_resources(id).unwrap();
            }
        }
        Op::Renew(i, ttl) => {
            if let Some(id) = allocs.get(*i % allocs.len().max(1)) {
                // Ended, past its lifetime, or into a window it does not fit beside: refused.
                let _ = ledger.renew_allocation(id, Some(*ttl));
            }
        }
        Op::Advance(s) => clock.advance_seconds(*s),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn reservations_are_never_over_committed(ops in prop::collection::vec(op(), 1..50)) {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let ledger = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config())).unwrap();
        let (mut reservations, mut allocs) = (Vec::new(), Vec::new());
        for op in &ops {
            apply(&ledger, &clock, op, &mut reservations, &mut allocs);
            let live = ledger.with_state(Clone::clone);
            let from = clock.now_micros().max(live.last_ts_us);
            if let Err(why) = check_from(&live, from) {
                prop_assert!(false, "after {op:?}: {why}");
            }
            prop_assert_eq!(&fold(&all_events(&ledger)), &live, "replay differs after {:?}", op);
            let bytes = snapshot::encode(&live.to_data());
            prop_assert_eq!(&snapshot::decode(&bytes, live.last_seq).unwrap(), &live);
            let cap = ledger.get_capacity().unwrap();
            prop_assert!(cap.allocated_workers <= cap.total_workers);
        }
    }
}
