//! The scheduler's contract (issue 15) through the real binary: idempotency keys retried across
//! processes and snapshots, lease renewal, `request --dry-run` and `--expected-seq` on every
//! write. Every process is a fresh open of the ledger, so every retry here is also a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

fn run<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c.arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
}

/// `--json ARGS`: the exit code and the one JSON document on stdout.
fn json<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> (i32, Value) {
    let mut full: Vec<&OsStr> = vec![OsStr::new("--json")];
    full.extend(args.iter().map(AsRef::as_ref));
    let o = run(dir, &full);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{full:?}: stdout is not one JSON document ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap(), v)
}

fn event_count(dir: &Path) -> usize {
    let o = run(dir, &["log"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().count()
}

/// The ledger's last sequence number: the last event's seq.
fn last_seq(dir: &Path) -> u64 {
    let o = run(dir, &["log"]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    last["seq"].as_u64().unwrap()
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().unwrap().parse().unwrap()
}

fn workers(g: &Value) -> Vec<String> {
    g["workers_allocated"].as_array().unwrap().iter().map(|w| w["worker_id"].as_str().unwrap().to_string()).collect()
}

/// A `--json` error: its exit code matches the code, and it is of `kind`.
fn assert_error(code: i32, e: &Value, exit: i32, kind: &str) {
    assert_eq!(code, exit, "{e}");
    assert_eq!(e["error"]["kind"], kind, "{e}");
    assert_eq!(e["error"]["exit_code"], exit, "{e}");
}

const REQ: &[&str] =
    &["request", "--job-id", "train-7", "--workers", "3", "--mcp-server", "github", "--priority", "high"];

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

#[test]
fn a_retried_request_is_answered_from_the_key_across_processes_and_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let keyed = with(REQ, &["--idempotency-key", "7f3c9a2e-retry", "--metadata", r#"{"team":"infra"}"#]);
    let (code, g) = json(d, &keyed);
    assert_eq!(code, 0, "{g}");
    assert_eq!(g["status"], "active");
    assert!(g.get("replayed").is_none(), "a first answer is not a replay: {g}");
    let id = g["allocation_id"].as_str().unwrap().to_string();
    let events = event_count(d);

    // The same request again, in a new process: the original answer, nothing written.
    for _ in 0..3 {
        let (code, r) = json(d, &keyed);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["replayed"], true, "{r}");
        assert_eq!(r["allocation_id"], id.as_str());
        assert_eq!(workers(&r), workers(&g));
        assert_eq!(r["mcp_servers"], g["mcp_servers"]);
        assert_eq!((&r["seq"], &r["expires_at"]), (&g["seq"], &g["expires_at"]));
        assert_eq!(event_count(d), events);
    }
    let (_, cap) = json(d, &["capacity"]);
    assert_eq!(cap["allocated_workers"], 3, "one grant only: {cap}");

    // The human output says it is a replay.
    let o = run(d, &keyed);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains(&id) && text.contains("replayed"), "{text}");

    // The key table is in the snapshot: a retry after it (read from the snapshot) is still
    // answered, and so is a retry after a write that follows the snapshot.
    let (code, s) = json(d, &["snapshot"]);
    assert_eq!(code, 0, "{s}");
    let (code, r) = json(d, &keyed);
    assert_eq!((code, &r["replayed"], &r["allocation_id"]), (0, &Value::Bool(true), &Value::from(id.as_str())), "{r}");
    let (code, _) = json(d, &["request", "--job-id", "other", "--workers", "1"]);
    assert_eq!(code, 0);
    let events = event_count(d);
    let (code, r) = json(d, &keyed);
    assert_eq!((code, &r["allocation_id"]), (0, &Value::from(id.as_str())), "{r}");
    assert_eq!(event_count(d), events);

    // Once the grant has ended (released after another snapshot), a retry still answers with
    // the original allocation, in its state now, and grants nothing.
    let (code, _) = json(d, &["snapshot"]);
    assert_eq!(code, 0);
    let (code, rel) = json(d, &["release", &id]);
    assert_eq!((code, &rel["status"]), (0, &Value::from("released")), "{rel}");
    let events = event_count(d);
    let (code, r) = json(d, &keyed);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["replayed"], true);
    assert_eq!(r["allocation_id"], id.as_str());
    assert_eq!(r["status"], "released", "a replay shows the allocation's state now: {r}");
    assert_eq!(workers(&r), workers(&g));
    assert_eq!(event_count(d), events, "a replay never grants again, even once the grant ended");
    let (_, cap) = json(d, &["capacity"]);
    assert_eq!(cap["allocated_workers"], 1, "{cap}");
}

#[test]
fn a_retried_rejection_is_replayed_too() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, _) = json(d, &["request", "--job-id", "holder", "--workers", "8"]);
    assert_eq!(code, 0);
    let req = ["request", "--job-id", "huge", "--workers", "3", "--idempotency-key", "rej-1"];
    let (code, f) = json(d, &req);
    assert_eq!(code, 3, "{f}");
    assert_eq!(f["status"], "failed");
    let events = event_count(d);
    let (code, r) = json(d, &req);
    assert_eq!(code, 3, "{r}");
    assert_eq!(r["replayed"], true);
    assert_eq!((&r["allocation_id"], &r["error"], &r["seq"]), (&f["allocation_id"], &f["error"], &f["seq"]));
    assert_eq!(event_count(d), events);
}

