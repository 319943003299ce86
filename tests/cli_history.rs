//! End-to-end tests of the time-travel subcommands through the real binary: `capacity --at`,
//! `list --at`, `history`, `log --since/--until`, `usage` and `timeline --svg`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::{format_micros, Micros};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c.arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
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

fn events(dir: &Path, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["log"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn at(e: &Value) -> String {
    format_micros(Micros::from_micros(e["ts_us"].as_i64().unwrap()))
}

/// A ledger with: job-a (3 workers, tenant red) granted then released, job-b (2 workers,
/// tenant blue) still active, job-c rejected. Returns the ids of a and b.
fn setup(d: &Path) -> (String, String) {
    let (code, a) = json(
        d,
        &[
            "request",
            "--job-id",
            "job-a",
            "--workers",
            "3",
            "--mcp-server",
            "github",
            "--metadata",
            r#"{"tenant":"red"}"#,
        ],
    );
    assert_eq!(code, 0, "{a}");
    let (code, b) = json(d, &["request", "--job-id", "job-b", "--workers", "2", "--metadata", r#"{"tenant":"blue"}"#]);
    assert_eq!(code, 0, "{b}");
    let a = a["allocation_id"].as_str().unwrap().to_string();
    let b = b["allocation_id"].as_str().unwrap().to_string();
    let (code, _) = json(d, &["release", &a]);
    assert_eq!(code, 0);
    let (code, c) = json(d, &["request", "--job-id", "job-c", "--workers", "9"]);
    assert_eq!(code, 3, "{c}");
    (a, b)
}

#[test]
fn capacity_and_list_at_an_instant() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (a, b) = setup(d);
    let log = events(d, &[]);
    assert_eq!(log.len(), 5, "{log:?}");
    // Right after the second grant: 5 workers held, github running.
    let (code, cap) = json(d, &["capacity", "--at", &at(&log[2])]);
    assert_eq!(code, 0, "{cap}");
    assert_eq!(cap["allocated_workers"], 5);
    assert_eq!(cap["available_workers"], 5);
    assert_eq!(cap["active_allocations"], 2);
    assert_eq!(cap["running_mcp_servers"], serde_json::json!(["github"]));
    assert_eq!(cap["seq"], 3);
    assert_eq!(cap["as_of"], at(&log[2]));
    // After the release: only b.
    let (_, cap) = json(d, &["capacity", "--at", &at(&log[3])]);
    assert_eq!(cap["allocated_workers"], 2);
    assert!(cap["running_mcp_servers"].as_array().unwrap().is_empty());
    // The future answers with the current state.
    let (code, cap) = json(d, &["capacity", "--at", "+1h"]);
    assert_eq!(code, 0);
    assert_eq!(cap["allocated_workers"], 2);
    // Before the ledger began: invalid input that says when it begins.
    let (code, err) = json(d, &["capacity", "--at", "2001-01-01T00:00:00Z"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err["error"]["field"], "at");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("before the ledger begins") && msg.contains(&at(&log[0])), "{msg}");
    let (code, err) = json(d, &["capacity", "--at", "-1d"]);
    assert_eq!(code, 2, "{err}");
    let (code, err) = json(d, &["capacity", "--at", "yesterday"]);
    assert_eq!(code, 2, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("--at"), "{err}");

    // list --at: both active after the second grant, as they were then.
    let (code, rows) = json(d, &["list", "--at", &at(&log[2])]);
    assert_eq!(code, 0, "{rows}");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["state"] == "active"));
    assert_eq!(rows[0]["allocation_id"], a.as_str());
    let (_, rows) = json(d, &["list", "--at", &at(&log[4]), "--state", "active"]);
    let ids: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r["allocation_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [b.as_str()]);
    // Human output works too.
    let o = run(d, &["capacity", "--at", &at(&log[2])]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("as of:"));
}

#[test]
fn history_log_usage_and_timeline() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (a, b) = setup(d);
    let log = events(d, &[]);

    let (code, h) = json(d, &["history", "--allocation", &a]);
    assert_eq!(code, 0, "{h}");
    let types: Vec<&str> = h["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["granted", "released"]);
    assert_eq!(h["job_id"], "job-a");
    assert!(h["events"][0]["at"].as_str().unwrap().ends_with('Z'));
    let (code, h) = json(d, &["history", "--job-id", "job-b"]);
    assert_eq!(code, 0);
    assert_eq!(h["allocation_ids"], serde_json::json!([b]));
    assert_eq!(h["events"].as_array().unwrap().len(), 1);
    let (code, err) = json(d, &["history", "--allocation", "alloc-000000000000"]);
    assert_eq!(code, 4, "{err}");
    let (code, err) = json(d, &["history", "--allocation", "bogus"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err["error"]["field"], "allocation");
    assert_eq!(run(d, &["history"]).status.code(), Some(2));

    // log --since/--until: [since, until).
    let window = events(d, &["--since", &at(&log[1]), "--until", &at(&log[3])]);
    let seqs: Vec<u64> = window.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(events(d, &["--since", &at(&log[1]), "--limit", "2"]).len(), 2);
    assert_eq!(events(d, &["--since", "-1h"]).len(), 5);

    // usage by tenant over the whole life of the ledger.
    let (code, u) = json(d, &["usage", "--since", &at(&log[0]), "--by", "metadata.tenant"]);
    assert_eq!(code, 0, "{u}");
    assert_eq!(u["group_by"], "metadata.tenant");
    let groups: Vec<&str> = u["groups"].as_array().unwrap().iter().map(|g| g["group"].as_str().unwrap()).collect();
    assert_eq!(groups, ["(none)", "blue", "red"]);
    let red = &u["groups"][2];
    assert_eq!((red["allocations"].as_u64(), red["released"].as_u64()), (Some(1), Some(1)));
    assert!(red["worker_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(u["groups"][0]["rejections"]["insufficient_workers"], 1);
    assert_eq!(u["total"]["rejected"], 1);
    let (code, u) = json(d, &["usage", "--since", "-1h"]);
    assert_eq!(code, 0);
    assert_eq!(u["group_by"], "job");
    assert_eq!(u["groups"].as_array().unwrap().len(), 3);
    // By the tenant recorded with each grant (here taken from metadata.tenant): the same groups.
    let (code, by_tenant) = json(d, &["usage", "--since", &at(&log[0]), "--by", "tenant"]);
    assert_eq!(code, 0, "{by_tenant}");
    let tenant_groups: Vec<&str> =
        by_tenant["groups"].as_array().unwrap().iter().map(|g| g["group"].as_str().unwrap()).collect();
    assert_eq!(tenant_groups, ["(none)", "blue", "red"]);
    let (code, err) = json(d, &["usage", "--since", "-1h", "--by", "tenants"]);
    assert_eq!(code, 2);
    assert_eq!(err["error"]["field"], "by");
    let o = run(d, &["usage", "--since", "-1h"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("TOTAL"));

    // timeline with an SVG chart.
    let svg_path = d.join("chart.svg");
    let svg_arg = svg_path.to_str().unwrap();
    let (code, tl) = json(d, &["timeline", "--since", &at(&log[0]), "--bucket", "1s", "--svg", svg_arg]);
    assert_eq!(code, 0, "{tl}");
    let buckets = tl["buckets"].as_array().unwrap();
    assert!(!buckets.is_empty());
    assert_eq!(buckets[0]["total_workers"], 10.0);
    assert!(buckets[0]["peak_allocated_workers"].as_u64().unwrap() >= 2);
    assert_eq!(tl["svg"], svg_arg);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(!svg.contains("Workers (workers)"));
    for label in ["Workers", "time (UTC)", "class=\"legend\"", "allocated", "total (pool size)"] {
        assert!(svg.contains(label), "the chart lacks {label:?}");
    }
    let (code, err) = json(d, &["timeline", "--since", "-1h", "--bucket", "0s"]);
    assert_eq!(code, 2);
    assert_eq!(err["error"]["field"], "bucket");
    let (code, err) = json(d, &["timeline", "--since", "-1h", "--bucket", "1us"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err["error"]["field"], "bucket");
    let o = run(d, &["timeline", "--since", "-1h", "--bucket", "1h"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("BUCKET START"));

    // verify still works (its progress bar only draws on a terminal).
    let (code, v) = json(d, &["verify"]);
    assert_eq!(code, 0, "{v}");
}
