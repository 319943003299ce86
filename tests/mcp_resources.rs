//! The MCP-native way to watch: resources (`resources/list`, `resources/read`, the allocation
//! template), subscriptions (`notifications/resources/updated` after a write by another
//! session) and logging (`logging/setLevel`, then `notifications/message`), over Streamable HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use mcp_common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::mpsc::{channel, Receiver};
use std::time::Instant;

/// Opens the session's standalone SSE stream (GET /mcp) and forwards each JSON-RPC message on
/// it; returns once the stream is open, so nothing sent after this is missed.
fn listen(client: &HttpClient) -> Receiver<Value> {
    let (tx, rx) = channel();
    let (opened_tx, opened) = channel();
    let (url, session) = (client.url.clone(), client.session.clone().expect("a session"));
    std::thread::spawn(move || {
        let resp = agent()
            .get(&url)
            .header("Accept", "text/event-stream")
            .header("Mcp-Session-Id", &session)
            .header("MCP-Protocol-Version", V_LEGACY)
            .call();
        let resp = match resp {
            Ok(r) if r.status() == 200 => {
                opened_tx.send(Ok(())).unwrap();
                r
            }
            Ok(r) => return opened_tx.send(Err(format!("GET /mcp: HTTP {}", r.status()))).unwrap(),
            Err(e) => return opened_tx.send(Err(format!("GET /mcp: {e}"))).unwrap(),
        };
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data:") {
                if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        }
    });
    opened.recv_timeout(DEADLINE).expect("the stream opens").unwrap();
    rx
}

/// Waits (up to the deadline) for a message that satisfies `want`; panics with what arrived.
fn wait_for(rx: &Receiver<Value>, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = DEADLINE.checked_sub(start.elapsed()).unwrap_or_default();
        match rx.recv_timeout(left) {
            Ok(m) if want(&m) => return m,
            Ok(m) => seen.push(m),
            Err(e) => panic!("no {what} ({e}); received instead: {seen:#?}"),
        }
    }
}

fn updated(uri: &str) -> impl Fn(&Value) -> bool + '_ {
    move |m| m["method"] == "notifications/resources/updated" && m["params"]["uri"] == uri
}

/// `resources/read` of a JSON resource: its parsed text, after checking the envelope.
fn read_json(client: &mut HttpClient, uri: &str) -> Value {
    let r = client.request("resources/read", json!({"uri": uri}));
    let contents = r["result"]["contents"].as_array().unwrap_or_else(|| panic!("{uri}: {r}"));
    assert_eq!(contents.len(), 1, "{r}");
    assert_eq!((contents[0]["uri"].as_str(), contents[0]["mimeType"].as_str()), (Some(uri), Some("application/json")));
    serde_json::from_str(contents[0]["text"].as_str().unwrap()).unwrap()
}

