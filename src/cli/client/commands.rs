//! Each remote command: its arguments checked as the local mode checks them, the tool call,
//! and the answer printed with the local mode's printers.

use super::{Failure, Server};
use crate::cli::{contract, human_capacity, human_details, human_outcome, human_release, human_tenants};
use crate::cli::{output, parse_metadata, parse_number, Cli, Command, Out};
use allocation_ledger::{AllocationDetails, CapacityReport, CleanupReport};
use allocation_ledger::{Error, ExitCode, PlanReport, Priority, ReleaseReport, RenewReport, RequestOutcome};
use allocation_ledger::{ResourceRequest, TenantCapacity};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

type Result<T> = std::result::Result<T, Failure>;

/// Runs `cli`'s command through `server` (only the commands `route` sends there).
pub(super) fn run(server: &Server, cli: &Cli, out: &Out) -> Result<ExitCode> {
    match &cli.command {
        Command::Request { job_id, mcp_servers, workers, priority, ttl_seconds, metadata, tenant, contract, wait } => {
            let req = ResourceRequest {
                job_id: job_id.clone(),
                mcp_servers: mcp_servers.clone(),
                workers: parse_number("workers", workers, u64::from(u32::MAX))? as u32,
                priority: Priority::parse("priority", priority)?,
                ttl_seconds: ttl_seconds.as_deref().map(|t| parse_number("ttl_seconds", t, u64::MAX)).transpose()?,
                metadata: parse_metadata(metadata.clone())?,
                idempotency_key: contract.idempotency_key.clone(),
                max_lifetime_seconds: contract.max_lifetime_seconds()?,
                tenant: tenant.clone(),
                ..wait.fields()?
            };
            if contract.dry_run {
                plan(server, out, &req)
            } else {
                request(server, out, &req, contract.expect.seq()?)
            }
        }
        Command::Cancel { allocation_id } => cancel(server, out, allocation_id),
        Command::Release { allocation_id, expect } => release(server, out, allocation_id, expect.seq()?),
        Command::Renew(a) => renew(server, out, a),
        Command::Capacity { by_tenant: true, .. } => {
            let v = server.call("get_capacity", args_with("by_tenant", true.into()))?;
            let rows: Vec<TenantCapacity> = decode(v["tenants"].clone())?;
            out.tabular(
                &rows,
                || human_tenants(&rows),
                || output::tenants_table(&rows),
                || output::tenants_csv(&rows),
            )?;
            Ok(ExitCode::Ok)
        }
        Command::Capacity { at, .. } => {
            let mut args = Map::new();
            put(&mut args, "at", at.clone());
            let c: CapacityReport = decode(server.call("get_capacity", args)?)?;
            out.tabular(&c, || human_capacity(&c), || output::capacity_table(&c), || output::capacity_csv(&c))?;
            Ok(ExitCode::Ok)
        }
        Command::Get { allocation_id } => get(server, out, allocation_id),
        Command::List(args) => list(server, out, args),
        Command::CleanupExpired { expect } => cleanup(server, out, expect.seq()?),
        Command::Pool(cmd) => pool(server, out, cmd),
        Command::Reserve(_) | Command::Reservations { .. } | Command::Reservation(_) => {
            reservation(server, out, &cli.command)
        }
        Command::Config(crate::cli::config::ConfigCommand::Apply { file, dry_run, expect }) => {
            apply_config(server, out, file, *dry_run, expect.seq()?)
        }
        Command::Snapshot => {
            let s: allocation_ledger::SnapshotInfo = decode(server.call("write_snapshot", Map::new())?)?;
            out.doc(&s, || crate::cli::snapshot_text(&s))?;
            Ok(ExitCode::Ok)
        }
        _ => Err(Failure::Ledger(Error::invalid("server", "this command has no server equivalent"))),
    }
}

/// `release ID` through `release_resources`.
fn release(server: &Server, out: &Out, allocation_id: &str, expected_seq: Option<u64>) -> Result<ExitCode> {
    allocation_ledger::AllocationId::parse("allocation_id", allocation_id)?;
    let mut args = args_with("allocation_id", allocation_id.into());
    put(&mut args, "expected_seq", expected_seq);
    let r: ReleaseReport = decode(server.call("release_resources", args)?)?;
    out.doc(&r, || human_release(&r))?;
    Ok(ExitCode::Ok)
}

/// `get ID` through `get_allocation`.
fn get(server: &Server, out: &Out, allocation_id: &str) -> Result<ExitCode> {
    allocation_ledger::AllocationId::parse("allocation_id", allocation_id)?;
    let d: AllocationDetails =
        decode(server.call("get_allocation", args_with("allocation_id", allocation_id.into()))?)?;
    out.doc(&d, || human_details(&d))?;
    Ok(ExitCode::Ok)
}

