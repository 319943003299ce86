//! MCP tool-call round trip over stdio (issue 6, item 5): `allocation-ledger serve` is started as
//! an MCP client would start it, spoken to with newline-delimited JSON-RPC (the `initialize`
//! handshake, then `tools/call`), one call at a time; p50 and p99 of `get_capacity` and of
//! `request_resources` + `release_resources`, next to the same operations called in-process
//! through the library (the MCP overhead is the difference).
//! `BENCH_QUICK=1` (or `--quick`) runs a few calls only.

mod common;

use allocation_ledger::{Ledger, RequestOutcome, ResourceRequest};
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

impl Server {
    fn start(dir: &std::path::Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
            .env_remove("ALLOCATION_LEDGER_DIR")
            .env("RUST_LOG", "warn")
            .arg("--data-dir")
            .arg(dir)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting allocation-ledger serve");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Server { child, stdin, stdout, next_id: 1 }
    }

    fn send(&mut self, msg: &Value) {
        let mut line = msg.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Sends a request and reads lines until its response arrives.
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "the server closed stdout");
            let v: Value = serde_json::from_str(&line).expect("a JSON-RPC line");
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
        }
    }

    /// `tools/call`; returns structuredContent, panicking on an error result.
    fn call(&mut self, tool: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": tool, "arguments": args}));
        let result = &r["result"];
        assert_eq!(result["isError"], json!(false), "{tool} failed: {r}");
        result["structuredContent"].clone()
    }

    fn close(mut self) {
        drop(self.stdin);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.wait();
    }
}

fn shown(s: &Samples) -> String {
    format!("{} / {}", fmt_secs(s.pct(50.0)), fmt_secs(s.pct(99.0)))
}

fn main() {
    let quick = quick();
    let mut report = Report::new("mcp");
    let (n_cap, n_pairs) = if quick { (50, 10) } else { (3000, 400) };

    report.section("MCP tool call round trip over stdio (issue 6, item 5)");
    machine_note(&mut report);
    let dir = scratch_dir("mcp-");
    let t = Instant::now();
    let mut s = Server::start(dir.path());
    let init = s.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "allocation-ledger-bench", "version": "0"}}),
    );
    assert!(init["result"]["serverInfo"].is_object(), "{init}");
    s.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let startup = t.elapsed().as_secs_f64();

    // The same operations in-process, on a ledger of the same (default) config, interleaved
    // call by call with the server's so that both see the same disk; and the fsync of a raw
    // append beside them, since this disk's fsync latency moves with other processes' I/O.
    let dir2 = scratch_dir("mcp-inproc-");
    let ledger = Ledger::open(dir2.path()).unwrap();
    let mut raw = std::fs::OpenOptions::new().create_new(true).append(true).open(dir2.path().join("raw.wal")).unwrap();
    let record = [b'x'; 400];
    for _ in 0..20 {
        s.call("get_capacity", json!({}));
    }
    let (mut cap, mut cap_lib) = (Vec::with_capacity(n_cap), Vec::with_capacity(n_cap));
    for _ in 0..n_cap {
        let t = Instant::now();
        s.call("get_capacity", json!({}));
        cap.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(ledger.get_capacity().unwrap());
        cap_lib.push(t.elapsed());
    }
    let (mut pair, mut req, mut rel, mut pair_lib, mut fsync) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n_pairs {
        let t = Instant::now();
        let g = s.call("request_resources", json!({"job_id": format!("bench-{i}"), "mcp_servers": [], "workers": 1}));
        let t_req = t.elapsed();
        let id = g["allocation_id"].as_str().expect("granted").to_string();
        let t2 = Instant::now();
        s.call("release_resources", json!({"allocation_id": id}));
        rel.push(t2.elapsed());
        req.push(t_req);
        pair.push(t.elapsed());

        let t = Instant::now();
        let RequestOutcome::Granted(g) =
            ledger.request_resources(&ResourceRequest::new(format!("bench-{i}")).workers(1)).unwrap()
        else {
            panic!("not granted")
        };
        ledger.release_resources(&g.allocation_id.to_string()).unwrap();
        pair_lib.push(t.elapsed());

        raw.write_all(&record).unwrap();
        let t = Instant::now();
        raw.sync_data().unwrap();
        fsync.push(t.elapsed());
    }
    s.close();
    drop(ledger);

    let (cap, pair, req, rel) = (
        Samples::from_durations(&cap),
        Samples::from_durations(&pair),
        Samples::from_durations(&req),
        Samples::from_durations(&rel),
    );
    let (cap_lib, pair_lib) = (Samples::from_durations(&cap_lib), Samples::from_durations(&pair_lib));
    let fsync = Samples::from_durations(&fsync);
    report.row(Row {
        id: "mcp_get_capacity".into(),
        what: format!("get_capacity over stdio: p50 / p99 ({n_cap} calls)"),
        value: cap.pct(50.0),
        unit: "s".into(),
        shown: shown(&cap),
        against: format!("in-process Ledger::get_capacity {}", shown(&cap_lib)),
        ratio: None,
        target: String::new(),
        met: None,
    });
    report.row(Row {
        id: "mcp_request_release".into(),
        what: format!("request_resources + release_resources over stdio: p50 / p99 ({n_pairs} pairs)"),
        value: pair.pct(50.0),
        unit: "s".into(),
        shown: shown(&pair),
        against: format!("in-process request + release {}", shown(&pair_lib)),
        ratio: None,
        target: String::new(),
        met: None,
    });
    report.value("mcp_request", "  request_resources alone: p50 / p99", req.pct(50.0), "s", shown(&req));
    report.value("mcp_release", "  release_resources alone: p50 / p99", rel.pct(50.0), "s", shown(&rel));
    report.value(
        "mcp_fsync",
        "fdatasync of a raw append, sampled between the pairs: p50 / p99",
        fsync.pct(50.0),
        "s",
        shown(&fsync),
    );
    report.value("mcp_startup", "server start to initialize response", startup, "s", fmt_secs(startup));
    report.note(
        "one call in flight at a time, as an agent makes them; request and release each wait for an fsync, so the \
         pair costs at least two fsyncs of this disk",
    );
    report.finish();
}
