//! Storage faults, operation by operation. A fixed workload (open, grants, a rejection,
//! releases, an expiry, snapshots, segment rotations) runs on `FaultyStorage` with storage
//! operation N failing, for every N, every kind of operation and every kind of fault (EIO, a
//! short write, ENOSPC; once, or from then on: a dead or full disk). Then the machine loses
//! power (`crash`: only fsynced bytes and directory entries survive, plus a torn prefix of the
//! rest), and a fresh ledger opens the same storage. A second pass restarts the process
//! instead (everything written survives).
//!
//! The guarantee checked, exactly:
//!
//! 1. **Acknowledged means durable.** Every operation that returned `Ok` is in the recovered
//!    log with the outcome it returned: a grant or rejection at the sequence number it
//!    reported, with the same allocation id, slots, endpoints and deadline; a release's
//!    `released` event at the time it reported; a cleanup's `expired` events; a snapshot is
//!    never ahead of the recovered log.
//! 2. **Whole records, in order.** The recovered log is a prefix of the log the process wrote
//!    (all of it after a restart); a torn record is cut into `quarantine/`, never read.
//! 3. **A failed operation leaves nothing behind, with one exception.** An append that fails
//!    (EIO, short write, ENOSPC) is cut back at once, so the event is not in the log even
//!    before the crash, and the ledger goes on; a command refused because the ledger stopped
//!    writes touches nothing. The exception: a command whose record was appended and whose
//!    covering fsync then failed returns `Poisoned` ("fsync of the log failed"), and its
//!    outcome is unknown. The record may or may not have reached the disk, so after a crash or
//!    restart it is either whole in the log or absent, never half there. A caller must treat
//!    `Poisoned` as "maybe" and look the job up after reopening.
//! 4. **A failed fsync is latched, never retried.** Once a command returned `Poisoned`, every
//!    later command returns `Poisoned`, and the ledger makes no storage operation at all (no
//!    second fsync, no write) until it is reopened.
//! 5. **The state is the log.** The recovered state equals a fresh fold of the recovered log,
//!    with no anomalies and every invariant; `verify` passes; the recovered ledger takes writes,
//!    and they survive the next crash.
//!
//! Disk full gets its own tests: ENOSPC from the first write of an append, and from the header
//! write of a new segment during rotation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::{Fault, FaultPlan, FaultyStorage, OpKind};
use allocation_ledger::{format_micros, Micros};
use allocation_ledger::{
    AllocationId, CleanupReport, Error, EventBody, Ledger, LoggedEvent, ManualClock, ReleaseReport, RequestOutcome,
    ResourceRequest,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What the matrix saw, so the test can show that each branch of the guarantee was reached.
static ACKED_CHECKED: AtomicU64 = AtomicU64::new(0);
static MAYBE_SURVIVED: AtomicU64 = AtomicU64::new(0);
static MAYBE_LOST: AtomicU64 = AtomicU64::new(0);
static FAILED_LEFT_NOTHING: AtomicU64 = AtomicU64::new(0);
static TORN_CUT: AtomicU64 = AtomicU64::new(0);
static LATCH_PROBED: AtomicU64 = AtomicU64::new(0);
use common::{fold, mem_options, small_config, MEM_DIR};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
enum Op {
    Request {
        job: &'static str,
        workers: u32,
        mcp: &'static [&'static str],
        ttl: u64,
    },
    /// Releases what the request of `job` was granted (skipped if it was not).
    Release {
        job: &'static str,
    },
    Advance(i64),
    Cleanup,
    Snapshot,
}

use Op::*;

/// About ten commands; with 4 KiB segments, a snapshot every 2 events and ~1 KiB events they
/// rotate segments several times and write (and prune) several snapshots.
const WORKLOAD: &[Op] = &[
    Request { job: "w01", workers: 3, mcp: &["github"], ttl: 3600 },
    Request { job: "w02", workers: 2, mcp: &["github", "slack"], ttl: 60 },
    Request { job: "w03", workers: 9, mcp: &[], ttl: 3600 },
    Release { job: "w01" },
    Snapshot,
    Request { job: "w06", workers: 4, mcp: &["db"], ttl: 3600 },
    Advance(61),
    Cleanup,
    Request { job: "w09", workers: 1, mcp: &[], ttl: 3600 },
    Release { job: "w06" },
    Request { job: "w11", workers: 2, mcp: &["github"], ttl: 3600 },
    Snapshot,
];

fn config() -> allocation_ledger::Config {
    small_config(2)
}

fn request_of(job: &str, workers: u32, mcp: &[&str], ttl: u64) -> ResourceRequest {
    let mut meta = serde_json::Map::new();
    meta.insert("job".into(), job.into());
    meta.insert("note".into(), "n".repeat(500).into());
    let mut r = ResourceRequest::new(job).workers(workers).ttl_seconds(ttl).metadata(meta);
    for m in mcp {
        r = r.mcp_server(*m);
    }
    r
}

#[derive(Debug)]
enum Acked {
    Request(RequestOutcome),
    Release(ReleaseReport),
    Cleanup(CleanupReport),
    Snapshot(u64),
    Nothing,
}

