//! The `list_allocations` tool: filtered, by pages of at most `limit` (default
//! [`PAGE_DEFAULT_LIMIT`], at most [`PAGE_MAX_LIMIT`]) with an opaque `cursor` (see
//! `docs/queries.md`, "Pages"). Same conventions as the other tools: raw JSON arguments checked
//! here, each error naming the field.

use super::{check_known, error_value, from_ledger, kind_of, opt_str, tool_error, LedgerTools};
use crate::domain::model::{AllocationState, Priority};
use crate::{Error, ListFilter, PAGE_DEFAULT_LIMIT, PAGE_MAX_LIMIT};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

/// A page size argument: a whole number from 1 to [`PAGE_MAX_LIMIT`], [`PAGE_DEFAULT_LIMIT`]
/// when absent.
pub(crate) fn page_limit_arg(args: &JsonObject) -> Result<usize, Error> {
    let refuse = |got: String| {
        Error::invalid("limit", format!("{got} is not allowed: use a whole number from 1 to {PAGE_MAX_LIMIT}"))
    };
    match args.get("limit") {
        None | Some(Value::Null) => Ok(PAGE_DEFAULT_LIMIT),
        Some(Value::Number(n)) => match n.as_u64().and_then(|l| usize::try_from(l).ok()) {
            Some(l) if (1..=PAGE_MAX_LIMIT).contains(&l) => Ok(l),
            _ => Err(refuse(n.to_string())),
        },
        Some(other) => Err(refuse(kind_of(other).to_string())),
    }
}

fn filter_arg(args: &JsonObject) -> Result<ListFilter, Error> {
    let text = |field: &str| opt_str(args, field).map(|v| v.map(str::to_string));
    let f = ListFilter {
        state: opt_str(args, "state")?.map(|s| AllocationState::parse("state", s)).transpose()?,
        job_id: text("job_id")?,
        tenant: text("tenant")?,
        priority: opt_str(args, "priority")?.map(|p| Priority::parse("priority", p)).transpose()?,
        since: text("since")?,
        until: text("until")?,
        at: text("at")?,
    };
    f.validate()?;
    Ok(f)
}

const FIELDS: &[&str] = &["state", "job_id", "tenant", "priority", "since", "until", "at", "limit", "cursor"];

#[tool_router(router = list_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "List allocations as summaries (allocation_id, job_id, state, priority, workers, age_seconds, is_expired, created_at), oldest first (by created_at, then allocation_id), optionally only those in one state, of one job, of one tenant, of one priority, created in [since, until). One page at a time: at most `limit` (default 1000, at most 10000); when more follow, next_cursor is a string to pass as `cursor` (with the same filters) for the next page, and null on the last page. Each allocation appears on exactly one page even while new ones are written. With `at` (RFC 3339 or relative such as -1h) it lists them as they were at that instant: states then, allocations granted later absent. The result is {allocations: [...], count, next_cursor}.",
        annotations(
            title = "List allocations",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_allocations(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = check_known(&args, FIELDS).and_then(|()| {
            let cursor = opt_str(&args, "cursor")?.map(str::to_string);
            Ok((filter_arg(&args)?, page_limit_arg(&args)?, cursor))
        });
        let (filter, limit, cursor) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(self.call(move |l| l.list_page(&filter, Some(limit), cursor.as_deref())).await?)
    }
}

/// `list_allocations`' input schema.
pub(crate) fn list_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "state": {
                "type": "string",
                "enum": ["active", "released", "expired", "failed", "pending", "cancelled", "preempting", "preempted"],
                "description": "Only allocations in this state: active, released, expired, failed (a request that could not be granted), pending (waiting in the queue, in queue order), cancelled (a wait cancelled), preempting (in its grace before preemption) or preempted. Omit for all states.",
            },
            "job_id": { "type": "string", "description": "Only allocations of this job. Omit for all jobs." },
            "tenant": { "type": "string", "description": "Only allocations counted against this tenant's quota. Not with `at`." },
            "priority": {
                "type": "string",
                "enum": ["low", "normal", "high", "critical"],
                "description": "Only allocations requested at this priority.",
            },
            "since": { "type": "string", "description": "Only allocations created at or after this instant: RFC 3339 or relative to now (-15m, -2h, -1d)." },
            "until": { "type": "string", "description": "Only allocations created before this instant, same forms." },
            "at": super::history::at_schema(),
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": PAGE_MAX_LIMIT,
                "default": PAGE_DEFAULT_LIMIT,
                "description": format!("At most this many allocations on this page (1 to {PAGE_MAX_LIMIT}, default {PAGE_DEFAULT_LIMIT})."),
            },
            "cursor": {
                "type": "string",
                "description": "The next_cursor of the previous page, as given; pass the same filters. Omit for the first page.",
            },
        },
        "additionalProperties": false,
    })
}
