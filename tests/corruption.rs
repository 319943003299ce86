//! Corruption of a ledger with several segments and snapshots (in memory, on `FaultyStorage`).
//!
//! Every byte of every segment (headers and records) and of every snapshot is damaged in turn
//! with a fixed pattern (XOR 0xFF), and a sample of bytes with single-bit flips. For each:
//!
//! - `verify` reports the damage, naming the file and (for the log) the offset of the damaged
//!   record (0 for a segment header);
//! - opening read-write and read-only either fails with `Damaged` naming that file and offset,
//!   or succeeds with exactly the history and state of the undamaged ledger, which happens
//!   only when the damage is in a snapshot (set aside, or never read because a newer one
//!   loads) or in a segment that the newest snapshot covers completely (open does not read
//!   it; reading the history from the start then fails with `Damaged` at that file and offset);
//! - nothing panics.
//!
//! Then the structural damage, each with its precise error: a damaged snapshot set aside
//! while the log rebuilds the state, a missing middle or first segment, a segment with a wrong
//! magic, version or first sequence number, a truncated segment that is not the last, and a
//! snapshot ahead of the log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{Error, Ledger, LoggedEvent, ManualClock, OpenOptions, Priority, ResourceRequest, State};
use common::{mem_options, small_config, MEM_DIR};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Files = BTreeMap<PathBuf, Vec<u8>>;

struct Base {
    files: Files,
    events: Vec<LoggedEvent>,
    state: State,
    segments: Vec<PathBuf>,
    snapshots: Vec<(u64, PathBuf)>,
    /// The first record of the last write.
    last_write_first: u64,
}

fn dir() -> &'static Path {
    Path::new(MEM_DIR)
}

/// A history of about 30 events over several 4 KiB segments, with a snapshot every 4 events
/// (the newest four kept).
fn build() -> Base {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = Ledger::open_with(dir(), mem_options(&storage, &clock, small_config(4))).unwrap();
    let mut held = Vec::new();
    for i in 0..14u32 {
        clock.advance_seconds(7);
        let mut meta = serde_json::Map::new();
        meta.insert("i".into(), i.into());
        meta.insert("pad".into(), "p".repeat(120).into());
        let req = ResourceRequest::new(format!("job-{i}"))
            .workers(1 + i % 3)
            .ttl_seconds(if i % 5 == 0 { 60 } else { 3600 })
            .priority([Priority::Low, Priority::Normal, Priority::High][i as usize % 3])
            .mcp_server(["github", "slack", "db"][i as usize % 3])
            .metadata(meta);
        let o = ledger.request_resources(&req).unwrap();
        held.push(o.allocation_id());
        if i % 2 == 1 {
            let _ = ledger.release_resources(&held[i as usize - 1].to_string()).unwrap();
        }
        if i == 9 {
            clock.advance_seconds(120);
            ledger.cleanup_expired().unwrap();
        }
    }
    let events = common::all_events(&ledger);
    let state = ledger.with_state(std::clone::Clone::clone);
    drop(ledger);
    let files = storage.files();
    let segments: Vec<PathBuf> = files.keys().filter(|p| p.extension().is_some_and(|e| e == "wal")).cloned().collect();
    let mut snapshots: Vec<(u64, PathBuf)> = files
        .keys()
        .filter_map(|p| {
            allocation_ledger::testing::snapshot::parse_file_name(p.file_name()?.to_str()?).map(|s| (s, p.clone()))
        })
        .collect();
    snapshots.sort();
    assert!(segments.len() >= 3, "{} segments", segments.len());
    assert!(snapshots.len() >= 3, "{} snapshots", snapshots.len());
    assert!(events.len() >= 20, "{} events", events.len());
    let last_write_first = common::last_write_first_seq(&files[segments.last().unwrap()]);
    Base { files, events, state, segments, snapshots, last_write_first }
}

fn storage_with(files: &Files) -> FaultyStorage {
    use allocation_ledger::storage::Storage;
    let s = FaultyStorage::new();
    for (p, b) in files {
        s.create_dir_all(p.parent().unwrap()).unwrap();
        s.put_file(p, b.clone());
    }
    s
}

fn open(storage: &FaultyStorage, read_only: bool) -> allocation_ledger::Result<Ledger> {
    let opts = OpenOptions {
        read_only,
        create: !read_only,
        ..mem_options(storage, &ManualClock::at_default_epoch(), small_config(4))
    };
    Ledger::open_with(dir(), opts)
}