#[derive(Debug)]
struct Done {
    op: Op,
    result: Result<Acked, Error>,
    /// The ledger's last sequence number before and after the command.
    seq_before: u64,
    seq_after: u64,
    /// Storage operations counted before and after the command.
    ops_before: u64,
    ops_after: u64,
    /// Whether the ledger had stopped accepting writes right after the command.
    poisoned_after: bool,
}

struct Run {
    ledger: Option<Ledger>,
    /// Whether the open at the start succeeded (the ledger existed).
    opened: bool,
    done: Vec<Done>,
}

/// Opens a ledger on `storage` and runs the workload, recording every answer.
fn run_workload(storage: &FaultyStorage, clock: &ManualClock) -> Run {
    let ledger = match Ledger::open_with(MEM_DIR, mem_options(storage, clock, config())) {
        Ok(l) => l,
        Err(e) => {
            assert!(matches!(e, Error::Io { .. }), "opening on faulty storage failed with {e}");
            return Run { ledger: None, opened: false, done: Vec::new() };
        }
    };
    let mut granted: HashMap<&str, AllocationId> = HashMap::new();
    let mut done = Vec::new();
    for &op in WORKLOAD {
        let seq_before = ledger.status().last_seq;
        let ops_before = storage.ops();
        let result = match op {
            Request { job, workers, mcp, ttl } => {
                ledger.request_resources(&request_of(job, workers, mcp, ttl)).map(|o| {
                    if let RequestOutcome::Granted(g) = &o {
                        granted.insert(job, g.allocation_id);
                    }
                    Acked::Request(o)
                })
            }
            Release { job } => match granted.get(job) {
                Some(id) => ledger.release_resources(&id.to_string()).map(Acked::Release),
                None => continue,
            },
            Advance(s) => {
                clock.advance_seconds(s);
                Ok(Acked::Nothing)
            }
            Cleanup => ledger.cleanup_expired().map(Acked::Cleanup),
            Snapshot => ledger.snapshot().map(|s| Acked::Snapshot(s.seq)),
        };
        done.push(Done {
            op,
            result,
            seq_before,
            seq_after: ledger.status().last_seq,
            ops_before,
            ops_after: storage.ops(),
            poisoned_after: ledger.status().poisoned.is_some(),
        });
    }
    Run { ledger: Some(ledger), opened: true, done }
}

fn job_of(e: &LoggedEvent) -> Option<&str> {
    match &e.event.body {
        EventBody::Granted(g) => Some(&g.job_id),
        EventBody::Rejected(r) => Some(&r.job_id),
        _ => None,
    }
}

fn seq_of(o: &RequestOutcome) -> u64 {
    match o {
        RequestOutcome::Granted(g) => g.seq,
        RequestOutcome::Failed(f) => f.seq,
    }
}

fn is_fsync_poison(e: &Error) -> bool {
    matches!(e, Error::Poisoned(m) if m.contains("fsync"))
}

/// What must hold of the run before any crash: error kinds, the poison latch, and failed
/// commands that left nothing behind. Returns the log as the process wrote it.
fn check_run(storage: &FaultyStorage, run: &Run, ctx: &str) -> Vec<LoggedEvent> {
    let Some(ledger) = &run.ledger else { return Vec::new() };
    let written = common::all_events(ledger);
    let mut poisoned_at: Option<usize> = None;
    for (i, d) in run.done.iter().enumerate() {
        let ctx = format!("{ctx}, command {i} {:?}", d.op);
        if matches!(d.op, Advance(_)) {
            continue;
        }
        if let Some(p) = poisoned_at {
            // The latch: refused, and not a single storage operation (no retried fsync).
            match &d.result {
                Err(Error::Poisoned(_)) => {}
                other => panic!("{ctx}: the ledger stopped writes at command {p}, yet this returned {other:?}"),
            }
            assert_eq!(d.ops_before, d.ops_after, "{ctx}: a refused command touched the storage");
            assert_eq!(d.seq_before, d.seq_after, "{ctx}: a refused command appended");
            continue;
        }
        let Err(e) = &d.result else { continue };
        match e {
            Error::Poisoned(_) => poisoned_at = Some(i),
            Error::Io { .. } => assert!(!d.poisoned_after, "{ctx}: an I/O error that is not Poisoned stopped writes"),
            other => panic!("{ctx}: unexpected error {other}"),
        }
        // Which events this failed command appended: expiries (the ledger's own) may be; its
        // own event only if the fsync covering it failed.
        for ev in written.iter().filter(|ev| ev.seq > d.seq_before && ev.seq <= d.seq_after) {
            let own = match (d.op, &ev.event.body) {
                (Request { job, .. }, _) => job_of(ev) == Some(job),
                (Release { .. }, EventBody::Released { .. }) => true,
                _ => false,
            };
            if own {
                assert!(is_fsync_poison(e), "{ctx}: the command failed with {e} but its event is in the log: {ev:?}");
            } else {
                assert!(matches!(ev.event.body, EventBody::Expired { .. }), "{ctx}: unexpected event {ev:?}");
            }
        }
        if let Request { job, .. } = d.op {
            let n = written.iter().filter(|ev| job_of(ev) == Some(job)).count();
            assert!(n <= 1, "{ctx}: {n} events for one request");
            if n == 1 {
                assert!(is_fsync_poison(e), "{ctx}: failed with {e}, yet its event was written");
            } else if !matches!(e, Error::Poisoned(_)) {
                FAILED_LEFT_NOTHING.fetch_add(1, Relaxed);
            }
        }
    }
    // Probe the latch once more: every kind of command is refused without a storage operation.
    if ledger.status().poisoned.is_some() {
        let before = storage.ops();
        let probes = [
            ledger.request_resources(&request_of("probe", 1, &[], 3600)).map(drop),
            ledger.cleanup_expired().map(drop),
            ledger.snapshot().map(drop),
            ledger.release_resources("alloc-000000000001").map(drop),
        ];
        for p in probes {
            assert!(matches!(p, Err(Error::Poisoned(_))), "{ctx}: a poisoned ledger answered {p:?}");
        }
        assert_eq!(storage.ops(), before, "{ctx}: a poisoned ledger touched the storage (a retried fsync?)");
        LATCH_PROBED.fetch_add(1, Relaxed);
        assert_eq!(common::all_events(ledger), written, "{ctx}");
    }
    written
}

