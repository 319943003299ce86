//! `-o table|json|csv` and `--no-headers` for the commands that print a table (`list`, `log`,
//! `history`, `usage`, `timeline`, `capacity`). The table keeps the human units (`12s`,
//! `45.0%`); CSV has the raw values (seconds as numbers, RFC 3339 times, ratios) in a stable
//! column order, documented in docs/operations.md ("CSV columns"), so that a spreadsheet or
//! a billing import does not break when the table's layout changes. `-o json` is `--json`.

use super::{table, to_json, Cli, Command, Out};
use allocation_ledger::{format_micros, Error, LoggedEvent, Result};
use allocation_ledger::{AllocationSummary, CapacityReport, EventBody, History, Timeline, UsageReport};
use serde::Serialize;
use std::io::Write;

/// `-o FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people (the default; `log`'s default is NDJSON).
    Table,
    /// One JSON document (NDJSON for `log`), as `--json`.
    Json,
    /// Comma-separated values with a header row (RFC 4180 quoting), raw values.
    Csv,
}

/// A table's header and rows.
pub struct Rows {
    /// The column names.
    pub header: Vec<&'static str>,
    /// One cell per column.
    pub rows: Vec<Vec<String>>,
}

/// One CSV field: quoted when it holds a comma, a quote, a line break or edge spaces.
fn csv_field(cell: &str) -> String {
    let plain = !cell.contains([',', '"', '\n', '\r']) && cell.trim() == cell;
    if plain {
        cell.to_string()
    } else {
        format!("\"{}\"", cell.replace('"', "\"\""))
    }
}

/// One CSV line (CRLF-free: `\n`, as every CSV reader accepts).
fn csv_line<S: AsRef<str>>(cells: &[S]) -> String {
    let fields: Vec<String> = cells.iter().map(|c| csv_field(c.as_ref())).collect();
    fields.join(",") + "\n"
}

/// The rows as CSV, with the header line unless `headers` is false.
pub fn csv(rows: &Rows, headers: bool) -> String {
    let mut s = if headers { csv_line(&rows.header) } else { String::new() };
    for r in &rows.rows {
        s.push_str(&csv_line(r));
    }
    s
}

/// The aligned table without its header line (`--no-headers`).
fn headless(rows: &Rows) -> String {
    let t = table(&rows.header, &rows.rows);
    t.split_once('\n').map(|(_, body)| body.to_string()).unwrap_or_default()
}

fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
}

/// Whether the raw arguments ask for JSON (`--json`, `-o json`, `--output json`, `-ojson`,
/// `--output=json`): a command line that does not parse still answers in JSON then.
pub(super) fn json_requested(args: impl Iterator<Item = String>) -> bool {
    let mut previous_is_flag = false;
    for a in args {
        let json = a == "--json" || a == "-ojson" || a == "--output=json" || (previous_is_flag && a == "json");
        if json {
            return true;
        }
        previous_is_flag = a == "-o" || a == "--output";
    }
    false
}

/// Refuses a format the command cannot print, before anything runs (a write must not happen
/// and then fail to print): `--json` with another `-o`, and `-o csv` without a table.
pub(super) fn check(cli: &Cli) -> Result<()> {
    if cli.json && cli.output.is_some_and(|f| f != Format::Json) {
        return Err(Error::invalid("output", "--json is -o json: give one format"));
    }
    let tabular = matches!(
        cli.command,
        Command::List { .. }
            | Command::Log { .. }
            | Command::History(_)
            | Command::Usage(_)
            | Command::Timeline(_)
            | Command::Capacity { .. }
    );
    if cli.output == Some(Format::Csv) && !tabular {
        return Err(Out::no_csv());
    }
    Ok(())
}

impl Out {
    /// The output settings of the command line.
    pub(super) fn new(cli: &Cli) -> Out {
        let json = cli.json || cli.output == Some(Format::Json);
        Out { json, format: cli.output, no_headers: cli.no_headers }
    }

    /// Whether `-o csv` was asked for.
    pub(super) fn csv(&self) -> bool {
        self.format == Some(Format::Csv)
    }

