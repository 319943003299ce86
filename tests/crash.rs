//! Crash recovery: every possible torn end of the log on real files, every single-bit flip in
//! every segment, and power loss (with and without storage faults) on `FaultyStorage`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::{
    AppendFile, Fault, FaultPlan, FaultyStorage, FileBytes, FsStorage, LockGuard, OpKind, Storage,
};
use allocation_ledger::{
    AllocationId, Config, Error, Ledger, LoggedEvent, ManualClock, OpenOptions, Priority, RequestOutcome,
    ResourceRequest,
};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn crash_config() -> Config {
    // No periodic snapshots: every open reads the whole log, so damage anywhere is seen.
    common::small_config(0)
}

fn grant(ledger: &Ledger, req: ResourceRequest) -> AllocationId {
    match ledger.request_resources(&req).unwrap() {
        RequestOutcome::Granted(g) => g.allocation_id,
        other => panic!("{req:?} was not granted: {other:?}"),
    }
}

/// Writes a small history to `dir`: grants, a rejection, releases and expiries over several
/// segments. Returns every event of it.
fn build_history(dir: &Path) -> Vec<LoggedEvent> {
    let clock = ManualClock::at_default_epoch();
    let ledger = Ledger::open_with(dir, common::opts(crash_config(), &clock)).unwrap();
    let mut meta = serde_json::Map::new();
    meta.insert("ticket".into(), "OPS-1".into());
    let a = grant(&ledger, ResourceRequest::new("job-a").workers(3).mcp_server("github").metadata(meta));
    clock.advance_seconds(5);
    let _b = grant(
        &ledger,
        ResourceRequest::new("job-b").workers(2).ttl_seconds(60).mcp_server("github").mcp_server("slack"),
    );
    let c = grant(&ledger, ResourceRequest::new("job-c").workers(4));
    match ledger.request_resources(&ResourceRequest::new("job-d").workers(5)).unwrap() {
        RequestOutcome::Failed(f) => {
            assert_eq!(f.error, "Insufficient workers: requested 5, available 1");
        }
        other => panic!("{other:?}"),
    }
    ledger.release_resources(&a.to_string()).unwrap();
    clock.advance_seconds(61);
    assert_eq!(ledger.cleanup_expired().unwrap().count, 1);
    let mut held = Vec::new();
    for i in 0..6 {
        clock.advance_seconds(1);
        held.push(grant(
            &ledger,
            ResourceRequest::new(format!("job-e{i}"))
                .workers(1)
                .ttl_seconds(600)
                .priority(Priority::High)
                .mcp_server("db"),
        ));
        if i % 2 == 1 {
            ledger.release_resources(&held[i - 1].to_string()).unwrap();
        }
    }
    ledger.release_resources(&c.to_string()).unwrap();
    let events = common::all_events(&ledger);
    drop(ledger);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.body.type_name()).collect();
    for k in ["ledger_created", "granted", "rejected", "released", "expired"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert!(events.len() >= 15, "{} events", events.len());
    events
}

struct Log {
    events: Vec<LoggedEvent>,
    segments: Vec<(PathBuf, Vec<u8>)>,
    /// For each segment: (start, end, seq) of each record.
    bounds: Vec<Vec<(u64, u64, u64)>>,
}

fn load_log(dir: &Path) -> Log {
    let events = build_history(dir);
    let segments: Vec<(PathBuf, Vec<u8>)> = common::segment_files(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    assert!(segments.len() >= 2, "the history should span segments");
    let bounds: Vec<_> = segments.iter().map(|(_, b)| common::record_bounds(b)).collect();
    let seqs: Vec<u64> = bounds.iter().flatten().map(|b| b.2).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    Log { events, segments, bounds }
}

/// The real file system without fsync: every read, write, truncation, rename and removal
/// happens on real files exactly as with `FsStorage`, only the (slow) flushes to the disk are
/// skipped. Used where a test opens thousands of copies and durability is not the question.
#[derive(Debug)]
struct NoSyncFs(FsStorage);

#[derive(Debug)]
struct NoSyncFile(Box<dyn AppendFile>);

impl AppendFile for NoSyncFile {
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        self.0.append(buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.0.truncate(len)
    }
}

impl Storage for NoSyncFs {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.0.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.0.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.0.exists(path)
    }
    fn open_append(&self, path: &Path, create_new: bool) -> std::io::Result<Box<dyn AppendFile>> {
        Ok(Box::new(NoSyncFile(self.0.open_append(path, create_new)?)))
    }
    fn read(&self, path: &Path) -> std::io::Result<FileBytes> {
        self.0.read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.0.read_range(path, offset, len)
    }
    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        self.0.file_len(path)
    }
    fn set_len(&self, path: &Path, len: u64) -> std::io::Result<()> {
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(len)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.0.rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.0.remove(path)
    }
    fn sync_dir(&self, _dir: &Path) -> std::io::Result<()> {
        Ok(())
    }
    fn try_lock(&self, path: &Path) -> std::io::Result<Option<Box<dyn LockGuard>>> {
        self.0.try_lock(path)
    }
}

