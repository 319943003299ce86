//! Time travel, history and usage against a naive fold of the log, over random histories:
//! `capacity_at` at every event and between events, `allocations_at` against a full replay,
//! usage over the whole history against the integral of the capacity timeline, and the same
//! answers after close-and-reopen and after deleting the snapshots (derived data).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::{FaultyStorage, Storage};
use allocation_ledger::Allocation;
use allocation_ledger::AllocationState;
use allocation_ledger::McpCatalogEntry;
use allocation_ledger::{
    AllocationDetails, AllocationSummary, CapacityReport, Clock, Config, EventBody, Ledger, LoggedEvent, ManualClock,
    Micros, OpenOptions, RequestOutcome, ResourceRequest, State,
};
use allocation_ledger::{EventRange, GroupBy};
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

fn config() -> Config {
    let mut c = Config {
        total_cpu_millicores: 8_000,
        total_memory_mib: 16_384,
        worker_slots: 6,
        snapshot_every: 7,
        segment_size_bytes: 4096,
        // Ended allocations beyond these leave memory: history, usage and list --at must
        // find them in the log.
        terminal_retained: 3,
        ..Config::default()
    };
    c.mcp_catalog.insert(
        "costly".into(),
        McpCatalogEntry { endpoint: "http://mcp.local:7000".into(), cpu_millicores: 500, memory_mib: 256 },
    );
    c.mcp_catalog.insert(
        "free".into(),
        McpCatalogEntry { endpoint: "http://mcp.local:7001".into(), cpu_millicores: 0, memory_mib: 0 },
    );
    c
}

#[derive(Debug, Clone)]
enum Op {
    Request {
        job: u8,
        workers: u32,
        mcp: Vec<&'static str>,
        ttl: u64,
        tenant: Option<u8>,
    },
    Release(usize),
    Advance(u64),
    Cleanup,
    Reconfigure {
        cpu: u64,
        workers: u32,
        costly_cpu: u64,
    },
    Snapshot,
    /// A reservation for a job over a window starting `start_seconds` from now.
    Reserve {
        job: u8,
        workers: u32,
        start_seconds: u64,
        duration_seconds: u64,
    },
    CancelReservation(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..4, 0u32..4, proptest::sample::subsequence(vec!["costly", "free", "other"], 0..3), 60u64..400, proptest::option::of(0u8..3))
            .prop_map(|(job, workers, mcp, ttl, tenant)| Op::Request { job, workers, mcp, ttl, tenant }),
        2 => (0usize..64).prop_map(Op::Release),
        3 => (1u64..300).prop_map(Op::Advance),
        1 => Just(Op::Cleanup),
        1 => (prop_oneof![Just(6_000u64), Just(8_000), Just(12_000)], 4u32..9, prop_oneof![Just(250u64), Just(500), Just(1000)])
            .prop_map(|(cpu, workers, costly_cpu)| Op::Reconfigure { cpu, workers, costly_cpu }),
        1 => Just(Op::Snapshot),
        1 => (0u8..4, 1u32..4, 0u64..400, 30u64..600).prop_map(|(job, workers, start_seconds, duration_seconds)| {
            Op::Reserve { job, workers, start_seconds, duration_seconds }
        }),
        1 => (0usize..8).prop_map(Op::CancelReservation),
    ]
}

fn open(storage: &FaultyStorage, clock: &ManualClock) -> Ledger {
    let opts =
        OpenOptions::default().config(config()).clock(Arc::new(clock.clone())).storage(Arc::new(storage.clone()));
    Ledger::open_with(dir(), opts).expect("open")
}

fn dir() -> PathBuf {
    PathBuf::from("/ledger")
}