#[test]
fn the_same_key_for_another_request_is_invalid_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, _) = json(d, &with(REQ, &["--idempotency-key", "k-1", "--ttl-seconds", "600"]));
    assert_eq!(code, 0);
    let events = event_count(d);
    // Each differs from the original in one thing the key's fingerprint covers.
    let variants: Vec<Vec<&str>> = vec![
        vec!["request", "--job-id", "train-8", "--workers", "3", "--mcp-server", "github", "--priority", "high"],
        vec!["request", "--job-id", "train-7", "--workers", "2", "--mcp-server", "github", "--priority", "high"],
        vec!["request", "--job-id", "train-7", "--workers", "3", "--mcp-server", "slack", "--priority", "high"],
        vec!["request", "--job-id", "train-7", "--workers", "3", "--mcp-server", "github"],
    ];
    for v in &variants {
        let (code, e) = json(d, &with(v, &["--idempotency-key", "k-1", "--ttl-seconds", "600"]));
        assert_error(code, &e, 2, "invalid_input");
        assert_eq!(e["error"]["field"], "idempotency_key", "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("idempotency_key") && msg.contains("different request"), "{msg}");
    }
    // Another ttl, metadata or lifetime bound is another request as well.
    for extra in [
        &["--ttl-seconds", "900"][..],
        &["--ttl-seconds", "600", "--metadata", r#"{"a":1}"#],
        &["--ttl-seconds", "600", "--max-lifetime-seconds", "7200"],
    ] {
        let args = with(&with(REQ, &["--idempotency-key", "k-1"]), extra);
        let (code, e) = json(d, &args);
        assert_error(code, &e, 2, "invalid_input");
        assert_eq!(e["error"]["field"], "idempotency_key", "{args:?}: {e}");
    }
    // The human form names the flag.
    let o = run(d, &with(REQ, &["--idempotency-key", "k-1"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--idempotency-key"));
    assert_eq!(event_count(d), events, "nothing written");
}

#[test]
fn the_same_request_is_the_request_as_decided() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let req = ["request", "--job-id", "m", "--workers", "1", "--mcp-server", "a", "--mcp-server", "b"];
    let (code, g) = json(d, &with(&req, &["--metadata", r#"{"x":1,"y":2}"#, "--idempotency-key", "same"]));
    assert_eq!(code, 0, "{g}");
    // Defaults spelled out, and metadata with its keys in another order: the same request.
    for extra in [
        &["--metadata", r#"{"y":2,"x":1}"#][..],
        &["--metadata", r#"{"x":1,"y":2}"#, "--ttl-seconds", "3600", "--priority", "normal"],
    ] {
        let (code, r) = json(d, &with(&with(&req, extra), &["--idempotency-key", "same"]));
        assert_eq!(code, 0, "{extra:?}: {r}");
        assert_eq!((&r["replayed"], &r["allocation_id"]), (&Value::Bool(true), &g["allocation_id"]), "{r}");
    }
    // MCP servers in another order: another request.
    let (code, e) = json(
        d,
        &[
            "request",
            "--job-id",
            "m",
            "--workers",
            "1",
            "--mcp-server",
            "b",
            "--mcp-server",
            "a",
            "--metadata",
            r#"{"x":1,"y":2}"#,
            "--idempotency-key",
            "same",
        ],
    );
    assert_error(code, &e, 2, "invalid_input");
    assert_eq!(e["error"]["field"], "idempotency_key");
}

#[test]
fn a_key_is_new_again_after_its_window() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let config = d.join("config.json");
    std::fs::write(&config, r#"{"idempotency_window_seconds": 1}"#).unwrap();
    let ledger = d.join("ledger");
    let args = |workers: &str| -> Vec<String> {
        let mut v: Vec<String> = vec!["--config".into(), config.display().to_string()];
        v.extend(["request", "--job-id", "w", "--workers", workers, "--idempotency-key", "wk"].map(String::from));
        v
    };
    let (code, first) = json(&ledger, &args("1"));
    assert_eq!(code, 0, "{first}");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let (code, second) = json(&ledger, &args("1"));
    assert_eq!(code, 0, "{second}");
    assert!(second.get("replayed").is_none(), "past the window the key is new: {second}");
    assert_ne!(second["allocation_id"], first["allocation_id"]);
    // Another request under the old key is fine too, once the window has passed.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let (code, third) = json(&ledger, &args("2"));
    assert_eq!(code, 0, "{third}");
    assert_ne!(third["allocation_id"], second["allocation_id"]);
}

#[test]
fn a_bad_key_is_invalid_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, _) = json(d, &["request", "--job-id", "seed", "--workers", "1"]);
    assert_eq!(code, 0);
    let events = event_count(d);
    let long = "k".repeat(129);
    for key in ["", long.as_str(), "tab\there", "nl\nhere", "bell\u{7}", "del\u{7f}"] {
        let (code, e) = json(d, &with(REQ, &["--idempotency-key", key]));
        assert_error(code, &e, 2, "invalid_input");
        assert_eq!(e["error"]["field"], "idempotency_key", "{key:?}: {e}");
    }
    // 128 bytes is the limit, not over it.
    let (code, g) = json(d, &with(REQ, &["--idempotency-key", &"k".repeat(128)]));
    assert_eq!(code, 0, "{g}");
    assert_eq!(event_count(d), events + 1);
}

#[test]
fn renew_moves_the_deadline_within_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, g) = json(d, &["request", "--job-id", "long", "--workers", "2", "--ttl-seconds", "600"]);
    assert_eq!(code, 0);
    let id = g["allocation_id"].as_str().unwrap().to_string();
    let granted_deadline = time(&g["expires_at"]);

    let (code, r) = json(d, &["renew", &id, "--ttl-seconds", "7200"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!((&r["status"], &r["allocation_id"], &r["renewals"]), (&"active".into(), &id.as_str().into(), &1.into()));
    assert_eq!(time(&r["previous_expires_at"]), granted_deadline);
    let renewed = time(&r["expires_at"]);
    assert!(renewed > granted_deadline + chrono::Duration::seconds(6000), "{r}");
    assert_eq!(r["capped_by_max_lifetime"], false);
    assert_eq!(r["seq"].as_u64().unwrap(), last_seq(d), "the renewal is the last event");
    let (_, a) = json(d, &["get", &id]);
    assert_eq!(time(&a["timestamps"]["expires_at"]), renewed, "{a}");
    assert_eq!(a["state"], "active");

    // Without --ttl-seconds: now + the allocation's own ttl (600 s).
    let (code, r) = json(d, &["renew", &id]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["renewals"], 2);
    assert_eq!(time(&r["previous_expires_at"]), renewed);
    let left = time(&r["expires_at"]) - chrono::Utc::now();
    assert!(left <= chrono::Duration::seconds(600) && left > chrono::Duration::seconds(500), "{r}");

    // The pool's TTL bounds; nothing written.
    let events = event_count(d);
    for bad in ["59", "604801", "0", "-5", "soon"] {
        let (code, e) = json(d, &["renew", &id, "--ttl-seconds", bad]);
        assert_error(code, &e, 2, "invalid_input");
        assert_eq!(e["error"]["field"], "ttl_seconds", "{bad}: {e}");
    }
    let o = run(d, &["renew", &id, "--ttl-seconds", "59"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ttl-seconds"));
    assert_eq!(event_count(d), events);

    // Unknown and malformed ids.
    let (code, e) = json(d, &["renew", "alloc-000000000000"]);
    assert_error(code, &e, 4, "not_found");
    let (code, e) = json(d, &["renew", "nope"]);
    assert_error(code, &e, 2, "invalid_input");

    // A released allocation cannot be renewed: exit 8 naming its state.
    let (code, _) = json(d, &["release", &id]);
    assert_eq!(code, 0);
    let events = event_count(d);
    let (code, e) = json(d, &["renew", &id]);
    assert_error(code, &e, 8, "not_active");
    assert_eq!(e["error"]["state"], "released", "{e}");
    assert_eq!(e["error"]["allocation_id"], id.as_str());
    let o = run(d, &["renew", &id]);
    assert_eq!(o.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&o.stderr).contains("released"));
    assert_eq!(event_count(d), events);

    // A failed (rejected) one names its state too.
    let (code, _) = json(d, &["request", "--job-id", "holder", "--workers", "10"]);
    assert_eq!(code, 0);
    let (code, f) = json(d, &["request", "--job-id", "huge", "--workers", "1"]);
    assert_eq!(code, 3, "{f}");
    let (code, e) = json(d, &["renew", f["allocation_id"].as_str().unwrap()]);
    assert_error(code, &e, 8, "not_active");
    assert_eq!(e["error"]["state"], "failed", "{e}");
}

#[test]
fn max_lifetime_caps_a_renewal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, g) = json(
        d,
        &["request", "--job-id", "bounded", "--workers", "1", "--ttl-seconds", "600", "--max-lifetime-seconds", "900"],
    );
    assert_eq!(code, 0, "{g}");
    let id = g["allocation_id"].as_str().unwrap().to_string();
    let created = time(&g["created_at"]);
    let (_, a) = json(d, &["get", &id]);
    assert_eq!(a["max_lifetime_seconds"], 900, "{a}");

    let (code, r) = json(d, &["renew", &id, "--ttl-seconds", "3600"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["capped_by_max_lifetime"], true, "{r}");
    assert_eq!(time(&r["expires_at"]), created + chrono::Duration::seconds(900), "{r}");
    // At the bound, a renewal that cannot move the deadline later is refused; nothing written.
    let events = event_count(d);
    let (code, e) = json(d, &["renew", &id, "--ttl-seconds", "3600"]);
    assert_error(code, &e, 2, "invalid_input");
    assert_eq!(e["error"]["field"], "ttl_seconds", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("max_lifetime_seconds"), "{e}");
    assert_eq!(event_count(d), events);

    // The human form says a renewal was cut short.
    let (code, g) = json(
        d,
        &["request", "--job-id", "bounded", "--workers", "1", "--ttl-seconds", "600", "--max-lifetime-seconds", "900"],
    );
    assert_eq!(code, 0, "{g}");
    let o = run(d, &["renew", g["allocation_id"].as_str().unwrap(), "--ttl-seconds", "3600"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("max_lifetime_seconds"), "{o:?}");

    // A lifetime below the ttl is refused at the request.
    let (code, e) = json(
        d,
        &["request", "--job-id", "b", "--workers", "1", "--ttl-seconds", "600", "--max-lifetime-seconds", "300"],
    );
    assert_error(code, &e, 2, "invalid_input");
    assert_eq!(e["error"]["field"], "max_lifetime_seconds", "{e}");
}

#[test]
fn dry_run_plans_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, _) = json(d, &["request", "--job-id", "a", "--workers", "6"]);
    assert_eq!(code, 0);
    let events = event_count(d);
    let seq = last_seq(d);

    let plan_args = ["request", "--job-id", "b", "--workers", "3", "--mcp-server", "github", "--dry-run"];
    let (code, p) = json(d, &plan_args);
    assert_eq!(code, 0, "{p}");
    assert_eq!(p["would_grant"], true);
    assert_eq!(p["current_seq"], seq);
    assert_eq!(p["outcome"]["status"], "active");
    assert_eq!(workers(&p["outcome"]).len(), 3);
    assert_eq!(event_count(d), events, "a plan writes nothing");
    let (_, cap) = json(d, &["capacity"]);
    assert_eq!(cap["allocated_workers"], 6, "a plan reserves nothing");
    let o = run(d, &plan_args);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("would be granted") && text.contains(&format!("--expected-seq {seq}")), "{text}");

    // Acting on the plan with its current_seq: the planned workers.
    let (code, g) = json(
        d,
        &["request", "--job-id", "b", "--workers", "3", "--mcp-server", "github", "--expected-seq", &seq.to_string()],
    );
    assert_eq!(code, 0, "{g}");
    assert_eq!(workers(&g), workers(&p["outcome"]));
    assert_eq!(g["mcp_servers"], p["outcome"]["mcp_servers"]);

    // A plan that would not be granted: exit 3, the reason a request would record, nothing written.
    let events = event_count(d);
    let (code, p) = json(d, &["request", "--job-id", "c", "--workers", "2", "--dry-run"]);
    assert_eq!(code, 3, "{p}");
    assert_eq!(p["would_grant"], false);
    assert_eq!(p["outcome"]["status"], "failed");
    assert_eq!(p["outcome"]["error"], "Insufficient workers: requested 2, available 1");
    assert_eq!(p["current_seq"], last_seq(d));
    assert_eq!(event_count(d), events);

    // A dry run checks its input like a request does.
    let (code, e) = json(d, &["request", "--job-id", "c", "--workers", "1", "--ttl-seconds", "5", "--dry-run"]);
    assert_error(code, &e, 2, "invalid_input");
    assert_eq!(e["error"]["field"], "ttl_seconds");
}

#[test]
fn expected_seq_guards_every_write() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (code, g) = json(d, &["request", "--job-id", "a", "--workers", "2", "--ttl-seconds", "600"]);
    assert_eq!(code, 0);
    let id = g["allocation_id"].as_str().unwrap().to_string();
    let stale = (last_seq(d) - 1).to_string();

    // Stale: exit 7, the current seq in the JSON, nothing written; for every write.
    let cases: Vec<Vec<&str>> = vec![
        vec!["request", "--job-id", "b", "--workers", "1", "--expected-seq", &stale],
        vec!["release", &id, "--expected-seq", &stale],
        vec!["renew", &id, "--expected-seq", &stale],
        vec!["cleanup-expired", "--expected-seq", &stale],
    ];
    let events = event_count(d);
    let current = last_seq(d);
    for args in &cases {
        let (code, e) = json(d, args);
        assert_error(code, &e, 7, "conflict");
        assert_eq!(e["error"]["current_seq"], current, "{args:?}: {e}");
        assert_eq!(e["error"]["expected_seq"], current - 1, "{args:?}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("nothing was written"));
        let o = run(d, args);
        assert_eq!(o.status.code(), Some(7));
        assert!(String::from_utf8_lossy(&o.stderr).contains("conflict"));
    }
    // A seq from the future conflicts too.
    let (code, e) = json(d, &["cleanup-expired", "--expected-seq", "999"]);
    assert_error(code, &e, 7, "conflict");
    assert_eq!(event_count(d), events, "no conflicting write wrote anything");
    let (code, e) = json(d, &["release", &id, "--expected-seq", "x"]);
    assert_error(code, &e, 2, "invalid_input");
    assert_eq!(e["error"]["field"], "expected_seq");

    // Current: each succeeds (and moves the seq on for the next).
    let cur = || last_seq(d).to_string();
    let (code, r) = json(d, &["cleanup-expired", "--expected-seq", &cur()]);
    assert_eq!(code, 0, "{r}");
    let (code, r) = json(d, &["renew", &id, "--expected-seq", &cur()]);
    assert_eq!(code, 0, "{r}");
    let (code, r) = json(d, &["request", "--job-id", "b", "--workers", "1", "--expected-seq", &cur()]);
    assert_eq!(code, 0, "{r}");
    let (code, r) = json(d, &["release", &id, "--expected-seq", &cur()]);
    assert_eq!((code, &r["status"]), (0, &Value::from("released")), "{r}");
    assert_eq!(event_count(d), events + 3, "renewed, granted, released (the cleanup had nothing to do)");
    // A release that would write nothing (the allocation has ended) is answered whatever
    // expected_seq says: a retried release never conflicts.
    let (code, r) = json(d, &["release", &id, "--expected-seq", &stale]);
    assert_eq!((code, &r["status"]), (0, &Value::from("already_released")), "{r}");
    assert_eq!(event_count(d), events + 3);
}

#[test]
fn a_retry_is_answered_before_its_expected_seq_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The first write creates the ledger (its ledger_created event); then the seq is known.
    let (code, _) = json(d, &["cleanup-expired"]);
    assert_eq!(code, 0);
    let seq = last_seq(d);
    let req = ["request", "--job-id", "a", "--workers", "2", "--idempotency-key", "once"];
    let (code, g) = json(d, &with(&req, &["--expected-seq", &seq.to_string()]));
    assert_eq!(code, 0, "{g}");
    // Other writes move the ledger on.
    let (code, _) = json(d, &["request", "--job-id", "b", "--workers", "1"]);
    assert_eq!(code, 0);
    let events = event_count(d);
    // The retry carries the now stale expected_seq: the original answer, not a conflict.
    let (code, r) = json(d, &with(&req, &["--expected-seq", &seq.to_string()]));
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["replayed"], true);
    assert_eq!(r["allocation_id"], g["allocation_id"]);
    assert_eq!(event_count(d), events);
    // A new key with the stale seq conflicts.
    let (code, e) = json(
        d,
        &[
            "request",
            "--job-id",
            "a",
            "--workers",
            "2",
            "--idempotency-key",
            "twice",
            "--expected-seq",
            &seq.to_string(),
        ],
    );
    assert_error(code, &e, 7, "conflict");
    assert_eq!(event_count(d), events);
}

/// A ledger whose leases may be as short as one second.
fn short_lease_ledger(tmp: &Path) -> (std::path::PathBuf, impl Fn(&[&str]) -> Vec<String>) {
    let config = tmp.join("config.json");
    std::fs::write(&config, r#"{"min_ttl_seconds": 1}"#).unwrap();
    let args = move |a: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--config".into(), config.display().to_string()];
        v.extend(a.iter().map(|s| (*s).to_string()));
        v
    };
    (tmp.join("ledger"), args)
}

#[test]
fn a_renewal_after_the_deadline_finds_the_allocation_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, args) = short_lease_ledger(tmp.path());
    let (code, g) = json(&d, &args(&["request", "--job-id", "e", "--workers", "1", "--ttl-seconds", "1"]));
    assert_eq!(code, 0, "{g}");
    let id = g["allocation_id"].as_str().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // The deadline is inclusive: the expiry is recorded first, then the renewal is refused.
    let (code, e) = json(&d, &["renew", &id]);
    assert_error(code, &e, 8, "not_active");
    assert_eq!(e["error"]["state"], "expired", "{e}");
    let o = run(&d, &["log"]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!((&last["type"], &last["allocation_id"]), (&"expired".into(), &id.as_str().into()), "{last}");
    assert!(!stdout.contains("\"renewed\""), "{stdout}");
}

#[test]
fn an_expiry_between_plan_and_act_is_not_a_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, args) = short_lease_ledger(tmp.path());
    let (code, _) = json(&d, &args(&["request", "--job-id", "short", "--workers", "8", "--ttl-seconds", "1"]));
    assert_eq!(code, 0);
    let (code, p) = json(&d, &["request", "--job-id", "next", "--workers", "4", "--dry-run"]);
    assert_eq!(code, 3, "only 2 free now: {p}");
    let seq = p["current_seq"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // The deadline passed after the plan; nothing recorded it yet. The write records the expiry
    // first and is then decided: no conflict, and (unlike the plan) a grant.
    let (code, g) = json(&d, &["request", "--job-id", "next", "--workers", "4", "--expected-seq", &seq.to_string()]);
    assert_eq!(code, 0, "{g}");
    assert_eq!(g["seq"], seq + 2, "the expiry, then the grant: {g}");
    // Once an expiry is recorded, though, it is an event like any other: a conflict.
    let (code, e) = json(&d, &["cleanup-expired", "--expected-seq", &seq.to_string()]);
    assert_error(code, &e, 7, "conflict");
}
