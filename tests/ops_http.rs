//! The operator's endpoints of `serve --http`: `/healthz`, `/readyz` (503 after a failed
//! fsync), `/metrics` (parsed with an independent Prometheus text parser; the counters move),
//! who needs the token, and `--log-format json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use allocation_ledger::mcp::{self, HttpOptions, ServeOptions};
use allocation_ledger::storage::{Fault, FaultPlan, FaultyStorage, OpKind};
use allocation_ledger::{Ledger, OpenOptions, ResourceRequest};
use mcp_common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// GETs `url` with optional headers: (status, content type, body).
fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.call().expect("the HTTP request completes");
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (status, ctype, resp.body_mut().read_to_string().unwrap())
}

/// `http://host:port` of a `/mcp` URL.
fn base(mcp_url: &str) -> String {
    mcp_url.trim_end_matches("/mcp").to_string()
}

/// The samples of a scrape, by name and labels, parsed with `prometheus-parse`.
fn scrape(base: &str, headers: &[(&str, &str)]) -> BTreeMap<String, f64> {
    let (status, ctype, body) = get(&format!("{base}/metrics"), headers);
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    assert!(!parsed.samples.is_empty(), "{body}");
    let mut out = BTreeMap::new();
    for s in parsed.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        let key = if labels.is_empty() { s.metric } else { format!("{}{{{}}}", s.metric, labels.join(",")) };
        out.insert(key, value);
    }
    out
}

/// `serve --http 127.0.0.1:0` with RUST_LOG=`filter` and `extra` flags: the child, its
/// stderr and the `http://host:port` it listens on. (`HttpServer` sets RUST_LOG=warn.)
fn start_logging(dir: &std::path::Path, filter: &str, extra: &[&str]) -> (std::process::Child, StderrLog, String) {
    let mut child = bin()
        .arg("--data-dir")
        .arg(dir)
        .args(["serve", "--http", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", filter)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (stderr, _lines) = StderrLog::pump(child.stderr.take().unwrap());
    let text = wait_for_line(&stderr, "listening on http://");
    let i = text.find("listening on http://").unwrap() + "listening on ".len();
    let url = text[i..].lines().next().unwrap().trim().to_string();
    (child, stderr, base(&url))
}

#[test]
fn health_readiness_and_metrics_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, stderr, base) = start_logging(dir.path(), "info", &["--log-format", "json"]);
    let url = format!("{base}/mcp");

    let (status, _, body) = get(&format!("{base}/healthz"), &[]);
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, ctype, body) = get(&format!("{base}/readyz"), &[]);
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true, "{ready}");

    let before = scrape(&base, &[]);
    for name in [
        "allocation_ledger_grants_total",
        "allocation_ledger_releases_total",
        "allocation_ledger_expiries_total",
        "allocation_ledger_rejections_total{reason=insufficient_workers}",
        "allocation_ledger_rejections_total{reason=insufficient_cpu}",
        "allocation_ledger_rejections_total{reason=insufficient_memory}",
        "allocation_ledger_pool_workers",
        "allocation_ledger_available_workers",
        "allocation_ledger_allocated_cpu_millicores",
        "allocation_ledger_available_memory_mib",
        "allocation_ledger_fsync_duration_seconds_count",
        "allocation_ledger_events_per_fsync_count",
        "allocation_ledger_combine_batch_count",
        "allocation_ledger_snapshot_duration_seconds_count",
        "allocation_ledger_log_size_bytes",
        "allocation_ledger_ready",
    ] {
        assert!(before.contains_key(name), "{name} missing from {:?}", before.keys());
    }
    assert_eq!(before["allocation_ledger_grants_total"], 0.0);
    assert_eq!(before["allocation_ledger_pool_workers"], 10.0);
    assert_eq!(before["allocation_ledger_ready"], 1.0);

    let mut client = HttpClient::stateless(&url, None);
    let g = ok(&client.call("request_resources", json!({"job_id": "a", "mcp_servers": [], "workers": 4})));
    assert_eq!(g["status"], "active");
    let f = err(&client.call("request_resources", json!({"job_id": "b", "mcp_servers": [], "workers": 7})));
    assert_eq!(f["reason"], "insufficient_workers", "{f}");

    let after = scrape(&base, &[]);
    assert_eq!(after["allocation_ledger_grants_total"], 1.0);
    assert_eq!(after["allocation_ledger_rejections_total{reason=insufficient_workers}"], 1.0);
    assert_eq!(after["allocation_ledger_allocated_workers"], 4.0);
    assert_eq!(after["allocation_ledger_available_workers"], 6.0);
    assert!(after["allocation_ledger_fsync_duration_seconds_count"] >= 2.0, "{after:?}");
    assert!(after["allocation_ledger_log_size_bytes"] > 0.0);
    assert!(after["allocation_ledger_last_seq"] >= 3.0);

    sigterm(&child);
    assert!(wait_exit(&mut child, &stderr).success());
    // --log-format json: every log line the server wrote (but the address line the tests and
    // scripts read, which is printed as it is) is a JSON object.
    let text = wait_for_line(&stderr, "server stopped");
    let mut json_lines = 0;
    for line in text.lines().filter(|l| !l.contains("listening on http://")) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{text}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        json_lines += 1;
    }
    assert!(json_lines >= 2, "the open and the stop are logged: {text}");
    assert!(text.contains("\"message\":\"ledger opened\""), "{text}");
}

