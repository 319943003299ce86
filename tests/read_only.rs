//! Read-only never writes: every query command (`capacity`, `capacity --at`, `get`, `list` and
//! its filters, `list --at`, `log` and `log --since/--until`, `history`, `usage`, `timeline`),
//! `verify` and `repair --dry-run` leave the data directory exactly as they found it: no cut,
//! no quarantine, no new ledger, no snapshot, no rewrite. The whole tree is compared before and
//! after each command (every directory, every file's relative path, length, contents and
//! modification time; the root directory's existence), in human and `--json` mode, on:
//!
//! 1. a healthy ledger (grants, a rejection, a release, an expiry, a snapshot);
//! 2. a ledger whose last record is torn: queries answer from the records before it and say on
//!    stderr that a torn tail awaits the next writer, which (a `request`) then does cut it;
//! 3. a ledger with a flipped byte in a record in the middle of the log (after the snapshot,
//!    so every open reads it; and, separately, before it, where only full reads meet it);
//! 4. a ledger whose first record is zeroed (one segment, and several): exit 6, no new ledger;
//! 5. a ledger with another ledger's snapshot in `snapshots/` (a newer name, and the same name);
//! 6. an empty directory and a missing one: every read fails with exit 4 naming the directory,
//!    nothing created.
//!
//! Each case also shows that the comparison would have seen a write: a writer run at the end
//! changes the tree (or, where the ledger refuses writers too, refuses without writing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;
mod mcp_common;

use allocation_ledger::{format_micros, Micros};
use allocation_ledger::{Config, Ledger, LoggedEvent, ManualClock, OpenOptions, Priority, ResourceRequest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::SystemTime;

// ---------------------------------------------------------------------------------------------
// The whole tree of a directory.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Other,
}

/// Everything under a directory: each entry by relative path ("" is the directory itself),
/// with its kind and contents, and separately each entry's modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tree {
    exists: bool,
    nodes: BTreeMap<PathBuf, Node>,
    mtimes: BTreeMap<PathBuf, Option<SystemTime>>,
}

impl Tree {
    fn of(root: &Path) -> Tree {
        let mut t = Tree { exists: root.symlink_metadata().is_ok(), nodes: BTreeMap::new(), mtimes: BTreeMap::new() };
        if t.exists {
            walk(root, Path::new(""), &mut t);
        }
        t
    }

    /// A digest of the contents (for messages): relative path, kind, length and bytes of all.
    fn digest(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(&[u8::from(self.exists)]);
        for (p, n) in &self.nodes {
            h.update(p.to_string_lossy().as_bytes());
            h.update(&[0]);
            match n {
                Node::Dir => h.update(b"d"),
                Node::File(b) => {
                    h.update(b"f");
                    h.update(&(b.len() as u64).to_le_bytes());
                    h.update(b);
                }
                Node::Symlink(to) => {
                    h.update(b"l");
                    h.update(to.to_string_lossy().as_bytes());
                }
                Node::Other => h.update(b"o"),
            }
        }
        format!("{:08x} ({} entries)", h.finalize(), self.nodes.len())
    }

    /// What changed from `self` to `after` (empty when nothing did).
    fn diff(&self, after: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        if self.exists != after.exists {
            out.push(format!("the directory {}", if after.exists { "was created" } else { "was removed" }));
        }
        for (p, n) in &self.nodes {
            match after.nodes.get(p) {
                None => out.push(format!("removed: {}", show(p))),
                Some(m) if m != n => out.push(format!("changed: {} ({} -> {})", show(p), describe(n), describe(m))),
                Some(_) => {}
            }
        }
        for (p, n) in &after.nodes {
            if !self.nodes.contains_key(p) {
                out.push(format!("created: {} ({})", show(p), describe(n)));
            }
        }
        if out.is_empty() {
            for (p, t) in &self.mtimes {
                if let Some(u) = after.mtimes.get(p) {
                    if u != t {
                        out.push(format!(
                            "same bytes but modified (mtime {t:?} -> {u:?}): {} (rewritten, or an entry created \
                             and removed in it)",
                            show(p)
                        ));
                    }
                }
            }
        }
        out
    }
}

fn walk(root: &Path, rel: &Path, t: &mut Tree) {
    let path = root.join(rel);
    let meta = path.symlink_metadata().unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    t.mtimes.insert(rel.to_path_buf(), meta.modified().ok());
    let ft = meta.file_type();
    if ft.is_dir() {
        t.nodes.insert(rel.to_path_buf(), Node::Dir);
        let mut names: Vec<_> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for name in names {
            walk(root, &rel.join(name), t);
        }
    } else if ft.is_file() {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, meta.len(), "{} changed while it was read", path.display());
        t.nodes.insert(rel.to_path_buf(), Node::File(bytes));
    } else if ft.is_symlink() {
        t.nodes.insert(rel.to_path_buf(), Node::Symlink(std::fs::read_link(&path).unwrap()));
    } else {
        t.nodes.insert(rel.to_path_buf(), Node::Other);
    }
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "<data dir>".into()
    } else {
        p.display().to_string()
    }
}

