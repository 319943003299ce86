//! The MCP server over stdio, spoken to with raw JSON-RPC lines: the 2025-11-25 handshake, the
//! stateless 2026-07-28 style, errors, persistence across restarts, the expiry timer, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use allocation_ledger::{EventBody, Ledger, ManualClock, Micros, OpenOptions, RequestOutcome, ResourceRequest};
use mcp_common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOOLS: [&str; 19] = [
    "allocation_history",
    "apply_config",
    "cancel_request",
    "cancel_reservation",
    "change_pool",
    "cleanup_expired",
    "get_allocation",
    "get_capacity",
    "get_pool",
    "list_allocations",
    "list_reservations",
    "plan_request",
    "release_resources",
    "renew_allocation",
    "request_resources",
    "reserve_resources",
    "usage_report",
    "what_if",
    "write_snapshot",
];

fn tool_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> =
        list["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

#[test]
fn initialize_handshake_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = StdioServer::start(dir.path(), &[]);

    let init = s.initialize();
    assert_eq!(init["protocolVersion"], V_LEGACY);
    assert_eq!(init["serverInfo"]["name"], "allocation-ledger");
    assert_eq!(init["serverInfo"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(init["capabilities"]["tools"].is_object(), "{init}");
    assert!(init["instructions"].as_str().unwrap().contains("request_resources"));

    let list = s.request("tools/list", json!({}))["result"].clone();
    assert_eq!(tool_names(&list), TOOLS);
    for tool in list["tools"].as_array().unwrap() {
        let name = tool["name"].as_str().unwrap();
        assert_eq!(tool["inputSchema"]["type"], "object", "{name}");
        assert_eq!(tool["outputSchema"]["type"], "object", "{name}");
        assert!(tool["description"].as_str().unwrap().len() > 40, "{name} needs a real description");
    }
    let req = list["tools"].as_array().unwrap().iter().find(|t| t["name"] == "request_resources").unwrap();
    let props = &req["inputSchema"]["properties"];
    assert_eq!(req["inputSchema"]["required"], json!(["job_id", "mcp_servers"]));
    assert_eq!(props["priority"]["enum"], json!(["low", "normal", "high", "critical"]));
    assert_eq!(props["priority"]["default"], "normal");
    assert_eq!(props["ttl_seconds"]["minimum"], 60);
    assert_eq!(props["ttl_seconds"]["default"], 3600);
    assert_eq!(props["workers"]["minimum"], 0);
    assert_eq!(props["workers"]["maximum"], 10);

    let cap = ok(&s.call("get_capacity", json!({})));
    assert_eq!((cap["total_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(10), Some(10)));

    let g = ok(&s.call("request_resources", json!({"job_id": "job-1", "mcp_servers": ["github"], "workers": 2})));
    assert_eq!(g["status"], "active");
    assert_eq!(g["workers_allocated"].as_array().unwrap().len(), 2);
    let id = g["allocation_id"].as_str().unwrap().to_string();

    // Invalid arguments: isError naming the field and the allowed values; nothing granted.
    let e = err(&s.call("request_resources", json!({"job_id": "j", "mcp_servers": [], "priority": "urgent"})));
    assert_eq!(e["status"], "error");
    assert_eq!(e["field"], "priority");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("priority") && msg.contains("low, normal, high, critical"), "{msg}");
    let e =
        err(&s.call("request_resources", json!({"job_id": "j", "mcp_servers": [], "workers": 1, "ttl_seconds": 59})));
    assert_eq!(e["field"], "ttl_seconds", "{e}");
    let e = err(&s.call("request_resources", json!({"job_id": "j", "mcp_servers": [], "workerz": 1})));
    assert!(e["error"].as_str().unwrap().contains("allowed arguments"), "{e}");
    let e = err(&s.call("list_allocations", json!({"state": "done"})));
    assert_eq!(e["field"], "state");
    assert!(e["error"].as_str().unwrap().contains("active, released, expired, failed"), "{e}");
    let e = err(&s.call("get_allocation", json!({})));
    assert_eq!(e["field"], "allocation_id");

    // Not granted: the original's failed shape, as an error result.
    let f = err(&s.call("request_resources", json!({"job_id": "big", "mcp_servers": [], "workers": 9})));
    assert_eq!(f["status"], "failed");
    assert_eq!(f["error"], "Insufficient workers: requested 9, available 8");
    assert!(f["allocation_id"].as_str().unwrap().starts_with("alloc-"));

    // Unknown allocation: isError with "not found".
    let e = err(&s.call("release_resources", json!({"allocation_id": "alloc-000000000000"})));
    assert_eq!(e["status"], "error");
    assert_eq!(e["error"], "Allocation alloc-000000000000 not found");
    let e = err(&s.call("get_allocation", json!({"allocation_id": "alloc-000000000000"})));
    assert_eq!(e["error"], "Allocation alloc-000000000000 not found");

    let r = ok(&s.call("release_resources", json!({"allocation_id": id})));
    assert_eq!((r["status"].as_str(), r["workers_released"].as_u64()), (Some("released"), Some(2)));
    let list = ok(&s.call("list_allocations", json!({})));
    assert_eq!(list["count"], 2, "the grant and the rejection: {list}");

    // Unknown tool and malformed requests are JSON-RPC errors.
    let r = s.request("tools/call", json!({"name": "no_such_tool", "arguments": {}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = s.request("no/such/method", json!({}));
    assert_eq!(r["error"]["code"], -32601, "{r}");
    s.send_line(r#"{"jsonrpc":"2.0","id":"bad","method":"tools/call","params":"not an object"}"#);
    let r = s.recv_id(&Value::Null);
    assert_eq!(r["error"]["code"], -32600, "{r}");
    // The server is still there after all that.
    assert_eq!(ok(&s.call("get_capacity", json!({})))["available_workers"], 10);

    assert!(s.close().success(), "stdin EOF is a clean shutdown");
}

#[test]
fn stateless_2026_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = StdioServer::start(dir.path(), &[]);

    let d = s.request("server/discover", json!({"_meta": meta_2026()}));
    let d = &d["result"];
    assert!(d["supportedVersions"].as_array().unwrap().contains(&json!(V_STATELESS)), "{d}");
    assert!(d["supportedVersions"].as_array().unwrap().contains(&json!(V_LEGACY)), "{d}");
    assert!(d["capabilities"]["tools"].is_object(), "{d}");

    let list = s.request("tools/list", json!({"_meta": meta_2026()}))["result"].clone();
    assert_eq!(tool_names(&list), TOOLS);

    let g = ok(&s.call_2026("request_resources", json!({"job_id": "j", "mcp_servers": ["jira"], "workers": 3})));
    assert_eq!(g["status"], "active");
    let id = g["allocation_id"].clone();
    let a = ok(&s.call_2026("get_allocation", json!({"allocation_id": id})));
    assert_eq!(a["state"], "active");
    assert_eq!(a["mcp_servers"][0]["endpoint"], g["mcp_servers"][0]["endpoint"]);
    let e = err(&s.call_2026("request_resources", json!({"job_id": "j", "mcp_servers": [], "priority": 3})));
    assert_eq!(e["field"], "priority");

    // A 2026-07-28 session needs the client context on every request.
    let r = s.request("tools/call", json!({"name": "get_capacity", "arguments": {}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("_meta"), "{r}");
    let r = s.request("tools/call", json!({"name": "nope", "arguments": {}, "_meta": meta_2026()}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    let r = ok(&s.call_2026("release_resources", json!({"allocation_id": id})));
    assert_eq!(r["workers_released"], 3);
    assert!(s.close().success());
}

#[test]
fn allocations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = StdioServer::start(dir.path(), &[]);
    s.initialize();
    let g = ok(&s.call(
        "request_resources",
        json!({"job_id": "keep", "mcp_servers": ["github", "jira"], "workers": 3, "metadata": {"team": "infra"}}),
    ));
    let id = g["allocation_id"].as_str().unwrap().to_string();
    assert!(s.close().success());

    // Started again (and stopped with SIGTERM this time): the same allocation, workers, endpoints.
    let mut s = StdioServer::start(dir.path(), &[]);
    s.initialize();
    let a = ok(&s.call("get_allocation", json!({"allocation_id": id})));
    assert_eq!(a["state"], "active");
    assert_eq!(a["metadata"], json!({"team": "infra"}));
    let workers = |v: &Value| -> Vec<(Value, Value)> {
        v.as_array().unwrap().iter().map(|w| (w["worker_id"].clone(), w["endpoint"].clone())).collect()
    };
    assert_eq!(workers(&a["workers"]), workers(&g["workers_allocated"]));
    let servers = |v: &Value| -> Vec<(Value, Value)> {
        v.as_array().unwrap().iter().map(|m| (m["name"].clone(), m["endpoint"].clone())).collect()
    };
    assert_eq!(servers(&a["mcp_servers"]), servers(&g["mcp_servers"]));
    let cap = ok(&s.call("get_capacity", json!({})));
    assert_eq!(cap["allocated_workers"], 3);
    // An MCP server keeps its endpoint for the next allocation that names it.
    let g2 = ok(&s.call("request_resources", json!({"job_id": "next", "mcp_servers": ["github"]})));
    assert_eq!(servers(&g2["mcp_servers"])[0], servers(&g["mcp_servers"])[0]);

    sigterm(&s.child);
    let status = wait_exit(&mut s.child, &s.stderr);
    assert!(status.success(), "SIGTERM is a clean shutdown: {status:?}\n{}", s.stderr.text());

    // The lock is released and the log is whole.
    let o = bin().arg("--data-dir").arg(dir.path()).arg("verify").output().unwrap();
    assert!(o.status.success(), "verify: {}", String::from_utf8_lossy(&o.stderr));
    let l = Ledger::open(dir.path()).expect("the lock was released");
    assert_eq!(l.get_allocation(&id).unwrap().unwrap().workers.len(), 3);
}

#[test]
fn a_second_writer_is_refused_with_exit_code_5() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = StdioServer::start(dir.path(), &[]);
    first.initialize(); // the ledger is open once the server answers
    let o = bin().arg("--data-dir").arg(dir.path()).arg("serve").stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("locked"));
    assert!(first.close().success());
}

#[test]
fn an_invalid_config_is_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"worker_slotz": 3}"#).unwrap();
    let o = bin()
        .arg("--data-dir")
        .arg(dir.path().join("ledger"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("worker_slotz"));
    assert!(o.stdout.is_empty(), "stdout carries only MCP messages");
}

#[test]
fn http_only_flags_are_refused_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .arg("--data-dir")
        .arg(dir.path().join("ledger"))
        .args(["serve", "--token-file", "/nonexistent"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--http only"));
}

/// The timer records an expiry without any caller writing: an allocation whose deadline passed
/// while no server ran is expired in the log shortly after the server starts.
#[test]
fn the_timer_records_expiries() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Micros::from_micros(chrono::Utc::now().timestamp_micros()) - 3_600_000_000);
    let id = {
        let l = Ledger::open_with(dir.path(), OpenOptions::default().clock(Arc::new(clock.clone()))).unwrap();
        match l.request_resources(&ResourceRequest::new("old").workers(2).ttl_seconds(60)).unwrap() {
            RequestOutcome::Granted(g) => g.allocation_id,
            RequestOutcome::Failed(f) => panic!("{}", f.error),
        }
    };

    let mut s = StdioServer::start(dir.path(), &[]);
    s.initialize();
    let reader = Ledger::open_read_only(dir.path()).unwrap();
    let start = Instant::now();
    loop {
        reader.refresh().unwrap();
        let expired = reader
            .events(1, usize::MAX)
            .unwrap()
            .iter()
            .any(|e| matches!(&e.event.body, EventBody::Expired { allocation_id, .. } if *allocation_id == id));
        if expired {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no expiry recorded; stderr:\n{}", s.stderr.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = ok(&s.call("get_allocation", json!({"allocation_id": id.to_string()})));
    assert_eq!(a["state"], "expired");
    assert!(a["timestamps"]["expired_at"].is_string());
    // Nothing left for the tool to do.
    assert_eq!(ok(&s.call("cleanup_expired", json!({})))["count"], 0);
    assert!(s.close().success());
}