/// The stderr collected so far once it has a line containing `needle` (the pump thread may
/// lag behind the process's exit).
fn wait_for_line(stderr: &StderrLog, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = stderr.text();
        if text.contains(needle) {
            return text;
        }
        assert!(start.elapsed() < DEADLINE, "no {needle:?} in stderr:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rust_log_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    // RUST_LOG=allocation_ledger=debug: more than the default (debug lines), and in EnvFilter's
    // syntax; then RUST_LOG=error: not even the "ledger opened" line (info).
    for (filter, wants_info) in [("allocation_ledger=debug", true), ("error", false)] {
        let (mut child, stderr, _) = start_logging(dir.path(), filter, &[]);
        sigterm(&child);
        assert!(wait_exit(&mut child, &stderr).success());
        std::thread::sleep(Duration::from_millis(200));
        let text = stderr.text();
        assert_eq!(text.contains("ledger opened"), wants_info, "RUST_LOG={filter}:\n{text}");
    }
}

#[test]
fn health_is_open_on_loopback_but_metrics_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let server = HttpServer::start(&dir.path().join("ledger"), &["--token-file", token_file.to_str().unwrap()]);
    let base = base(&server.url);
    assert_eq!(get(&format!("{base}/healthz"), &[]).0, 200);
    assert_eq!(get(&format!("{base}/readyz"), &[]).0, 200);
    let (status, _, _) = get(&format!("{base}/metrics"), &[]);
    assert_eq!(status, 401);
    assert_eq!(get(&format!("{base}/metrics"), &[("Authorization", "Bearer wrong")]).0, 401);
    let m = scrape(&base, &[("Authorization", "Bearer s3cret-token")]);
    assert_eq!(m["allocation_ledger_ready"], 1.0);
    // The Host check (DNS rebinding) applies to them as to /mcp.
    assert_eq!(get(&format!("{base}/healthz"), &[("Host", "evil.example")]).0, 403);
    assert!(server.stop().success());
}

