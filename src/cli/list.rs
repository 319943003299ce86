//! `list`: allocations filtered by state, job, tenant, priority and creation time, all at once
//! or by pages (`--limit`, `--cursor`; see `docs/queries.md`, "Pages").

use super::{history, human_list, output, Out};
use allocation_ledger::{AllocationState, ExitCode, Ledger, ListFilter, Priority, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// active, released, expired or failed
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    job_id: Option<String>,
    /// Only allocations counted against this tenant's quota
    #[arg(long)]
    tenant: Option<String>,
    /// low, normal, high or critical
    #[arg(long)]
    priority: Option<String>,
    /// Only allocations created at or after this instant: RFC 3339 or relative (-15m, -2h, -1d)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    since: Option<String>,
    /// Only allocations created before this instant
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    until: Option<String>,
    /// List them as they were at this instant: RFC 3339 or relative (-15m, -2h, -1d)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    at: Option<String>,
    /// At most this many rows; the cursor of the next page is printed on stderr (with --json:
    /// the output is {allocations, count, next_cursor})
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Go on after the page that printed this cursor (with the same filters)
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
}

impl ListArgs {
    fn filter(&self) -> Result<ListFilter> {
        let f = ListFilter {
            state: self.state.as_deref().map(|s| AllocationState::parse("state", s)).transpose()?,
            job_id: self.job_id.clone(),
            tenant: self.tenant.clone(),
            priority: self.priority.as_deref().map(|p| Priority::parse("priority", p)).transpose()?,
            since: self.since.clone(),
            until: self.until.clone(),
            at: self.at.clone(),
        };
        f.validate()?;
        if self.limit == Some(0) {
            return Err(allocation_ledger::Error::invalid("limit", "must be at least 1"));
        }
        Ok(f)
    }
}

/// `list`: every match as a JSON array (as always) without `--limit`/`--cursor`, else one page
/// as {allocations, count, next_cursor}.
pub fn list(out: &Out, open: impl FnOnce() -> Result<Ledger>, args: &ListArgs) -> Result<ExitCode> {
    let filter = args.filter()?;
    let ledger = open()?;
    if filter.at.is_some() {
        history::prepare(&ledger)?;
    }
    let page = ledger.list_page(&filter, args.limit, args.cursor.as_deref())?;
    print_page(out, &page, args.limit.is_some() || args.cursor.is_some())?;
    Ok(ExitCode::Ok)
}

impl ListArgs {
    /// The `list_allocations` arguments of these flags, checked as the local mode checks them
    /// (for the CLI as a client of a running server).
    pub(super) fn tool_args(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        self.filter()?;
        let mut args = serde_json::Map::new();
        let text = [
            ("state", &self.state),
            ("job_id", &self.job_id),
            ("tenant", &self.tenant),
            ("priority", &self.priority),
            ("since", &self.since),
            ("until", &self.until),
            ("at", &self.at),
            ("cursor", &self.cursor),
        ];
        for (field, value) in text {
            if let Some(v) = value {
                args.insert(field.into(), v.clone().into());
            }
        }
        if let Some(limit) = self.limit {
            args.insert("limit".into(), limit.into());
        }
        Ok(args)
    }

    /// Whether one page was asked for (`--limit` or `--cursor`); otherwise every row.
    pub(super) fn paged(&self) -> bool {
        self.limit.is_some() || self.cursor.is_some()
    }
}

/// Prints a page: as the page object with `--json` when `paged`, else as the rows; the next
/// cursor goes to stderr in the text formats.
pub(super) fn print_page(out: &Out, page: &allocation_ledger::AllocationPage, paged: bool) -> Result<()> {
    let rows = &page.allocations;
    match paged {
        true => out.tabular(&page, || human_list(rows), || output::list_table(rows), || output::list_csv(rows))?,
        false => out.tabular(rows, || human_list(rows), || output::list_table(rows), || output::list_csv(rows))?,
    }
    if let Some(next) = &page.next_cursor {
        if !out.json {
            eprintln!("more allocations follow: add --cursor {next}");
        }
    }
    Ok(())
}

/// The window a `log` cursor is bound to: the time filters as written.
fn log_window(since: Option<&str>, until: Option<&str>) -> String {
    format!("since={since:?}|until={until:?}")
}

/// `log --cursor`: the first sequence number to print (the cursor's, else `--from-seq`).
pub fn log_start(cursor: Option<&str>, from_seq: u64, since: Option<&str>, until: Option<&str>) -> Result<u64> {
    match cursor {
        Some(c) => allocation_ledger::log_cursor_seq(c, &log_window(since, until)),
        None => Ok(from_seq),
    }
}

/// After a `log --limit` that left events out: how to go on (on stderr, stdout being NDJSON).
pub fn print_log_cursor(next_seq: u64, since: Option<&str>, until: Option<&str>) {
    let cursor = allocation_ledger::log_cursor(next_seq, &log_window(since, until));
    eprintln!("more events follow: add --cursor {cursor}");
}

/// `history --limit/--cursor`: the most recent `limit` events before the cursor's page, as the
/// history object plus `next_cursor`.
pub fn history_page(
    out: &Out,
    h: allocation_ledger::History,
    allocation: &Option<String>,
    limit: Option<usize>,
    cursor: Option<&str>,
) -> Result<ExitCode> {
    if limit == Some(0) {
        return Err(allocation_ledger::Error::invalid("limit", "must be at least 1"));
    }
    let key = match allocation {
        Some(id) => format!("allocation:{id}"),
        None => format!("job:{}", h.job_id),
    };
    let (h, next) = allocation_ledger::page_history(h, &key, limit.unwrap_or(usize::MAX), cursor)?;
    let mut doc = super::to_json(&h)?;
    doc["next_cursor"] = next.clone().into();
    out.tabular(&doc, || history::human_history(&h), || output::history_table(&h), || output::history_csv(&h))?;
    if let Some(next) = next.filter(|_| !out.json) {
        eprintln!("older events: add --cursor {next}");
    }
    Ok(ExitCode::Ok)
}
