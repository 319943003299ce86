//! Helpers for the MCP server tests: the real binary over stdio (raw JSON-RPC lines) and over
//! Streamable HTTP (a small blocking HTTP client), and a check of the ledger's log.
#![allow(dead_code)]

use allocation_ledger::{AllocationId, EventBody, Ledger};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long any single wait on the server may take before the test fails (not a timing
/// assertion: only a guard against hanging forever).
pub const DEADLINE: Duration = Duration::from_secs(60);

pub const V_LEGACY: &str = "2025-11-25";
pub const V_STATELESS: &str = "2026-07-28";

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR").env_remove("ALLOCATION_LEDGER_TOKEN").env("RUST_LOG", "warn");
    c
}

/// The `_meta` a 2026-07-28 client puts on every request.
pub fn meta_2026() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": V_STATELESS,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "allocation-ledger-tests", "version": "0"},
    })
}

/// Collects a child's stderr on a thread, so a failing test can show it.
#[derive(Clone, Default)]
pub struct StderrLog(Arc<Mutex<String>>);

impl StderrLog {
    /// Starts pumping `stderr`; every line is also sent on the returned channel.
    pub fn pump(stderr: impl std::io::Read + Send + 'static) -> (StderrLog, Receiver<String>) {
        let log = StderrLog::default();
        let (tx, rx) = channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                l.0.lock().unwrap().push_str(&line);
                l.0.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        (log, rx)
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// Waits for `child` to exit, polling with short waits up to [`DEADLINE`].
pub fn wait_exit(child: &mut Child, stderr: &StderrLog) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the server did not exit; stderr:\n{}", stderr.text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn sigterm(child: &Child) {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ok.success(), "kill -TERM failed");
}

/// `allocation-ledger serve` over stdio, spoken to with raw JSON-RPC lines.
pub struct StdioServer {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    pending: HashMap<String, Value>,
    next_id: u64,
    pub stderr: StderrLog,
}

impl StdioServer {
    pub fn start(dir: &Path, extra: &[&str]) -> StdioServer {
        let mut child = bin()
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().unwrap();
        let (stderr, _) = StderrLog::pump(child.stderr.take().unwrap());
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout carried a line that is not JSON ({e}): {line:?}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        StdioServer { stdin: child.stdin.take(), child, lines: rx, pending: HashMap::new(), next_id: 1, stderr }
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    pub fn send(&mut self, msg: &Value) {
        self.send_line(&msg.to_string());
    }

    /// The next message with this `id` (responses may arrive out of order).
    pub fn recv_id(&mut self, id: &Value) -> Value {
        let key = id.to_string();
        if let Some(v) = self.pending.remove(&key) {
            return v;
        }
        let start = Instant::now();
        loop {
            let left = DEADLINE.checked_sub(start.elapsed()).unwrap_or_default();
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no response with id {key} ({e}); stderr:\n{}", self.stderr.text()));
            let got = v.get("id").map_or_else(|| "null".into(), Value::to_string);
            if got == key {
                return v;
            }
            self.pending.insert(got, v);
        }
    }

    /// Sends a request and returns the whole JSON-RPC response.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = json!(self.next_id);
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        self.recv_id(&id)
    }

    pub fn notify(&mut self, method: &str) {
        self.send(&json!({"jsonrpc": "2.0", "method": method}));
    }

    /// The `initialize` handshake of the 2025-11-25 era; returns the initialize result.
    pub fn initialize(&mut self) -> Value {
        let r = self.request(
            "initialize",
            json!({
                "protocolVersion": V_LEGACY,
                "capabilities": {},
                "clientInfo": {"name": "allocation-ledger-tests", "version": "0"},
            }),
        );
        self.notify("notifications/initialized");
        r["result"].clone()
    }

    /// `tools/call`; returns the CallToolResult (panics on a JSON-RPC error).
    pub fn call(&mut self, name: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": name, "arguments": args}));
        assert!(r.get("error").is_none(), "{name}: JSON-RPC error {r}");
        r["result"].clone()
    }

