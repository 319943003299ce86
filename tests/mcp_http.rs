//! The MCP server over Streamable HTTP: both protocol eras, the bearer token, the Origin check,
//! the refusal to serve a non-loopback address without a token, and many concurrent clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use mcp_common::*;
use serde_json::json;

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#;

fn init_body() -> serde_json::Value {
    serde_json::from_str(INIT).unwrap()
}

#[test]
fn both_protocol_eras_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &[]);
    assert!(server.url.starts_with("http://127.0.0.1:") && server.url.ends_with("/mcp"), "{}", server.url);

    // 2025-11-25: a session.
    let mut legacy = HttpClient::new(&server.url, None);
    let init = legacy.initialize();
    assert_eq!(init["serverInfo"]["name"], "allocation-ledger");
    assert_eq!(init["serverInfo"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(init["protocolVersion"], V_LEGACY);
    let g = ok(&legacy.call("request_resources", json!({"job_id": "a", "mcp_servers": ["github"], "workers": 4})));
    assert_eq!(g["status"], "active");

    // 2026-07-28: stateless requests, sharing the same ledger.
    let mut modern = HttpClient::stateless(&server.url, None);
    let d = modern.request("server/discover", json!({}));
    assert!(d["result"]["supportedVersions"].as_array().unwrap().contains(&json!(V_STATELESS)), "{d}");
    let tools = modern.request("tools/list", json!({}));
    let names: Vec<&str> =
        tools["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    for name in [
        "request_resources",
        "release_resources",
        "get_capacity",
        "get_allocation",
        "list_allocations",
        "cleanup_expired",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let cap = ok(&modern.call("get_capacity", json!({})));
    assert_eq!((cap["allocated_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(4), Some(6)));
    let f = err(&modern.call("request_resources", json!({"job_id": "b", "mcp_servers": [], "workers": 7})));
    assert_eq!(f["error"], "Insufficient workers: requested 7, available 6");
    let r = ok(&modern.call("release_resources", json!({"allocation_id": g["allocation_id"]})));
    assert_eq!(r["status"], "released");
    let r = modern.request("tools/call", json!({"name": "no_such_tool", "arguments": {}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    let cap = ok(&legacy.call("get_capacity", json!({})));
    assert_eq!(cap["available_workers"], 10);
    let status = server.stop();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status:?}");
}

#[test]
fn a_configured_token_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let server = token_server(dir.path());
    let agent = agent();

    let r = post(&agent, &server.url, &[], &init_body());
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.headers["www-authenticate"].starts_with("Bearer"), "{:?}", r.headers);
    let r = post(&agent, &server.url, &[("Authorization", "Bearer wrong")], &init_body());
    assert_eq!(r.status, 401);
    let r = post(&agent, &server.url, &[("Authorization", "Basic czNjcmV0LXRva2Vu")], &init_body());
    assert_eq!(r.status, 401);
    let r = post(&agent, &server.url, &[("Authorization", "Bearer s3cret-token")], &init_body());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.message()["result"]["serverInfo"]["name"], "allocation-ledger");

    let mut client = HttpClient::new(&server.url, Some("s3cret-token"));
    client.initialize();
    assert_eq!(ok(&client.call("get_capacity", json!({})))["total_workers"], 10);
    assert!(server.stop().success());
}

#[test]
fn the_token_may_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .env("ALLOCATION_LEDGER_TOKEN", "from-env")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--http", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (log, lines) = StderrLog::pump(child.stderr.take().unwrap());
    let url = loop {
        let line = lines.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("{e}: {}", log.text()));
        if let Some(i) = line.find("http://") {
            break line[i..].trim().to_string();
        }
    };
    let agent = agent();
    assert_eq!(post(&agent, &url, &[], &init_body()).status, 401);
    assert_eq!(post(&agent, &url, &[("Authorization", "Bearer from-env")], &init_body()).status, 200);
    sigterm(&child);
    assert!(wait_exit(&mut child, &log).success());
}

#[test]
fn a_non_loopback_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger_dir = dir.path().join("ledger");
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let o = bin()
            .arg("--data-dir")
            .arg(&ledger_dir)
            .args(["serve", "--http", addr])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{addr}: {stderr}");
        assert!(stderr.contains("--token-file") && stderr.contains("ALLOCATION_LEDGER_TOKEN"), "{stderr}");
    }
    assert!(!ledger_dir.exists(), "nothing was created");

    let o = bin()
        .arg("--data-dir")
        .arg(&ledger_dir)
        .args(["serve", "--http", "not-an-address"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = bin()
        .arg("--data-dir")
        .arg(&ledger_dir)
        .args(["serve", "--http", "127.0.0.1:0", "--allowed-origin", "example.com"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_origin_header_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &["--allowed-origin", "https://app.example.com"]);
    let agent = agent();
    let origin = |o: &str| post(&agent, &server.url, &[("Origin", o)], &init_body()).status;
    assert_eq!(origin("http://evil.example"), 403);
    assert_eq!(origin("http://localhost.evil.example:8080"), 403);
    assert_eq!(origin("https://localhost:3000"), 403, "only http on loopback by default");
    assert_eq!(origin("http://localhost:3000"), 200);
    assert_eq!(origin("http://127.0.0.1:6274"), 200);
    assert_eq!(origin("http://[::1]:80"), 200);
    assert_eq!(origin("https://app.example.com"), 200);
    // No Origin (not a browser): accepted.
    assert_eq!(post(&agent, &server.url, &[], &init_body()).status, 200);
    // A Host header that is not this server's (DNS rebinding): rejected.
    let r = post(&agent, &server.url, &[("Host", "evil.example")], &init_body());
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(server.stop().success());
}

/// 16 clients request and release at once (half in 2025-11-25 sessions, half stateless
/// 2026-07-28); afterwards the pool is whole, no slot was ever granted twice, verify passes.
#[test]
fn concurrent_clients_never_share_a_slot() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &[]);
    let url = server.url.clone();

    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut client =
                    if c % 2 == 0 { HttpClient::new(&url, None) } else { HttpClient::stateless(&url, None) };
                if c % 2 == 0 {
                    client.initialize();
                }
                let (mut granted, mut refused) = (0, 0);
                for round in 0..ROUNDS {
                    let workers = 1 + (c + round) % 3;
                    let r = client.call(
                        "request_resources",
                        json!({"job_id": format!("client-{c}"), "mcp_servers": ["shared"], "workers": workers}),
                    );
                    if r["isError"] == json!(true) {
                        let f = err(&r);
                        assert_eq!(f["status"], "failed", "{f}");
                        assert!(f["error"].as_str().unwrap().starts_with("Insufficient workers"), "{f}");
                        refused += 1;
                        continue;
                    }
                    let g = ok(&r);
                    assert_eq!(g["workers_allocated"].as_array().unwrap().len(), workers);
                    granted += 1;
                    let rel = ok(&client.call("release_resources", json!({"allocation_id": g["allocation_id"]})));
                    assert_eq!(rel["status"], "released", "{rel}");
                    assert_eq!(rel["workers_released"], workers);
                }
                (granted, refused)
            })
        })
        .collect();
    let (mut granted, mut refused) = (0, 0);
    for h in handles {
        let (g, r) = h.join().expect("a client thread panicked");
        granted += g;
        refused += r;
    }
    assert_eq!(granted + refused, CLIENTS * ROUNDS);
    assert!(granted > 0);

    let mut client = HttpClient::stateless(&url, None);
    let cap = ok(&client.call("get_capacity", json!({})));
    assert_eq!(cap["allocated_workers"], 0, "{cap}");
    assert_eq!(cap["available_workers"], cap["total_workers"], "{cap}");
    assert_eq!(cap["active_allocations"], 0, "{cap}");
    assert_eq!(cap["running_mcp_servers"], json!([]), "{cap}");
    assert!(server.stop().success());

    let (grants, rejections) = assert_no_double_grant(dir.path());
    assert_eq!((grants, rejections), (granted, refused));
    let o = bin().arg("--data-dir").arg(dir.path()).arg("verify").output().unwrap();
    assert!(o.status.success(), "verify: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// A server that requires the bearer token `s3cret-token`, over a ledger in `dir/ledger`.
fn token_server(dir: &std::path::Path) -> HttpServer {
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    HttpServer::start(&dir.join("ledger"), &["--token-file", token_file.to_str().unwrap()])
}

/// `host:port` of the server.
fn authority(server: &HttpServer) -> String {
    server.url.trim_start_matches("http://").trim_end_matches("/mcp").to_string()
}

/// The head of a raw POST to `/mcp`; `framing` is the header lines that frame the body
/// (`Content-Length: N` or `Transfer-Encoding: chunked`) and any others, each ending in CRLF.
fn raw_post_head(authority: &str, framing: &str) -> String {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{framing}\r\n"
    )
}