fn file_opts(clock: &ManualClock, fsync: bool) -> OpenOptions {
    let opts = OpenOptions::default().clock(Arc::new(clock.clone()));
    if fsync {
        opts
    } else {
        opts.storage(Arc::new(NoSyncFs(FsStorage::default())))
    }
}

/// How a crash tears the last write of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tear {
    /// The file ends at the cut: a write that grew the file landed in part.
    Truncated,
    /// The bytes after the cut are still the zeros the segment was pre-filled with: a write
    /// over them landed in part.
    InPlace,
}

/// Opens a copy of the log torn at byte `cut` of segment `seg` (later segments gone) and
/// checks what recovery makes of it.
fn check_cut(log: &Log, work: &Path, seg: usize, cut: usize, tear: Tear, clock: &ManualClock, fsync: bool) {
    let wal = work.join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    for (path, bytes) in &log.segments[..seg] {
        std::fs::write(wal.join(path.file_name().unwrap()), bytes).unwrap();
    }
    let (orig_path, bytes) = &log.segments[seg];
    let seg_path = wal.join(orig_path.file_name().unwrap());
    // Zeroing a header from a byte on which it already ends in zeros changes nothing in it
    // (the chain start is a hash: its last byte is 0 in one segment of 256): the header is
    // whole, and the tear is the one at its end.
    let cut = match tear {
        Tear::InPlace if cut < 64 && bytes[cut..64].iter().all(|&b| b == 0) => 64,
        _ => cut,
    };
    let torn_bytes = match tear {
        Tear::Truncated => bytes[..cut].to_vec(),
        Tear::InPlace => {
            let mut b = bytes.clone();
            b[cut..].iter_mut().for_each(|x| *x = 0);
            b
        }
    };
    std::fs::write(&seg_path, &torn_bytes).unwrap();

    let whole_before: usize = log.bounds[..seg].iter().map(Vec::len).sum();
    let whole_here = log.bounds[seg].iter().filter(|b| b.1 as usize <= cut).count();
    let expected = whole_before + whole_here;
    // Where the valid part of the cut segment ends, and whether a torn tail is left.
    let boundary = if cut < 64 {
        0
    } else {
        log.bounds[seg].iter().map(|b| b.1 as usize).filter(|&e| e <= cut).max().unwrap_or(64)
    };
    // What of the torn record landed: up to the cut, less the zeros it ends in (a pre-filled
    // segment's zeros after the records are free space, not part of a torn write).
    let landed = if cut < 64 { cut } else { common::records_end(&bytes[..cut]).max(boundary) };
    let torn = cut < 64 || landed != boundary;
    // Where the torn record starts: a write starts at a sector, after zeros that pad the one
    // before, and the cut is made there.
    let torn_at = if cut < 64 {
        0
    } else {
        log.bounds[seg].iter().map(|b| b.0 as usize).find(|&start| start >= boundary).unwrap_or(boundary)
    };

    let ctx = format!("segment {seg} torn at {cut} ({tear:?}, fsync {fsync})");
    if expected == 0 {
        // Not even the ledger_created record is whole. A new ledger's log directory gets its
        // name only once that record is durable, so this is damage: refused, nothing changed.
        match Ledger::open_with(work, file_opts(clock, fsync)) {
            Err(Error::Damaged(d)) => assert_eq!((d.seq, d.file.clone()), (1, seg_path.clone()), "{ctx}: {d}"),
            Err(e) => panic!("{ctx}: {e}"),
            Ok(_) => panic!("{ctx}: opened a log without its first record"),
        }
        assert_eq!(std::fs::read(&seg_path).unwrap(), torn_bytes, "{ctx}: nothing was cut");
        assert!(!work.join("quarantine").exists(), "{ctx}");
        return;
    }
    let ledger = Ledger::open_with(work, file_opts(clock, fsync)).unwrap_or_else(|e| panic!("{ctx}: open failed: {e}"));
    let report = ledger.recovery_report().clone();
    match (&report.torn_tail, torn) {
        (None, false) => {}
        (Some(t), true) => {
            assert_eq!(t.file, seg_path, "{ctx}");
            assert_eq!(t.offset, torn_at as u64, "{ctx}");
            let saved = t.saved_to.as_ref().unwrap_or_else(|| panic!("{ctx}: not saved"));
            assert!(saved.starts_with(work.join("quarantine")), "{ctx}: {saved:?}");
            let kept = std::fs::read(saved).unwrap();
            assert_eq!(t.len, kept.len() as u64, "{ctx}");
            if cut < 64 {
                // A torn header: the whole file is set aside.
                assert_eq!(kept, torn_bytes, "{ctx}: the cut bytes are kept");
            } else {
                assert_eq!(kept, &bytes[torn_at..landed], "{ctx}: the cut bytes are kept");
            }
        }
        (t, _) => panic!("{ctx}: torn tail {t:?}, expected one: {torn}"),
    }
    // The cut is on disk: the segment ends at the boundary (a segment whose header was torn
    // is gone).
    if cut >= 64 {
        let len = std::fs::metadata(&seg_path).unwrap().len();
        if torn {
            assert_eq!(len, torn_at as u64, "{ctx}");
        } else {
            assert_eq!(len, torn_bytes.len() as u64, "{ctx}: a clean end is left alone");
        }
    } else if seg > 0 {
        assert!(!seg_path.exists(), "{ctx}: the torn segment is removed");
    }

    let events = common::all_events(&ledger);
    assert!(!report.created, "{ctx}");
    assert_eq!(report.last_seq, expected as u64, "{ctx}");
    assert_eq!(events, log.events[..expected], "{ctx}");
    let state = ledger.with_state(std::clone::Clone::clone);
    assert_eq!(state, common::fold(&events), "{ctx}");

    // The recovered ledger takes writes, and they survive a reopen.
    if cut.is_multiple_of(5) || cut < 40 {
        ledger.cleanup_expired().unwrap();
        ledger.request_resources(&ResourceRequest::new("after-recovery").mcp_server("github")).unwrap();
        let events = common::all_events(&ledger);
        let state = ledger.with_state(std::clone::Clone::clone);
        drop(ledger);
        let again = Ledger::open_with(work, file_opts(clock, fsync))
            .unwrap_or_else(|e| panic!("{ctx}: reopen after recovery failed: {e}"));
        assert_eq!(again.recovery_report().torn_tail, None, "{ctx}");
        assert_eq!(common::all_events(&again), events, "{ctx}");
        assert_eq!(again.with_state(std::clone::Clone::clone), state, "{ctx}");
    }
}

