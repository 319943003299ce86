//! Every released on-disk format keeps a small ledger under `tests/fixtures/`; this opens each
//! one and checks that its history still reads the same.
//!
//! - `v1`: segments v1, snapshots v1 (the first release). Snapshot v1 is no longer read: it is
//!   set aside and the log replayed, which must give the same history.
//! - `v1-snap2`: segments v1, snapshots v2 (ended allocations carry `ended_seq`).
//! - `v1-snap3`: segments v1, snapshots v3 (binary allocations, the log position of the
//!   snapshot's last event).
//! - `v2`: segments v2 (pre-filled: zeros after the last record are free space), snapshots v3.
//! - `v3`: segments v3 (records carry durable lags, writes start at sectors), snapshots v3 whose log position
//!   holds the checksum of the record they were taken after.
//! - `v4`: segments v3, events of schema v2 (idempotency keys, lifetime bounds, `renewed`),
//!   snapshots v4 (the idempotency keys, renewals and lifetime bounds of allocations).
//! - `v5`: segments v4 (the tamper-evident chain: each record carries its chain value, each
//!   segment header the value it starts from), snapshots v4 whose log position holds the chain
//!   value of the record they were taken after. The test pins the head `verify` prints.
//! - `v6`: segments v4, events of schema 3 (the fair queue: `queued`, `cancelled`, the
//!   `queue_timeout` rejection, grants from the queue; advance reservations: `reserved`,
//!   `reservation_rejected`, `reservation_cancelled`), snapshots carrying a non-empty queue and
//!   a reservation.
//! - `v7`: segments v4, events of schema 4 (preemption: `preempting`, `preempted`, a
//!   `preemptible: false` grant), a v6 snapshot taken mid-grace.
//! - `v8`: segments v4, events of schema 4, a v7 snapshot (key records start with their flags;
//!   a canonical UUID key is stored as its 16 bytes) holding keys of both kinds.
//!
//! Add a fixture when a format version is released; never regenerate an old one. The newest is
//! written by `REGENERATE_FIXTURES=v8 cargo test --test format_fixtures` (the value names the
//! fixture, so an older one is never rewritten by accident).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::FsStorage;
use allocation_ledger::{
    AllocationState, Config, EventBody, Ledger, ManualClock, OpenOptions, Priority, RequestOutcome, ResourceRequest,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn regenerate(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let clock = ManualClock::at_default_epoch();
    let config = Config { segment_size_bytes: 4096, ..Config::default() };
    let opts = OpenOptions::default().config(config).clock(Arc::new(clock.clone()));
    let ledger = Ledger::open_with(dir, opts).unwrap();
    let mut meta = serde_json::Map::new();
    meta.insert("tenant".into(), "acme".into());
    let a = ledger
        .request_resources(&ResourceRequest::new("fixture-a").workers(4).mcp_server("github").metadata(meta))
        .unwrap();
    clock.advance_seconds(10);
    ledger
        .request_resources(
            &ResourceRequest::new("fixture-b").workers(2).mcp_server("slack").priority(Priority::Low).ttl_seconds(600),
        )
        .unwrap();
    clock.advance_seconds(10);
    let c = ledger.request_resources(&ResourceRequest::new("fixture-c").workers(7)).unwrap();
    assert!(!c.is_granted());
    clock.advance_seconds(10);
    ledger.release_resources(&a.allocation_id().to_string()).unwrap();
    clock.advance_seconds(10);
    ledger.request_resources(&ResourceRequest::new("fixture-d").workers(1).ttl_seconds(60)).unwrap();
    ledger.snapshot().unwrap();
    for i in 0..6 {
        clock.advance_seconds(5);
        let o = ledger.request_resources(&ResourceRequest::new(format!("fixture-e{i}")).workers(1)).unwrap();
        clock.advance_seconds(5);
        if i % 2 == 0 {
            ledger.release_resources(&o.allocation_id().to_string()).unwrap();
        }
    }
    clock.advance_seconds(3600);
    ledger.cleanup_expired().unwrap();
    drop(ledger);
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

#[test]
fn v1_fixture_opens_and_reads_the_same() {
    check_fixture("v1", false);
}

#[test]
fn v1_snap2_fixture_opens_and_reads_the_same() {
    check_fixture("v1-snap2", true);
}

#[test]
fn v1_snap3_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v1-snap3");
    let snap = std::fs::read(fixture.join("snapshots/00000000000000000006.snap")).unwrap();
    assert_eq!(&snap[8..12], &3u32.to_le_bytes(), "the fixture's snapshot is v3");
    check_fixture("v1-snap3", true);
    appends_continue_the_fixture("v1-snap3", 1);
}

#[test]
fn v3_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v3");
    for seg in segment_paths(&fixture) {
        let bytes = std::fs::read(&seg).unwrap();
        assert_eq!(&bytes[8..12], &3u32.to_le_bytes(), "{} is v3", seg.display());
        // Every command of the fixture was written after the one before was durable, so the
        // first record of each has a durable lag of 1; the final cleanup writes its
        // expiries together, and the later ones have lags of 2, 3, ...
        let mut previous: Option<(String, u32, u64)> = None;
        for (start, end, seq) in common::record_bounds(&bytes) {
            let event: serde_json::Value = serde_json::from_slice(&bytes[start as usize + 16..end as usize]).unwrap();
            let kind = event["type"].as_str().unwrap().to_string();
            let lag = u32::from_le_bytes(bytes[start as usize..start as usize + 4].try_into().unwrap()) >> 21;
            let ctx = format!("record {seq} ({kind}) of {}", seg.display());
            match &previous {
                Some((prev_kind, prev_lag, prev_end)) if kind == "expired" && prev_kind == "expired" => {
                    assert_eq!(lag, prev_lag + 1, "{ctx}: in the write of the one before");
                    assert_eq!(start, *prev_end, "{ctx}: right after the one before");
                }
                _ => {
                    assert_eq!(lag, 1, "{ctx}: starts a write");
                    // A write starts at a sector, but a segment's first, right after the header.
                    assert!(start == 32 || start % 512 == 0, "{ctx}: starts at {start}");
                }
            }
            previous = Some((kind, lag, end));
        }
    }
    check_fixture("v3", true);
    appends_continue_the_fixture("v3", 3);
}