/// Offset of the record (or header: 0) that byte `at` of a segment belongs to. Damage in the
/// zeros that pad a write out to its sector is reported where the next record was expected,
/// right after the one before.
fn owner(bounds: &[(u64, u64, u64)], at: u64) -> u64 {
    if at < 64 {
        return 0;
    }
    match bounds.iter().find(|b| b.0 <= at && at < b.1) {
        Some(b) => b.0,
        None => bounds.iter().filter(|b| b.1 <= at).map(|b| b.1).max().unwrap_or(64),
    }
}

/// The sequence number of the record that byte `at` belongs to, or of the record after the
/// padding it is in.
fn seq_at(bounds: &[(u64, u64, u64)], at: u64) -> u64 {
    match bounds.iter().find(|b| b.0 <= at && at < b.1) {
        Some(b) => b.2,
        None => bounds.iter().find(|b| b.0 > at).map_or(u64::MAX, |b| b.2),
    }
}

fn first_seq_of(path: &Path) -> u64 {
    allocation_ledger::testing::segment::parse_file_name(path.file_name().unwrap().to_str().unwrap()).unwrap()
}

/// Checks one damaged copy of a segment: `at` was changed in `seg`.
fn check_segment_damage(base: &Base, seg: &Path, bounds: &[(u64, u64, u64)], at: usize, damaged: Vec<u8>, ctx: &str) {
    // Read-only opens scan the same way; they run on every fourth case to keep the test short.
    let modes: &[bool] = if at.is_multiple_of(4) { &[true, false] } else { &[false] };
    let offset = owner(bounds, at as u64);
    let mut files = base.files.clone();
    files.insert(seg.to_path_buf(), damaged);
    let storage = storage_with(&files);
    // Damage in the last write (or the zeros padding the write before it), which nothing later
    // proves durable (no later record, and no snapshot past it): a torn tail, cut there.
    let newest = base.snapshots.last().unwrap().0;
    let last_seg = seg == base.segments.last().unwrap().as_path();
    let torn_seq = seq_at(bounds, at as u64);
    if last_seg && at >= 64 && torn_seq >= base.last_write_first && torn_seq > newest {
        return check_torn(base, &storage, seg, offset, torn_seq, modes, at, ctx);
    }
    // verify replays everything and loads every snapshot: every other byte, every record.
    if at % 4 < 2 {
        let report = allocation_ledger::verify(&storage, dir(), &mut |_, _| {}).unwrap();
        assert!(!report.ok, "{ctx}: verify missed it");
        let needle = format!("{} at offset {offset} ", seg.display());
        assert!(report.problems.iter().any(|p| p.contains(&needle)), "{ctx}: {:?}", report.problems);
    }
    // The newest snapshot covers the segments that end at or before it: open does not read them.
    let newest = base.snapshots.last().unwrap().0;
    let next_first = base.segments.iter().map(|p| first_seq_of(p)).find(|&f| f > first_seq_of(seg));
    // In the segment holding the snapshot's last event, open resumes right after that event
    // (at the position the snapshot recorded, once the record there checks out), so the
    // records before it are covered too; the segment header is still read.
    let owner_seq = bounds.iter().find(|b| b.0 <= at as u64 && (at as u64) < b.1).map(|b| b.2);
    let wholly_covered = next_first.is_some_and(|n| n <= newest + 1);
    // Zeros padding the write of the snapshot's last event (or an earlier one) lie before where
    // open resumes, too.
    let read_from_here = match owner_seq {
        Some(s) => s >= newest,
        None => at < 64 || seq_at(bounds, at as u64) > newest,
    };
    let covered = wholly_covered || (first_seq_of(seg) <= newest && !read_from_here);
    // Except the first segment's header and first record: every open reads the ledger's
    // identity there, to check the snapshot against it.
    let first_record_end = bounds[0].1;
    let covered = covered && !(first_seq_of(seg) == 1 && (at as u64) < first_record_end);

    for &read_only in modes {
        let ctx = format!("{ctx}, read_only {read_only}");
        match open(&storage, read_only) {
            Err(Error::Damaged(d)) => {
                assert_eq!((d.file.as_path(), d.offset), (seg, offset), "{ctx}: {d}");
                assert!(!covered, "{ctx}: a covered segment was read");
            }
            Err(e) => panic!("{ctx}: {e}"),
            Ok(l) => {
                assert!(covered, "{ctx}: damage in a segment that open reads went unnoticed");
                assert_eq!(l.with_state(std::clone::Clone::clone), base.state, "{ctx}: a different state");
                match l.events(1, usize::MAX) {
                    Err(Error::Damaged(d)) => assert_eq!((d.file.as_path(), d.offset), (seg, offset), "{ctx}: {d}"),
                    other => panic!("{ctx}: reading the history: {other:?}"),
                }
                // The tail after the snapshot reads the same as before (reading the log finds
                // a record by scanning its segment from the start, so it meets damage there).
                match l.events(newest + 1, usize::MAX) {
                    Ok(tail) if wholly_covered => assert_eq!(tail, base.events[newest as usize..], "{ctx}"),
                    Err(Error::Damaged(d)) if !wholly_covered => assert_eq!(d.offset, offset, "{ctx}: {d}"),
                    other => panic!("{ctx}: reading the tail: {other:?}"),
                }
            }
        }
    }
}