fn describe(n: &Node) -> String {
    match n {
        Node::Dir => "directory".into(),
        Node::File(b) => format!("{} bytes, crc {:08x}", b.len(), crc32fast::hash(b)),
        Node::Symlink(to) => format!("symlink to {}", to.display()),
        Node::Other => "special file".into(),
    }
}

#[test]
fn the_tree_comparison_sees_every_kind_of_change() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    let absent = Tree::of(&d);
    std::fs::create_dir(&d).unwrap();
    let empty = Tree::of(&d);
    assert!(!absent.diff(&empty).is_empty(), "creating the directory");
    std::fs::create_dir(d.join("quarantine")).unwrap();
    let with_dir = Tree::of(&d);
    assert!(empty.diff(&with_dir).iter().any(|c| c.contains("created: quarantine")), "{:?}", empty.diff(&with_dir));
    std::fs::write(d.join("f"), b"abcd").unwrap();
    let a = Tree::of(&d);
    std::fs::write(d.join("f"), b"abce").unwrap();
    let b = Tree::of(&d);
    assert!(a.diff(&b).iter().any(|c| c.starts_with("changed: f")), "same length, other bytes");
    assert_ne!(a.digest(), b.digest());
    std::fs::write(d.join("f"), b"abce").unwrap();
    // What a rewrite does to the modification time, set rather than waited for.
    set_modified(&d.join("f"), 1_000);
    let c = Tree::of(&d);
    assert!(b.diff(&c).iter().any(|c| c.contains("same bytes but modified")), "a rewrite with the same bytes");
    std::fs::write(d.join("quarantine").join("tmp"), b"").unwrap();
    std::fs::remove_file(d.join("quarantine").join("tmp")).unwrap();
    set_modified(&d.join("quarantine"), 2_000);
    let e = Tree::of(&d);
    assert!(c.diff(&e).iter().any(|c| c.contains("quarantine")), "an entry created and removed: {:?}", c.diff(&e));
    assert!(e.diff(&Tree::of(&d)).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Running the binary.

struct Run {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "`allocation-ledger --data-dir DIR {}` exited {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args.join(" "),
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    fn json(&self) -> bool {
        self.args.first().is_some_and(|a| a == "--json")
    }

    /// The command after the global flags.
    fn command(&self) -> &[String] {
        if self.json() {
            &self.args[1..]
        } else {
            &self.args
        }
    }

    fn name(&self) -> &str {
        &self.command()[0]
    }

    fn doc(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e})\n{}", self.show()))
    }

    /// The text that names an error: stderr in human mode, the JSON error on stdout with --json.
    fn error_text(&self) -> String {
        if self.json() {
            self.stdout.clone()
        } else {
            self.stderr.clone()
        }
    }
}

