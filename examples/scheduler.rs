//! A small job scheduler that embeds the ledger as a library (no async runtime, no server).
//!
//! A queue of jobs, each needing some workers and MCP servers for a number of ticks. Every tick
//! the scheduler finishes the jobs whose work is done (releasing their allocations), then tries
//! to start queued jobs, most urgent first. A request the pool cannot hold is recorded by the
//! ledger as `failed`; the job stays queued and is retried on a later tick. One job "hangs" past
//! its TTL: the ledger expires its allocation and the scheduler notices when it tries to release.
//!
//! Time is a `ManualClock` advanced by 30 simulated seconds per tick, so the run takes well under
//! a second however long the simulated jobs are. Swap in `SystemClock` (the default) for real time.
//!
//!     cargo run --example scheduler
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::{Ledger, ManualClock, OpenOptions, Priority, RequestOutcome, ResourceRequest};
use std::collections::VecDeque;
use std::sync::Arc;

const TICK_SECONDS: i64 = 30;

#[derive(Debug, Clone)]
struct Job {
    name: &'static str,
    workers: u32,
    mcp_servers: &'static [&'static str],
    priority: Priority,
    /// How many ticks the job runs once started.
    ticks: u32,
    ttl_seconds: u64,
    /// Tries that were refused for lack of capacity.
    refusals: u32,
}

struct Running {
    job: Job,
    allocation_id: String,
    done_at_tick: u32,
}

fn job(name: &'static str, workers: u32, mcp: &'static [&'static str], priority: Priority, ticks: u32) -> Job {
    Job { name, workers, mcp_servers: mcp, priority, ticks, ttl_seconds: 3600, refusals: 0 }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::at_default_epoch();
    let ledger = Ledger::open_with(dir.path(), OpenOptions::default().clock(Arc::new(clock.clone())))?;
    let total = ledger.get_capacity()?.total_workers;
    println!("ledger at {}, {total} workers", dir.path().display());

    let mut queue: VecDeque<Job> = VecDeque::from(vec![
        job("index-repo", 4, &["github"], Priority::Normal, 3),
        job("run-tests", 6, &["github", "jira"], Priority::High, 2),
        job("nightly-report", 3, &["jira"], Priority::Low, 1),
        job("hotfix", 2, &["github"], Priority::Critical, 2),
        job("embed-docs", 5, &[], Priority::Normal, 2),
        // Hangs: 20 ticks of work (600 s) but a TTL of 120 s, so the ledger expires it.
        Job { ttl_seconds: 120, ..job("stuck-crawler", 2, &["web"], Priority::Normal, 20) },
        job("triage", 1, &["jira"], Priority::Low, 1),
    ]);
    let mut running: Vec<Running> = Vec::new();
    let (mut finished, mut expired) = (Vec::new(), Vec::new());

    let mut tick = 0;
    while !queue.is_empty() || !running.is_empty() {
        tick += 1;
        assert!(tick < 100, "the scheduler should have finished long ago");

        // 1. Finish what is done. A release of an allocation that already expired is reported
        //    as `already_expired`, never an error.
        let (done, still): (Vec<_>, Vec<_>) = running.into_iter().partition(|r| r.done_at_tick <= tick);
        running = still;
        for r in done {
            let report = ledger.release_resources(&r.allocation_id)?;
            match report.status.as_str() {
                "released" => {
                    println!(
                        "tick {tick:2}: {:<14} done, released {} workers after {:.0}s",
                        r.job.name, report.workers_released, report.duration_seconds
                    );
                    finished.push(r.job.name);
                }
                other => {
                    println!("tick {tick:2}: {:<14} finished but its allocation was {other}", r.job.name);
                    expired.push(r.job.name);
                }
            }
        }

        // 2. Start queued jobs, most urgent first; a refusal leaves the job queued for a retry.
        let mut waiting: Vec<Job> = queue.drain(..).collect();
        waiting.sort_by_key(|j| std::cmp::Reverse(j.priority));
        for mut j in waiting {
            let mut req =
                ResourceRequest::new(j.name).workers(j.workers).priority(j.priority).ttl_seconds(j.ttl_seconds);
            for m in j.mcp_servers {
                req = req.mcp_server(*m);
            }
            match ledger.request_resources(&req)? {
                RequestOutcome::Granted(g) => {
                    let endpoints: Vec<&str> = g.workers_allocated.iter().map(|w| w.endpoint.as_str()).collect();
                    println!("tick {tick:2}: {:<14} started on {} ({})", j.name, endpoints.join(", "), g.allocation_id);
                    running.push(Running {
                        allocation_id: g.allocation_id.to_string(),
                        done_at_tick: tick + j.ticks,
                        job: j,
                    });
                }
                RequestOutcome::Failed(f) => {
                    j.refusals += 1;
                    if j.refusals == 1 {
                        println!("tick {tick:2}: {:<14} waits: {}", j.name, f.error);
                    }
                    queue.push_back(j);
                }
            }
        }

        // 3. Time passes. Expiries are recorded by the next write, or explicitly here.
        clock.advance_seconds(TICK_SECONDS);
        for id in ledger.cleanup_expired()?.cleaned_up {
            println!("tick {tick:2}: {id} expired (its job did not release it in time)");
        }
    }

    let cap = ledger.get_capacity()?;
    assert_eq!(cap.available_workers, cap.total_workers, "every worker is back in the pool");
    assert_eq!(cap.active_allocations, 0);
    let events = ledger.events(1, usize::MAX)?;
    let count = |t: &str| events.iter().filter(|e| e.event.body.type_name() == t).count();
    println!(
        "\n{} jobs finished, {} expired; the log has {} events: {} granted, {} rejected (retried later), {} released, {} expired",
        finished.len(),
        expired.len(),
        events.len(),
        count("granted"),
        count("rejected"),
        count("released"),
        count("expired"),
    );
    println!("capacity at the end: {}/{} workers available", cap.available_workers, cap.total_workers);
    Ok(())
}
