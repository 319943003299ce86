//! The reservation tools: `reserve_resources` (capacity for a tenant or a job over a future
//! window), `cancel_reservation` and `list_reservations`. Decided by the ledger and recorded as
//! events; see docs/policy.md, "Advance reservations".

use super::{check_known, error_value, from_ledger, kind_of, opt_str, tool_error, LedgerTools};
use crate::{Config, Error, ReservationRequest};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

const RESERVE_FIELDS: &[&str] =
    &["tenant", "job_id", "workers", "start", "end", "start_in_seconds", "duration_seconds"];

fn opt_u64(args: &JsonObject, field: &str) -> Result<Option<u64>, Error> {
    match args.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_u64().map(Some).ok_or_else(|| Error::invalid(field, format!("{n} is not allowed: use a whole number")))
        }
        Some(other) => Err(Error::invalid(field, format!("must be a whole number, got {}", kind_of(other)))),
    }
}

/// The reservation an agent asked for: unknown arguments and wrong types are named.
fn reserve_args(args: &JsonObject) -> Result<ReservationRequest, Error> {
    check_known(args, RESERVE_FIELDS)?;
    let text = |field: &str| opt_str(args, field).map(|v| v.map(str::to_string));
    let workers = opt_u64(args, "workers")?
        .ok_or_else(|| Error::invalid("workers", "is required: how many worker slots to reserve, e.g. 4"))?;
    Ok(ReservationRequest {
        tenant: text("tenant")?,
        job_id: text("job_id")?,
        workers: u32::try_from(workers).unwrap_or(u32::MAX),
        start: text("start")?,
        end: text("end")?,
        start_in_seconds: opt_u64(args, "start_in_seconds")?,
        duration_seconds: opt_u64(args, "duration_seconds")?,
    })
}

pub(crate) fn reserve_input(config: &Config) -> Value {
    let pool = config.in_pool_slots().saturating_sub(config.drained_workers.len() as u32);
    json!({
        "type": "object",
        "properties": {
            "tenant": { "type": "string", "description": "The tenant to hold capacity for: every request of the tenant may use it (give tenant or job_id, not both)." },
            "job_id": { "type": "string", "description": "The job to hold capacity for: only that job's requests may use it." },
            "workers": { "type": "integer", "minimum": 1, "maximum": pool, "description": format!("Worker slots to hold, 1 to {pool}; each holds {} CPU cores and {} MB of memory, held too.", crate::domain::model::cores(config.worker_cpu_millicores), config.worker_memory_mib) },
            "start": { "type": "string", "description": "When the window opens: RFC 3339 (2026-12-05T09:00:00Z), `now` or relative (+2h). Default now; a start in the past means now." },
            "start_in_seconds": { "type": "integer", "minimum": 0, "description": "The window opens this many seconds from now (instead of start)." },
            "end": { "type": "string", "description": "When the window closes: RFC 3339 or relative (+4h)." },
            "duration_seconds": { "type": "integer", "minimum": 1, "maximum": config.max_reservation_seconds, "description": format!("How long the window lasts (instead of end), at most {} seconds.", config.max_reservation_seconds) },
        },
        "required": ["workers"],
        "additionalProperties": false,
    })
}

fn reservation_out() -> Value {
    json!({
        "reservation_id": { "type": "string", "description": "resv- and 12 hex digits: pass it to cancel_reservation." },
        "tenant": { "type": "string" },
        "job_id": { "type": "string" },
        "workers": { "type": "integer" },
        "cpu_millicores": { "type": "integer" },
        "memory_mib": { "type": "integer" },
        "start": { "type": "string", "description": "When the window opens (RFC 3339, UTC)." },
        "end": { "type": "string", "description": "When it closes." },
        "duration_seconds": { "type": "integer" },
        "state": { "type": "string", "enum": ["in_force", "upcoming", "over"] },
    })
}

