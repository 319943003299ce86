//! `replay` (step through history, or the whole state at a point) and `what-if` (the recorded
//! demand re-decided under another config).

use super::{table, to_json, Out};
use allocation_ledger::{parse_time, ExitCode, Micros};
use allocation_ledger::{AllocationId, Error, Ledger, Result};
use allocation_ledger::{GroupRow, Hold, LogPoint, SideReport, StateAt, Step, StepFilter, WhatIfOptions, WhatIfReport};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// First event: a sequence number, or an instant (RFC 3339 or relative: -15m) [default: the first]
    #[arg(long, value_name = "SEQ|TIME", allow_hyphen_values = true)]
    from: Option<String>,
    /// Last event: a sequence number, or an instant [default: the last]
    #[arg(long, value_name = "SEQ|TIME", allow_hyphen_values = true)]
    to: Option<String>,
    /// Show only the events of this allocation (alloc-xxxxxxxxxxxx)
    #[arg(long, value_name = "ID")]
    allocation: Option<String>,
    /// Show only the events of this job's allocations
    #[arg(long, value_name = "JOB")]
    job_id: Option<String>,
    /// Print the whole state (capacity and active allocations) at --to instead of the steps
    #[arg(long, requires = "to")]
    state: bool,
}

#[derive(Debug, Args)]
pub struct WhatIfArgs {
    /// Start of the window (inclusive): RFC 3339 or relative (-15m, -2h, -1d) [default: the ledger's start]
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    since: Option<String>,
    /// End of the window (exclusive) [default: now]
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    until: Option<String>,
    /// How long a request rejected in reality and granted in the what-if is held: ttl, median-of-job or a duration (15m)
    #[arg(long, value_name = "HOLD", default_value = "ttl")]
    hold: String,
    /// Also draw both utilisation timelines on one chart in this SVG file
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

fn point(ledger: &Ledger, field: &str, text: Option<&str>) -> Result<Option<LogPoint>> {
    text.map(|t| LogPoint::parse(field, t, ledger.now_micros())).transpose()
}

/// `replay`: the steps as lines (NDJSON with `--json`), or the state at `--to` with `--state`.
pub fn replay(ledger: &Ledger, out: &Out, args: ReplayArgs) -> Result<ExitCode> {
    let from = point(ledger, "from", args.from.as_deref())?;
    let to = point(ledger, "to", args.to.as_deref())?;
    if args.state {
        let Some(to) = to else { return Err(Error::invalid("to", "--state needs --to")) };
        let s = ledger.state_at_point(to)?;
        out.doc(&s, || human_state(&s))?;
        return Ok(ExitCode::Ok);
    }
    let allocation = args.allocation.as_deref().map(|a| AllocationId::parse("allocation", a)).transpose()?;
    if let Some(j) = &args.job_id {
        allocation_ledger::validate_job_id("job_id", j)?;
    }
    let filter = StepFilter { allocation, job_id: args.job_id };
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    ledger.replay_steps(from, to, &filter, &mut |step| {
        let line = if out.json { to_json(step).map(|v| v.to_string()) } else { Ok(human_step(step)) };
        let written = line.and_then(|l| match writeln!(stdout, "{l}") {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(Error::io("writing to stdout", e)),
            Ok(()) => Ok(true),
        });
        written.unwrap_or_else(|e| {
            failed = Some(e);
            false
        })
    })?;
    failed.map_or(Ok(ExitCode::Ok), Err)
}

fn human_step(s: &Step) -> String {
    let (b, a) = (&s.before, &s.after);
    let mut line = format!(
        "{:>6}  {}  {:<14} {}  workers {}/{} -> {}/{}  cpu {:.1} -> {:.1}  mem {} -> {} MiB",
        s.seq,
        s.at,
        s.event.body.type_name(),
        s.event.body.allocation_id().map_or_else(|| "-".repeat(18), |i| i.to_string()),
        b.allocated_workers,
        b.total_workers,
        a.allocated_workers,
        a.total_workers,
        b.allocated_cpu_millicores as f64 / 1000.0,
        a.allocated_cpu_millicores as f64 / 1000.0,
        b.allocated_memory_mib,
        a.allocated_memory_mib,
    );
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    if !s.slots_taken.is_empty() {
        line += &format!("  took slots {}", list(&s.slots_taken));
    }
    if !s.slots_freed.is_empty() {
        line += &format!("  freed slots {}", list(&s.slots_freed));
    }
    if !s.endpoints_started.is_empty() {
        line += &format!("  started {}", s.endpoints_started.join(", "));
    }
    if !s.endpoints_stopped.is_empty() {
        line += &format!("  stopped {}", s.endpoints_stopped.join(", "));
    }
    if let allocation_ledger::EventBody::Rejected(r) = &s.event.body {
        line += &format!("  ({})", r.error);
    }
    if !s.config_change.is_empty() {
        line += &format!("  pool: {}", s.config_change.join("; "));
    }
    line
}

fn human_state(s: &StateAt) -> String {
    let c = &s.capacity;
    let rows: Vec<Vec<String>> = s
        .allocations
        .iter()
        .map(|a| {
            vec![
                a.allocation_id.to_string(),
                a.job_id.clone(),
                a.workers.iter().map(|w| w.worker_id.clone()).collect::<Vec<_>>().join(","),
                a.mcp_servers.iter().map(|m| m.name.clone()).collect::<Vec<_>>().join(","),
                a.timestamps
                    .expires_at
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let reservations: Vec<String> = s
        .reservations
        .iter()
        .map(|r| {
            format!(
                "{} {} workers for {}, {} to {} ({})\n",
                r.reservation_id,
                r.workers,
                r.holder_text(),
                r.start,
                r.end,
                r.state.replace('_', " ")
            )
        })
        .collect();
    format!(
        "state after event {} (at {})\nworkers {}/{} allocated, cpu {:.1}/{:.1} cores, memory {}/{} MiB, {} active\n{}{}",
        s.seq,
        s.at,
        c.allocated_workers,
        c.total_workers,
        c.allocated_cpu,
        c.total_cpu,
        c.allocated_memory,
        c.total_memory,
        c.active_allocations,
        table(&["ALLOCATION", "JOB", "WORKERS", "MCP", "EXPIRES"], &rows),
        reservations.concat()
    )
}

fn time(ledger: &Ledger, field: &str, text: Option<&str>) -> Result<Option<Micros>> {
    text.map(|t| parse_time(field, t, ledger.now_micros())).transpose()
}

/// `what-if [--config FILE]`: the file's fields over the recorded config (none: the recorded
/// config itself, a determinism check).
pub fn what_if(ledger: &Ledger, out: &Out, config: Option<&Path>, args: WhatIfArgs) -> Result<ExitCode> {
    let patch = match config {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                _ => return Err(Error::invalid("config", format!("{} is not a JSON object", path.display()))),
            }
        }
    };
    let opts = WhatIfOptions {
        config: patch,
        since: time(ledger, "since", args.since.as_deref())?,
        until: time(ledger, "until", args.until.as_deref())?,
        hold: Hold::parse("hold", &args.hold)?,
    };
    let report = ledger.what_if(&opts)?;
    if let Some(path) = &args.svg {
        std::fs::write(path, report.to_svg()).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        if !out.json {
            eprintln!("wrote a chart to {}", path.display());
        }
    }
    let mut doc = to_json(&report)?;
    if let Some(path) = &args.svg {
        doc["svg"] = path.display().to_string().into();
    }
    out.doc(&doc, || human_what_if(&report))?;
    Ok(ExitCode::Ok)
}

fn signed(v: i64) -> String {
    if v > 0 {
        format!("+{v}")
    } else {
        v.to_string()
    }
}

fn side_rows(r: &SideReport, w: &SideReport) -> Vec<Vec<String>> {
    let count =
        |name: &str, a: u64, b: u64| vec![name.to_string(), a.to_string(), b.to_string(), signed(b as i64 - a as i64)];
    let mut rows = vec![count("granted", r.granted, w.granted), count("rejected", r.rejected, w.rejected)];
    let reasons: std::collections::BTreeSet<&String> = r.rejections.keys().chain(w.rejections.keys()).collect();
    for reason in reasons {
        let n = |s: &SideReport| s.rejections.get(reason).copied().unwrap_or(0);
        rows.push(count(&format!("  {reason}"), n(r), n(w)));
    }
    rows.push(count("invalid under the config", r.invalid, w.invalid));
    rows.push(count("released", r.released, w.released));
    rows.push(count("expired", r.expired, w.expired));
    if r.waits.count + w.waits.count > 0 {
        rows.push(count("waited in the queue", r.waits.count, w.waits.count));
        rows.push(count("  granted after waiting", r.waits.granted, w.waits.granted));
        let secs = |v: f64| format!("{v:.1} s");
        let (rt, wt) = (r.waits.total_wait_seconds, w.waits.total_wait_seconds);
        rows.push(vec!["  wait (total)".into(), secs(rt), secs(wt), String::new()]);
        let (rm, wm) = (r.waits.max_wait_seconds, w.waits.max_wait_seconds);
        rows.push(vec!["  wait (longest)".into(), secs(rm), secs(wm), String::new()]);
    }
    for (name, a, b, unit) in [
        ("workers", &r.workers, &w.workers, ""),
        ("cpu", &r.cpu, &w.cpu, " cores"),
        ("memory", &r.memory, &w.memory, " MiB"),
    ] {
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        rows.push(vec![
            format!("{name}: pool (mean)"),
            format!("{:.1}{unit}", a.mean_total),
            format!("{:.1}{unit}", b.mean_total),
            String::new(),
        ]);
        rows.push(vec![
            format!("{name}: peak held"),
            format!("{:.1}{unit}", a.peak_allocated),
            format!("{:.1}{unit}", b.peak_allocated),
            String::new(),
        ]);
        rows.push(vec![
            format!("{name}: mean utilisation"),
            pct(a.mean_utilisation),
            pct(b.mean_utilisation),
            String::new(),
        ]);
        rows.push(vec![
            format!("{name}: peak utilisation"),
            pct(a.peak_utilisation),
            pct(b.peak_utilisation),
            String::new(),
        ]);
    }
    rows
}

fn group_table(title: &str, column: &str, differing: u64, rows: &[GroupRow]) -> String {
    if rows.is_empty() {
        return format!("{title}: no differences\n");
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .take(20)
        .map(|g| {
            vec![
                g.name.clone(),
                g.requests.to_string(),
                format!("{} -> {}", g.reality_granted, g.what_if_granted),
                format!("{} -> {}", g.reality_rejected, g.what_if_rejected + g.what_if_invalid),
                signed(g.granted_difference()),
                format!("{:.0} -> {:.0}", g.reality_worker_seconds, g.what_if_worker_seconds),
            ]
        })
        .collect();
    let head = [column, "REQUESTS", "GRANTED", "REJECTED", "CHANGE", "WORKER-SECONDS"];
    let shown = if differing > 20 { format!(" (first 20 of {differing})") } else { String::new() };
    format!("{title} whose outcomes differ{shown}:\n{}", table(&head, &body))
}

fn human_what_if(r: &WhatIfReport) -> String {
    let c = &r.comparison;
    let mut s = format!(
        "what-if from {} to {}: {} requests; hold for what-if-only grants: {}\n",
        c.since, c.until, c.requests, r.hold
    );
    match r.reproduced {
        Some(true) => s += "config: the recorded one; every decision came out as recorded (deterministic)\n",
        Some(false) => {
            s += &format!(
                "config: the recorded one; {} decisions differ from the recorded ones (first at event {})\n",
                r.differing_decisions,
                r.first_difference_seq.unwrap_or(0)
            );
        }
        None => {
            if let Some(cfg) = &r.config {
                s += &format!(
                    "config: what-if pool of {} workers, {:.1} cores, {} MiB\n",
                    cfg.in_pool_slots(),
                    cfg.total_cpu_millicores as f64 / 1000.0,
                    cfg.total_memory_mib
                );
            }
        }
    }
    if r.config_changes_ignored > 0 {
        s += &format!(
            "{} recorded config change(s) in the window were not applied to the what-if\n",
            r.config_changes_ignored
        );
    }
    s += &table(&["", "REALITY", "WHAT-IF", "CHANGE"], &side_rows(&c.reality, &c.what_if));
    let ch = &c.changes;
    s += &format!(
        "outcomes: granted in both {}, only in the what-if {}, only in reality {}, rejected in both {}\n",
        ch.granted_in_both, ch.granted_only_in_what_if, ch.granted_only_in_reality, ch.rejected_in_both
    );
    s += &group_table("jobs", "JOB", c.jobs_differing, &c.jobs);
    if !c.tenants.is_empty() {
        s += &group_table("tenants", "TENANT", c.tenants_differing, &c.tenants);
    }
    s
}