/// Runs `ops` against a ledger; returns the granted ids.
fn run(ledger: &Ledger, clock: &ManualClock, ops: &[Op]) {
    let mut granted = Vec::new();
    let mut reserved = Vec::new();
    for op in ops {
        // Distinct, irregular event times.
        clock.advance_micros(1_237);
        match op {
            Op::Request { job, workers, mcp, ttl, tenant } => {
                let mut req = ResourceRequest::new(format!("job-{job}")).workers(*workers).ttl_seconds(*ttl);
                for m in mcp {
                    req = req.mcp_server(*m);
                }
                if let Some(t) = tenant {
                    let mut md = serde_json::Map::new();
                    md.insert("tenant".into(), format!("t{t}").into());
                    req = req.metadata(md);
                }
                if let Ok(RequestOutcome::Granted(g)) = ledger.request_resources(&req) {
                    granted.push(g.allocation_id);
                }
            }
            Op::Release(i) => {
                if !granted.is_empty() {
                    let id = granted[i % granted.len()];
                    ledger.release_resources(&id.to_string()).unwrap();
                }
            }
            Op::Advance(s) => clock.advance_seconds(*s as i64),
            Op::Cleanup => {
                ledger.cleanup_expired().unwrap();
            }
            Op::Reconfigure { cpu, workers, costly_cpu } => {
                let mut c = ledger.with_state(|s| s.config.clone());
                c.total_cpu_millicores = *cpu;
                c.worker_slots = *workers;
                c.mcp_catalog.get_mut("costly").unwrap().cpu_millicores = *costly_cpu;
                let _ = ledger.reconfigure(c); // may be refused while too much is held
            }
            Op::Snapshot => {
                ledger.snapshot().unwrap();
            }
            Op::Reserve { job, workers, start_seconds, duration_seconds } => {
                let req = allocation_ledger::ReservationRequest::for_job(format!("job-{job}"), *workers)
                    .window_seconds(*start_seconds, *duration_seconds);
                let r = ledger.reserve(&req).unwrap();
                if r.is_reserved() {
                    reserved.push(r.reservation.reservation_id);
                }
            }
            Op::CancelReservation(i) => {
                if !reserved.is_empty() {
                    let id = reserved.remove(i % reserved.len());
                    // Refused once its window is over.
                    let _ = ledger.cancel_reservation(&id.to_string());
                }
            }
        }
    }
    // Leave some time after the last event (and past some deadlines).
    clock.advance_seconds(97);
}

fn events(ledger: &Ledger) -> Vec<LoggedEvent> {
    ledger.events(1, usize::MAX).unwrap()
}

/// The naive answer: fold every event up to `t`.
fn fold_upto(events: &[LoggedEvent], t: Micros) -> State {
    let mut s = State::empty(Config::default());
    for e in events.iter().take_while(|e| e.event.ts_us <= t) {
        s.evolve(e.seq, e.event.ts_us, &e.event.body);
    }
    assert_eq!(s.anomalies, 0);
    s
}

fn naive_allocations_at(s: &State, t: Micros) -> Vec<AllocationDetails> {
    let mut v: Vec<_> = s.allocations().filter(|a| a.state_at(t) == AllocationState::Active).collect();
    v.sort_by_key(|a| (a.created_us, a.id));
    v.iter().map(|a| s.details(a.id, t).unwrap()).collect()
}

/// Every allocation known at `t`, rebuilt from the events (nothing evicted), as
/// `list_allocations` summaries.
fn naive_list(events: &[LoggedEvent], t: Micros, filter: Option<(&str, AllocationState)>) -> Vec<AllocationSummary> {
    let mut all: Vec<Allocation> = Vec::new();
    for e in events.iter().take_while(|e| e.event.ts_us <= t) {
        match &e.event.body {
            EventBody::Granted(g) => all.push(Allocation::from_grant(e.event.ts_us, g)),
            EventBody::Rejected(r) => all.push(Allocation::from_rejection(e.seq, e.event.ts_us, r)),
            EventBody::Released { allocation_id } => {
                let a = all.iter_mut().find(|a| a.id == *allocation_id).unwrap();
                a.end(e.seq, e.event.ts_us, AllocationState::Released);
            }
            EventBody::Expired { allocation_id, deadline_us } => {
                let a = all.iter_mut().find(|a| a.id == *allocation_id).unwrap();
                a.end(e.seq, *deadline_us, AllocationState::Expired);
            }
            _ => {}
        }
    }
    all.retain(|a| filter.is_none_or(|(job, st)| a.job_id == job && a.state_at(t) == st));
    all.sort_by_key(|a| (a.created_us, a.id));
    all.iter().map(|a| a.summary(t)).collect()
}

