//! The scheduler's contract as tools: `renew_allocation` and `plan_request`, and the
//! `expected_seq` argument every write tool takes. Same conventions as the other tools.

use super::{check_known, error_value, from_ledger, kind_of, opt_str, tool_error, LedgerTools};
use crate::domain::input::json_expected_seq;
use crate::{Config, Error, ResourceRequest};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

/// The `expected_seq` argument's schema (shared by every write tool).
pub(crate) fn expected_seq_schema() -> Value {
    json!({
        "type": "integer",
        "minimum": 0,
        "description": "Optional check-and-set: apply this write only if the ledger's last sequence number is still this one (current_seq from plan_request). Otherwise the result is an error of kind conflict carrying current_seq, and nothing is written.",
    })
}

/// `expected_seq` from a write tool's arguments.
pub(super) fn expected_seq_arg(args: &JsonObject) -> Result<Option<u64>, Error> {
    json_expected_seq(args.get("expected_seq"))
}

fn ttl_arg(args: &JsonObject) -> Result<Option<u64>, Error> {
    match args.get("ttl_seconds") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| Error::invalid("ttl_seconds", format!("{n} is not allowed: use a whole number of seconds"))),
        Some(other) => {
            Err(Error::invalid("ttl_seconds", format!("must be a whole number of seconds, got {}", kind_of(other))))
        }
    }
}

fn renew_args(args: &JsonObject) -> Result<(String, Option<u64>, Option<u64>), Error> {
    check_known(args, &["allocation_id", "ttl_seconds", "expected_seq"])?;
    let Some(id) = opt_str(args, "allocation_id")? else {
        return Err(Error::invalid(
            "allocation_id",
            "is required: the id request_resources returned, e.g. alloc-1a2b3c4d5e6f",
        ));
    };
    crate::AllocationId::parse("allocation_id", id)?;
    Ok((id.to_string(), ttl_arg(args)?, expected_seq_arg(args)?))
}

#[tool_router(router = contract_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "Renew an active allocation's lease: its deadline (expires_at) moves to now + ttl_seconds (default: the allocation's own ttl_seconds), within the pool's TTL limits and never past the max_lifetime_seconds the request set. Returns {allocation_id, job_id, status: \"active\", previous_expires_at, expires_at, ttl_seconds, capped_by_max_lifetime, renewals, seq}. Renew well before expires_at: an allocation that has expired, been released or failed cannot be renewed (error kind not_active, naming its state) — request a new one.",
        annotations(
            title = "Renew allocation",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn renew_allocation(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let (id, ttl_seconds, expected_seq) = match renew_args(&args) {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        let renewed = self
            .call(move |l| match expected_seq {
                Some(seq) => l.if_seq(seq).renew_allocation(&id, ttl_seconds),
                None => l.renew_allocation(&id, ttl_seconds),
            })
            .await?;
        from_ledger(renewed)
    }

    #[tool(
        description = "Ask whether a request would be granted now, without reserving anything: returns {would_grant, current_seq, outcome}, where outcome is exactly what request_resources would return now (the workers and endpoints it would get, or status \"failed\" with the same reason and message). To act on the plan only if nothing changed in between, call request_resources with the same arguments plus expected_seq = current_seq: it then either gets this outcome or fails with kind conflict and reserves nothing.",
        annotations(title = "Plan a request", read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn plan_request(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let req = match ResourceRequest::from_json(&args) {
            Ok(r) => r,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(self.call(move |l| l.plan_request(&req)).await?)
    }
}

/// The input schema of `renew_allocation` under `config`.
pub(crate) fn renew_input(config: &Config) -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": {
                "type": "string",
                "pattern": "^alloc-[0-9a-f]{12}$",
                "description": "The active allocation to renew: the allocation_id request_resources returned.",
            },
            "ttl_seconds": {
                "type": "integer",
                "minimum": config.min_ttl_seconds,
                "maximum": config.max_ttl_seconds,
                "description": format!("The new lifetime counted from now, {} to {} seconds (default: the allocation's own ttl_seconds).", config.min_ttl_seconds, config.max_ttl_seconds),
            },
            "expected_seq": expected_seq_schema(),
        },
        "required": ["allocation_id"],
        "additionalProperties": false,
    })
}

/// The input schema of `plan_request`: `request_resources`' without `expected_seq`.
pub(crate) fn plan_input(config: &Config) -> Value {
    let mut schema = crate::mcp::schemas::request_input(config);
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.remove("expected_seq");
    }
    schema
}

/// The success shape of `renew_allocation`.
pub(crate) fn renew_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": { "type": "string", "pattern": "^alloc-[0-9a-f]{12}$" },
            "job_id": { "type": "string" },
            "status": { "const": "active" },
            "previous_expires_at": { "type": "string", "description": "The deadline before this renewal (RFC 3339, UTC)." },
            "expires_at": { "type": "string", "description": "The new deadline (RFC 3339, UTC)." },
            "ttl_seconds": { "type": "integer", "minimum": 0 },
            "capped_by_max_lifetime": { "type": "boolean", "description": "The deadline was cut short by max_lifetime_seconds." },
            "renewals": { "type": "integer", "minimum": 1, "description": "Renewals so far, this one included." },
            "seq": { "type": "integer", "minimum": 1, "description": "Sequence number of the renewed event." },
        },
        "required": ["allocation_id", "status", "previous_expires_at", "expires_at", "ttl_seconds", "seq"],
    })
}

/// The success shape of `plan_request`: the outcome is one of request_resources' shapes.
pub(crate) fn plan_output(granted: Value, failed: Value) -> Value {
    json!({
        "type": "object",
        "properties": {
            "would_grant": { "type": "boolean" },
            "current_seq": { "type": "integer", "minimum": 0, "description": "Pass as expected_seq to act only if nothing changed." },
            "outcome": { "anyOf": [granted, failed] },
        },
        "required": ["would_grant", "current_seq", "outcome"],
    })
}
