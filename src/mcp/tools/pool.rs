//! The pool tools: `get_pool` (each worker slot's state, the MCP catalog) and `change_pool`
//! (one tool, an `action` field: add_workers, drain, undrain, remove_worker, mcp_set,
//! mcp_remove). Each change is a recorded `config_changed` event; invalid input writes nothing
//! and names the field and its allowed values.

use super::contract::expected_seq_arg;
use super::{check_known, error_value, from_ledger, kind_of, opt_str, tool_error, LedgerTools};
use crate::Error;
use crate::{parse_worker, PoolChange, POOL_ACTIONS};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

/// The arguments each action takes, besides `action`, `expected_seq` and `dry_run`.
fn action_fields(action: &str) -> &'static [&'static str] {
    match action {
        "add_workers" => &["count", "endpoints"],
        "drain" | "undrain" | "remove_worker" => &["worker"],
        "mcp_set" => &["name", "endpoint", "cpu_millicores", "memory_mib"],
        _ => &["name"],
    }
}

fn opt_u64(args: &JsonObject, field: &str) -> Result<Option<u64>, Error> {
    match args.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_u64().map(Some).ok_or_else(|| Error::invalid(field, format!("{n} is not allowed: use a whole number")))
        }
        Some(other) => Err(Error::invalid(field, format!("must be a whole number, got {}", kind_of(other)))),
    }
}

fn required_str(args: &JsonObject, field: &str, example: &str) -> Result<String, Error> {
    opt_str(args, field)?
        .map(str::to_string)
        .ok_or_else(|| Error::invalid(field, format!("is required, e.g. {example}")))
}

fn worker_arg(args: &JsonObject) -> Result<u32, Error> {
    match args.get("worker") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::invalid("worker", format!("{n} is not a slot number"))),
        _ => parse_worker("worker", &required_str(args, "worker", "\"worker-07\" or 7")?),
    }
}

fn endpoints_arg(args: &JsonObject) -> Result<Vec<String>, Error> {
    match args.get("endpoints") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| Error::invalid("endpoints", "must be an array of URLs"))
            })
            .collect(),
        Some(other) => Err(Error::invalid("endpoints", format!("must be an array of URLs, got {}", kind_of(other)))),
    }
}

/// The change an agent asked for, checked: unknown fields, the action's required fields.
fn change_args(args: &JsonObject) -> Result<(PoolChange, Option<u64>, bool), Error> {
    let allowed = POOL_ACTIONS.join(", ");
    let Some(action) = opt_str(args, "action")? else {
        return Err(Error::invalid("action", format!("is required; allowed values: {allowed}")));
    };
    if !POOL_ACTIONS.contains(&action) {
        return Err(Error::invalid("action", format!("{action:?} is not an action; allowed values: {allowed}")));
    }
    let mut known = vec!["action", "expected_seq", "dry_run"];
    known.extend_from_slice(action_fields(action));
    check_known(args, &known)?;
    let dry_run = match args.get("dry_run") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(Error::invalid("dry_run", format!("must be true or false, got {}", kind_of(other)))),
    };
    let change = match action {
        "add_workers" => {
            let count = opt_u64(args, "count")?
                .ok_or_else(|| Error::invalid("count", "is required: how many workers to add, e.g. 2"))?;
            let count = u32::try_from(count).map_err(|_| Error::invalid("count", format!("{count} is too many")))?;
            PoolChange::AddWorkers { count, endpoints: endpoints_arg(args)? }
        }
        "drain" => PoolChange::Drain { slot: worker_arg(args)? },
        "undrain" => PoolChange::Undrain { slot: worker_arg(args)? },
        "remove_worker" => PoolChange::RemoveWorker { slot: worker_arg(args)? },
        "mcp_set" => PoolChange::McpSet {
            name: required_str(args, "name", "\"github\"")?,
            endpoint: required_str(args, "endpoint", "\"http://mcp-github:9000\"")?,
            cpu_millicores: opt_u64(args, "cpu_millicores")?,
            memory_mib: opt_u64(args, "memory_mib")?,
        },
        _ => PoolChange::McpRemove { name: required_str(args, "name", "\"github\"")? },
    };
    Ok((change, expected_seq_arg(args)?, dry_run))
}