/// The v4 fixture: the v3 scenario, each request with an idempotency key, one with a lifetime
/// bound renewed twice (the second renewal cut short by the bound), and a retry that wrote
/// nothing; a v4 snapshot after the renewals. (How the fixture was written; the newest
/// fixture is the one regenerated now.)
#[allow(dead_code)]
fn regenerate_v4(dir: &Path) {
    regenerate(dir);
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(10_000);
    let ledger = Ledger::open_with(dir, OpenOptions::default().clock(Arc::new(clock.clone()))).unwrap();
    let req = ResourceRequest::new("fixture-lease").workers(2).ttl_seconds(600).max_lifetime_seconds(1000);
    let granted = ledger.request_resources(&req.clone().idempotency_key("lease-key-1")).unwrap();
    let id = granted.allocation_id().to_string();
    clock.advance_seconds(300);
    ledger.renew_allocation(&id, None).unwrap();
    clock.advance_seconds(300);
    let capped = ledger.renew_allocation(&id, Some(900)).unwrap();
    assert!(capped.capped_by_max_lifetime);
    let retry = ledger.request_resources(&req.idempotency_key("lease-key-1")).unwrap();
    assert_eq!(retry.allocation_id().to_string(), id);
    ledger.request_resources(&ResourceRequest::new("fixture-keyed").workers(9).idempotency_key("k-2")).unwrap();
    ledger.snapshot().unwrap();
    clock.advance_seconds(10);
    ledger.request_resources(&ResourceRequest::new("fixture-after").workers(1).idempotency_key("k-3")).unwrap();
    drop(ledger);
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

#[test]
fn v4_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v4");
    let snaps: Vec<PathBuf> =
        std::fs::read_dir(fixture.join("snapshots")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(snaps.iter().any(|p| std::fs::read(p).unwrap()[8..12] == 4u32.to_le_bytes()), "a v4 snapshot");
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("v4");
    copy_dir(&fixture, &copy);
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(10_700);
    let ledger = Ledger::open_with(&copy, OpenOptions::default().clock(Arc::new(clock.clone()))).unwrap();
    assert!(ledger.recovery_report().snapshot_seq.is_some(), "the v4 snapshot is used");
    let events = ledger.events(1, usize::MAX).unwrap();
    let renewed = events.iter().filter(|e| e.event.body.type_name() == "renewed").count();
    assert_eq!(renewed, 2);
    assert!(events.iter().all(|e| e.event.v <= 2));
    // The keys survived the snapshot: a retry writes nothing and answers as decided.
    let last = events.len();
    let retry = ledger
        .request_resources(
            &ResourceRequest::new("fixture-lease")
                .workers(2)
                .ttl_seconds(600)
                .max_lifetime_seconds(1000)
                .idempotency_key("lease-key-1"),
        )
        .unwrap();
    match &retry {
        allocation_ledger::RequestOutcome::Granted(g) => {
            assert!(g.replayed);
            assert_eq!(g.status, AllocationState::Active);
            assert_eq!(g.workers_allocated.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    let keyed_failure =
        ledger.request_resources(&ResourceRequest::new("fixture-keyed").workers(9).idempotency_key("k-2")).unwrap();
    assert!(!keyed_failure.is_granted());
    assert_eq!(ledger.events(1, usize::MAX).unwrap().len(), last, "retries write nothing");
    let details = ledger.get_allocation(&retry.allocation_id().to_string()).unwrap().unwrap();
    assert_eq!((details.renewals, details.max_lifetime_seconds), (2, Some(1000)));
    // Snapshot + tail equals a full replay.
    let with_snapshot = ledger.with_state(std::clone::Clone::clone);
    drop(ledger);
    std::fs::remove_dir_all(copy.join("snapshots")).unwrap();
    let replayed = Ledger::open(&copy).unwrap();
    assert_eq!(replayed.with_state(std::clone::Clone::clone), with_snapshot);
}

/// The head `verify` prints for the `v5` fixture: the chain's definition is part of the format.
const V5_HEAD: &str = "20:d8dfd626ded86c88920dc1e13825af6fdea99b0dc8d5857c1cda42e538530354";

#[test]
fn v5_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v5");
    if std::env::var_os("REGENERATE_FIXTURES").is_some_and(|v| v == "v5") {
        regenerate(&fixture);
    }
    for seg in segment_paths(&fixture) {
        assert_eq!(&std::fs::read(&seg).unwrap()[8..12], &4u32.to_le_bytes(), "{} is v4", seg.display());
    }
    let snap = std::fs::read(fixture.join("snapshots/00000000000000000006.snap")).unwrap();
    assert!(snap.windows(9).any(|w| w == br#""chain":""#), "the snapshot's log position holds the chain value");
    let report = allocation_ledger::verify(&FsStorage::default(), &fixture, &mut |_, _| {}).unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.chain_from, Some(1));
    let head = report.chain_head.expect("a chained log has a head");
    if std::env::var_os("REGENERATE_FIXTURES").is_some_and(|v| v == "v5") {
        eprintln!("v5 head: {head}");
    } else {
        assert_eq!(head.to_string(), V5_HEAD, "the fixture's head");
    }
    check_fixture("v5", true);
    appends_continue_the_fixture("v5", 4);
}

#[test]
fn v2_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v2");
    let snap = std::fs::read(fixture.join("snapshots/00000000000000000006.snap")).unwrap();
    assert_eq!(&snap[8..12], &3u32.to_le_bytes(), "the fixture's snapshot is v3");
    for seg in segment_paths(&fixture) {
        assert_eq!(&std::fs::read(&seg).unwrap()[8..12], &2u32.to_le_bytes(), "{} is v2", seg.display());
    }
    check_fixture("v2", true);
    appends_continue_the_fixture("v2", 2);
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.join("wal")).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    segs
}

/// A copy of the fixture takes writes: its last segment (of `last_version`) is left as it is
/// when it is older than version 4 (the first write starts a version 4 segment, whose records
/// are chained and carry durable lags, the chain beginning there) and continued when it is
/// version 4; the segments it rotates to are the current version; everything reads back after
/// a reopen, and `verify` reports where the chain begins.
fn appends_continue_the_fixture(name: &str, last_version: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join(name);
    copy_dir(&fixture_dir(name), &copy);
    let last = segment_paths(&copy).pop().unwrap();
    let rw = Ledger::open(&copy).unwrap();
    let before = rw.events(1, usize::MAX).unwrap().len();
    let last_before = std::fs::read(&last).unwrap();
    rw.request_resources(&ResourceRequest::new("after-upgrade").workers(1)).unwrap();
    let bytes = std::fs::read(&last).unwrap();
    assert_eq!(&bytes[8..12], &last_version.to_le_bytes());
    let chain_from = if last_version < 4 {
        assert_eq!(bytes, last_before, "an older segment is not appended to");
        let first_new =
            segment_paths(&copy).into_iter().find(|p| *p > last).expect("the first write started a new segment");
        let name = first_new.file_name().unwrap().to_str().unwrap();
        name.trim_end_matches(".wal").parse::<u64>().unwrap()
    } else {
        assert_ne!(bytes, last_before, "a version 4 segment is continued");
        1
    };
    // On to the next segments (the fixture's segments are 4 KiB).
    for i in 0..40 {
        let o = rw.request_resources(&ResourceRequest::new(format!("rotate-{i}")).workers(1)).unwrap();
        rw.release_resources(&o.allocation_id().to_string()).unwrap();
    }
    let events = rw.events(1, usize::MAX).unwrap();
    assert_eq!(events.len(), before + 81);
    drop(rw);
    let newer: Vec<PathBuf> = segment_paths(&copy).into_iter().filter(|p| *p > last).collect();
    assert!(newer.len() >= 2, "the writes rotated segments");
    for seg in &newer {
        assert_eq!(&std::fs::read(seg).unwrap()[8..12], &4u32.to_le_bytes(), "{} is v4", seg.display());
    }
    let again = Ledger::open(&copy).unwrap();
    assert_eq!(again.events(1, usize::MAX).unwrap(), events);
    let head = again.chain_head().unwrap().expect("the log ends chained");
    drop(again);
    let report = allocation_ledger::verify(&FsStorage::default(), &copy, &mut |_, _| {}).unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.chain_from, Some(chain_from));
    assert_eq!(report.chain_head, Some(head));
}

fn check_fixture(name: &str, snapshot_readable: bool) {
    let fixture = fixture_dir(name);
    assert!(fixture.join("wal").exists(), "missing fixture {}", fixture.display());
    let segments = std::fs::read_dir(fixture.join("wal")).unwrap().count();
    assert!(segments >= 2, "the fixture should span segments");

    // Read-only, in place.
    let ro = Ledger::open_with(
        &fixture,
        OpenOptions { storage: Arc::new(FsStorage::default()), ..OpenOptions::read_only() },
    )
    .unwrap();
    let events = ro.events(1, usize::MAX).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.body.type_name()).collect();
    assert_eq!(kinds[0], "ledger_created");
    assert_eq!(kinds.iter().filter(|k| **k == "granted").count(), 9);
    assert_eq!(kinds.iter().filter(|k| **k == "rejected").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "released").count(), 4);
    // b (600 s), d (60 s) and e1, e3, e5 (3600 s) all expire in the final hour.
    assert_eq!(kinds.iter().filter(|k| **k == "expired").count(), 5);
    assert!(events.windows(2).all(|w| w[0].event.ts_us < w[1].event.ts_us && w[0].seq + 1 == w[1].seq));
    match &events[1].event.body {
        EventBody::Granted(g) => {
            assert_eq!(g.job_id, "fixture-a");
            assert_eq!(
                g.workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(),
                ["worker-00", "worker-01", "worker-02", "worker-03"]
            );
            assert_eq!(g.mcp_servers[0].endpoint, "http://localhost:9000");
            assert_eq!(g.metadata.get("tenant").unwrap(), "acme");
        }
        other => panic!("{other:?}"),
    }
    let cap = ro.get_capacity().unwrap();
    assert_eq!((cap.allocated_workers, cap.available_workers), (0, 10));
    let failed = ro.list_allocations(Some(AllocationState::Failed), None).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].job_id, "fixture-c");
    assert_eq!(ro.list_allocations(Some(AllocationState::Expired), None).unwrap().len(), 5);

    // Read-write on a copy: snapshot + tail equals a full replay.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join(name);
    copy_dir(&fixture, &copy);
    let rw = Ledger::open(&copy).unwrap();
    let report = rw.recovery_report();
    if snapshot_readable {
        assert!(report.snapshot_seq.is_some(), "the fixture's snapshot is used: {report:?}");
    } else {
        assert_eq!(report.snapshot_seq, None);
        assert_eq!(report.snapshots_set_aside.len(), 1, "{report:?}");
        assert!(report.snapshots_set_aside[0].reason.contains("version 1"), "{report:?}");
    }
    let with_snapshot = rw.with_state(std::clone::Clone::clone);
    drop(rw);
    std::fs::remove_dir_all(copy.join("snapshots")).unwrap();
    let rw = Ledger::open(&copy).unwrap();
    assert_eq!(rw.recovery_report().snapshot_seq, None);
    assert_eq!(rw.with_state(std::clone::Clone::clone), with_snapshot);
    assert_eq!(ro.with_state(std::clone::Clone::clone), with_snapshot);
}