/// What must hold of the recovered ledger: guarantees 1, 2 and 5 (3 and 4 were checked on the
/// run). `exact`: a restart, not a crash, so nothing written may be missing.
fn check_recovered(
    storage: &FaultyStorage,
    recovered: &Ledger,
    run: &Run,
    written: &[LoggedEvent],
    exact: bool,
    ctx: &str,
) {
    let events = common::all_events(recovered);
    if !run.opened {
        // The ledger was never created: this open created it (or found its first record).
        assert_eq!(events.len(), 1, "{ctx}: {events:?}");
        assert!(matches!(events[0].event.body, EventBody::LedgerCreated { .. }), "{ctx}");
    } else if exact {
        assert_eq!(events, written, "{ctx}: a restart lost or changed events");
    } else {
        assert!(events.len() <= written.len(), "{ctx}: more events after the crash than written");
        assert_eq!(events, written[..events.len()], "{ctx}: the recovered log is not a prefix of the written one");
    }
    for d in &run.done {
        let ctx = format!("{ctx}, {:?}", d.op);
        if let (Request { job, .. }, Err(e)) = (d.op, &d.result) {
            if written.iter().any(|ev| job_of(ev) == Some(job)) {
                assert!(is_fsync_poison(e));
                let survived = events.iter().any(|ev| job_of(ev) == Some(job));
                if survived { &MAYBE_SURVIVED } else { &MAYBE_LOST }.fetch_add(1, Relaxed);
            }
        }
        if d.result.is_ok() {
            ACKED_CHECKED.fetch_add(1, Relaxed);
        }
        match &d.result {
            Ok(Acked::Request(RequestOutcome::Granted(g))) => {
                let ev = events.get(g.seq as usize - 1).unwrap_or_else(|| panic!("{ctx}: acknowledged grant lost"));
                let EventBody::Granted(e) = &ev.event.body else { panic!("{ctx}: {ev:?}") };
                assert_eq!((e.allocation_id, e.job_id.as_str()), (g.allocation_id, g.job_id.as_str()), "{ctx}");
                let slots: Vec<(&str, &str)> = e.workers.iter().map(|w| (&*w.worker_id, &*w.endpoint)).collect();
                let told: Vec<(&str, &str)> =
                    g.workers_allocated.iter().map(|w| (&*w.worker_id, &*w.endpoint)).collect();
                assert_eq!(slots, told, "{ctx}");
                let mcp: Vec<(&str, &str)> = e.mcp_servers.iter().map(|m| (&*m.name, &*m.endpoint)).collect();
                let told: Vec<(&str, &str)> = g.mcp_servers.iter().map(|m| (&*m.name, &*m.endpoint)).collect();
                assert_eq!(mcp, told, "{ctx}");
                assert_eq!(
                    format_micros(e.deadline_us),
                    format_micros(Micros::from_micros(g.expires_at.timestamp_micros())),
                    "{ctx}"
                );
            }
            Ok(Acked::Request(RequestOutcome::Failed(f))) => {
                let ev = events.get(f.seq as usize - 1).unwrap_or_else(|| panic!("{ctx}: acknowledged rejection lost"));
                let EventBody::Rejected(r) = &ev.event.body else { panic!("{ctx}: {ev:?}") };
                assert_eq!((r.allocation_id, &r.error), (f.allocation_id, &f.error), "{ctx}");
            }
            Ok(Acked::Release(r)) if r.status == "released" => {
                let found = events.iter().any(|ev| {
                    matches!(ev.event.body, EventBody::Released { allocation_id } if allocation_id == r.allocation_id)
                        && r.released_at.map(|t| format_micros(Micros::from_micros(t.timestamp_micros())))
                            == Some(format_micros(ev.event.ts_us))
                });
                assert!(found, "{ctx}: acknowledged release lost");
            }
            Ok(Acked::Cleanup(c)) => {
                for id in &c.cleaned_up {
                    let found = events.iter().any(
                        |ev| matches!(ev.event.body, EventBody::Expired { allocation_id, .. } if allocation_id == *id),
                    );
                    assert!(found, "{ctx}: acknowledged expiry of {id} lost");
                }
            }
            Ok(Acked::Snapshot(seq)) => {
                assert!(events.len() as u64 >= *seq, "{ctx}: a snapshot at {seq} is ahead of the log");
            }
            _ => {}
        }
    }
    let state = recovered.with_state(std::clone::Clone::clone);
    assert_eq!(state, fold(&events), "{ctx}: the recovered state is not the fold of the recovered log");
    state.check_invariants().unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let c = recovered.get_capacity().unwrap();
    assert_eq!(c.allocated_workers + c.available_workers, c.total_workers, "{ctx}");
    assert_eq!(c.allocated_cpu_millicores + c.available_cpu_millicores, c.total_cpu_millicores, "{ctx}");
    assert_eq!(c.allocated_memory + c.available_memory, c.total_memory, "{ctx}");
    if let Some(t) = &recovered.recovery_report().torn_tail {
        TORN_CUT.fetch_add(1, Relaxed);
        let saved = t.saved_to.as_ref().unwrap_or_else(|| panic!("{ctx}: torn tail not saved"));
        assert_eq!(storage.files()[saved].len() as u64, t.len, "{ctx}: the torn bytes were not kept whole");
    }
    let report = allocation_ledger::verify(storage, Path::new(MEM_DIR), &mut |_, _| {}).unwrap();
    assert!(report.ok, "{ctx}: verify after recovery: {:?}", report.problems);
}