/// Damage in the last write: read-only and read-write opens read the records before it, the
/// read-write one cuts it (bytes kept in quarantine), and verify calls it a torn tail.
#[allow(clippy::too_many_arguments)]
fn check_torn(
    base: &Base,
    storage: &FaultyStorage,
    seg: &Path,
    offset: u64,
    seq: u64,
    modes: &[bool],
    at: usize,
    ctx: &str,
) {
    if at % 4 < 2 {
        let report = allocation_ledger::verify(storage, dir(), &mut |_, _| {}).unwrap();
        assert!(report.ok, "{ctx}: {:?}", report.problems);
        assert!(report.torn_tail.is_some(), "{ctx}: verify saw no torn tail");
    }
    for &read_only in modes {
        let ctx = format!("{ctx}, read_only {read_only}");
        let l = open(storage, read_only).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let t = l.recovery_report().torn_tail.clone().unwrap_or_else(|| panic!("{ctx}: not torn"));
        assert_eq!((t.file.as_path(), t.offset), (seg, offset), "{ctx}");
        assert_eq!(t.saved_to.is_some(), !read_only, "{ctx}");
        let events = common::all_events(&l);
        assert_eq!(events, base.events[..seq as usize - 1], "{ctx}");
    }
}

fn check_snapshot_damage(base: &Base, seq: u64, snap: &Path, at: usize, damaged: Vec<u8>, ctx: &str) {
    let mut files = base.files.clone();
    files.insert(snap.to_path_buf(), damaged);
    let storage = storage_with(&files);
    // verify (a full replay) and read-only opens on every fourth case, to keep the test short.
    let modes: &[bool] = if at.is_multiple_of(4) { &[true, false] } else { &[false] };
    if at.is_multiple_of(4) {
        let report = allocation_ledger::verify(&storage, dir(), &mut |_, _| {}).unwrap();
        assert!(!report.ok, "{ctx}: verify missed it");
        let name = snap.display().to_string();
        assert!(
            report.problems.iter().any(|p| p.contains(&name) && p.contains("damaged")),
            "{ctx}: {:?}",
            report.problems
        );
    }
    let newest = base.snapshots.last().unwrap().0 == seq;
    for &read_only in modes {
        let ctx = format!("{ctx}, read_only {read_only}");
        let l = open(&storage, read_only).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(l.with_state(std::clone::Clone::clone), base.state, "{ctx}: a different state");
        let r = l.recovery_report();
        if newest {
            assert_eq!(r.snapshots_set_aside.len(), 1, "{ctx}");
            assert_eq!(r.snapshots_set_aside[0].file, snap, "{ctx}");
            assert!(r.snapshot_seq.is_some_and(|s| s < seq), "{ctx}: {:?}", r.snapshot_seq);
            if !read_only {
                let moved = r.snapshots_set_aside[0].moved_to.clone().expect("moved aside");
                assert!(moved.starts_with(dir().join("quarantine")), "{ctx}");
                assert!(!storage.files().contains_key(snap), "{ctx}: still in place");
            }
        } else {
            assert!(r.snapshots_set_aside.is_empty(), "{ctx}");
        }
        assert_eq!(common::all_events(&l), base.events, "{ctx}");
    }
}