/// Instants to probe: every event's timestamp, points between events, deadlines and the
/// instants just around them, and a few after the last event.
fn probes(events: &[LoggedEvent], now: Micros, salt: u64) -> Vec<Micros> {
    let mut out = Vec::new();
    let mut x = salt | 1;
    let mut rnd = |n: i64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n.max(1) as u64) as i64
    };
    for w in events.windows(2) {
        let (a, b) = (w[0].event.ts_us, w[1].event.ts_us);
        out.push(a);
        if b - a > 1 {
            out.push(a + 1 + rnd(b - a - 1));
        }
    }
    for e in events {
        if let EventBody::Granted(g) = &e.event.body {
            out.extend([g.deadline_us - 1, g.deadline_us, g.deadline_us + 1]);
        }
    }
    let last = events.last().unwrap().event.ts_us;
    out.extend([last, last + 1 + rnd(now - last), now]);
    out.retain(|t| *t <= now);
    out.sort_unstable();
    out.dedup();
    out
}

/// The integral of allocated CPU, memory and workers over `[from, to)`, from naive folds at
/// every change point (events and deadlines).
fn naive_integral(events: &[LoggedEvent], from: Micros, to: Micros) -> [u128; 3] {
    let mut points: Vec<Micros> = events.iter().map(|e| e.event.ts_us).collect();
    for e in events {
        if let EventBody::Granted(g) = &e.event.body {
            points.push(g.deadline_us);
        }
    }
    points.push(from);
    points.retain(|p| *p >= from && *p < to);
    points.sort_unstable();
    points.dedup();
    points.push(to);
    let mut acc = [0u128; 3];
    for w in points.windows(2) {
        let c = fold_upto(events, w[0]).capacity(w[0]);
        let d = (w[1] - w[0]) as u128;
        acc[0] += u128::from(c.allocated_cpu_millicores) * d;
        acc[1] += u128::from(c.allocated_memory) * d;
        acc[2] += u128::from(c.allocated_workers) * d;
    }
    acc
}

/// Everything the history queries answer at the probes, for comparing handles.
#[derive(Debug, PartialEq)]
struct Answers {
    capacity: Vec<CapacityReport>,
    allocations: Vec<Vec<AllocationDetails>>,
    usage: String,
    timeline: String,
}

fn answers(ledger: &Ledger, probes: &[Micros], now: Micros) -> Answers {
    let start = ledger.ledger_start();
    Answers {
        capacity: probes.iter().map(|t| ledger.capacity_at(*t).unwrap()).collect(),
        allocations: probes.iter().step_by(5).map(|t| ledger.allocations_at(*t).unwrap()).collect(),
        usage: serde_json::to_string(&ledger.usage(start, now, &GroupBy::Metadata("tenant".into())).unwrap()).unwrap(),
        timeline: serde_json::to_string(&ledger.timeline(start, now, 600_000_000).unwrap()).unwrap(),
    }
}