/// The recovered ledger takes a write, and the write survives the next crash.
fn write_and_crash_again(storage: &FaultyStorage, clock: &ManualClock, recovered: Ledger, seed: u64, ctx: &str) {
    clock.advance_seconds(1);
    let o = recovered
        .request_resources(&ResourceRequest::new("after-recovery").mcp_server("github"))
        .unwrap_or_else(|e| panic!("{ctx}: write after recovery: {e}"));
    let events = common::all_events(&recovered);
    assert_eq!(events.last().map(|e| e.seq), Some(seq_of(&o)), "{ctx}");
    drop(recovered);
    storage.crash(seed);
    let again = Ledger::open_with(MEM_DIR, mem_options(storage, clock, config()))
        .unwrap_or_else(|e| panic!("{ctx}: open after the second crash: {e}"));
    assert_eq!(common::all_events(&again), events, "{ctx}: second crash");
}

/// One cell of the matrix; returns whether the fault fired.
fn check_cell(plan: FaultPlan, seed: u64) -> bool {
    let ctx = format!("{:?} on {:?} #{} (sticky: {})", plan.fault, plan.kind, plan.nth, plan.sticky);

    // Power loss after the fault.
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    storage.set_plan(Some(plan));
    let mut run = run_workload(&storage, &clock);
    let fired = storage.faults_fired() > 0;
    let written = check_run(&storage, &run, &ctx);
    let ctx_crash = format!("{ctx}, power loss (seed {seed})");
    drop(run.ledger.take());
    storage.crash(seed);
    let recovered = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config()))
        .unwrap_or_else(|e| panic!("{ctx_crash}: reopen failed: {e}"));
    check_recovered(&storage, &recovered, &run, &written, false, &ctx_crash);
    write_and_crash_again(&storage, &clock, recovered, seed + 1, &ctx_crash);

    // A restart (the process died, the machine did not) after the same fault.
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    storage.set_plan(Some(plan));
    let mut run = run_workload(&storage, &clock);
    let written = check_run(&storage, &run, &ctx);
    let ctx_restart = format!("{ctx}, restart");
    drop(run.ledger.take());
    storage.set_plan(None);
    let recovered = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config()))
        .unwrap_or_else(|e| panic!("{ctx_restart}: reopen failed: {e}"));
    check_recovered(&storage, &recovered, &run, &written, true, &ctx_restart);
    fired
}

// ---------------------------------------------------------------------------------------------
// The matrix.

const KINDS: [Option<OpKind>; 8] = [
    None,
    Some(OpKind::Write),
    Some(OpKind::Sync),
    Some(OpKind::Truncate),
    Some(OpKind::Rename),
    Some(OpKind::Create),
    Some(OpKind::SyncDir),
    Some(OpKind::Remove),
];

/// Runs every N of one (kind, fault, sticky) until N is past the workload's operations of that
/// kind (the first N at which the fault no longer fires); returns how many Ns fired.
fn sweep(kind: Option<OpKind>, fault: Fault, sticky: bool) -> u64 {
    let mut nth = 0;
    loop {
        let seed = nth * 7 + u64::from(sticky) * 1_000 + fault as u64 * 10_000;
        if !check_cell(FaultPlan { kind, nth, fault, sticky }, seed) {
            return nth;
        }
        nth += 1;
    }
}