    /// `tools/call` in the 2026-07-28 style: the client context in `_meta`.
    pub fn call_2026(&mut self, name: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": name, "arguments": args, "_meta": meta_2026()}));
        assert!(r.get("error").is_none(), "{name}: JSON-RPC error {r}");
        r["result"].clone()
    }

    /// Closes stdin (EOF) and waits for the process to exit.
    pub fn close(mut self) -> ExitStatus {
        drop(self.stdin.take());
        wait_exit(&mut self.child, &self.stderr)
    }
}

impl Drop for StdioServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The structuredContent of a successful tool result, after checking the text copy matches.
pub fn ok(result: &Value) -> Value {
    assert_eq!(result["isError"], json!(false), "expected success: {result}");
    structured(result)
}

/// The structuredContent of an `isError: true` tool result.
pub fn err(result: &Value) -> Value {
    assert_eq!(result["isError"], json!(true), "expected an error result: {result}");
    structured(result)
}

fn structured(result: &Value) -> Value {
    let sc = result["structuredContent"].clone();
    assert!(sc.is_object(), "no structuredContent: {result}");
    let text = result["content"][0]["text"].as_str().expect("a text copy");
    let copy: Value = serde_json::from_str(text).expect("the text copy is JSON");
    assert_eq!(copy, sc, "the text copy differs from structuredContent");
    sc
}

/// `allocation-ledger serve --http 127.0.0.1:0 ...`; the bound URL is read from stderr.
pub struct HttpServer {
    pub child: Child,
    pub url: String,
    pub stderr: StderrLog,
}

impl HttpServer {
    pub fn start(dir: &Path, extra: &[&str]) -> HttpServer {
        Self::start_on(dir, "127.0.0.1:0", extra)
    }

    pub fn start_on(dir: &Path, addr: &str, extra: &[&str]) -> HttpServer {
        let mut child = bin()
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--http", addr])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let (stderr, lines) = StderrLog::pump(child.stderr.take().unwrap());
        let start = Instant::now();
        let url = loop {
            let left = DEADLINE.checked_sub(start.elapsed()).unwrap_or_default();
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find("listening on http://") {
                        break line[i + "listening on ".len()..].trim().to_string();
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("the server did not report its address ({e}); stderr:\n{}", stderr.text());
                }
            }
        };
        HttpServer { child, url, stderr }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        sigterm(&self.child);
        wait_exit(&mut self.child, &self.stderr)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct HttpReply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl HttpReply {
    /// The JSON-RPC message in the body: plain JSON, or the `data:` of an SSE stream.
    pub fn message(&self) -> Value {
        if self.headers.get("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
            for line in self.body.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    let data = data.trim();
                    if let Ok(v) = serde_json::from_str::<Value>(data) {
                        if v.get("id").is_some() {
                            return v;
                        }
                    }
                }
            }
            panic!("no JSON-RPC response in the event stream: {:?}", self.body);
        }
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(DEADLINE)).build().into()
}

/// POSTs a JSON-RPC message with the headers MCP asks for plus `headers`.
pub fn post(agent: &ureq::Agent, url: &str, headers: &[(&str, &str)], body: &Value) -> HttpReply {
    post_text(agent, url, headers, &body.to_string())
}

/// POSTs `body` as it is (which need not be JSON) with the headers MCP asks for plus `headers`.
pub fn post_text(agent: &ureq::Agent, url: &str, headers: &[(&str, &str)], body: &str) -> HttpReply {
    let mut req = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).expect("the HTTP request completes");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    HttpReply { status, headers, body }
}

/// An MCP client over HTTP: a 2025-11-25 session (`initialize`, `Mcp-Session-Id`) or
/// 2026-07-28 stateless requests (`_meta`, `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`).
pub struct HttpClient {
    pub agent: ureq::Agent,
    pub url: String,
    pub token: Option<String>,
    pub session: Option<String>,
    pub stateless: bool,
    next_id: u64,
}

impl HttpClient {
    pub fn new(url: &str, token: Option<&str>) -> HttpClient {
        HttpClient {
            agent: agent(),
            url: url.to_string(),
            token: token.map(str::to_string),
            session: None,
            stateless: false,
            next_id: 1,
        }
    }

