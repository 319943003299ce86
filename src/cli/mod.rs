//! Command-line interface: one subcommand per ledger operation, human tables or `--json`.

use allocation_ledger::storage::FsStorage;
use allocation_ledger::VerifyReport;
use allocation_ledger::{format_micros, Micros};
use allocation_ledger::{
    AllocationDetails, AllocationSummary, CapacityReport, ExitCode, ReleaseReport, RequestOutcome,
};
use allocation_ledger::{Config, Error, Ledger, Priority, ResourceRequest};
use allocation_ledger::{OpenOptions, SnapshotInfo};
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[cfg(feature = "server")]
mod client;
mod config;
mod contract;
mod follow;
mod history;
mod list;
mod output;
mod pool;
mod queue;
mod replay;
mod reservation;
#[cfg(feature = "server")]
mod serve;
mod verify_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "allocation-ledger",
    version,
    about = "An event-sourced, durable ledger of worker slots and MCP servers for AI-agent jobs",
    after_help = "Exit codes: 0 success, 1 other error, 2 invalid input, 3 not granted, 4 not found, 5 ledger locked, 6 ledger damaged, 7 conflict (expected_seq), 8 not active."
)]
struct Cli {
    /// Ledger directory [default: $XDG_DATA_HOME/allocation-ledger, else ~/.local/share/allocation-ledger]
    #[arg(long, global = true, env = "ALLOCATION_LEDGER_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// JSON config file, used when the ledger is created; for an existing ledger it must match
    /// the recorded config (change that with `config apply FILE`)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print exactly one JSON document on stdout (NDJSON for event streams); the same as -o json
    #[arg(long, global = true)]
    json: bool,

    /// Output format: table (for people; the default), json (as --json) or csv (where a table
    /// is printed: list, log, history, usage, timeline, capacity; raw values, stable columns)
    #[arg(short = 'o', long = "output", global = true, value_enum, value_name = "FORMAT")]
    output: Option<output::Format>,

    /// Leave out the header row (and title lines) of tables and CSV
    #[arg(long, global = true)]
    no_headers: bool,

    /// Send the command to this running `serve --http` (e.g. http://127.0.0.1:8765/mcp) instead
    /// of opening the data dir: request, release, renew, cleanup-expired, capacity, get, list.
    /// Without it, writes go by themselves to the local server that holds the data dir
    #[arg(long, global = true, env = "ALLOCATION_LEDGER_SERVER", value_name = "URL")]
    server: Option<String>,

