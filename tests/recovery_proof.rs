//! Torn is proven, not guessed (format version 3). Over logs of several flushes of several
//! records each, single and multi segment, whose last write was never fsynced:
//!
//! - every 512-byte sector zeroed, and every byte changed: recovery yields a prefix of what was
//!   written holding every acknowledged record when the damage lies in the last write (or in
//!   bytes no durable record owns), and refuses with `Damaged` otherwise: never a shorter
//!   history, and never a cut of a durable record;
//! - 10,000 seeded crash points on `FaultyStorage` (power loss at any storage operation, the
//!   unsynced sectors landing in any order): no acknowledged record is ever lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::{Fault, FaultPlan, FaultyStorage, OpKind};
use allocation_ledger::{Config, Error, Ledger, LoggedEvent, ManualClock, OpenOptions, ResourceRequest};
use common::{Lcg, MEM_DIR};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Files = BTreeMap<PathBuf, Vec<u8>>;

fn config(segment_size_bytes: u64) -> Config {
    // No periodic snapshots: every open reads the whole log.
    Config { snapshot_every: 0, segment_size_bytes, worker_slots: 64, ..Config::default() }
}

fn open(
    storage: &FaultyStorage,
    clock: &ManualClock,
    cfg: &Config,
    read_only: bool,
) -> allocation_ledger::Result<Ledger> {
    let opts = OpenOptions { read_only, create: !read_only, ..common::mem_options(storage, clock, cfg.clone()) };
    Ledger::open_with(MEM_DIR, opts)
}

fn storage_with(files: &Files) -> FaultyStorage {
    let s = FaultyStorage::new();
    for (path, bytes) in files {
        s.put_file(path, bytes.clone());
    }
    s
}

/// What a byte of a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The segment header, durable since the segment was created.
    Header,
    /// A record that was acknowledged (durable).
    Durable(u64),
    /// A record of the last write, which was never fsynced.
    LastWrite(u64),
    /// Zeros before the record `seq`, padding the write before it out to a sector.
    Padding(u64),
    /// Zeros after the last record of the last segment.
    Free,
    /// Zeros after the last record of a segment the log went on from: it was fsynced whole
    /// before the next one was started.
    Sealed,
}

/// A log of several writes, the last of them never fsynced, and what each byte holds.
struct Log {
    files: Files,
    cfg: Config,
    /// Every record written, the last write's included.
    written: Vec<LoggedEvent>,
    /// Records acknowledged (durable).
    acked: usize,
    owners: BTreeMap<PathBuf, Vec<Owner>>,
}

/// Grants (one record a write) and expiries of several allocations at once (several records a
/// write); the last write, expiries too, fails its fsync.
fn build_log(segment_size_bytes: u64) -> Log {
    let cfg = config(segment_size_bytes);
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, &cfg, false).unwrap();
    let grant = |job: String, ttl: u64| {
        let o = ledger.request_resources(&ResourceRequest::new(job).workers(1).ttl_seconds(ttl)).unwrap();
        assert!(o.is_granted());
    };
    for round in 0..4 {
        for i in 0..3 {
            grant(format!("short-{round}-{i}"), 60);
        }
        grant(format!("long-{round}"), 86_400);
        clock.advance_seconds(61);
        // One command, one write, three records.
        assert_eq!(ledger.cleanup_expired().unwrap().count, 3);
    }
    for i in 0..4 {
        grant(format!("last-{i}"), 60);
    }
    let acked = ledger.status().last_seq as usize;
    clock.advance_seconds(61);
    storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth: 0, fault: Fault::Fail, sticky: false }));
    assert!(matches!(ledger.cleanup_expired(), Err(Error::Poisoned(_))));
    drop(ledger);
    storage.set_plan(None);
    let files: Files =
        storage.files().into_iter().filter(|(p, _)| p.starts_with(Path::new(MEM_DIR).join("wal"))).collect();
    let written = common::all_events(&open(&storage_with(&files), &clock, &cfg, true).unwrap());
    // All four expiries, or (when the write crossed into a new segment, whose rotation's fsync
    // is the one that failed) those written before the rotation.
    assert!(written.len() > acked && written.len() <= acked + 4, "{} written, {acked} acknowledged", written.len());
    let last = files.keys().next_back().unwrap().clone();
    let owners = files.iter().map(|(p, b)| (p.clone(), owners_of(b, acked as u64, *p == last))).collect();
    Log { files, cfg, written, acked, owners }
}