    /// A 2026-07-28 client: no handshake, context on every request.
    pub fn stateless(url: &str, token: Option<&str>) -> HttpClient {
        HttpClient { stateless: true, ..Self::new(url, token) }
    }

    fn headers(&self, method: &str, name: Option<&str>) -> Vec<(String, String)> {
        let mut h = Vec::new();
        if let Some(t) = &self.token {
            h.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        if let Some(s) = &self.session {
            h.push(("Mcp-Session-Id".to_string(), s.clone()));
            h.push(("MCP-Protocol-Version".to_string(), V_LEGACY.to_string()));
        }
        if self.stateless {
            h.push(("MCP-Protocol-Version".to_string(), V_STATELESS.to_string()));
            h.push(("Mcp-Method".to_string(), method.to_string()));
            if let Some(n) = name {
                h.push(("Mcp-Name".to_string(), n.to_string()));
            }
        }
        h
    }

    pub fn send(&mut self, method: &str, mut params: Value) -> HttpReply {
        let name = params.get("name").and_then(Value::as_str).map(str::to_string);
        if self.stateless {
            params["_meta"] = meta_2026();
        }
        let id = self.next_id;
        self.next_id += 1;
        let headers = self.headers(method, name.as_deref());
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        post(&self.agent, &self.url, &headers, &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
    }

    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let reply = self.send(method, params);
        assert_eq!(reply.status, 200, "{method}: HTTP {} {:?}", reply.status, reply.body);
        reply.message()
    }

    /// `initialize` + `notifications/initialized`; keeps the session id.
    pub fn initialize(&mut self) -> Value {
        let reply = self.send(
            "initialize",
            json!({
                "protocolVersion": V_LEGACY,
                "capabilities": {},
                "clientInfo": {"name": "allocation-ledger-tests", "version": "0"},
            }),
        );
        assert_eq!(reply.status, 200, "initialize: HTTP {} {:?}", reply.status, reply.body);
        self.session = Some(reply.headers.get("mcp-session-id").expect("a session id").clone());
        let result = reply.message()["result"].clone();
        let headers = self.headers("notifications/initialized", None);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r =
            post(&self.agent, &self.url, &headers, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        assert_eq!(r.status, 202, "notifications/initialized: HTTP {} {:?}", r.status, r.body);
        result
    }

    pub fn call(&mut self, name: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": name, "arguments": args}));
        assert!(r.get("error").is_none(), "{name}: JSON-RPC error {r}");
        r["result"].clone()
    }
}

/// Reads the whole log (read-only, beside or after the writer) and checks that no worker slot
/// was ever held by two active allocations at once; returns (grants, rejections).
pub fn assert_no_double_grant(dir: &Path) -> (usize, usize) {
    let ledger = Ledger::open_read_only(dir).expect("the ledger opens read-only");
    let events = ledger.events(1, usize::MAX).expect("the log reads");
    let mut holder: HashMap<u32, AllocationId> = HashMap::new();
    let mut slots_of: HashMap<AllocationId, Vec<u32>> = HashMap::new();
    let (mut grants, mut rejections) = (0, 0);
    for e in &events {
        match &e.event.body {
            EventBody::Granted(g) => {
                grants += 1;
                for w in &g.workers {
                    if let Some(other) = holder.insert(w.slot, g.allocation_id) {
                        panic!(
                            "seq {}: slot {} ({}) granted to {} while {} still held it",
                            e.seq, w.slot, w.worker_id, g.allocation_id, other
                        );
                    }
                }
                slots_of.insert(g.allocation_id, g.workers.iter().map(|w| w.slot).collect());
            }
            EventBody::Rejected(_) => rejections += 1,
            EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => {
                for slot in slots_of.remove(allocation_id).unwrap_or_default() {
                    assert_eq!(holder.remove(&slot), Some(*allocation_id), "seq {}: slot {slot} freed twice", e.seq);
                }
            }
            _ => {}
        }
    }
    (grants, rejections)
}
