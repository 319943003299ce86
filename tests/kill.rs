//! kill -9 under load: the real binary serves MCP over HTTP on loopback while several clients
//! request and release resources concurrently; the test kills it with SIGKILL at a random
//! moment (after a random number of acknowledged operations, with requests in flight),
//! restarts it, and repeats for a bounded number of rounds. At the end, every grant, rejection
//! and release a client saw acknowledged is in the log, no worker slot was ever held twice,
//! and `verify` passes. While the server runs, a second writer gets the locked error and a
//! read-only reader works.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

#[path = "mcp_common/mod.rs"]
mod mcp_common;

use allocation_ledger::{EventBody, Ledger};
use mcp_common::{HttpServer, DEADLINE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

const ROUNDS: usize = 8;
const CLIENTS: usize = 4;

/// What the clients saw acknowledged, across rounds.
#[derive(Default)]
struct Acked {
    /// allocation id -> job id
    grants: BTreeMap<String, String>,
    rejections: BTreeMap<String, String>,
    releases: BTreeSet<String>,
    count: u64,
}

#[derive(Default)]
struct Shared {
    acked: Mutex<Acked>,
    more: Condvar,
}

/// One `tools/call` in the 2026-07-28 stateless style; None if the server did not answer
/// (killed mid-request) or answered with something other than a tool result.
fn call(agent: &ureq::Agent, url: &str, tool: &str, args: Value) -> Option<Value> {
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": mcp_common::meta_2026()},
    });
    let mut resp = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", mcp_common::V_STATELESS)
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", tool)
        .send(body.to_string())
        .ok()?;
    if resp.status().as_u16() != 200 {
        return None;
    }
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let text = resp.body_mut().read_to_string().ok()?;
    let msg: Value = if sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("id").is_some())?
    } else {
        serde_json::from_str(&text).ok()?
    };
    let result = msg.get("result")?.clone();
    result.get("structuredContent").is_some().then_some(result)
}

/// A client: requests (one worker and an MCP server, or just a server), and releases its
/// oldest holding once it holds two; records every acknowledged outcome. Stops when the
/// server stops answering or `stop` is set.
fn client(url: String, tag: String, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let agent = mcp_common::agent();
    let mut held: Vec<String> = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let job = format!("{tag}-{i}");
        let workers = i % 2;
        let Some(r) = call(
            &agent,
            &url,
            "request_resources",
            json!({"job_id": job, "workers": workers, "mcp_servers": ["github"]}),
        ) else {
            return;
        };
        let sc = &r["structuredContent"];
        let id = sc["allocation_id"].as_str().unwrap_or_default().to_string();
        {
            let mut a = shared.acked.lock().unwrap();
            match (r["isError"].as_bool(), sc["status"].as_str()) {
                (Some(false), Some("active")) => {
                    a.grants.insert(id.clone(), job.clone());
                    held.push(id);
                }
                (Some(true), Some("failed")) => {
                    a.rejections.insert(id, job.clone());
                }
                other => panic!("{job}: unexpected answer {other:?}: {r}"),
            }
            a.count += 1;
        }
        shared.more.notify_all();
        if held.len() >= 2 {
            let id = held.remove(0);
            let Some(r) = call(&agent, &url, "release_resources", json!({"allocation_id": id})) else { return };
            assert_eq!(r["isError"], json!(false), "{r}");
            assert_eq!(r["structuredContent"]["status"], "released", "{r}");
            let mut a = shared.acked.lock().unwrap();
            a.releases.insert(id);
            a.count += 1;
            drop(a);
            shared.more.notify_all();
        }
    }
}

/// While the server runs: another writer is locked out, a reader works. (A CLI `request` or
/// `snapshot` would go to the server by itself: `init` has no server equivalent.)
fn check_lock_and_reader(dir: &Path) {
    let o = mcp_common::bin().arg("--data-dir").arg(dir).args(["--json", "init"]).output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stdout));
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["error"]["kind"], "locked");
    let o = mcp_common::bin().arg("--data-dir").arg(dir).args(["--json", "capacity"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let cap: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cap["total_workers"], 10);
}

