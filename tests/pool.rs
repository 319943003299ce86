//! Changing the pool (issue 16 §2): drain, undrain, remove and add workers, and the MCP catalog,
//! through the library and the real binary. Every change is a recorded `config_changed` event,
//! so time travel, the timeline and replay know the pool as it was at each instant; a property
//! test interleaves random pool changes with grants and releases and checks the fold, the
//! capacity index and a replay against each other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    Clock, Config, EventBody, Ledger, LoggedEvent, ManualClock, OpenOptions, PoolChange, RequestOutcome,
    ResourceRequest, State, WhatIfOptions,
};
use proptest::prelude::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn config() -> Config {
    Config {
        total_cpu_millicores: 8_000,
        total_memory_mib: 16_384,
        worker_slots: 6,
        worker_cpu_millicores: 1_000,
        worker_memory_mib: 2_048,
        snapshot_every: 5,
        segment_size_bytes: 4096,
        terminal_retained: 4,
        ..Config::default()
    }
}

fn open(storage: &FaultyStorage, clock: &ManualClock) -> Ledger {
    let opts =
        OpenOptions::default().config(config()).clock(Arc::new(clock.clone())).storage(Arc::new(storage.clone()));
    Ledger::open_with(PathBuf::from("/ledger"), opts).expect("open")
}

fn grant(ledger: &Ledger, job: &str, workers: u32) -> (String, Vec<u32>) {
    match ledger.request_resources(&ResourceRequest::new(job).workers(workers).ttl_seconds(600)).unwrap() {
        RequestOutcome::Granted(g) => {
            let slots = g.workers_allocated.iter().map(|w| w.worker_id[7..].parse().unwrap()).collect();
            (g.allocation_id.to_string(), slots)
        }
        RequestOutcome::Failed(f) => panic!("{job}: not granted: {}", f.error),
    }
}

fn change(ledger: &Ledger, c: PoolChange) -> allocation_ledger::Result<u64> {
    ledger.change_pool(&c, None, false).map(|r| r.seq)
}

#[test]
fn a_drained_worker_is_kept_by_its_holder_and_leaves_the_pool_when_freed() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let ledger = open(&storage, &clock);
    clock.advance_seconds(1);
    let (holder, slots) = grant(&ledger, "holder", 2);
    assert_eq!(slots, vec![0, 1]);
    clock.advance_seconds(1);
    let before_drain = ledger.now_micros();
    clock.advance_seconds(1);
    let r = ledger.change_pool(&PoolChange::Drain { slot: 1 }, None, false).unwrap();
    assert!(r.applied);
    assert_eq!(r.summary, vec!["drained worker-01".to_string()]);
    // Held: still counted; shown as draining.
    let c = ledger.get_capacity().unwrap();
    assert_eq!((c.total_workers, c.allocated_workers, c.available_workers), (6, 2, 4));
    assert_eq!(c.draining, vec!["worker-01".to_string()]);
    assert!(c.drained.is_empty());
    // Not granted again while drained: four workers fit, a fifth does not.
    clock.advance_seconds(1);
    let (_, other) = grant(&ledger, "other", 4);
    assert_eq!(other, vec![2, 3, 4, 5]);
    let failed = ledger.request_resources(&ResourceRequest::new("more").workers(1)).unwrap();
    assert!(!failed.is_granted());
    // The holder still has it.
    let d = ledger.get_allocation(&holder).unwrap().unwrap();
    assert_eq!(d.workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["worker-00", "worker-01"]);
    // Released: the total shrinks by the drained slot, and worker-00 is free again.
    clock.advance_seconds(1);
    let during = ledger.now_micros();
    clock.advance_seconds(1);
    ledger.release_resources(&holder).unwrap();
    let c = ledger.get_capacity().unwrap();
    assert_eq!((c.total_workers, c.allocated_workers, c.available_workers), (5, 4, 1));
    assert_eq!(c.drained, vec!["worker-01".to_string()]);
    let (_, again) = grant(&ledger, "again", 1);
    assert_eq!(again, vec![0], "the drained slot is never granted");
    // Time travel: the pool as it was at each instant.
    ledger.prepare_history(&mut |_, _| {}).unwrap();
    let at = ledger.capacity_at(before_drain).unwrap();
    assert_eq!((at.total_workers, at.draining.len()), (6, 0));
    let at = ledger.capacity_at(during).unwrap();
    assert_eq!((at.total_workers, at.draining.clone()), (6, vec!["worker-01".to_string()]));
    // The timeline's total steps down when the drained slot is freed.
    clock.advance_seconds(10);
    let released = during + 1_000_000;
    let before = ledger.timeline(during, released, 500_000).unwrap();
    let after = ledger.timeline(released + 1_000_000, ledger.now_micros(), 1_000_000).unwrap();
    assert!(before.buckets.iter().all(|b| (b.total_workers - 6.0).abs() < 1e-9), "{before:?}");
    assert!(after.buckets.iter().all(|b| (b.total_workers - 5.0).abs() < 1e-9), "{after:?}");
    // Undrain: it counts and is granted again.
    clock.advance_seconds(1);
    change(&ledger, PoolChange::Undrain { slot: 1 }).unwrap();
    let c = ledger.get_capacity().unwrap();
    assert_eq!((c.total_workers, c.available_workers), (6, 1));
    let (_, back) = grant(&ledger, "back", 1);
    assert_eq!(back, vec![1]);
    ledger.with_state(State::check_invariants).unwrap();
}