/// Checks `cuts` on two threads, each cut in a fresh copy of the log.
fn check_cuts(log: &Log, base: &Path, cuts: &[(usize, usize, Tear)], fsync: bool) {
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(3_600);
    std::thread::scope(|s| {
        for part in 0..2 {
            let clock = &clock;
            s.spawn(move || {
                for (n, &(seg, cut, tear)) in cuts.iter().enumerate().filter(|(n, _)| n % 2 == part) {
                    let work = base.join(format!("cut-{fsync}-{n}"));
                    check_cut(log, &work, seg, cut, tear, clock, fsync);
                    std::fs::remove_dir_all(&work).unwrap();
                }
            });
        }
    });
}

#[test]
fn every_cut_of_the_log_recovers_exactly_the_whole_records_before_it() {
    // About ten thousand copies of a small directory: on tmpfs where there is one (fsync is
    // free there), else on the default temporary directory without the fsyncs.
    let shm = Path::new("/dev/shm");
    let (base, fsync) =
        if shm.is_dir() { (tempfile::tempdir_in(shm).unwrap(), true) } else { (tempfile::tempdir().unwrap(), false) };
    let log = load_log(&base.path().join("ledger"));
    // Every offset of every segment's records, torn both ways: a tear in segment i (with the
    // segments after it gone) is a prefix of the log; the last segment's offsets are the torn
    // writes a crash can leave. In the pre-filled zeros, a few offsets (nothing to tear there).
    let mut cuts: Vec<(usize, usize, Tear)> = Vec::new();
    for (seg, (_, bytes)) in log.segments.iter().enumerate() {
        let end = common::records_end(bytes);
        let offsets = (0..=end).chain((end + 1..=bytes.len()).step_by(97)).chain([bytes.len()]);
        cuts.extend(offsets.flat_map(|cut| [(seg, cut, Tear::Truncated), (seg, cut, Tear::InPlace)]));
    }
    check_cuts(&log, base.path(), &cuts, fsync);
}