/// The `v6` fixture: events of schema 3 (the fair queue and advance reservations: `queued`,
/// `cancelled`, a `queue_timeout` rejection, a grant from the queue, `reserved`,
/// `reservation_rejected`, `reservation_cancelled`, `renewed`, keyed grants) and a snapshot
/// taken while two requests wait and a reservation is upcoming.
fn regenerate_v6(dir: &Path) {
    use allocation_ledger::{Admission, ReservationRequest};
    let _ = std::fs::remove_dir_all(dir);
    let clock = ManualClock::at_default_epoch();
    let config = Config { segment_size_bytes: 4096, ..Config::default() };
    let opts = OpenOptions::default().config(config).clock(Arc::new(clock.clone()));
    let ledger = Ledger::open_with(dir, opts).unwrap();
    let queue = |req: &ResourceRequest| match ledger.request_or_queue(req).unwrap() {
        Admission::Pending(p) => p.allocation_id.to_string(),
        Admission::Decided(o) => panic!("{o:?}"),
    };
    let a = ledger.request_resources(&ResourceRequest::new("v6-a").workers(8).idempotency_key("k-a")).unwrap();
    let a = a.allocation_id().to_string();
    clock.advance_seconds(5);
    ledger.renew_allocation(&a, Some(7200)).unwrap();
    assert!(ledger
        .reserve(&ReservationRequest::for_tenant("team-r", 2).window_seconds(1800, 600))
        .unwrap()
        .is_reserved());
    assert!(!ledger.reserve(&ReservationRequest::for_job("v6-big", 5).window_seconds(600, 600)).unwrap().is_reserved());
    let j = ledger.reserve(&ReservationRequest::for_job("v6-j", 1).window_seconds(3000, 600)).unwrap();
    ledger.cancel_reservation(&j.reservation.reservation_id).unwrap();
    clock.advance_seconds(5);
    queue(&ResourceRequest::new("v6-q1").workers(4).idempotency_key("k-q1").wait(Some(3600)));
    queue(&ResourceRequest::new("v6-q2").workers(4).wait(Some(30)));
    let q3 = queue(&ResourceRequest::new("v6-q3").workers(3).wait(Some(600)));
    ledger.cancel_request(&q3).unwrap();
    ledger.snapshot().unwrap();
    clock.advance_seconds(31);
    ledger.cleanup_expired().unwrap();
    for i in 0..6 {
        clock.advance_seconds(1);
        let req =
            ResourceRequest::new(format!("v6-e{i}")).workers(1).ttl_seconds(60).idempotency_key(format!("k-e{i}"));
        let o = ledger.request_resources(&req).unwrap();
        assert!(o.is_granted(), "{o:?}");
        ledger.release_resources(&o.allocation_id().to_string()).unwrap();
    }
    ledger.release_resources(&a).unwrap();
    drop(ledger);
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

#[test]
fn v6_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v6");
    if std::env::var_os("REGENERATE_FIXTURES").is_some_and(|v| v == "v6") {
        regenerate_v6(&fixture);
    }
    let report = allocation_ledger::verify(&FsStorage::default(), &fixture, &mut |_, _| {}).unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert!(std::fs::read_dir(fixture.join("wal")).unwrap().count() >= 2, "the fixture spans segments");
    let ro = Ledger::open_with(
        &fixture,
        OpenOptions { storage: Arc::new(FsStorage::default()), ..OpenOptions::read_only() },
    )
    .unwrap();
    let events = ro.events(1, usize::MAX).unwrap();
    let count = |kind: &str| events.iter().filter(|e| e.event.body.type_name() == kind).count();
    for (kind, n) in [
        ("queued", 3),
        ("cancelled", 1),
        ("reserved", 2),
        ("reservation_rejected", 1),
        ("reservation_cancelled", 1),
        ("renewed", 1),
        ("granted", 8),
        ("released", 7),
        ("rejected", 1),
    ] {
        assert_eq!(count(kind), n, "{kind}");
    }
    let keyed = events.iter().filter(|e| matches!(&e.event.body, EventBody::Granted(g) if g.idempotency_key.is_some()));
    assert_eq!(keyed.count(), 8, "a, q1 (from the queue) and e0..e5");
    assert!(events.iter().any(|e| matches!(&e.event.body, EventBody::Granted(g) if g.queued_seq.is_some())));
    assert!(events.iter().any(
        |e| matches!(&e.event.body, EventBody::Rejected(r) if r.reason == allocation_ledger::RejectReason::QueueTimeout)
    ));
    // The snapshot was taken with two requests waiting and a reservation upcoming (verify above
    // compared it with the fold of the log up to it).
    let snap_seq = std::fs::read_dir(fixture.join("snapshots"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".snap")?.parse::<usize>().ok())
        .max()
        .expect("a snapshot");
    let then = common::fold(&events[..snap_seq]);
    assert_eq!(then.queue().len(), 2);
    assert_eq!(then.reservations_at(then.last_ts_us).len(), 1);
    // The state now: nobody waits; q1 was granted from the queue when a was released.
    assert_eq!(ro.list_allocations(Some(AllocationState::Pending), None).unwrap().len(), 0);
    assert_eq!(ro.list_allocations(Some(AllocationState::Cancelled), None).unwrap().len(), 1);
    let q1 = ro.list_allocations(None, Some("v6-q1")).unwrap();
    // Granted (by now past its deadline: the fixture's clock is in the past).
    assert!(matches!(q1[0].state, AllocationState::Active | AllocationState::Expired), "{q1:?}");
    // Read-write on a copy: snapshot + tail equals a full replay, and appends go on.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("v6");
    copy_dir(&fixture, &copy);
    let rw = Ledger::open(&copy).unwrap();
    assert_eq!(rw.recovery_report().snapshot_seq, Some(snap_seq as u64));
    let with_snapshot = rw.with_state(std::clone::Clone::clone);
    assert_eq!(with_snapshot, ro.with_state(std::clone::Clone::clone));
    drop(rw);
    std::fs::remove_dir_all(copy.join("snapshots")).unwrap();
    let replayed = Ledger::open(&copy).unwrap();
    assert_eq!(replayed.with_state(std::clone::Clone::clone), with_snapshot);
    assert!(replayed.request_resources(&ResourceRequest::new("after").workers(1)).unwrap().is_granted());
}