    /// Prints a command's table: JSON of `value` (`-o json`), `human` (the default), its rows
    /// without the header or title (`--no-headers`), or `csv_rows` as CSV (`-o csv`).
    pub(super) fn tabular<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
        table_rows: impl FnOnce() -> Rows,
        csv_rows: impl FnOnce() -> Rows,
    ) -> Result<()> {
        match self.format {
            Some(Format::Csv) => print(&csv(&csv_rows(), !self.no_headers)),
            _ if self.json => {
                let _ = writeln!(std::io::stdout().lock(), "{}", to_json(value)?);
            }
            _ if self.no_headers => print(&headless(&table_rows())),
            _ => {
                let _ = writeln!(std::io::stdout().lock(), "{}", human().trim_end());
            }
        }
        Ok(())
    }

    /// The refusal of `-o csv` by a command that prints no table.
    pub(super) fn no_csv() -> Error {
        Error::invalid(
            "output",
            "csv is for the commands that print a table: list, log, history, usage, timeline, capacity",
        )
    }
}

/// `log`'s output, event by event: NDJSON (the default, and `-o json`), CSV rows as they come,
/// or a table printed at the end (its widths need every row).
pub struct EventSink {
    format: Option<Format>,
    headers: bool,
    started: bool,
    rows: Vec<Vec<String>>,
}

/// The columns of `log -o csv` and `history -o csv`.
const EVENT_CSV_HEADER: [&str; 7] = ["seq", "at", "ts_us", "event", "allocation_id", "job_id", "detail"];
/// The columns of the event tables (`history`, `log -o table`).
pub const EVENT_TABLE_HEADER: [&str; 5] = ["SEQ", "AT", "EVENT", "ALLOCATION", "DETAIL"];

impl EventSink {
    /// The sink for `out`'s format.
    pub fn new(out: &Out) -> EventSink {
        let format = if out.json { Some(Format::Json) } else { out.format };
        EventSink { format, headers: !out.no_headers, started: false, rows: Vec::new() }
    }

    /// Writes (or keeps) one event.
    pub fn push(&mut self, w: &mut impl Write, e: &LoggedEvent) -> std::io::Result<()> {
        match self.format {
            None | Some(Format::Json) => {
                let line = super::event_json(e).map_err(|e| std::io::Error::other(e.to_string()))?;
                writeln!(w, "{line}")
            }
            Some(Format::Csv) => {
                if !self.started && self.headers {
                    w.write_all(csv_line(&EVENT_CSV_HEADER).as_bytes())?;
                }
                self.started = true;
                w.write_all(csv_line(&event_csv_row(e.seq, &format_micros(e.event.ts_us), &e.event)).as_bytes())
            }
            Some(Format::Table) => {
                self.rows.push(event_table_row(e.seq, &format_micros(e.event.ts_us), &e.event.body));
                Ok(())
            }
        }
    }

    /// Prints the table, if that is the format.
    pub fn finish(self, w: &mut impl Write) -> std::io::Result<()> {
        if self.format != Some(Format::Table) {
            return Ok(());
        }
        let rows = Rows { header: EVENT_TABLE_HEADER.to_vec(), rows: self.rows };
        let text = if self.headers { table(&rows.header, &rows.rows) } else { headless(&rows) };
        w.write_all(text.as_bytes())
    }
}

/// What the event tables say about an event beyond its kind and allocation.
pub fn event_detail(body: &EventBody) -> String {
    match body {
        EventBody::Granted(g) => format!(
            "{} workers, mcp [{}], ttl {} s, expires {}",
            g.resources.workers,
            g.mcp_servers.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
            g.ttl_seconds,
            format_micros(g.deadline_us)
        ),
        EventBody::Rejected(r) => r.error.clone(),
        EventBody::Expired { deadline_us, .. } => format!("deadline {}", format_micros(*deadline_us)),
        EventBody::Renewed(r) => format!(
            "lease renewed for {} s: expires {} (was {})",
            r.ttl_seconds,
            format_micros(r.deadline_us),
            format_micros(r.previous_deadline_us)
        ),
        EventBody::ConfigChanged { config } => allocation_ledger::pool_summary(config),
        EventBody::Reserved(r) => format!(
            "{} reserves {} workers for {} from {} to {}",
            r.reservation_id,
            r.resources.workers,
            r.holder_text(),
            format_micros(r.start_us),
            format_micros(r.end_us)
        ),
        EventBody::ReservationRejected(r) => format!("{}: {}", r.reservation_id, r.error),
        EventBody::ReservationCancelled { reservation_id } => format!("{reservation_id} cancelled"),
        _ => String::new(),
    }
}

