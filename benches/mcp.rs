//! MCP tool-call round trip over stdio (issue 6, item 5): `allocation-ledger serve` is started as
//! an MCP client would start it, spoken to with newline-delimited JSON-RPC (the `initialize`
//! handshake, then `tools/call`), one call at a time; p50 and p99 of `get_capacity` and of
//! `request_resources` + `release_resources`, next to the same operations called in-process
//! through the library (the MCP overhead is the difference).
//! Then the same `get_capacity` over Streamable HTTP (`serve --http 127.0.0.1:0`) with a small
//! blocking HTTP/1.1 client: one kept-alive connection (the case Nagle's algorithm stalled by
//! ~40 ms a call), a new connection per call, and 64 sessions at once on their own threads and
//! connections (calls/s, and the server's CPU time over the run).
//! `BENCH_QUICK=1` (or `--quick`) runs a few calls only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::{Ledger, RequestOutcome, ResourceRequest};
use common::{fmt_rate, fmt_secs, machine_note, quick, scratch_dir, Report, Row, Samples};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
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

/// A minimal HTTP/1.1 client for one MCP session on one connection (reopened per call when
/// `reconnect`), as an agent's HTTP library would make the calls.
struct HttpSession {
    authority: String,
    stream: BufReader<TcpStream>,
    session: Option<String>,
    reconnect: bool,
    next_id: u64,
}

