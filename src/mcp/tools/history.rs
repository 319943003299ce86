//! The history tools: `allocation_history` and `usage_report`, and the optional `at` of
//! `get_capacity` and `list_allocations` (see `docs/queries.md`). Same conventions as the other
//! tools: raw JSON arguments checked here, each error naming the field.

use super::{check_known, error_value, from_ledger, kind_of, ok, opt_str, tool_error, LedgerTools};
use crate::domain::clock::{parse_time, Micros};
use crate::history::GroupBy;
use crate::{Error, Ledger};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

/// Default and largest number of events `allocation_history` returns.
pub(crate) const HISTORY_DEFAULT_LIMIT: u64 = 500;
pub(crate) const HISTORY_MAX_LIMIT: u64 = 10_000;

/// An optional instant argument (RFC 3339 or relative to now), parsed against the ledger's clock.
pub(super) fn parse_at(ledger: &Ledger, field: &str, text: Option<&str>) -> crate::Result<Option<Micros>> {
    text.map(|t| parse_time(field, t, ledger.now_micros())).transpose()
}

fn limit_arg(args: &JsonObject) -> Result<u64, Error> {
    match args.get("limit") {
        None | Some(Value::Null) => Ok(HISTORY_DEFAULT_LIMIT),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(l) if (1..=HISTORY_MAX_LIMIT).contains(&l) => Ok(l),
            _ => Err(Error::invalid(
                "limit",
                format!("{n} is not allowed: use a whole number from 1 to {HISTORY_MAX_LIMIT}"),
            )),
        },
        Some(other) => Err(Error::invalid(
            "limit",
            format!("must be a whole number from 1 to {HISTORY_MAX_LIMIT}, got {}", kind_of(other)),
        )),
    }
}

enum Subject {
    Allocation(String),
    Job(String),
}

fn subject_arg(args: &JsonObject) -> Result<Subject, Error> {
    match (opt_str(args, "allocation_id")?, opt_str(args, "job_id")?) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "job_id",
            "give either allocation_id (one allocation) or job_id (every allocation of a job), not both",
        )),
        (Some(id), None) => {
            crate::AllocationId::parse("allocation_id", id)?;
            Ok(Subject::Allocation(id.to_string()))
        }
        (None, Some(job)) => {
            crate::domain::input::validate_job_id("job_id", job)?;
            Ok(Subject::Job(job.to_string()))
        }
        (None, None) => Err(Error::invalid(
            "allocation_id",
            "is required, or job_id: the allocation (alloc-1a2b3c4d5e6f) or the job whose events to show",
        )),
    }
}

#[tool_router(router = history_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "The audit trail of one allocation (allocation_id) or of every allocation of a job (job_id): its events in order — granted, rejected, released, expired — each with seq, at (RFC 3339 timestamp) and the event's fields (workers, MCP servers, deadline, rejection reason). Returns {allocation_id?, job_id, allocation_ids, events, count, truncated, next_cursor}; for long histories only the most recent `limit` events (default 500, at most 10000) are returned, truncated is true and next_cursor (null when there is nothing older) is a string to pass as `cursor` (with the same allocation_id or job_id) for the page of older events before them. An unknown allocation_id is an error; a job the ledger never saw has no events.",
        annotations(
            title = "Allocation history",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn allocation_history(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = check_known(&args, &["allocation_id", "job_id", "limit", "cursor"])
            .and_then(|()| Ok((subject_arg(&args)?, limit_arg(&args)?, opt_str(&args, "cursor")?.map(str::to_string))));
        let (subject, limit, cursor) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        let result = self
            .call(move |l| {
                let (h, key) = match &subject {
                    Subject::Allocation(id) => (l.allocation_history(id)?, format!("allocation:{id}")),
                    Subject::Job(job) => (l.job_history(job)?, format!("job:{job}")),
                };
                // `limit` is at most HISTORY_MAX_LIMIT.
                crate::page_history(h, &key, usize::try_from(limit).unwrap_or(usize::MAX), cursor.as_deref())
            })
            .await?;
        match result {
            Ok((h, next)) => {
                let mut v = serde_json::to_value(&h).map_err(|e| McpError::internal_error(e.to_string(), None))?;
                v["count"] = h.events.len().into();
                v["truncated"] = next.is_some().into();
                v["next_cursor"] = next.into();
                ok(v)
            }
            Err(e) => tool_error(error_value(&e)),
        }
    }

    #[tool(
        description = "Usage over a time window [since, until), grouped by job (by = \"job\", the default) or by a metadata key (by = \"metadata.tenant\", say; allocations without the key form the group \"(none)\"). Per group: cpu_seconds (core-seconds), memory_mib_seconds, worker_seconds — each allocation's holding interval clipped to the window — and counts: allocations held, granted, released, expired, rejected with rejections by reason. mcp_servers lists what shared MCP servers with a cost used; total adds everything up. since and until are RFC 3339 (2026-11-27T03:12:00Z) or relative to now (-15m, -2h, -1d); until defaults to now.",
        annotations(title = "Usage report", read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn usage_report(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = check_known(&args, &["since", "until", "by"]).and_then(|()| {
            let since = opt_str(&args, "since")?
                .ok_or_else(|| {
                    Error::invalid("since", "is required: the start of the window, e.g. -1d or 2026-11-27T00:00:00Z")
                })?
                .to_string();
            let until = opt_str(&args, "until")?.map(str::to_string);
            let by = GroupBy::parse("by", opt_str(&args, "by")?.unwrap_or("job"))?;
            Ok((since, until, by))
        });
        let (since, until, by) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(
            self.call(move |l| {
                // `parse_at` answers `Some` for any text it accepts.
                let since = parse_at(l, "since", Some(&since))?
                    .ok_or_else(|| Error::invalid("since", "is required: the start of the window"))?;
                let until = parse_at(l, "until", until.as_deref())?.unwrap_or_else(|| l.now_micros());
                l.usage(since, until, &by)
            })
            .await?,
        )
    }
}

/// The `at` argument of `get_capacity` and `list_allocations`.
pub(crate) fn at_schema() -> Value {
    json!({
        "type": "string",
        "description": "Answer as of this instant instead of now: RFC 3339 (e.g. 2026-11-27T03:12:00Z) or relative to now (-15m, -2h, -1d). An instant before the ledger began is an error that says when it began; a future instant answers with the current state. Omit for now.",
    })
}

pub(crate) fn history_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": {
                "type": "string",
                "pattern": "^alloc-[0-9a-f]{12}$",
                "description": "The allocation whose events to show, e.g. alloc-1a2b3c4d5e6f. Give this or job_id.",
            },
            "job_id": {
                "type": "string",
                "minLength": 1,
                "description": "The job whose allocations' events to show (granted and rejected requests alike). Give this or allocation_id.",
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": HISTORY_MAX_LIMIT,
                "default": HISTORY_DEFAULT_LIMIT,
                "description": format!("At most this many events, the most recent ones (1 to {HISTORY_MAX_LIMIT}, default {HISTORY_DEFAULT_LIMIT})."),
            },
            "cursor": {
                "type": "string",
                "description": "The next_cursor of the previous page, as given (with the same allocation_id or job_id): the events before that page. Omit for the most recent events.",
            },
        },
        "additionalProperties": false,
    })
}

