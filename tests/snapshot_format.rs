//! Snapshot format v3 (binary allocations, log position) and its use on open: a state of
//! every kind of allocation round-trips through v3 and v2, every damaged byte of a v3 file is
//! refused, opening resumes at the recorded log position, and a position that does not check
//! out is ignored (the segment is read from its start) without changing what is loaded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::testing::snapshot::{self, decode, decode_with_position, encode_v2, encode_with_position};
use allocation_ledger::testing::wal::LogPosition;
use allocation_ledger::{Config, Ledger, ManualClock, Priority, ResourceRequest, State};
use common::*;
use std::path::Path;

/// A ledger whose state holds active, released, expired and failed allocations, MCP servers
/// (catalog and assigned), metadata with escapes, and evicted ended ones; snapshot at the end.
fn busy_ledger(dir: &Path, clock: &ManualClock) -> Ledger {
    // Default segment size: the snapshot's last event and the tail share a segment.
    let config = Config {
        terminal_retained: 6,
        snapshot_every: 0,
        worker_slots: 40,
        total_cpu_millicores: 200_000,
        total_memory_mib: 400_000,
        ..Config::default()
    };
    let ledger = Ledger::open_with(dir, opts(config, clock)).unwrap();
    let mut held = Vec::new();
    for i in 0..24u32 {
        let mut meta = serde_json::Map::new();
        meta.insert("team".into(), format!("t{}", i % 3).into());
        meta.insert("quote \"é\"".into(), serde_json::json!({"n": i, "list": [1, null, true]}));
        let mut req = ResourceRequest::new(format!("job-{i}"))
            .workers(1 + i % 3)
            .priority(if i % 4 == 0 { Priority::High } else { Priority::Normal })
            .ttl_seconds(60 + u64::from(i) * 30);
        if i % 3 == 0 {
            req = req.mcp_server("github");
        }
        if i % 5 == 0 {
            req = req.mcp_server(format!("custom-{i}"));
        }
        if i % 2 == 0 {
            req = req.metadata(meta);
        }
        if i % 7 == 0 {
            // Version 4: idempotency keys and lifetime bounds.
            req = req.idempotency_key(format!("key-{i}")).max_lifetime_seconds(3600);
        }
        if i % 7 == 1 {
            // Version 7: a canonical UUID key is stored as its bytes.
            req = req.idempotency_key(uuid::Uuid::from_u128(u128::from(i) << 64 | 0x4000).to_string());
        }
        let o = ledger.request_resources(&req).unwrap();
        held.push(o.allocation_id());
        if i % 7 == 3 {
            // Version 4: renewals.
            ledger.renew_allocation(&o.allocation_id().to_string(), Some(90)).unwrap();
        }
        clock.advance_seconds(7);
        if i % 4 == 1 {
            ledger.release_resources(&held[i as usize - 1].to_string()).unwrap();
        }
        if i % 6 == 5 {
            // More workers than are free: a rejection (a failed allocation with an error).
            ledger.request_resources(&ResourceRequest::new(format!("big-{i}")).workers(40)).unwrap();
        }
        if i == 12 {
            clock.advance_seconds(400);
            ledger.cleanup_expired().unwrap();
        }
    }
    ledger
}