    /// File holding the bearer token (else env ALLOCATION_LEDGER_TOKEN): `serve --http`
    /// requires it of clients; a command sent to a server presents it
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Request workers and/or MCP servers for a job
    Request {
        /// The job the resources are for
        #[arg(long)]
        job_id: String,
        /// An MCP server the job needs (repeatable)
        #[arg(long = "mcp-server", value_name = "NAME")]
        mcp_servers: Vec<String>,
        /// Number of worker slots
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        workers: String,
        /// low, normal, high or critical
        #[arg(long, default_value = "normal", allow_hyphen_values = true)]
        priority: String,
        /// Lifetime of the allocation [default: the config's default_ttl_seconds, 3600]
        #[arg(long, allow_hyphen_values = true)]
        ttl_seconds: Option<String>,
        /// A JSON object stored with the allocation
        #[arg(long, value_name = "JSON", allow_hyphen_values = true)]
        metadata: Option<String>,
        /// The tenant whose quota the request counts against [default: the metadata's tenant key]
        #[arg(long, value_name = "TENANT", allow_hyphen_values = true)]
        tenant: Option<String>,
        #[command(flatten)]
        contract: contract::RequestContract,
        #[command(flatten)]
        wait: queue::WaitArgs,
    },
    /// Withdraw a request waiting in the queue (`request --wait`)
    Cancel {
        /// alloc-xxxxxxxxxxxx (the pending request's id)
        allocation_id: String,
    },
    /// Release an allocation (safe to retry: an ended allocation is reported, nothing written)
    Release {
        /// alloc-xxxxxxxxxxxx
        allocation_id: String,
        #[command(flatten)]
        expect: contract::ExpectSeq,
    },
    /// Renew an active allocation's lease: its deadline moves to now + the TTL
    Renew(contract::RenewArgs),
    /// Show total, allocated and available capacity (now, or as of --at)
    Capacity {
        /// Show it as of this instant: RFC 3339 (2026-11-27T03:12:00Z) or relative (-15m, -2h, -1d)
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        at: Option<String>,
        /// Show each tenant's use against its quota instead
        #[arg(long, conflicts_with = "at")]
        by_tenant: bool,
    },
    /// Show one allocation
    Get {
        /// alloc-xxxxxxxxxxxx
        allocation_id: String,
    },
    /// List allocations (filtered; by pages with --limit and --cursor)
    List(list::ListArgs),
    /// Record the expiry of every allocation past its deadline
    CleanupExpired {
        #[command(flatten)]
        expect: contract::ExpectSeq,
    },
    /// Print events as NDJSON
    Log {
        /// First sequence number
        #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
        from_seq: u64,
        /// At most this many events
        #[arg(long, allow_hyphen_values = true)]
        limit: Option<usize>,
        /// Only events at or after this instant: RFC 3339 or relative (-15m, -2h, -1d)
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        since: Option<String>,
        /// Only events before this instant
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        until: Option<String>,
        /// Keep going: print each event as it is appended (NDJSON), beside a running writer,
        /// until interrupted or stdout closes
        #[arg(long, conflicts_with_all = ["since", "until", "cursor"])]
        follow: bool,
        /// Go on where a `log --limit` stopped (the cursor it printed on stderr; same --since/--until)
        #[arg(long, value_name = "CURSOR", conflicts_with = "from_seq")]
        cursor: Option<String>,
    },
    /// Every event of one allocation, or of every allocation of one job, in order
    History(history::HistoryArgs),
    /// Usage over a window, by job or by a metadata key: CPU-, memory- and worker-seconds
    Usage(history::UsageArgs),
    /// Utilisation (allocated over total) per bucket over a window; --svg draws a chart
    Timeline(history::TimelineArgs),
    /// Step through history event by event (what each changed), or print the state at a point
    Replay(replay::ReplayArgs),
    /// Re-decide the recorded demand under another config (--config FILE: fields over the recorded one); writes nothing
    WhatIf(replay::WhatIfArgs),
    /// Check every record and snapshot and the chain, print the head (SEQ:HASH); non-zero exit on damage
    Verify(verify_cmd::VerifyArgs),
    /// Write a snapshot now
    Snapshot,
    /// Cut a torn or damaged tail off the log, after copying the cut bytes to quarantine/.
    /// Damage in the middle of the log is refused (listing the events a cut would lose)
    /// unless --force-truncate is given. Exit 0 when the log verifies afterwards, 6 if refused.
    Repair {
        /// Also cut damage in the middle of the log, losing the events listed
        #[arg(long)]
        force_truncate: bool,
        /// Only show what would be done
        #[arg(long)]
        dry_run: bool,
    },
    /// Walk through the original system's acceptance scenario on a scratch ledger
    Demo,
    /// Create the ledger (with --config, or the built-in pool); an existing one is reported
    Init,
    /// Show the recorded config, or change it (a recorded event, refused if it would take away
    /// what active allocations hold)
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Show the pool's workers, or change the pool: add, drain, undrain or remove workers, set
    /// or remove MCP catalog entries (each a recorded config change)
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Reserve workers for a tenant or a job over a future window (exit 3 if it cannot be
    /// honoured beside what is held and reserved; recorded either way)
    Reserve(reservation::ReserveArgs),
    /// List the reservations in force or upcoming (now, or as of --at)
    Reservations {
        /// As of this instant: RFC 3339 (2026-11-27T03:12:00Z) or relative (-15m, -2h, -1d)
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// Cancel a reservation
    #[command(subcommand)]
    Reservation(reservation::ReservationCommand),
    /// Run the MCP server (stdio, or Streamable HTTP with --http)
    #[cfg(feature = "server")]
    Serve(serve::ServeArgs),
    /// Print a shell completion script (e.g. `allocation-ledger completions bash > /etc/bash_completion.d/allocation-ledger`)
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, e.g. `allocation-ledger man | man -l -`
    Man,
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("allocation-ledger");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/allocation-ledger");
    }
    PathBuf::from("allocation-ledger-data")
}

/// Flag spelling of a library field name, for messages.
fn flag_for(field: &str) -> Option<&'static str> {
    Some(match field.split('[').next().unwrap_or(field) {
        "job_id" => "--job-id",
        "workers" => "--workers",
        "priority" => "--priority",
        "ttl_seconds" => "--ttl-seconds",
        "idempotency_key" => "--idempotency-key",
        "max_lifetime_seconds" => "--max-lifetime-seconds",
        "expected_seq" => "--expected-seq",
        "tenant" => "--tenant",
        "metadata" => "--metadata",
        "mcp_servers" => "--mcp-server",
        "state" => "--state",
        "allocation_id" => "ALLOCATION_ID",
        "allocation" => "--allocation",
        "at" => "--at",
        "since" => "--since",
        "until" => "--until",
        "by" => "--by",
        "bucket" => "--bucket",
        "svg" => "--svg",
        "from" => "--from",
        "to" => "--to",
        "hold" => "--hold",
        _ => return None,
    })
}

struct Out {
    json: bool,
    /// `-o`, if given (`--json` sets `json` alone).
    format: Option<output::Format>,
    no_headers: bool,
}

impl Out {
    /// Prints one document: `value` as JSON with `--json`, else the human text.
    fn doc<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) -> allocation_ledger::Result<()> {
        if self.csv() {
            return Err(Self::no_csv());
        }
        let text = if self.json { to_json(value)?.to_string() } else { human() };
        let _ = writeln!(std::io::stdout().lock(), "{}", text.trim_end());
        Ok(())
    }

    fn error(&self, e: &Error) -> ExitCode {
        let code = e.exit_code();
        let mut message = e.to_string();
        if let Error::InvalidInput { field, .. } = e {
            if let Some(flag) = flag_for(field) {
                message = format!("{message} (flag {flag})");
            }
        }
        if self.json {
            let mut obj =
                serde_json::json!({"error": {"kind": e.kind(), "message": message, "exit_code": code.code()}});
            if let Error::InvalidInput { field, .. } = e {
                obj["error"]["field"] = field.clone().into();
            }
            if let Error::NotFound(id) = e {
                obj["status"] = "error".into();
                obj["error"]["allocation_id"] = id.clone().into();
            }
            contract::error_fields(e, &mut obj["error"]);
            println!("{obj}");
        } else {
            eprintln!("error: {message}");
        }
        code
    }
}