#[test]
fn remove_worker_needs_a_drained_idle_worker_and_ids_are_never_reused() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let ledger = open(&storage, &clock);
    clock.advance_seconds(1);
    let (holder, _) = grant(&ledger, "holder", 1); // worker-00
    let seq = ledger.status().last_seq;
    // Not drained: refused, nothing written.
    let err = change(&ledger, PoolChange::RemoveWorker { slot: 3 }).unwrap_err().to_string();
    assert!(err.contains("drain it first"), "{err}");
    // Held (and drained): refused, naming the allocation.
    change(&ledger, PoolChange::Drain { slot: 0 }).unwrap();
    let err = change(&ledger, PoolChange::RemoveWorker { slot: 0 }).unwrap_err().to_string();
    assert!(err.contains(&holder), "{err}");
    // The same through a config apply that skips the drain: refused by the decision too.
    let mut c = ledger.with_state(|s| s.config.clone());
    c.drained_workers.clear();
    c.removed_workers.insert(4);
    let err = ledger.reconfigure(c).unwrap_err().to_string();
    assert!(err.contains("config.removed_workers") && err.contains("drain it first"), "{err}");
    assert_eq!(ledger.status().last_seq, seq + 1, "only the drain was written");
    // Drained and idle: removed; the totals shrink by one slot size.
    ledger.release_resources(&holder).unwrap();
    let r = ledger.change_pool(&PoolChange::RemoveWorker { slot: 0 }, None, false).unwrap();
    assert_eq!(r.summary[0], "removed worker-00");
    assert_eq!(r.summary[1], "total_cpu_millicores: 8000 -> 7000");
    let c = ledger.get_capacity().unwrap();
    assert_eq!((c.total_workers, c.total_cpu_millicores, c.total_memory), (5, 7_000, 14_336));
    assert!(c.drained.is_empty() && c.draining.is_empty());
    // Gone: no drain, undrain or grant; a config that brings it back is refused.
    assert!(change(&ledger, PoolChange::Undrain { slot: 0 }).unwrap_err().to_string().contains("removed"));
    let mut c = ledger.with_state(|s| s.config.clone());
    c.removed_workers.clear();
    let err = ledger.reconfigure(c).unwrap_err().to_string();
    assert!(err.contains("never reused"), "{err}");
    let (_, slots) = grant(&ledger, "five", 5);
    assert_eq!(slots, vec![1, 2, 3, 4, 5]);
    // Validation names the field.
    let err = Config::from_json(r#"{"worker_slots": 4, "drained_workers": [4]}"#).unwrap_err().to_string();
    assert!(err.contains("config.drained_workers"), "{err}");
    let err = Config::from_json(r#"{"drained_workers": [2], "removed_workers": [2]}"#).unwrap_err().to_string();
    assert!(err.contains("config.drained_workers") && err.contains("not both"), "{err}");
}

#[test]
fn added_workers_get_new_ids_and_grants_land_on_them() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let ledger = open(&storage, &clock);
    clock.advance_seconds(1);
    grant(&ledger, "all", 6);
    clock.advance_seconds(1);
    let full = ledger.now_micros();
    clock.advance_seconds(1);
    // Endpoints are refused when the config lists none.
    let err = change(&ledger, PoolChange::AddWorkers { count: 2, endpoints: vec!["http://w:1".into()] }).unwrap_err();
    assert!(err.to_string().contains("endpoints"), "{err}");
    let dry = ledger.change_pool(&PoolChange::AddWorkers { count: 2, endpoints: vec![] }, None, true).unwrap();
    assert!(!dry.applied && dry.dry_run && !dry.changes.is_empty());
    let stale = ledger.change_pool(&PoolChange::AddWorkers { count: 2, endpoints: vec![] }, Some(1), false);
    assert!(matches!(stale, Err(allocation_ledger::Error::Conflict { .. })), "{stale:?}");
    let r = ledger.change_pool(&PoolChange::AddWorkers { count: 2, endpoints: vec![] }, None, false).unwrap();
    assert_eq!(r.summary[0], "added worker-06, worker-07");
    let c = ledger.get_capacity().unwrap();
    assert_eq!((c.total_workers, c.total_cpu_millicores, c.total_memory), (8, 10_000, 20_480));
    clock.advance_seconds(1);
    let (_, slots) = grant(&ledger, "new", 2);
    assert_eq!(slots, vec![6, 7]);
    clock.advance_seconds(60);
    let now = ledger.now_micros();
    // capacity --at before and after, and the timeline's total steps.
    assert_eq!(ledger.capacity_at(full).unwrap().total_workers, 6);
    assert_eq!(ledger.capacity_at(now).unwrap().total_workers, 8);
    let start = ledger.ledger_start();
    let t = ledger.timeline(start, now, (now - start) / 2 + 1).unwrap();
    assert_eq!(t.buckets.len(), 2);
    assert!(t.buckets[0].total_workers < 8.0 && t.buckets[0].total_workers >= 6.0, "{:?}", t.buckets[0]);
    assert!((t.buckets[1].total_workers - 8.0).abs() < 1e-9, "{:?}", t.buckets[1]);
    // Explicit endpoints: one per new worker.
    let with_endpoints =
        Config { worker_slots: 2, worker_endpoints: vec!["http://a:1".into(), "http://b:1".into()], ..config() };
    let storage = FaultyStorage::new();
    let opts = OpenOptions::default().config(with_endpoints).clock(Arc::new(clock.clone())).storage(Arc::new(storage));
    let l2 = Ledger::open_with(PathBuf::from("/l2"), opts).unwrap();
    let err = change(&l2, PoolChange::AddWorkers { count: 2, endpoints: vec!["http://c:1".into()] }).unwrap_err();
    assert!(err.to_string().contains("exactly 2"), "{err}");
    change(&l2, PoolChange::AddWorkers { count: 1, endpoints: vec!["http://c:1".into()] }).unwrap();
    assert_eq!(l2.pool().unwrap().workers[2].endpoint, "http://c:1");
}

