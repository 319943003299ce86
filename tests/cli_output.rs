//! The CLI's output options through the real binary: `-o table|json|csv`, `--no-headers`,
//! `--json` as an alias of `-o json`, and the `completions` and `man` subcommands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    bin().arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
}

/// stdout of a command that must succeed.
fn stdout(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(o.status.success(), "{args:?}: {:?}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Splits one CSV line (RFC 4180 quoting).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// A ledger with a grant (job `a,b`: a comma to quote, tenant acme), a rejection (job c) and a
/// release (job d, tenant zeta).
fn ledger() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    stdout(d, &["request", "--job-id", "a,b", "--workers", "2", "--metadata", r#"{"tenant":"acme"}"#]);
    let o = run(d, &["request", "--job-id", "c", "--workers", "9"]);
    assert_eq!(o.status.code(), Some(3));
    let g: serde_json::Value = serde_json::from_str(&stdout(
        d,
        &["--json", "request", "--job-id", "d", "--workers", "1", "--metadata", r#"{"tenant":"zeta"}"#],
    ))
    .unwrap();
    stdout(d, &["release", g["allocation_id"].as_str().unwrap()]);
    dir
}

#[test]
fn list_as_table_csv_json_and_without_headers() {
    let dir = ledger();
    let d = dir.path();
    let table = stdout(d, &["list"]);
    assert!(table.starts_with("ALLOCATION"), "{table}");
    assert_eq!(table.lines().count(), 4);
    let bare = stdout(d, &["list", "--no-headers"]);
    assert_eq!(bare.lines().count(), 3, "{bare}");
    assert!(bare.lines().all(|l| l.starts_with("alloc-")), "{bare}");
    assert!(stdout(d, &["list", "-o", "table"]).starts_with("ALLOCATION"));

    let csv = stdout(d, &["list", "-o", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "allocation_id,job_id,state,priority,workers,created_at,age_seconds,is_expired");
    assert_eq!(lines.len(), 4);
    let first = csv_fields(lines[1]);
    assert_eq!(first.len(), 8);
    assert_eq!((first[1].as_str(), first[2].as_str(), first[4].as_str()), ("a,b", "active", "2"));
    assert!(lines[1].contains("\"a,b\""), "a comma is quoted: {}", lines[1]);
    assert_eq!(stdout(d, &["list", "-o", "csv", "--no-headers"]).lines().count(), 3);

    // The same documents but for the ages, which move between runs.
    let doc = |args: &[&str]| {
        let mut v: serde_json::Value = serde_json::from_str(&stdout(d, args)).unwrap();
        for row in v.as_array_mut().unwrap() {
            row.as_object_mut().unwrap().remove("age_seconds");
        }
        v
    };
    let json = doc(&["list", "-o", "json"]);
    assert_eq!(json, doc(&["list", "--json"]), "--json is -o json");
    assert_eq!(json.as_array().unwrap().len(), 3);
    assert_eq!(doc(&["--output", "json", "list"]), json, "a global flag, long form too");
}

#[test]
fn usage_csv_for_billing() {
    let dir = ledger();
    let d = dir.path();
    let csv = stdout(d, &["usage", "--since", "-1h", "-o", "csv"]);
    let lines: Vec<Vec<String>> = csv.lines().map(csv_fields).collect();
    assert_eq!(
        lines[0].join(","),
        "since,until,group_by,group,cpu_seconds,memory_mib_seconds,worker_seconds,allocations,granted,released,expired,rejected,window_seconds"
    );
    let rows = &lines[1..];
    assert_eq!(rows.len(), 3, "one row per job, no total: {csv}");
    assert!(rows.iter().all(|r| r.len() == lines[0].len()));
    let groups: Vec<&str> = rows.iter().map(|r| r[3].as_str()).collect();
    assert_eq!(groups, ["a,b", "c", "d"]);
    assert!(rows.iter().all(|r| r[2] == "job"));
    let a = &rows[0];
    assert!(a[4].parse::<f64>().unwrap() > 0.0, "cpu-seconds are raw numbers: {a:?}");
    assert_eq!((a[7].as_str(), a[8].as_str(), a[11].as_str()), ("1", "1", "0"));
    assert_eq!((rows[1][8].as_str(), rows[1][11].as_str()), ("0", "1"), "c was rejected");
    assert_eq!(rows[2][9], "1", "d was released");

    let by_tenant = stdout(d, &["usage", "--since", "-1h", "--by", "metadata.tenant", "-o", "csv", "--no-headers"]);
    let tenants: Vec<Vec<String>> = by_tenant.lines().map(csv_fields).collect();
    assert!(tenants.iter().all(|r| r[2] == "metadata.tenant"), "{by_tenant}");
    let names: Vec<&str> = tenants.iter().map(|r| r[3].as_str()).collect();
    assert!(names.contains(&"acme") && names.contains(&"zeta"), "{names:?}");

    let table = stdout(d, &["usage", "--since", "-1h"]);
    assert!(table.starts_with("usage from"), "{table}");
    let bare = stdout(d, &["usage", "--since", "-1h", "--no-headers"]);
    assert!(!bare.contains("usage from") && !bare.contains("CPU-S"), "{bare}");
    assert_eq!(bare.lines().count(), 4, "three jobs and the total: {bare}");
}

#[test]
fn log_and_history_as_table_and_csv() {
    let dir = ledger();
    let d = dir.path();
    let ndjson = stdout(d, &["log"]);
    assert_eq!(ndjson.lines().count(), 5, "created, granted, rejected, granted, released");
    assert_eq!(stdout(d, &["log", "-o", "json"]), ndjson);
    let table = stdout(d, &["log", "-o", "table"]);
    assert!(table.starts_with("SEQ"), "{table}");
    assert_eq!(table.lines().count(), 6);
    assert!(table.contains("rejected"), "{table}");
    let csv = stdout(d, &["log", "-o", "csv", "--limit", "2"]);
    let lines: Vec<Vec<String>> = csv.lines().map(csv_fields).collect();
    assert_eq!(lines[0].join(","), "seq,at,ts_us,event,allocation_id,job_id,detail");
    assert_eq!(lines.len(), 3);
    assert_eq!((lines[2][3].as_str(), lines[2][5].as_str()), ("granted", "a,b"));
    let window = stdout(d, &["log", "--since", "-1h", "-o", "csv", "--no-headers"]);
    assert_eq!(window.lines().count(), 5, "the --since path too: {window}");

    let h = stdout(d, &["history", "--job-id", "c", "-o", "csv"]);
    let lines: Vec<Vec<String>> = h.lines().map(csv_fields).collect();
    assert_eq!(lines.len(), 2, "{h}");
    assert_eq!(lines[1][3], "rejected");
    let h = stdout(d, &["history", "--job-id", "c", "--no-headers"]);
    assert!(!h.contains("SEQ") && !h.contains("history of"), "{h}");
    assert_eq!(h.lines().count(), 1);
}

#[test]
fn capacity_and_timeline_csv_and_csv_refused_where_no_table_is_printed() {
    let dir = ledger();
    let d = dir.path();
    let cap = stdout(d, &["capacity", "-o", "csv"]);
    assert_eq!(cap.lines().next(), Some("resource,total,allocated,available"));
    assert!(cap.contains("workers,10,2,8"), "{cap}");
    let tl = stdout(d, &["timeline", "--since", "-1m", "--bucket", "30s", "-o", "csv"]);
    assert!(tl.starts_with("start,end,allocated_cpu"), "{tl}");
    assert!(tl.lines().count() >= 2);

    let events = stdout(d, &["log"]).lines().count();
    let o = run(d, &["request", "--job-id", "e", "--workers", "1", "-o", "csv"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("csv"));
    assert_eq!(stdout(d, &["log"]).lines().count(), events, "refused before the write");
    let o = run(d, &["--json", "-o", "csv", "list"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(d, &["list", "-o", "xml"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn completions_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(dir.path(), &["completions", shell]);
        assert!(script.len() > 1000, "{shell}: {script}");
        assert!(script.contains("allocation-ledger") || script.contains("allocation__ledger"), "{shell}");
        for word in ["request", "timeline", "--data-dir"] {
            assert!(script.contains(word.trim_start_matches('-')), "{shell} lacks {word}");
        }
    }
    assert_eq!(run(dir.path(), &["completions", "tcsh"]).status.code(), Some(2));
    assert!(!dir.path().join("wal").exists(), "nothing was created");
}

#[test]
fn the_man_page_mentions_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let page = stdout(dir.path(), &["man"]);
    assert!(page.starts_with(".ie") || page.contains(".TH"), "roff: {}", &page[..200.min(page.len())]);
    let text = page.replace("\\-", "-");
    // Every subcommand `--help` lists (so a new one is checked without editing this test).
    let help = stdout(dir.path(), &["--help"]);
    let names: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    for name in names {
        assert!(text.contains(&format!("allocation-ledger-{name}")), "the man page lacks {name}");
    }
    assert!(text.contains("--data-dir") && text.contains("--no-headers"), "global options are documented");
}

/// `allocation-ledger ... | head` ends the way any Unix tool does (SIGPIPE), not with Rust's
/// "failed printing to stdout" panic (exit 101).
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut child = bin().args(["completions", "bash"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The reader is gone before the first write.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(SIGPIPE), "{:?} {stderr}", out.status);
}

/// Linux's SIGPIPE.
const SIGPIPE: i32 = 13;