#[test]
fn every_kind_of_allocation_round_trips_in_the_current_version_and_v2() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_default_epoch();
    let ledger = busy_ledger(tmp.path(), &clock);
    let state: State = ledger.with_state(std::clone::Clone::clone);
    let kinds: std::collections::BTreeSet<&str> = state.allocations().map(|a| a.state.as_str()).collect();
    assert_eq!(kinds.len(), 4, "active, released, expired and failed: {kinds:?}");
    assert!(state.evicted_count() > 0, "some ended allocations were evicted");
    assert!(state.allocations().any(|a| !a.metadata.is_empty() && a.error.is_none()));
    assert!(state.allocations().any(|a| a.mcp_servers.iter().any(|m| m.assigned)));
    assert!(
        state.allocations().any(|a| a.renewals > 0) && state.allocations().any(|a| a.max_lifetime_seconds.is_some())
    );
    assert!(state.idempotency_key_count() > 0);

    let data = state.to_data();
    let position = LogPosition { segment_first_seq: 1, offset: 32, seq: data.last_seq, record_crc: None, chain: None };
    // The binary form (v7 now; v3 to v6 files share its decoder and are read by the fixtures' test).
    let v3 = encode_with_position(&data, Some(position));
    assert_eq!(&v3[8..12], &7u32.to_le_bytes());
    let (back, pos) = decode_with_position(&v3, data.last_seq).unwrap();
    assert_eq!(back, state);
    assert_eq!(pos, Some(position));
    let v2 = encode_v2(&data);
    assert_eq!(&v2[8..12], &2u32.to_le_bytes());
    assert_eq!(decode_with_position(&v2, data.last_seq).unwrap(), (state.clone(), None));
    // The binary form is the smaller one (the reason for v3).
    assert!(v3.len() < v2.len(), "v3 {} bytes, v2 {} bytes", v3.len(), v2.len());

    // A position for another sequence number than the snapshot's is refused.
    let wrong = encode_with_position(&data, Some(LogPosition { seq: data.last_seq - 1, ..position }));
    assert!(decode(&wrong, data.last_seq).is_err());

    // Every damaged byte is refused (the checksum, or the header checks before it).
    for at in 0..v3.len() {
        let mut d = v3.clone();
        d[at] ^= 0x5A;
        assert!(decode(&d, data.last_seq).is_err(), "byte {at} of {}", v3.len());
    }
    // Cut anywhere: refused.
    for cut in [0, 10, 39, 40, 41, v3.len() / 2, v3.len() - 1] {
        assert!(decode(&v3[..cut], data.last_seq).is_err(), "cut at {cut}");
    }
}

fn only_snapshot(dir: &Path) -> std::path::PathBuf {
    let snaps: Vec<_> = std::fs::read_dir(dir.join("snapshots")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    snaps[0].clone()
}

#[test]
fn open_resumes_at_the_snapshot_position_and_ignores_a_wrong_one() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_default_epoch();
    let ledger = busy_ledger(tmp.path(), &clock);
    let info = ledger.snapshot().unwrap();
    // A tail after the snapshot, in the same segment and beyond.
    for i in 0..30 {
        clock.advance_seconds(1);
        ledger.request_resources(&ResourceRequest::new(format!("tail-{i}")).workers(1).ttl_seconds(60)).unwrap();
    }
    let expected = ledger.with_state(std::clone::Clone::clone);
    drop(ledger);
    assert_eq!(only_snapshot(tmp.path()), info.path);

    let bytes = std::fs::read(&info.path).unwrap();
    let (_, position) = decode_with_position(&bytes, info.seq).unwrap();
    let position = position.expect("the ledger records where the snapshot's last event is");
    assert_eq!(position.seq, info.seq);

    let reopened = Ledger::open(tmp.path()).unwrap();
    let report = reopened.recovery_report().clone();
    assert_eq!(report.snapshot_seq, Some(info.seq));
    assert!(report.resumed_from_snapshot_position, "{report:?}");
    assert_eq!(report.events_replayed, 30);
    assert_eq!(reopened.with_state(std::clone::Clone::clone), expected);
    drop(reopened);

    // Positions that do not check out: a different offset (not the record), a different
    // segment, an offset past the end. Each is ignored and the result is the same.
    let (state_at_snapshot, _) = decode_with_position(&bytes, info.seq).unwrap();
    let data = state_at_snapshot.to_data();
    for wrong in [
        LogPosition { offset: position.offset + 1, ..position },
        LogPosition { offset: 32, ..position },
        LogPosition { segment_first_seq: position.segment_first_seq + 1, ..position },
        LogPosition { offset: u64::MAX / 2, ..position },
    ] {
        std::fs::write(&info.path, encode_with_position(&data, Some(wrong))).unwrap();
        let l = Ledger::open(tmp.path()).unwrap();
        let report = l.recovery_report().clone();
        assert_eq!(report.snapshot_seq, Some(info.seq), "{wrong:?}");
        assert!(!report.resumed_from_snapshot_position, "{wrong:?}: {report:?}");
        assert_eq!(l.with_state(std::clone::Clone::clone), expected, "{wrong:?}");
    }

    // A v2 snapshot (no position) still opens, from the start of the segment.
    std::fs::write(&info.path, encode_v2(&data)).unwrap();
    let l = Ledger::open(tmp.path()).unwrap();
    assert_eq!(l.recovery_report().snapshot_seq, Some(info.seq));
    assert!(!l.recovery_report().resumed_from_snapshot_position);
    assert_eq!(l.with_state(std::clone::Clone::clone), expected);
    assert_eq!(snapshot::parse_file_name(info.path.file_name().unwrap().to_str().unwrap()), Some(info.seq));
}

