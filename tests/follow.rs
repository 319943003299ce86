//! Following the log: `log --follow` beside a writer in other processes (across segment
//! rotation, in order, nothing missing or repeated), and the server's `GET /events` SSE stream
//! resumed with `Last-Event-ID` across a kill and restart of the server; a start the log no
//! longer holds is an error naming the oldest sequence number, and the token is required.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod common;
mod mcp_common;

use mcp_common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Instant;

/// A config whose segments rotate after a page (a handful of events).
fn small_segments(dir: &Path) -> PathBuf {
    let file = dir.join("config.json");
    std::fs::write(&file, json!({"segment_size_bytes": 4096}).to_string()).unwrap();
    file
}

/// Runs the binary on `data_dir` to completion: (exit code, stdout, stderr).
fn run(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = bin().arg("--data-dir").arg(data_dir).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// One event written by a `request` call in its own process (granted or recorded as failed:
/// either is one event).
fn cli_request(data_dir: &Path, config: &Path, i: usize) {
    let job = format!("job-{i}");
    let (code, out, err) =
        run(data_dir, &["--config", config.to_str().unwrap(), "request", "--job-id", &job, "--workers", "10"]);
    assert!(code == 0 || code == 3, "request {i}: exit {code}\n{out}\n{err}");
}

/// Every event of the log as `log --json` prints it (read-only, beside a writer or not).
fn whole_log(data_dir: &Path) -> Vec<Value> {
    let (code, out, err) = run(data_dir, &["log", "--json"]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn segment_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join(allocation_ledger::layout::WAL_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files
}

/// Lines of a reader, on a thread, as they come; `None` at the end.
fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<Option<String>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    });
    rx
}

/// The next line, or a failure after [`DEADLINE`].
fn next_line(rx: &Receiver<Option<String>>, what: &str) -> Option<String> {
    rx.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("no line from {what} within the deadline: {e}"))
}

/// Collects NDJSON events from `rx` until the one with `upto_seq` arrived.
fn follow_until(rx: &Receiver<Option<String>>, got: &mut Vec<Value>, upto_seq: u64) {
    while got.last().is_none_or(|e| e["seq"].as_u64().unwrap() < upto_seq) {
        let line = next_line(rx, "log --follow").expect("log --follow ended early");
        got.push(serde_json::from_str(&line).unwrap());
    }
}

#[test]
fn log_follow_sees_what_other_processes_write_in_order_across_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let config = small_segments(tmp.path());
    cli_request(&data, &config, 0);
    let mut follower: Child = bin()
        .arg("--data-dir")
        .arg(&data)
        .args(["log", "--follow", "--from-seq", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(follower.stdout.take().unwrap());
    let mut got = Vec::new();
    // Started first: it has printed what was there before anything more is written.
    let before = whole_log(&data);
    follow_until(&rx, &mut got, before.last().unwrap()["seq"].as_u64().unwrap());
    for i in 1..=40 {
        cli_request(&data, &config, i);
    }
    let all = whole_log(&data);
    follow_until(&rx, &mut got, all.last().unwrap()["seq"].as_u64().unwrap());
    assert!(segment_files(&data).len() >= 3, "the log rotated: {:?}", segment_files(&data));
    assert_eq!(got, all, "log --follow printed exactly the log, in order, with nothing missing or repeated");
    assert!(got[0]["at"].is_string() && got[0]["ts_us"].is_i64(), "{}", got[0]);

    // A closed pipe ends it at the next event written, as it ends `tail -f`: by SIGPIPE.
    drop(rx);
    let start = Instant::now();
    let mut i = 100;
    let status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < DEADLINE, "log --follow did not end after its stdout was closed");
        cli_request(&data, &config, i);
        i += 1;
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(13), "{status:?}");
}