/// The v7 fixture: event schema 4 with a preemption in grace (`preempting`, then `preempted`
/// and the preemptor's `granted` when the grace ends), a `preemptible: false` grant, and a v6
/// snapshot taken mid-grace (a victim's preemption mark, the preemption in the meta part).
fn regenerate_v7(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let clock = ManualClock::at_default_epoch();
    let config = Config { segment_size_bytes: 4096, ..Config::default() };
    let opts = OpenOptions::default().config(config).clock(Arc::new(clock.clone()));
    let ledger = Ledger::open_with(dir, opts).unwrap();
    let low = ResourceRequest::new("v7-low").workers(6).priority(Priority::Low).ttl_seconds(3600);
    assert!(ledger.request_resources(&low.clone().workers(5)).unwrap().is_granted());
    assert!(ledger.request_resources(&ResourceRequest::new("v7-normal").workers(2)).unwrap().is_granted());
    let keep = ResourceRequest::new("v7-keep").workers(1).priority(Priority::Critical).preemptible(false);
    assert!(ledger.request_resources(&keep).unwrap().is_granted());
    clock.advance_seconds(1);
    let hot = ResourceRequest::new("v7-hot").workers(4).priority(Priority::Critical);
    assert!(matches!(ledger.request_or_queue(&hot).unwrap(), allocation_ledger::Admission::Pending(_)));
    ledger.snapshot().unwrap();
    clock.advance_seconds(40);
    ledger.cleanup_expired().unwrap();
    for i in 0..12 {
        clock.advance_seconds(5);
        let o = ledger.request_resources(&ResourceRequest::new(format!("v7-e{i}")).workers(1)).unwrap();
        if o.is_granted() {
            ledger.release_resources(&o.allocation_id().to_string()).unwrap();
        }
    }
    drop(ledger);
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

#[test]
fn v7_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v7");
    if std::env::var_os("REGENERATE_FIXTURES").is_some_and(|v| v == "v7") {
        regenerate_v7(&fixture);
    }
    let snaps = std::fs::read_dir(fixture.join("snapshots")).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    assert!(snaps.iter().any(|p| std::fs::read(p).unwrap()[8..12] == 6u32.to_le_bytes()), "a v6 snapshot");
    let ro = Ledger::open_with(
        &fixture,
        OpenOptions { storage: Arc::new(FsStorage::default()), ..OpenOptions::read_only() },
    )
    .unwrap();
    let events = ro.events(1, usize::MAX).unwrap();
    assert!(events.iter().all(|e| e.event.v <= 4) && events.iter().any(|e| e.event.v == 4));
    let kinds: Vec<&str> = events.iter().map(|e| e.event.body.type_name()).collect();
    let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or_else(|| panic!("no {k} event"));
    assert!(at("preempting") < at("preempted"), "{kinds:?}");
    assert_eq!(kinds[at("preempted") + 1], "granted");
    let victim = match &events[at("preempted")].event.body {
        EventBody::Preempted(p) => {
            assert_eq!((p.preemptor_job_id.as_str(), p.grace_seconds), ("v7-hot", 30));
            p.allocation_id
        }
        other => panic!("{other:?}"),
    };
    let d = ro.get_allocation(&victim.to_string()).unwrap().unwrap();
    assert_eq!(d.state, AllocationState::Preempted);
    let kept = ro.list_allocations(None, Some("v7-keep")).unwrap();
    assert!(!kept[0].preemptible);

    // Read-write on a copy: the mid-grace snapshot plus the tail equals a full replay.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("v7");
    copy_dir(&fixture, &copy);
    let rw = Ledger::open(&copy).unwrap();
    assert!(rw.recovery_report().snapshot_seq.is_some(), "the v6 snapshot is used");
    let with_snapshot = rw.with_state(std::clone::Clone::clone);
    drop(rw);
    std::fs::remove_dir_all(copy.join("snapshots")).unwrap();
    let rw = Ledger::open(&copy).unwrap();
    assert_eq!(rw.recovery_report().snapshot_seq, None);
    assert_eq!(rw.with_state(std::clone::Clone::clone), with_snapshot);
    assert_eq!(ro.with_state(std::clone::Clone::clone), with_snapshot);
    // Appends continue the fixture.
    assert!(rw.request_resources(&ResourceRequest::new("after").workers(1)).unwrap().is_granted());
}