fn run(dir: &Path, args: &[String]) -> Run {
    let o =
        mcp_common::bin().arg("--data-dir").arg(dir).args(args).stdin(Stdio::null()).output().expect("the binary runs");
    Run {
        args: args.to_vec(),
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(std::string::ToString::to_string).collect()
}

/// What the query commands are asked about.
struct Subject {
    /// An allocation that exists in every readable variant of the ledger.
    id: String,
    job: String,
    /// An instant inside the ledger's history (for `--at`).
    at: String,
    since: String,
    until: String,
    /// Where `timeline --svg` writes its chart: outside the data directory.
    svg: PathBuf,
}

/// Every read-only command, each in human and `--json` mode.
fn read_only_commands(s: &Subject) -> Vec<Vec<String>> {
    let svg = s.svg.display().to_string();
    let commands = vec![
        strs(&["capacity"]),
        strs(&["capacity", "--at", &s.at]),
        strs(&["get", &s.id]),
        strs(&["list"]),
        strs(&["list", "--state", "active"]),
        strs(&["list", "--job-id", &s.job]),
        strs(&["list", "--at", &s.at]),
        strs(&["list", "--at", &s.at, "--state", "active"]),
        strs(&["log"]),
        strs(&["log", "--from-seq", "2", "--limit", "3"]),
        strs(&["log", "--since", &s.since, "--until", &s.until]),
        strs(&["history", "--allocation", &s.id]),
        strs(&["history", "--job-id", &s.job]),
        strs(&["usage", "--since", &s.since, "--until", &s.until]),
        strs(&["usage", "--since", &s.since, "--until", &s.until, "--by", "metadata.tenant"]),
        strs(&["timeline", "--since", &s.since, "--until", &s.until, "--bucket", "10m"]),
        strs(&["timeline", "--since", &s.since, "--until", &s.until, "--bucket", "10m", "--svg", &svg]),
        strs(&["verify"]),
        strs(&["repair", "--dry-run"]),
    ];
    let mut out = Vec::new();
    for c in commands {
        let mut j = vec!["--json".to_string()];
        j.extend(c.iter().cloned());
        out.push(c);
        out.push(j);
    }
    out
}

/// Runs every command on `dir`, checking after each that the tree is exactly as before, and
/// `expect` on its outcome; collects every failure, then panics with all of them.
fn check_all(
    case: &str,
    dir: &Path,
    commands: &[Vec<String>],
    mut expect: impl FnMut(&Run) -> Vec<String>,
) -> Vec<Run> {
    let start = Tree::of(dir);
    let mut failures = Vec::new();
    let mut runs = Vec::new();
    for args in commands {
        let before = Tree::of(dir);
        let r = run(dir, args);
        let after = Tree::of(dir);
        let changes = before.diff(&after);
        if !changes.is_empty() {
            failures.push(format!(
                "[{case}] a read-only command changed the data directory (tree {} -> {}):\n  {}\n{}",
                before.digest(),
                after.digest(),
                changes.join("\n  "),
                r.show()
            ));
        }
        if r.code == 101 || r.stderr.contains("panicked") {
            failures.push(format!("[{case}] the command panicked\n{}", r.show()));
        }
        for problem in expect(&r) {
            failures.push(format!("[{case}] {problem}\n{}", r.show()));
        }
        runs.push(r);
    }
    let codes: Vec<String> = runs.iter().map(|r| format!("{:>3}  {}", r.code, r.args.join(" "))).collect();
    eprintln!("[{case}] exit codes (tree {}):\n  {}", start.digest(), codes.join("\n  "));
    let end = Tree::of(dir);
    let changes = start.diff(&end);
    if !changes.is_empty() {
        failures.push(format!("[{case}] the data directory changed over the run:\n  {}", changes.join("\n  ")));
    }
    assert!(failures.is_empty(), "{} failure(s):\n\n{}", failures.len(), failures.join("\n\n"));
    runs
}

/// A check that records a problem instead of panicking (so one run reports them all).
macro_rules! want {
    ($problems:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            $problems.push(format!($($msg)+));
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The ledgers.

struct Built {
    events: Vec<LoggedEvent>,
    /// job id -> allocation id
    ids: BTreeMap<String, String>,
    snapshot_seq: u64,
}

impl Built {
    fn ts(&self, seq: u64) -> Micros {
        self.events[seq as usize - 1].event.ts_us
    }

    fn subject(&self, svg_dir: &Path) -> Subject {
        Subject {
            id: self.ids["job-a"].clone(),
            job: "job-a".into(),
            // Right after job-c's grant: a, b and c hold 6 workers.
            at: format_micros(self.ts(4)),
            since: format_micros(self.ts(1)),
            until: format_micros(self.ts(self.events.len() as u64) + 600_000_000),
            svg: svg_dir.join("chart.svg"),
        }
    }
}

fn meta(tenant: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("tenant".into(), tenant.into());
    // Enough bytes that 4 KiB segments rotate a few times.
    m.insert("pad".into(), "x".repeat(420).into());
    m
}

/// The healthy ledger, built with the library and dropped:
///
/// | seq | event |
/// |---:|---|
/// | 1 | ledger_created |
/// | 2 | granted job-a (3 workers, github) |
/// | 3 | granted job-b (2 workers, ttl 60 s) |
/// | 4 | granted job-c (1 worker) |
/// | 5 | rejected job-big (9 workers) |
/// | 6 | released job-a |
/// | 7 | expired job-b (cleanup_expired after 120 s) |
/// |   | snapshot at 7 |
/// | 8 | granted job-d (2 workers) |
/// | 9 | granted job-e (1 worker) |
/// | 10 | released job-c |
/// | 11 | granted job-f (1 worker): the last record |
///
/// The clock starts an hour before the real now (the binary reads with the system clock), and
/// the live grants have a day to run, so nothing is past its deadline when the binary reads.
fn build(dir: &Path, segment_size_bytes: u64) -> Built {
    let start = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_micros() as i64 - 3_600_000_000;
    let clock = ManualClock::new(Micros::from_micros(start));
    let config = Config { segment_size_bytes, snapshot_every: 1_000_000, ..Default::default() };
    let ledger = Ledger::open_with(dir, OpenOptions::default().config(config).clock(Arc::new(clock.clone()))).unwrap();
    let mut ids = BTreeMap::new();
    let grant = |ledger: &Ledger,
                 ids: &mut BTreeMap<String, String>,
                 job: &str,
                 workers: u32,
                 ttl: u64,
                 tenant: &str,
                 mcp: Option<&str>| {
        clock.advance_seconds(5);
        let mut req = ResourceRequest::new(job)
            .workers(workers)
            .ttl_seconds(ttl)
            .priority(Priority::Normal)
            .metadata(meta(tenant));
        if let Some(m) = mcp {
            req = req.mcp_server(m);
        }
        let o = ledger.request_resources(&req).unwrap();
        ids.insert(job.to_string(), o.allocation_id().to_string());
        o.is_granted()
    };
    assert!(grant(&ledger, &mut ids, "job-a", 3, 86_400, "red", Some("github")));
    assert!(grant(&ledger, &mut ids, "job-b", 2, 60, "blue", None));
    assert!(grant(&ledger, &mut ids, "job-c", 1, 86_400, "red", None));
    assert!(!grant(&ledger, &mut ids, "job-big", 9, 86_400, "green", None), "job-big is rejected");
    clock.advance_seconds(5);
    assert_eq!(ledger.release_resources(&ids["job-a"]).unwrap().status, "released");
    clock.advance_seconds(120);
    assert_eq!(ledger.cleanup_expired().unwrap().count, 1, "job-b expires");
    let snap = ledger.snapshot().unwrap();
    assert!(grant(&ledger, &mut ids, "job-d", 2, 86_400, "blue", Some("slack")));
    assert!(grant(&ledger, &mut ids, "job-e", 1, 86_400, "red", None));
    clock.advance_seconds(5);
    assert_eq!(ledger.release_resources(&ids["job-c"]).unwrap().status, "released");
    assert!(grant(&ledger, &mut ids, "job-f", 1, 86_400, "blue", None));
    let events = common::all_events(&ledger);
    drop(ledger);
    assert_eq!(events.len(), 11, "{events:#?}");
    assert_eq!(snap.seq, 7);
    // Nothing newer than that snapshot (a snapshot of the last record would be ahead of a log
    // whose last record is torn).
    let snaps = common::list(&dir.join("snapshots"));
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    Built { events, ids, snapshot_seq: snap.seq }
}

/// The record with sequence number `seq`: its segment and its (start, end) offsets.
fn find_record(dir: &Path, seq: u64) -> (PathBuf, u64, u64) {
    for seg in common::segment_files(dir) {
        let bytes = std::fs::read(&seg).unwrap();
        if let Some(&(start, end, _)) = common::record_bounds(&bytes).iter().find(|b| b.2 == seq) {
            return (seg, start, end);
        }
    }
    panic!("record {seq} not found in {}", dir.display())
}

fn zero(path: &Path, range: std::ops::Range<usize>) {
    let mut b = std::fs::read(path).unwrap();
    b[range].fill(0);
    std::fs::write(path, b).unwrap();
}

fn log_lines(r: &Run) -> Vec<Value> {
    r.stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l:?}\n{}", r.show()))
        })
        .collect()
}