impl HttpSession {
    fn open(authority: &str, reconnect: bool) -> HttpSession {
        let stream = BufReader::new(TcpStream::connect(authority).expect("connecting to the server"));
        let mut s = HttpSession { authority: authority.to_string(), stream, session: None, reconnect, next_id: 1 };
        let (headers, body) = s.post(
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "allocation-ledger-bench", "version": "0"}}}),
        );
        assert!(message(&body)["result"]["serverInfo"].is_object(), "{body}");
        s.session = Some(header(&headers, "mcp-session-id").expect("a session id").to_string());
        s.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        s
    }

    /// POSTs one message; the response head and body.
    fn post(&mut self, msg: &Value) -> (String, String) {
        if self.reconnect && self.session.is_some() {
            self.stream = BufReader::new(TcpStream::connect(&self.authority).expect("connecting to the server"));
        }
        let body = msg.to_string();
        let session = self
            .session
            .as_ref()
            .map_or(String::new(), |s| format!("Mcp-Session-Id: {s}\r\nMCP-Protocol-Version: 2025-11-25\r\n"));
        let request = format!(
            "POST /mcp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\n{session}Content-Length: {}\r\n\r\n{body}",
            self.authority,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(self.stream.read_line(&mut line).unwrap() > 0, "the server closed the connection");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 2"), "{head}");
        let mut body = Vec::new();
        if header(&head, "transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
                let mut chunk = vec![0; n + 2];
                self.stream.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            let n: usize = header(&head, "content-length").map_or(0, |n| n.parse().unwrap());
            body.resize(n, 0);
            self.stream.read_exact(&mut body).unwrap();
        }
        (head, String::from_utf8(body).unwrap())
    }

    /// `tools/call`; returns structuredContent, panicking on an error result.
    fn call(&mut self, tool: &str, args: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let (_, body) = self.post(
            &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}),
        );
        let mut m = message(&body);
        assert_eq!(m["result"]["isError"], json!(false), "{tool} failed: {body}");
        m["result"]["structuredContent"].take()
    }

    fn get_capacity(&mut self) {
        self.call("get_capacity", json!({}));
    }

    /// A durable grant of one worker, then its durable release.
    fn request_release(&mut self, job_id: &str) {
        let g = self.call("request_resources", json!({"job_id": job_id, "mcp_servers": [], "workers": 1}));
        let id = g["allocation_id"].as_str().unwrap_or_else(|| panic!("not granted: {g}")).to_string();
        self.call("release_resources", json!({"allocation_id": id}));
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The JSON-RPC response in a body: JSON, or the `data:` line of an SSE stream that has an id.
fn message(body: &str) -> Value {
    if body.starts_with('{') {
        return serde_json::from_str(body).unwrap();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC response in {body:?}"))
}

/// `serve --http 127.0.0.1:0`; its pid and `host:port`.
fn start_http(dir: &std::path::Path) -> (Child, String) {
    start_http_with(dir, &[])
}

/// [`start_http`] with more global arguments (e.g. `--config FILE`).
fn start_http_with(dir: &std::path::Path, global: &[&std::ffi::OsStr]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
        .env_remove("ALLOCATION_LEDGER_DIR")
        .env_remove("ALLOCATION_LEDGER_TOKEN")
        .env("RUST_LOG", "warn")
        .arg("--data-dir")
        .arg(dir)
        .args(global)
        .args(["serve", "--http", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting allocation-ledger serve --http");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(i) = line.find("http://") {
            let authority = line[i + 7..].trim().trim_end_matches("/mcp").to_string();
            // Keep draining stderr so the server never blocks on it.
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return (child, authority);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the server did not say where it listens");
}

fn stop_http(mut child: Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// User + system CPU seconds of a live process (Linux /proc; 0 elsewhere).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
    ticks / 100.0 // USER_HZ, 100 on Linux
}

fn http_section(report: &mut Report, quick: bool) {
    let (n, seconds) = if quick { (50, 0.5) } else { (3000, 5.0) };
    report.section("MCP tool call over Streamable HTTP: get_capacity by connection pattern");
    let dir = scratch_dir("mcp-http-");
    let (child, authority) = start_http(dir.path());
    for (id, what, reconnect) in [
        ("mcp_http_kept_alive", "get_capacity on one kept-alive connection: p50 / p99", false),
        ("mcp_http_new_connection", "get_capacity on a new connection per call: p50 / p99", true),
    ] {
        let mut s = HttpSession::open(&authority, reconnect);
        for _ in 0..20 {
            s.get_capacity();
        }
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.get_capacity();
            lat.push(t.elapsed());
        }
        let lat = Samples::from_durations(&lat);
        report.value(id, &format!("{what} ({n} calls)"), lat.pct(50.0), "s", shown(&lat));
    }

    let run = sessions_run(child.id(), &authority, seconds, |s, _| s.get_capacity());
    report.value(
        "mcp_http_64_sessions",
        &format!("{SESSIONS} sessions at once, each one call at a time on its own connection: calls/s"),
        run.rate(),
        "/s",
        run.shown(),
    );
    stop_http(child);
    report.note(
        "the client is a small blocking HTTP/1.1 client (one write per request, Nagle left on as most libraries do); \
         scripts/mcp_latency.py measures the same with Python http.client and Node fetch",
    );
}

/// Concurrent sessions in the 64-session runs.
const SESSIONS: usize = 64;

/// What [`sessions_run`] measured.
struct SessionsRun {
    ops: u64,
    wall_seconds: f64,
    server_cpu_seconds: f64,
    lat: Samples,
}

impl SessionsRun {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.wall_seconds
    }

    fn shown(&self) -> String {
        format!(
            "{} (p50 / p99 {}; server CPU {:.2} s in {:.2} s: {:.2} cores)",
            fmt_rate(self.rate()),
            shown(&self.lat),
            self.server_cpu_seconds,
            self.wall_seconds,
            self.server_cpu_seconds / self.wall_seconds
        )
    }
}

/// [`SESSIONS`] sessions at once, a thread and a kept-alive connection each, each running `op`
/// one at a time until `seconds` have passed; `op` gets its session and a number unique in the
/// run.
fn sessions_run(server_pid: u32, authority: &str, seconds: f64, op: fn(&mut HttpSession, u64)) -> SessionsRun {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut sessions: Vec<HttpSession> = (0..SESSIONS).map(|_| HttpSession::open(authority, false)).collect();
    for s in &mut sessions {
        s.get_capacity();
    }
    let cpu_before = cpu_seconds(server_pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = sessions
        .into_iter()
        .map(|mut s| {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(&mut s, counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().expect("a session thread panicked")).collect();
    let wall_seconds = start.elapsed().as_secs_f64();
    SessionsRun {
        ops: lat.len() as u64,
        wall_seconds,
        server_cpu_seconds: cpu_seconds(server_pid) - cpu_before,
        lat: Samples::from_durations(&lat),
    }
}

/// Issue 16: 64 sessions over Streamable HTTP, reads (`get_capacity`) and durable writes
/// (`request_resources` + `release_resources` pairs), beside one session over HTTP and over
/// stdio (the stdio section above) for the same operations.
fn http_sessions_section(report: &mut Report, quick: bool, stdio: (&Samples, &Samples)) {
    let (seconds, n) = if quick { (0.5, 20) } else { (5.0, 400) };
    report.section("MCP over Streamable HTTP: 64 sessions, reads and durable writes (issue 16)");
    let dir = scratch_dir("mcp-http64-");
    let config_dir = scratch_dir("mcp-http64-config-");
    // A pool where 64 sessions each holding one worker never meet a full pool.
    let config = config_dir.path().join("config.json");
    std::fs::write(&config, r#"{"worker_slots": 256, "total_cpu_millicores": 256000, "total_memory_mib": 524288}"#)
        .unwrap();
    let (child, authority) = start_http_with(dir.path(), &["--config".as_ref(), config.as_os_str()]);
    let mut one = HttpSession::open(&authority, false);
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        one.request_release(&format!("one-{i}"));
        pairs.push(t.elapsed());
    }
    let one_pair = Samples::from_durations(&pairs);
    let reads = sessions_run(child.id(), &authority, seconds, |s, _| s.get_capacity());
    let writes = sessions_run(child.id(), &authority, seconds, |s, i| s.request_release(&format!("job-{i}")));
    stop_http(child);
    let (stdio_cap, stdio_pair) = stdio;
    let per_s = |s: &Samples| 1.0 / s.mean().max(1e-12);
    report.value(
        "mcp_http64_get_capacity",
        "get_capacity, 64 HTTP sessions: calls/s",
        reads.rate(),
        "/s",
        format!(
            "{}; stdio, one session: {} (p50 / p99 {})",
            reads.shown(),
            fmt_rate(per_s(stdio_cap)),
            shown(stdio_cap)
        ),
    );
    report.value(
        "mcp_http64_request_release",
        "request_resources + release_resources, 64 HTTP sessions: pairs/s (each pair two durable writes)",
        writes.rate(),
        "/s",
        format!(
            "{}; one HTTP session: {} (p50 / p99 {}); stdio, one session: {} (p50 / p99 {})",
            writes.shown(),
            fmt_rate(per_s(&one_pair)),
            shown(&one_pair),
            fmt_rate(per_s(stdio_pair)),
            shown(stdio_pair)
        ),
    );
    report.note(
        "each session is a thread with its own kept-alive connection making one call at a time; the durable pairs \
         share fsyncs through group commit, so 64 sessions write far more pairs per second than one",
    );
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
    http_section(&mut report, quick);
    http_sessions_section(&mut report, quick, (&cap, &pair));
    report.finish();
}