/// One row of an event table.
pub fn event_table_row(seq: u64, at: &str, body: &EventBody) -> Vec<String> {
    vec![
        seq.to_string(),
        at.to_string(),
        body.type_name().to_string(),
        body.allocation_id().map(|i| i.to_string()).unwrap_or_default(),
        event_detail(body),
    ]
}

/// One row of an event CSV (`EVENT_CSV_HEADER`).
fn event_csv_row(seq: u64, at: &str, e: &allocation_ledger::Event) -> Vec<String> {
    let job = match &e.body {
        EventBody::Granted(g) => g.job_id.clone(),
        EventBody::Rejected(r) => r.job_id.clone(),
        _ => String::new(),
    };
    vec![
        seq.to_string(),
        at.to_string(),
        e.ts_us.as_micros().to_string(),
        e.body.type_name().to_string(),
        e.body.allocation_id().map(|i| i.to_string()).unwrap_or_default(),
        job,
        event_detail(&e.body),
    ]
}

/// `history`'s table.
pub fn history_table(h: &History) -> Rows {
    let rows = h
        .events
        .iter()
        .map(|e| {
            let mut row = event_table_row(e.seq, &e.at, &e.event.body);
            if let (Some(words), Some(detail)) = (&e.explanation, row.last_mut()) {
                *detail = words.clone();
            }
            row
        })
        .collect();
    Rows { header: EVENT_TABLE_HEADER.to_vec(), rows }
}

/// `history -o csv`.
pub fn history_csv(h: &History) -> Rows {
    let rows = h.events.iter().map(|e| event_csv_row(e.seq, &e.at, &e.event)).collect();
    Rows { header: EVENT_CSV_HEADER.to_vec(), rows }
}

/// `list`'s table.
pub fn list_table(rows: &[AllocationSummary]) -> Rows {
    let rows = rows
        .iter()
        .map(|a| {
            vec![
                a.allocation_id.to_string(),
                a.job_id.clone(),
                a.state.to_string(),
                a.priority.to_string(),
                a.workers.to_string(),
                format!("{:.0}s", a.age_seconds),
            ]
        })
        .collect();
    Rows { header: vec!["ALLOCATION", "JOB", "STATE", "PRIORITY", "WORKERS", "AGE"], rows }
}

/// `list -o csv`.
pub fn list_csv(rows: &[AllocationSummary]) -> Rows {
    let rows = rows
        .iter()
        .map(|a| {
            vec![
                a.allocation_id.to_string(),
                a.job_id.clone(),
                a.state.to_string(),
                a.priority.to_string(),
                a.workers.to_string(),
                a.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                a.age_seconds.to_string(),
                a.is_expired.to_string(),
            ]
        })
        .collect();
    let header =
        vec!["allocation_id", "job_id", "state", "priority", "workers", "created_at", "age_seconds", "is_expired"];
    Rows { header, rows }
}

/// `usage`'s table: one row per group, one per MCP server with a cost, and the total.
pub fn usage_table(r: &UsageReport) -> Rows {
    let row = |name: &str, u: &allocation_ledger::UsageAmounts| {
        vec![
            name.to_string(),
            format!("{:.1}", u.cpu_seconds),
            format!("{:.0}", u.memory_mib_seconds),
            format!("{:.1}", u.worker_seconds),
            u.allocations.to_string(),
            u.granted.to_string(),
            u.released.to_string(),
            u.expired.to_string(),
            if u.rejections.is_empty() {
                "0".into()
            } else {
                u.rejections.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
            },
        ]
    };
    let mut rows: Vec<Vec<String>> = r.groups.iter().map(|g| row(&g.group, &g.usage)).collect();
    for m in &r.mcp_servers {
        let mut cells = vec![format!("mcp:{}", m.name), format!("{:.1}", m.cpu_seconds)];
        cells.push(format!("{:.0}", m.memory_mib_seconds));
        cells.extend(std::iter::repeat_n("-".to_string(), 6));
        rows.push(cells);
    }
    rows.push(row("TOTAL", &r.total));
    let group = if r.group_by == "job" { "JOB" } else { "GROUP" };
    let header = vec![group, "CPU-S", "MEM-MIB-S", "WORKER-S", "ALLOCS", "GRANTED", "RELEASED", "EXPIRED", "REJECTED"];
    Rows { header, rows }
}

