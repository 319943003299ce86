//! One writer per directory; readers beside it see consistent prefixes; many threads writing
//! through one handle never double-book a slot and lose no acknowledged grant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::{
    AllocationId, AllocationState, Error, EventBody, Ledger, ManualClock, OpenOptions, RequestOutcome, ResourceRequest,
    State,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::Arc;

#[test]
fn a_second_writer_is_locked_out_until_the_first_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    let clock = ManualClock::at_default_epoch();
    let first = Ledger::open_with(&dir, common::opts(common::small_config(0), &clock)).unwrap();
    first.request_resources(&ResourceRequest::new("j").workers(2)).unwrap();

    let second = Ledger::open_with(&dir, common::opts(common::small_config(0), &clock));
    match &second {
        Err(e @ Error::Locked { path }) => {
            assert_eq!(path, &dir);
            assert_eq!(e.kind(), "locked");
            assert!(e.to_string().contains("read-only"), "{e}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // Plain `open` too, and the lock holds while any clone of the handle lives.
    assert!(matches!(Ledger::open(&dir), Err(Error::Locked { .. })));
    let clone = first.clone();
    drop(first);
    assert!(matches!(Ledger::open(&dir), Err(Error::Locked { .. })));
    // The failed opens changed nothing: the writer goes on.
    clone.request_resources(&ResourceRequest::new("j").workers(1)).unwrap();
    let events = common::all_events(&clone);
    drop(clone);

    let second = Ledger::open_with(&dir, common::opts(common::small_config(0), &clock)).unwrap();
    assert!(!second.recovery_report().created);
    assert_eq!(common::all_events(&second), events);
    assert_eq!(second.get_capacity().unwrap().allocated_workers, 3);
    // And it is the writer now.
    assert!(matches!(Ledger::open(&dir), Err(Error::Locked { .. })));
}

#[test]
fn a_read_only_open_works_beside_a_writer_and_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    let clock = ManualClock::at_default_epoch();
    assert!(matches!(Ledger::open_read_only(&dir), Err(Error::NoLedger { .. })));
    let writer = Ledger::open_with(&dir, common::opts(common::small_config(0), &clock)).unwrap();
    let g = writer.request_resources(&ResourceRequest::new("j").workers(2)).unwrap();
    let reader = Ledger::open_with(&dir, OpenOptions::read_only().clock(Arc::new(clock.clone()))).unwrap();
    assert!(reader.is_read_only());
    assert_eq!(reader.with_state(std::clone::Clone::clone), writer.with_state(std::clone::Clone::clone));
    assert!(matches!(reader.request_resources(&ResourceRequest::new("r").workers(1)), Err(Error::ReadOnly)));
    assert!(matches!(reader.release_resources(&g.allocation_id().to_string()), Err(Error::ReadOnly)));
    assert!(matches!(reader.cleanup_expired(), Err(Error::ReadOnly)));
    assert!(matches!(reader.snapshot(), Err(Error::ReadOnly)));
    // Plain `open_read_only` (its own clock) opens beside the writer as well.
    let plain = Ledger::open_read_only(&dir).unwrap();
    assert_eq!(plain.status().last_seq, writer.status().last_seq);
    // The writer was not disturbed.
    writer.release_resources(&g.allocation_id().to_string()).unwrap();
    assert_eq!(reader.refresh().unwrap(), 1);
    assert_eq!(reader.with_state(std::clone::Clone::clone), writer.with_state(std::clone::Clone::clone));
}

/// What the reader checks on every refresh.
fn check_reader(reader: &Ledger, last: &mut u64) {
    let seq = reader.with_state(|s| s.last_seq);
    assert!(seq >= *last, "last_seq went back from {last} to {seq}");
    *last = seq;
    reader.with_state(|s| {
        s.check_invariants().unwrap_or_else(|e| panic!("at seq {seq}: {e}"));
        assert_eq!(s.anomalies, 0);
    });
    let cap = reader.get_capacity().unwrap();
    common::assert_capacity_accounting(&cap);
    assert!(cap.seq >= seq);
}

#[test]
fn a_reader_refreshing_beside_a_busy_writer_always_sees_a_consistent_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    let clock = ManualClock::at_default_epoch();
    // Small segments (rotation every few events) and frequent snapshots.
    let writer = Ledger::open_with(&dir, common::opts(common::small_config(40), &clock)).unwrap();
    let reader = Ledger::open_with(&dir, OpenOptions::read_only().clock(Arc::new(clock.clone()))).unwrap();

    // At each checkpoint the writer pauses until the reader has caught up and compared states;
    // between checkpoints the reader refreshes freely while the writer appends.
    let (to_reader, checkpoints) = mpsc::channel::<State>();
    let (ack, acks) = mpsc::channel::<()>();
    const OPS: usize = 400;
    let writer_thread = {
        let writer = writer.clone();
        let clock = clock.clone();
        std::thread::spawn(move || {
            let mut held: Vec<AllocationId> = Vec::new();
            for i in 0..OPS {
                match i % 7 {
                    0 | 2 | 4 => {
                        let req = ResourceRequest::new(format!("job-{}", i % 5))
                            .workers(1 + (i % 3) as u32)
                            .ttl_seconds(60 + (i as u64 * 37) % 240)
                            .mcp_server(["github", "slack", "db"][i % 3]);
                        if let RequestOutcome::Granted(g) = writer.request_resources(&req).unwrap() {
                            held.push(g.allocation_id);
                        }
                    }
                    1 | 5 if !held.is_empty() => {
                        let id = held.remove((i * 13) % held.len());
                        writer.release_resources(&id.to_string()).unwrap();
                    }
                    3 => clock.advance_seconds(((i * 11) % 90) as i64),
                    _ => {
                        writer.cleanup_expired().unwrap();
                    }
                }
                if i % 40 == 39 {
                    to_reader.send(writer.with_state(std::clone::Clone::clone)).unwrap();
                    acks.recv().unwrap();
                }
            }
        })
    };

    let mut last = 0;
    let mut refreshes = 0u64;
    let mut checkpoints_seen = 0;
    loop {
        match checkpoints.try_recv() {
            Ok(expected) => {
                reader.refresh().unwrap();
                check_reader(&reader, &mut last);
                // The writer is paused: the reader sees exactly its state.
                assert_eq!(reader.with_state(std::clone::Clone::clone), expected);
                // So does a reader opened now (snapshot plus tail of a live ledger).
                let fresh = Ledger::open_with(&dir, OpenOptions::read_only().clock(Arc::new(clock.clone()))).unwrap();
                assert_eq!(fresh.with_state(std::clone::Clone::clone), expected);
                checkpoints_seen += 1;
                ack.send(()).unwrap();
            }
            Err(mpsc::TryRecvError::Empty) => {
                reader.refresh().unwrap_or_else(|e| panic!("refresh beside the writer failed: {e}"));
                check_reader(&reader, &mut last);
                refreshes += 1;
                if refreshes.is_multiple_of(16) {
                    // Opening read-only while the writer appends, rotates and snapshots.
                    let other = Ledger::open_with(&dir, OpenOptions::read_only().clock(Arc::new(clock.clone())))
                        .unwrap_or_else(|e| panic!("read-only open beside the writer failed: {e}"));
                    let mut l = 0;
                    check_reader(&other, &mut l);
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        }
    }
    writer_thread.join().unwrap();
    assert_eq!(checkpoints_seen, OPS / 40);
    reader.refresh().unwrap();
    assert_eq!(reader.with_state(std::clone::Clone::clone), writer.with_state(std::clone::Clone::clone));
    assert!(common::segment_files(&dir).len() >= 5, "the writer rotated segments");
}

#[test]
fn concurrent_writers_on_one_handle_never_double_book_and_lose_no_acknowledged_grant() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    let clock = ManualClock::at_default_epoch();
    let mut config = common::small_config(25);
    config.worker_slots = 24;
    config.total_cpu_millicores = 24_000;
    config.total_memory_mib = 24 * 2048;
    let ledger = Ledger::open_with(&dir, common::opts(config.clone(), &clock)).unwrap();

    const THREADS: usize = 8;
    const OPS: usize = 40;
    // Per thread: acknowledged grants (id, seq, worker ids) and acknowledged releases.
    type Acked = (Vec<(AllocationId, u64, Vec<String>)>, BTreeSet<AllocationId>);
    let results: Vec<Acked> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let ledger = ledger.clone();
                s.spawn(move || {
                    let mut grants = Vec::new();
                    let mut released = BTreeSet::new();
                    let mut mine: Vec<AllocationId> = Vec::new();
                    for i in 0..OPS {
                        if i % 3 == 2 && !mine.is_empty() {
                            let id = mine.remove((t + i) % mine.len());
                            let r = ledger.release_resources(&id.to_string()).unwrap();
                            assert_eq!(r.status, "released");
                            released.insert(id);
                        } else if i % 5 == 4 {
                            common::assert_capacity_accounting(&ledger.get_capacity().unwrap());
                        } else {
                            let req = ResourceRequest::new(format!("thread-{t}")).workers(1 + ((t + i) % 3) as u32);
                            match ledger.request_resources(&req).unwrap() {
                                RequestOutcome::Granted(g) => {
                                    let ids = g.workers_allocated.iter().map(|w| w.worker_id.clone()).collect();
                                    grants.push((g.allocation_id, g.seq, ids));
                                    mine.push(g.allocation_id);
                                }
                                RequestOutcome::Failed(f) => assert_eq!(f.reason, "insufficient_workers"),
                            }
                        }
                    }
                    (grants, released)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let status = ledger.status();
    assert_eq!(status.durable_seq, status.last_seq);
    drop(ledger);

    let reopened = Ledger::open_with(&dir, common::opts(config, &clock)).unwrap();
    let events = common::all_events(&reopened);
    assert_eq!(events.len() as u64, status.last_seq);
    assert_eq!(reopened.with_state(std::clone::Clone::clone), common::fold(&events));

    // Replaying the log by hand: no grant takes a slot that is held.
    let mut owner: BTreeMap<u32, AllocationId> = BTreeMap::new();
    let mut slots_of: BTreeMap<AllocationId, Vec<u32>> = BTreeMap::new();
    for e in &events {
        match &e.event.body {
            EventBody::Granted(g) => {
                for w in &g.workers {
                    if let Some(other) = owner.insert(w.slot, g.allocation_id) {
                        panic!(
                            "seq {}: slot {} granted to {} while {} holds it",
                            e.seq, w.slot, g.allocation_id, other
                        );
                    }
                }
                slots_of.insert(g.allocation_id, g.workers.iter().map(|w| w.slot).collect());
            }
            EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => {
                for slot in slots_of.get(allocation_id).into_iter().flatten() {
                    assert_eq!(owner.remove(slot), Some(*allocation_id), "seq {}", e.seq);
                }
            }
            _ => {}
        }
    }

    // Every acknowledged grant is in the log at the sequence number it was given, with its slots,
    // in the state its thread left it in.
    let mut total_grants = 0;
    let mut seqs = BTreeSet::new();
    for (grants, released) in &results {
        for (id, seq, workers) in grants {
            total_grants += 1;
            assert!(seqs.insert(*seq), "sequence number {seq} acknowledged twice");
            match &events[*seq as usize - 1].event.body {
                EventBody::Granted(g) => assert_eq!(g.allocation_id, *id),
                other => panic!("seq {seq} is {other:?}, not the grant of {id}"),
            }
            let d = reopened.get_allocation(&id.to_string()).unwrap().expect("acknowledged grant is known");
            let ids: Vec<String> = d.workers.iter().map(|w| w.worker_id.clone()).collect();
            assert_eq!(&ids, workers);
            let expected = if released.contains(id) { AllocationState::Released } else { AllocationState::Active };
            assert_eq!(d.state, expected, "{id}");
        }
    }
    assert!(total_grants >= THREADS * 5, "only {total_grants} grants");
    let cap = reopened.get_capacity().unwrap();
    common::assert_capacity_accounting(&cap);
    assert_eq!(cap.allocated_workers as usize, owner.len());
}

/// Group commit under many callers: every caller's operations are acknowledged (none waits
/// forever for an fsync that no one leads), everything acknowledged is durable, and the log
/// folds to the live state. With an in-memory storage (fsyncs take no time, so the hand-over
/// between rounds is exercised as hard as it gets) and with the real file system.
#[test]
fn many_callers_share_fsyncs_and_every_one_is_acknowledged() {
    use allocation_ledger::storage::{FaultyStorage, Storage};
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        // A hang here is the failure this test looks for: fail loudly instead of timing out CI.
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                std::thread::sleep(std::time::Duration::from_millis(200));
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
            eprintln!("many_callers_share_fsyncs_and_every_one_is_acknowledged: no progress in 120 s");
            std::process::abort();
        });
    }
    let tmp = tempfile::tempdir().unwrap();
    let memory = FaultyStorage::new();
    let storages: [(Arc<dyn Storage>, std::path::PathBuf, usize); 2] = [
        (Arc::new(memory.clone()), std::path::PathBuf::from("/mem-ledger"), 300),
        (Arc::new(allocation_ledger::storage::FsStorage::default()), tmp.path().join("fs-ledger"), 40),
    ];
    for (storage, dir, ops) in storages {
        let clock = ManualClock::at_default_epoch();
        let mut config = common::small_config(500);
        config.worker_slots = 256;
        config.total_cpu_millicores = 256_000;
        config.total_memory_mib = 256 * 2048;
        let opts = common::opts(config.clone(), &clock).storage(storage.clone());
        let ledger = Ledger::open_with(&dir, opts).unwrap();
        const THREADS: usize = 48;
        let acked: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let ledger = ledger.clone();
                    s.spawn(move || {
                        let mut n = 0;
                        // Each caller holds at most two allocations at a time.
                        let mut held = None;
                        for i in 0..ops {
                            let req = ResourceRequest::new(format!("caller-{t}")).workers(1);
                            let RequestOutcome::Granted(g) = ledger.request_resources(&req).unwrap() else {
                                panic!("the pool has room for every caller");
                            };
                            n += 1;
                            if let Some(id) = held.replace(g.allocation_id) {
                                let r = ledger.release_resources(&id.to_string()).unwrap();
                                assert_eq!(r.status, "released");
                                n += 1;
                            }
                            if i % 10 == 0 {
                                common::assert_capacity_accounting(&ledger.get_capacity().unwrap());
                            }
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let status = ledger.status();
        assert_eq!(status.durable_seq, status.last_seq, "everything acknowledged is durable");
        let events = common::all_events(&ledger);
        assert!(events.len() > acked, "{} events for {acked} acknowledged operations", events.len());
        let live = ledger.with_state(std::clone::Clone::clone);
        drop(ledger);
        assert_eq!(live, common::fold(&events));
        let reopened = Ledger::open_with(&dir, common::opts(config, &clock).storage(storage)).unwrap();
        assert_eq!(reopened.with_state(std::clone::Clone::clone), live);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}