/// What the server sends on `stream` until it closes the connection. Errors end the reading:
/// a reset is how some of the failures tested for show.
fn read_until_closed(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Sends `bytes` on a new connection; the server's answers until it closes it.
fn raw_exchange(authority: &str, bytes: &[u8]) -> String {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.write_all(bytes).unwrap();
    read_until_closed(&mut stream)
}

/// A client may send its request body in a packet of its own, and reuse the connection after a
/// refusal (ureq does both). The server must read the body of a request it refuses before
/// answering; hyper closes a connection whose unread body has not arrived yet, and the client's
/// next request on it fails with "peer disconnected" (a CI failure of this file).
#[test]
fn a_refused_request_leaves_the_connection_usable() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = token_server(dir.path());
    let authority = authority(&server);
    let length = format!("Content-Length: {}\r\n", INIT.len());
    let mut stream = std::net::TcpStream::connect(&authority).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(raw_post_head(&authority, &length).as_bytes()).unwrap();
    // Holds the body back until the server answers or 300 ms pass, so it cannot share a packet
    // with the head. Either way is fine here; what counts is the next request.
    let mut first = [0u8; 4096];
    stream.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    let early = stream.read(&mut first).unwrap_or(0);
    // Write errors are the failure being tested for; the count of answers below reports them.
    let _ = stream.write_all(INIT.as_bytes());
    let second = raw_post_head(&authority, &format!("{length}Connection: close\r\n"));
    let _ = stream.write_all(format!("{second}{INIT}").as_bytes());
    let text = String::from_utf8_lossy(&first[..early]).into_owned() + &read_until_closed(&mut stream);
    assert_eq!(text.matches("HTTP/1.1 401").count(), 2, "both requests answered on one connection:\n{text}");
    assert!(server.stop().success());
}

