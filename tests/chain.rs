//! The tamper-evident chain (segment format version 4, issue 18 §3): the head survives a
//! reopen, every flipped byte is found, a cut is a torn tail and never a chain error, a pinned
//! head proves its prefix, and a record rewritten with a good CRC is found by the chain (and by
//! a pinned head when the forger re-chains everything after it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::FsStorage;
use allocation_ledger::testing::segment;
use allocation_ledger::{chain_next, verify, verify_with, ChainHead, ChainValue, Ledger, ManualClock};
use allocation_ledger::{ResourceRequest, VerifyOptions, VerifyReport, CHAIN_GENESIS};
use proptest::prelude::*;
use std::path::Path;
use std::process::Command;

mod common;

/// A ledger in `dir` with `ops` writes (grants, and releases of every other one) over small
/// segments; the head after each write, as the ledger reports it.
fn build(dir: &Path, ops: usize) -> Vec<ChainHead> {
    let clock = ManualClock::at_default_epoch();
    let ledger = Ledger::open_with(dir, common::fs_options(&clock, common::small_config(0))).unwrap();
    let mut heads = vec![ledger.chain_head().unwrap().unwrap()];
    for i in 0..ops {
        clock.advance_seconds(1);
        let o = ledger.request_resources(&ResourceRequest::new(format!("job-{i}")).workers(1)).unwrap();
        heads.push(ledger.chain_head().unwrap().unwrap());
        if i % 2 == 0 {
            ledger.release_resources(&o.allocation_id().to_string()).unwrap();
            heads.push(ledger.chain_head().unwrap().unwrap());
        }
    }
    heads
}

fn check(dir: &Path) -> VerifyReport {
    verify(&FsStorage::default(), dir, &mut |_, _| {}).unwrap()
}

fn check_pinned(dir: &Path, head: ChainHead) -> VerifyReport {
    verify_with(&FsStorage::default(), dir, VerifyOptions { expect_head: Some(head) }, &mut |_, _| {}).unwrap()
}

/// The chained records of a segment: (offset, frame length, sequence number).
fn records(bytes: &[u8], first_seq: u64) -> Vec<(usize, usize, u64)> {
    let mut out = Vec::new();
    segment::scan(Path::new("x.wal"), bytes, first_seq, &mut |pos, _| {
        out.push((pos.offset as usize, pos.frame_len as usize, pos.seq));
        Ok(true)
    });
    out
}

fn first_seq_of(path: &Path) -> u64 {
    segment::parse_file_name(path.file_name().unwrap().to_str().unwrap()).unwrap()
}

/// Recomputes the checksum of the chained record at `at` of `bytes` from what it holds.
fn fix_crc(bytes: &mut [u8], at: usize) {
    let len = (u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) & 0x1f_ffff) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[at..at + 12]);
    h.update(&bytes[at + 16..at + 48 + len]);
    bytes[at + 12..at + 16].copy_from_slice(&h.finalize().to_le_bytes());
}

/// Rewrites every chain value (and checksum, and segment chain start) of the log in `dir` from
/// the genesis value, as a forger who knows the format would after editing a payload.
fn rechain(dir: &Path) {
    let mut chain = CHAIN_GENESIS;
    for path in common::segment_files(dir) {
        let mut bytes = std::fs::read(&path).unwrap();
        let first = first_seq_of(&path);
        let header = segment::encode_header(first, &chain);
        bytes[..header.len()].copy_from_slice(&header);
        for (at, frame_len, seq) in records(&bytes, first) {
            chain = chain_next(&chain, seq, &bytes[at + 48..at + frame_len]);
            bytes[at + 16..at + 48].copy_from_slice(&chain.0);
            fix_crc(&mut bytes, at);
        }
        std::fs::write(&path, bytes).unwrap();
    }
}