#[test]
fn every_damaged_byte_is_detected_and_never_a_different_history() {
    let base = build();
    let mut cases = 0usize;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2usize)
            .map(|part| {
                let base = &base;
                s.spawn(move || {
                    let mut n = 0;
                    for seg in &base.segments {
                        let bytes = &base.files[seg];
                        let bounds = common::record_bounds(bytes);
                        // The records (damage in the pre-filled zeros after them is a torn
                        // write, tested in crash.rs).
                        for at in (part..common::records_end(bytes)).step_by(2) {
                            let mut d = bytes.clone();
                            d[at] ^= 0xFF;
                            let ctx = format!("{} byte {at} ^ 0xff", seg.display());
                            check_segment_damage(base, seg, &bounds, at, d, &ctx);
                            n += 1;
                            if at.is_multiple_of(16) {
                                let mut d = bytes.clone();
                                d[at] ^= 1 << (at / 16 % 8);
                                let ctx = format!("{} byte {at} bit {}", seg.display(), at / 16 % 8);
                                check_segment_damage(base, seg, &bounds, at, d, &ctx);
                            }
                        }
                    }
                    let newest = base.snapshots.last().unwrap().0;
                    for (seq, snap) in &base.snapshots {
                        let bytes = &base.files[snap];
                        // Every byte of the snapshot that open loads; every fourth of the older
                        // ones, which only verify (and a fallback) read.
                        let step = if *seq == newest { 2 } else { 8 };
                        for at in (part * step / 2..bytes.len()).step_by(step) {
                            let mut d = bytes.clone();
                            d[at] ^= 0xFF;
                            check_snapshot_damage(base, *seq, snap, at, d, &format!("{} byte {at}", snap.display()));
                            n += 1;
                            if at.is_multiple_of(16) {
                                let mut d = bytes.clone();
                                d[at] ^= 1 << (at / 16 % 8);
                                let ctx = format!("{} byte {at} bit {}", snap.display(), at / 16 % 8);
                                check_snapshot_damage(base, *seq, snap, at, d, &ctx);
                            }
                        }
                    }
                    n
                })
            })
            .collect();
        cases = handles.into_iter().map(|h| h.join().unwrap()).sum();
    });
    let newest = base.snapshots.last().unwrap();
    let total: usize =
        base.segments.iter().map(|p| common::records_end(&base.files[p])).sum::<usize>() + base.files[&newest.1].len();
    assert!(cases >= total, "{cases} cases, {total} bytes");
}

// ---------------------------------------------------------------------------------------------
// Structural damage, with the precise error each gives.

fn without(base: &Base, path: &Path) -> Files {
    let mut f = base.files.clone();
    f.remove(path);
    f
}

fn without_snapshots(files: &Files) -> Files {
    files
        .iter()
        .filter(|(p, _)| !p.to_string_lossy().contains("snapshots"))
        .map(|(p, b)| (p.clone(), b.clone()))
        .collect()
}

fn open_err(files: &Files) -> Error {
    let storage = storage_with(files);
    match open(&storage, false) {
        Ok(l) => panic!("opened with {} events", l.with_state(|s| s.last_seq)),
        Err(e) => {
            // A read-only open refuses the same way, and verify reports it.
            let ro = open(&storage, true).expect_err("read-only open refuses too");
            assert_eq!(ro.to_string(), e.to_string());
            let report = allocation_ledger::verify(&storage, dir(), &mut |_, _| {}).unwrap();
            assert!(!report.ok);
            e
        }
    }
}

