//! Pages of `list` / `list_allocations`, `history` and `log` (docs/queries.md, "Pages"): every
//! allocation exactly once across pages while new ones are written, the same rows as the unpaged
//! list, the filters, and cursors that are refused (malformed, or made for other filters).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::{AllocationState, Config, ListFilter, Micros, Priority};
use allocation_ledger::{Ledger, ManualClock, OpenOptions, RequestOutcome, ResourceRequest};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    bin().arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
}

fn json(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{args:?}: not one JSON document ({e}): {stdout:?}; stderr {}", String::from_utf8_lossy(&o.stderr))
    });
    (o.status.code().unwrap(), v)
}

fn config() -> Config {
    // Few ended allocations in memory: most pages come from the log's index.
    Config {
        worker_slots: 4_000,
        total_cpu_millicores: 8_000_000,
        total_memory_mib: 16_000_000,
        terminal_retained: 50,
        ..Config::default()
    }
}

fn open(dir: &Path, clock: &ManualClock) -> Ledger {
    Ledger::open_with(dir, OpenOptions::default().config(config()).clock(Arc::new(clock.clone()))).unwrap()
}

const TENANTS: [&str; 3] = ["red", "blue", "green"];
const PRIORITIES: [Priority; 4] = [Priority::Low, Priority::Normal, Priority::High, Priority::Critical];

/// `n` allocations, three to a microsecond (ties are ordered by id), of 7 jobs, 3 tenants and 4
/// priorities; every 10th stays active, every 13th is left to expire, the rest are released.
fn write(l: &Ledger, clock: &ManualClock, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        if i % 3 == 0 {
            clock.advance_micros(1_000);
        }
        let req = ResourceRequest::new(format!("job-{}", i % 7))
            .workers(1)
            .tenant(TENANTS[i % 3])
            .priority(PRIORITIES[i % 4])
            .ttl_seconds(if i % 13 == 0 { 60 } else { 86_400 });
        let id = match l.request_resources(&req).unwrap() {
            RequestOutcome::Granted(g) => g.allocation_id.to_string(),
            RequestOutcome::Failed(f) => panic!("{}", f.error),
        };
        if i % 10 != 0 && i % 13 != 0 {
            l.release_resources(&id).unwrap();
        }
        ids.push(id);
    }
    ids
}

fn ids_of(page: &Value) -> Vec<String> {
    page["allocations"].as_array().unwrap().iter().map(|a| a["allocation_id"].as_str().unwrap().to_string()).collect()
}

/// Through the real binary: 10,000 allocations in pages of 777, with 20 new ones written
/// between pages: each of the 10,000 exactly once, in order, and the pages agree with `list`.
#[test]
fn cli_pages_return_every_allocation_exactly_once_while_writes_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let clock = ManualClock::new(Micros::from_micros(chrono::Utc::now().timestamp_micros()) - 86_400_000_000);
    let l = open(d, &clock);
    let ids = write(&l, &clock, 10_000);
    let (_, all) = json(d, &["list"]);
    let all: Vec<String> =
        all.as_array().unwrap().iter().map(|a| a["allocation_id"].as_str().unwrap().into()).collect();
    assert_eq!(all.len(), 10_000);
    assert_eq!(all.iter().collect::<HashSet<_>>(), ids.iter().collect::<HashSet<_>>());

    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["list", "--limit", "777"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c]);
        }
        let (code, page) = json(d, &args);
        assert_eq!(code, 0, "{page}");
        assert_eq!(page["count"].as_u64().unwrap() as usize, ids_of(&page).len());
        assert!(page["count"].as_u64().unwrap() <= 777);
        seen.extend(ids_of(&page));
        pages += 1;
        // New allocations between pages: created after every one listed so far.
        write(&l, &clock, 20);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(page.get("next_cursor").is_some_and(Value::is_null), "next_cursor is null on the last page");
                break;
            }
        }
    }
    let firsts: Vec<&String> = seen.iter().filter(|id| ids.contains(id)).collect();
    assert_eq!(firsts.len(), 10_000, "each of the first 10,000 exactly once");
    assert_eq!(firsts.iter().collect::<HashSet<_>>().len(), 10_000);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len(), "no allocation twice");
    assert_eq!(&seen[..10_000], &all[..], "the pages in the order of the unpaged list");
    assert!(pages >= 13, "{pages} pages");

    // Table output: the cursor on stderr so that a person can go on.
    let o = run(d, &["list", "--limit", "5"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--cursor "), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 6, "a header and 5 rows");
}

#[test]
fn cli_cursor_errors_name_the_field_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let clock = ManualClock::new(Micros::from_micros(1_700_000_000_000_000));
    let l = open(d, &clock);
    write(&l, &clock, 30);
    let seq = l.status().last_seq;
    drop(l);
    let (_, page) = json(d, &["list", "--limit", "2", "--job-id", "job-1"]);
    let c = page["next_cursor"].as_str().unwrap().to_string();
    for (args, field, words) in [
        (vec!["list", "--cursor", "nonsense"], "cursor", "not a cursor"),
        (vec!["list", "--cursor", &c], "cursor", "other filters"),
        (vec!["list", "--cursor", &c, "--job-id", "job-2"], "cursor", "other filters"),
        (vec!["list", "--priority", "urgent"], "priority", "low, normal, high, critical"),
        (vec!["list", "--state", "gone"], "state", "active, released, expired, failed"),
        (vec!["list", "--since", "yesterday"], "since", "RFC 3339"),
        (vec!["list", "--tenant", ""], "tenant", "tenant name"),
        (vec!["list", "--limit", "0"], "limit", "at least 1"),
        (vec!["history", "--job-id", "job-1", "--cursor", &c], "cursor", "not a cursor"),
        (vec!["log", "--limit", "3", "--cursor", &c], "cursor", "not a cursor"),
    ] {
        let o = run(d, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && err.contains(words), "{args:?}: {err}");
    }
    let l = Ledger::open_read_only(d).unwrap();
    assert_eq!(l.status().last_seq, seq, "nothing written");
}

