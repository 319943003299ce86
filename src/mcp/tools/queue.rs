//! The pending queue over MCP: `request_resources` with `wait: true` holds the call open until
//! the request is granted, times out in the queue or is cancelled (awaiting the library's
//! [`GrantWait`](crate::GrantWait) on the runtime: no polling, no blocked thread), and
//! `cancel_request` withdraws a waiting request.

use super::{allocation_id_arg, error_value, from_ledger, ok, tool_error, LedgerTools};
use crate::{Admission, Error, RequestOutcome, ResourceRequest};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};
use std::time::Duration;

/// Beyond the request's own queue timeout, how long the call stays open for the timer to
/// record the timeout (the server's expiry loop writes it).
const WAIT_SLACK: Duration = Duration::from_secs(10);

/// `request_resources`' `wait` argument.
pub(crate) fn wait_schema(config: &crate::Config) -> Value {
    json!({
        "type": "boolean",
        "description": format!("If the pool cannot hold the request now, wait in the fair queue instead of failing: the call returns when it is granted, cancelled (cancel_request) or after queue_timeout_seconds (then an error with reason queue_timeout). Priority first, FIFO within a priority; a waiting request's priority rises one level every {} s. A request that could never fit is still refused at once.", config.queue.aging_seconds),
    })
}

/// `request_resources`' `queue_timeout_seconds` argument.
pub(crate) fn queue_timeout_schema(config: &crate::Config) -> Value {
    json!({
        "type": "integer",
        "minimum": 1,
        "maximum": config.queue.max_timeout_seconds,
        "description": format!("With wait: the longest wait, in seconds (default {}).", config.queue.default_timeout_seconds),
    })
}

pub(crate) fn cancel_request_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": {
                "type": "string",
                "pattern": "^alloc-[0-9a-f]{12}$",
                "description": "The waiting request to withdraw: the allocation_id of a pending request_resources (wait: true).",
            },
        },
        "required": ["allocation_id"],
        "additionalProperties": false,
    })
}

pub(crate) fn cancel_request_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": { "type": "string" },
            "status": { "const": "cancelled" },
            "job_id": { "type": "string" },
            "waited_seconds": { "type": "number", "description": "How long it waited." },
            "seq": { "type": "integer", "description": "The cancelled event." },
        },
        "required": ["allocation_id", "status", "job_id", "waited_seconds", "seq"],
    })
}

/// The `pending` answer of `request_resources` (the wait was cut short by the server).
pub(crate) fn pending_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": { "type": "string" },
            "status": { "const": "pending" },
            "job_id": { "type": "string" },
            "priority": { "type": "string" },
            "queue_position": { "type": "integer", "description": "Place in the queue (1 = next)." },
            "waiting_reason": { "type": "string", "description": "Why it waits." },
            "created_at": { "type": "string" },
            "timeout_at": { "type": "string", "description": "When it is rejected with reason queue_timeout unless granted first." },
            "seq": { "type": "integer" },
            "replayed": { "type": "boolean", "description": "true: a retry (same idempotency_key) of the request already waiting; nothing was written." },
        },
        "required": ["allocation_id", "status", "queue_position", "waiting_reason"],
    })
}

impl LedgerTools {
    /// `request_resources` with `wait: true`: answers once decided. A grant is the usual grant;
    /// a queue timeout or a cancel is an error result with status `failed` / `cancelled` and
    /// reason `queue_timeout` / `cancelled`.
    pub(super) async fn request_waiting(&self, req: ResourceRequest) -> Result<CallToolResult, McpError> {
        let admitted = self.ledger.request_or_queue_async(&req).await;
        self.snapshot_if_due();
        let pending = match admitted {
            Ok(Admission::Decided(o)) => return outcome_result(o),
            Ok(Admission::Pending(p)) => p,
            // A retry whose allocation left memory: the log has it (a blocking read).
            Err(Error::NotFound(_)) if req.idempotency_key.is_some() => {
                return match self.call(move |l| l.request_resources(&req)).await? {
                    Ok(o) => outcome_result(o),
                    Err(e) => tool_error(error_value(&e)),
                };
            }
            Err(e) => return tool_error(error_value(&e)),
        };
        let timeout_us = (pending.timeout_at - pending.created_at).num_microseconds().unwrap_or(i64::MAX);
        let cap = Duration::from_micros(u64::try_from(timeout_us).unwrap_or(u64::MAX)).saturating_add(WAIT_SLACK);
        let waiting = self.ledger.wait_for_grant(&pending.allocation_id.to_string());
        match tokio::time::timeout(cap, waiting).await {
            Ok(Ok(o)) => outcome_result(o),
            Ok(Err(e)) => tool_error(error_value(&e)),
            // The timer did not record the timeout in time (a stopped clock, say): still pending.
            Err(_) => ok(pending),
        }
    }
}

fn outcome_result(o: RequestOutcome) -> Result<CallToolResult, McpError> {
    match o {
        RequestOutcome::Granted(g) => ok(g),
        RequestOutcome::Failed(f) => {
            let value = serde_json::to_value(f).map_err(|e| McpError::internal_error(e.to_string(), None))?;
            tool_error(value)
        }
    }
}

#[tool_router(router = queue_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "Withdraw a request that waits in the queue (one made with request_resources wait: true, status \"pending\"). Returns status \"cancelled\" with waited_seconds; the waiting request_resources call returns with status \"cancelled\". Only a pending request can be cancelled: an active allocation is released with release_resources instead (an error names its state).",
        annotations(
            title = "Cancel a waiting request",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn cancel_request(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let id = match allocation_id_arg(&args) {
            Ok(id) => id,
            Err(e) => return tool_error(error_value(&e)),
        };
        let r = self.ledger.cancel_request_async(&id).await;
        self.snapshot_if_due();
        from_ledger(r)
    }
}
