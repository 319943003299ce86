//! The time-travel subcommands: `capacity --at`, `list --at`, `history`, `log --since/--until`,
//! `usage` and `timeline`, and the progress bar for long scans.

use super::{output, table, to_json, Out};
use allocation_ledger::CapacityReport;
use allocation_ledger::ExitCode;
use allocation_ledger::{parse_duration_micros, parse_time, Micros};
use allocation_ledger::{AllocationId, Error, Ledger, Result};
use allocation_ledger::{EventRange, GroupBy, History, Timeline, UsageReport};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("subject").required(true).args(["allocation", "job_id"])))]
pub struct HistoryArgs {
    /// The allocation (alloc-xxxxxxxxxxxx) whose events to show
    #[arg(long, value_name = "ID")]
    allocation: Option<String>,
    /// The job whose allocations' events to show
    #[arg(long, value_name = "JOB")]
    job_id: Option<String>,
    /// Only the most recent N events; the cursor to the older ones is printed on stderr (with
    /// --json: the object's next_cursor)
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// The events before the page that printed this cursor (same --allocation or --job-id)
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Start of the window (inclusive): RFC 3339 (2026-11-27T03:12:00Z) or relative (-15m, -2h, -1d)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    since: String,
    /// End of the window (exclusive)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, default_value = "now")]
    until: String,
    /// Group by `job`, by `tenant` (the quota tenant recorded with each grant) or by a metadata key, `metadata.KEY` (e.g. metadata.team)
    #[arg(long, value_name = "GROUPING", default_value = "job")]
    by: String,
}

#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// Start of the window (inclusive): RFC 3339 or relative (-15m, -2h, -1d)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    since: String,
    /// End of the window (exclusive)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, default_value = "now")]
    until: String,
    /// Width of each bucket: 30s, 5m, 1h, 1d
    #[arg(long, value_name = "DURATION")]
    bucket: String,
    /// Also write a chart of allocated against total CPU, memory and workers to this SVG file
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
pub struct ProgressBar {
    label: &'static str,
    enabled: bool,
    drawn: Option<u64>,
}

impl ProgressBar {
    /// A bar labelled `label`, not drawn yet.
    pub fn new(label: &'static str) -> Self {
        ProgressBar { label, enabled: std::io::stderr().is_terminal(), drawn: None }
    }

    /// Redraws the bar at `done` of `total` (bytes or records, whatever the scan counts).
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || total == 0 {
            return;
        }
        let pct = (done.min(total) * 100 / total).min(100);
        if self.drawn == Some(pct) {
            return;
        }
        self.drawn = Some(pct);
        let filled = (pct / 4) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{} [{}{}] {pct:>3}%", self.label, "#".repeat(filled), "-".repeat(25 - filled));
        let _ = err.flush();
    }

    /// Clears the bar, so that the output that follows starts on a clean line.
    pub fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\r", " ".repeat(self.label.len() + 34));
            let _ = err.flush();
        }
    }
}

/// Builds the capacity index (one pass over the log) with a progress bar.
pub(super) fn prepare(ledger: &Ledger) -> Result<()> {
    let mut bar = ProgressBar::new("reading the log");
    let r = ledger.prepare_history(&mut |done, total| bar.update(done, total));
    bar.finish();
    r
}

fn time(ledger: &Ledger, field: &str, text: &str) -> Result<Micros> {
    parse_time(field, text, ledger.now_micros())
}

/// `capacity --at TIME`.
pub fn capacity_at(ledger: &Ledger, at: &str) -> Result<CapacityReport> {
    let t = time(ledger, "at", at)?;
    prepare(ledger)?;
    ledger.capacity_at(t)
}