/// One event of `log`'s NDJSON: the logged event with `at`, its timestamp as RFC 3339, beside
/// `ts_us` (for people and log pipelines; `ts_us` stays the exact value).
pub(super) fn event_json(e: &allocation_ledger::LoggedEvent) -> allocation_ledger::Result<serde_json::Value> {
    let mut v = to_json(e)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("at".into(), format_micros(e.event.ts_us).into());
    }
    Ok(v)
}

/// Serialises a report. Report types serialise without fail (plain data, string keys); should
/// one ever fail, that is an error to report, not a reason to panic.
fn to_json<T: Serialize>(value: &T) -> allocation_ledger::Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::io("cannot serialise the output as JSON", e.into()))
}

/// Runs the command line; returns the process exit code.
/// A report piped into `head` ends like any Unix tool's (killed by SIGPIPE, quietly) instead
/// of a panic on the failed write: Rust ignores SIGPIPE, so `println!` would panic with exit 101.
/// Not for `serve`, whose clients may go away mid-answer.
fn die_quietly_on_closed_pipe() {
    // SAFETY: called at startup, before any other thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::Ok;
            }
            if output::json_requested(std::env::args()) {
                let msg = e.render().to_string();
                println!(
                    "{}",
                    serde_json::json!({"error": {"kind": "invalid_input", "message": msg.trim(), "exit_code": ExitCode::InvalidInput.code()}})
                );
            } else {
                let _ = e.print();
            }
            return ExitCode::InvalidInput;
        }
    };
    #[cfg(feature = "server")]
    let serving = matches!(cli.command, Command::Serve(_));
    #[cfg(not(feature = "server"))]
    let serving = false;
    if !serving {
        die_quietly_on_closed_pipe();
    }
    let out = Out::new(&cli);
    if let Err(e) = output::check(&cli) {
        return out.error(&e);
    }
    #[cfg(feature = "server")]
    if let Some(code) = client::dispatch(&cli, &out) {
        return code;
    }
    #[cfg(feature = "server")]
    let dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    match run(cli, &out) {
        Ok(code) => code,
        Err(e) => {
            #[cfg(feature = "server")]
            client::explain_locked(&e, &dir);
            out.error(&e)
        }
    }
}

pub(super) fn open_options(config_file: &Option<PathBuf>) -> allocation_ledger::Result<OpenOptions> {
    let mut opts = OpenOptions::default();
    if let Some(path) = config_file {
        opts.config = Some(Config::from_file(path)?);
    }
    Ok(opts)
}

fn open_writer(dir: &PathBuf, config_file: &Option<PathBuf>) -> allocation_ledger::Result<Ledger> {
    let ledger = Ledger::open_with(dir, open_options(config_file)?)?;
    report_recovery(&ledger);
    config::check_recorded(&ledger, config_file)?;
    Ok(ledger)
}

/// Queries read beside a running writer (read-only, no lock) and never write: not even a new
/// ledger in an empty directory (a write such as `request` creates it). There they answer from
/// a preview, in memory, of the ledger a first write would create (the pool of `--config` or
/// the default), and say so on stderr.
fn open_reader(dir: &PathBuf, config_file: &Option<PathBuf>) -> allocation_ledger::Result<Ledger> {
    // A read never creates a ledger: a mistyped --data-dir must not look like an empty pool.
    // `NoLedger` names the directory (exit 4); `init` or a first write creates one.
    // A bad --config is reported as such, ledger or not.
    open_options(config_file)?;
    let ledger = Ledger::open_read_only(dir)?;
    report_recovery(&ledger);
    config::check_recorded(&ledger, config_file)?;
    Ok(ledger)
}

/// A snapshot written after a write (when one is due) may fail, on a full disk say, while the
/// write itself succeeded: say so rather than stay silent.
pub(super) fn warn_snapshot_error(ledger: &Ledger) {
    if let Some(e) = ledger.status().last_snapshot_error {
        eprintln!("warning: writing a snapshot failed (the log is intact; the next open replays more of it): {e}");
    }
}

pub(super) fn report_recovery(ledger: &Ledger) {
    let r = ledger.recovery_report();
    if r.created {
        eprintln!("created a new ledger in {}", ledger.dir().display());
    }
    match &r.torn_tail {
        Some(t) if ledger.is_read_only() => eprintln!(
            "note: the log ends in an incomplete record ({} bytes at offset {} of {}): a write that was interrupted \
             (or is in progress by a running writer); it was never acknowledged. This read-only command answered \
             from the records before it and changed nothing; the next read-write open cuts it",
            t.len,
            t.offset,
            t.file.display()
        ),
        Some(t) => eprintln!(
            "recovered: cut an incomplete final record ({} bytes at offset {} of {}); the bytes were saved to {}",
            t.len,
            t.offset,
            t.file.display(),
            t.saved_to.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        ),
        None => {}
    }
    for s in &r.snapshots_set_aside {
        match &s.moved_to {
            Some(to) => eprintln!("set aside snapshot {} (moved to {}): {}", s.file.display(), to.display(), s.reason),
            None => eprintln!("ignored snapshot {} (left in place, read-only): {}", s.file.display(), s.reason),
        }
    }
}