/// `log --limit` and `history --limit` print the cursor of the rest; following it covers every
/// event exactly once.
#[test]
fn cli_log_and_history_cursors_cover_everything_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let clock = ManualClock::new(Micros::from_micros(1_700_000_000_000_000));
    let l = open(d, &clock);
    write(&l, &clock, 40);
    let last_seq = l.status().last_seq;
    drop(l);
    let mut seqs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["log", "--limit", "7"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c]);
        }
        let o = run(d, &args);
        assert!(o.status.success());
        for line in String::from_utf8(o.stdout).unwrap().lines() {
            seqs.push(serde_json::from_str::<Value>(line).unwrap()["seq"].as_u64().unwrap());
        }
        let err = String::from_utf8(o.stderr).unwrap();
        match err.split("--cursor ").nth(1) {
            Some(c) => cursor = Some(c.trim().to_string()),
            None => break,
        }
    }
    assert_eq!(seqs, (1..=last_seq).collect::<Vec<_>>());

    let (_, whole) = json(d, &["history", "--job-id", "job-3"]);
    let all: Vec<u64> = whole["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let mut pages: Vec<Vec<u64>> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["history", "--job-id", "job-3", "--limit", "4"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c]);
        }
        let (code, page) = json(d, &args);
        assert_eq!(code, 0, "{page}");
        pages.push(page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.into()),
            None => break,
        }
    }
    // Most recent first, page by page; each page in log order.
    let joined: Vec<u64> = pages.into_iter().rev().flatten().collect();
    assert_eq!(joined, all);
}

/// The filters of `list_page` against the unpaged list filtered here, page sizes 1 to big.
#[test]
fn filters_match_a_filter_of_the_whole_list() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let clock = ManualClock::new(Micros::from_micros(chrono::Utc::now().timestamp_micros()) - 3_600_000_000);
    let l = open(d, &clock);
    let start = allocation_ledger::Clock::now_micros(&clock);
    let ids = write(&l, &clock, 600);
    let mid = start.saturating_add(100_000);
    clock.advance_micros(120_000_000);
    let all = l.list_allocations(None, None).unwrap();
    let created = |s: &allocation_ledger::AllocationSummary| s.created_at.timestamp_micros();
    let tenant_of = |id: &allocation_ledger::AllocationId| {
        let i = ids.iter().position(|s| *s == id.to_string()).unwrap();
        TENANTS[i % 3]
    };
    let filters = [
        ListFilter::default(),
        ListFilter { state: Some(AllocationState::Active), ..Default::default() },
        ListFilter { state: Some(AllocationState::Expired), ..Default::default() },
        ListFilter { state: Some(AllocationState::Released), job_id: Some("job-3".into()), ..Default::default() },
        ListFilter { tenant: Some("blue".into()), ..Default::default() },
        ListFilter { priority: Some(Priority::High), tenant: Some("red".into()), ..Default::default() },
        ListFilter { since: Some(allocation_ledger::format_micros(mid)), ..Default::default() },
        ListFilter {
            until: Some(allocation_ledger::format_micros(mid)),
            job_id: Some("job-0".into()),
            ..Default::default()
        },
    ];
    for f in &filters {
        let want: Vec<_> = all
            .iter()
            .filter(|s| {
                f.state.is_none_or(|st| s.state == st)
                    && f.job_id.as_deref().is_none_or(|j| s.job_id == j)
                    && f.priority.is_none_or(|p| s.priority == p)
                    && f.tenant.as_deref().is_none_or(|t| tenant_of(&s.allocation_id) == t)
                    && f.since.as_ref().is_none_or(|_| created(s) >= mid.as_micros())
                    && f.until.as_ref().is_none_or(|_| created(s) < mid.as_micros())
            })
            .map(|s| s.allocation_id)
            .collect();
        assert!(!want.is_empty(), "{f:?} matches something");
        for limit in [1, 7, 100, 10_000] {
            let mut got = Vec::new();
            let mut cursor = None;
            loop {
                let page = l.list_page(f, Some(limit), cursor.as_deref()).unwrap();
                assert!(page.count <= limit && page.count == page.allocations.len());
                got.extend(page.allocations.iter().map(|s| s.allocation_id));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(got, want, "{f:?}, pages of {limit}");
        }
        let unpaged = l.list_page(f, None, None).unwrap();
        assert_eq!(unpaged.allocations.iter().map(|s| s.allocation_id).collect::<Vec<_>>(), want);
        assert!(unpaged.next_cursor.is_none());
    }
    // The rows themselves (ages and states as of now) are the unpaged list's.
    assert_eq!(
        l.list_page(&ListFilter::default(), None, None).unwrap().allocations,
        l.list_allocations(None, None).unwrap()
    );
    // `at`: the list as it was, by pages too.
    let at = ListFilter { at: Some(allocation_ledger::format_micros(mid)), ..Default::default() };
    let then = l.list_allocations_at(mid, None, None).unwrap();
    let first = l.list_page(&at, Some(5), None).unwrap();
    let second = l.list_page(&at, Some(5), first.next_cursor.as_deref()).unwrap();
    assert_eq!([first.allocations, second.allocations].concat(), then[..10].to_vec());
    let e = l.list_page(&ListFilter { tenant: Some("red".into()), ..at }, Some(5), None).unwrap_err();
    assert!(e.to_string().contains("tenant"), "{e}");
}