/// `config apply FILE` through `apply_config` (the file is read here, as the local mode does).
fn apply_config(
    server: &Server,
    out: &Out,
    file: &std::path::Path,
    dry_run: bool,
    expected_seq: Option<u64>,
) -> Result<ExitCode> {
    let config = allocation_ledger::Config::from_file(file)?;
    let mut args = args_with("config", to_value(&config)?);
    put(&mut args, "expected_seq", expected_seq);
    if dry_run {
        args.insert("dry_run".into(), true.into());
    }
    let r: allocation_ledger::ConfigApplyReport = decode(server.call("apply_config", args)?)?;
    Ok(crate::cli::config::print_apply(out, &r)?)
}

/// `pool ...` through `get_pool` and `change_pool`.
fn pool(server: &Server, out: &Out, cmd: &crate::cli::pool::PoolCommand) -> Result<ExitCode> {
    use crate::cli::pool::{human_change, human_pool};
    use allocation_ledger::{PoolChange, PoolChangeReport, PoolReport};
    let Some((change, opts)) = cmd.change()? else {
        let p: PoolReport = decode(server.call("get_pool", Map::new())?)?;
        out.doc(&p, || human_pool(&p))?;
        return Ok(ExitCode::Ok);
    };
    let mut args = args_with("action", change.action().into());
    match change {
        PoolChange::AddWorkers { count, endpoints } => {
            args.insert("count".into(), count.into());
            args.insert("endpoints".into(), endpoints.into());
        }
        PoolChange::Drain { slot } | PoolChange::Undrain { slot } | PoolChange::RemoveWorker { slot } => {
            args.insert("worker".into(), slot.into());
        }
        PoolChange::McpSet { name, endpoint, cpu_millicores, memory_mib } => {
            args.insert("name".into(), name.into());
            args.insert("endpoint".into(), endpoint.into());
            put(&mut args, "cpu_millicores", cpu_millicores);
            put(&mut args, "memory_mib", memory_mib);
        }
        PoolChange::McpRemove { name } => {
            args.insert("name".into(), name.into());
        }
    }
    put(&mut args, "expected_seq", opts.expect.seq()?);
    if opts.dry_run {
        args.insert("dry_run".into(), true.into());
    }
    let r: PoolChangeReport = decode(server.call("change_pool", args)?)?;
    out.doc(&r, || human_change(&r))?;
    Ok(ExitCode::Ok)
}

/// `reserve`, `reservations` and `reservation cancel` through the reservation tools.
fn reservation(server: &Server, out: &Out, command: &Command) -> Result<ExitCode> {
    use crate::cli::reservation::{print_cancel, print_list, print_reserve, ReservationCommand};
    match command {
        Command::Reserve(a) => {
            let req = a.request()?;
            let mut args = args_with("workers", req.workers.into());
            put(&mut args, "tenant", req.tenant);
            put(&mut args, "job_id", req.job_id);
            put(&mut args, "start", req.start);
            put(&mut args, "end", req.end);
            put(&mut args, "start_in_seconds", req.start_in_seconds);
            put(&mut args, "duration_seconds", req.duration_seconds);
            let r = match server.call("reserve_resources", args) {
                Ok(v) => decode(v)?,
                // Not honoured: the tool's error result is the recorded rejection itself.
                Err(Failure::Tool(v)) if v["status"] == "failed" => decode(v)?,
                Err(e) => return Err(e),
            };
            Ok(print_reserve(out, &r)?)
        }
        Command::Reservation(ReservationCommand::Cancel { reservation_id }) => {
            let args = args_with("reservation_id", reservation_id.as_str().into());
            Ok(print_cancel(out, &decode(server.call("cancel_reservation", args)?)?)?)
        }
        Command::Reservations { at } => {
            let mut args = Map::new();
            put(&mut args, "at", at.clone());
            Ok(print_list(out, &decode(server.call("list_reservations", args)?)?)?)
        }
        _ => Err(Failure::Ledger(Error::invalid("server", "this command has no server equivalent"))),
    }
}

fn request_args(req: &ResourceRequest) -> Result<Map<String, Value>> {
    let mut args = Map::new();
    args.insert("job_id".into(), req.job_id.clone().into());
    args.insert("mcp_servers".into(), req.mcp_servers.clone().into());
    args.insert("workers".into(), req.workers.into());
    args.insert("priority".into(), to_value(req.priority)?);
    put(&mut args, "ttl_seconds", req.ttl_seconds);
    if !req.metadata.is_empty() {
        args.insert("metadata".into(), Value::Object(req.metadata.clone()));
    }
    put(&mut args, "idempotency_key", req.idempotency_key.clone());
    put(&mut args, "max_lifetime_seconds", req.max_lifetime_seconds);
    put(&mut args, "tenant", req.tenant.clone());
    put(&mut args, "preemptible", req.preemptible);
    if req.wait {
        args.insert("wait".into(), true.into());
        put(&mut args, "queue_timeout_seconds", req.queue_timeout_seconds);
    }
    Ok(args)
}