/// A free loopback port (bound, then let go; the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn readyz_goes_503_after_a_failed_fsync() {
    let storage = FaultyStorage::new();
    let opts = OpenOptions::default().storage(Arc::new(storage.clone()));
    let ledger = Ledger::open_with("/ledger", opts).unwrap();
    let port = free_port();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http = HttpOptions::new(format!("127.0.0.1:{port}").parse().unwrap());
    let server = runtime.spawn(mcp::serve_http(ledger.clone(), ServeOptions::default(), http, async {
        let _ = stop_rx.await;
    }));
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < DEADLINE, "the server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }

    assert_eq!(get(&format!("{base}/readyz"), &[]).0, 200);
    ledger.request_resources(&ResourceRequest::new("before").workers(1)).unwrap();
    assert_eq!(scrape(&base, &[])["allocation_ledger_grants_total"], 1.0);

    storage.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth: 0, fault: Fault::Fail, sticky: true }));
    let failed = ledger.request_resources(&ResourceRequest::new("lost").workers(1));
    assert!(failed.is_err(), "the write whose fsync failed is not acknowledged: {failed:?}");

    let (status, ctype, body) = get(&format!("{base}/readyz"), &[]);
    assert_eq!(status, 503, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert!(v["reason"].as_str().unwrap().contains("fsync"), "{v}");
    assert_eq!(get(&format!("{base}/healthz"), &[]).0, 200, "the process is still up");
    let m = scrape(&base, &[]);
    assert_eq!(m["allocation_ledger_ready"], 0.0);
    assert_eq!(m["allocation_ledger_grants_total"], 2.0, "counted when appended; readiness says it was lost");

    let _ = stop_tx.send(());
    runtime.block_on(server).unwrap().unwrap();
}

#[test]
fn readyz_is_503_for_a_read_only_ledger() {
    let dir = tempfile::tempdir().unwrap();
    drop(Ledger::open(dir.path()).unwrap());
    let ledger = Ledger::open_read_only(dir.path()).unwrap();
    let port = free_port();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http = HttpOptions::new(format!("127.0.0.1:{port}").parse().unwrap());
    let server = runtime.spawn(mcp::serve_http(ledger, ServeOptions::default(), http, async {
        let _ = stop_rx.await;
    }));
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < DEADLINE, "the server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, _, body) = get(&format!("http://127.0.0.1:{port}/readyz"), &[]);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("read-only"), "{body}");
    let _ = stop_tx.send(());
    runtime.block_on(server).unwrap().unwrap();
}

/// docs/operations.md, "Backups": a copy taken while a writer runs (snapshots first, then the
/// segments in name order) verifies, or has only a torn tail, or, if it caught a gap in the
/// newest segment, verifies after that segment is copied again; and it opens.
#[test]
fn an_online_copy_in_the_documented_order_opens() {
    use allocation_ledger::layout::{SNAPSHOT_DIR, WAL_DIR};
    use allocation_ledger::storage::FsStorage;
    use allocation_ledger::Config;
    let src = tempfile::tempdir().unwrap();
    let config = Config { snapshot_every: 50, segment_size_bytes: 64 * 1024, ..Config::default() };
    let ledger = Ledger::open_with(src.path(), OpenOptions { config: Some(config), ..Default::default() }).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (ledger, stop) = (ledger.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let g = ledger.request_resources(&ResourceRequest::new(format!("job-{w}-{n}")).workers(1)).unwrap();
                    if let allocation_ledger::RequestOutcome::Granted(g) = g {
                        ledger.release_resources(&g.allocation_id.to_string()).unwrap();
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let copy_dir = |from: &std::path::Path, to: &std::path::Path, only_last: bool| {
        std::fs::create_dir_all(to).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(from).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        let names = if only_last { names.split_off(names.len() - 1) } else { names };
        for name in names {
            // A snapshot pruned meanwhile is skipped, as the docs say.
            let _ = std::fs::copy(from.join(&name), to.join(&name));
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..5 {
        let dst = tempfile::tempdir().unwrap();
        copy_dir(&src.path().join(SNAPSHOT_DIR), &dst.path().join(SNAPSHOT_DIR), false);
        copy_dir(&src.path().join(WAL_DIR), &dst.path().join(WAL_DIR), false);
        let mut report = allocation_ledger::verify(&FsStorage::default(), dst.path(), &mut |_, _| {}).unwrap();
        for _ in 0..10 {
            if report.ok {
                break;
            }
            copy_dir(&src.path().join(WAL_DIR), &dst.path().join(WAL_DIR), true);
            report = allocation_ledger::verify(&FsStorage::default(), dst.path(), &mut |_, _| {}).unwrap();
        }
        assert!(report.ok, "round {round}: {report:?}");
        let copy = Ledger::open(dst.path()).unwrap();
        assert!(copy.status().last_seq > 1, "round {round}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
}