/// A snapshot shares the allocations it copies under the lock; what the ledger changes after
/// that (releases, expiries, new grants) must not reach the encoded snapshot.
#[test]
fn a_snapshot_encodes_the_state_it_was_taken_at_while_the_ledger_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_default_epoch();
    let ledger = busy_ledger(tmp.path(), &clock);
    let before = ledger.with_state(std::clone::Clone::clone);
    let (data, mut shared) = ledger.with_state(allocation_ledger::State::snapshot_parts);
    let active: Vec<_> = before.allocations().filter(|a| a.state.as_str() == "active").map(|a| a.id).collect();
    assert!(active.len() >= 3);
    for id in &active[..active.len() / 2] {
        ledger.release_resources(&id.to_string()).unwrap();
    }
    clock.advance_seconds(3600);
    ledger.cleanup_expired().unwrap();
    ledger.request_resources(&ResourceRequest::new("after").workers(2)).unwrap();
    let after = ledger.with_state(std::clone::Clone::clone);
    assert_ne!(after, before);
    allocation_ledger::testing::sort_for_snapshot(&mut shared);
    let bytes = snapshot::encode_parts(&data, &shared, None);
    assert_eq!(decode(&bytes, data.last_seq).unwrap(), before);
    after.check_invariants().unwrap();
    assert_eq!(after, common::fold(&all_events(&ledger)));
}

/// Periodic snapshots of a state larger than 1 MiB are spaced by the log they save replaying:
/// after `snapshot_every` events *and* once the log has grown by the last snapshot's size, so
/// snapshots never write more than the log. A small state keeps the plain count.
#[test]
fn snapshots_of_a_large_state_are_spaced_by_the_log_they_save() {
    let storage = allocation_ledger::storage::FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let config = Config { snapshot_every: 200, segment_size_bytes: 256 << 10, ..Config::default() };
    let ledger = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, config)).unwrap();
    let snapshots = || -> Vec<(u64, usize)> {
        let files = storage.files();
        files
            .iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "snap"))
            .map(|(p, b)| (p.file_stem().unwrap().to_str().unwrap().parse().unwrap(), b.len()))
            .collect()
    };
    let mut meta = serde_json::Map::new();
    // (Each record fits in two sectors with its 48 bytes of framing: one write per grant.)
    meta.insert("note".into(), "n".repeat(560).into());
    for i in 0..4000 {
        let req = ResourceRequest::new(format!("big-{i}")).mcp_server("github").metadata(meta.clone());
        assert!(ledger.request_resources(&req).unwrap().is_granted());
        ledger.snapshot_if_due();
    }
    // Records of this test are grants of about 1 KB (900 to 1100 bytes). A snapshot of up to
    // 1 MiB is followed by the next after 200 events; a larger one, only once the log has grown
    // by its size.
    let kept = snapshots();
    assert_eq!(kept.len(), 4, "{kept:?}");
    let mut spaced = 0;
    for w in kept.windows(2) {
        let ((seq_a, size_a), (seq_b, _)) = (w[0], w[1]);
        if size_a <= 1 << 20 {
            assert_eq!(seq_b - seq_a, 200, "{kept:?}");
        } else {
            let events = seq_b - seq_a;
            assert!(events * 1100 >= size_a as u64, "{kept:?}: only {events} events after {size_a} bytes");
            assert!(events * 900 <= size_a as u64 + 1100, "{kept:?}: waited {events} events, too long");
            spaced += 1;
        }
    }
    assert!(spaced >= 1, "a snapshot above 1 MiB was followed by another: {kept:?}");
    // Reopened, the rule goes on from what the log and the snapshot say.
    drop(ledger);
    let ledger = Ledger::open_with(MEM_DIR, mem_options(&storage, &clock, Config::default())).unwrap();
    let before = snapshots();
    for i in 0..200 {
        let req = ResourceRequest::new(format!("more-{i}")).mcp_server("github").metadata(meta.clone());
        assert!(ledger.request_resources(&req).unwrap().is_granted());
        ledger.snapshot_if_due();
    }
    let (newest, size) = *before.last().unwrap();
    let events_after = ledger.status().last_seq - newest;
    if events_after * 1100 < size as u64 {
        assert_eq!(snapshots(), before, "{events_after} events are not yet a snapshot's worth of log");
    } else if events_after * 900 > size as u64 {
        assert_ne!(snapshots(), before, "{events_after} events are a snapshot's worth of log");
    }
}
