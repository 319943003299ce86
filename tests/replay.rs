//! Replay of a long log (decoded on several threads, folded in order) gives exactly the state
//! the live ledger had, and damage in a long log is still reported precisely.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{Config, Error, Ledger, ManualClock, OpenOptions, ResourceRequest};
use std::sync::Arc;

fn open(storage: &FaultyStorage, clock: &ManualClock) -> allocation_ledger::Result<Ledger> {
    let config = Config { snapshot_every: 0, segment_size_bytes: 1 << 20, terminal_retained: 500, ..Config::default() };
    let opts = OpenOptions::default().config(config).storage(Arc::new(storage.clone())).clock(Arc::new(clock.clone()));
    Ledger::open_with("/ledger", opts)
}

fn long_history(storage: &FaultyStorage, clock: &ManualClock) -> Ledger {
    let ledger = open(storage, clock).unwrap();
    let mut held = std::collections::VecDeque::new();
    for i in 0..14_000u32 {
        clock.advance_micros(1_500);
        let mut meta = serde_json::Map::new();
        meta.insert("tenant".into(), format!("tenant-{}", i % 5).into());
        let req = ResourceRequest::new(format!("job-{}", i % 97))
            .workers(1 + i % 3)
            .mcp_server(["github", "slack", "jira"][i as usize % 3])
            .ttl_seconds(60)
            .metadata(meta);
        let o = ledger.request_resources(&req).unwrap();
        if o.is_granted() {
            held.push_back(o.allocation_id().to_string());
        }
        if held.len() > 3 {
            ledger.release_resources(&held.pop_front().unwrap()).unwrap();
        }
    }
    ledger
}

#[test]
fn parallel_replay_equals_the_live_state() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = long_history(&storage, &clock);
    let live = ledger.with_state(std::clone::Clone::clone);
    let bytes: usize = storage.files().values().map(Vec::len).sum();
    assert!(bytes > 4 << 20, "the log ({bytes} bytes) must be long enough for the threaded path");
    drop(ledger);
    let reopened = open(&storage, &clock).unwrap();
    assert_eq!(reopened.recovery_report().events_replayed, live.last_seq);
    assert_eq!(reopened.with_state(std::clone::Clone::clone), live);
}

#[test]
fn damage_in_a_long_log_names_file_and_offset() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    drop(long_history(&storage, &clock));
    let files = storage.files();
    let (path, bytes) = files.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "wal")).nth(1).unwrap();
    let mut damaged = bytes.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x10;
    storage.put_file(path, damaged);
    match open(&storage, &clock) {
        Err(Error::Damaged(d)) => {
            assert_eq!(&d.file, path);
            assert!(d.offset <= at as u64 && at as u64 - d.offset < 2048, "{d}");
        }
        other => panic!("expected damage, got {other:?}"),
    }
}