#[test]
fn the_mcp_catalog_changes_and_a_running_server_is_not_removed() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let ledger = open(&storage, &clock);
    let set = PoolChange::McpSet {
        name: "github".into(),
        endpoint: "http://mcp-github:9000".into(),
        cpu_millicores: Some(250),
        memory_mib: Some(128),
    };
    let r = ledger.change_pool(&set, None, false).unwrap();
    assert!(r.summary[0].starts_with("MCP server github set to http://mcp-github:9000"), "{:?}", r.summary);
    let id = match ledger.request_resources(&ResourceRequest::new("j").mcp_server("github")).unwrap() {
        RequestOutcome::Granted(g) => g.allocation_id.to_string(),
        RequestOutcome::Failed(f) => panic!("{}", f.error),
    };
    let err = change(&ledger, PoolChange::McpRemove { name: "github".into() }).unwrap_err().to_string();
    assert!(err.contains(&id), "{err}");
    let err = change(&ledger, PoolChange::McpRemove { name: "jira".into() }).unwrap_err().to_string();
    assert!(err.contains("github"), "lists the catalog: {err}");
    ledger.release_resources(&id).unwrap();
    let r = ledger.change_pool(&PoolChange::McpRemove { name: "github".into() }, None, false).unwrap();
    assert_eq!(r.summary, vec!["MCP server github removed".to_string()]);
    assert!(ledger.pool().unwrap().mcp_catalog.is_empty());
}

