//! The operator's writes as tools, so that the CLI's `snapshot` and `config apply` reach a
//! running server like every other write: `write_snapshot` (a snapshot now; the server also
//! writes them as they come due) and `apply_config` (a recorded config change).

use super::{check_known, error_value, from_ledger, tool_error, LedgerTools};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

pub(crate) fn write_snapshot_input() -> Value {
    json!({ "type": "object", "properties": {}, "additionalProperties": false })
}

pub(crate) fn write_snapshot_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "seq": { "type": "integer", "description": "The sequence number of the last event the snapshot holds." },
            "path": { "type": "string", "description": "The file it was written to, on the server's machine." },
        },
        "required": ["seq", "path"],
    })
}

#[tool_router(router = admin_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "Write a snapshot of the ledger's state now (after the durable log; old snapshots beyond the kept ones are pruned). Snapshots are derived data: the server also writes them as they come due, so this is for operators (before a backup, after a large import). Returns seq (the last event it holds) and path.",
        annotations(
            title = "Write snapshot",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn write_snapshot(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        if let Err(e) = check_known(&args, &[]) {
            return tool_error(error_value(&e));
        }
        from_ledger(self.call(crate::Ledger::snapshot).await?)
    }
}

pub(crate) fn apply_config_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "config": { "type": "object", "description": "The whole config to record, as a config file holds it (fields left out take their defaults; `config show` prints the one in force)." },
            "expected_seq": super::contract::expected_seq_schema(),
            "dry_run": { "type": "boolean", "description": "Show the change and whether it would be accepted; write nothing." },
        },
        "required": ["config"],
        "additionalProperties": false,
    })
}

pub(crate) fn apply_config_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "changes": { "type": "array", "items": { "type": "object", "properties": {
                "field": { "type": "string" }, "from": {}, "to": {} } } },
            "applied": { "type": "boolean" },
            "dry_run": { "type": "boolean" },
            "seq": { "type": "integer", "description": "The config_changed event, when applied." },
        },
        "required": ["changes", "applied", "dry_run"],
    })
}

/// The config an `apply_config` call carries, parsed as a config file is.
fn config_arg(args: &JsonObject) -> Result<crate::Config, crate::Error> {
    match args.get("config") {
        Some(v @ Value::Object(_)) => crate::Config::from_json(&v.to_string()),
        Some(other) => Err(crate::Error::invalid(
            "config",
            format!("must be an object of config fields, got {}", super::kind_of(other)),
        )),
        None => Err(crate::Error::invalid("config", "is required: the whole config to record (see `config show`)")),
    }
}

#[tool_router(router = config_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "Record a new config (a config_changed event), as `config apply FILE` does: config is the whole config (fields left out take their defaults). Returns the fields that change; a config equal to the recorded one writes nothing; one that would take away what an active allocation holds is refused, naming the field and the allocation. Optional expected_seq (apply only if the ledger is still at it) and dry_run (show, write nothing).",
        annotations(
            title = "Apply config",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn apply_config(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = check_known(&args, &["config", "expected_seq", "dry_run"]).and_then(|()| {
            let dry_run = match args.get("dry_run") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(crate::Error::invalid(
                        "dry_run",
                        format!("must be true or false, got {}", super::kind_of(other)),
                    ))
                }
            };
            Ok((config_arg(&args)?, super::contract::expected_seq_arg(&args)?, dry_run))
        });
        let (config, expected_seq, dry_run) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(self.call(move |l| l.apply_config(config, expected_seq, dry_run)).await?)
    }
}