/// The columns of `usage -o csv` (docs/operations.md, "CSV columns"). Stable: new columns go
/// at the end.
pub const USAGE_CSV_HEADER: [&str; 13] = [
    "since",
    "until",
    "group_by",
    "group",
    "cpu_seconds",
    "memory_mib_seconds",
    "worker_seconds",
    "allocations",
    "granted",
    "released",
    "expired",
    "rejected",
    "window_seconds",
];

/// `usage -o csv`, for billing: one row per group (job, or metadata value such as a tenant),
/// then one per MCP server with a cost (`group_by` = `mcp_server`); no total row, so that a
/// column's sum is the total.
pub fn usage_csv(r: &UsageReport) -> Rows {
    let window = r.window_seconds.to_string();
    let mut rows: Vec<Vec<String>> = r
        .groups
        .iter()
        .map(|g| {
            let u = &g.usage;
            vec![
                r.since.clone(),
                r.until.clone(),
                r.group_by.clone(),
                g.group.clone(),
                u.cpu_seconds.to_string(),
                u.memory_mib_seconds.to_string(),
                u.worker_seconds.to_string(),
                u.allocations.to_string(),
                u.granted.to_string(),
                u.released.to_string(),
                u.expired.to_string(),
                u.rejected.to_string(),
                window.clone(),
            ]
        })
        .collect();
    for m in &r.mcp_servers {
        let mut cells = vec![r.since.clone(), r.until.clone(), "mcp_server".into(), m.name.clone()];
        cells.extend([m.cpu_seconds.to_string(), m.memory_mib_seconds.to_string(), "0".into()]);
        cells.extend(std::iter::repeat_n("0".to_string(), 5));
        cells.push(window.clone());
        rows.push(cells);
    }
    Rows { header: USAGE_CSV_HEADER.to_vec(), rows }
}

/// `timeline`'s table.
pub fn timeline_table(tl: &Timeline) -> Rows {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    let rows = tl
        .buckets
        .iter()
        .map(|b| {
            vec![
                b.start.clone(),
                pct(b.cpu_utilisation),
                pct(b.memory_utilisation),
                pct(b.worker_utilisation),
                format!("{:.2}/{:.0}", b.allocated_workers, b.total_workers),
                b.peak_allocated_workers.to_string(),
            ]
        })
        .collect();
    Rows { header: vec!["BUCKET START", "CPU", "MEMORY", "WORKERS", "MEAN WORKERS", "PEAK WORKERS"], rows }
}

/// `timeline -o csv`: means over each bucket; utilisations as ratios (empty with no pool).
pub fn timeline_csv(tl: &Timeline) -> Rows {
    let ratio = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let rows = tl
        .buckets
        .iter()
        .map(|b| {
            vec![
                b.start.clone(),
                b.end.clone(),
                b.allocated_cpu.to_string(),
                b.total_cpu.to_string(),
                ratio(b.cpu_utilisation),
                b.allocated_memory.to_string(),
                b.total_memory.to_string(),
                ratio(b.memory_utilisation),
                b.allocated_workers.to_string(),
                b.total_workers.to_string(),
                ratio(b.worker_utilisation),
                b.peak_allocated_workers.to_string(),
            ]
        })
        .collect();
    let header = vec![
        "start",
        "end",
        "allocated_cpu",
        "total_cpu",
        "cpu_utilisation",
        "allocated_memory_mib",
        "total_memory_mib",
        "memory_utilisation",
        "allocated_workers",
        "total_workers",
        "worker_utilisation",
        "peak_allocated_workers",
    ];
    Rows { header, rows }
}

/// `capacity`'s table (its summary lines are left out with `--no-headers`).
pub fn capacity_table(c: &CapacityReport) -> Rows {
    let rows = vec![
        vec![
            "workers".into(),
            c.total_workers.to_string(),
            c.allocated_workers.to_string(),
            c.available_workers.to_string(),
        ],
        vec![
            "cpu".into(),
            format!("{:.1}", c.total_cpu),
            format!("{:.1}", c.allocated_cpu),
            format!("{:.1}", c.available_cpu),
        ],
        vec![
            "memory_mib".into(),
            c.total_memory.to_string(),
            c.allocated_memory.to_string(),
            c.available_memory.to_string(),
        ],
    ];
    Rows { header: vec!["RESOURCE", "TOTAL", "ALLOCATED", "AVAILABLE"], rows }
}