/// `snapshot`'s text (local or through a server).
fn snapshot_text(s: &SnapshotInfo) -> String {
    format!("snapshot at sequence number {} written to {}", s.seq, s.path.display())
}

/// `capacity [--at TIME]`.
fn capacity(out: &Out, ledger: &Ledger, at: Option<&str>) -> allocation_ledger::Result<ExitCode> {
    let c = match at {
        None => ledger.get_capacity()?,
        Some(at) => history::capacity_at(ledger, at)?,
    };
    out.tabular(&c, || human_capacity(&c), || output::capacity_table(&c), || output::capacity_csv(&c))?;
    Ok(ExitCode::Ok)
}

fn run(cli: Cli, out: &Out) -> allocation_ledger::Result<ExitCode> {
    let dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let config = &cli.config;
    match cli.command {
        Command::Request { job_id, mcp_servers, workers, priority, ttl_seconds, metadata, tenant, contract, wait } => {
            let req = ResourceRequest {
                job_id,
                mcp_servers,
                workers: parse_number("workers", &workers, u64::from(u32::MAX))? as u32,
                priority: Priority::parse("priority", &priority)?,
                ttl_seconds: ttl_seconds.as_deref().map(|t| parse_number("ttl_seconds", t, u64::MAX)).transpose()?,
                metadata: parse_metadata(metadata)?,
                idempotency_key: contract.idempotency_key.clone(),
                max_lifetime_seconds: contract.max_lifetime_seconds()?,
                tenant,
                ..wait.fields()?
            };
            queue::request_or_plan(out, || open_writer(&dir, config), &req, &contract)
        }
        Command::Release { allocation_id, expect } => release(out, &dir, config, &allocation_id, expect.seq()?),
        Command::Cancel { allocation_id } => queue::cancel(out, &open_writer(&dir, config)?, &allocation_id),
        Command::Renew(args) => contract::renew(out, &open_writer(&dir, config)?, &args),
        Command::Capacity { by_tenant: true, .. } => tenant_capacity(out, &open_reader(&dir, config)?),
        Command::Capacity { at, .. } => capacity(out, &open_reader(&dir, config)?, at.as_deref()),
        Command::Get { allocation_id } => get(out, &dir, config, allocation_id),
        Command::List(args) => list::list(out, || open_reader(&dir, config), &args),
        Command::CleanupExpired { expect } => cleanup_expired(out, &open_writer(&dir, config)?, expect.seq()?),
        Command::Log { from_seq, limit, follow: true, .. } => follow::follow(out, &dir, from_seq, limit),
        Command::Log { from_seq, limit, since, until, cursor, .. } if since.is_some() || until.is_some() => {
            let from_seq = list::log_start(cursor.as_deref(), from_seq, since.as_deref(), until.as_deref())?;
            let ledger = open_reader(&dir, config)?;
            history::log(&ledger, out, from_seq, limit, since.as_deref(), until.as_deref())
        }
        Command::History(args) => history::history(&open_reader(&dir, config)?, out, args),
        Command::Usage(args) => history::usage(&open_reader(&dir, config)?, out, args),
        Command::Timeline(args) => history::timeline(&open_reader(&dir, config)?, out, args),
        Command::Log { from_seq, limit, cursor, .. } => {
            log(out, &dir, list::log_start(cursor.as_deref(), from_seq, None, None)?, limit)
        }
        Command::Replay(args) => replay::replay(&open_existing(&dir)?, out, args),
        Command::WhatIf(args) => replay::what_if(&open_existing(&dir)?, out, config.as_deref(), args),
        Command::Verify(args) => verify_cmd::run(out, dir, &args),
        Command::Repair { force_truncate, dry_run } => repair(out, &dir, force_truncate, dry_run),
        Command::Snapshot => snapshot(out, &open_writer(&dir, config)?),
        Command::Demo => demo(out, config),
        Command::Init => config::init(out, &dir, config),
        Command::Config(cmd) => {
            let ledger = match &cmd {
                config::ConfigCommand::Show => open_reader(&dir, config)?,
                config::ConfigCommand::Apply { .. } => open_writer(&dir, &None)?,
            };
            config::run(out, &ledger, &cmd)
        }
        Command::Pool(cmd) => {
            let ledger = if cmd.writes() { open_writer(&dir, &None)? } else { open_reader(&dir, config)? };
            pool::run(out, &ledger, &cmd)
        }
        cmd @ (Command::Reserve(_) | Command::Reservations { .. } | Command::Reservation(_)) => {
            reservation::run(out, &dir, config, &cmd)
        }
        #[cfg(feature = "server")]
        Command::Serve(mut args) => {
            args.token_file = cli.token_file.clone();
            Ok(serve::serve(dir, cli.config.clone(), args))
        }
        Command::Completions { shell } => Ok(completions(shell)),
        Command::Man => man(),
    }
}