#[test]
fn resources_are_listed_read_and_subscribed_to() {
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &[]);
    let mut watcher = HttpClient::new(&server.url, None);
    let init = watcher.initialize();
    assert_eq!(init["capabilities"]["resources"]["subscribe"], true, "{init}");
    assert!(init["capabilities"]["logging"].is_object(), "{init}");
    assert!(init["capabilities"]["tools"].is_object(), "{init}");

    let list = watcher.request("resources/list", json!({}));
    let uris: Vec<&str> =
        list["result"]["resources"].as_array().unwrap().iter().map(|r| r["uri"].as_str().unwrap()).collect();
    assert_eq!(uris, ["ledger://capacity", "ledger://events"], "{list}");
    let templates = watcher.request("resources/templates/list", json!({}));
    assert_eq!(templates["result"]["resourceTemplates"][0]["uriTemplate"], "ledger://allocations/{allocation_id}");

    let cap = read_json(&mut watcher, "ledger://capacity");
    assert_eq!((cap["total_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(10), Some(10)), "{cap}");
    let missing = watcher.request("resources/read", json!({"uri": "ledger://allocations/alloc-000000000000"}));
    assert_eq!(missing["error"]["code"], -32002, "{missing}");
    let unknown = watcher.request("resources/read", json!({"uri": "ledger://nothing"}));
    assert_eq!(unknown["error"]["code"], -32002, "{unknown}");

    let notes = listen(&watcher);
    let r = watcher.request("resources/subscribe", json!({"uri": "ledger://capacity"}));
    assert_eq!(r["result"], json!({}), "{r}");
    let r = watcher.request("resources/subscribe", json!({"uri": "ledger://events"}));
    assert_eq!(r["result"], json!({}), "{r}");
    let r = watcher.request("logging/setLevel", json!({"level": "info"}));
    assert_eq!(r["result"], json!({}), "{r}");

    // Another session writes; the watcher hears of it.
    let mut agent = HttpClient::new(&server.url, None);
    agent.initialize();
    let g = ok(&agent.call("request_resources", json!({"job_id": "watched", "mcp_servers": [], "workers": 3})));
    let id = g["allocation_id"].as_str().unwrap().to_string();
    wait_for(&notes, "capacity update", updated("ledger://capacity"));
    wait_for(&notes, "events update", updated("ledger://events"));
    let log = wait_for(&notes, "a log message of the grant", |m| {
        m["method"] == "notifications/message" && m["params"]["data"]["event"] == "granted"
    });
    assert_eq!(log["params"]["level"], "info", "{log}");
    assert_eq!(log["params"]["data"]["allocation_id"], id.as_str(), "{log}");
    let cap = read_json(&mut watcher, "ledger://capacity");
    assert_eq!(cap["available_workers"], 7, "{cap}");

    // One allocation: read through the template, then its release is announced.
    let uri = format!("ledger://allocations/{id}");
    let a = read_json(&mut watcher, &uri);
    assert_eq!((a["state"].as_str(), a["job_id"].as_str()), (Some("active"), Some("watched")), "{a}");
    let r = watcher.request("resources/subscribe", json!({"uri": uri}));
    assert_eq!(r["result"], json!({}), "{r}");
    let r = ok(&agent.call("release_resources", json!({"allocation_id": id})));
    assert_eq!(r["status"], "released");
    wait_for(&notes, "allocation update", updated(&uri));
    let a = read_json(&mut watcher, &uri);
    assert_eq!(a["state"], "released", "{a}");

    // A rejection logs at notice, which a `notice` level lets through.
    let r = watcher.request("logging/setLevel", json!({"level": "notice"}));
    assert_eq!(r["result"], json!({}), "{r}");
    let g = ok(&agent.call("request_resources", json!({"job_id": "holder", "mcp_servers": [], "workers": 8})));
    assert_eq!(g["status"], "active", "{g}");
    let f = err(&agent.call("request_resources", json!({"job_id": "too-big", "mcp_servers": [], "workers": 5})));
    assert_eq!(f["status"], "failed", "{f}");
    let log = wait_for(&notes, "a log message of the rejection", |m| {
        m["method"] == "notifications/message" && m["params"]["data"]["event"] == "rejected"
    });
    assert_eq!(log["params"]["level"], "notice", "{log}");

    let events = read_json(&mut watcher, "ledger://events");
    let types: Vec<&str> = events["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ledger_created", "granted", "released", "granted", "rejected"], "{events}");
    assert_eq!(events["count"], 5);
    assert_eq!(events["last_seq"], 5);

    // Unsubscribing is accepted; a URI that was never subscribed to is ignored.
    let r = watcher.request("resources/unsubscribe", json!({"uri": "ledger://capacity"}));
    assert_eq!(r["result"], json!({}), "{r}");
    let r = watcher.request("resources/unsubscribe", json!({"uri": "ledger://never"}));
    assert_eq!(r["result"], json!({}), "{r}");
    assert!(server.stop().success());
}