#[test]
fn snapshots_and_replay_keep_the_drained_and_removed_sets() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let ledger = open(&storage, &clock);
    clock.advance_seconds(1);
    let (a, _) = grant(&ledger, "a", 2);
    change(&ledger, PoolChange::Drain { slot: 1 }).unwrap();
    change(&ledger, PoolChange::Drain { slot: 4 }).unwrap();
    change(&ledger, PoolChange::RemoveWorker { slot: 4 }).unwrap();
    change(&ledger, PoolChange::Drain { slot: 5 }).unwrap();
    let live = ledger.with_state(Clone::clone);
    ledger.snapshot().unwrap();
    let data = live.to_data();
    assert_eq!(data.config.drained_workers, BTreeSet::from([1, 5]));
    let back = State::from_data(serde_json::from_str(&serde_json::to_string(&data).unwrap()).unwrap()).unwrap();
    assert_eq!(back, live);
    drop(ledger);
    let reopened = open(&storage, &clock);
    assert_eq!(reopened.with_state(Clone::clone), live);
    assert_eq!(reopened.get_capacity().unwrap().draining, vec!["worker-01".to_string()]);
    reopened.release_resources(&a).unwrap();
    let c = reopened.get_capacity().unwrap();
    assert_eq!((c.total_workers, c.drained.clone()), (3, vec!["worker-01".to_string(), "worker-05".to_string()]));
}

// ----- property: random pool changes interleaved with grants and releases -----

#[derive(Debug, Clone)]
enum Op {
    Request(u32),
    Release(usize),
    Advance(u64),
    Drain(u32),
    Undrain(u32),
    Remove(u32),
    Add(u32),
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u32..4).prop_map(Op::Request),
        3 => (0usize..64).prop_map(Op::Release),
        2 => (1u64..400).prop_map(Op::Advance),
        2 => (0u32..10).prop_map(Op::Drain),
        1 => (0u32..10).prop_map(Op::Undrain),
        2 => (0u32..10).prop_map(Op::Remove),
        1 => (1u32..3).prop_map(Op::Add),
        1 => Just(Op::Snapshot),
    ]
}