#[test]
fn every_storage_operation_of_the_workload_failing_then_power_loss_or_restart() {
    let mut cells = Vec::new();
    for kind in KINDS {
        for fault in [Fault::Fail, Fault::ShortWrite, Fault::NoSpace] {
            // A short write is a write's fault; on other operations it is plain EIO.
            if fault == Fault::ShortWrite && !matches!(kind, None | Some(OpKind::Write)) {
                continue;
            }
            for sticky in [false, true] {
                cells.push((kind, fault, sticky));
            }
        }
    }
    type Cell = (Option<OpKind>, Fault, bool);
    let counts: Vec<(Cell, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|part| {
                let cells = &cells;
                s.spawn(move || {
                    cells
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % 2 == part)
                        .map(|(_, &(k, f, st))| ((k, f, st), sweep(k, f, st)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let per_kind =
        |k: Option<OpKind>| counts.iter().find(|((kk, f, st), _)| *kk == k && *f == Fault::Fail && !st).unwrap().1;
    for ((k, f, st), n) in &counts {
        eprintln!("{k:?} {f:?} sticky={st}: {n} operations failed in turn");
    }
    // The workload reaches every kind of operation (a truncate only on a failure path, which
    // the sticky all-kinds cells reach: the cut-back after a failed write fails too).
    assert!(per_kind(None) >= 60, "{}", per_kind(None));
    assert!(per_kind(Some(OpKind::Write)) >= 15);
    assert!(per_kind(Some(OpKind::Sync)) >= 10);
    assert!(per_kind(Some(OpKind::Create)) >= 4);
    assert!(per_kind(Some(OpKind::SyncDir)) >= 4);
    assert!(per_kind(Some(OpKind::Rename)) >= 2);
    assert!(per_kind(Some(OpKind::Remove)) >= 1);
    let seen = [
        ("acknowledged commands checked after recovery", ACKED_CHECKED.load(Relaxed)),
        ("fsync-failed commands whose event survived", MAYBE_SURVIVED.load(Relaxed)),
        ("fsync-failed commands whose event was lost", MAYBE_LOST.load(Relaxed)),
        ("failed commands that left nothing behind", FAILED_LEFT_NOTHING.load(Relaxed)),
        ("torn tails cut on reopen", TORN_CUT.load(Relaxed)),
        ("poisoned ledgers probed", LATCH_PROBED.load(Relaxed)),
    ];
    for (what, n) in seen {
        eprintln!("{what}: {n}");
        assert!(n > 0, "the matrix never reached: {what}");
    }
}

// ---------------------------------------------------------------------------------------------
// Single scenarios, spelled out.

fn open_mem(storage: &FaultyStorage, clock: &ManualClock) -> Ledger {
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, config())).unwrap()
}

fn grant(ledger: &Ledger, job: &str, workers: u32) -> allocation_ledger::GrantReport {
    match ledger.request_resources(&request_of(job, workers, &["github"], 3600)).unwrap() {
        RequestOutcome::Granted(g) => g,
        other => panic!("{other:?}"),
    }
}

fn is_enospc(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => source.raw_os_error() == Some(28),
        Error::Poisoned(m) => m.contains("os error 28"),
        _ => false,
    }
}

#[test]
fn a_failed_fsync_is_latched_until_reopen_and_never_retried() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open_mem(&storage, &clock);
    let kept = grant(&ledger, "kept", 2);
    storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth: 0, fault: Fault::Fail, sticky: false }));
    let err = ledger.request_resources(&request_of("unknown-outcome", 1, &[], 3600)).unwrap_err();
    assert!(is_fsync_poison(&err), "{err}");
    let text = err.to_string();
    assert!(text.contains("stopped accepting writes") && text.contains("reopen"), "{text}");
    assert_eq!(storage.faults_fired(), 1);
    let ops = storage.ops();
    // Everything is refused, reads included (the last record is not durable), with the reason.
    for r in [
        ledger.request_resources(&request_of("later", 1, &[], 3600)).map(drop),
        ledger.release_resources(&kept.allocation_id.to_string()).map(drop),
        ledger.cleanup_expired().map(drop),
        ledger.snapshot().map(drop),
        ledger.get_capacity().map(drop),
    ] {
        let e = r.unwrap_err();
        assert!(is_fsync_poison(&e), "{e}");
    }
    assert_eq!(storage.ops(), ops, "no fsync (nor anything else) after the failed one");
    assert!(ledger.status().poisoned.unwrap().contains("fsync"));
    drop(ledger);
    // Reopened, the ledger replays the log: the grant whose fsync failed is there whole (the
    // bytes were still in the page cache) and is made durable now.
    let again = open_mem(&storage, &clock);
    let events = common::all_events(&again);
    assert_eq!(events.iter().filter(|e| job_of(e) == Some("unknown-outcome")).count(), 1);
    assert!(events.iter().any(|e| job_of(e) == Some("kept")));
    again.release_resources(&kept.allocation_id.to_string()).unwrap();
}

