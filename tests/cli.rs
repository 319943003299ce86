//! End-to-end tests of the real binary: the acceptance scenario, exit codes, `--json` shapes,
//! and bad input that must write no event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use serde_json::Value;
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

fn json(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not one JSON document ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap(), v)
}

fn event_count(dir: &Path) -> usize {
    let o = run(dir, &["log"]);
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap().lines().count()
}

#[test]
fn acceptance_scenario_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 1. a fresh ledger reports 10 total and 10 available workers (reads never create a
    //    ledger: before `init` there is none, exit 4 naming the directory)
    let (code, none) = json(d, &["capacity"]);
    assert_eq!((code, none["error"]["kind"].as_str()), (4, Some("no_ledger")), "{none}");
    let (code, _) = json(d, &["init"]);
    assert_eq!(code, 0);
    let (code, cap) = json(d, &["capacity"]);
    assert_eq!(code, 0);
    assert_eq!((cap["total_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(10), Some(10)));
    // 2. a request for 4 workers is active with 4 workers
    let (code, g) = json(d, &["request", "--job-id", "job-1", "--workers", "4", "--mcp-server", "github"]);
    assert_eq!(code, 0, "{g}");
    assert_eq!(g["status"], "active");
    assert_eq!(g["workers_allocated"].as_array().unwrap().len(), 4);
    assert_eq!(g["resources"]["cpu"], 4.0);
    assert_eq!(g["resources"]["memory"], 8192);
    assert_eq!(g["mcp_servers"][0]["status"], "running");
    let id = g["allocation_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("alloc-") && id.len() == 18, "{id}");
    // 3. capacity then shows 4 allocated, 6 available
    let (_, cap) = json(d, &["capacity"]);
    assert_eq!((cap["allocated_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(4), Some(6)));
    assert_eq!(cap["running_mcp_servers"], serde_json::json!(["github"]));
    // 4. get reports state active
    let (code, a) = json(d, &["get", &id]);
    assert_eq!(code, 0);
    assert_eq!(a["state"], "active");
    assert_eq!(a["resources"]["workers"], 4);
    // 5. list has one entry
    let (_, l) = json(d, &["list"]);
    assert_eq!(l.as_array().unwrap().len(), 1);
    // 6. release reports released with workers_released 4
    let (code, r) = json(d, &["release", &id]);
    assert_eq!(code, 0);
    assert_eq!(r["status"], "released");
    assert_eq!(r["workers_released"], 4);
    // 7. capacity is back to 0 allocated, 10 available
    let (_, cap) = json(d, &["capacity"]);
    assert_eq!((cap["allocated_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(0), Some(10)));
    assert!(cap["running_mcp_servers"].as_array().unwrap().is_empty());
    // A second release writes nothing and says so.
    let before = event_count(d);
    let (code, r) = json(d, &["release", &id]);
    assert_eq!(code, 0);
    assert_eq!(r["status"], "already_released");
    assert_eq!(event_count(d), before);
    // verify passes
    let (code, v) = json(d, &["verify"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true);
}

#[test]
fn exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, _) = json(d, &["request", "--job-id", "a", "--workers", "7"]);
    assert_eq!(code, 0);
    let (code, f) = json(d, &["request", "--job-id", "b", "--workers", "5"]);
    assert_eq!(code, 3, "not granted");
    assert_eq!(f["status"], "failed");
    assert_eq!(f["error"], "Insufficient workers: requested 5, available 3");
    let (code, e) = json(d, &["release", "alloc-000000000000"]);
    assert_eq!(code, 4, "not found: {e}");
    assert_eq!(e["error"]["kind"], "not_found");
    let (code, _) = json(d, &["get", "alloc-000000000000"]);
    assert_eq!(code, 4);
    // Locked: hold the write lock in this process.
    let holder = allocation_ledger::Ledger::open(d).unwrap();
    let (code, e) = json(d, &["request", "--job-id", "c", "--workers", "1"]);
    assert_eq!(code, 5, "locked: {e}");
    assert_eq!(e["error"]["kind"], "locked");
    // Reads still work beside the writer.
    let (code, cap) = json(d, &["capacity"]);
    assert_eq!(code, 0);
    assert_eq!(cap["allocated_workers"], 7);
    drop(holder);
    // Damaged: flip a byte in the middle of the log.
    let seg = std::fs::read_dir(d.join("wal")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&seg).unwrap();
    // The middle of the records, not of the zeros pre-filled after them.
    let records_end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    let mid = records_end / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&seg, bytes).unwrap();
    let (code, v) = json(d, &["verify"]);
    assert_eq!(code, 6, "{v}");
    assert_eq!(v["ok"], false);
    let problems = v["problems"].to_string();
    assert!(problems.contains("offset") && problems.contains(".wal"), "{problems}");
    let (code, e) = json(d, &["request", "--job-id", "c", "--workers", "1"]);
    assert_eq!(code, 6, "{e}");
    let o = run(d, &["capacity"]);
    assert_eq!(o.status.code(), Some(6));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("offset") && err.contains("sequence number"), "{err}");
}

#[test]
fn bad_request_input_names_the_field_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Queries never create a ledger; a write does.
    json(d, &["capacity"]);
    assert!(!d.join("wal").exists(), "a query created a ledger");
    json(d, &["request", "--job-id", "setup", "--workers", "1"]);
    let before = event_count(d);
    let long = "x".repeat(300);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--job-id", "", "--workers", "1"], "job_id"),
        (vec!["--job-id", &long, "--workers", "1"], "job_id"),
        (vec!["--job-id", "a\tb", "--workers", "1"], "job_id"),
        (vec!["--job-id", "j", "--workers", "-1"], "workers"),
        (vec!["--job-id", "j", "--workers", "two"], "workers"),
        (vec!["--job-id", "j", "--workers", "11"], "workers"),
        (vec!["--job-id", "j", "--workers", "0"], "workers"),
        (vec!["--job-id", "j", "--workers", "1", "--priority", "urgent"], "priority"),
        (vec!["--job-id", "j", "--workers", "1", "--ttl-seconds", "59"], "ttl_seconds"),
        (vec!["--job-id", "j", "--workers", "1", "--ttl-seconds", "604801"], "ttl_seconds"),
        (vec!["--job-id", "j", "--workers", "1", "--ttl-seconds", "-5"], "ttl_seconds"),
        (vec!["--job-id", "j", "--workers", "1", "--metadata", "[1,2]"], "metadata"),
        (vec!["--job-id", "j", "--workers", "1", "--metadata", "{not json"], "metadata"),
        (vec!["--job-id", "j", "--mcp-server", "has space"], "mcp_servers[0]"),
        (vec!["--job-id", "j", "--mcp-server", "a", "--mcp-server", "a"], "mcp_servers[1]"),
    ];
    for (args, field) in cases {
        let mut full = vec!["request"];
        full.extend(args.iter().copied());
        let (code, e) = json(d, &full);
        assert_eq!(code, 2, "{args:?}: {e}");
        assert_eq!(e["error"]["field"], field, "{args:?}: {e}");
        assert_eq!(e["error"]["kind"], "invalid_input");
    }
    let big = format!("{{\"blob\":\"{}\"}}", "y".repeat(20_000));
    let (code, e) = json(d, &["request", "--job-id", "j", "--workers", "1", "--metadata", &big]);
    assert_eq!((code, e["error"]["field"].as_str()), (2, Some("metadata")), "{e}");
    // Human output names the field and the allowed values.
    let o = run(d, &["request", "--job-id", "j", "--workers", "1", "--priority", "urgent"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("priority") && err.contains("low, normal, high, critical"), "{err}");
    let (code, e) = json(d, &["list", "--state", "gone"]);
    assert_eq!(code, 2);
    assert!(e["error"]["message"].as_str().unwrap().contains("active, released, expired, failed"));
    let (code, _) = json(d, &["get", "alloc-XYZ"]);
    assert_eq!(code, 2);
    let (code, _) = json(d, &["release", "12345"]);
    assert_eq!(code, 2);
    let (code, e) = json(d, &["frobnicate"]);
    assert_eq!(code, 2, "{e}");
    assert_eq!(event_count(d), before, "invalid input wrote an event");
}

#[test]
fn log_is_ndjson_and_human_output_is_tabular() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    json(d, &["request", "--job-id", "j", "--workers", "2", "--metadata", "{\"tenant\":\"acme\"}"]);
    let o = run(d, &["log"]);
    let text = String::from_utf8(o.stdout).unwrap();
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events[0]["type"], "ledger_created");
    assert_eq!(events[1]["type"], "granted");
    assert_eq!(events[1]["seq"], 2);
    assert_eq!(events[1]["v"], 4, "events are written in schema version 4");
    assert_eq!(events[1]["metadata"]["tenant"], "acme");
    let o = run(d, &["log", "--from-seq", "2", "--limit", "1"]);
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 1);
    let o = run(d, &["capacity"]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with("RESOURCE"), "{text}");
    assert!(text.contains("workers     10     2          8"), "{text}");
    let (code, s) = json(d, &["snapshot"]);
    assert_eq!(code, 0);
    assert_eq!(s["seq"], 2);
    let (code, v) = json(d, &["verify"]);
    assert_eq!(code, 0);
    assert_eq!(v["snapshots"][0]["status"], "ok");
}

#[test]
fn config_file_is_used_at_creation_and_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, r#"{"worker_slots": 3, "total_cpu_millicores": 4000, "total_memory_mib": 8192}"#).unwrap();
    let o = bin().arg("--data-dir").arg(&d).arg("--config").arg(&cfg).args(["--json", "init"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let o = bin().arg("--data-dir").arg(&d).arg("--config").arg(&cfg).args(["--json", "capacity"]).output().unwrap();
    let cap: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cap["total_workers"], 3);
    assert_eq!(cap["total_cpu"], 4.0);
    std::fs::write(&cfg, r#"{"worker_slotz": 3}"#).unwrap();
    let d2 = tmp.path().join("ledger2");
    let o = bin()
        .arg("--data-dir")
        .arg(&d2)
        .arg("--config")
        .arg(&cfg)
        .args(["--json", "request", "--job-id", "j", "--workers", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("worker_slotz"), "{e}");
}

#[test]
fn demo_runs() {
    let o = bin().arg("demo").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("Insufficient workers: requested 7, available 6"), "{text}");
    assert!(text.contains("ledger_created"));
}