/// `capacity -o csv`: integer units (CPU in millicores).
pub fn capacity_csv(c: &CapacityReport) -> Rows {
    let rows = vec![
        vec![
            "workers".into(),
            c.total_workers.to_string(),
            c.allocated_workers.to_string(),
            c.available_workers.to_string(),
        ],
        vec![
            "cpu_millicores".into(),
            c.total_cpu_millicores.to_string(),
            c.allocated_cpu_millicores.to_string(),
            c.available_cpu_millicores.to_string(),
        ],
        vec![
            "memory_mib".into(),
            c.total_memory.to_string(),
            c.allocated_memory.to_string(),
            c.available_memory.to_string(),
        ],
    ];
    Rows { header: vec!["resource", "total", "allocated", "available"], rows }
}

/// `capacity --by-tenant`'s table: use / limit per tenant (`-` for unlimited).
pub fn tenants_table(rows: &[allocation_ledger::TenantCapacity]) -> Rows {
    let of = |used: u64, limit: Option<u64>| format!("{used} / {}", limit.map_or("-".to_string(), |l| l.to_string()));
    let rows = rows
        .iter()
        .map(|t| {
            let q = t.quota.clone().unwrap_or_default();
            let servers: Vec<String> = t
                .mcp_servers
                .iter()
                .map(|(n, c)| format!("{n} {}", of(u64::from(*c), q.mcp_servers.get(n).map(|l| u64::from(*l)))))
                .collect();
            vec![
                t.tenant.clone(),
                of(u64::from(t.used.workers), q.workers.map(u64::from)),
                of(t.used.cpu_millicores, q.cpu_millicores),
                of(t.used.memory_mib, q.memory_mib),
                servers.join(", "),
            ]
        })
        .collect();
    Rows { header: vec!["TENANT", "WORKERS", "CPU_MILLICORES", "MEMORY_MIB", "MCP SERVERS"], rows }
}

/// `capacity --by-tenant -o csv`: one row per tenant, used and limit apart (an empty limit is
/// unlimited); MCP servers as `name=used/limit` joined by `;`.
pub fn tenants_csv(rows: &[allocation_ledger::TenantCapacity]) -> Rows {
    let limit = |l: Option<u64>| l.map(|l| l.to_string()).unwrap_or_default();
    let rows = rows
        .iter()
        .map(|t| {
            let q = t.quota.clone().unwrap_or_default();
            let servers: Vec<String> = t
                .mcp_servers
                .iter()
                .map(|(n, c)| format!("{n}={c}/{}", limit(q.mcp_servers.get(n).map(|l| u64::from(*l)))))
                .collect();
            vec![
                t.tenant.clone(),
                t.used.workers.to_string(),
                limit(q.workers.map(u64::from)),
                t.used.cpu_millicores.to_string(),
                limit(q.cpu_millicores),
                t.used.memory_mib.to_string(),
                limit(q.memory_mib),
                servers.join(";"),
            ]
        })
        .collect();
    Rows {
        header: vec![
            "tenant",
            "workers_used",
            "workers_limit",
            "cpu_millicores_used",
            "cpu_millicores_limit",
            "memory_mib_used",
            "memory_mib_limit",
            "mcp_servers",
        ],
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_recognised_in_every_spelling() {
        let asks = |args: &[&str]| json_requested(args.iter().map(|a| (*a).to_string()));
        for yes in
            [&["list", "--json"][..], &["-o", "json", "list"], &["--output", "json"], &["-ojson"], &["--output=json"]]
        {
            assert!(asks(yes), "{yes:?}");
        }
        for no in [&["list"][..], &["-o", "csv"], &["--job-id", "json"], &["json"]] {
            assert!(!asks(no), "{no:?}");
        }
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let rows = Rows {
            header: vec!["a", "b"],
            rows: vec![vec!["plain".into(), "with,comma".into()], vec!["say \"hi\"".into(), " edge".into()]],
        };
        assert_eq!(csv(&rows, true), "a,b\nplain,\"with,comma\"\n\"say \"\"hi\"\"\",\" edge\"\n");
        assert_eq!(csv(&rows, false).lines().count(), 2);
    }
}
