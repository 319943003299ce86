//! `list_allocations` and `allocation_history` by pages over MCP (stdio, the real binary):
//! `limit`, `cursor`, `next_cursor`, the filters, the bounds (default 1,000, at most 10,000)
//! in the schema and in the errors, and refused cursors as isError results naming `cursor`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use allocation_ledger::{Config, Ledger, ManualClock, Micros, OpenOptions, Priority, RequestOutcome, ResourceRequest};
use mcp_common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;

/// 2,500 allocations written through the library (most released, so that memory keeps few of
/// them); the ids in order of creation.
fn write_past(dir: &std::path::Path) -> Vec<String> {
    let clock = ManualClock::new(Micros::from_micros(chrono::Utc::now().timestamp_micros()) - 3_600_000_000);
    let config = Config {
        worker_slots: 1_000,
        total_cpu_millicores: 4_000_000,
        total_memory_mib: 8_000_000,
        terminal_retained: 20,
        ..Config::default()
    };
    let l = Ledger::open_with(dir, OpenOptions::default().config(config).clock(Arc::new(clock.clone()))).unwrap();
    (0..2_500)
        .map(|i| {
            clock.advance_micros(500);
            let p = if i % 5 == 0 { Priority::High } else { Priority::Normal };
            let req =
                ResourceRequest::new(format!("job-{}", i % 4)).workers(1).priority(p).tenant(["red", "blue"][i % 2]);
            let id = match l.request_resources(&req).unwrap() {
                RequestOutcome::Granted(g) => g.allocation_id.to_string(),
                RequestOutcome::Failed(f) => panic!("{}", f.error),
            };
            if i % 9 != 0 {
                l.release_resources(&id).unwrap();
            }
            id
        })
        .collect()
}

fn ids(page: &Value) -> Vec<String> {
    page["allocations"].as_array().unwrap().iter().map(|a| a["allocation_id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn list_allocations_by_pages_over_stdio() {
    let tmp = tempfile::tempdir().unwrap();
    let past = write_past(tmp.path());
    let mut s = StdioServer::start(tmp.path(), &[]);
    s.initialize();

    let tools = s.request("tools/list", json!({}));
    let list = tools["result"]["tools"].as_array().unwrap().iter().find(|t| t["name"] == "list_allocations").unwrap();
    let props = &list["inputSchema"]["properties"];
    assert_eq!((props["limit"]["default"].as_u64(), props["limit"]["maximum"].as_u64()), (Some(1_000), Some(10_000)));
    for field in ["state", "job_id", "tenant", "priority", "since", "until", "cursor", "at"] {
        assert!(props.get(field).is_some(), "{field} in the schema");
    }
    assert!(list["description"].as_str().unwrap().contains("next_cursor"));

    // The default page is bounded: 1,000 of 2,500.
    let first = ok(&s.call("list_allocations", json!({})));
    assert_eq!((first["count"].as_u64(), ids(&first).len()), (Some(1_000), 1_000));
    assert_eq!(ids(&first), past[..1_000].to_vec());

    // Pages of 300 with a new allocation written between pages: each old one exactly once.
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let page = ok(&s.call("list_allocations", json!({"limit": 300, "cursor": cursor})));
        seen.extend(ids(&page));
        let g = ok(&s.call("request_resources", json!({"job_id": "late", "workers": 1})));
        assert!(g["allocation_id"].is_string(), "{g}");
        match &page["next_cursor"] {
            Value::String(_) => cursor = page["next_cursor"].clone(),
            Value::Null => break,
            other => panic!("next_cursor is {other}"),
        }
    }
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len(), "no allocation twice");
    assert_eq!(&seen[..2_500], &past[..], "every old one once, in order");

    // Filters: job, tenant, priority, state together, by pages of 7.
    let filter = json!({"job_id": "job-1", "tenant": "blue", "priority": "high", "state": "released"});
    let want: Vec<String> = past
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == 1 && i % 2 == 1 && i % 5 == 0 && i % 9 != 0)
        .map(|(_, id)| id.clone())
        .collect();
    let mut got = Vec::new();
    let mut args = filter.clone();
    args["limit"] = 7.into();
    loop {
        let page = ok(&s.call("list_allocations", args.clone()));
        got.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => args["cursor"] = c.into(),
            None => break,
        }
    }
    assert_eq!(got, want);

    // Refusals: a cursor of other filters, a made-up cursor, bounds, bad filter values.
    let c = first["next_cursor"].as_str().unwrap();
    for (args, field, words) in [
        (json!({"cursor": c, "job_id": "job-2"}), "cursor", "other filters"),
        (json!({"cursor": "AAAA"}), "cursor", "not a cursor"),
        (json!({"cursor": 12}), "cursor", "string"),
        (json!({"limit": 0}), "limit", "1 to 10000"),
        (json!({"limit": 10_001}), "limit", "1 to 10000"),
        (json!({"priority": "urgent"}), "priority", "low, normal, high, critical"),
        (json!({"state": "gone"}), "state", "active, released, expired, failed"),
        (json!({"since": "last week"}), "since", "RFC 3339"),
        (json!({"tenant": "red", "at": "-1m"}), "tenant", "at"),
    ] {
        let e = err(&s.call("list_allocations", args.clone()));
        assert_eq!(e["field"], field, "{args}: {e}");
        assert!(e["error"].as_str().unwrap().contains(words), "{args}: {e}");
    }

    // allocation_history: the most recent events, then the older ones by cursor.
    let whole = ok(&s.call("allocation_history", json!({"job_id": "job-3", "limit": 10_000})));
    let all: Vec<u64> = whole["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(whole["next_cursor"].is_null() && whole["truncated"] == json!(false));
    let mut pages = Vec::new();
    let mut args = json!({"job_id": "job-3", "limit": 100});
    loop {
        let page = ok(&s.call("allocation_history", args.clone()));
        pages.push(page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>());
        match page["next_cursor"].as_str() {
            Some(c) => args["cursor"] = c.into(),
            None => break,
        }
    }
    assert!(pages.len() > 5);
    assert_eq!(pages.into_iter().rev().flatten().collect::<Vec<_>>(), all);
    let e = err(&s.call("allocation_history", json!({"job_id": "job-2", "cursor": args["cursor"]})));
    assert_eq!(e["field"], "cursor", "{e}");
    s.close();
}