#[test]
fn a_rewritten_record_with_a_good_crc_is_found_by_the_chain_and_by_a_pinned_head() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("l");
    let heads = build(&dir, 30);
    let pinned = *heads.last().unwrap();
    let clean = check(&dir);
    assert!(clean.ok, "{:?}", clean.problems);
    assert_eq!((clean.chain_head, clean.chain_from), (Some(pinned), Some(1)));
    assert!(check_pinned(&dir, pinned).ok);

    // Edit a payload in the middle segment, keep its length and make its CRC good again.
    let segs = common::segment_files(&dir);
    assert!(segs.len() >= 3, "the log spans segments");
    let path = &segs[segs.len() / 2];
    let mut bytes = std::fs::read(path).unwrap();
    let (at, frame_len, seq) = records(&bytes, first_seq_of(path))[1];
    let payload = &mut bytes[at + 48..at + frame_len];
    let job = payload.windows(4).position(|w| w == b"job-").expect("a grant");
    payload[job] = b'J';
    fix_crc(&mut bytes, at);
    std::fs::write(path, &bytes).unwrap();
    let report = check(&dir);
    assert!(!report.ok);
    let problem = report.problems.join("\n");
    assert!(problem.contains("chain mismatch") && problem.contains(&format!("sequence number {seq}")), "{problem}");
    assert_eq!(report.chain_head, None, "no verified head past a broken link");
    let pinned_report = check_pinned(&dir, pinned);
    assert!(!pinned_report.ok && !pinned_report.expect_head.unwrap().matches);
    // A head pinned before the edited record still holds.
    let before = heads.iter().rev().find(|h| h.seq < seq).copied().unwrap();
    assert!(check_pinned(&dir, before).expect_head.unwrap().matches);

    // The forger re-chains everything: the log is consistent again, but not the one pinned.
    rechain(&dir);
    let forged = check(&dir);
    assert!(forged.ok, "a consistent rewrite reads as a log: {:?}", forged.problems);
    assert_ne!(forged.chain_head, Some(pinned));
    let caught = check_pinned(&dir, pinned);
    assert!(!caught.ok);
    let e = caught.expect_head.unwrap();
    assert!(!e.matches && e.message.contains(&format!("record {}", pinned.seq)), "{}", e.message);
    assert!(check_pinned(&dir, before).expect_head.unwrap().matches, "the history before the edit is unchanged");

    // Through the CLI: the head is printed, a mismatch exits 6 (damaged).
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
            .arg("--data-dir")
            .arg(&dir)
            .args(args)
            .env_remove("ALLOCATION_LEDGER_DIR")
            .output()
            .unwrap()
    };
    let out = cli(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let forged_head = forged.chain_head.unwrap();
    assert_eq!(v["chain_head"]["seq"], forged_head.seq);
    assert_eq!(v["chain_head"]["hash"], forged_head.hash.to_string());
    let text = cli(&["verify"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("head: {forged_head}")));
    let mismatch = cli(&["verify", "--expect-head", &pinned.to_string()]);
    assert_eq!(mismatch.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&mismatch.stdout).contains("MISMATCH"));
    let beyond = ChainHead { seq: pinned.seq + 5, ..pinned };
    let out = cli(&["verify", "--json", "--expect-head", &beyond.to_string()]);
    assert_eq!(out.status.code(), Some(6));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["expect_head"]["message"].as_str().unwrap().contains("beyond the head"), "{v}");
    let bad = cli(&["verify", "--expect-head", "12:nothex"]);
    assert_eq!(bad.status.code(), Some(2), "a malformed head is invalid input");
}

#[test]
fn snapshots_carry_the_chain_and_opening_from_one_continues_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("l");
    build(&dir, 12);
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(100);
    let ledger = Ledger::open_with(&dir, common::fs_options(&clock, common::small_config(0))).unwrap();
    let snap = ledger.snapshot().unwrap();
    let head = ledger.chain_head().unwrap().unwrap();
    assert_eq!(head.seq, snap.seq);
    assert_eq!(ledger.chain_at(snap.seq).unwrap(), Some(head.hash));
    drop(ledger);
    let bytes = std::fs::read(&snap.path).unwrap();
    let hex = head.hash.to_string();
    assert!(bytes.windows(hex.len()).any(|w| w == hex.as_bytes()), "the snapshot records the chain value");
    let ledger = Ledger::open_with(&dir, common::fs_options(&clock, common::small_config(0))).unwrap();
    assert_eq!(ledger.recovery_report().snapshot_seq, Some(snap.seq));
    assert_eq!(ledger.chain_head().unwrap(), Some(head), "opened from the snapshot, the chain goes on from it");
    ledger.request_resources(&ResourceRequest::new("after").workers(1)).unwrap();
    let after = ledger.chain_head().unwrap().unwrap();
    drop(ledger);
    let report = check(&dir);
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.chain_head, Some(after));
    assert!(check_pinned(&dir, head).expect_head.unwrap().matches);
    // A read-only handle reads the head from the files.
    let ro = Ledger::open_with(&dir, allocation_ledger::OpenOptions::read_only()).unwrap();
    assert_eq!(ro.chain_head().unwrap(), Some(after));
}

