//! `write_snapshot`: a snapshot written now by the server that holds the ledger, so that an
//! operator's `snapshot` reaches a running server like every other write (the server also
//! writes them as they come due).

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