/// A body past the 4 MiB limit is refused with 413 and the limit, before it is read (declared
/// length) or once the limit is passed (chunked).
#[test]
fn an_oversized_request_is_refused_with_the_limit() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &[]);
    let authority = authority(&server);
    let head = raw_post_head(&authority, &format!("Content-Length: {}\r\n", 5 * 1024 * 1024));
    let reply = raw_exchange(&authority, head.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("limit of 4194304 bytes"), "{reply}");

    // Chunked, so the server learns the size only by reading: 64 KiB chunks past the limit.
    let mut stream = std::net::TcpStream::connect(&authority).unwrap();
    stream.write_all(raw_post_head(&authority, "Transfer-Encoding: chunked\r\n").as_bytes()).unwrap();
    let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
    let mut written = 0;
    // The server stops reading at the limit; a write error after that is expected.
    while written <= 4 * 1024 * 1024 && stream.write_all(chunk.as_bytes()).is_ok() {
        written += 0x10000;
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let reply = read_until_closed(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    // The server is still there for well-behaved clients.
    let mut client = HttpClient::new(&server.url, None);
    client.initialize();
    assert_eq!(ok(&client.call("get_capacity", serde_json::json!({})))["total_workers"], 10);
    assert!(server.stop().success());
}

/// With a token, an unauthenticated client cannot make the server read a large body, nor hold a
/// refusal back by not sending one: both get 401 and the connection closed.
#[test]
fn an_unauthenticated_body_is_neither_read_in_full_nor_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let server = token_server(dir.path());
    let authority = authority(&server);
    // 5 MiB declared; and 100 bytes declared, none sent (the refusal goes out after 2 s).
    for declared_bytes in [5 * 1024 * 1024, 100] {
        let head = raw_post_head(&authority, &format!("Content-Length: {declared_bytes}\r\n"));
        let reply = raw_exchange(&authority, head.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 401"), "{declared_bytes}: {reply}");
        assert!(reply.to_ascii_lowercase().contains("connection: close"), "{declared_bytes}: {reply}");
    }
    assert!(server.stop().success());
}

/// Sets this process's soft open-file limit (children inherit it); `None` raises it to the
/// hard limit.
fn set_open_file_limit(soft: Option<u64>) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.map_or(lim.rlim_max.min(1 << 20), |s| s.min(lim.rlim_max));
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// Reads until the server closes the connection and returns what it sent; panics if it is
/// still open after [`DEADLINE`] (a reset counts as closed).
fn wait_closed(stream: &mut std::net::TcpStream) -> String {
    use std::io::{ErrorKind, Read};
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection is still open after {DEADLINE:?}; it sent {:?}", String::from_utf8_lossy(&seen))
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Whether the server still holds `stream` open (nothing to read, no EOF, no reset).
fn still_open(stream: &std::net::TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let open = matches!(stream.peek(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

/// Opens `n` connections that each send the start of a request head and nothing more.
fn partial_heads(authority: &str, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(authority).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            s.write_all(format!("POST /mcp HTTP/1.1\r\nHost: {authority}\r\nX-Slow: ").as_bytes()).unwrap();
            s
        })
        .collect()
}

/// 2,000 connections that never finish their request head (the attack that used to starve the
/// server at ~1,000: the descriptors ran out and accept stopped) are all held open while a
/// normal client makes 100 calls, each answered within 1 s, and an unauthenticated request
/// still gets its 401.
#[test]
fn two_thousand_slow_connections_do_not_starve_a_normal_client() {
    const SLOW: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    // Timeouts longer than the test, so that every slow connection is really held throughout.
    // The server starts with the usual soft limit of 1024 descriptors (whatever this machine's
    // default is) and must raise its own; this process then raises its own for its sockets.
    set_open_file_limit(Some(1024));
    let server = HttpServer::start(
        &dir.path().join("ledger"),
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--http-header-timeout-seconds",
            "600",
            "--http-idle-timeout-seconds",
            "600",
        ],
    );
    set_open_file_limit(None);
    let authority = authority(&server);
    let slow = partial_heads(&authority, SLOW);

    let mut client = HttpClient::new(&server.url, Some("s3cret-token"));
    let t = std::time::Instant::now();
    client.initialize();
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "initialize took {:?}", t.elapsed());
    for i in 0..100 {
        let t = std::time::Instant::now();
        let cap = ok(&client.call("get_capacity", json!({})));
        let took = t.elapsed();
        assert_eq!(cap["total_workers"], 10);
        assert!(took < std::time::Duration::from_secs(1), "call {i} took {took:?}");
    }
    let r = post(&agent(), &server.url, &[], &init_body());
    assert_eq!(r.status, 401, "{}", r.body);

    let open = slow.iter().filter(|s| still_open(s)).count();
    assert_eq!(open, SLOW, "the server closed slow connections it had room for");
    assert!(server.stop().success(), "shutdown with 2,000 open connections is clean");
}

/// A connection that stops in the middle of its request head, one that sends 100 bytes of a
/// declared 1 MB body, and one that sends nothing are each closed after their (shortened)
/// timeout; the short body is answered 408 first.
#[test]
fn slow_heads_short_bodies_and_idle_connections_are_closed() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(
        dir.path(),
        &["--http-header-timeout-seconds", "1", "--http-body-timeout-seconds", "1", "--http-idle-timeout-seconds", "1"],
    );
    let authority = authority(&server);

    let mut head = partial_heads(&authority, 1).pop().unwrap();
    let mut body = std::net::TcpStream::connect(&authority).unwrap();
    body.write_all(raw_post_head(&authority, "Content-Length: 1000000\r\n").as_bytes()).unwrap();
    body.write_all(&[b' '; 100]).unwrap();
    let mut idle = std::net::TcpStream::connect(&authority).unwrap();

    let said = wait_closed(&mut head);
    assert_eq!(said, "", "nothing is answered to half a head");
    let said = wait_closed(&mut body);
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("--http-body-timeout-seconds"), "{said}");
    assert_eq!(wait_closed(&mut idle), "");

    // A kept-alive connection is closed once idle too, after its request was answered.
    let mut kept = std::net::TcpStream::connect(&authority).unwrap();
    let length = format!("Content-Length: {}\r\n", INIT.len());
    kept.write_all(format!("{}{INIT}", raw_post_head(&authority, &length)).as_bytes()).unwrap();
    let said = wait_closed(&mut kept);
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    assert!(server.stop().success());
}

