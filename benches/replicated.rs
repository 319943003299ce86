//! Replicated mode on etcd (docs/replication.md, docs/benchmarks.md "Replicated mode"):
//! durable grants/s with 1 and 64 callers, replicated against local mode and against a raw
//! etcd transaction loop (the same fenced transaction shape: compare + 2 puts, the physical
//! limit of the engine here); takeover time p50/p99 over 20 SIGKILLs of the leader (the real
//! binary). Starts a 3-member etcd cluster on loopback; skipped when `etcd` is not installed.
//! BENCH_QUICK=1: short runs, 5 kills.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

#[path = "../tests/etcd/mod.rs"]
mod etcd;

use allocation_ledger::{Config, EtcdOptions, Ledger, OpenOptions, ResourceRequest};
use etcd::{EtcdCluster, Replica};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn config() -> Config {
    Config {
        worker_slots: 60_000,
        worker_base_port: 1024,
        total_cpu_millicores: 60_000_000,
        total_memory_mib: 60_000 * 2048,
        ..Config::default()
    }
}

fn request(i: u64) -> ResourceRequest {
    ResourceRequest::new(format!("job-{i:08}")).workers(1)
}

/// Grants/s of `callers` threads granting for `dur` on `ledger`.
fn grants(ledger: &Ledger, callers: u64, dur: Duration) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..callers {
            let (ledger, next) = (ledger.clone(), next.clone());
            s.spawn(move || {
                while start.elapsed() < dur {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    // A full pool rejects: a rejection is a durable write too.
                    if let Err(e) = ledger.request_resources(&request(i)) {
                        eprintln!("a grant failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
    });
    next.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Transactions/s of `callers` tasks each running the append's shape (compare on a key's
/// version, put a record and a head) back to back.
fn raw_txns(endpoints: &str, callers: u64, dur: Duration) -> f64 {
    use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let eps: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let client = rt.block_on(Client::connect(eps, None)).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let payload = vec![7u8; 300];
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let (mut client, done, payload) = (client.clone(), done.clone(), payload.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while start.elapsed() < dur {
                        let key = format!("/raw/{c}/{i:020}");
                        let txn = Txn::new().when([Compare::version("/raw/fence", CompareOp::Equal, 0)]).and_then([
                            TxnOp::put(key, payload.clone(), None),
                            TxnOp::put(format!("/raw/head/{c}"), i.to_string(), None),
                        ]);
                        client.txn(txn).await.unwrap();
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        println!("replicated: skipped (etcd is not installed; .ci/run installs etcd-server)");
        return;
    }
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let dur = if quick { Duration::from_secs(2) } else { Duration::from_secs(8) };
    let cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    println!("## Replicated mode on etcd (3 members on loopback, one machine)\n");
    println!("| measure | 1 caller | 64 callers |\n|---|---|---|");
    let raw = (raw_txns(&endpoints, 1, dur), raw_txns(&endpoints, 64, dur));
    println!("| raw etcd txn loop (compare + 2 puts), txns/s | {:.0} | {:.0} |", raw.0, raw.1);
    let dirs = tempfile::tempdir().unwrap();
    let local = Ledger::open_with(dirs.path().join("local"), OpenOptions::default().config(config())).unwrap();
    let local_rates = (grants(&local, 1, dur), grants(&local, 64, dur));
    drop(local);
    println!("| local mode, durable grants/s | {:.0} | {:.0} |", local_rates.0, local_rates.1);
    let etcd_opts =
        EtcdOptions::new(endpoints.split(',').map(str::to_string).collect(), "bench", "http://127.0.0.1:1/mcp");
    let replicated =
        Ledger::open_with(dirs.path().join("replicated"), OpenOptions::default().config(config()).etcd(etcd_opts))
            .unwrap();
    let rep = (grants(&replicated, 1, dur), grants(&replicated, 64, dur));
    let grants_per_txn = replicated.metrics().snapshot();
    drop(replicated);
    println!("| replicated mode, durable grants/s | {:.0} | {:.0} |", rep.0, rep.1);
    println!(
        "| replicated / raw etcd txn | {:.2}x | {:.2}x (goal >= 0.5x: {}) |",
        rep.0 / raw.0,
        rep.1 / raw.1,
        if rep.1 / raw.1 >= 0.5 { "met" } else { "missed" }
    );
    println!("| replicated / local | {:.2}x | {:.2}x |", rep.0 / local_rates.0, rep.1 / local_rates.1);
    println!("\nledger metrics of the replicated run: {grants_per_txn:?}\n");
    takeover(&cluster, if quick { 5 } else { 20 });
}

/// Takeover: two copies (lease 2 s); SIGKILL the leader, time until the standby grants, restart
/// the killed one as a standby; `kills` times.
fn takeover(cluster: &EtcdCluster, kills: usize) {
    let ttl = 2;
    let dirs = tempfile::tempdir().unwrap();
    let mut copies = [
        Replica::start(&dirs.path().join("a"), &cluster.endpoints(), "takeover", ttl),
        Replica::start(&dirs.path().join("b"), &cluster.endpoints(), "takeover", ttl),
    ];
    let agent = etcd::agent();
    let grant = |url: &str, i: usize| {
        etcd::call(
            &agent,
            url,
            "request_resources",
            &serde_json::json!({"job_id": format!("t-{i}"), "workers": 0, "mcp_servers": ["github"]}),
        )
        .is_ok_and(|r| r["status"] == "active")
    };
    let mut times = Vec::new();
    for k in 0..kills {
        let leader = (0..2).find(|&i| grant(&copies[i].url(), k)).unwrap_or_else(|| {
            std::thread::sleep(Duration::from_secs(3));
            (0..2).find(|&i| grant(&copies[i].url(), k)).expect("a leader")
        });
        let standby = 1 - leader;
        copies[leader].kill();
        let killed = Instant::now();
        let mut i = 0;
        while !grant(&copies[standby].url(), 1000 + k * 1000 + i) {
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
            assert!(killed.elapsed() < Duration::from_secs(60), "no takeover");
        }
        times.push(killed.elapsed());
        copies[leader].spawn(&cluster.endpoints(), "takeover", ttl);
    }
    times.sort();
    println!(
        "takeover after SIGKILL of the leader, lease TTL {ttl} s, {} kills: p50 {:?}, p99 {:?}, max {:?} (goal <= 2x TTL = {} s)",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().unwrap(),
        2 * ttl
    );
}