/// Checks that answers of a query on a readable ledger hold what the log up to `last_seq` says.
fn check_answer(r: &Run, b: &Built, last_seq: u64, problems: &mut Vec<String>) {
    // Whether job-f (seq 11) is in the history read.
    let has_f = last_seq >= 11;
    let allocated = if has_f { 4 } else { 3 };
    let cmd = r.command();
    let json = r.json();
    match (cmd[0].as_str(), cmd.get(1).map(String::as_str)) {
        ("capacity", None) if json => {
            let v = r.doc();
            want!(problems, v["seq"] == last_seq, "capacity: seq {} expected {last_seq}", v["seq"]);
            want!(
                problems,
                v["allocated_workers"] == allocated,
                "capacity: allocated_workers {}",
                v["allocated_workers"]
            );
            want!(problems, v["total_workers"] == 10, "capacity: total_workers {}", v["total_workers"]);
        }
        ("capacity", None) => want!(problems, r.stdout.contains("as of:"), "capacity: no table"),
        ("capacity", Some("--at")) if json => {
            let v = r.doc();
            want!(problems, v["seq"] == 4 && v["allocated_workers"] == 6, "capacity --at: {v}");
        }
        ("get", _) if json => {
            let v = r.doc();
            want!(problems, v["allocation_id"] == b.ids["job-a"].as_str(), "get: {v}");
            want!(problems, v["state"] == "released", "get: state {}", v["state"]);
        }
        ("list", None) if json => {
            let doc = r.doc();
            let ids: Vec<&str> =
                doc.as_array().map_or(vec![], |a| a.iter().filter_map(|x| x["allocation_id"].as_str()).collect());
            for job in ["job-a", "job-b", "job-c", "job-d", "job-e"] {
                want!(problems, ids.contains(&b.ids[job].as_str()), "list: {job} missing from {ids:?}");
            }
            want!(problems, ids.contains(&b.ids["job-f"].as_str()) == has_f, "list: job-f listed: {}", !has_f);
        }
        ("list", Some("--state")) if json => {
            let mut ids: Vec<String> = r
                .doc()
                .as_array()
                .map_or(vec![], |a| a.iter().filter_map(|x| x["allocation_id"].as_str().map(str::to_string)).collect());
            ids.sort();
            let mut expected: Vec<String> = ["job-d", "job-e", "job-f"]
                .iter()
                .filter(|j| has_f || **j != "job-f")
                .map(|j| b.ids[*j].clone())
                .collect();
            expected.sort();
            want!(problems, ids == expected, "list --state active: {ids:?}, expected {expected:?}");
        }
        ("list", Some("--at")) if json => {
            // job-a, job-b and job-c, all active then (with or without --state active).
            let n = r.doc().as_array().map_or(0, std::vec::Vec::len);
            want!(problems, n == 3, "list --at: {n} rows, expected 3");
        }
        ("log", None) => {
            let lines = log_lines(r);
            want!(problems, lines.len() as u64 == last_seq, "log: {} events, expected {last_seq}", lines.len());
            for (l, e) in lines.iter().zip(&b.events) {
                // The NDJSON line is the event plus `at`, its timestamp as RFC 3339.
                let mut want = serde_json::to_value(e).unwrap();
                want["at"] = allocation_ledger::format_micros(e.event.ts_us).into();
                want!(problems, *l == want, "log: event {} differs: {l}", e.seq);
            }
        }
        ("log", Some("--from-seq")) => {
            let seqs: Vec<u64> = log_lines(r).iter().filter_map(|l| l["seq"].as_u64()).collect();
            want!(problems, seqs == [2, 3, 4], "log --from-seq 2 --limit 3: {seqs:?}");
        }
        ("log", Some("--since")) => {
            let n = log_lines(r).len() as u64;
            want!(problems, n == last_seq, "log --since/--until: {n} events, expected {last_seq}");
        }
        ("history", Some("--allocation")) if json => {
            let v = r.doc();
            let types: Vec<&str> =
                v["events"].as_array().map_or(vec![], |a| a.iter().filter_map(|e| e["type"].as_str()).collect());
            want!(problems, types == ["granted", "released"], "history: {types:?} in {v}");
        }
        ("verify", _) if json => {
            let v = r.doc();
            want!(problems, v["ok"] == true, "verify: not ok: {v}");
            want!(problems, v["last_seq"] == last_seq, "verify: last_seq {} expected {last_seq}", v["last_seq"]);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A healthy ledger.

#[test]
fn a_healthy_ledger_is_left_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = build(d, 4096);
    assert!(common::segment_files(d).len() >= 3, "several segments: {:?}", common::segment_files(d));
    // The id for `get`, from `list --json`, as a user would find it.
    let list = run(d, &strs(&["--json", "list", "--job-id", "job-a"]));
    assert_eq!(list.code, 0, "{}", list.show());
    let id = list.doc()[0]["allocation_id"].as_str().expect("an allocation id").to_string();
    assert_eq!(id, b.ids["job-a"]);
    let s = b.subject(out.path());
    check_all("healthy", d, &read_only_commands(&s), |r| {
        let mut p = Vec::new();
        want!(p, r.code == 0, "expected exit 0");
        want!(p, !r.stderr.contains("error") && !r.stderr.contains("note:"), "unexpected stderr");
        if r.code == 0 {
            check_answer(r, &b, 11, &mut p);
        }
        if r.name() == "repair" && r.json() {
            let v = r.doc();
            want!(p, v["repair"]["plan"]["kind"] == "clean" && v["repair"]["applied"] == false, "repair: {v}");
        }
        p
    });
    assert!(s.svg.exists(), "timeline --svg wrote its chart (outside the data directory)");

    // The comparison sees a write: a grant writes over the pre-filled zeros (the file keeps
    // its length, its bytes change).
    let before = Tree::of(d);
    let r = run(d, &strs(&["--json", "request", "--job-id", "after", "--workers", "1"]));
    assert_eq!(r.code, 0, "{}", r.show());
    let changes = before.diff(&Tree::of(d));
    let last = common::segment_files(d).pop().unwrap();
    let name = last.file_name().unwrap().to_str().unwrap().to_string();
    assert!(changes.iter().any(|c| c.contains(&name)), "{changes:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. A torn last record.

#[test]
fn a_torn_tail_is_left_for_the_next_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = build(d, 4096);
    // The last record (job-f's grant), its final bytes never landed: the second half of its
    // payload is zeros, as a write interrupted by power loss leaves a pre-filled segment.
    let (seg, start, end) = find_record(d, 11);
    assert_eq!(seg, common::segment_files(d).pop().unwrap(), "the last record is in the last segment");
    let cut_from = (start + 16 + (end - start - 16) / 2) as usize;
    zero(&seg, cut_from..end as usize);
    let seg_name = seg.file_name().unwrap().to_str().unwrap().to_string();
    let s = b.subject(out.path());
    check_all("torn tail", d, &read_only_commands(&s), |r| {
        let mut p = Vec::new();
        want!(p, r.code == 0, "expected exit 0");
        match r.name() {
            "verify" => {
                if r.json() {
                    let v = r.doc();
                    want!(p, !v["torn_tail"].is_null(), "verify --json: no torn_tail in {v}");
                } else {
                    want!(p, r.stdout.contains("note:"), "verify: no torn-tail note on stdout");
                }
            }
            "repair" => {
                if r.json() {
                    let v = r.doc();
                    want!(p, v["repair"]["plan"]["kind"] == "torn_tail", "repair --dry-run: {v}");
                    want!(p, v["repair"]["applied"] == false, "repair --dry-run applied: {v}");
                } else {
                    want!(p, r.stdout.contains("dry run: nothing changed"), "repair --dry-run: no dry-run line");
                }
            }
            _ => {
                want!(
                    p,
                    r.stderr.contains("incomplete record")
                        && r.stderr.contains(&format!("offset {start} of"))
                        && r.stderr.contains(&seg_name)
                        && r.stderr.contains("the next read-write open cuts it"),
                    "no note on stderr that a torn tail at offset {start} of {seg_name} awaits the next writer"
                );
            }
        }
        if r.code == 0 {
            check_answer(r, &b, 10, &mut p);
        }
        p
    });

    // The torn tail was real: the next writer cuts it, saving the bytes in quarantine/.
    assert!(!d.join("quarantine").exists());
    let r = run(d, &strs(&["--json", "request", "--job-id", "after", "--workers", "1"]));
    assert_eq!(r.code, 0, "{}", r.show());
    assert!(r.stderr.contains("recovered: cut an incomplete final record"), "{}", r.show());
    let saved = d.join("quarantine").join(format!("{seg_name}.torn-at-{start}"));
    assert!(saved.exists(), "{:?}\n{}", common::list(&d.join("quarantine")), r.show());
    let log = run(d, &strs(&["log"]));
    let seqs: Vec<u64> = log_lines(&log).iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>(), "the new grant took sequence number 11");
    let last = log_lines(&log).pop().unwrap();
    assert_eq!(last["job_id"], "after", "{last}");
}

// ---------------------------------------------------------------------------------------------
// 3. A damaged record in the middle of the log.

/// Whether `text` names the damage: the segment's path and the record's offset.
fn names(text: &str, seg: &Path, offset: u64) -> bool {
    text.contains(&seg.display().to_string()) && text.contains(&format!("offset {offset}"))
}

fn check_damaged(case: &str, d: &Path, s: &Subject, seg: &Path, offset: u64, every_open_reads_it: bool) {
    let needle = format!("{} and offset {offset}", seg.display());
    check_all(case, d, &read_only_commands(s), |r| {
        let mut p = Vec::new();
        let full_read = matches!(r.name(), "log" | "verify" | "repair")
            && !(r.name() == "log" && r.command().iter().any(|a| a == "--from-seq" || a == "--since"));
        if every_open_reads_it || full_read {
            want!(p, r.code == 6, "expected exit 6 (damaged)");
        } else {
            want!(p, r.code == 0 || r.code == 6, "expected exit 0 or 6");
        }
        if r.code == 6 {
            let text = match r.name() {
                "verify" | "repair" => r.stdout.clone(),
                _ => r.error_text(),
            };
            want!(p, names(&text, seg, offset), "the damage is not named: {needle}");
        }
        p
    });
}

#[test]
fn a_damaged_record_in_the_middle_of_the_log_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = build(d, 4096);
    // Record 9 (job-e's grant): after the snapshot (every open replays it), not the last.
    let (seg, start, end) = find_record(d, 9);
    assert!(b.snapshot_seq < 9);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[((start + end) / 2) as usize] ^= 0x04;
    std::fs::write(&seg, bytes).unwrap();
    let s = b.subject(out.path());
    check_damaged("damaged middle record", d, &s, &seg, start, true);

    // A writer refuses too; `repair` (not a dry run) refuses without --force-truncate and
    // changes nothing; with it, it cuts: the tree comparison would have seen that.
    let before = Tree::of(d);
    let r = run(d, &strs(&["--json", "request", "--job-id", "after", "--workers", "1"]));
    assert_eq!(r.code, 6, "{}", r.show());
    let r = run(d, &strs(&["--json", "repair"]));
    assert_eq!(r.code, 6, "{}", r.show());
    let changes = before.diff(&Tree::of(d));
    assert!(changes.iter().all(|c| c.contains("LOCK")), "a refused write changed the data directory: {changes:?}");
    let r = run(d, &strs(&["--json", "repair", "--force-truncate"]));
    assert_eq!(r.code, 0, "{}", r.show());
    assert!(d.join("quarantine").exists() && !common::list(&d.join("quarantine")).is_empty(), "{}", r.show());
    assert!(!before.diff(&Tree::of(d)).is_empty());
}

#[test]
fn a_damaged_record_the_snapshot_covers_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = build(d, 4096);
    // Record 3 (job-b's grant): before the snapshot. Opening from the snapshot does not read
    // it; reading the whole log (log, verify, repair) does.
    let (seg, start, end) = find_record(d, 3);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[((start + end) / 2) as usize] ^= 0x04;
    std::fs::write(&seg, bytes).unwrap();
    let s = b.subject(out.path());
    check_damaged("damaged record under the snapshot", d, &s, &seg, start, false);
}