/// At --http-max-connections, a new connection closes the oldest one that never completed a
/// request head; when every open connection has, the new one is refused with 503.
#[test]
fn at_the_connection_bound_the_oldest_incomplete_connection_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &["--http-max-connections", "4"]);
    let authority = authority(&server);
    let mut slow = partial_heads(&authority, 4);
    // Each of the client's connections evicts one slow connection, oldest first.
    let mut client = HttpClient::new(&server.url, None);
    client.initialize();
    assert_eq!(ok(&client.call("get_capacity", json!({})))["total_workers"], 10);
    assert_eq!(wait_closed(&mut slow[0]), "", "the oldest slow connection was closed");
    assert!(still_open(&slow[3]), "the newest slow connection is still open");

    // Fill the bound with connections that have each completed a request: the first client's
    // and three more, which close the remaining slow connections.
    let clients: Vec<HttpClient> = (0..3)
        .map(|_| {
            let mut c = HttpClient::new(&server.url, None);
            c.initialize();
            c
        })
        .collect();
    for (i, s) in slow.iter_mut().enumerate().skip(1) {
        assert_eq!(wait_closed(s), "", "slow connection {i} was closed to make room");
    }
    let reply = raw_exchange(&authority, raw_post_head(&authority, "Content-Length: 0\r\n").as_bytes());
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    // The clients' connections were kept: each still works.
    for mut c in clients {
        assert_eq!(ok(&c.call("get_capacity", json!({})))["total_workers"], 10);
    }
    assert_eq!(ok(&client.call("get_capacity", json!({})))["total_workers"], 10);
    assert!(server.stop().success());
}