fn check_history(ops: Vec<Op>, salt: u64) -> Result<(), TestCaseError> {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    // Half the cases build the index first, so that appends keep it current; the others
    // build it from the whole log on first use.
    if salt.is_multiple_of(2) {
        ledger.prepare_history(&mut |_, _| {}).unwrap();
    }
    run(&ledger, &clock, &ops);
    let events = events(&ledger);
    let now = clock.now_micros();
    let start = events[0].event.ts_us;

    // capacity_at at every event equals the live capacity right after it, and between events
    // the capacity after the last event before (allocations past their deadline expired).
    let mut state = State::empty(Config::default());
    let mut i = 0;
    let probes = probes(&events, now, salt);
    for &t in &probes {
        while i < events.len() && events[i].event.ts_us <= t {
            state.evolve(events[i].seq, events[i].event.ts_us, &events[i].event.body);
            i += 1;
        }
        let expected = state.capacity(t);
        let got = ledger.capacity_at(t).unwrap();
        prop_assert_eq!(&got, &expected, "capacity_at({}) after {} events", t.as_micros(), i);
        if (t.as_micros() as u64 ^ salt).is_multiple_of(7) {
            prop_assert_eq!(
                ledger.allocations_at(t).unwrap(),
                naive_allocations_at(&state, t),
                "allocations_at({})",
                t.as_micros()
            );
            let listed = ledger.list_allocations_at(t, None, None).unwrap();
            prop_assert_eq!(listed, naive_list(&events, t, None));
            let job = ledger.list_allocations_at(t, Some(AllocationState::Released), Some("job-1")).unwrap();
            prop_assert_eq!(job, naive_list(&events, t, Some(("job-1", AllocationState::Released))));
        }
    }
    // The future answers with the current state; before the start is an error naming it.
    prop_assert_eq!(ledger.capacity_at(now + 3_600_000_000).unwrap(), ledger.get_capacity().unwrap());
    let err = ledger.capacity_at(start - 1).unwrap_err().to_string();
    prop_assert!(err.contains("before the ledger begins"), "{}", err);

    // Usage over the whole history is the integral of the capacity timeline.
    let integral = naive_integral(&events, start, now);
    let usage = ledger.usage(start, now, &GroupBy::Job).unwrap();
    prop_assert_eq!([usage.total.cpu_millicore_us, usage.total.memory_mib_us, usage.total.worker_us], integral);
    let by_tenant = ledger.usage(start, now, &GroupBy::Metadata("tenant".into())).unwrap();
    prop_assert_eq!(by_tenant.total.cpu_millicore_us, integral[0]);
    let group_workers: u128 = usage.groups.iter().map(|g| g.usage.worker_us).sum();
    prop_assert_eq!(group_workers, integral[2]);
    let rejected = events.iter().filter(|e| matches!(e.event.body, EventBody::Rejected(_))).count() as u64;
    prop_assert_eq!(usage.total.rejected, rejected);
    // A window in the middle: clipping matches the naive integral too.
    let (a, b) = (start + (now - start) / 3, start + 2 * (now - start) / 3);
    let mid = ledger.usage(a, b, &GroupBy::Job).unwrap();
    prop_assert_eq!(
        [mid.total.cpu_millicore_us, mid.total.memory_mib_us, mid.total.worker_us],
        naive_integral(&events, a, b)
    );
    // The timeline's buckets add up to the same integrals.
    let tl = ledger.timeline(start, now, 450_000_000).unwrap();
    let summed = tl
        .buckets
        .iter()
        .fold([0u128; 3], |acc, b| [acc[0] + b.integrals[0], acc[1] + b.integrals[1], acc[2] + b.integrals[2]]);
    prop_assert_eq!(summed, integral);

    // History of each allocation: exactly its events, in order.
    for e in events.iter().filter(|e| matches!(e.event.body, EventBody::Granted(_))).take(4) {
        let id = e.event.body.allocation_id().unwrap();
        let h = ledger.allocation_history(&id.to_string()).unwrap();
        let expected: Vec<u64> =
            events.iter().filter(|x| x.event.body.allocation_id() == Some(id)).map(|x| x.seq).collect();
        prop_assert_eq!(h.events.iter().map(|x| x.seq).collect::<Vec<_>>(), expected);
    }
    // History of each job: the events of its allocations, granted or rejected, and of its
    // reservations.
    for job in ["job-0", "job-2", "nobody"] {
        let h = ledger.job_history(job).unwrap();
        let mut ids = std::collections::BTreeSet::new();
        let mut reservations = std::collections::BTreeSet::new();
        let mut expected = Vec::new();
        for e in &events {
            let reservation_event = match &e.event.body {
                EventBody::Granted(g) if g.job_id == job => {
                    ids.insert(g.allocation_id);
                    false
                }
                EventBody::Rejected(r) if r.job_id == job => {
                    ids.insert(r.allocation_id);
                    false
                }
                EventBody::Reserved(r) if r.job_id.as_deref() == Some(job) => reservations.insert(r.reservation_id),
                EventBody::ReservationRejected(r) => r.job_id.as_deref() == Some(job),
                EventBody::ReservationCancelled { reservation_id } => reservations.contains(reservation_id),
                _ => false,
            };
            if reservation_event || e.event.body.allocation_id().is_some_and(|id| ids.contains(&id)) {
                expected.push(e.seq);
            }
        }
        prop_assert_eq!(h.events.iter().map(|x| x.seq).collect::<Vec<_>>(), expected, "job {}", job);
        prop_assert_eq!(h.allocation_ids.len(), ids.len());
    }
    // Events in a time range.
    let mut in_range = Vec::new();
    ledger
        .for_each_event(EventRange { since: Some(a), until: Some(b), ..Default::default() }, &mut |e| {
            in_range.push(e.seq);
            true
        })
        .unwrap();
    let expected: Vec<u64> = events.iter().filter(|e| e.event.ts_us >= a && e.event.ts_us < b).map(|e| e.seq).collect();
    prop_assert_eq!(in_range, expected);

    // The same answers after close-and-reopen, and after deleting the snapshots.
    let before = answers(&ledger, &probes, now);
    drop(ledger);
    let reopened = open(&storage, &clock);
    prop_assert_eq!(reopened.with_state(|s| s.last_seq), events.len() as u64);
    prop_assert!(answers(&reopened, &probes, now) == before, "answers differ after reopen");
    drop(reopened);
    let snap_dir = dir().join("snapshots");
    for name in storage.list(&snap_dir).unwrap() {
        storage.remove(&snap_dir.join(name)).unwrap();
    }
    let bare = open(&storage, &clock);
    prop_assert!(answers(&bare, &probes, now) == before, "answers differ without snapshots");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn time_travel_matches_a_naive_replay(ops in proptest::collection::vec(op(), 5..60), salt in any::<u64>()) {
        check_history(ops, salt)?;
    }
}