pub(crate) fn reserve_output() -> Value {
    let mut properties = reservation_out();
    if let Value::Object(p) = &mut properties {
        p.insert("status".into(), json!({ "type": "string", "enum": ["reserved", "failed", "cancelled"] }));
        p.insert("reason".into(), json!({ "type": "string", "description": "reservation_conflict when it failed." }));
        p.insert("error".into(), json!({ "type": "string", "description": "Why it failed, in words." }));
        p.insert(
            "conflict_at".into(),
            json!({ "type": "string", "description": "The first instant it would not fit." }),
        );
        p.insert("seq".into(), json!({ "type": "integer", "description": "The event that recorded it." }));
    }
    json!({ "type": "object", "properties": properties, "required": ["status", "reservation_id", "seq"] })
}

pub(crate) fn cancel_input() -> Value {
    json!({
        "type": "object",
        "properties": { "reservation_id": { "type": "string", "description": "The reservation to cancel (resv-…), as reserve_resources returned it." } },
        "required": ["reservation_id"],
        "additionalProperties": false,
    })
}

pub(crate) fn list_input() -> Value {
    json!({ "type": "object", "properties": { "at": super::history::at_schema() }, "additionalProperties": false })
}

pub(crate) fn list_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "reservations": { "type": "array", "items": { "type": "object", "properties": reservation_out() } },
            "as_of": { "type": "string" },
            "seq": { "type": "integer" },
        },
        "required": ["reservations", "as_of", "seq"],
    })
}

#[tool_router(router = reservation_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "Reserve worker slots (and their CPU and memory) for a tenant or a job over a future window [start, end). During the window only the holder may allocate from the reserved part; before it, other requests whose lease would reach into the window are granted only if they fit beside it. Give tenant or job_id, workers, and the window as start/end (RFC 3339 or relative such as +2h) or start_in_seconds/duration_seconds. Returns status \"reserved\" with the reservation_id; if the window cannot be honoured beside the allocations whose deadlines reach into it and the other reservations, an error with status \"failed\", reason reservation_conflict and conflict_at (recorded either way). MCP servers are not reserved.",
        annotations(
            title = "Reserve resources",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn reserve_resources(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let req = match reserve_args(&args) {
            Ok(r) => r,
            Err(e) => return tool_error(error_value(&e)),
        };
        let result = self.call(move |l| l.reserve(&req)).await?;
        self.snapshot_if_due();
        match result {
            Ok(report) if !report.is_reserved() => {
                let value = serde_json::to_value(report).map_err(|e| McpError::internal_error(e.to_string(), None))?;
                tool_error(value)
            }
            other => from_ledger(other),
        }
    }

    #[tool(
        description = "Cancel a reservation in force or upcoming: what it held is everyone's again at once (a recorded event). Returns status \"cancelled\" with the reservation as it was. An id that is not in force or upcoming (unknown, cancelled, or its window is over) is an error naming reservation_id.",
        annotations(
            title = "Cancel reservation",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn cancel_reservation(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let id = check_known(&args, &["reservation_id"]).and_then(|()| {
            opt_str(&args, "reservation_id")?
                .map(str::to_string)
                .ok_or_else(|| Error::invalid("reservation_id", "is required, e.g. resv-1a2b3c4d5e6f"))
        });
        let id = match id {
            Ok(id) => id,
            Err(e) => return tool_error(error_value(&e)),
        };
        let result = self.call(move |l| l.cancel_reservation(&id)).await?;
        self.snapshot_if_due();
        from_ledger(result)
    }

    #[tool(
        description = "List the reservations in force or upcoming now (or, with `at`: RFC 3339 or relative such as -15m, as they were then), by start: each with its holder (tenant or job_id), workers, CPU and memory, window (start, end) and state (in_force or upcoming). get_capacity shows what the reservations in force hold now and what their holders leave unused.",
        annotations(
            title = "List reservations",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_reservations(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let at = match check_known(&args, &["at"]).and_then(|()| opt_str(&args, "at").map(|a| a.map(str::to_string))) {
            Ok(at) => at,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(
            self.call(move |l| match at {
                None => l.reservations(),
                Some(at) => l.reservations_at(crate::parse_time("at", &at, l.now_micros())?),
            })
            .await?,
        )
    }
}
