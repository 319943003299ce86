//! The `what_if` tool: the recorded demand of a window re-decided under another config, in
//! memory (see `docs/queries.md`, "What-if"). Same conventions as the other tools: raw JSON
//! arguments checked here, each error naming the field.

use super::history::parse_at;
use super::{check_known, error_value, from_ledger, opt_str, tool_error, LedgerTools};
use crate::whatif::{Hold, WhatIfOptions};
use crate::Error;
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::{tool, tool_router, ErrorData as McpError};
use serde_json::{json, Value};

fn config_arg(args: &JsonObject) -> Result<Option<JsonObject>, Error> {
    match args.get("config") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(_) => {
            Err(Error::invalid("config", "must be an object of config fields to change, e.g. {\"worker_slots\": 12}"))
        }
    }
}

#[tool_router(router = whatif_router, vis = "pub(crate)")]
impl LedgerTools {
    #[tool(
        description = "What-if for capacity planning: re-decides the recorded requests of a window [since, until) with the ledger's own decision code against another config, in memory (nothing is written), and reports reality and the what-if side by side: grants, rejections by reason, peak and mean utilisation of workers, CPU and memory, and the jobs and tenants (metadata.tenant) whose outcomes differ. config is an object of config fields to change over the recorded config (e.g. {\"worker_slots\": 12, \"total_cpu_millicores\": 24000}); omit it to re-run the recorded config, which must reproduce every decision (reproduced: true). Requests granted in reality are released after the same holding time; ones rejected in reality that the what-if grants are held per hold: \"ttl\" (default), \"median-of-job\" or a duration such as \"15m\". since and until are RFC 3339 or relative to now (-15m, -2h, -1d); defaults: the ledger's start and now.",
        annotations(title = "What-if", read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn what_if(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = check_known(&args, &["config", "since", "until", "hold"]).and_then(|()| {
            let config = config_arg(&args)?;
            let since = opt_str(&args, "since")?.map(str::to_string);
            let until = opt_str(&args, "until")?.map(str::to_string);
            let hold = Hold::parse("hold", opt_str(&args, "hold")?.unwrap_or("ttl"))?;
            Ok((config, since, until, hold))
        });
        let (config, since, until, hold) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(
            self.call(move |l| {
                let since = parse_at(l, "since", since.as_deref())?;
                let until = parse_at(l, "until", until.as_deref())?;
                l.what_if(&WhatIfOptions { config, since, until, hold })
            })
            .await?,
        )
    }
}

pub(crate) fn whatif_input() -> Value {
    json!({
        "type": "object",
        "properties": {
            "config": {
                "type": "object",
                "description": "Config fields to change over the recorded config, e.g. {\"worker_slots\": 12, \"total_cpu_millicores\": 24000, \"total_memory_mib\": 49152}. Omit to re-run the recorded config (a determinism check). An alternative config stays in force for the whole window: recorded config changes in it are not applied (config_changes_ignored counts them).",
            },
            "since": { "type": "string", "description": "Start of the window (inclusive): RFC 3339 or relative to now (-15m, -2h, -1d); default the ledger's start." },
            "until": { "type": "string", "description": "End of the window (exclusive), same forms; default now." },
            "hold": {
                "type": "string",
                "default": "ttl",
                "description": "How long a request rejected in reality and granted in the what-if is held: \"ttl\" (its lifetime, default), \"median-of-job\" (the median of its job's recorded holding times) or a duration such as \"15m\".",
            },
        },
        "additionalProperties": false,
    })
}

pub(crate) fn whatif_output() -> Value {
    let side = json!({ "type": "object", "description": "granted, rejected, rejections by reason, invalid, released, expired, and workers/cpu/memory use: peak_allocated, mean_allocated, mean_total, peak_utilisation, mean_utilisation." });
    let groups = json!({ "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "requests": { "type": "integer" }, "reality_granted": { "type": "integer" }, "reality_rejected": { "type": "integer" }, "what_if_granted": { "type": "integer" }, "what_if_rejected": { "type": "integer" }, "what_if_invalid": { "type": "integer" }, "reality_worker_seconds": { "type": "number" }, "what_if_worker_seconds": { "type": "number" } } } });
    json!({
        "type": "object",
        "properties": {
            "since": { "type": "string" },
            "until": { "type": "string" },
            "requests": { "type": "integer", "description": "Requests that arrived in the window." },
            "hold": { "type": "string" },
            "recorded_config": { "type": "boolean" },
            "reproduced": { "type": "boolean", "description": "With the recorded config: every decision came out as recorded." },
            "reality": side.clone(),
            "what_if": side,
            "changes": { "type": "object", "description": "granted_in_both, rejected_in_both, granted_only_in_what_if, granted_only_in_reality." },
            "jobs": groups.clone(),
            "tenants": groups,
        },
        "required": ["since", "until", "requests", "reality", "what_if", "changes", "jobs", "tenants"],
    })
}
