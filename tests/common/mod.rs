//! Helpers shared by the integration tests.
#![allow(dead_code)]

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{CapacityReport, Config, EventBody, Ledger, LoggedEvent, ManualClock, OpenOptions, State};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A config that rotates segments often (the smallest segment size the config allows).
pub fn small_config(snapshot_every: u64) -> Config {
    Config { snapshot_every, segment_size_bytes: 4096, ..Config::default() }
}

pub fn opts(config: Config, clock: &ManualClock) -> OpenOptions {
    OpenOptions::default().config(config).clock(Arc::new(clock.clone()))
}

/// Where in-memory ledgers live.
pub const MEM_DIR: &str = "/ledger";

/// `opts` on an in-memory storage.
pub fn mem_options(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> OpenOptions {
    opts(config, clock).storage(Arc::new(storage.clone()))
}

/// `opts` on the real file system.
pub fn fs_options(clock: &ManualClock, config: Config) -> OpenOptions {
    opts(config, clock)
}

/// A small deterministic generator (no dependency, same numbers on every machine).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Files of `dir` (one level), sorted.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Folds `events` (which must start with `ledger_created`) into a fresh state, the way a
/// reader that knows nothing but the log would.
pub fn fold(events: &[LoggedEvent]) -> State {
    let config = match events.first().map(|e| &e.event.body) {
        Some(EventBody::LedgerCreated { config, .. }) => config.clone(),
        other => panic!("the first event is not ledger_created: {other:?}"),
    };
    let mut s = State::empty(config);
    for e in events {
        s.evolve(e.seq, e.event.ts_us, &e.event.body);
    }
    assert_eq!(s.anomalies, 0, "a fold of the log hit anomalies");
    s.check_invariants().expect("a fold of the log is consistent");
    s
}

/// Every event of the ledger, read back from its log files.
pub fn all_events(ledger: &Ledger) -> Vec<LoggedEvent> {
    ledger.events(1, usize::MAX).expect("reading the log")
}

/// allocated + available == total for CPU, memory and workers.
pub fn assert_capacity_accounting(c: &CapacityReport) {
    assert_eq!(
        c.allocated_cpu_millicores + c.available_cpu_millicores,
        c.total_cpu_millicores,
        "CPU accounting: {c:?}"
    );
    assert_eq!(c.allocated_memory + c.available_memory, c.total_memory, "memory accounting: {c:?}");
    assert_eq!(c.allocated_workers + c.available_workers, c.total_workers, "worker accounting: {c:?}");
    assert_eq!(c.total_cpu, c.total_cpu_millicores as f64 / 1000.0, "cores and millicores disagree: {c:?}");
    assert_eq!(c.allocated_cpu + c.available_cpu, c.total_cpu, "CPU accounting in cores: {c:?}");
}

/// Segment files of the ledger in `dir`, oldest first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
        .expect("listing wal/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// Copies every file of a ledger directory (one level of subdirectories: wal/, snapshots/,
/// quarantine/) to `to`.
pub fn copy_ledger_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), target.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Record boundaries of a segment, read with the documented framing (a 32-byte segment header,
/// 64 bytes in version 4; then records of `len: u32 LE | seq: u64 LE | crc: u32 LE | payload`,
/// in version 4 with the 32-byte chain value before the payload; version 3 on, writes start at
/// a 512-byte boundary): for each record its start offset, end offset and sequence number.
pub fn record_bounds(bytes: &[u8]) -> Vec<(u64, u64, u64)> {
    let end = records_end(bytes);
    let (header, overhead) = framing(bytes);
    let mut out = Vec::new();
    let mut off = header;
    while off < end {
        // Version 3 starts each write at a sector: zeros pad the end of the one before.
        if bytes[off..off + 4] == [0; 4] {
            off = off.next_multiple_of(512);
            continue;
        }
        // The top 11 bits of the length are the durable lag (format version 3).
        let len = (u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) & 0x1f_ffff) as usize;
        let seq = u64::from_le_bytes(bytes[off + 4..off + 12].try_into().unwrap());
        out.push((off as u64, (off + overhead + len) as u64, seq));
        off += overhead + len;
    }
    assert!(off == end || end <= header, "a clean segment's records end where its zeros start");
    out
}

/// A segment's header length and the bytes in front of each record's payload, by its version.
pub fn framing(bytes: &[u8]) -> (usize, usize) {
    let version = bytes.get(8..12).map_or(0, |v| u32::from_le_bytes(v.try_into().unwrap()));
    if version >= 4 {
        (64, 48)
    } else {
        (32, 16)
    }
}

/// The sequence number of the first record of the last write in a version 3 segment: the last
/// record whose durable lag (the top 11 bits of its length field) is 1, written when every
/// record before it was durable.
pub fn last_write_first_seq(bytes: &[u8]) -> u64 {
    let lag = |start: u64| u32::from_le_bytes(bytes[start as usize..start as usize + 4].try_into().unwrap()) >> 21;
    record_bounds(bytes).iter().rev().find(|b| lag(b.0) == 1).map(|b| b.2).expect("a record that starts a write")
}

/// Where the records of a segment end: a pre-filled segment holds zeros after them (and a
/// record never ends in a zero byte: its payload is a JSON object).
pub fn records_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1).max(framing(bytes).0.min(bytes.len()))
}
