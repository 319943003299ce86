//! The `what_if` tool over MCP (stdio, the real binary): its schema, a what-if with more
//! workers, the recorded config's reproduction, and its errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use allocation_ledger::{Ledger, ManualClock, Micros, OpenOptions, ResourceRequest};
use mcp_common::*;
use serde_json::json;
use std::sync::Arc;

#[test]
fn what_if_tool_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    {
        let clock = ManualClock::new(Micros::from_micros(chrono::Utc::now().timestamp_micros()) - 3_600_000_000);
        let l = Ledger::open_with(dir.path(), OpenOptions::default().clock(Arc::new(clock.clone()))).unwrap();
        let mut meta = serde_json::Map::new();
        meta.insert("tenant".into(), "red".into());
        assert!(l.request_resources(&ResourceRequest::new("big").workers(9)).unwrap().is_granted());
        clock.advance_seconds(60);
        let small = ResourceRequest::new("small").workers(2).metadata(meta);
        assert!(!l.request_resources(&small).unwrap().is_granted());
    }
    let mut s = StdioServer::start(dir.path(), &[]);
    s.initialize();
    let list = s.request("tools/list", json!({}))["result"].clone();
    let t = list["tools"].as_array().unwrap().iter().find(|t| t["name"] == "what_if").unwrap().clone();
    assert_eq!(t["inputSchema"]["properties"]["config"]["type"], "object");
    assert_eq!(t["outputSchema"]["type"], "object");
    assert_eq!(t["annotations"]["readOnlyHint"], true);

    let r = ok(&s.call("what_if", json!({"config": {"worker_slots": 12}, "since": "-2h"})));
    assert_eq!((r["reality"]["granted"].as_u64(), r["reality"]["rejected"].as_u64()), (Some(1), Some(1)));
    assert_eq!((r["what_if"]["granted"].as_u64(), r["what_if"]["rejected"].as_u64()), (Some(2), Some(0)));
    assert_eq!(r["jobs"][0]["name"], "small");
    assert_eq!(r["tenants"][0]["name"], "red");
    let r = ok(&s.call("what_if", json!({})));
    assert_eq!(r["reproduced"], true);

    assert_eq!(err(&s.call("what_if", json!({"config": 12})))["field"], "config");
    assert_eq!(err(&s.call("what_if", json!({"config": {"worker_slots": "x"}})))["field"], "config.worker_slots");
    assert_eq!(err(&s.call("what_if", json!({"hold": "forever"})))["field"], "hold");
    assert_eq!(err(&s.call("what_if", json!({"pool": 3})))["field"], "pool");
    s.close();
}