#[test]
fn log_follow_refuses_a_start_the_log_no_longer_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let config = small_segments(tmp.path());
    for i in 0..30 {
        cli_request(&data, &config, i);
    }
    let segments = segment_files(&data);
    assert!(segments.len() >= 3, "{segments:?}");
    // The first segment archived away: sequence numbers 1.. are gone.
    std::fs::remove_file(&segments[0]).unwrap();
    let oldest = whole_oldest(&segments[1]);
    let (code, out, err) = run(&data, &["log", "--follow", "--from-seq", "1"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains(&format!("the oldest event it holds is {oldest}")), "{err}");
    let (code, out, err) = run(&data, &["--json", "log", "--follow"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(out.contains("from_seq"), "{out}");
    // From the oldest on, it serves.
    let (code, out, err) = run(&data, &["log", "--follow", "--from-seq", &oldest.to_string(), "--limit", "2"]);
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<u64> =
        out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![oldest, oldest + 1]);
}

/// The first sequence number of a segment, from its file name.
fn whole_oldest(segment: &Path) -> u64 {
    let name = segment.file_stem().unwrap().to_str().unwrap();
    name.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap()
}

/// A free loopback port (bound, then let go; the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What an SSE reader saw: an event (id, data), or the end of the stream.
enum Sse {
    Event(u64, Value),
    End,
}

/// `GET url` as an SSE stream with `headers`, read on a thread: (status, events).
fn sse(url: &str, headers: &[(&str, &str)]) -> (u16, Receiver<Sse>) {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.call().unwrap();
    let status = resp.status().as_u16();
    let (tx, rx) = channel();
    let body = resp.into_body().into_reader();
    std::thread::spawn(move || {
        let (mut id, mut data) = (None, None);
        for line in BufReader::new(body).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse::<u64>().unwrap());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(v).unwrap());
            } else if line.is_empty() {
                if let (Some(id), Some(data)) = (id.take(), data.take()) {
                    if tx.send(Sse::Event(id, data)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Sse::End);
    });
    (status, rx)
}

/// Collects SSE events until the one with `upto_seq`; false if the stream ended first.
fn sse_until(rx: &Receiver<Sse>, got: &mut Vec<(u64, Value)>, upto_seq: u64) -> bool {
    while got.last().is_none_or(|(id, _)| *id < upto_seq) {
        match rx.recv_timeout(DEADLINE).expect("an SSE event within the deadline") {
            Sse::Event(id, data) => got.push((id, data)),
            Sse::End => return false,
        }
    }
    true
}

/// Writes `n` events through the server's MCP tools.
fn mcp_writes(url: &str, token: Option<&str>, n: usize) {
    let mut client = HttpClient::stateless(url, token);
    for i in 0..n {
        client.call("request_resources", json!({"job_id": format!("sse-{i}"), "mcp_servers": [], "workers": 10}));
    }
}

/// The server's durable sequence number, from `/readyz`.
fn durable_seq(base: &str) -> u64 {
    let mut resp = agent().get(&format!("{base}/readyz")).call().unwrap();
    let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    body["durable_seq"].as_u64().unwrap()
}

#[test]
fn events_stream_resumes_with_last_event_id_across_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let config = small_segments(tmp.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let config_arg = ["--config", config.to_str().unwrap()];
    let mut server = HttpServer::start_on(&data, &addr, &config_arg);
    let base = server.url.trim_end_matches("/mcp").to_string();
    mcp_writes(&server.url, None, 5);

    let (status, rx) = sse(&format!("{base}/events?from_seq=1"), &[]);
    assert_eq!(status, 200);
    let mut got = Vec::new();
    assert!(sse_until(&rx, &mut got, durable_seq(&base)));
    // Written while the client listens.
    mcp_writes(&server.url, None, 20);
    assert!(sse_until(&rx, &mut got, durable_seq(&base)));

    // Killed (no graceful end): the stream breaks.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    while let Sse::Event(id, data) = rx.recv_timeout(DEADLINE).expect("the stream ends when the server dies") {
        got.push((id, data));
    }
    drop(server);

    let server = HttpServer::start_on(&data, &addr, &config_arg);
    assert_eq!(server.url.trim_end_matches("/mcp"), base, "the same address");
    mcp_writes(&server.url, None, 20);
    let last_id = got.last().unwrap().0.to_string();
    let (status, rx) = sse(&format!("{base}/events?from_seq=1"), &[("Last-Event-ID", &last_id)]);
    assert_eq!(status, 200);
    assert!(sse_until(&rx, &mut got, durable_seq(&base)));
    assert!(server.stop().success());

    let all = whole_log(&data);
    assert!(segment_files(&data).len() >= 3, "the log rotated");
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    let want: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(ids, want, "every event once, in order, across the restart");
    let datas: Vec<Value> = got.into_iter().map(|(_, d)| d).collect();
    assert_eq!(datas, all, "each data is the event as log --json prints it");
}

