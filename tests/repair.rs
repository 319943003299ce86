//! `allocation-ledger repair`: a torn or damaged tail is cut after its bytes are copied to
//! `quarantine/`; damage in the middle of the log is refused, listing exactly the events a cut
//! would lose, unless `--force-truncate` is given; damage in the first record is never cut;
//! damaged snapshots and snapshots ahead of the cut log are set aside; a writer's lock is
//! respected. The library's repair is also run with every storage operation failing in turn,
//! then power loss: the cut bytes are always in quarantine before they leave the log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::{Fault, FaultPlan, FaultyStorage, Storage};
use allocation_ledger::{plan_repair, repair, RepairKind, RepairOptions};
use allocation_ledger::{Error, Ledger, LoggedEvent, ManualClock, ResourceRequest};
use common::{small_config, MEM_DIR};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c
}

fn run_repair(dir: &Path, args: &[&str]) -> (i32, Value) {
    let o = bin().arg("--data-dir").arg(dir).args(["--json", "repair"]).args(args).output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    });
    (o.status.code().unwrap(), v)
}

/// A ledger of ~25 events over several segments, with snapshots every 6 events.
fn build(dir: &Path) -> Vec<LoggedEvent> {
    let clock = ManualClock::at_default_epoch();
    let ledger = Ledger::open_with(dir, common::fs_options(&clock, small_config(6))).unwrap();
    fill(&ledger, &clock);
    common::all_events(&ledger)
}

fn fill(ledger: &Ledger, clock: &ManualClock) {
    let mut held = Vec::new();
    for i in 0..16u32 {
        clock.advance_seconds(3);
        let mut meta = serde_json::Map::new();
        meta.insert("pad".into(), "r".repeat(150).into());
        let o = ledger
            .request_resources(
                &ResourceRequest::new(format!("job-{i}")).workers(1 + i % 2).mcp_server("github").metadata(meta),
            )
            .unwrap();
        held.push(o.allocation_id());
        if i % 3 == 2 {
            ledger.release_resources(&held[i as usize - 2].to_string()).unwrap();
        }
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    common::list(&dir.join("wal"))
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0xFF;
    std::fs::write(path, b).unwrap();
}

/// Every file under `dir` with its bytes (to show that a refused repair changed nothing).
fn snapshot_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["wal", "snapshots", "quarantine"] {
        for p in common::list(&dir.join(sub)) {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn reopen_events(dir: &Path) -> Vec<LoggedEvent> {
    let l = Ledger::open(dir).unwrap_or_else(|e| panic!("open after repair: {e}"));
    let events = common::all_events(&l);
    assert_eq!(l.with_state(std::clone::Clone::clone), common::fold(&events));
    // And the repaired ledger takes writes.
    l.request_resources(&ResourceRequest::new("after-repair").mcp_server("github")).unwrap();
    events
}

fn lost_seqs(v: &Value) -> Vec<u64> {
    v["repair"]["plan"]["events_lost"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

#[test]
fn a_clean_ledger_needs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path());
    let before = snapshot_tree(tmp.path());
    let (code, v) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["repair"]["plan"]["kind"], "clean");
    assert_eq!(v["repair"]["applied"], false);
    assert_eq!(v["verify"]["ok"], true);
    assert_eq!(snapshot_tree(tmp.path()), before);
    let o = bin().arg("--data-dir").arg(tmp.path()).arg("repair").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to repair"));
}

#[test]
fn a_torn_tail_is_cut_after_its_bytes_are_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let events = build(tmp.path());
    let last = segments(tmp.path()).pop().unwrap();
    let mut b = std::fs::read(&last).unwrap();
    let len = common::records_end(&b);
    // Half a record, written over the zeros after the records: a plausible header whose
    // payload ends in zeros (the rest of it never landed).
    let mut tail = Vec::new();
    tail.extend_from_slice(&500u32.to_le_bytes());
    tail.extend_from_slice(&(events.len() as u64 + 1).to_le_bytes());
    tail.extend_from_slice(&[0xAB; 40]);
    b.resize(b.len().max(len + 516), 0);
    b[len..len + tail.len()].copy_from_slice(&tail);
    std::fs::write(&last, &b).unwrap();
    let (code, v) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["repair"]["plan"]["kind"], "torn_tail");
    let saved = PathBuf::from(v["repair"]["saved"][0].as_str().unwrap());
    assert_eq!(
        saved,
        tmp.path().join("quarantine").join(format!("{}.torn-at-{len}", last.file_name().unwrap().to_str().unwrap()))
    );
    assert_eq!(std::fs::read(&saved).unwrap(), tail);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len as u64);
    assert_eq!(reopen_events(tmp.path()), events);
}

