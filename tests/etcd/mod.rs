//! The replication tests' harness: a 3-member etcd cluster on loopback ports in a temp dir,
//! ledger copies (the real binary, `serve --http --etcd`), and an MCP client that follows
//! "not the leader, the leader is X". Gated: the tests run only with
//! `ALLOCATION_LEDGER_ETCD_TESTS=1` (and `etcd` on the PATH).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the gated tests run; prints why not.
pub fn enabled(test: &str) -> bool {
    if std::env::var("ALLOCATION_LEDGER_ETCD_TESTS").as_deref() != Ok("1") {
        eprintln!("{test}: skipped (set ALLOCATION_LEDGER_ETCD_TESTS=1 to run the etcd tests)");
        return false;
    }
    // ALLOCATION_LEDGER_ETCD_SKIP: test names (comma-separated) a run leaves out, each said.
    let skip = std::env::var("ALLOCATION_LEDGER_ETCD_SKIP").unwrap_or_default();
    if skip.split(',').any(|t| t.trim() == test) {
        eprintln!("{test}: skipped (named in ALLOCATION_LEDGER_ETCD_SKIP)");
        return false;
    }
    true
}

/// A free loopback port (bound and let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    peer_port: u16,
    pub child: Option<Child>,
}

/// A 3-member etcd cluster.
pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
}

impl EtcdCluster {
    pub fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member { name: format!("m{i}"), client_port: free_port(), peer_port: free_port(), child: None })
            .collect();
        let mut c = EtcdCluster { dir, members };
        for i in 0..n {
            c.spawn(i, "new");
        }
        c.wait_healthy();
        c
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", self.members[i].name))).unwrap();
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", state])
            .args([
                "--initial-cluster-token",
                "ledger-tests",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts (is etcd-server installed?)");
        m.child = Some(child);
    }

    /// Comma-separated client URLs.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect::<Vec<_>>().join(",")
    }

    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints(), "--command-timeout=3s"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.etcdctl(&["put", "/health-probe", "x"]).contains("OK") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the etcd cluster did not become healthy");
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// One ledger copy: `serve --http 127.0.0.1:PORT --etcd ... --cluster ...`.
pub struct Replica {
    /// Extra arguments for `serve` (e.g. `--config FILE`).
    pub extra: Vec<String>,
    pub dir: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub stderr: Arc<Mutex<String>>,
}

impl Replica {
    pub fn start(dir: &Path, etcd: &str, cluster: &str, ttl_seconds: u64) -> Replica {
        Self::start_with(dir, etcd, cluster, ttl_seconds, &[])
    }

    pub fn start_with(dir: &Path, etcd: &str, cluster: &str, ttl_seconds: u64, extra: &[&str]) -> Replica {
        let extra = extra.iter().map(|s| (*s).to_string()).collect();
        let mut r = Replica { extra, dir: dir.to_path_buf(), port: free_port(), child: None, stderr: Arc::default() };
        r.spawn(etcd, cluster, ttl_seconds);
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    pub fn spawn(&mut self, etcd: &str, cluster: &str, ttl_seconds: u64) {
        let child = self
            .command(etcd, cluster, ttl_seconds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.watch_stderr(child);
    }

    /// The `serve` command line of this copy.
    pub fn command(&self, etcd: &str, cluster: &str, ttl_seconds: u64) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
        c.env_remove("ALLOCATION_LEDGER_DIR")
            .env("RUST_LOG", "warn")
            .args(&self.extra)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--http", &format!("127.0.0.1:{}", self.port), "--etcd", etcd, "--cluster", cluster])
            .args(["--lease-ttl-seconds", &ttl_seconds.to_string(), "--expiry-interval-seconds", "3600"]);
        c
    }

    fn watch_stderr(&mut self, mut child: Child) {
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.stderr.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        self.child = Some(child);
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the copy did not start listening: {}", self.stderr.lock().unwrap()));
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The events of the local copy (`log --json` beside the running server).
    pub fn events(&self) -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
            .env_remove("ALLOCATION_LEDGER_DIR")
            .arg("log")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--json")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // A failed scenario shows what each copy said.
            eprintln!("--- stderr of the copy in {}:\n{}", self.dir.display(), self.stderr.lock().unwrap());
        }
    }
}

/// One stateless `tools/call`: `Ok(structuredContent or error value)`, `Err` when the server
/// did not answer.
pub fn call(agent: &ureq::Agent, url: &str, tool: &str, args: &Value) -> Result<Value, String> {
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "replication-tests", "version": "0"},
            "io.modelcontextprotocol/clientCapabilities": {}}},
    });
    let mut resp = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", "2026-07-28")
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", tool)
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
    let msg: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some())
        .or_else(|| serde_json::from_str(&text).ok())
        .ok_or_else(|| format!("no JSON-RPC answer: {text}"))?;
    let result = msg.get("result").ok_or_else(|| format!("no result: {msg}"))?;
    Ok(result.get("structuredContent").cloned().unwrap_or_else(|| result.clone()))
}

