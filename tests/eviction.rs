//! Ended allocations beyond `terminal_retained` leave memory; every query about them is still
//! answered, from the log, exactly as it was while they were in memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    AllocationState, Config, Error, Ledger, ManualClock, OpenOptions, RequestOutcome, ResourceRequest,
};
use std::collections::BTreeMap;
use std::sync::Arc;

fn open(storage: &FaultyStorage, clock: &ManualClock, retained: u64) -> Ledger {
    let config =
        Config { terminal_retained: retained, snapshot_every: 5, segment_size_bytes: 4096, ..Config::default() };
    let opts = OpenOptions::default().config(config).storage(Arc::new(storage.clone())).clock(Arc::new(clock.clone()));
    Ledger::open_with("/ledger", opts).unwrap()
}

#[test]
fn evicted_allocations_are_answered_from_the_log() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    // The same history twice: once keeping everything in memory, once keeping 2 ended ones.
    let everything = open(&FaultyStorage::new(), &clock.clone(), 1_000_000);
    let window = open(&storage, &clock, 2);
    let mut ids = Vec::new();
    for i in 0..12u32 {
        clock.advance_seconds(1);
        let req = ResourceRequest::new(format!("job-{}", i % 3)).workers(1 + i % 4).ttl_seconds(60 + u64::from(i));
        let a = window.request_resources(&req).unwrap();
        let b = everything.request_resources(&req).unwrap();
        assert_eq!(a.is_granted(), b.is_granted());
        ids.push((a.allocation_id().to_string(), b.allocation_id().to_string()));
        if i % 3 == 0 {
            clock.advance_seconds(1);
            window.release_resources(&ids[i as usize].0).unwrap();
            everything.release_resources(&ids[i as usize].1).unwrap();
        }
    }
    clock.advance_seconds(100); // the rest expire
    window.cleanup_expired().unwrap();
    everything.cleanup_expired().unwrap();
    assert!(window.with_state(allocation_ledger::State::evicted_count) >= 9, "most ended allocations left memory");
    assert!(window.with_state(|s| s.allocations().count()) <= 2);
    assert_eq!(everything.with_state(allocation_ledger::State::evicted_count), 0);

    // Ids differ between the two ledgers (they are derived from the ledger's id), so compare
    // everything but the id.
    let strip = |v: serde_json::Value| {
        let mut v = v;
        v.as_object_mut().unwrap().remove("allocation_id");
        v
    };
    for (w, e) in &ids {
        let dw = window.get_allocation(w).unwrap().expect("found in the log");
        let de = everything.get_allocation(e).unwrap().unwrap();
        assert_eq!(strip(serde_json::to_value(&dw).unwrap()), strip(serde_json::to_value(&de).unwrap()));
        let rw = window.release_resources(w).unwrap();
        let re = everything.release_resources(e).unwrap();
        assert!(rw.status.as_str().starts_with("already_"), "{rw:?}");
        assert_eq!(strip(serde_json::to_value(&rw).unwrap()), strip(serde_json::to_value(&re).unwrap()));
    }
    for state in [None, Some(AllocationState::Released), Some(AllocationState::Expired), Some(AllocationState::Failed)]
    {
        for job in [None, Some("job-1")] {
            let lw = window.list_allocations(state, job).unwrap();
            let le = everything.list_allocations(state, job).unwrap();
            let summary = |rows: Vec<allocation_ledger::AllocationSummary>| {
                rows.into_iter().map(|r| (r.created_at, r.job_id, r.state, r.workers)).collect::<Vec<_>>()
            };
            assert_eq!(summary(lw), summary(le), "{state:?} {job:?}");
        }
    }
    assert_eq!(window.get_capacity().unwrap().available_workers, 10);
    // A well-formed id that never existed is still not found.
    assert!(matches!(window.release_resources("alloc-000000000000"), Err(Error::NotFound(_))));
    assert_eq!(window.get_allocation("alloc-000000000000").unwrap(), None);

    // Reopen (snapshot + tail) and full replay agree, eviction included.
    let before = window.with_state(std::clone::Clone::clone);
    drop(window);
    let reopened = open(&storage, &clock, 2);
    assert!(reopened.recovery_report().snapshot_seq.is_some());
    assert_eq!(reopened.with_state(std::clone::Clone::clone), before);
}

#[test]
fn ids_stay_unique_across_a_long_history() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, 3);
    let mut seen = BTreeMap::new();
    for i in 0..300 {
        clock.advance_seconds(1);
        let o = ledger.request_resources(&ResourceRequest::new("j").workers(1)).unwrap();
        let RequestOutcome::Granted(g) = o else { panic!("{o:?}") };
        assert!(seen.insert(g.allocation_id, i).is_none(), "id {} reused", g.allocation_id);
        ledger.release_resources(&g.allocation_id.to_string()).unwrap();
    }
}