/// `snapshot`: writes one now.
fn snapshot(out: &Out, ledger: &Ledger) -> allocation_ledger::Result<ExitCode> {
    let s: SnapshotInfo = ledger.snapshot()?;
    out.doc(&s, || snapshot_text(&s))?;
    Ok(ExitCode::Ok)
}

/// `completions SHELL`: the script, written in one piece (clap_complete panics on a failed
/// write, e.g. `| head`).
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "allocation-ledger", &mut script);
    let _ = std::io::stdout().write_all(&script);
    ExitCode::Ok
}

/// `man`: the man page (roff).
fn man() -> allocation_ledger::Result<ExitCode> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page).map_err(|e| Error::io("writing the man page", e))?;
    let _ = std::io::stdout().write_all(&page);
    Ok(ExitCode::Ok)
}

/// `request`, or with `--dry-run` its plan.
fn request_or_plan(
    out: &Out,
    ledger: &Ledger,
    req: &ResourceRequest,
    contract: &contract::RequestContract,
) -> allocation_ledger::Result<ExitCode> {
    if contract.dry_run {
        return contract::plan(out, ledger, req);
    }
    request(out, ledger, req, contract.expect.seq()?)
}

/// `--metadata`: a JSON object, or nothing.
fn parse_metadata(metadata: Option<String>) -> allocation_ledger::Result<serde_json::Map<String, serde_json::Value>> {
    match metadata {
        None => Ok(Default::default()),
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(Error::invalid("metadata", "must be a JSON object, e.g. {\"team\":\"infra\"}")),
            Err(e) => Err(Error::invalid("metadata", format!("is not valid JSON: {e}"))),
        },
    }
}

fn request(
    out: &Out,
    ledger: &Ledger,
    req: &ResourceRequest,
    expected_seq: Option<u64>,
) -> allocation_ledger::Result<ExitCode> {
    let outcome = match expected_seq {
        Some(seq) => ledger.if_seq(seq).request_resources(req)?,
        None => ledger.request_resources(req)?,
    };
    warn_snapshot_error(ledger);
    out.doc(&outcome, || human_outcome(&outcome))?;
    Ok(if outcome.is_granted() { ExitCode::Ok } else { ExitCode::NotGranted })
}

fn release(
    out: &Out,
    dir: &PathBuf,
    config: &Option<PathBuf>,
    allocation_id: &str,
    expected_seq: Option<u64>,
) -> allocation_ledger::Result<ExitCode> {
    allocation_ledger::AllocationId::parse("allocation_id", allocation_id)?;
    let ledger = open_writer(dir, config)?;
    let r = match expected_seq {
        Some(seq) => ledger.if_seq(seq).release_resources(allocation_id)?,
        None => ledger.release_resources(allocation_id)?,
    };
    warn_snapshot_error(&ledger);
    out.doc(&r, || human_release(&r))?;
    Ok(ExitCode::Ok)
}

fn get(
    out: &Out,
    dir: &PathBuf,
    config: &Option<PathBuf>,
    allocation_id: String,
) -> allocation_ledger::Result<ExitCode> {
    allocation_ledger::AllocationId::parse("allocation_id", &allocation_id)?;
    let ledger = open_reader(dir, config)?;
    match ledger.get_allocation(&allocation_id)? {
        Some(d) => {
            out.doc(&d, || human_details(&d))?;
            Ok(ExitCode::Ok)
        }
        None => Err(Error::NotFound(allocation_id)),
    }
}

fn cleanup_expired(out: &Out, ledger: &Ledger, expected_seq: Option<u64>) -> allocation_ledger::Result<ExitCode> {
    let r = match expected_seq {
        Some(seq) => ledger.if_seq(seq).cleanup_expired()?,
        None => ledger.cleanup_expired()?,
    };
    out.doc(&r, || {
        if r.count == 0 {
            "no allocations past their deadline".into()
        } else {
            let ids: Vec<String> = r.cleaned_up.iter().map(std::string::ToString::to_string).collect();
            format!("expired {} allocation(s): {}", r.count, ids.join(", "))
        }
    })?;
    Ok(ExitCode::Ok)
}

/// A read-only handle on a ledger that must exist (replay and what-if have nothing to show
/// of a preview).
fn open_existing(dir: &Path) -> allocation_ledger::Result<Ledger> {
    let ledger = Ledger::open_read_only(dir)?;
    report_recovery(&ledger);
    Ok(ledger)
}

/// `log` without a time window: events by sequence number, as NDJSON.
fn log(out: &Out, dir: &Path, from_seq: u64, limit: Option<usize>) -> allocation_ledger::Result<ExitCode> {
    // No preview here: its one event would be a ledger that does not exist.
    let ledger = Ledger::open_read_only(dir)?;
    report_recovery(&ledger);
    let mut events = ledger.events(from_seq.max(1), limit.map_or(usize::MAX, |l| l.saturating_add(1)))?;
    // One more than asked for tells whether more follow.
    let next = limit.filter(|l| events.len() > *l).and_then(|_| events.pop()).map(|e| e.seq);
    let mut stdout = std::io::stdout().lock();
    let mut sink = output::EventSink::new(out);
    for e in events {
        if sink.push(&mut stdout, &e).is_err() {
            // A closed pipe (`| head`) ends the output.
            return Ok(ExitCode::Ok);
        }
    }
    let _ = sink.finish(&mut stdout);
    if let Some(seq) = next {
        list::print_log_cursor(seq, None, None);
    }
    Ok(ExitCode::Ok)
}