/// The leader a refusal names ("not the leader, the leader is X").
pub fn leader_named(answer: &Value) -> Option<String> {
    error_message(answer)?.split("the leader is ").nth(1).map(|u| u.trim().to_string())
}

/// The message of a tool error (`{"status":"error","error":MESSAGE,"kind":...}`).
pub fn error_message(answer: &Value) -> Option<&str> {
    (answer["status"] == "error").then(|| answer["error"].as_str()).flatten()
}

/// A write through any copy: follows "the leader is X", tries the other copies when one does
/// not answer, and retries while no leader is elected, until `timeout`. Returns the answer
/// (a grant, a rejection, a release) or the last error.
pub fn write(
    agent: &ureq::Agent,
    urls: &[String],
    tool: &str,
    args: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let deadline = Instant::now() + timeout;
    let mut at = 0;
    let mut url = urls[0].clone();
    loop {
        let last = match call(agent, &url, tool, args) {
            Ok(answer) if answer["kind"] == "unavailable" => {
                if let Some(leader) = leader_named(&answer) {
                    url = leader;
                    if Instant::now() >= deadline {
                        return Err(answer.to_string());
                    }
                    continue;
                }
                answer.to_string()
            }
            Ok(answer) => return Ok(answer),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        at = (at + 1) % urls.len();
        url = urls[at].clone();
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Waits until `f` holds (polling), or panics naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Editing a copy's local segment files (stopped), as a forger who knows the format would.
pub mod tamper {
    use allocation_ledger::testing::segment;
    use allocation_ledger::{chain_next, CHAIN_GENESIS};
    use std::path::{Path, PathBuf};

    /// The segment files of the ledger in `dir`, oldest first.
    pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        v.sort();
        v
    }

    fn first_seq_of(path: &Path) -> u64 {
        segment::parse_file_name(path.file_name().unwrap().to_str().unwrap()).unwrap()
    }

    /// The chained records of a segment: (offset, frame length, sequence number).
    fn records(bytes: &[u8], first_seq: u64) -> Vec<(usize, usize, u64)> {
        let mut out = Vec::new();
        segment::scan(Path::new("x.wal"), bytes, first_seq, &mut |pos, _| {
            out.push((pos.offset as usize, pos.frame_len as usize, pos.seq));
            Ok(true)
        });
        out
    }

    /// Recomputes the checksum of the chained record at `at` from what it holds.
    fn fix_crc(bytes: &mut [u8], at: usize) {
        let len = (u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) & 0x1f_ffff) as usize;
        let mut h = crc32fast::Hasher::new();
        h.update(&bytes[at..at + 12]);
        h.update(&bytes[at + 16..at + 48 + len]);
        bytes[at + 12..at + 16].copy_from_slice(&h.finalize().to_le_bytes());
    }

    /// Changes one byte of record `seq`'s payload where `find` occurs (its first byte becomes
    /// `to`), makes its CRC good again and, with `rechain`, recomputes every chain value from
    /// the genesis value (a different but valid history).
    pub fn rewrite(dir: &Path, seq: u64, find: &[u8], to: u8, rechain: bool) {
        for path in segment_files(dir) {
            let mut bytes = std::fs::read(&path).unwrap();
            let found = records(&bytes, first_seq_of(&path)).into_iter().find(|r| r.2 == seq);
            if let Some((at, frame_len, _)) = found {
                let payload = &mut bytes[at + 48..at + frame_len];
                let i = payload.windows(find.len()).position(|w| w == find).expect("the text to change");
                payload[i] = to;
                fix_crc(&mut bytes, at);
                std::fs::write(&path, &bytes).unwrap();
            }
        }
        if rechain {
            let mut chain = CHAIN_GENESIS;
            for path in segment_files(dir) {
                let mut bytes = std::fs::read(&path).unwrap();
                let first = first_seq_of(&path);
                let header = segment::encode_header(first, &chain);
                bytes[..header.len()].copy_from_slice(&header);
                for (at, frame_len, seq) in records(&bytes, first) {
                    chain = chain_next(&chain, seq, &bytes[at + 48..at + frame_len]);
                    bytes[at + 16..at + 48].copy_from_slice(&chain.0);
                    fix_crc(&mut bytes, at);
                }
                std::fs::write(&path, bytes).unwrap();
            }
        }
    }
}