#[test]
fn damage_in_the_last_write_is_a_torn_tail_cut_without_force_after_its_bytes_are_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let events = build(tmp.path());
    let last = segments(tmp.path()).pop().unwrap();
    let bytes = std::fs::read(&last).unwrap();
    let (start, _, seq) = *common::record_bounds(&bytes).last().unwrap();
    // Nothing written after the last write proves it durable (format version 3): whatever
    // its damage looks like, it is the write a crash may tear, and only it is cut.
    flip(&last, start + 20);
    let ro = Ledger::open_read_only(tmp.path()).unwrap();
    assert_eq!(ro.recovery_report().torn_tail.as_ref().map(|t| t.offset), Some(start));
    assert_eq!(common::all_events(&ro), events[..seq as usize - 1]);
    drop(ro);
    let damaged = std::fs::read(&last).unwrap();
    let (code, v) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 0, "{v}");
    let plan = &v["repair"]["plan"];
    assert_eq!(plan["kind"], "torn_tail");
    assert_eq!(plan["needs_force"], false);
    assert_eq!(plan["cut"]["offset"], start);
    assert_eq!(plan["cut"]["first_lost_seq"], seq);
    assert_eq!(plan["keeps_through_seq"], seq - 1);
    assert!(lost_seqs(&v).is_empty(), "nothing readable is lost: {v}");
    let saved = PathBuf::from(v["repair"]["saved"][0].as_str().unwrap());
    let written = common::records_end(&damaged);
    assert_eq!(std::fs::read(&saved).unwrap(), &damaged[start as usize..written], "the damaged bytes are kept");
    assert_eq!(std::fs::metadata(&last).unwrap().len(), start);
    assert_eq!(v["verify"]["ok"], true);
    assert_eq!(reopen_events(tmp.path()), events[..seq as usize - 1]);
}

#[test]
fn damage_in_the_middle_is_refused_listing_the_events_a_cut_would_lose() {
    let tmp = tempfile::tempdir().unwrap();
    let events = build(tmp.path());
    let segs = segments(tmp.path());
    assert!(segs.len() >= 3);
    // Damage in the second record of the second segment: records after it in that segment and
    // every later segment are readable.
    let bytes = std::fs::read(&segs[1]).unwrap();
    let (start, _, seq) = common::record_bounds(&bytes)[1];
    flip(&segs[1], start + 30);
    let before = snapshot_tree(tmp.path());

    for args in [&[][..], &["--dry-run"][..]] {
        let (code, v) = run_repair(tmp.path(), args);
        assert_eq!(code, 6, "{args:?}: {v}");
        let plan = &v["repair"]["plan"];
        assert_eq!(plan["kind"], "damage_in_the_middle");
        assert_eq!(plan["needs_force"], true);
        assert_eq!(plan["cut"]["file"], segs[1].to_str().unwrap());
        assert_eq!(plan["cut"]["offset"], start);
        assert_eq!(plan["keeps_through_seq"], seq - 1);
        // Exactly the readable events after the damage, each named.
        assert_eq!(lost_seqs(&v), ((seq + 1)..=events.len() as u64).collect::<Vec<_>>(), "{v}");
        for e in plan["events_lost"].as_array().unwrap() {
            let orig = &events[e["seq"].as_u64().unwrap() as usize - 1];
            assert_eq!(e["type"], orig.event.body.type_name());
            assert_eq!(
                e["allocation_id"].as_str().map(str::to_string),
                orig.event.body.allocation_id().map(|a| a.to_string())
            );
        }
        let later: Vec<&str> = segs[2..].iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(plan["segments_set_aside"], serde_json::json!(later));
        assert!(v["repair"]["refused"].as_str().unwrap().contains("--force-truncate"), "{v}");
        assert_eq!(snapshot_tree(tmp.path()), before, "{args:?}: a refused repair changed files");
    }
    // Human output names the events too.
    let o = bin().arg("--data-dir").arg(tmp.path()).arg("repair").output().unwrap();
    assert_eq!(o.status.code(), Some(6));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("events lost by the cut") && text.contains("refused:"), "{text}");
    assert!(text.contains(&events.last().unwrap().event.body.allocation_id().unwrap().to_string()), "{text}");

    // Forced: everything cut is in quarantine first, then the log ends before the damage.
    let later_bytes: Vec<Vec<u8>> = segs[2..].iter().map(|p| std::fs::read(p).unwrap()).collect();
    let damaged = std::fs::read(&segs[1]).unwrap();
    let (code, v) = run_repair(tmp.path(), &["--force-truncate"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["repair"]["applied"], true);
    assert_eq!(v["verify"]["ok"], true, "{v}");
    let q = tmp.path().join("quarantine");
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(
        std::fs::read(q.join(format!("{}.damaged-at-{start}", name(&segs[1])))).unwrap(),
        &damaged[start as usize..]
    );
    for (p, b) in segs[2..].iter().zip(&later_bytes) {
        assert!(!p.exists());
        assert_eq!(&std::fs::read(q.join(format!("{}.after-damage", name(p)))).unwrap(), b);
    }
    // Snapshots past the cut were set aside.
    for s in common::list(&tmp.path().join("snapshots")) {
        let seq_of = allocation_ledger::testing::snapshot::parse_file_name(&name(&s)).unwrap();
        assert!(seq_of < seq, "{s:?} is ahead of the repaired log");
    }
    assert_eq!(reopen_events(tmp.path()), events[..seq as usize - 1]);
}