#[test]
fn cuts_at_record_edges_recover_with_real_fsyncs() {
    let base = tempfile::tempdir().unwrap();
    let log = load_log(&base.path().join("ledger"));
    // The same checks through the real `FsStorage` (with its fsyncs), at the interesting
    // offsets: inside the segment header, and on and either side of every record boundary.
    let mut cuts: Vec<(usize, usize, Tear)> = Vec::new();
    for (seg, (_, bytes)) in log.segments.iter().enumerate() {
        let mut at: Vec<usize> = vec![0, 1, 31];
        for &(_, end, _) in &log.bounds[seg] {
            at.extend([end as usize - 1, end as usize, end as usize + 1]);
        }
        at.push(64);
        at.push(33);
        at.sort();
        at.dedup();
        at.push(common::records_end(bytes) + 1);
        at.push(bytes.len());
        at.sort();
        at.dedup();
        let at = at.into_iter().filter(|&c| c <= bytes.len());
        cuts.extend(at.flat_map(|c| [(seg, c, Tear::Truncated), (seg, c, Tear::InPlace)]));
    }
    check_cuts(&log, base.path(), &cuts, true);
}

/// The record (start offset and sequence number) that byte `at` of a segment belongs to; the
/// segment header counts as offset 0 with the segment's first sequence number.
fn owner(bounds: &[(u64, u64, u64)], at: u64) -> (u64, u64) {
    if at < 64 {
        return (0, bounds[0].2);
    }
    match bounds.iter().find(|b| b.0 <= at && at < b.1) {
        Some(b) => (b.0, b.2),
        // Zeros padding a write out to its sector: damage there is reported where the next
        // record was expected, right after the one before.
        None => {
            let next = bounds.iter().find(|b| b.0 > at).unwrap();
            let prev_end = bounds.iter().filter(|b| b.1 <= at).map(|b| b.1).max().unwrap_or(64);
            (prev_end, next.2)
        }
    }
}