/// `cancel ID` through the server: the `cancel_request` tool.
fn cancel(server: &Server, out: &Out, allocation_id: &str) -> Result<ExitCode> {
    let r: allocation_ledger::CancelReport =
        decode(server.call("cancel_request", args_with("allocation_id", allocation_id.into()))?)?;
    out.doc(&r, || crate::cli::queue::human_cancel(&r))?;
    Ok(ExitCode::Ok)
}

fn request(server: &Server, out: &Out, req: &ResourceRequest, expected_seq: Option<u64>) -> Result<ExitCode> {
    let mut args = request_args(req)?;
    put(&mut args, "expected_seq", expected_seq);
    // A waiting call stays open until the request is decided (at most its queue timeout).
    // A preempting request waits the same way, whether or not it asked to (its victims' grace).
    let wait = (req.wait || matches!(req.priority, Priority::High | Priority::Critical))
        .then(|| std::time::Duration::from_secs(req.queue_timeout_seconds.unwrap_or(86_400) + 60));
    let outcome: RequestOutcome = match server.call_for("request_resources", args, wait.unwrap_or(super::CALL_TIMEOUT))
    {
        Ok(v) => decode(v)?,
        // Not granted: the tool's error result is the recorded failure itself.
        Err(Failure::Tool(v)) if v["status"] == "failed" || v["status"] == "cancelled" => decode(v)?,
        Err(e) => return Err(e),
    };
    out.doc(&outcome, || human_outcome(&outcome))?;
    Ok(if outcome.is_granted() { ExitCode::Ok } else { ExitCode::NotGranted })
}

fn plan(server: &Server, out: &Out, req: &ResourceRequest) -> Result<ExitCode> {
    let p: PlanReport = decode(server.call("plan_request", request_args(req)?)?)?;
    out.doc(&p, || contract::human_plan(&p))?;
    Ok(if p.would_grant { ExitCode::Ok } else { ExitCode::NotGranted })
}

fn renew(server: &Server, out: &Out, a: &contract::RenewArgs) -> Result<ExitCode> {
    let ttl_seconds = a.ttl_seconds.as_deref().map(|t| parse_number("ttl_seconds", t, u64::MAX)).transpose()?;
    let mut args = args_with("allocation_id", a.allocation_id.as_str().into());
    put(&mut args, "ttl_seconds", ttl_seconds);
    put(&mut args, "expected_seq", a.expect.seq()?);
    let r: RenewReport = decode(server.call("renew_allocation", args)?)?;
    out.doc(&r, || contract::human_renew(&r))?;
    Ok(ExitCode::Ok)
}

/// `list` through `list_allocations`: one page when `--limit`/`--cursor` asks for one, else
/// every page (the local mode prints every row; the tool's default page is bounded).
fn list(server: &Server, out: &Out, args: &crate::cli::list::ListArgs) -> Result<ExitCode> {
    let mut tool_args = args.tool_args()?;
    let mut page: allocation_ledger::AllocationPage = decode(server.call("list_allocations", tool_args.clone())?)?;
    while !args.paged() {
        let Some(next) = page.next_cursor.take() else { break };
        tool_args.insert("cursor".into(), next.into());
        let more: allocation_ledger::AllocationPage = decode(server.call("list_allocations", tool_args.clone())?)?;
        page.allocations.extend(more.allocations);
        page.count = page.allocations.len();
        page.next_cursor = more.next_cursor;
    }
    crate::cli::list::print_page(out, &page, args.paged())?;
    Ok(ExitCode::Ok)
}

fn cleanup(server: &Server, out: &Out, expected_seq: Option<u64>) -> Result<ExitCode> {
    let mut args = Map::new();
    put(&mut args, "expected_seq", expected_seq);
    let r: CleanupReport = decode(server.call("cleanup_expired", args)?)?;
    out.doc(&r, || human_cleanup(&r))?;
    Ok(ExitCode::Ok)
}

/// `cleanup-expired`'s text (as the local mode's).
fn human_cleanup(r: &CleanupReport) -> String {
    if r.count == 0 {
        "no allocations past their deadline".into()
    } else {
        let ids: Vec<String> = r.cleaned_up.iter().map(std::string::ToString::to_string).collect();
        format!("expired {} allocation(s): {}", r.count, ids.join(", "))
    }
}

fn args_with(key: &str, value: Value) -> Map<String, Value> {
    let mut args = Map::new();
    args.insert(key.into(), value);
    args
}

/// Adds an optional argument (absent when `None`).
fn put<T: Into<Value>>(args: &mut Map<String, Value>, key: &str, value: Option<T>) {
    if let Some(v) = value {
        args.insert(key.into(), v.into());
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Failure::Ledger(Error::io("cannot serialise the arguments", e.into())))
}

/// A tool's result as the report type the local mode prints.
fn decode<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| {
        Failure::Ledger(Error::io(
            "the server's answer does not read as this version's report (is it another version of allocation-ledger?)",
            e.into(),
        ))
    })
}