#[test]
fn sigkill_under_concurrent_load_loses_no_acknowledged_operation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    // Small segments, frequent snapshots: kills land in rotations and snapshot writes too.
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, r#"{"segment_size_bytes": 4096, "snapshot_every": 5}"#).unwrap();
    let shared = Arc::new(Shared::default());
    let mut rng = 0x6b696c6c_u64;
    for round in 0..ROUNDS {
        // (Dropping the server on a panic kills it.)
        let mut server = HttpServer::start(&dir, &["--config", cfg.to_str().unwrap()]);
        if round == 0 {
            check_lock_and_reader(&dir);
        }
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let target_acks = 3 + (rng >> 33) % 30;
        let stop = Arc::new(AtomicBool::new(false));
        let start_count = shared.acked.lock().unwrap().count;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (url, shared, stop) = (server.url.clone(), shared.clone(), stop.clone());
                std::thread::spawn(move || client(url, format!("r{round}-c{c}"), shared, stop))
            })
            .collect();
        // Wait (on the clients' progress, not on the clock) until the round's random number of
        // acknowledgements, then kill the server with requests in flight.
        {
            let started = Instant::now();
            let mut a = shared.acked.lock().unwrap();
            while a.count < start_count + target_acks {
                let left = DEADLINE.checked_sub(started.elapsed()).unwrap_or_default();
                assert!(!left.is_zero(), "round {round}: no progress; server stderr:\n{}", server.stderr.text());
                a = shared.more.wait_timeout(a, left).unwrap().0;
            }
        }
        server.child.kill().unwrap(); // SIGKILL
        let status = server.child.wait().unwrap();
        assert!(!status.success(), "round {round}: the server was not killed");
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().unwrap();
        }
    }
    let acked = shared.acked.lock().unwrap();
    assert!(acked.grants.len() >= ROUNDS * 2, "{} grants", acked.grants.len());

    // verify passes on what the kills left (a torn tail alone is fine: the next open cuts it).
    let o = mcp_common::bin().arg("--data-dir").arg(&dir).args(["--json", "verify"]).output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(o.status.code(), Some(0));

    // Every acknowledged operation is in the log, with the job it was for.
    let ledger = Ledger::open(&dir).unwrap();
    let events = ledger.events(1, usize::MAX).unwrap();
    let mut granted = BTreeMap::new();
    let mut rejected = BTreeMap::new();
    let mut released = BTreeSet::new();
    for e in &events {
        match &e.event.body {
            EventBody::Granted(g) => {
                granted.insert(g.allocation_id.to_string(), g.job_id.clone());
            }
            EventBody::Rejected(r) => {
                rejected.insert(r.allocation_id.to_string(), r.job_id.clone());
            }
            EventBody::Released { allocation_id } => {
                released.insert(allocation_id.to_string());
            }
            _ => {}
        }
    }
    for (id, job) in &acked.grants {
        assert_eq!(granted.get(id), Some(job), "acknowledged grant {id} ({job}) is not in the log");
    }
    for (id, job) in &acked.rejections {
        assert_eq!(rejected.get(id), Some(job), "acknowledged rejection {id} ({job}) is not in the log");
    }
    for id in &acked.releases {
        assert!(released.contains(id), "acknowledged release of {id} is not in the log");
    }
    let state = ledger.with_state(std::clone::Clone::clone);
    state.check_invariants().unwrap();
    assert_eq!(state.anomalies, 0);
    drop(ledger);
    mcp_common::assert_no_double_grant(&dir);
    let o = mcp_common::bin().arg("--data-dir").arg(&dir).args(["--json", "verify"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    eprintln!(
        "{ROUNDS} kills: {} grants, {} rejections, {} releases acknowledged; {} events in the log",
        acked.grants.len(),
        acked.rejections.len(),
        acked.releases.len(),
        events.len()
    );
}