fn owners_of(bytes: &[u8], acked: u64, last: bool) -> Vec<Owner> {
    let mut owners = vec![if last { Owner::Free } else { Owner::Sealed }; bytes.len()];
    owners[..64].fill(Owner::Header);
    let bounds = common::record_bounds(bytes);
    let mut prev_end = 64;
    for &(start, end, seq) in &bounds {
        owners[prev_end as usize..start as usize].fill(Owner::Padding(seq));
        let owner = if seq <= acked { Owner::Durable(seq) } else { Owner::LastWrite(seq) };
        owners[start as usize..end as usize].fill(owner);
        prev_end = end;
    }
    owners
}

/// Opens the damaged `files` read-write (and read-only too when `read_only_too`: a read-only
/// open reads damage in the last segment again after 1, 10 and 100 ms, in case a live writer's
/// write was caught in flight, so it runs on a sample) and checks the outcome against what the
/// damaged bytes held.
fn check(log: &Log, files: &Files, hit: &[Owner], read_only_too: bool, ctx: &str) {
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(7 * 86_400);
    // Damage to something durable: a header, an acknowledged record, or the zeros between two
    // durable writes (the record after them is durable, and a later one proves it).
    let durable_hit = hit.iter().any(|o| match o {
        Owner::Header | Owner::Durable(_) | Owner::Sealed => true,
        Owner::Padding(seq) => (*seq as usize) <= log.acked,
        _ => false,
    });
    let first_torn = hit
        .iter()
        .filter_map(|o| match o {
            Owner::LastWrite(seq) => Some(*seq as usize),
            _ => None,
        })
        .min();
    let modes: &[bool] = if read_only_too { &[true, false] } else { &[false] };
    for &read_only in modes {
        let storage = storage_with(files);
        let ctx = format!("{ctx} (read-only {read_only})");
        match open(&storage, &clock, &log.cfg, read_only) {
            Ok(l) => {
                let mut owners: Vec<Owner> = hit.to_vec();
                owners.dedup();
                assert!(
                    !durable_hit,
                    "{ctx}: opened, though durable bytes were damaged: {owners:?}, {} events",
                    common::all_events(&l).len()
                );
                let events = common::all_events(&l);
                assert!(events.len() >= log.acked, "{ctx}: {} events, {} acknowledged", events.len(), log.acked);
                assert_eq!(events, log.written[..events.len()], "{ctx}: not a prefix of what was written");
                if let Some(seq) = first_torn {
                    assert!(events.len() < seq, "{ctx}: record {seq} was damaged, yet read");
                }
                drop(l);
                if read_only {
                    assert_eq!(storage.files(), *files, "{ctx}: a read-only open changed the files");
                }
            }
            // Damaged, or (durable records zeroed at the end of a segment that is not the
            // last) a gap before the next segment: both refuse, exit 6.
            Err(e @ (Error::Damaged(_) | Error::Inconsistent { .. })) => {
                assert!(durable_hit, "{ctx}: refused damage in the last write only: {e}");
                assert_eq!(storage.files(), *files, "{ctx}: a refused open changed the files");
            }
            Err(e) => panic!("{ctx}: {e}"),
        }
    }
}

fn every_sector_and_every_byte(segment_size_bytes: u64) {
    let log = build_log(segment_size_bytes);
    let mut cases = 0;
    for (path, bytes) in &log.files {
        let owners = &log.owners[path];
        let end = common::records_end(bytes).next_multiple_of(512).min(bytes.len());
        for sector in (0..end).step_by(512) {
            let range = sector..(sector + 512).min(bytes.len());
            let mut files = log.files.clone();
            files.get_mut(path).unwrap()[range.clone()].fill(0);
            // Only bytes that change count as hit.
            let hit: Vec<Owner> = range.filter(|&i| bytes[i] != 0).map(|i| owners[i]).collect();
            check(&log, &files, &hit, true, &format!("{} sector at {sector}", path.display()));
            cases += 1;
        }
        let changed = (common::records_end(bytes) + 8).min(bytes.len());
        for (at, owner) in owners.iter().enumerate().take(changed) {
            let mut files = log.files.clone();
            files.get_mut(path).unwrap()[at] ^= 0x5a;
            check(&log, &files, &[*owner], at % 16 == 0, &format!("{} byte {at}", path.display()));
            cases += 1;
        }
    }
    assert!(cases > 1000, "{cases} cases");
}

#[test]
fn every_sector_zeroed_and_every_byte_changed_in_a_single_segment_log() {
    let log = build_log(1 << 20);
    assert_eq!(log.files.len(), 1);
    every_sector_and_every_byte(1 << 20);
}

#[test]
fn every_sector_zeroed_and_every_byte_changed_in_a_multi_segment_log() {
    let log = build_log(4096);
    assert!(log.files.len() >= 3, "{} segments", log.files.len());
    every_sector_and_every_byte(4096);
}