fn repair(out: &Out, dir: &Path, force_truncate: bool, dry_run: bool) -> allocation_ledger::Result<ExitCode> {
    use allocation_ledger::{repair, RepairOptions};
    let storage = FsStorage { mmap_min_bytes: 0 };
    let report = repair(&storage, dir, RepairOptions { force_truncate, dry_run })?;
    let verified = if report.applied || !report.plan.has_work() {
        Some(allocation_ledger::verify(&storage, dir, &mut |_, _| {})?)
    } else {
        None
    };
    let ok = verified.as_ref().is_some_and(|v| v.ok);
    let doc = serde_json::json!({"repair": &report, "verify": &verified});
    out.doc(&doc, || human_repair(&report, verified.as_ref(), dry_run))?;
    Ok(if ok || (dry_run && report.refused.is_none()) { ExitCode::Ok } else { ExitCode::Damaged })
}

pub(super) fn parse_number(field: &str, text: &str, max: u64) -> allocation_ledger::Result<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v <= max)
        .ok_or_else(|| Error::invalid(field, format!("{text:?} is not a whole number >= 0")))
}

// ----- human output -----

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(header.iter().map(std::string::ToString::to_string).collect());
    for r in rows {
        s.push_str(&line(r.clone()));
    }
    s
}

fn human_request(o: &RequestOutcome) -> String {
    match o {
        RequestOutcome::Granted(g) => {
            let mut s = format!(
                "granted {} to job {} (priority {}, ttl {} s, expires {})\n",
                g.allocation_id,
                g.job_id,
                g.priority,
                g.ttl_seconds,
                format_micros(Micros::from_micros(g.expires_at.timestamp_micros()))
            );
            if !g.workers_allocated.is_empty() {
                let rows: Vec<Vec<String>> = g
                    .workers_allocated
                    .iter()
                    .map(|w| {
                        vec![
                            w.worker_id.clone(),
                            w.endpoint.clone(),
                            format!("{:.1}", w.cpu),
                            format!("{} MiB", w.memory),
                        ]
                    })
                    .collect();
                s.push_str(&table(&["WORKER", "ENDPOINT", "CPU", "MEMORY"], &rows));
            }
            if !g.mcp_servers.is_empty() {
                let rows: Vec<Vec<String>> =
                    g.mcp_servers.iter().map(|m| vec![m.name.clone(), m.endpoint.clone(), m.status.clone()]).collect();
                s.push_str(&table(&["MCP SERVER", "ENDPOINT", "STATUS"], &rows));
            }
            s
        }
        RequestOutcome::Failed(f) => format!("not granted ({} for job {}): {}", f.allocation_id, f.job_id, f.error),
    }
}

/// [`human_request`], saying so when the answer repeats an earlier decision.
pub(super) fn human_outcome(o: &RequestOutcome) -> String {
    let replayed = match o {
        RequestOutcome::Granted(g) => g.replayed.then_some(g.seq),
        RequestOutcome::Failed(f) => f.replayed.then_some(f.seq),
    };
    let mut s = human_request(o);
    if let Some(seq) = replayed {
        s = format!(
            "{}\n(replayed: this idempotency key was decided by event {seq}; nothing was written)\n",
            s.trim_end()
        );
    }
    s
}

fn human_release(r: &ReleaseReport) -> String {
    if r.status == "released" {
        format!(
            "released {} (job {}): {} worker(s), {:.1} CPU, {} MiB freed after {:.1} s",
            r.allocation_id, r.job_id, r.workers_released, r.cpu_freed, r.memory_freed, r.duration_seconds
        )
    } else if r.status == "cancelled" {
        format!("cancelled {} (job {}): it was waiting in the queue; nothing was held", r.allocation_id, r.job_id)
    } else {
        format!("{} is already {}; nothing changed", r.allocation_id, r.state)
    }
}

/// `capacity --by-tenant`.
fn tenant_capacity(out: &Out, ledger: &Ledger) -> allocation_ledger::Result<ExitCode> {
    let rows = ledger.tenant_capacity()?;
    out.tabular(&rows, || human_tenants(&rows), || output::tenants_table(&rows), || output::tenants_csv(&rows))?;
    Ok(ExitCode::Ok)
}

fn human_tenants(rows: &[allocation_ledger::TenantCapacity]) -> String {
    if rows.is_empty() {
        return "no tenant holds anything and no quota is configured".into();
    }
    let t = output::tenants_table(rows);
    format!("{}(used / limit; - is unlimited)\n", table(&t.header, &t.rows))
}