// ---------------------------------------------------------------------------------------------
// 4. A zeroed first record.

/// The first record (ledger_created) zeroed from its start to the end of its sector (bytes
/// 32..512: a segment's first write starts right after its header), later records present.
fn check_first_record_zeroed(case: &str, segment_size: u64, keep_snapshot: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = build(d, segment_size);
    if !keep_snapshot {
        // Snapshots are derived data: without one, every open reads the log from record 1.
        for snap in common::list(&d.join("snapshots")) {
            std::fs::remove_file(snap).unwrap();
        }
    }
    let first = common::segment_files(d)[0].clone();
    let bounds = common::record_bounds(&std::fs::read(&first).unwrap());
    let (start, _, seq) = bounds[0];
    assert_eq!(seq, 1);
    let sector_end = (start + 1).next_multiple_of(512);
    assert!(
        bounds.len() >= 2 && bounds[1].0 >= sector_end,
        "{case}: later records follow the zeroed sector: {bounds:?}"
    );
    zero(&first, start as usize..sector_end as usize);
    let s = b.subject(out.path());
    check_all(case, d, &read_only_commands(&s), |r| {
        let mut p = Vec::new();
        // Even under a snapshot: every open reads the first record, to check that the
        // snapshot belongs to this ledger (docs/format.md).
        want!(p, r.code == 6, "expected exit 6 (damaged)");
        want!(p, !r.stderr.contains("no ledger") && !r.stderr.contains("created"), "a new ledger, or a preview of one");
        if r.code == 6 {
            let text = format!("{}{}", r.stdout, r.stderr);
            want!(p, names(&text, &first, start), "the damage is not named as offset {start} of {}", first.display());
        }
        p
    });
    // A writer refuses it too, and cuts nothing, creates nothing (docs/format.md: "a log
    // without a whole first record is damaged, not a new ledger").
    {
        let before = Tree::of(d);
        let r = run(d, &strs(&["--json", "request", "--job-id", "after", "--workers", "1"]));
        assert_eq!(r.code, 6, "{case}: {}", r.show());
        let changes = before.diff(&Tree::of(d));
        assert!(changes.is_empty(), "{case}: a refused writer changed the tree: {changes:?}");
    }
}