#[test]
fn a_fixed_history_with_config_changes_and_shared_servers() {
    use Op::*;
    let ops = vec![
        Request { job: 0, workers: 2, mcp: vec!["costly"], ttl: 120, tenant: Some(0) },
        Advance(10),
        Request { job: 1, workers: 1, mcp: vec!["costly", "free"], ttl: 60, tenant: None },
        Advance(30),
        Reconfigure { cpu: 12_000, workers: 8, costly_cpu: 1000 },
        Request { job: 2, workers: 3, mcp: vec!["costly"], ttl: 60, tenant: Some(1) },
        Advance(200),
        Request { job: 3, workers: 6, mcp: vec![], ttl: 60, tenant: Some(1) },
        Request { job: 3, workers: 6, mcp: vec![], ttl: 60, tenant: Some(1) },
        Release(0),
        Advance(5),
        Cleanup,
        Snapshot,
        Request { job: 0, workers: 1, mcp: vec!["costly"], ttl: 300, tenant: Some(0) },
    ];
    check_history(ops.clone(), 2).unwrap();
    check_history(ops, 3).unwrap();
}

#[test]
fn history_of_a_job_and_errors() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    clock.advance_seconds(1);
    let a = ledger.request_resources(&ResourceRequest::new("build").workers(2).ttl_seconds(60)).unwrap();
    clock.advance_seconds(1);
    let b = ledger.request_resources(&ResourceRequest::new("build").workers(5)).unwrap();
    assert!(!b.is_granted());
    clock.advance_seconds(1);
    ledger.request_resources(&ResourceRequest::new("other").workers(1)).unwrap();
    clock.advance_seconds(120);
    ledger.cleanup_expired().unwrap();
    let h = ledger.job_history("build").unwrap();
    assert_eq!(h.allocation_ids, vec![a.allocation_id(), b.allocation_id()]);
    let types: Vec<&str> = h.events.iter().map(|e| e.event.body.type_name()).collect();
    assert_eq!(types, ["granted", "rejected", "expired"]);
    assert!(h.events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(ledger.job_history("nobody").unwrap().events.is_empty());
    assert!(matches!(ledger.allocation_history("alloc-000000000000"), Err(allocation_ledger::Error::NotFound(_))));
    match ledger.allocation_history("nope") {
        Err(allocation_ledger::Error::InvalidInput { field, .. }) => assert_eq!(field, "allocation_id"),
        other => panic!("{other:?}"),
    }
    let start = ledger.ledger_start();
    let err = ledger.usage(start + 10, start + 5, &GroupBy::Job).unwrap_err();
    assert!(matches!(err, allocation_ledger::Error::InvalidInput { ref field, .. } if field == "until"), "{err}");
    let err = ledger.timeline(start, start + 1_000_000_000_000, 1).unwrap_err();
    assert!(matches!(err, allocation_ledger::Error::InvalidInput { ref field, .. } if field == "bucket"), "{err}");
    assert_eq!(GroupBy::parse("by", "tenant").unwrap(), GroupBy::Tenant);
    assert!(GroupBy::parse("by", "tenants").is_err());
    assert_eq!(GroupBy::parse("by", "metadata.tenant").unwrap(), GroupBy::Metadata("tenant".into()));
    // The rejection is counted by reason; the expiry at its deadline.
    let u = ledger.usage(start, clock.now_micros(), &GroupBy::Job).unwrap();
    let build = u.groups.iter().find(|g| g.group == "build").unwrap();
    assert_eq!(build.usage.rejections.get("insufficient_workers"), Some(&1));
    assert_eq!((build.usage.granted, build.usage.expired, build.usage.released), (1, 1, 0));
    assert_eq!(build.usage.worker_seconds, 120.0);
}