fn human_capacity(c: &CapacityReport) -> String {
    let rows = output::capacity_table(c);
    let mut s = table(&rows.header, &rows.rows);
    s.push_str(&format!("active allocations:  {}\n", c.active_allocations));
    if let Some(r) = &c.reserved {
        s.push_str(&format!(
            "reserved:            {} workers ({} unused by their holders: kept from others) by {}\n",
            r.workers,
            r.unused_workers,
            r.reservations.join(", ")
        ));
    }
    if !c.draining.is_empty() || !c.drained.is_empty() {
        let ids = |v: &[String]| if v.is_empty() { "(none)".to_string() } else { v.join(", ") };
        s.push_str(&format!("draining (held):     {}\n", ids(&c.draining)));
        s.push_str(&format!("drained (idle):      {}\n", ids(&c.drained)));
    }
    s.push_str(&format!(
        "running MCP servers: {}\n",
        if c.running_mcp_servers.is_empty() { "(none)".to_string() } else { c.running_mcp_servers.join(", ") }
    ));
    s.push_str(&format!(
        "as of:               {} (sequence number {})\n",
        format_micros(Micros::from_micros(c.as_of.timestamp_micros())),
        c.seq
    ));
    s
}

fn human_details(d: &AllocationDetails) -> String {
    let t = &d.timestamps;
    let mut rows = vec![
        vec!["allocation".to_string(), d.allocation_id.to_string()],
        vec!["job".into(), d.job_id.clone()],
        vec!["state".into(), d.state.to_string()],
        vec!["priority".into(), d.priority.to_string()],
        vec![
            "resources".into(),
            format!(
                "{} worker(s), {:.1} CPU, {} MiB",
                d.resources.workers, d.resources.cpu_allocated, d.resources.memory_allocated
            ),
        ],
        vec!["created".into(), format_micros(Micros::from_micros(t.created_at.timestamp_micros()))],
    ];
    for (k, v) in [("expires", &t.expires_at), ("released", &t.released_at), ("expired", &t.expired_at)] {
        if let Some(v) = v {
            rows.push(vec![k.into(), format_micros(Micros::from_micros(v.timestamp_micros()))]);
        }
    }
    rows.push(vec!["ttl".into(), format!("{} s", d.ttl_seconds)]);
    if let Some(e) = &d.error {
        rows.push(vec!["error".into(), e.clone()]);
    }
    if let (Some(p), Some(why)) = (d.queue_position, &d.waiting_reason) {
        rows.push(vec!["queue".into(), format!("position {p}: {why}")]);
    }
    rows.extend(preempt_rows(d));
    if !d.metadata.is_empty() {
        rows.push(vec!["metadata".into(), serde_json::Value::Object(d.metadata.clone()).to_string()]);
    }
    let mut s = String::new();
    for r in &rows {
        s.push_str(&format!("{:<11} {}\n", r[0], r[1]));
    }
    if !d.workers.is_empty() {
        let w: Vec<Vec<String>> =
            d.workers.iter().map(|w| vec![w.worker_id.clone(), w.endpoint.clone(), w.status.clone()]).collect();
        s.push_str(&table(&["WORKER", "ENDPOINT", "STATUS"], &w));
    }
    if !d.mcp_servers.is_empty() {
        let m: Vec<Vec<String>> =
            d.mcp_servers.iter().map(|m| vec![m.name.clone(), m.endpoint.clone(), m.status.clone()]).collect();
        s.push_str(&table(&["MCP SERVER", "ENDPOINT", "STATUS"], &m));
    }
    s
}

fn human_list(rows: &[AllocationSummary]) -> String {
    if rows.is_empty() {
        return "no allocations".into();
    }
    let t = output::list_table(rows);
    table(&t.header, &t.rows)
}

fn human_repair(r: &allocation_ledger::RepairReport, v: Option<&VerifyReport>, dry_run: bool) -> String {
    let p = &r.plan;
    let mut s = String::new();
    if let Some(problem) = &p.problem {
        s.push_str(&format!("found: {problem}\n"));
    }
    if let Some(cut) = &p.cut {
        s.push_str(&format!(
            "cut: {} at offset {}; the log keeps sequence numbers 1 to {} ({} unreadable byte(s) after the cut)\n",
            cut.file.display(),
            cut.offset,
            p.keeps_through_seq,
            p.unreadable_bytes
        ));
    }
    for seg in &p.segments_set_aside {
        s.push_str(&format!("later segment set aside: {}\n", seg.display()));
    }
    if !p.events_lost.is_empty() {
        s.push_str(&format!("events lost by the cut ({}):\n", p.events_lost.len()));
        let rows: Vec<Vec<String>> = p
            .events_lost
            .iter()
            .map(|e| {
                vec![
                    e.seq.to_string(),
                    e.kind.clone(),
                    e.allocation_id.clone().unwrap_or_default(),
                    e.job_id.clone().unwrap_or_default(),
                    e.at.clone().unwrap_or_default(),
                    format!(
                        "{}@{}",
                        e.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                        e.offset
                    ),
                ]
            })
            .collect();
        s.push_str(&table(&["SEQ", "TYPE", "ALLOCATION", "JOB", "AT", "FILE@OFFSET"], &rows));
    }
    for snap in &p.snapshots_set_aside {
        s.push_str(&format!("snapshot set aside: {} ({})\n", snap.file.display(), snap.reason));
    }
    if let Some(why) = &r.refused {
        s.push_str(&format!("refused: {why}\n"));
    } else if dry_run {
        s.push_str(if p.has_work() { "dry run: nothing changed\n" } else { "nothing to repair\n" });
    } else if r.applied {
        for f in &r.saved {
            s.push_str(&format!("saved: {}\n", f.display()));
        }
        s.push_str("repaired\n");
    } else {
        s.push_str("nothing to repair\n");
    }
    if let Some(v) = v {
        s.push_str(&format!(
            "verify: {} ({} records, last sequence number {})\n",
            if v.ok { "ok" } else { "DAMAGED" },
            v.records,
            v.last_seq
        ));
        for problem in &v.problems {
            s.push_str(&format!("problem: {problem}\n"));
        }
    }
    s
}