#[test]
fn disk_full_while_appending_a_record_is_an_error_and_the_ledger_goes_on() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open_mem(&storage, &clock);
    let a = grant(&ledger, "a", 2);
    // The disk fills up. Writes over the zeros pre-filled after the records need no room and
    // go on; the first write that would grow the file gets ENOSPC after putting down what fits.
    storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Write), nth: 0, fault: Fault::NoSpace, sticky: true }));
    let mut on_full_disk = 0;
    let (before, files_before) = loop {
        let (events, files) = (common::all_events(&ledger), storage.files());
        match ledger.request_resources(&request_of(&format!("fill-{on_full_disk}"), 0, &["github"], 3600)) {
            Ok(o) => assert!(o.is_granted(), "{o:?}"),
            Err(e) => {
                assert!(is_enospc(&e), "{e}");
                assert!(e.to_string().contains("making room for record"), "{e}");
                break (events, files);
            }
        }
        on_full_disk += 1;
        assert!(on_full_disk < 20, "a 4 KiB segment holds a few records, not {on_full_disk}");
    };
    assert!(on_full_disk > 0, "writes over the pre-filled zeros went on");
    let e = ledger.request_resources(&request_of("c", 1, &[], 3600)).unwrap_err();
    assert!(is_enospc(&e), "{e}");
    // Nothing was left behind: the room the failed commands needed could not be made, so
    // nothing of their records was written (room comes before the record).
    assert_eq!(storage.files(), files_before);
    assert_eq!(common::all_events(&ledger), before);
    assert_eq!(ledger.status().poisoned, None);
    // Reads go on.
    assert_eq!(ledger.get_capacity().unwrap().allocated_workers, 2);
    // Reopening on the still-full disk works, and shows every acknowledged event.
    drop(ledger);
    let ledger = open_mem(&storage, &clock);
    assert_eq!(common::all_events(&ledger), before);
    // Space is freed: writes work again without a reopen.
    storage.set_plan(None);
    let b = grant(&ledger, "b", 1);
    ledger.release_resources(&a.allocation_id.to_string()).unwrap();
    let after = common::all_events(&ledger);
    drop(ledger);
    storage.crash(3);
    let ledger = open_mem(&storage, &clock);
    assert_eq!(common::all_events(&ledger), after);
    assert_eq!(ledger.get_allocation(&b.allocation_id.to_string()).unwrap().unwrap().state.as_str(), "active");
}

#[test]
fn disk_full_while_rotating_a_segment_is_an_error_and_reopen_is_clean() {
    for (restart, seed) in [(true, 0), (false, 1), (false, 2)] {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let ledger = open_mem(&storage, &clock);
        let wal = Path::new(MEM_DIR).join("wal");
        let segments = |s: &FaultyStorage| s.files().keys().filter(|p| p.parent() == Some(&wal)).count();
        // Fill the active segment up to the rotation point.
        let mut n = 0;
        let last_len = |s: &FaultyStorage| {
            let files = s.files();
            files
                .iter()
                .filter(|(p, _)| p.parent() == Some(&wal))
                .map(|(_, b)| common::records_end(b))
                .next_back()
                .unwrap()
        };
        while last_len(&storage) < 4096 {
            grant(&ledger, &format!("fill-{n}"), 0);
            n += 1;
        }
        let acked = common::all_events(&ledger);
        let segs = segments(&storage);
        storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Write), nth: 0, fault: Fault::NoSpace, sticky: true }));
        // The next append starts a new segment; its header write hits the full disk.
        let e = ledger.request_resources(&request_of("rotates", 1, &[], 3600)).unwrap_err();
        assert!(matches!(e, Error::Io { .. }) && is_enospc(&e), "{e}");
        assert!(e.to_string().contains("header"), "{e}");
        assert_eq!(segments(&storage), segs, "what was made of the new segment is removed again");
        // The log is as it was: the ledger goes on (reads, and writes that fail for want of
        // room), and nothing of the failed commands is in it.
        let e2 = ledger.request_resources(&request_of("later", 1, &[], 3600)).unwrap_err();
        assert!(matches!(e2, Error::Io { .. }) && is_enospc(&e2), "{e2}");
        assert_eq!(common::all_events(&ledger), acked);
        let files = storage.files();
        if restart {
            // Another process, while the disk is still full: read-only and read-write opens
            // find the log whole and change nothing.
            let opts = allocation_ledger::OpenOptions {
                read_only: true,
                create: false,
                ..mem_options(&storage, &clock, config())
            };
            let l = Ledger::open_with(MEM_DIR, opts).unwrap();
            assert_eq!(l.recovery_report().torn_tail, None);
            assert_eq!(common::all_events(&l), acked);
            drop(l);
            assert_eq!(storage.files(), files, "a read-only open changed the log");
        } else {
            // Room again: the same ledger rotates and goes on.
            storage.set_plan(None);
            grant(&ledger, "room-again", 1);
            assert_eq!(segments(&storage), segs + 1);
        }
        drop(ledger);
        if restart {
            let l = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config())).unwrap();
            assert_eq!(l.recovery_report().torn_tail, None);
            assert_eq!(common::all_events(&l), acked);
            drop(l);
            assert_eq!(storage.files(), files, "the open changed the log");
        }
        let acked = if restart { acked } else { common::all_events(&open_mem(&storage, &clock)) };
        storage.set_plan(None);
        if !restart {
            storage.crash(seed);
        }
        let ledger = open_mem(&storage, &clock);
        let events = common::all_events(&ledger);
        assert_eq!(events, acked, "restart {restart}: every acknowledged event, nothing else");
        assert_eq!(ledger.with_state(std::clone::Clone::clone), fold(&events));
        // The ledger rotates now that there is room, and what it writes survives.
        grant(&ledger, "after", 1);
        let after = common::all_events(&ledger);
        drop(ledger);
        storage.crash(seed + 10);
        assert_eq!(common::all_events(&open_mem(&storage, &clock)), after);
        let report = allocation_ledger::verify(&storage, Path::new(MEM_DIR), &mut |_, _| {}).unwrap();
        assert!(report.ok, "{:?}", report.problems);
    }
}