/// On real files: a read-only handle beside the writer catches up after `refresh`, and a
/// writer's index stays current as it appends.
#[test]
fn reader_and_writer_on_disk_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_default_epoch();
    let writer =
        Ledger::open_with(tmp.path(), OpenOptions::default().config(config()).clock(Arc::new(clock.clone()))).unwrap();
    writer.prepare_history(&mut |_, _| {}).unwrap();
    run(&writer, &clock, &[Op::Request { job: 0, workers: 2, mcp: vec!["costly"], ttl: 90, tenant: None }]);
    let ro = OpenOptions { clock: Arc::new(clock.clone()), ..OpenOptions::read_only() };
    let reader = Ledger::open_with(tmp.path(), ro).unwrap();
    let t1 = events(&writer).last().unwrap().event.ts_us;
    assert_eq!(reader.capacity_at(t1).unwrap(), writer.capacity_at(t1).unwrap());
    run(
        &writer,
        &clock,
        &[Op::Request { job: 1, workers: 3, mcp: vec![], ttl: 600, tenant: None }, Op::Advance(1), Op::Release(0)],
    );
    reader.refresh().unwrap();
    let all = events(&writer);
    for e in &all {
        assert_eq!(reader.capacity_at(e.event.ts_us).unwrap(), writer.capacity_at(e.event.ts_us).unwrap());
    }
    let (n, steps, bytes) = writer.history_index_stats().unwrap().unwrap();
    assert_eq!(n, all.len() as u64);
    assert!(steps <= 2 * all.len() && bytes > 0);
    assert!(reader.allocations_at(t1).unwrap().len() == 1);
}