/// The keys of the `v8` fixture's requests: canonical UUIDs (stored as bytes in a v7 snapshot),
/// an upper-case UUID and a plain key (stored as text).
fn v8_keys() -> [String; 5] {
    [
        "0192f0c4-7b1e-7cc3-9a41-5d2e8f6b3a10".into(),
        "b5e2a7d1-3c4f-4e8a-9f01-23456789abcd".into(),
        "B5E2A7D1-3C4F-4E8A-9F01-23456789ABCD".into(),
        "retry-token-42".into(),
        "00000000-0000-0000-0000-000000000000".into(),
    ]
}

/// The v8 fixture: a v7 snapshot holding idempotency keys of both encodings (granted and
/// rejected), taken after some of their allocations ended, and a tail after it.
fn regenerate_v8(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let clock = ManualClock::at_default_epoch();
    let config = Config { segment_size_bytes: 4096, ..Config::default() };
    let opts = OpenOptions::default().config(config).clock(Arc::new(clock.clone()));
    let ledger = Ledger::open_with(dir, opts).unwrap();
    let keys = v8_keys();
    let mut granted = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        clock.advance_seconds(3);
        let workers = if i == 4 { 5 } else { 2 };
        let o = ledger.request_resources(&v8_request(i, workers).idempotency_key(key.clone())).unwrap();
        assert_eq!(o.is_granted(), i != 4, "{key}");
        granted.push(o.allocation_id());
    }
    ledger.release_resources(&granted[1].to_string()).unwrap();
    ledger.snapshot().unwrap();
    for i in 0..10 {
        clock.advance_seconds(5);
        let o = ledger.request_resources(&ResourceRequest::new(format!("v8-e{i}")).workers(1)).unwrap();
        ledger.release_resources(&o.allocation_id().to_string()).unwrap();
    }
    drop(ledger);
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

