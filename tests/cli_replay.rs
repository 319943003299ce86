//! `replay` and `what-if` through the real binary: a ledger where requests were rejected for
//! lack of workers; what-if with two more workers rejects fewer and names the jobs that gain;
//! with the recorded config it reproduces every decision; replay's text and NDJSON.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c.arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

/// build-a and build-b hold 5 workers each; build-c (2) is rejected, twice; build-a is
/// released; test-d (2) and build-c (2) then fit. 10 workers, 16 cores, 32 GiB.
fn write_history(dir: &Path) -> Vec<String> {
    let request = |job: &str, workers: &str, tenant: &str, granted: bool| {
        let meta = format!("{{\"tenant\":\"{tenant}\"}}");
        let v = json_code(dir, &["request", "--job-id", job, "--workers", workers, "--metadata", &meta]);
        assert_eq!(v.0, if granted { 0 } else { 3 }, "{job}: {}", v.1);
        v.1["allocation_id"].as_str().unwrap().to_string()
    };
    let mut ids = vec![request("build-a", "5", "red", true)];
    ids.push(request("build-b", "5", "red", true));
    ids.push(request("build-c", "2", "blue", false));
    ids.push(request("build-c", "2", "blue", false));
    let o = run(dir, &["release", &ids[0]]);
    assert!(o.status.success());
    ids.push(request("test-d", "2", "blue", true));
    ids.push(request("build-c", "2", "blue", true));
    ids
}

fn json_code(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    (o.status.code().unwrap(), serde_json::from_str(stdout(&o).trim()).unwrap())
}

#[test]
fn what_if_with_two_more_workers_rejects_fewer() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    write_history(&d);
    let cfg = tmp.path().join("more.json");
    std::fs::write(&cfg, r#"{"worker_slots": 12}"#).unwrap();
    let svg = tmp.path().join("whatif.svg");
    let r = json(&d, &["--config", cfg.to_str().unwrap(), "what-if", "--svg", svg.to_str().unwrap()]);
    assert_eq!(r["requests"], 6);
    assert_eq!(r["recorded_config"], false);
    assert_eq!(r["config"]["worker_slots"], 12);
    assert_eq!(r["reality"]["granted"], 4);
    assert_eq!(r["reality"]["rejected"], 2);
    assert_eq!(r["reality"]["rejections"]["insufficient_workers"], 2);
    // With 12 workers the first build-c fits (5 + 5 + 2); the second does not (12 held).
    assert_eq!(r["what_if"]["granted"], 5);
    assert_eq!(r["what_if"]["rejected"], 1);
    assert_eq!(r["what_if"]["rejections"]["insufficient_workers"], 1);
    assert_eq!(r["changes"]["granted_only_in_what_if"], 1);
    assert_eq!(r["changes"]["granted_only_in_reality"], 0, "{r}");
    let jobs = r["jobs"].as_array().unwrap();
    let row = |name: &str| jobs.iter().find(|j| j["name"] == name).unwrap_or_else(|| panic!("{name}: {r}"));
    assert_eq!(
        (row("build-c")["reality_granted"].as_u64(), row("build-c")["what_if_granted"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(jobs.len(), 1, "only build-c's outcomes differ: {r}");
    // Its first request, granted in the what-if, holds 2 workers from its arrival on.
    let (real_ws, what_if_ws) = (
        row("build-c")["reality_worker_seconds"].as_f64().unwrap(),
        row("build-c")["what_if_worker_seconds"].as_f64().unwrap(),
    );
    assert!(what_if_ws > real_ws && real_ws >= 0.0, "{real_ws} -> {what_if_ws}");
    let tenants = r["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 1);
    assert_eq!((tenants[0]["name"].as_str(), tenants[0]["what_if_granted"].as_u64()), (Some("blue"), Some(3)));
    assert_eq!(r["what_if"]["workers"]["peak_allocated"], 12.0);
    assert_eq!(r["reality"]["workers"]["peak_allocated"], 10.0);
    assert_eq!(r["svg"], svg.display().to_string());
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("what-if: allocated") && chart.contains("reality: pool"));

    // The human table shows the difference per job.
    let o = run(&d, &["--config", cfg.to_str().unwrap(), "what-if"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("jobs whose outcomes differ"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("build-c") && l.contains("1 -> 2") && l.contains("+1")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("  insufficient_workers") && l.contains("-1")), "{text}");

    // Nothing was written.
    let events = stdout(&run(&d, &["log"])).lines().count();
    assert_eq!(events, 8);
}

#[test]
fn what_if_with_the_recorded_config_reproduces_every_decision() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    write_history(&d);
    let r = json(&d, &["what-if"]);
    assert_eq!(r["reproduced"], true, "{r}");
    assert_eq!(r["differing_decisions"], 0);
    assert_eq!(r["reality"], r["what_if"]);
    assert!(stdout(&run(&d, &["what-if"])).contains("every decision came out as recorded"));
    // Bad input names the flag.
    let o = run(&d, &["what-if", "--hold", "forever"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--hold"));
    let r = json(&d, &["what-if", "--hold", "15m", "--since", "-1h"]);
    assert_eq!(r["hold"], "900s");
}

#[test]
fn replay_steps_through_history() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    let ids = write_history(&d);
    let o = run(&d, &["replay"]);
    assert!(o.status.success());
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    assert!(
        lines[1].contains("granted")
            && lines[1].contains("workers 0/10 -> 5/10")
            && lines[1].contains("took slots 0,1,2,3,4")
    );
    assert!(lines[3].contains("rejected") && lines[3].contains("Insufficient workers: requested 2, available 0"));
    assert!(
        lines[5].contains("released")
            && lines[5].contains("workers 10/10 -> 5/10")
            && lines[5].contains("freed slots 0,1,2,3,4")
    );

    // NDJSON: {event, before, after} per line, from --from to --to.
    let o = run(&d, &["--json", "replay", "--from", "2", "--to", "4"]);
    let steps: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0]["seq"], 2);
    assert_eq!(steps[0]["event"]["type"], "granted");
    assert_eq!(steps[0]["before"]["allocated_workers"], 0);
    assert_eq!(steps[0]["after"]["allocated_workers"], 5);
    assert_eq!(steps[0]["slots_taken"], serde_json::json!([0, 1, 2, 3, 4]));
    assert_eq!(steps[2]["event"]["reason"], "insufficient_workers");
    assert_eq!(steps[2]["before"], steps[2]["after"]);

    // One allocation through the pool's changes: granted, then released.
    let o = run(&d, &["--json", "replay", "--allocation", &ids[0]]);
    let steps: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = steps.iter().map(|s| s["event"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["granted", "released"]);
    let o = run(&d, &["--json", "replay", "--job-id", "build-c"]);
    assert_eq!(stdout(&o).lines().count(), 3);

    // The whole state at an exact sequence number, and at an instant.
    let s = json(&d, &["replay", "--to", "5", "--state"]);
    assert_eq!(s["seq"], 5);
    assert_eq!(s["capacity"]["allocated_workers"], 10);
    assert_eq!(s["allocations"].as_array().unwrap().len(), 2);
    let s = json(&d, &["replay", "--to", "-0s", "--state"]);
    assert_eq!(s["seq"], 8);
    assert_eq!(s["capacity"]["allocated_workers"], 9);
    assert_eq!(s["allocations"].as_array().unwrap().len(), 3);
    let o = run(&d, &["replay", "--to", "99", "--state"]);
    assert_eq!(o.status.code(), Some(2));
}