#[test]
fn a_zeroed_first_record_in_the_only_segment_is_refused_and_nothing_is_created() {
    // The zeroed sector reads like a torn write in the last segment, but a log without its
    // first record is damage, never a torn tail to cut or a new ledger to create.
    check_first_record_zeroed("zeroed first record, one segment", 1 << 20, false);
}

#[test]
fn a_zeroed_first_record_before_later_segments_is_refused_and_nothing_is_created() {
    check_first_record_zeroed("zeroed first record, several segments", 4096, false);
}

#[test]
fn a_zeroed_first_record_under_a_snapshot_is_left_alone() {
    check_first_record_zeroed("zeroed first record under a snapshot, one segment", 1 << 20, true);
    check_first_record_zeroed("zeroed first record under a snapshot, several segments", 4096, true);
}

// ---------------------------------------------------------------------------------------------
// 5. Another ledger's snapshot.

fn check_foreign_snapshot(case: &str, same_name: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = build(d, 4096);
    // The other ledger: the same history (so its snapshot is at the same sequence number),
    // then, for a newer name, a snapshot after one more record.
    build(other.path(), 4096);
    if !same_name {
        let l = Ledger::open(other.path()).unwrap();
        l.request_resources(&ResourceRequest::new("other").workers(1)).unwrap();
        l.request_resources(&ResourceRequest::new("other-2").workers(1)).unwrap();
        l.snapshot().unwrap();
    }
    let theirs = common::list(&other.path().join("snapshots")).pop().unwrap();
    let name = theirs.file_name().unwrap().to_str().unwrap().to_string();
    let ours = common::list(&d.join("snapshots"));
    assert_eq!(ours.iter().any(|p| p.file_name().unwrap() == name.as_str()), same_name, "{case}: {ours:?} {name}");
    std::fs::copy(&theirs, d.join("snapshots").join(&name)).unwrap();
    let s = b.subject(out.path());
    check_all(case, d, &read_only_commands(&s), |r| {
        let mut p = Vec::new();
        match r.name() {
            // verify reports the foreign snapshot as a problem; repair --dry-run plans to set
            // it aside.
            "verify" => want!(p, r.code == 6 || r.code == 0, "verify: unexpected exit"),
            "repair" => want!(p, r.code == 0, "repair --dry-run: expected exit 0"),
            _ => {
                want!(p, r.code == 0, "expected exit 0");
                // Why: another ledger's id, or (a snapshot at a sequence number the log holds)
                // a different record at the position it was taken after.
                want!(
                    p,
                    r.stderr.contains("ignored snapshot")
                        && r.stderr.contains(&name)
                        && r.stderr.contains("left in place")
                        && (r.stderr.contains("belongs to another ledger")
                            || r.stderr.contains("does not match the log")),
                    "no warning on stderr that {name} (another ledger's) was ignored, and why"
                );
                if r.code == 0 {
                    check_answer(r, &b, 11, &mut p);
                }
            }
        }
        p
    });
    // A writer does set it aside: the comparison would have seen that.
    let r = run(d, &strs(&["--json", "request", "--job-id", "after", "--workers", "1"]));
    assert_eq!(r.code, 0, "{case}: {}", r.show());
    assert!(r.stderr.contains("set aside snapshot"), "{case}: {}", r.show());
    assert!(!d.join("snapshots").join(&name).exists() || !same_name, "{case}: still in place");
    let q = common::list(&d.join("quarantine"));
    assert!(q.iter().any(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&name)), "{case}: {q:?}");
}