#[test]
fn an_empty_segment_of_an_older_build_is_replaced_and_a_failure_there_loses_nothing() {
    // An empty version 1 segment (an older build's rotation that wrote nothing yet) is not
    // appended to: this build replaces it with a chained (version 4) one, where the chain
    // begins. Here every operation fails from the replacement on.
    let storage = FaultyStorage::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-snap3");
    for sub in ["wal", "snapshots"] {
        for entry in std::fs::read_dir(fixture.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            let to = Path::new(MEM_DIR).join(sub).join(path.file_name().unwrap());
            storage.put_file(&to, std::fs::read(&path).unwrap());
        }
    }
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(7200);
    let opts =
        || allocation_ledger::OpenOptions::default().storage(Arc::new(storage.clone())).clock(Arc::new(clock.clone()));
    let next = Ledger::open_with(MEM_DIR, opts()).unwrap().with_state(|s| s.last_seq) + 1;
    let empty_v1 = Path::new(MEM_DIR).join("wal").join(allocation_ledger::testing::segment::file_name(next));
    storage.put_file(&empty_v1, allocation_ledger::testing::segment::encode_header_version(next, 1));
    let ledger = Ledger::open_with(MEM_DIR, opts()).unwrap();
    let acked = common::all_events(&ledger);
    storage.set_plan(Some(FaultPlan { kind: None, nth: 0, fault: Fault::ShortWrite, sticky: true }));
    assert!(ledger.request_resources(&request_of("b", 1, &[], 3600)).is_err());
    drop(ledger);
    storage.set_plan(None);
    let ledger = Ledger::open_with(MEM_DIR, opts()).unwrap();
    assert_eq!(common::all_events(&ledger), acked, "nothing acknowledged is lost");
    // Without faults the replacement goes through: the segment is version 4, the chain begins there.
    assert!(ledger.request_resources(&request_of("c", 1, &[], 3600)).unwrap().is_granted());
    drop(ledger);
    let bytes = storage.files().get(&empty_v1).cloned().expect("the segment is there again");
    assert_eq!(&bytes[8..12], &4u32.to_le_bytes());
    let report = allocation_ledger::verify(&storage, Path::new(MEM_DIR), &mut |_, _| {}).unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.chain_from, Some(next));
}

/// In a pre-filled segment the records a batch of commands appended are written with one
/// write, after their events are folded. If that write fails, the ledger stops writing, like
/// after a failed fsync: the callers get `Poisoned`, nothing more touches the disk, and a
/// reopen recovers what the log holds.
#[test]
fn a_failed_batch_write_stops_writes() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open_mem(&storage, &clock);
    grant(&ledger, "a", 1);
    let acked = common::all_events(&ledger);
    storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Write), nth: 0, fault: Fault::ShortWrite, sticky: false }));
    let e = ledger.request_resources(&request_of("b", 1, &[], 3600)).unwrap_err();
    assert!(matches!(&e, Error::Poisoned(m) if m.contains("writing records up to")), "{e}");
    assert_eq!(storage.faults_fired(), 1);
    let ops = storage.ops();
    assert!(matches!(ledger.request_resources(&request_of("c", 1, &[], 3600)), Err(Error::Poisoned(_))));
    assert!(matches!(ledger.get_capacity(), Err(Error::Poisoned(_))));
    assert_eq!(storage.ops(), ops, "a stopped ledger touches nothing");
    drop(ledger);
    // Half the record landed: reopening cuts it as a torn tail.
    let ledger = open_mem(&storage, &clock);
    let torn = ledger.recovery_report().torn_tail.clone().expect("a torn tail");
    assert!(torn.saved_to.is_some());
    assert_eq!(common::all_events(&ledger), acked);
    grant(&ledger, "after", 1);
}

