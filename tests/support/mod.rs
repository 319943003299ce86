//! Helpers shared by the reliability tests (faults, corruption, repair, kill, bad input).
#![allow(dead_code)]

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{Config, EventBody, Ledger, LoggedEvent, ManualClock, OpenOptions, State};
use std::path::Path;
use std::sync::Arc;

/// Where in-memory ledgers live.
pub const MEM_DIR: &str = "/ledger";

/// Small segments (the smallest the config allows) so a short history spans several of them.
pub fn small_config(snapshot_every: u64) -> Config {
    Config { snapshot_every, segment_size_bytes: 4096, ..Config::default() }
}

pub fn mem_options(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> OpenOptions {
    OpenOptions::default().storage(Arc::new(storage.clone())).clock(Arc::new(clock.clone())).config(config)
}

pub fn fs_options(clock: &ManualClock, config: Config) -> OpenOptions {
    OpenOptions::default().clock(Arc::new(clock.clone())).config(config)
}

/// Folds `events` (which must start with `ledger_created`) into a fresh state, as a reader that
/// knows nothing but the log would, and checks that it applies cleanly.
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

/// A small deterministic generator (no dependency, same numbers on every machine).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Files of `dir` (one level), sorted.
pub fn list(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}
