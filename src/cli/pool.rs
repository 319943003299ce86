//! `pool ...`: the pool's slots, and changes to it (add, drain, undrain, remove workers; set
//! and remove MCP catalog entries). Each change is a recorded `config_changed` event built from
//! the config in force; see docs/operations.md, "Changing the pool".

use super::contract::ExpectSeq;
use super::{parse_number, table, warn_snapshot_error, Out};
use allocation_ledger::{parse_worker, ExitCode, Ledger, PoolChange, PoolChangeReport, PoolReport};
use clap::{Args, Subcommand};

/// `pool ...`.
#[derive(Debug, Subcommand)]
pub(super) enum PoolCommand {
    /// Show every worker slot with its state (free, held, draining, drained, removed) and the
    /// MCP catalog
    Show,
    /// Add worker slots with new ids after the last one. The pool's totals grow by N × the
    /// slot size (worker_cpu_millicores, worker_memory_mib each)
    AddWorkers {
        /// How many workers
        #[arg(long)]
        count: String,
        /// Endpoint of each new worker, in order; required (one per worker) iff the config
        /// lists explicit worker_endpoints, refused otherwise
        #[arg(long = "endpoint", value_name = "URL")]
        endpoints: Vec<String>,
        #[command(flatten)]
        opts: ChangeOpts,
    },
    /// Drain a worker: no new grants on it; its holder keeps it until released or expired,
    /// then it leaves the pool's total
    Drain {
        /// worker-07 or 7
        worker: String,
        #[command(flatten)]
        opts: ChangeOpts,
    },
    /// Undrain a worker: it takes grants again (and counts in the total)
    Undrain {
        /// worker-07 or 7
        worker: String,
        #[command(flatten)]
        opts: ChangeOpts,
    },
    /// Remove a drained, idle worker from the pool for good (its id is never reused); the
    /// totals shrink by one slot size
    RemoveWorker {
        /// worker-07 or 7
        worker: String,
        #[command(flatten)]
        opts: ChangeOpts,
    },
    /// Add or change an MCP catalog entry (costs kept when not given; 0 for a new one)
    McpSet {
        /// The server's name
        name: String,
        /// Its endpoint
        #[arg(long, value_name = "URL")]
        endpoint: String,
        /// CPU it is charged while running
        #[arg(long)]
        cpu_millicores: Option<String>,
        /// Memory it is charged while running
        #[arg(long)]
        memory_mib: Option<String>,
        #[command(flatten)]
        opts: ChangeOpts,
    },
    /// Remove an MCP catalog entry (refused while an active allocation uses the server)
    McpRemove {
        /// The server's name
        name: String,
        #[command(flatten)]
        opts: ChangeOpts,
    },
}

/// The flags every change takes.
#[derive(Debug, Args)]
pub(super) struct ChangeOpts {
    /// Only show the change and whether it would be accepted; write nothing
    #[arg(long)]
    pub(super) dry_run: bool,
    #[command(flatten)]
    pub(super) expect: ExpectSeq,
}

impl PoolCommand {
    /// Whether the command writes (it needs a writer's lock).
    pub(super) fn writes(&self) -> bool {
        !matches!(self, PoolCommand::Show)
    }

    /// The change asked for and its flags (`None`: `show`).
    pub(super) fn change(&self) -> allocation_ledger::Result<Option<(PoolChange, &ChangeOpts)>> {
        let worker = |w: &str| parse_worker("worker", w);
        let number = |field: &str, t: &str| parse_number(field, t, u64::MAX);
        Ok(Some(match self {
            PoolCommand::Show => return Ok(None),
            PoolCommand::AddWorkers { count, endpoints, opts } => {
                let count = parse_number("count", count, u64::from(u32::MAX))? as u32;
                (PoolChange::AddWorkers { count, endpoints: endpoints.clone() }, opts)
            }
            PoolCommand::Drain { worker: w, opts } => (PoolChange::Drain { slot: worker(w)? }, opts),
            PoolCommand::Undrain { worker: w, opts } => (PoolChange::Undrain { slot: worker(w)? }, opts),
            PoolCommand::RemoveWorker { worker: w, opts } => (PoolChange::RemoveWorker { slot: worker(w)? }, opts),
            PoolCommand::McpSet { name, endpoint, cpu_millicores, memory_mib, opts } => (
                PoolChange::McpSet {
                    name: name.clone(),
                    endpoint: endpoint.clone(),
                    cpu_millicores: cpu_millicores.as_deref().map(|t| number("cpu_millicores", t)).transpose()?,
                    memory_mib: memory_mib.as_deref().map(|t| number("memory_mib", t)).transpose()?,
                },
                opts,
            ),
            PoolCommand::McpRemove { name, opts } => (PoolChange::McpRemove { name: name.clone() }, opts),
        }))
    }
}

/// Runs a `pool` command.
pub(super) fn run(out: &Out, ledger: &Ledger, cmd: &PoolCommand) -> allocation_ledger::Result<ExitCode> {
    let Some((change, opts)) = cmd.change()? else {
        let pool = ledger.pool()?;
        out.doc(&pool, || human_pool(&pool))?;
        return Ok(ExitCode::Ok);
    };
    let report = ledger.change_pool(&change, opts.expect.seq()?, opts.dry_run)?;
    warn_snapshot_error(ledger);
    out.doc(&report, || human_change(&report))?;
    Ok(ExitCode::Ok)
}

pub(super) fn human_change(r: &PoolChangeReport) -> String {
    let words = if r.summary.is_empty() { "nothing to change".to_string() } else { r.summary.join("; ") };
    let mut s = if r.applied {
        format!("pool: {words} (recorded as event {})\n", r.seq)
    } else if r.dry_run && !r.changes.is_empty() {
        format!("dry run: the change would be accepted (nothing written): pool: {words}\n")
    } else {
        format!("no change: {words} (at seq {})\n", r.seq)
    };
    for c in &r.changes {
        s += &format!("  {}: {} -> {}\n", c.field, c.from, c.to);
    }
    s
}

pub(super) fn human_pool(p: &PoolReport) -> String {
    let rows: Vec<Vec<String>> = p
        .workers
        .iter()
        .map(|w| {
            vec![
                w.worker_id.clone(),
                w.state.to_string(),
                w.allocation_id.clone().unwrap_or_default(),
                w.endpoint.clone(),
            ]
        })
        .collect();
    let mut s = table(&["WORKER", "STATE", "ALLOCATION", "ENDPOINT"], &rows);
    let c = &p.capacity;
    s += &format!(
        "workers in the pool: {} ({} held, {} free); each {} millicores, {} MiB\n",
        c.total_workers, c.allocated_workers, c.available_workers, p.worker_cpu_millicores, p.worker_memory_mib
    );
    s += &format!("totals: {} millicores, {} MiB\n", c.total_cpu_millicores, c.total_memory);
    if p.mcp_catalog.is_empty() {
        s += "MCP catalog: (empty)\n";
    } else {
        let rows: Vec<Vec<String>> = p
            .mcp_catalog
            .iter()
            .map(|(n, e)| vec![n.clone(), e.endpoint.clone(), e.cpu_millicores.to_string(), e.memory_mib.to_string()])
            .collect();
        s += &table(&["MCP SERVER", "ENDPOINT", "CPU_MILLICORES", "MEMORY_MIB"], &rows);
    }
    s += &format!("seq: {}\n", p.seq);
    s
}