#[test]
fn chain_values_parse_and_print() {
    let v = chain_next(&CHAIN_GENESIS, 1, br#"{"v":2}"#);
    assert_eq!(v.to_string().parse::<ChainValue>().unwrap(), v);
    let head: ChainHead = format!("7:{v}").parse().unwrap();
    assert_eq!((head.seq, head.hash), (7, v));
    assert!("7".parse::<ChainHead>().is_err());
    assert!(format!("x:{v}").parse::<ChainHead>().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random logs: the head after a reopen is the head before; verify agrees; every prefix's
    /// pinned head is accepted, a wrong one refused.
    #[test]
    fn the_head_survives_a_reopen_and_pins_every_prefix(ops in 1usize..40, wrong_at in any::<prop::sample::Index>()) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let heads = build(&dir, ops);
        let last = *heads.last().unwrap();
        let clock = ManualClock::at_default_epoch();
        clock.advance_seconds(1000);
        let reopened = Ledger::open_with(&dir, common::fs_options(&clock, common::small_config(0))).unwrap();
        prop_assert_eq!(reopened.chain_head().unwrap(), Some(last));
        drop(reopened);
        let report = check(&dir);
        prop_assert!(report.ok, "{:?}", report.problems);
        prop_assert_eq!(report.chain_head, Some(last));
        for h in &heads {
            let r = check_pinned(&dir, *h).expect_head.unwrap();
            prop_assert!(r.matches, "{}: {}", h, r.message);
        }
        let mut wrong = heads[wrong_at.index(heads.len())];
        wrong.hash.0[0] ^= 1;
        let r = check_pinned(&dir, wrong);
        prop_assert!(!r.ok && !r.expect_head.unwrap().matches);
    }

    /// Any single byte changed in any segment is found: a problem, or (in the last write, which
    /// nothing proves durable) a torn tail, after which the head is no longer the pinned one.
    #[test]
    fn any_flipped_byte_is_detected(ops in 4usize..30, seg_pick in any::<prop::sample::Index>(), at_pick in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let heads = build(&dir, ops);
        let pinned = *heads.last().unwrap();
        let segs = common::segment_files(&dir);
        let path = &segs[seg_pick.index(segs.len())];
        let mut bytes = std::fs::read(path).unwrap();
        // Anywhere among the header and the records (and a little of the zeros after them).
        let records_end = common::records_end(&bytes);
        let at = at_pick.index((records_end + 16).min(bytes.len()));
        bytes[at] ^= xor;
        std::fs::write(path, &bytes).unwrap();
        let report = check(&dir);
        prop_assert!(!report.ok || report.torn_tail.is_some(), "byte {} of {} went unnoticed", at, path.display());
        if at < records_end {
            // A record (or a header) was hit: the pinned history no longer verifies.
            prop_assert!(!check_pinned(&dir, pinned).expect_head.unwrap().matches, "byte {} of {}", at, path.display());
        }
    }

    /// A log cut anywhere in its last segment reads as a torn tail (or a clean end), never as a
    /// chain error; the head is then the last whole record's.
    #[test]
    fn a_cut_is_a_torn_tail_not_a_chain_error(ops in 2usize..30, cut_pick in any::<prop::sample::Index>()) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let heads = build(&dir, ops);
        let last = common::segment_files(&dir).pop().unwrap();
        let bytes = std::fs::read(&last).unwrap();
        let end = common::records_end(&bytes);
        // The first record is never torn (a ledger is created with it durable).
        let first = first_seq_of(&last);
        let keep = if first == 1 { records(&bytes, 1)[0].0 + records(&bytes, 1)[0].1 } else { 0 };
        let cut = keep + cut_pick.index(end + 1 - keep);
        std::fs::write(&last, &bytes[..cut]).unwrap();
        let report = check(&dir);
        prop_assert!(report.ok, "cut at {}: {:?}", cut, report.problems);
        if let Some(head) = report.chain_head {
            prop_assert!(heads.contains(&head), "cut at {}: head {} was never the ledger's", cut, head);
            prop_assert!(check_pinned(&dir, head).expect_head.unwrap().matches);
        }
    }
}

/// A snapshot whose recorded chain value is not the log's at its record (a snapshot of another
/// history, its checksum recomputed) is a problem `verify` names; the untouched one is ok.
#[test]
fn verify_checks_a_snapshots_chain_value_against_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("l");
    build(&dir, 8);
    let clock = ManualClock::at_default_epoch();
    clock.advance_seconds(100);
    let ledger = Ledger::open_with(&dir, common::fs_options(&clock, common::small_config(0))).unwrap();
    let snap = ledger.snapshot().unwrap();
    let head = ledger.chain_head().unwrap().unwrap();
    drop(ledger);
    let report = check(&dir);
    assert!(report.ok, "{:?}", report.problems);
    assert!(report.snapshots.iter().all(|s| s.status == "ok"), "{:?}", report.snapshots);

    let mut bytes = std::fs::read(&snap.path).unwrap();
    let hex = head.hash.to_string();
    let at = bytes.windows(hex.len()).position(|w| w == hex.as_bytes()).expect("the snapshot records the chain value");
    let forged = chain_next(&head.hash, 0, b"another history").to_string();
    bytes[at..at + hex.len()].copy_from_slice(forged.as_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..36]);
    h.update(&bytes[40..]);
    let crc = h.finalize().to_le_bytes();
    bytes[36..40].copy_from_slice(&crc);
    std::fs::write(&snap.path, &bytes).unwrap();

    let report = check(&dir);
    assert!(!report.ok, "a snapshot of another history is a problem");
    let status = &report.snapshots.iter().find(|s| s.seq == snap.seq).unwrap().status;
    assert!(status.contains(&forged) && status.contains(&hex), "{status}");
    assert!(report.problems.iter().any(|p| p.contains("does not belong to this history")), "{:?}", report.problems);
}
