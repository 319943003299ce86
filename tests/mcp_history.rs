//! The history tools over MCP (stdio, the real binary): `get_capacity` and `list_allocations`
//! with `at`, `allocation_history` by allocation and by job, `usage_report`, their schemas and
//! their errors. The ledger's past is written beforehand through the library on a ManualClock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use allocation_ledger::{format_micros, Micros};
use allocation_ledger::{Ledger, ManualClock, OpenOptions, RequestOutcome, ResourceRequest};
use mcp_common::*;
use serde_json::{json, Value};
use std::sync::Arc;

const MINUTE: i64 = 60_000_000;

struct Past {
    a: String,
    b: String,
    /// When b was granted (a and b both held then).
    both_at: Micros,
    /// When a was released.
    released_at: Micros,
}

/// Two hours ago: job-a (2 workers, github, tenant red) granted; 10 minutes later job-b
/// (3 workers, tenant blue); 10 minutes later job-a released; a minute later job-c rejected.
fn write_past(dir: &std::path::Path) -> Past {
    let clock = ManualClock::new(Micros::from_micros(chrono::Utc::now().timestamp_micros()) - 120 * MINUTE);
    let l = Ledger::open_with(dir, OpenOptions::default().clock(Arc::new(clock.clone()))).unwrap();
    let tenant = |t: &str| {
        let mut m = serde_json::Map::new();
        m.insert("tenant".into(), t.into());
        m
    };
    let grant = |req: ResourceRequest| match l.request_resources(&req).unwrap() {
        RequestOutcome::Granted(g) => g.allocation_id.to_string(),
        RequestOutcome::Failed(f) => panic!("{}", f.error),
    };
    clock.advance_seconds(1);
    let a = grant(
        ResourceRequest::new("job-a").workers(2).mcp_server("github").ttl_seconds(604_800).metadata(tenant("red")),
    );
    clock.advance_micros(10 * MINUTE);
    let both_at = allocation_ledger::Clock::now_micros(&clock);
    let b = grant(ResourceRequest::new("job-b").workers(3).ttl_seconds(604_800).metadata(tenant("blue")));
    clock.advance_micros(10 * MINUTE);
    let released_at = allocation_ledger::Clock::now_micros(&clock);
    l.release_resources(&a).unwrap();
    clock.advance_micros(MINUTE);
    assert!(!l.request_resources(&ResourceRequest::new("job-c").workers(9)).unwrap().is_granted());
    Past { a, b, both_at, released_at }
}

fn tool<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["tools"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no tool {name}"))
}