/// `log --since/--until`: the events of a time window as NDJSON.
pub fn log(
    ledger: &Ledger,
    out: &Out,
    from_seq: u64,
    limit: Option<usize>,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<ExitCode> {
    let range = EventRange {
        since: since.map(|s| time(ledger, "since", s)).transpose()?,
        until: until.map(|u| time(ledger, "until", u)).transpose()?,
        from_seq: Some(from_seq.max(1)),
        to_seq: None,
    };
    let mut left = limit.unwrap_or(usize::MAX);
    if left == 0 {
        return Ok(ExitCode::Ok);
    }
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let mut next = None;
    let mut sink = super::output::EventSink::new(out);
    ledger.for_each_event(range, &mut |e| {
        if left == 0 {
            // One more than asked for: more follow.
            next = Some(e.seq);
            return false;
        }
        let written = match sink.push(&mut stdout, e) {
            // A closed pipe (`| head`) is not an error of ours; it ends the output all the same.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(err) => Err(Error::io("writing to stdout", err)),
            Ok(()) => Ok(true),
        };
        match written {
            Ok(true) => {
                left -= 1;
                true
            }
            Ok(false) => false,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    let _ = sink.finish(&mut stdout);
    if let Some(seq) = next {
        super::list::print_log_cursor(seq, since, until);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(ExitCode::Ok),
    }
}

/// `history --allocation ID | --job-id JOB`.
pub fn history(ledger: &Ledger, out: &Out, args: HistoryArgs) -> Result<ExitCode> {
    let h = match (&args.allocation, &args.job_id) {
        (Some(id), _) => {
            AllocationId::parse("allocation", id)?;
            ledger.allocation_history(id)?
        }
        (None, Some(job)) => ledger.job_history(job)?,
        (None, None) => unreachable!("clap requires one"),
    };
    if args.limit.is_some() || args.cursor.is_some() {
        return super::list::history_page(out, h, &args.allocation, args.limit, args.cursor.as_deref());
    }
    out.tabular(&h, || human_history(&h), || output::history_table(&h), || output::history_csv(&h))?;
    Ok(ExitCode::Ok)
}

pub(super) fn human_history(h: &History) -> String {
    let subject = match h.allocation_id {
        Some(id) => format!("allocation {id} (job {})", h.job_id),
        None => format!("job {} ({} allocations)", h.job_id, h.allocation_ids.len()),
    };
    if h.events.is_empty() {
        return format!("no events for {subject}");
    }
    let t = output::history_table(h);
    format!("history of {subject}\n{}", table(&t.header, &t.rows))
}

/// `usage`: resource-seconds over a window, by job or metadata key.
pub fn usage(ledger: &Ledger, out: &Out, args: UsageArgs) -> Result<ExitCode> {
    let since = time(ledger, "since", &args.since)?;
    let until = time(ledger, "until", &args.until)?;
    let by = GroupBy::parse("by", &args.by)?;
    prepare(ledger)?;
    let mut bar = ProgressBar::new("reading the window");
    let r = ledger.usage_with_progress(since, until, &by, &mut |done, total| bar.update(done, total));
    bar.finish();
    let r = r?;
    out.tabular(&r, || human_usage(&r), || output::usage_table(&r), || output::usage_csv(&r))?;
    Ok(ExitCode::Ok)
}

fn human_usage(r: &UsageReport) -> String {
    let t = output::usage_table(r);
    let group = if r.group_by == "job" { "JOB".to_string() } else { r.group_by.to_uppercase() };
    let mut header = t.header.clone();
    header[0] = &group;
    format!(
        "usage from {} to {} ({:.0} s), by {}\n{}",
        r.since,
        r.until,
        r.window_seconds,
        r.group_by,
        table(&header, &t.rows)
    )
}

/// `timeline`: utilisation per bucket, optionally drawn as SVG.
pub fn timeline(ledger: &Ledger, out: &Out, args: TimelineArgs) -> Result<ExitCode> {
    let since = time(ledger, "since", &args.since)?;
    let until = time(ledger, "until", &args.until)?;
    let bucket = parse_duration_micros(&args.bucket).filter(|b| *b > 0).ok_or_else(|| {
        Error::invalid("bucket", format!("{:?} is not a duration: use e.g. 30s, 5m, 1h, 1d", args.bucket))
    })?;
    prepare(ledger)?;
    let tl = ledger.timeline(since, until, bucket)?;
    if let Some(path) = &args.svg {
        let svg = tl.to_svg_with_events(&marked_events(ledger, &tl)?);
        std::fs::write(path, svg).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        if !out.json {
            eprintln!("wrote a chart to {}", path.display());
        }
    }
    let mut doc = to_json(&tl)?;
    if let Some(path) = &args.svg {
        doc["svg"] = path.display().to_string().into();
    }
    out.tabular(&doc, || human_timeline(&tl), || output::timeline_table(&tl), || output::timeline_csv(&tl))?;
    Ok(ExitCode::Ok)
}

/// The rejections and expiries of the timeline's window, for the chart's marks.
fn marked_events(ledger: &Ledger, tl: &Timeline) -> Result<Vec<allocation_ledger::LoggedEvent>> {
    let range = EventRange { since: Some(tl.since_us), until: Some(tl.until_us), from_seq: None, to_seq: None };
    let mut events = Vec::new();
    ledger.for_each_event(range, &mut |e| {
        if matches!(
            e.event.body,
            allocation_ledger::EventBody::Rejected(_) | allocation_ledger::EventBody::Expired { .. }
        ) {
            events.push(e.clone());
        }
        true
    })?;
    Ok(events)
}

fn human_timeline(tl: &Timeline) -> String {
    let t = output::timeline_table(tl);
    format!(
        "utilisation from {} to {}, buckets of {} s\n{}",
        tl.since,
        tl.until,
        tl.bucket_seconds,
        table(&t.header, &t.rows)
    )
}