/// Host and Origin are checked in every header that carries them, and the host of an
/// absolute-form request target too.
#[test]
fn every_host_and_origin_header_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &[]);
    let authority = authority(&server);
    let send = |target: &str, headers: &str| {
        let request = format!(
            "POST {target} HTTP/1.1\r\n{headers}Content-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{INIT}",
            INIT.len()
        );
        let reply = raw_exchange(&authority, request.as_bytes());
        reply.split(' ').nth(1).unwrap_or("").to_string()
    };
    let host = format!("Host: {authority}\r\n");
    assert_eq!(send("/mcp", &host), "200", "control");
    assert_eq!(send("/mcp", &format!("{host}Host: evil.example\r\n")), "400", "a second Host");
    assert_eq!(send("/mcp", &format!("Host: evil.example\r\n{host}")), "400", "a second Host, good one last");
    assert_eq!(send("/mcp", &format!("{host}{host}")), "400", "the same Host twice");
    let origins = format!("{host}Origin: http://localhost:3000\r\nOrigin: http://evil.example\r\n");
    assert_eq!(send("/mcp", &origins), "403", "an allowed Origin, then a disallowed one");
    let origins = format!("{host}Origin: http://localhost:3000\r\nOrigin: http://127.0.0.1:1\r\n");
    assert_eq!(send("/mcp", &origins), "200", "two allowed Origins");
    assert_eq!(send("http://evil.example/mcp", &host), "403", "absolute-form target on another host");
    assert_eq!(send(&format!("http://{authority}/mcp"), &host), "200", "absolute-form target on this server");
    assert_eq!(
        send(
            &format!("http://localhost:{}/mcp", server.url.rsplit(':').next().unwrap().trim_end_matches("/mcp")),
            &host
        ),
        "400",
        "absolute-form target allowed but not the Host header's"
    );
    assert!(server.stop().success());
}

/// A body that is not JSON is 400 with a JSON-RPC parse error; a batch or a jsonrpc other than
/// "2.0" is 400 with invalid request; tools/call with arguments that are not an object is
/// invalid params; DELETE of an unknown session is 404.
#[test]
fn malformed_json_rpc_gets_json_rpc_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(dir.path(), &[]);
    let agent = agent();
    let cases = [
        (r#"{"jsonrpc":"2.0","id":1,"method":"#, -32700, json!(null)),
        ("not json at all", -32700, json!(null)),
        (r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, -32600, json!(null)),
        (r#"{"jsonrpc":"1.0","id":7,"method":"ping"}"#, -32600, json!(7)),
        (r#"{"id":8,"method":"ping"}"#, -32600, json!(8)),
        ("42", -32600, json!(null)),
    ];
    for (body, code, id) in cases {
        let r = post_text(&agent, &server.url, &[], body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let m = r.message();
        assert_eq!((m["jsonrpc"].as_str(), &m["id"]), (Some("2.0"), &id), "{body}: {m}");
        assert_eq!(m["error"]["code"], code, "{body}: {m}");
    }

    let mut client = HttpClient::new(&server.url, None);
    client.initialize();
    for arguments in [json!([1]), json!("x"), json!(3)] {
        let r = client.request("tools/call", json!({"name": "get_capacity", "arguments": arguments}));
        assert_eq!(r["error"]["code"], -32602, "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("arguments must be an object"), "{r}");
    }
    let r = client.request("no/such/method", json!({}));
    assert_eq!(r["error"]["code"], -32601, "{r}");

    let delete = |session: &str| {
        agent
            .delete(&server.url)
            .header("Mcp-Session-Id", session)
            .header("MCP-Protocol-Version", V_LEGACY)
            .call()
            .expect("the DELETE completes")
            .status()
            .as_u16()
    };
    assert_eq!(delete("no-such-session"), 404);
    let session = client.session.clone().unwrap();
    assert_eq!(delete(&session), 202);
    assert_eq!(delete(&session), 404, "a session already ended");
    assert!(server.stop().success());
}