/// The layout the proof rests on: each write starts at a sector (but a segment's first), and
/// its records carry durable lags 1, 2, 3, ... counted from the last durable record.
#[test]
fn writes_start_at_sectors_and_carry_durable_lags() {
    let log = build_log(1 << 20);
    let bytes = log.files.values().next().unwrap();
    let lag = |start: u64| u32::from_le_bytes(bytes[start as usize..start as usize + 4].try_into().unwrap()) >> 21;
    let bounds = common::record_bounds(bytes);
    let mut multi = 0;
    for (i, &(start, _, seq)) in bounds.iter().enumerate() {
        let l = lag(start);
        assert!(l >= 1, "record {seq} has no lag");
        if l == 1 && i > 0 {
            assert_eq!(start % 512, 0, "record {seq} starts a write at {start}");
        } else if i > 0 {
            assert_eq!(start, bounds[i - 1].1, "record {seq} follows the one before in its write");
            assert_eq!(lag(bounds[i - 1].0) + 1, l, "record {seq}");
            multi += 1;
        }
    }
    assert!(multi >= 10, "{multi} records were not the first of their write");
}

// ---------------------------------------------------------------------------------------------
// Seeded crash points

/// Random operations; returns the highest sequence number an answered operation promised
/// durable.
fn drive(ledger: &Ledger, clock: &ManualClock, rng: &mut Lcg, steps: usize) -> u64 {
    let mut acked = 0;
    let mut known = Vec::new();
    for _ in 0..steps {
        let result: allocation_ledger::Result<()> = match rng.below(10) {
            0..=4 => {
                let req = ResourceRequest::new(format!("job-{}", rng.below(4)))
                    .workers(1 + rng.below(3) as u32)
                    .ttl_seconds(60 + rng.below(300));
                ledger.request_resources(&req).map(|o| known.push(o.allocation_id()))
            }
            5 | 6 if !known.is_empty() => {
                let id = known[rng.below(known.len() as u64) as usize];
                ledger.release_resources(&id.to_string()).map(drop)
            }
            7 => {
                clock.advance_seconds(rng.below(200) as i64);
                ledger.cleanup_expired().map(drop)
            }
            8 => ledger.snapshot().map(drop),
            _ => ledger.get_capacity().map(drop),
        };
        match result {
            Ok(()) | Err(Error::InvalidInput { .. } | Error::NotFound(_)) => acked = ledger.status().last_seq,
            Err(Error::Poisoned(_) | Error::Io { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    acked
}

#[test]
fn ten_thousand_seeded_crash_points_lose_no_acknowledged_record() {
    let cfg = Config { snapshot_every: 9, ..config(4096) };
    let steps = 45;
    let total_ops = {
        let storage = FaultyStorage::new();
        storage.set_plan(None);
        let clock = ManualClock::at_default_epoch();
        let ledger = open(&storage, &clock, &cfg, false).unwrap();
        drive(&ledger, &clock, &mut Lcg(11), steps);
        storage.ops()
    };
    let seeds = 10_000u64.div_ceil(total_ops);
    let mut points = 0u64;
    let mut torn_seen = 0;
    for nth in 0..total_ops {
        for s in 0..seeds {
            let seed = nth * 1_000 + s;
            let ctx = format!("power lost at storage operation {nth}, seed {seed}");
            let storage = FaultyStorage::new();
            let clock = ManualClock::at_default_epoch();
            // The machine stops at operation `nth`: it and everything after it never happen.
            storage.set_plan(Some(FaultPlan { kind: None, nth, fault: Fault::Fail, sticky: true }));
            let (written, acked) = match open(&storage, &clock, &cfg, false) {
                Ok(ledger) => {
                    let acked = drive(&ledger, &clock, &mut Lcg(11), steps);
                    (common::all_events(&ledger), acked)
                }
                Err(_) => (Vec::new(), 0),
            };
            storage.crash(seed);
            points += 1;
            let recovered = match open(&storage, &clock, &cfg, false) {
                Ok(l) => l,
                Err(e) => panic!("{ctx}: reopen: {e}"),
            };
            torn_seen += usize::from(recovered.recovery_report().torn_tail.is_some());
            let events = common::all_events(&recovered);
            assert!(events.len() as u64 >= acked, "{ctx}: {} events recovered, {acked} acknowledged", events.len());
            if !written.is_empty() {
                assert_eq!(events, written[..events.len()], "{ctx}: not a prefix of what was written");
            }
            assert_eq!(recovered.with_state(std::clone::Clone::clone), common::fold(&events), "{ctx}");
        }
    }
    assert!(points >= 10_000, "{points} crash points");
    assert!(torn_seen > 100, "only {torn_seen} crashes tore a write: the crash model is not exercised");
}