fn human_verify(r: &VerifyReport) -> String {
    let mut s = format!(
        "{}: {} records in {} segment(s), last sequence number {}, {} snapshot(s), {} active allocation(s)\n",
        if r.ok { "ok" } else { "DAMAGED" },
        r.records,
        r.segments.len(),
        r.last_seq,
        r.snapshots.len(),
        r.active_allocations
    );
    if let (Some(a), Some(b)) = (&r.first_event_at, &r.last_event_at) {
        s.push_str(&format!("events from {a} to {b}\n"));
    }
    s.push_str(&verify_cmd::human_chain(r));
    let rows: Vec<Vec<String>> = r
        .segments
        .iter()
        .map(|g| {
            vec![
                g.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                g.first_seq.to_string(),
                g.records.to_string(),
                g.bytes.to_string(),
                g.status.clone(),
            ]
        })
        .collect();
    s.push_str(&table(&["SEGMENT", "FIRST SEQ", "RECORDS", "BYTES", "STATUS"], &rows));
    if !r.snapshots.is_empty() {
        let rows: Vec<Vec<String>> = r
            .snapshots
            .iter()
            .map(|g| {
                vec![
                    g.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    g.seq.to_string(),
                    g.status.clone(),
                ]
            })
            .collect();
        s.push_str(&table(&["SNAPSHOT", "SEQ", "STATUS"], &rows));
    }
    if let Some(t) = &r.torn_tail {
        s.push_str(&format!("note: {t}\n"));
    }
    for p in &r.problems {
        s.push_str(&format!("problem: {p}\n"));
    }
    s
}

/// The original system's acceptance scenario, on a scratch ledger, step by step.
fn demo(out: &Out, config_file: &Option<PathBuf>) -> allocation_ledger::Result<ExitCode> {
    let scratch = std::env::temp_dir().join(format!("allocation-ledger-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = (|| {
        let ledger = Ledger::open_with(&scratch, open_options(config_file)?)?;
        let mut steps: Vec<serde_json::Value> = Vec::new();
        let mut say = |title: &str, value: serde_json::Value, human: String| {
            if !out.json {
                println!("== {title}\n{}\n", human.trim_end());
            }
            steps.push(serde_json::json!({"step": title, "result": value}));
        };
        let c = ledger.get_capacity()?;
        say("1. a fresh ledger", to_json(&c)?, human_capacity(&c));
        let g = ledger.request_resources(&ResourceRequest::new("demo-job").workers(4).mcp_server("github"))?;
        say("2. request 4 workers and the github MCP server", to_json(&g)?, human_request(&g));
        let c = ledger.get_capacity()?;
        say("3. capacity now", to_json(&c)?, human_capacity(&c));
        let id = g.allocation_id().to_string();
        let d = ledger.get_allocation(&id)?.ok_or_else(|| Error::NotFound(id.clone()))?;
        say("4. the allocation", to_json(&d)?, human_details(&d));
        let l = ledger.list_allocations(None, None)?;
        say("5. all allocations", to_json(&l)?, human_list(&l));
        let big = ledger.request_resources(&ResourceRequest::new("greedy-job").workers(7))?;
        say("6. a request the pool cannot hold (recorded as failed)", to_json(&big)?, human_request(&big));
        let r = ledger.release_resources(&id)?;
        say("7. release", to_json(&r)?, human_release(&r));
        let c = ledger.get_capacity()?;
        say("8. capacity is back", to_json(&c)?, human_capacity(&c));
        let events = ledger.events(1, usize::MAX)?;
        let lines: Vec<String> = events
            .iter()
            .map(|e| format!("{:>3}  {}  {}", e.seq, format_micros(e.event.ts_us), e.event.body.type_name()))
            .collect();
        say("9. the log: every step is an event", to_json(&events)?, lines.join("\n"));
        if out.json {
            println!("{}", serde_json::json!({"data_dir": scratch, "steps": steps}));
        } else {
            println!("(scratch ledger in {}; removed on exit)", scratch.display());
        }
        Ok(ExitCode::Ok)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// `get`'s rows about preemption: in grace (until when, by whom), preempted, protected.
fn preempt_rows(d: &AllocationDetails) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    if let (Some(t), Some(by)) = (d.preempt_deadline, d.preempted_by) {
        let until = format_micros(Micros::from_micros(t.timestamp_micros()));
        rows.push(vec!["preempting".into(), format!("by {by} until {until}: checkpoint and release before then")]);
    } else if let Some(by) = d.preempted_by.filter(|_| d.state == allocation_ledger::AllocationState::Preempted) {
        rows.push(vec!["preempted".into(), format!("by {by}")]);
    }
    if !d.preemptible {
        rows.push(vec!["preemptible".into(), "no".into()]);
    }
    rows
}