#[test]
fn a_damaged_snapshot_is_set_aside_and_the_log_rebuilds_the_state() {
    let base = build();
    let mut files = base.files.clone();
    // Every snapshot damaged: the whole log is replayed.
    for (_, snap) in &base.snapshots {
        let b = files.get_mut(snap).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x20;
    }
    let storage = storage_with(&files);
    let l = open(&storage, false).unwrap();
    let r = l.recovery_report().clone();
    assert_eq!(r.snapshot_seq, None);
    assert_eq!(r.snapshots_set_aside.len(), base.snapshots.len());
    for s in &r.snapshots_set_aside {
        assert!(s.reason.contains("checksum"), "{}", s.reason);
        let moved = s.moved_to.as_ref().unwrap();
        assert_eq!(
            moved.file_name().unwrap().to_str().unwrap(),
            format!("{}.damaged", s.file.file_name().unwrap().to_str().unwrap())
        );
        assert_eq!(storage.files()[moved], files[&s.file], "the damaged bytes are kept as they were");
    }
    assert_eq!(r.events_replayed, base.events.len() as u64);
    assert_eq!(l.with_state(std::clone::Clone::clone), base.state);
    // And the next snapshot is written fresh.
    let info = l.snapshot().unwrap();
    assert_eq!(info.seq, base.events.len() as u64);
    drop(l);
    let again = open(&storage, false).unwrap();
    assert_eq!(again.recovery_report().snapshot_seq, Some(info.seq));
    assert!(again.recovery_report().snapshots_set_aside.is_empty());
}

#[test]
fn a_missing_middle_segment_is_a_gap_naming_the_segment_after_it() {
    let base = build();
    let files = without_snapshots(&without(&base, &base.segments[1]));
    match open_err(&files) {
        Error::Inconsistent { path, message } => {
            assert_eq!(path, base.segments[2]);
            assert!(message.contains("gap") && message.contains("missing"), "{message}");
            assert!(message.contains(&format!("sequence number {}", first_seq_of(&base.segments[1]))), "{message}");
        }
        e => panic!("{e}"),
    }
    // With the snapshots in place, open starts past the gap; verify and reading the history
    // from the start still report it.
    let storage = storage_with(&without(&base, &base.segments[1]));
    let report = allocation_ledger::verify(&storage, dir(), &mut |_, _| {}).unwrap();
    assert!(report.problems.iter().any(|p| p.contains("a segment is missing")), "{:?}", report.problems);
    if let Ok(l) = open(&storage, false) {
        assert_eq!(l.with_state(std::clone::Clone::clone), base.state);
        assert!(matches!(l.events(1, usize::MAX), Err(Error::Inconsistent { .. })));
    }
}

#[test]
fn a_missing_first_segment_is_reported() {
    let base = build();
    let files = without_snapshots(&without(&base, &base.segments[0]));
    match open_err(&files) {
        Error::Inconsistent { path, message } => {
            assert_eq!(path, base.segments[1]);
            assert!(message.contains("not 1"), "{message}");
        }
        e => panic!("{e}"),
    }
}

fn with_header(base: &Base, seg: &Path, edit: impl Fn(&mut [u8]), fix_crc: bool) -> Files {
    let mut files = without_snapshots(&base.files);
    let b = files.get_mut(seg).unwrap();
    edit(&mut b[..32]);
    if fix_crc {
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    }
    files
}

#[test]
fn a_segment_header_with_a_wrong_magic_version_or_first_seq_is_damage_at_offset_0() {
    let base = build();
    let seg = &base.segments[1];
    type HeaderEdit = Box<dyn Fn(&mut [u8])>;
    let cases: [(&str, HeaderEdit, bool, &str); 6] = [
        ("magic", Box::new(|h: &mut [u8]| h[0..8].copy_from_slice(b"NOTAWAL!")), false, "bad magic"),
        ("magic, checksum fixed", Box::new(|h: &mut [u8]| h[0] = b'X'), true, "bad magic"),
        ("version", Box::new(|h: &mut [u8]| h[8..12].copy_from_slice(&5u32.to_le_bytes())), false, "checksum"),
        (
            "version, checksum fixed",
            Box::new(|h: &mut [u8]| h[8..12].copy_from_slice(&5u32.to_le_bytes())),
            true,
            "segment format version 5 is not supported (this build reads versions 1 to 4)",
        ),
        ("flags, checksum fixed", Box::new(|h: &mut [u8]| h[12] = 1), true, "segment header flags are 0x1, expected 0"),
        (
            "first_seq, checksum fixed",
            Box::new(|h: &mut [u8]| h[16..24].copy_from_slice(&999u64.to_le_bytes())),
            true,
            "header says the segment starts at sequence number 999",
        ),
    ];
    for (what, edit, fix_crc, expect) in cases {
        match open_err(&with_header(&base, seg, edit, fix_crc)) {
            Error::Damaged(d) => {
                assert_eq!((d.file.as_path(), d.offset, d.seq), (seg.as_path(), 0, first_seq_of(seg)), "{what}");
                assert!(d.reason.contains(expect), "{what}: {}", d.reason);
            }
            e => panic!("{what}: {e}"),
        }
    }
    // The same in the last segment: a whole header that is wrong is damage, not a torn tail.
    let last = base.segments.last().unwrap();
    match open_err(&with_header(&base, last, |h| h[8] = 7, true)) {
        Error::Damaged(d) => assert_eq!((d.file.as_path(), d.offset), (last.as_path(), 0)),
        e => panic!("{e}"),
    }
}