fn apply(ledger: &Ledger, clock: &ManualClock, op: &Op, granted: &mut Vec<String>) -> Result<(), TestCaseError> {
    match op {
        Op::Request(n) => {
            let before = ledger.with_state(|s| s.config.clone());
            let req = ResourceRequest::new("p").workers(*n).ttl_seconds(300);
            if let Ok(RequestOutcome::Granted(g)) = ledger.request_resources(&req) {
                for w in &g.workers_allocated {
                    let slot: u32 = w.worker_id[7..].parse().unwrap();
                    prop_assert!(before.grantable(slot), "granted {} while not grantable", w.worker_id);
                }
                granted.push(g.allocation_id.to_string());
            }
        }
        Op::Release(i) if !granted.is_empty() => {
            ledger.release_resources(&granted[i % granted.len()]).unwrap();
        }
        Op::Release(_) => {}
        Op::Advance(s) => clock.advance_seconds(*s as i64),
        Op::Drain(slot) => drop(change(ledger, PoolChange::Drain { slot: *slot })),
        Op::Undrain(slot) => drop(change(ledger, PoolChange::Undrain { slot: *slot })),
        Op::Remove(slot) => drop(change(ledger, PoolChange::RemoveWorker { slot: *slot })),
        Op::Add(n) => drop(change(ledger, PoolChange::AddWorkers { count: *n, endpoints: vec![] })),
        Op::Snapshot => drop(ledger.snapshot().unwrap()),
    }
    Ok(())
}

fn check_pool(ops: &[Op], index_first: bool) -> Result<(), TestCaseError> {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let ledger = open(&storage, &clock);
    if index_first {
        ledger.prepare_history(&mut |_, _| {}).unwrap();
    }
    let mut granted = Vec::new();
    for op in ops {
        clock.advance_micros(1_237);
        apply(&ledger, &clock, op, &mut granted)?;
        let c = ledger.get_capacity().unwrap();
        prop_assert_eq!(c.allocated_workers + c.available_workers, c.total_workers, "{:?}", c);
        prop_assert_eq!(c.allocated_cpu_millicores + c.available_cpu_millicores, c.total_cpu_millicores);
        // The pool's count from the config: every slot not removed, less the drained ones
        // nobody holds at this instant (a holder past its deadline holds nothing).
        let now = ledger.now_micros();
        let pool = ledger
            .with_state(|s| s.check_invariants().map(|()| s.config.pool_workers(s.drained_slots_at(now).0.len())));
        prop_assert_eq!(pool, Ok(c.total_workers));
        ledger.with_state(|s| {
            for &slot in &s.config.removed_workers {
                assert!(s.slot_owner(slot).is_none(), "removed slot {slot} held");
            }
        });
    }
    clock.advance_seconds(97);
    let now = clock.now_micros();
    // Replay (from the snapshots and the log) equals the live state.
    let live = ledger.with_state(Clone::clone);
    let events: Vec<LoggedEvent> = ledger.events(1, usize::MAX).unwrap();
    let mut folded = State::empty(Config::default());
    for e in &events {
        folded.evolve(e.seq, e.event.ts_us, &e.event.body);
    }
    prop_assert_eq!(folded.anomalies, 0);
    prop_assert_eq!(folded.config.clone(), live.config.clone());
    prop_assert_eq!(folded.capacity(now), live.capacity(now));
    // Time travel from the index equals the fold up to each instant, drains included.
    let mut state = State::empty(Config::default());
    let mut i = 0;
    let start = events[0].event.ts_us;
    let step = ((now - start) / 40).max(1);
    let mut t = start;
    while t <= now {
        while i < events.len() && events[i].event.ts_us <= t {
            state.evolve(events[i].seq, events[i].event.ts_us, &events[i].event.body);
            i += 1;
        }
        prop_assert_eq!(ledger.capacity_at(t).unwrap(), state.capacity(t), "capacity_at({})", t.as_micros());
        t += step;
    }
    for e in events.iter().filter(|e| matches!(e.event.body, EventBody::ConfigChanged { .. })) {
        let mut s = State::empty(Config::default());
        for x in events.iter().take_while(|x| x.seq <= e.seq) {
            s.evolve(x.seq, x.event.ts_us, &x.event.body);
        }
        prop_assert_eq!(ledger.capacity_at(e.event.ts_us).unwrap(), s.capacity(e.event.ts_us));
    }
    // What-if with the recorded config re-decides every request as recorded, and its pool
    // (the fold's) agrees with reality's (followed from the events) over time.
    let w = ledger.what_if(&WhatIfOptions::default()).unwrap();
    prop_assert_eq!(w.reproduced, Some(true));
    let (r, f) = (&w.comparison.reality.workers, &w.comparison.what_if.workers);
    prop_assert!((r.mean_total - f.mean_total).abs() < 1e-6, "reality {:?} what-if {:?}", r, f);
    drop(ledger);
    let reopened = open(&storage, &clock);
    prop_assert_eq!(reopened.with_state(Clone::clone), live);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn pool_changes_keep_the_fold_the_index_and_replay_in_step(
        ops in proptest::collection::vec(op(), 1..60),
        index_first in any::<bool>(),
    ) {
        check_pool(&ops, index_first)?;
    }
}

