//! Replicated mode on a real 3-member etcd cluster (docs/replication.md): copies of the
//! ledger are the real binary (`serve --http --etcd`). Gated: runs only with
//! `ALLOCATION_LEDGER_ETCD_TESTS=1` (.ci/run sets it and installs etcd); otherwise each test
//! prints that it was skipped and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(all(feature = "server", feature = "etcd"))]

mod etcd;

use etcd::{agent, call, enabled, error_message, wait_until, write, EtcdCluster, Replica};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The checks every scenario ends with: the copies hold one log (the same events, in order,
/// seq 1..n with no gap or duplicate), no slot was ever held twice and no more workers were
/// held than exist, and every acknowledged grant is in it.
fn check_one_log(copies: &[&Replica], acked: &BTreeSet<String>) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let logs = loop {
        let logs: Vec<Vec<Value>> = copies.iter().map(|c| c.events()).collect();
        if logs.windows(2).all(|w| w[0].len() == w[1].len()) {
            break logs;
        }
        if Instant::now() > deadline {
            let agent = agent();
            for (c, log) in copies.iter().zip(&logs) {
                let probe = call(&agent, &c.url(), "request_resources", &json!({"job_id": "probe", "workers": 99}));
                eprintln!("copy {}: {} events, last {:?}; a write there: {probe:?}", c.url(), log.len(), log.last());
            }
            panic!("timed out waiting for the copies to hold the same log");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = logs[0].clone();
    for other in &logs[1..] {
        assert_eq!(&log, other, "the copies' logs differ");
    }
    for (i, ev) in log.iter().enumerate() {
        assert_eq!(ev["seq"], json!(i as u64 + 1), "a gap or duplicate at {i}: {ev}");
    }
    let mut held: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut slots: BTreeSet<u64> = BTreeSet::new();
    let mut granted = BTreeSet::new();
    for ev in &log {
        let id = ev["allocation_id"].as_str().unwrap_or_default().to_string();
        match ev["type"].as_str() {
            Some("granted") => {
                assert!(granted.insert(id.clone()), "granted twice: {id}");
                let s: Vec<u64> =
                    ev["workers"].as_array().unwrap().iter().map(|w| w["slot"].as_u64().unwrap()).collect();
                for slot in &s {
                    assert!(slots.insert(*slot), "slot {slot} held twice (over-commit): {ev}");
                }
                assert!(slots.len() <= 10, "more workers held than exist");
                held.insert(id, s);
            }
            Some("released" | "expired") => {
                for slot in held.remove(&id).unwrap_or_default() {
                    slots.remove(&slot);
                }
            }
            _ => {}
        }
    }
    for id in acked {
        assert!(granted.contains(id), "acknowledged grant {id} is not in the log");
    }
    log
}

/// A client: `n` writes (requests of one worker; it releases its oldest once it holds three),
/// through any copy. Returns the grants it saw acknowledged.
fn client(urls: Vec<String>, tag: String, n: usize, acked: Arc<Mutex<BTreeSet<String>>>) {
    let agent = agent();
    let mut held = Vec::new();
    let mut done = 0;
    while done < n {
        let job = format!("{tag}-{done}");
        let answer =
            write(&agent, &urls, "request_resources", &json!({"job_id": job, "workers": 1}), Duration::from_secs(60));
        done += 1;
        let Ok(answer) = answer else { continue };
        if answer["status"] == "active" {
            let id = answer["allocation_id"].as_str().unwrap().to_string();
            acked.lock().unwrap().insert(id.clone());
            held.push(id);
        }
        if held.len() >= 3 {
            let id = held.remove(0);
            let _ = write(&agent, &urls, "release_resources", &json!({"allocation_id": id}), Duration::from_secs(60));
            done += 1;
        }
    }
}

fn two_copies(cluster: &EtcdCluster, name: &str, ttl: u64) -> (tempfile::TempDir, Replica, Replica) {
    let dirs = tempfile::tempdir().unwrap();
    let a = Replica::start(&dirs.path().join("a"), &cluster.endpoints(), name, ttl);
    let b = Replica::start(&dirs.path().join("b"), &cluster.endpoints(), name, ttl);
    (dirs, a, b)
}

#[test]
fn two_copies_race_1000_writes_each_into_one_log() {
    if !enabled("two_copies_race_1000_writes_each_into_one_log") {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let (_dirs, a, b) = two_copies(&cluster, "race", 2);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let threads: Vec<_> = [(&a, &b, "a"), (&b, &a, "b")]
        .into_iter()
        .map(|(own, other, tag)| {
            let (urls, acked) = (vec![own.url(), other.url()], acked.clone());
            let tag = tag.to_string();
            std::thread::spawn(move || client(urls, tag, 1000, acked))
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let acked = acked.lock().unwrap().clone();
    let log = check_one_log(&[&a, &b], &acked);
    assert!(log.len() > 1500, "the writes reached the log: {}", log.len());
    let head = cluster.etcdctl(&["get", "--print-value-only", "/race/head"]);
    assert_eq!(head.trim(), log.len().to_string(), "etcd's head is the log's end");
}

#[test]
fn a_paused_leader_is_fenced_and_a_standby_takes_over() {
    if !enabled("a_paused_leader_is_fenced_and_a_standby_takes_over") {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let (_dirs, a, b) = two_copies(&cluster, "pause", 2);
    let agent = agent();
    let urls = vec![a.url(), b.url()];
    let ok =
        write(&agent, &urls, "request_resources", &json!({"job_id": "before", "workers": 1}), Duration::from_secs(30));
    assert_eq!(ok.unwrap()["status"], "active");
    // A writes continuously through A itself; A is paused mid-stream for 3 leases.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, acked, stop) = (a.url(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let agent = etcd::agent();
            let mut i = 0;
            let mut refused = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let args = json!({"job_id": format!("a-{i}"), "workers": 0, "mcp_servers": ["github"]});
                match call(&agent, &url, "request_resources", &args) {
                    Ok(r) if r["status"] == "active" => {
                        acked.lock().unwrap().insert(r["allocation_id"].as_str().unwrap().to_string());
                    }
                    Ok(r) => refused.push(r),
                    Err(_) => {}
                }
            }
            refused
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    a.signal("STOP");
    let paused = Instant::now();
    wait_until("the standby to take over", Duration::from_secs(30), || {
        call(
            &agent,
            &b.url(),
            "request_resources",
            &json!({"job_id": "b-probe", "workers": 0, "mcp_servers": ["github"]}),
        )
        .is_ok_and(|r| r["status"] == "active")
    });
    eprintln!("takeover after a pause: {:?}", paused.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    a.signal("CONT");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = writer.join().unwrap();
    // After SIGCONT the old leader's writes are refused, naming the new leader.
    let after = call(&agent, &a.url(), "request_resources", &json!({"job_id": "late", "workers": 1})).unwrap();
    assert_eq!(after["kind"], "unavailable", "{after}");
    assert!(error_message(&after).unwrap().contains(&b.url()), "{after}");
    assert!(refused.iter().all(|r| r["kind"] == "unavailable"), "{refused:?}");
    let acked = acked.lock().unwrap().clone();
    check_one_log(&[&a, &b], &acked);
}

#[test]
fn sigkill_of_the_leader_under_16_clients_loses_no_acknowledged_grant() {
    if !enabled("sigkill_of_the_leader_under_16_clients_loses_no_acknowledged_grant") {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let (_dirs, mut a, b) = two_copies(&cluster, "kill", 2);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let urls = vec![a.url(), b.url()];
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (urls, acked) = (urls.clone(), acked.clone());
            std::thread::spawn(move || client(urls, format!("c{i}"), 60, acked))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    a.kill();
    let killed = Instant::now();
    let agent = agent();
    wait_until("the standby to take over", Duration::from_secs(30), || {
        call(&agent, &b.url(), "get_capacity", &json!({})).is_ok()
            && call(
                &agent,
                &b.url(),
                "request_resources",
                &json!({"job_id": "probe", "workers": 0, "mcp_servers": ["github"]}),
            )
            .is_ok_and(|r| r["status"] == "active")
    });
    eprintln!("takeover after SIGKILL (lease 2 s): {:?}", killed.elapsed());
    threads.into_iter().for_each(|t| t.join().unwrap());
    a.spawn(&cluster.endpoints(), "kill", 2);
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    check_one_log(&[&b, &a], &acked);
}

#[test]
fn etcd_losing_quorum_stops_writes_and_they_resume_after() {
    if !enabled("etcd_losing_quorum_stops_writes_and_they_resume_after") {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    let (_dirs, a, b) = two_copies(&cluster, "quorum", 2);
    let agent = agent();
    let urls = vec![a.url(), b.url()];
    let grant = |job: &str| {
        write(
            &agent,
            &urls,
            "request_resources",
            &json!({"job_id": job, "workers": 0, "mcp_servers": ["github"]}),
            Duration::from_secs(30),
        )
    };
    assert_eq!(grant("first").unwrap()["status"], "active");
    cluster.kill(0);
    for i in 0..3 {
        let answer = grant(&format!("one-member-down-{i}")).unwrap();
        assert_eq!(answer["status"], "active", "writes continue with 2 of 3: {answer}");
    }
    cluster.kill(1);
    let failed = write(
        &agent,
        &urls,
        "request_resources",
        &json!({"job_id": "no-quorum", "workers": 0, "mcp_servers": ["github"]}),
        Duration::from_secs(15),
    );
    assert!(failed.is_err(), "a write without quorum fails: {failed:?}");
    // Every copy refuses writes and says why (a copy may first name the leader it saw last,
    // until it finds etcd without quorum).
    for copy in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let args = json!({"job_id": "no-quorum-direct", "workers": 0, "mcp_servers": ["github"]});
            let answer = call(&agent, &copy.url(), "request_resources", &args);
            let message = answer.as_ref().ok().and_then(error_message).map(str::to_string);
            assert!(answer.as_ref().map_or(true, |a| a["status"] != "active"), "a write without quorum: {answer:?}");
            if message.as_deref().is_some_and(|m| m.contains("no quorum")) {
                break;
            }
            assert!(Instant::now() < deadline, "{} does not say no quorum: {answer:?}", copy.url());
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    cluster.restart(0);
    cluster.restart(1);
    cluster.wait_healthy();
    let resumed = write(
        &agent,
        &urls,
        "request_resources",
        &json!({"job_id": "resumed", "workers": 0, "mcp_servers": ["github"]}),
        Duration::from_secs(60),
    );
    assert_eq!(resumed.unwrap()["status"], "active", "writes resume");
    check_one_log(&[&a, &b], &BTreeSet::new());
}

#[test]
fn a_standby_down_past_retention_says_it_cannot_catch_up() {
    if !enabled("a_standby_down_past_retention_says_it_cannot_catch_up") {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let dirs = tempfile::tempdir().unwrap();
    let config = dirs.path().join("config.json");
    std::fs::write(&config, r#"{"snapshot_every": 5}"#).unwrap();
    let config = config.to_str().unwrap().to_string();
    let a = Replica::start_with(&dirs.path().join("a"), &cluster.endpoints(), "ret", 1, &["--config", &config]);
    let mut b = Replica::start_with(&dirs.path().join("b"), &cluster.endpoints(), "ret", 1, &["--config", &config]);
    let agent = agent();
    let urls = vec![a.url(), b.url()];
    let grant = |job: String| {
        let r = write(
            &agent,
            &urls,
            "request_resources",
            &json!({"job_id": job, "workers": 0, "mcp_servers": ["github"]}),
            Duration::from_secs(30),
        );
        assert_eq!(r.unwrap()["status"], "active");
    };
    (0..3).for_each(|i| grant(format!("early-{i}")));
    wait_until("b to follow", Duration::from_secs(30), || b.events().len() == 4);
    b.kill();
    // B's progress key goes with its lease; A's snapshots then let the leader trim the log.
    let a_urls = [a.url()];
    let mut i = 0;
    wait_until("retention to pass b's end", Duration::from_secs(60), || {
        i += 1;
        let r = write(
            &agent,
            &a_urls,
            "request_resources",
            &json!({"job_id": format!("late-{i}"), "workers": 0, "mcp_servers": ["github"]}),
            Duration::from_secs(30),
        );
        assert_eq!(r.unwrap()["status"], "active");
        let start = cluster.etcdctl(&["get", "--print-value-only", "/ret/log-start"]);
        start.trim().parse::<u64>().is_ok_and(|s| s > 5)
    });
    let mut child = b
        .command(&cluster.endpoints(), "ret", 1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the copy behind retention started serving");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("cannot catch up"), "{stderr}");
    assert!(stderr.contains("copy a peer's data directory"), "{stderr}");
}

/// Runs the `serve` of a stopped copy and waits until it exits (it must refuse to start):
/// its stderr.
fn refused_start(copy: &Replica, cluster: &EtcdCluster, name: &str, ttl: u64) -> String {
    let mut child = copy
        .command(&cluster.endpoints(), name, ttl)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the copy started serving");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

/// The 64-hex-digit words of `text` (chain values).
fn hashes(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_hexdigit()).filter(|w| w.len() == 64).map(str::to_string).collect()
}

#[test]
fn a_copy_whose_local_log_was_altered_refuses_to_serve() {
    if !enabled("a_copy_whose_local_log_was_altered_refuses_to_serve") {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let (dirs, a, mut b) = two_copies(&cluster, "tamper", 2);
    let agent = agent();
    let urls = vec![a.url(), b.url()];
    for i in 0..4 {
        let args = json!({"job_id": format!("early-{i}"), "workers": 0, "mcp_servers": ["github"]});
        let r = write(&agent, &urls, "request_resources", &args, Duration::from_secs(30));
        assert_eq!(r.unwrap()["status"], "active");
    }
    wait_until("b to follow", Duration::from_secs(30), || b.events().len() == 5 && a.events().len() == 5);
    b.kill();
    let wal = b.dir.join("wal");
    let pristine = dirs.path().join("b-wal");
    std::fs::create_dir_all(&pristine).unwrap();
    for f in std::fs::read_dir(&wal).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, pristine.join(f.file_name().unwrap())).unwrap();
    }

    // A flipped byte (its CRC made good again): the copy's own chain check finds it.
    etcd::tamper::rewrite(&b.dir, 3, b"early-", b'E', false);
    let stderr = refused_start(&b, &cluster, "tamper", 2);
    assert!(stderr.contains("fails its chain check") && stderr.contains("refuses to serve"), "{stderr}");

    // A different but valid record at seq 3 (the chain recomputed after it): its chain value
    // at its last record is not the shared log's.
    std::fs::remove_dir_all(&wal).unwrap();
    std::fs::create_dir_all(&wal).unwrap();
    for f in std::fs::read_dir(&pristine).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, wal.join(f.file_name().unwrap())).unwrap();
    }
    etcd::tamper::rewrite(&b.dir, 3, b"early-", b'E', true);
    let stderr = refused_start(&b, &cluster, "tamper", 2);
    assert!(stderr.contains("diverged from the shared log at record 5"), "{stderr}");
    let named = hashes(&stderr);
    assert!(named.len() >= 2 && named[0] != named[1], "both chain values are named: {stderr}");

    // The healthy copy goes on serving writes.
    let r = write(
        &agent,
        &[a.url()],
        "request_resources",
        &json!({"job_id": "after", "workers": 1}),
        Duration::from_secs(30),
    );
    assert_eq!(r.unwrap()["status"], "active");
}

#[test]
fn the_cli_pointed_at_a_standby_writes_through_the_leader() {
    if !enabled("the_cli_pointed_at_a_standby_writes_through_the_leader") {
        return;
    }
    let cluster = EtcdCluster::start(3);
    let (_dirs, a, b) = two_copies(&cluster, "cli", 2);
    let agent = agent();
    let urls = vec![a.url(), b.url()];
    let r =
        write(&agent, &urls, "request_resources", &json!({"job_id": "first", "workers": 1}), Duration::from_secs(30));
    assert_eq!(r.unwrap()["status"], "active");
    // The standby: the copy whose direct answer is "not the leader, the leader is X".
    let deadline = Instant::now() + Duration::from_secs(30);
    let (standby, leader) = loop {
        let probe = json!({"job_id": "probe", "workers": 0, "mcp_servers": ["github"]});
        let named =
            |url: &str| call(&agent, url, "request_resources", &probe).ok().as_ref().and_then(etcd::leader_named);
        if named(&b.url()) == Some(a.url()) {
            break (b.url(), a.url());
        }
        if named(&a.url()) == Some(b.url()) {
            break (a.url(), b.url());
        }
        assert!(Instant::now() < deadline, "one copy names the other as the leader");
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
        .env_remove("ALLOCATION_LEDGER_DIR")
        .args(["--server", &standby, "--json", "request", "--job-id", "via-standby", "--workers", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let granted: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(granted["status"], "active", "{stdout}");
    assert!(stderr.contains("not the leader") && stderr.contains(&leader), "the CLI says it followed: {stderr}");
    // MCP callers still get the clear error naming the leader.
    let direct = call(&agent, &standby, "request_resources", &json!({"job_id": "direct", "workers": 1})).unwrap();
    assert_eq!(direct["kind"], "unavailable", "{direct}");
    assert_eq!(etcd::leader_named(&direct).as_deref(), Some(leader.as_str()), "{direct}");
}