#[test]
fn a_missing_segment_is_damage_in_the_middle() {
    let tmp = tempfile::tempdir().unwrap();
    let events = build(tmp.path());
    let segs = segments(tmp.path());
    std::fs::remove_file(&segs[1]).unwrap();
    let first_after_gap =
        allocation_ledger::testing::segment::parse_file_name(segs[2].file_name().unwrap().to_str().unwrap()).unwrap();
    let gap_starts =
        allocation_ledger::testing::segment::parse_file_name(segs[1].file_name().unwrap().to_str().unwrap()).unwrap();
    let (code, v) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 6, "{v}");
    assert_eq!(v["repair"]["plan"]["kind"], "damage_in_the_middle");
    assert!(v["repair"]["plan"]["problem"].as_str().unwrap().contains("gap"), "{v}");
    assert_eq!(lost_seqs(&v), (first_after_gap..=events.len() as u64).collect::<Vec<_>>());
    let (code, v) = run_repair(tmp.path(), &["--force-truncate"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(reopen_events(tmp.path()), events[..gap_starts as usize - 1]);
}

#[test]
fn damage_in_the_first_record_is_never_cut() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path());
    let first = segments(tmp.path())[0].clone();
    flip(&first, 64 + 20);
    let before = snapshot_tree(tmp.path());
    for args in [&[][..], &["--force-truncate"][..]] {
        let (code, v) = run_repair(tmp.path(), args);
        assert_eq!(code, 6, "{v}");
        assert!(v["repair"]["refused"].as_str().unwrap().contains("nothing would be left"), "{v}");
        assert_eq!(snapshot_tree(tmp.path()), before);
    }
}

#[test]
fn damaged_snapshots_are_set_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let events = build(tmp.path());
    let snaps = common::list(&tmp.path().join("snapshots"));
    let newest = snaps.last().unwrap();
    flip(newest, 50);
    let (code, v) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["repair"]["plan"]["kind"], "clean");
    let aside = &v["repair"]["plan"]["snapshots_set_aside"][0];
    assert_eq!(aside["file"], newest.to_str().unwrap());
    assert!(aside["reason"].as_str().unwrap().starts_with("damaged"));
    assert!(!newest.exists());
    assert!(tmp
        .path()
        .join("quarantine")
        .join(format!("{}.damaged", newest.file_name().unwrap().to_str().unwrap()))
        .exists());
    assert_eq!(reopen_events(tmp.path()), events);
}

#[test]
fn repair_respects_the_writers_lock() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path());
    let writer = Ledger::open(tmp.path()).unwrap();
    let (code, v) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 5, "{v}");
    assert_eq!(v["error"]["kind"], "locked");
    drop(writer);
    let (code, _) = run_repair(tmp.path(), &[]);
    assert_eq!(code, 0);
}