#[tool_router(router = pool_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "Show the pool's worker slots, each with its state (free, held, draining: drained but still held, drained: idle and out of the pool, removed) and holder, the MCP catalog (fixed endpoints and costs), the capacity now, and seq (pass it as expected_seq to change_pool).",
        annotations(title = "Get pool", read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn get_pool(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        if let Err(e) = check_known(&args, &[]) {
            return tool_error(error_value(&e));
        }
        from_ledger(self.call(crate::Ledger::pool).await?)
    }

    #[tool(
        description = "Change the pool (a recorded config change; the result lists the change in words, the config fields changed and the new seq). action: add_workers (count, optional endpoints: one per new worker iff the config lists worker endpoints; totals grow by count x the worker size), drain (worker: \"worker-07\" or 7; no new grants on it, its holder keeps it, then it leaves the pool), undrain (worker), remove_worker (worker, which must be drained and idle; totals shrink by one worker size; its id is never reused), mcp_set (name, endpoint, optional cpu_millicores, memory_mib), mcp_remove (name; refused while an active allocation uses it). Optional expected_seq (apply only if the ledger is still at it) and dry_run (show, write nothing).",
        annotations(
            title = "Change pool",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn change_pool(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let (change, expected_seq, dry_run) = match change_args(&args) {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        let result = self.call(move |l| l.change_pool(&change, expected_seq, dry_run)).await?;
        self.snapshot_if_due();
        from_ledger(result)
    }
}

pub(crate) fn get_pool_input() -> Value {
    json!({ "type": "object", "properties": {}, "additionalProperties": false })
}

pub(crate) fn change_pool_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "action": { "type": "string", "enum": POOL_ACTIONS, "description": "What to change." },
            "count": { "type": "integer", "minimum": 1, "description": "add_workers: how many workers." },
            "endpoints": { "type": "array", "items": { "type": "string" }, "description": "add_workers: one endpoint per new worker, only when the config lists worker endpoints." },
            "worker": { "type": ["string", "integer"], "description": "drain, undrain, remove_worker: \"worker-07\" or 7." },
            "name": { "type": "string", "description": "mcp_set, mcp_remove: the MCP server's name." },
            "endpoint": { "type": "string", "description": "mcp_set: the server's endpoint." },
            "cpu_millicores": { "type": "integer", "minimum": 0, "description": "mcp_set: CPU charged while it runs (kept when omitted; 0 for a new entry)." },
            "memory_mib": { "type": "integer", "minimum": 0, "description": "mcp_set: memory charged while it runs (kept when omitted; 0 for a new entry)." },
            "expected_seq": { "type": "integer", "minimum": 0, "description": "Apply only if the ledger's last sequence number is still this one." },
            "dry_run": { "type": "boolean", "default": false, "description": "Show the change and whether it would be accepted; write nothing." },
        },
        "required": ["action"],
        "additionalProperties": false,
    })
}

pub(crate) fn get_pool_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "workers": { "type": "array", "items": { "type": "object", "properties": {
                "worker_id": { "type": "string" }, "slot": { "type": "integer" },
                "state": { "type": "string", "enum": ["free", "held", "draining", "drained", "removed"] },
                "allocation_id": { "type": "string" }, "endpoint": { "type": "string" } } } },
            "mcp_catalog": { "type": "object" },
            "worker_cpu_millicores": { "type": "integer" },
            "worker_memory_mib": { "type": "integer" },
            "capacity": { "type": "object" },
            "seq": { "type": "integer" },
        },
        "required": ["workers", "mcp_catalog", "capacity", "seq"],
    })
}

pub(crate) fn change_pool_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "action": { "type": "string" },
            "summary": { "type": "array", "items": { "type": "string" }, "description": "The change in words, e.g. \"drained worker-03\"." },
            "changes": { "type": "array", "items": { "type": "object", "properties": { "field": { "type": "string" }, "from": {}, "to": {} } } },
            "applied": { "type": "boolean" },
            "dry_run": { "type": "boolean" },
            "seq": { "type": "integer", "description": "The ledger's last sequence number after the change (the change's event when applied)." },
        },
        "required": ["action", "summary", "changes", "applied", "dry_run", "seq"],
    })
}