// ----- the real binary -----

fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c.arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
}

fn json(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?}; stderr {}", String::from_utf8_lossy(&o.stderr)));
    (o.status.code().unwrap(), v)
}

#[test]
fn pool_commands_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    let (code, g) = json(&d, &["request", "--job-id", "holder", "--workers", "2"]);
    assert_eq!(code, 0, "{g}");
    let holder = g["allocation_id"].as_str().unwrap().to_string();
    let (code, r) = json(&d, &["pool", "drain", "worker-01"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["summary"][0], "drained worker-01");
    let drained_at = r["seq"].as_u64().unwrap();
    let (_, p) = json(&d, &["pool", "show"]);
    assert_eq!(p["workers"][1]["state"], "draining", "{p}");
    assert_eq!(p["workers"][1]["allocation_id"], holder.as_str());
    assert_eq!(p["workers"][0]["state"], "held");
    assert_eq!(p["workers"][2]["state"], "free");
    // Remove: refused while held (naming the allocation) and while not drained.
    let (code, e) = json(&d, &["pool", "remove-worker", "1"]);
    assert_eq!(code, 2, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains(&holder), "{e}");
    let (code, e) = json(&d, &["pool", "remove-worker", "worker-03"]);
    assert_eq!(code, 2);
    assert!(e["error"]["message"].as_str().unwrap().contains("drain it first"), "{e}");
    let (code, e) = json(&d, &["pool", "drain", "banana"]);
    assert_eq!((code, e["error"]["field"].as_str()), (2, Some("worker")), "{e}");
    // Stale expected_seq: a conflict, nothing written.
    let (code, _) = json(&d, &["pool", "undrain", "1", "--expected-seq", "1"]);
    assert_eq!(code, 7);
    let (code, _) = json(&d, &["release", &holder]);
    assert_eq!(code, 0);
    let (code, c) = json(&d, &["capacity"]);
    assert_eq!(code, 0);
    assert_eq!((c["total_workers"].as_u64(), c["drained"][0].as_str()), (Some(9), Some("worker-01")), "{c}");
    // Dry run, then the removal.
    let (_, r) = json(&d, &["pool", "remove-worker", "worker-01", "--dry-run"]);
    assert_eq!((r["applied"].as_bool(), r["dry_run"].as_bool()), (Some(false), Some(true)), "{r}");
    let (code, r) = json(&d, &["pool", "remove-worker", "worker-01"]);
    assert_eq!(code, 0, "{r}");
    let (_, r) = json(&d, &["pool", "add-workers", "--count", "2"]);
    assert_eq!(r["summary"][0], "added worker-10, worker-11", "{r}");
    let (_, c) = json(&d, &["capacity"]);
    assert_eq!((c["total_workers"].as_u64(), c["total_cpu_millicores"].as_u64()), (Some(11), Some(17_000)), "{c}");
    let (_, r) = json(&d, &["pool", "mcp-set", "github", "--endpoint", "http://gh:9000", "--cpu-millicores", "100"]);
    assert_eq!(r["applied"], true, "{r}");
    // capacity --at the drain's instant shows the pool as it was then: worker-01 still held.
    let log = String::from_utf8(run(&d, &["log"]).stdout).unwrap();
    let drain_event: Value = serde_json::from_str(log.lines().nth(drained_at as usize - 1).unwrap()).unwrap();
    assert_eq!(drain_event["type"], "config_changed", "{drain_event}");
    let (code, c) = json(&d, &["capacity", "--at", drain_event["at"].as_str().unwrap()]);
    assert_eq!(code, 0, "{c}");
    assert_eq!((c["total_workers"].as_u64(), c["draining"][0].as_str()), (Some(10), Some("worker-01")), "{c}");
    // replay explains the changes in words.
    let o = run(&d, &["replay"]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("pool: drained worker-01"), "{text}");
    assert!(text.contains("pool: removed worker-01"), "{text}");
    assert!(text.contains("added worker-10, worker-11"), "{text}");
}