#[test]
fn every_bit_flip_in_the_log_is_reported_as_damage_at_its_record() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("ledger");
    let log = load_log(&src);
    // Two copies, one per thread, each flipping bits of half the bytes in place.
    for part in 0..2 {
        common::copy_ledger_dir(&src, &base.path().join(format!("flip-{part}")));
    }
    let total: usize = log.segments.iter().map(|s| common::records_end(&s.1)).sum();
    std::thread::scope(|s| {
        for part in 0..2usize {
            let (log, base) = (&log, base.path());
            s.spawn(move || {
                let dir = base.join(format!("flip-{part}"));
                let clock = ManualClock::at_default_epoch();
                let mut checked = 0usize;
                let last_seg = log.segments.len() - 1;
                let last_write = common::last_write_first_seq(&log.segments[last_seg].1);
                for (seg, (orig, bytes)) in log.segments.iter().enumerate() {
                    let path = dir.join("wal").join(orig.file_name().unwrap());
                    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    for at in (part..common::records_end(bytes)).step_by(2) {
                        let (offset, seq) = owner(&log.bounds[seg], at as u64);
                        for bit in 0..8 {
                            file.write_at(&[bytes[at] ^ (1 << bit)], at as u64).unwrap();
                            let ctx = format!("segment {seg} byte {at} bit {bit}");
                            // The torn tail of the last write: read-only, so it is reported, not
                            // cut. Damage: read-write (which refuses without changing anything,
                            // and without the read-only retries for a write in flight).
                            let torn = seg == last_seg && seq >= last_write && at >= 64;
                            let opts = if torn { OpenOptions::read_only() } else { OpenOptions::default() };
                            let opened = Ledger::open_with(&dir, opts.clock(Arc::new(clock.clone())));
                            match opened {
                                // Nothing later proves the last write durable: it is cut as torn.
                                Ok(l) if torn => {
                                    let t = l.recovery_report().torn_tail.clone();
                                    let t = t.unwrap_or_else(|| panic!("{ctx}: not torn"));
                                    assert_eq!(t.offset, offset, "{ctx}");
                                    assert_eq!(common::all_events(&l), log.events[..seq as usize - 1], "{ctx}");
                                }
                                Err(Error::Damaged(d)) => {
                                    assert_eq!(d.file, path, "{ctx}: {d}");
                                    assert_eq!(d.offset, offset, "{ctx}: {d}");
                                    assert_eq!(d.seq, seq, "{ctx}: {d}");
                                }
                                Err(e) => panic!("{ctx}: {e}"),
                                Ok(l) => panic!("{ctx}: opened with {} events", l.with_state(|s| s.last_seq)),
                            }
                            checked += 1;
                        }
                        file.write_at(&bytes[at..=at], at as u64).unwrap();
                    }
                }
                assert!(checked >= total * 8 / 2 - 8);
            });
        }
    });
    // A flip in the zeros after the records of a segment: garbage where nothing was
    // acknowledged. The last segment's is cut as a torn write; any other segment's is damage
    // at the end of its records.
    let dir = base.path().join("flip-0");
    let clock = ManualClock::at_default_epoch();
    for (seg, (orig, bytes)) in log.segments.iter().enumerate() {
        let end = common::records_end(bytes);
        let path = dir.join("wal").join(orig.file_name().unwrap());
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for at in (end..bytes.len()).step_by(211) {
            let ctx = format!("segment {seg} free byte {at}");
            file.write_at(&[0x40], at as u64).unwrap();
            let opened = Ledger::open_with(&dir, OpenOptions::read_only().clock(Arc::new(clock.clone())));
            // Bytes written in the sector after the zeros that would pad the next write are that
            // write's: the scan looks for a record at that sector. Anywhere else, right after
            // the records.
            let boundary = end.next_multiple_of(512);
            let at_record = if (boundary..boundary + 512).contains(&at) { boundary } else { end };
            match opened {
                Ok(l) if seg + 1 == log.segments.len() => {
                    let torn = l.recovery_report().torn_tail.clone().unwrap_or_else(|| panic!("{ctx}: not torn"));
                    assert_eq!(torn.offset, at_record as u64, "{ctx}");
                    assert_eq!(common::all_events(&l), log.events, "{ctx}");
                }
                Err(Error::Damaged(d)) if seg + 1 < log.segments.len() => {
                    assert_eq!(d.offset, at_record as u64, "{ctx}");
                }
                Err(e) => panic!("{ctx}: {e}"),
                Ok(_) => panic!("{ctx}: opened"),
            }
            file.write_at(&[0], at as u64).unwrap();
        }
    }
    // Undamaged again, the log opens with its whole history.
    for part in 0..2 {
        let l = Ledger::open(base.path().join(format!("flip-{part}"))).unwrap();
        assert_eq!(common::all_events(&l), log.events);
    }
}

#[test]
fn a_read_only_open_reports_damage_too() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("ledger");
    let log = load_log(&src);
    let (path, bytes) = &log.segments[0];
    let (start, _, seq) = log.bounds[0][2];
    let at = start as usize + 20;
    let mut damaged = bytes.clone();
    damaged[at] ^= 0x10;
    std::fs::write(path, &damaged).unwrap();
    match Ledger::open_read_only(&src) {
        Err(Error::Damaged(d)) => {
            assert_eq!((d.file.as_path(), d.offset, d.seq), (path.as_path(), start, seq));
            let text = Error::Damaged(d).to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains(&format!("offset {start}")), "{text}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a damaged log opened read-only"),
    }
}

// ---------------------------------------------------------------------------------------------
// Power loss on the fault-injecting double.

use common::{Lcg, MEM_DIR};

fn mem_open(storage: &FaultyStorage, clock: &ManualClock) -> allocation_ledger::Result<Ledger> {
    Ledger::open_with(
        MEM_DIR,
        OpenOptions::default()
            .storage(Arc::new(storage.clone()))
            .clock(Arc::new(clock.clone()))
            .config(common::small_config(5)),
    )
}