/// Group commit under fsync failures: several threads append concurrently; the Nth fsync
/// fails. Every waiter whose record it covered gets `Poisoned`; every acknowledged grant
/// survives power loss; nothing else does unless whole.
#[test]
fn concurrent_writers_sharing_a_failed_fsync_all_get_poisoned() {
    for nth in 0..6u64 {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let ledger = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, small_config(0))).unwrap();
        storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth, fault: Fault::Fail, sticky: false }));
        let results: Vec<(String, Result<RequestOutcome, Error>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let ledger = &ledger;
                    s.spawn(move || {
                        (0..5)
                            .map(|i| {
                                let job = format!("t{t}-{i}");
                                let r = ledger.request_resources(&ResourceRequest::new(&job).mcp_server("github"));
                                (job, r)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let written = common::all_events(&ledger);
        let first_err = results.iter().any(|(_, r)| r.is_err());
        assert!(first_err, "nth {nth}: the fault never fired");
        for (job, r) in &results {
            match r {
                Ok(_) => {}
                Err(e) => assert!(matches!(e, Error::Poisoned(_)), "nth {nth}: {job}: {e}"),
            }
        }
        let ops = storage.ops();
        assert!(ledger.request_resources(&ResourceRequest::new("x").mcp_server("a")).is_err());
        assert_eq!(storage.ops(), ops);
        drop(ledger);
        storage.crash(nth);
        let recovered = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, small_config(0))).unwrap();
        let events = common::all_events(&recovered);
        assert_eq!(events, written[..events.len()], "nth {nth}");
        for (job, r) in &results {
            let n = events.iter().filter(|e| job_of(e) == Some(job)).count();
            match r {
                Ok(o) => {
                    assert_eq!(n, 1, "nth {nth}: acknowledged {job} lost");
                    assert_eq!(events[seq_of(o) as usize - 1].event.body.allocation_id(), Some(o.allocation_id()));
                }
                Err(_) => assert!(n <= 1, "nth {nth}: {job}"),
            }
        }
        assert_eq!(recovered.with_state(std::clone::Clone::clone), fold(&events));
    }
}

/// Records the directory-level operations a `FaultyStorage` sees (which `crash` does not model
/// for directories themselves), to check their order.
#[derive(Debug)]
struct Recording {
    inner: FaultyStorage,
    log: std::sync::Mutex<Vec<String>>,
}

impl Recording {
    fn note(&self, what: &str, p: &Path) {
        self.log.lock().unwrap().push(format!("{what} {}", p.display()));
    }
}

impl allocation_ledger::storage::Storage for Recording {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.note("mkdir", dir);
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn open_append(
        &self,
        path: &Path,
        create_new: bool,
    ) -> std::io::Result<Box<dyn allocation_ledger::storage::AppendFile>> {
        self.inner.open_append(path, create_new)
    }
    fn read(&self, path: &Path) -> std::io::Result<allocation_ledger::storage::FileBytes> {
        self.inner.read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.inner.read_range(path, offset, len)
    }
    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        self.inner.file_len(path)
    }
    fn set_len(&self, path: &Path, len: u64) -> std::io::Result<()> {
        self.note("truncate", path);
        self.inner.set_len(path, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.note("rename", to);
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.note("syncdir", dir);
        self.inner.sync_dir(dir)
    }
    fn try_lock(&self, path: &Path) -> std::io::Result<Option<Box<dyn allocation_ledger::storage::LockGuard>>> {
        self.inner.try_lock(path)
    }
}

/// A torn tail is cut only once its copy is durable: the copy's file and the new
/// `quarantine/` directory's own entry in the ledger directory are fsynced before the cut.
#[test]
fn a_torn_tail_is_cut_only_after_its_copy_and_the_quarantine_directory_are_durable() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open_mem(&storage, &clock);
    grant(&ledger, "a", 1);
    drop(ledger);
    // Half a record at the end of the log.
    let (seg, mut bytes) =
        storage.files().into_iter().rfind(|(p, _)| p.extension().is_some_and(|e| e == "wal")).unwrap();
    bytes.extend_from_slice(&[200, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
    storage.put_file(&seg, bytes);
    let rec = Arc::new(Recording { inner: storage.clone(), log: Default::default() });
    let opts = mem_options(&storage, &clock, config()).storage(rec.clone());
    let l = Ledger::open_with(MEM_DIR, opts).unwrap();
    assert!(l.recovery_report().torn_tail.is_some());
    let log = rec.log.lock().unwrap().clone();
    let at = |what: &str| log.iter().position(|l| l == what).unwrap_or_else(|| panic!("{what} missing from {log:?}"));
    let q = Path::new(MEM_DIR).join("quarantine");
    let mkdir = at(&format!("mkdir {}", q.display()));
    let sync_parent = log.iter().enumerate().position(|(i, l)| i > mkdir && *l == format!("syncdir {MEM_DIR}"));
    let cut = at(&format!("truncate {}", seg.display()));
    let sync_q = log.iter().position(|l| *l == format!("syncdir {}", q.display())).unwrap();
    assert!(sync_q < cut, "the copy's directory entry is durable before the cut: {log:?}");
    let sync_parent = sync_parent.unwrap_or_else(|| panic!("quarantine/ itself is never made durable: {log:?}"));
    assert!(sync_parent < cut, "quarantine/ is durable before the cut: {log:?}");
}