// ----- the MCP tools -----

#[cfg(feature = "server")]
mod mcp_common;

#[cfg(feature = "server")]
#[test]
fn pool_tools_over_mcp() {
    use mcp_common::{err, ok, StdioServer};
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let mut s = StdioServer::start(dir.path(), &[]);
    s.initialize();
    let list = s.request("tools/list", json!({}))["result"].clone();
    let tool = list["tools"].as_array().unwrap().iter().find(|t| t["name"] == "change_pool").unwrap().clone();
    assert_eq!(tool["inputSchema"]["properties"]["action"]["enum"][0], "add_workers");
    let g = ok(&s.call("request_resources", json!({"job_id": "j", "mcp_servers": [], "workers": 1})));
    let id = g["allocation_id"].as_str().unwrap().to_string();
    let r = ok(&s.call("change_pool", json!({"action": "drain", "worker": "worker-00"})));
    assert_eq!(r["summary"][0], "drained worker-00");
    let seq = r["seq"].as_u64().unwrap();
    let p = ok(&s.call("get_pool", json!({})));
    assert_eq!((p["workers"][0]["state"].as_str(), p["seq"].as_u64()), (Some("draining"), Some(seq)), "{p}");
    // Errors name the field and the allowed values; nothing is written.
    let e = err(&s.call("change_pool", json!({"action": "explode"})));
    assert_eq!(e["field"], "action");
    assert!(e["error"].as_str().unwrap().contains("add_workers, drain, undrain"), "{e}");
    assert_eq!(err(&s.call("change_pool", json!({"action": "drain"})))["field"], "worker");
    assert_eq!(err(&s.call("change_pool", json!({"action": "drain", "worker": 1, "count": 2})))["field"], "count");
    assert_eq!(err(&s.call("change_pool", json!({"action": "add_workers"})))["field"], "count");
    let e = err(&s.call("change_pool", json!({"action": "remove_worker", "worker": 0})));
    assert!(e["error"].as_str().unwrap().contains(&id), "{e}");
    let e = err(&s.call("change_pool", json!({"action": "undrain", "worker": 0, "expected_seq": 1})));
    assert_eq!(e["kind"], "conflict", "{e}");
    assert_eq!(ok(&s.call("get_pool", json!({})))["seq"].as_u64(), Some(seq), "nothing written");
    let r = ok(&s.call("change_pool", json!({"action": "add_workers", "count": 1, "expected_seq": seq})));
    assert_eq!(r["summary"][0], "added worker-10");
    let r = ok(
        &s.call("change_pool", json!({"action": "mcp_set", "name": "gh", "endpoint": "http://gh:1", "dry_run": true}))
    );
    assert_eq!((r["applied"].as_bool(), r["dry_run"].as_bool()), (Some(false), Some(true)));
    s.close();
}