#[test]
fn another_ledgers_newer_snapshot_is_ignored_and_left_in_place() {
    check_foreign_snapshot("foreign snapshot, newer name", false);
}

#[test]
fn another_ledgers_snapshot_under_our_snapshots_name_is_ignored_and_left_in_place() {
    check_foreign_snapshot("foreign snapshot, same name", true);
}

// ---------------------------------------------------------------------------------------------
// 6. No ledger at all.

fn check_no_ledger(case: &str, d: &Path, svg_dir: &Path) {
    let now = Micros::from_micros(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_micros() as i64);
    let s = Subject {
        id: "alloc-000000000001".into(),
        job: "job-a".into(),
        at: "+1m".into(),
        since: format_micros(now - 3_600_000_000),
        until: format_micros(now + 3_600_000_000),
        svg: svg_dir.join("chart.svg"),
    };
    check_all(case, d, &read_only_commands(&s), |r| {
        let mut p = Vec::new();
        // Every read says there is no ledger, naming the directory (exit 4), and creates nothing:
        // a mistyped --data-dir must not look like an empty pool.
        want!(p, r.code == 4, "expected exit 4 (no ledger)");
        want!(
            p,
            r.error_text().contains("no ledger") && r.error_text().contains(&d.display().to_string()),
            "the error does not say there is no ledger in {}",
            d.display()
        );
        if r.json() {
            want!(p, r.doc()["error"]["kind"] == "no_ledger", "kind is not no_ledger: {}", r.doc());
        }
        p
    });
    // A writer does create the ledger: the comparison would have seen that.
    let r = run(d, &strs(&["--json", "request", "--job-id", "after", "--workers", "1"]));
    assert_eq!(r.code, 0, "{case}: {}", r.show());
    assert!(d.join("wal").is_dir(), "{case}");
}

#[test]
fn an_empty_or_missing_directory_is_no_ledger_and_stays_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    check_no_ledger("empty directory", &empty, out.path());
    let missing = tmp.path().join("missing");
    check_no_ledger("missing directory", &missing, out.path());
    assert!(missing.exists(), "the writer created it");
}

/// Sets the modification time of `path` (a file or a directory) to `seconds` after the epoch.
fn set_modified(path: &Path, seconds: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    std::fs::File::open(path).unwrap().set_modified(t).unwrap();
}