fn v8_request(i: usize, workers: u32) -> ResourceRequest {
    ResourceRequest::new(format!("v8-{i}")).workers(workers).mcp_server("github")
}

#[test]
fn v8_fixture_opens_and_reads_the_same() {
    let fixture = fixture_dir("v8");
    if std::env::var_os("REGENERATE_FIXTURES").is_some_and(|v| v == "v8") {
        regenerate_v8(&fixture);
    }
    let snaps = std::fs::read_dir(fixture.join("snapshots")).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    assert_eq!(snaps.len(), 1);
    let snap = std::fs::read(&snaps[0]).unwrap();
    assert_eq!(snap[8..12], 7u32.to_le_bytes(), "a v7 snapshot");
    // The canonical UUIDs are in it as bytes, not as text; the others as text.
    let keys = v8_keys();
    let contains = |needle: &[u8]| snap.windows(needle.len()).any(|w| w == needle);
    for key in [&keys[0], &keys[1], &keys[4]] {
        assert!(contains(uuid::Uuid::parse_str(key).unwrap().as_bytes()) && !contains(key.as_bytes()), "{key}");
    }
    assert!(contains(keys[2].as_bytes()) && contains(keys[3].as_bytes()));

    let ro = Ledger::open_with(
        &fixture,
        OpenOptions { storage: Arc::new(FsStorage::default()), ..OpenOptions::read_only() },
    )
    .unwrap();
    // Read-write on a copy: the snapshot plus the tail equals a full replay.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("v8");
    copy_dir(&fixture, &copy);
    // A clock within the keys' window (the fixture was written from the default epoch on).
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(600);
    let opts = || OpenOptions::default().clock(Arc::new(clock.clone()));
    let rw = Ledger::open_with(&copy, opts()).unwrap();
    assert!(rw.recovery_report().snapshot_seq.is_some(), "the v7 snapshot is used");
    let with_snapshot = rw.with_state(std::clone::Clone::clone);
    assert_eq!(with_snapshot.idempotency_key_count(), 5);
    assert_eq!(ro.with_state(std::clone::Clone::clone), with_snapshot);
    // Every key read from the snapshot answers its retry as decided, without writing.
    let events_before = rw.events(1, usize::MAX).unwrap().len();
    for (i, key) in keys.iter().enumerate() {
        let workers = if i == 4 { 5 } else { 2 };
        let again = rw.request_resources(&v8_request(i, workers).idempotency_key(key.clone())).unwrap();
        assert_eq!(again.is_granted(), i != 4, "{key}");
        let first = ro.list_allocations(None, Some(&format!("v8-{i}"))).unwrap();
        assert_eq!(again.allocation_id(), first[0].allocation_id, "{key}");
        assert!(matches!(&again, RequestOutcome::Granted(g) if g.replayed) || i == 4, "{key}: {again:?}");
    }
    assert_eq!(rw.events(1, usize::MAX).unwrap().len(), events_before, "retries write nothing");
    drop(rw);
    std::fs::remove_dir_all(copy.join("snapshots")).unwrap();
    let rw = Ledger::open_with(&copy, opts()).unwrap();
    assert_eq!(rw.recovery_report().snapshot_seq, None);
    assert_eq!(rw.with_state(std::clone::Clone::clone), with_snapshot);
    let again = rw.request_resources(&v8_request(0, 2).idempotency_key(keys[0].clone())).unwrap();
    assert_eq!(again.allocation_id(), ro.list_allocations(None, Some("v8-0")).unwrap()[0].allocation_id);
    // Appends continue the fixture.
    assert!(rw.request_resources(&ResourceRequest::new("after").workers(1)).unwrap().is_granted());
}