pub(crate) fn usage_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "since": {
                "type": "string",
                "description": "Start of the window (inclusive): RFC 3339 (e.g. 2026-11-27T00:00:00Z) or relative to now (-15m, -2h, -1d). A start before the ledger began is moved to its first event.",
            },
            "until": {
                "type": "string",
                "description": "End of the window (exclusive), same forms; default now. A future end is moved to now.",
            },
            "by": {
                "type": "string",
                "pattern": "^(job|tenant|metadata\\..+)$",
                "default": "job",
                "description": "Grouping: \"job\" (default), \"tenant\" (the quota tenant recorded with each grant) or \"metadata.KEY\" to group by the value of that key in the request's metadata, e.g. metadata.team.",
            },
        },
        "required": ["since"],
        "additionalProperties": false,
    })
}

fn num(description: &str) -> Value {
    json!({ "type": "number", "minimum": 0, "description": description })
}

fn int(description: &str) -> Value {
    json!({ "type": "integer", "minimum": 0, "description": description })
}

fn amounts() -> serde_json::Map<String, Value> {
    let v = json!({
        "cpu_seconds": num("CPU core-seconds held in the window."),
        "memory_mib_seconds": num("Memory MiB-seconds held in the window."),
        "worker_seconds": num("Worker-seconds held in the window."),
        "allocations": int("Allocations that held resources at some point in the window."),
        "granted": int("Allocations granted in the window."),
        "released": int("Allocations released in the window."),
        "expired": int("Allocations whose deadline passed in the window."),
        "rejected": int("Requests rejected in the window."),
        "rejections": {
            "type": "object",
            "additionalProperties": { "type": "integer" },
            "description": "Rejections by reason: insufficient_workers, insufficient_cpu, insufficient_memory.",
        },
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

pub(crate) fn usage_output() -> Value {
    let mut group = amounts();
    group.insert("group".into(), json!({ "type": "string", "description": "The job id, or the metadata value (\"(none)\" when the key is missing)." }));
    json!({
        "type": "object",
        "properties": {
            "since": { "type": "string", "description": "Start of the window covered (RFC 3339, UTC)." },
            "until": { "type": "string", "description": "End of the window covered (RFC 3339, UTC)." },
            "since_us": { "type": "integer" },
            "until_us": { "type": "integer" },
            "window_seconds": num("Length of the window."),
            "group_by": { "type": "string" },
            "groups": { "type": "array", "items": { "type": "object", "properties": group, "required": ["group", "cpu_seconds", "memory_mib_seconds", "worker_seconds", "allocations"] } },
            "mcp_servers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": { "type": "string" },
                        "running_seconds": num("How long it ran in the window."),
                        "cpu_seconds": num("CPU core-seconds it cost."),
                        "memory_mib_seconds": num("Memory MiB-seconds it cost."),
                    },
                    "required": ["name", "running_seconds", "cpu_seconds", "memory_mib_seconds"],
                },
                "description": "Shared MCP servers with a cost, charged once while running.",
            },
            "total": { "type": "object", "properties": amounts(), "description": "Every group plus the MCP servers." },
        },
        "required": ["since", "until", "group_by", "groups", "mcp_servers", "total"],
    })
}

pub(crate) fn history_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": { "type": "string", "pattern": "^alloc-[0-9a-f]{12}$" },
            "job_id": { "type": "string" },
            "allocation_ids": { "type": "array", "items": { "type": "string" }, "description": "The allocations the events are about, oldest first." },
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "seq": int("Sequence number of the event in the ledger."),
                        "at": { "type": "string", "description": "When it was recorded (RFC 3339, UTC)." },
                        "type": { "type": "string", "enum": ["granted", "rejected", "released", "expired"] },
                        "ts_us": { "type": "integer" },
                        "allocation_id": { "type": "string" },
                    },
                    "required": ["seq", "at", "type"],
                },
            },
            "count": int("Events returned."),
            "truncated": { "type": "boolean", "description": "Older events were left out (see limit)." },
            "next_cursor": { "type": ["string", "null"], "description": "Pass as cursor for the older events; null when there are none." },
        },
        "required": ["job_id", "allocation_ids", "events", "count", "truncated"],
    })
}