/// Runs `steps` random operations; returns the highest sequence number that an answered
/// operation promised was durable.
fn drive(ledger: &Ledger, clock: &ManualClock, rng: &mut Lcg, steps: usize) -> u64 {
    let mut acked = 0;
    let mut known: Vec<AllocationId> = Vec::new();
    for _ in 0..steps {
        let result: allocation_ledger::Result<()> = match rng.below(10) {
            0..=3 => {
                let mut req = ResourceRequest::new(format!("job-{}", rng.below(3)))
                    .workers(rng.below(4) as u32)
                    .ttl_seconds(60 + rng.below(200));
                if rng.below(2) == 0 {
                    req = req.mcp_server(["github", "slack"][rng.below(2) as usize]);
                }
                ledger.request_resources(&req).map(|o| {
                    known.push(o.allocation_id());
                })
            }
            4 | 5 if !known.is_empty() => {
                let id = known[rng.below(known.len() as u64) as usize];
                ledger.release_resources(&id.to_string()).map(drop)
            }
            6 => {
                // Not an operation of the ledger: acknowledges nothing.
                clock.advance_seconds(rng.below(120) as i64);
                continue;
            }
            7 => ledger.cleanup_expired().map(drop),
            8 => ledger.snapshot().map(drop),
            _ => ledger.get_capacity().map(drop),
        };
        match result {
            // Answers (including refusals) come only after the log is durable up to here.
            Ok(()) | Err(Error::InvalidInput { .. } | Error::NotFound(_)) => {
                acked = ledger.status().last_seq;
            }
            Err(Error::Poisoned(_) | Error::Io { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    acked
}

/// Crashes `storage` after `ledger` ran, reopens, and checks that the recovered log is a prefix
/// of what was written, holding at least every acknowledged event.
fn crash_and_check(storage: &FaultyStorage, clock: &ManualClock, ledger: Ledger, acked: u64, seed: u64, ctx: &str) {
    let written = common::all_events(&ledger);
    drop(ledger);
    storage.crash(seed);
    let recovered = mem_open(storage, clock).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    let events = common::all_events(&recovered);
    assert!(events.len() as u64 >= acked, "{ctx}: {} events recovered, {acked} were acknowledged", events.len());
    assert_eq!(events, written[..events.len()], "{ctx}: not a prefix of what was written");
    assert_eq!(recovered.with_state(std::clone::Clone::clone), common::fold(&events), "{ctx}");
    if let Some(t) = &recovered.recovery_report().torn_tail {
        let saved = t.saved_to.as_ref().expect("torn tail saved");
        assert_eq!(storage.files()[saved].len() as u64, t.len, "{ctx}");
    }
    // Writable again, and what it writes now survives the next crash.
    recovered
        .request_resources(&ResourceRequest::new("after").mcp_server("github"))
        .unwrap_or_else(|e| panic!("{ctx}: write after recovery: {e}"));
    let now = common::all_events(&recovered);
    drop(recovered);
    storage.crash(seed + 1);
    let again = mem_open(storage, clock).unwrap();
    assert_eq!(common::all_events(&again), now, "{ctx}: second crash");
}

#[test]
fn power_loss_after_acknowledged_operations_loses_none_of_them() {
    for seed in 0..40u64 {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let ledger = mem_open(&storage, &clock).unwrap();
        let mut rng = Lcg(seed);
        let acked = drive(&ledger, &clock, &mut rng, 60);
        assert_eq!(acked, ledger.status().last_seq, "seed {seed}");
        assert!(acked > 10, "seed {seed}: only {acked} events");
        let state = ledger.with_state(std::clone::Clone::clone);
        let written = common::all_events(&ledger);
        crash_and_check(&storage, &clock, ledger, acked, seed, &format!("seed {seed}"));
        // Nothing at all was lost: the state is exactly the one before the crash.
        let l = mem_open(&storage, &clock).unwrap();
        let events = common::all_events(&l);
        assert_eq!(events[..written.len()], written[..], "seed {seed}");
        assert_eq!(common::fold(&events[..written.len()]), state, "seed {seed}");
    }
}

#[test]
fn power_loss_after_a_storage_fault_keeps_every_acknowledged_event() {
    // How many storage operations a clean run makes.
    let total_ops = {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        storage.set_plan(None);
        let ledger = mem_open(&storage, &clock).unwrap();
        drive(&ledger, &clock, &mut Lcg(7), 40);
        storage.ops()
    };
    assert!(total_ops > 50, "{total_ops}");
    let faults = [
        (None, Fault::Fail, false),
        (Some(OpKind::Write), Fault::ShortWrite, false),
        (Some(OpKind::Write), Fault::NoSpace, true),
        (Some(OpKind::Sync), Fault::Fail, false),
    ];
    let mut fired = 0;
    for (kind, fault, sticky) in faults {
        for nth in 0..total_ops {
            let ctx = format!("{fault:?} on {kind:?} #{nth} (sticky {sticky})");
            let storage = FaultyStorage::new();
            let clock = ManualClock::at_default_epoch();
            storage.set_plan(Some(FaultPlan { kind, nth, fault, sticky }));
            let (ledger, acked) = match mem_open(&storage, &clock) {
                Ok(l) => {
                    let acked = drive(&l, &clock, &mut Lcg(7), 40);
                    (l, acked)
                }
                Err(_) => {
                    // The ledger was never created: after the crash an open creates one.
                    storage.crash(nth);
                    let l = mem_open(&storage, &clock).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    assert!(!common::all_events(&l).is_empty());
                    continue;
                }
            };
            fired += storage.faults_fired();
            crash_and_check(&storage, &clock, ledger, acked, nth, &ctx);
        }
    }
    assert!(fired > total_ops, "faults fired {fired} times");
}

/// A failed fsync at segment rotation is latched like any other: events appended before it
/// (here: expiries written on the way to the rotation) are never acknowledged afterwards, by a
/// read or anything else, because a retried fsync proves nothing.
#[test]
fn a_failed_fsync_at_segment_rotation_is_latched_not_retried() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = Ledger::open_with(
        MEM_DIR,
        OpenOptions::default()
            .storage(Arc::new(storage.clone()))
            .clock(Arc::new(clock.clone()))
            .config(common::small_config(0)),
    )
    .unwrap();
    // Ten allocations that expire together: ten expiry records of 100+ bytes each.
    for i in 0..10 {
        grant(&ledger, ResourceRequest::new(format!("short-{i}")).workers(1).ttl_seconds(60));
    }
    let active_len = || {
        let files = storage.files();
        let last = files.keys().filter(|p| p.extension().is_some_and(|e| e == "wal")).max().unwrap().clone();
        common::records_end(&files[&last])
    };
    // Fill the active segment to within 900 bytes of its size, so that the expiries start in
    // it and one of the later ones rotates.
    while !(4096 - 900..4096).contains(&active_len()) {
        grant(&ledger, ResourceRequest::new("filler").mcp_server("github"));
    }
    let before = ledger.status();
    assert_eq!(before.durable_seq, before.last_seq);

    storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth: 0, fault: Fault::Fail, sticky: false }));
    clock.advance_seconds(61);
    let r = ledger.cleanup_expired();
    assert!(matches!(r, Err(Error::Poisoned(_))), "{r:?}");
    assert_eq!(storage.faults_fired(), 1);
    let after = ledger.status();
    assert!(after.last_seq > before.last_seq, "expiries were appended before the rotation: {after:?}");
    assert_eq!(after.durable_seq, before.durable_seq);
    assert!(after.poisoned.is_some());

    // Nothing acknowledges the expiries now: not a read, not a write, not a snapshot.
    let cap = ledger.get_capacity();
    assert!(matches!(cap, Err(Error::Poisoned(_))), "{cap:?}");
    let list = ledger.list_allocations(None, None);
    assert!(matches!(list, Err(Error::Poisoned(_))), "{list:?}");
    assert!(matches!(ledger.snapshot(), Err(Error::Poisoned(_))));
    assert!(matches!(ledger.cleanup_expired(), Err(Error::Poisoned(_))));
    assert_eq!(ledger.status().durable_seq, before.durable_seq);

    // Reopening replays the log and recovers; what was acknowledged is there.
    let acked = before.last_seq;
    crash_and_check(&storage, &clock, ledger, acked, 3, "rotation fsync failure");
}