#[test]
fn a_truncated_segment_that_is_not_the_last_is_damage_where_it_ends() {
    let base = build();
    let seg = &base.segments[0];
    let bytes = &base.files[seg];
    let bounds = common::record_bounds(bytes);
    // Cut inside the third record: an incomplete record, in a segment that is not the last.
    let (start, end, seq) = bounds[2];
    let mut files = without_snapshots(&base.files);
    files.insert(seg.clone(), bytes[..(start as usize + end as usize) / 2].to_vec());
    match open_err(&files) {
        Error::Damaged(d) => {
            assert_eq!((d.file.as_path(), d.offset, d.seq), (seg.as_path(), start, seq));
            assert!(d.reason.contains("incomplete record in a segment that is not the last"), "{}", d.reason);
        }
        e => panic!("{e}"),
    }
    // Cut at a record boundary: the segment reads clean, and the next one does not follow on.
    files.insert(seg.clone(), bytes[..start as usize].to_vec());
    match open_err(&files) {
        Error::Inconsistent { path, message } => {
            assert_eq!(path, base.segments[1]);
            assert!(message.contains(&format!("ends before sequence number {seq}")), "{message}");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn a_snapshot_ahead_of_the_log_is_reported() {
    let base = build();
    // The log lost its last segment (say, restored from an old backup) but the snapshots were
    // not: the newest snapshot is ahead of the log.
    let newest = base.snapshots.last().unwrap().0;
    // Every segment from the one holding the newest snapshot's last event on.
    let from = base.segments.iter().rposition(|p| first_seq_of(p) <= newest).unwrap();
    assert!(from > 0, "the newest snapshot should be past the first segment");
    let mut files = base.files.clone();
    for seg in &base.segments[from..] {
        files.remove(seg);
    }
    match open_err(&files) {
        Error::Inconsistent { message, .. } => {
            assert!(message.contains("records are missing from the log"), "{message}");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn a_snapshot_from_another_history_is_caught_by_verify() {
    let base = build();
    // A well-formed snapshot whose state differs from the fold of the log at its sequence
    // number (a checksum cannot catch this): verify compares each snapshot with the replay.
    let (seq, snap) = base.snapshots[0].clone();
    let mut state = allocation_ledger::testing::snapshot::decode(&base.files[&snap], seq).unwrap().to_data();
    state.assigned_mcp_count += 1;
    let mut files = base.files.clone();
    files.insert(snap.clone(), allocation_ledger::testing::snapshot::encode(&state));
    let storage = storage_with(&files);
    let report = allocation_ledger::verify(&storage, dir(), &mut |_, _| {}).unwrap();
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&snap.display().to_string()) && p.contains("differs from the replayed log")),
        "{:?}",
        report.problems
    );
}

#[test]
fn damage_is_reported_by_the_binary_with_file_and_offset() {
    // The same on real files through the CLI: verify exits 6 and names file and offset.
    let tmp = tempfile::tempdir().unwrap();
    let base = build();
    for (p, b) in &base.files {
        let rel = p.strip_prefix(dir()).unwrap();
        std::fs::create_dir_all(tmp.path().join(rel).parent().unwrap()).unwrap();
        std::fs::write(tmp.path().join(rel), b).unwrap();
    }
    let seg = tmp.path().join(base.segments[1].strip_prefix(dir()).unwrap());
    let mut b = std::fs::read(&seg).unwrap();
    let (start, _, _) = common::record_bounds(&b)[1];
    b[start as usize + 20] ^= 0xFF;
    std::fs::write(&seg, b).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--json", "verify"])
        .env_remove("ALLOCATION_LEDGER_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = v["problems"].to_string();
    assert!(problems.contains(&format!("{} at offset {start}", seg.display())), "{problems}");
}