// ---------------------------------------------------------------------------------------------
// Crash safety of repair itself.

/// A forced repair of damage in the middle, with storage operation N failing, then power
/// loss: whatever the log lost is in quarantine, and repair run again finishes the job.
#[test]
fn a_repair_interrupted_at_any_storage_operation_loses_nothing_it_did_not_save() {
    let base = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let opts = |s: &FaultyStorage| common::mem_options(s, &clock, small_config(6));
    let events = {
        let l = Ledger::open_with(MEM_DIR, opts(&base)).unwrap();
        fill(&l, &clock);
        common::all_events(&l)
    };
    let dir = Path::new(MEM_DIR);
    let wal = dir.join("wal");
    let files = base.files();
    let segs: Vec<PathBuf> = files.keys().filter(|p| p.parent() == Some(&wal)).cloned().collect();
    let (start, _, seq) = common::record_bounds(&files[&segs[1]])[1];
    let mut damaged = files[&segs[1]].clone();
    damaged[start as usize + 30] ^= 0xFF;
    let keep = seq as usize - 1;
    let fresh = || {
        let s = FaultyStorage::new();
        for (p, b) in &files {
            s.create_dir_all(p.parent().unwrap()).unwrap();
            s.put_file(p, if *p == segs[1] { damaged.clone() } else { b.clone() });
        }
        s
    };
    let force = RepairOptions { force_truncate: true, dry_run: false };
    let mut nth = 0;
    loop {
        let s = fresh();
        s.set_plan(Some(FaultPlan { kind: None, nth, fault: Fault::Fail, sticky: false }));
        let result = repair(&s, dir, force);
        let fired = s.faults_fired() > 0;
        s.crash(nth);
        // Every byte that left the log is in quarantine.
        let now = s.files();
        let in_log: usize = now.iter().filter(|(p, _)| p.parent() == Some(&wal)).map(|(_, b)| b.len()).sum();
        let in_quarantine: Vec<&Vec<u8>> =
            now.iter().filter(|(p, _)| p.starts_with(dir.join("quarantine"))).map(|(_, b)| b).collect();
        let cut_tail = &damaged[start as usize..];
        let orig_log: usize = segs.iter().map(|p| if *p == segs[1] { damaged.len() } else { files[p].len() }).sum();
        if in_log < orig_log {
            assert!(
                in_quarantine.iter().any(|b| b.as_slice() == cut_tail),
                "nth {nth}: the cut bytes are not in quarantine"
            );
        }
        for p in &segs[2..] {
            if !now.contains_key(p) {
                assert!(in_quarantine.iter().any(|b| **b == files[p]), "nth {nth}: {p:?} vanished");
            }
        }
        // Open: either still damaged (repair did not get to the cut) or exactly the kept prefix.
        match Ledger::open_with(dir, opts(&s)) {
            // (An open that starts from a snapshot past the damage does not read it; reading
            // the history from the start does.)
            Ok(l) => match l.events(1, usize::MAX) {
                Ok(got) => assert_eq!(got, events[..keep], "nth {nth}"),
                Err(Error::Damaged(_) | Error::Inconsistent { .. }) => {}
                Err(e) => panic!("nth {nth}: {e}"),
            },
            Err(Error::Damaged(_) | Error::Inconsistent { .. }) => {}
            Err(e) => panic!("nth {nth}: {e} (repair said {result:?})"),
        }
        // Repair again, without faults, finishes it.
        let again = repair(&s, dir, force).unwrap_or_else(|e| panic!("nth {nth}: {e}"));
        assert!(again.refused.is_none(), "nth {nth}: {again:?}");
        let l = Ledger::open_with(dir, opts(&s)).unwrap_or_else(|e| panic!("nth {nth}: {e}"));
        assert_eq!(common::all_events(&l), events[..keep], "nth {nth}");
        drop(l);
        if !fired {
            break;
        }
        nth += 1;
    }
    assert!(nth >= 6, "the repair made only {nth} storage operations");
    assert_eq!(plan_repair(&fresh(), dir).unwrap().kind, RepairKind::DamageInTheMiddle);
}