#[test]
fn events_refuses_a_start_the_log_no_longer_holds_and_wants_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let config = small_segments(tmp.path());
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let server =
        HttpServer::start(&data, &["--config", config.to_str().unwrap(), "--token-file", token_file.to_str().unwrap()]);
    let base = server.url.trim_end_matches("/mcp").to_string();
    let auth = [("Authorization", "Bearer s3cret-token")];
    mcp_writes(&server.url, Some("s3cret-token"), 30);

    // No token, a wrong one: 401 (the same rule as /mcp).
    assert_eq!(sse(&format!("{base}/events"), &[]).0, 401);
    assert_eq!(sse(&format!("{base}/events"), &[("Authorization", "Bearer nope")]).0, 401);

    let segments = segment_files(&data);
    assert!(segments.len() >= 3, "{segments:?}");
    std::fs::remove_file(&segments[0]).unwrap();
    let oldest = whole_oldest(&segments[1]);
    for headers in [vec![auth[0]], vec![auth[0], ("Last-Event-ID", "0")]] {
        let mut resp = agent().get(&format!("{base}/events?from_seq=1")).header(headers[0].0, headers[0].1);
        if let Some(h) = headers.get(1) {
            resp = resp.header(h.0, h.1);
        }
        let mut resp = resp.call().unwrap();
        assert_eq!(resp.status().as_u16(), 410);
        let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(body["error"]["oldest_seq"], oldest, "{body}");
        assert_eq!(body["error"]["kind"], "gone", "{body}");
    }
    // From the oldest on, it serves.
    let (status, rx) = sse(&format!("{base}/events?from_seq={oldest}"), &auth);
    assert_eq!(status, 200);
    let mut got = Vec::new();
    assert!(sse_until(&rx, &mut got, oldest + 1));
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![oldest, oldest + 1]);
    drop(rx);
    assert!(server.stop().success());
}

/// A record caught half-written (as a writer in another process leaves it for a moment) is
/// "not yet": the follower hands over what is before it, reports nothing, and hands it over
/// once it is whole.
#[test]
fn a_half_written_record_is_not_yet_and_is_read_once_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let config = small_segments(tmp.path());
    for i in 0..3 {
        cli_request(&data, &config, i);
    }
    let last = common::segment_files(&data).pop().unwrap();
    let whole = std::fs::read(&last).unwrap();
    let &(start, end, seq) = common::record_bounds(&whole).last().unwrap();
    let mut torn = whole.clone();
    let half = (start + (end - start) / 2) as usize;
    torn[half..end as usize].fill(0);
    std::fs::write(&last, &torn).unwrap();

    let mut follower = allocation_ledger::LogFollower::new(&data, 1).unwrap();
    let before: Vec<u64> = follower.poll(None, usize::MAX).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(before, (1..seq).collect::<Vec<_>>());
    assert!(follower.poll(None, usize::MAX).unwrap().is_empty(), "the torn record is not yet");
    std::fs::write(&last, &whole).unwrap();
    let start = Instant::now();
    let rest = loop {
        let got = follower.poll(None, usize::MAX).unwrap();
        if !got.is_empty() || start.elapsed() > DEADLINE {
            break got;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![seq]);
    assert_eq!(follower.next_seq(), seq + 1);
}