#[test]
fn history_tools_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let past = write_past(dir.path());
    let mut s = StdioServer::start(dir.path(), &[]);
    s.initialize();

    // Schemas: the new tools and the optional `at`.
    let list = s.request("tools/list", json!({}))["result"].clone();
    for name in ["allocation_history", "usage_report"] {
        let t = tool(&list, name);
        assert_eq!(t["inputSchema"]["type"], "object");
        assert_eq!(t["outputSchema"]["type"], "object");
        assert_eq!(t["annotations"]["readOnlyHint"], true);
        assert!(t["description"].as_str().unwrap().len() > 40);
    }
    assert_eq!(tool(&list, "usage_report")["inputSchema"]["required"], json!(["since"]));
    assert_eq!(tool(&list, "allocation_history")["inputSchema"]["properties"]["limit"]["maximum"], 10_000);
    for name in ["get_capacity", "list_allocations"] {
        assert_eq!(tool(&list, name)["inputSchema"]["properties"]["at"]["type"], "string", "{name}");
    }

    // get_capacity at an instant: both held, github running.
    let cap = ok(&s.call("get_capacity", json!({"at": format_micros(past.both_at)})));
    assert_eq!(cap["allocated_workers"], 5);
    assert_eq!(cap["active_allocations"], 2);
    assert_eq!(cap["running_mcp_servers"], json!(["github"]));
    assert_eq!(cap["as_of"], format_micros(past.both_at));
    let cap = ok(&s.call("get_capacity", json!({"at": format_micros(past.released_at)})));
    assert_eq!(cap["allocated_workers"], 3);
    let now = ok(&s.call("get_capacity", json!({})));
    assert_eq!(now["allocated_workers"], 3);
    let future = ok(&s.call("get_capacity", json!({"at": "+1h"})));
    assert_eq!(future["allocated_workers"], 3);
    let e = err(&s.call("get_capacity", json!({"at": "2001-01-01T00:00:00Z"})));
    assert_eq!(e["field"], "at");
    assert!(e["error"].as_str().unwrap().contains("before the ledger begins"), "{e}");
    let e = err(&s.call("get_capacity", json!({"at": 5})));
    assert_eq!(e["field"], "at");
    let e = err(&s.call("get_capacity", json!({"at": "last tuesday"})));
    assert!(e["error"].as_str().unwrap().contains("RFC 3339"), "{e}");
    let e = err(&s.call("get_capacity", json!({"when": "-1h"})));
    assert!(e["error"].as_str().unwrap().contains("allowed arguments: at"), "{e}");

    // list_allocations at an instant: both active then (a is released now).
    let l = ok(&s.call("list_allocations", json!({"at": format_micros(past.both_at)})));
    assert_eq!(l["count"], 2);
    assert!(l["allocations"].as_array().unwrap().iter().all(|a| a["state"] == "active"));
    let l = ok(&s.call("list_allocations", json!({"at": format_micros(past.both_at), "job_id": "job-a"})));
    assert_eq!(l["allocations"][0]["allocation_id"], past.a.as_str());
    let l = ok(&s.call("list_allocations", json!({"state": "active"})));
    assert_eq!(l["count"], 1);

    // allocation_history by allocation and by job.
    let h = ok(&s.call("allocation_history", json!({"allocation_id": past.a})));
    let types: Vec<&str> = h["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["granted", "released"]);
    assert_eq!((h["count"].as_u64(), h["truncated"].as_bool()), (Some(2), Some(false)));
    assert_eq!(h["events"][1]["at"], format_micros(past.released_at));
    let h = ok(&s.call("allocation_history", json!({"job_id": "job-c"})));
    assert_eq!(h["events"][0]["type"], "rejected");
    assert_eq!(h["events"][0]["reason"], "insufficient_workers");
    let h = ok(&s.call("allocation_history", json!({"job_id": "job-a", "limit": 1})));
    assert_eq!((h["count"].as_u64(), h["truncated"].as_bool()), (Some(1), Some(true)));
    assert_eq!(h["events"][0]["type"], "released");
    let h = ok(&s.call("allocation_history", json!({"job_id": "nobody"})));
    assert_eq!(h["count"], 0);
    assert_eq!(err(&s.call("allocation_history", json!({})))["field"], "allocation_id");
    assert_eq!(
        err(&s.call("allocation_history", json!({"allocation_id": past.b, "job_id": "job-b"})))["field"],
        "job_id"
    );
    assert_eq!(err(&s.call("allocation_history", json!({"allocation_id": "alloc-1"})))["field"], "allocation_id");
    assert_eq!(err(&s.call("allocation_history", json!({"job_id": "job-a", "limit": 0})))["field"], "limit");
    assert_eq!(err(&s.call("allocation_history", json!({"job_id": "job-a", "limit": "2"})))["field"], "limit");
    let e = err(&s.call("allocation_history", json!({"allocation_id": "alloc-000000000000"})));
    assert_eq!(e["kind"], "not_found");

    // usage_report by tenant: red held 2 workers for exactly 20 minutes.
    let u = ok(&s.call("usage_report", json!({"since": "-3h", "by": "metadata.tenant"})));
    assert_eq!(u["group_by"], "metadata.tenant");
    let groups = u["groups"].as_array().unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g["group"].as_str().unwrap()).collect();
    assert_eq!(names, ["(none)", "blue", "red"]);
    let red = &groups[2];
    assert_eq!(red["worker_seconds"], 2400.0);
    assert_eq!(red["cpu_seconds"], 2400.0);
    assert_eq!((red["granted"].as_u64(), red["released"].as_u64()), (Some(1), Some(1)));
    assert_eq!(groups[0]["rejections"]["insufficient_workers"], 1);
    assert_eq!(u["total"]["rejected"], 1);
    let u = ok(&s
        .call("usage_report", json!({"since": format_micros(past.both_at), "until": format_micros(past.released_at)})));
    assert_eq!(u["group_by"], "job");
    assert_eq!(u["total"]["worker_seconds"], 5.0 * 600.0);
    assert_eq!(err(&s.call("usage_report", json!({})))["field"], "since");
    assert_eq!(err(&s.call("usage_report", json!({"since": "-1h", "by": "tenants"})))["field"], "by");
    // `tenant` groups by the tenant recorded with each grant (here from metadata.tenant).
    let by_tenant = ok(&s.call("usage_report", json!({"since": "-1h", "by": "tenant"})));
    assert_eq!(by_tenant["group_by"], "tenant");
    assert_eq!(err(&s.call("usage_report", json!({"since": "soon"})))["field"], "since");
    assert_eq!(err(&s.call("usage_report", json!({"since": "-1h", "until": "-2h"})))["field"], "until");
    assert!(s.close().success());
}
