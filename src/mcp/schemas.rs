//! The tools' JSON Schemas, written by hand so that every field carries a description an agent
//! can act on and the limits of the ledger's config.
//!
//! Conventions, for the clients in use: no `format` keywords; plain (non-union) `type`s in input
//! schemas (the MCP Inspector CLI converts `--tool-arg` strings by `type`); every output schema
//! admits the tool's error shape too (the TypeScript SDK validates `structuredContent` against
//! `outputSchema` even when `isError` is true).

use crate::domain::config::{MAX_JOB_ID_CHARS, MAX_MCP_NAME_CHARS, MAX_MCP_SERVERS_PER_REQUEST};
use crate::Config;
use rmcp::model::JsonObject;
use serde_json::{json, Value};
use std::sync::Arc;

fn object(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("schemas are objects"),
    }
}

const ALLOCATION_ID_PATTERN: &str = "^alloc-[0-9a-f]{12}$";

fn allocation_id_arg(what: &str) -> Value {
    json!({
        "type": "string",
        "pattern": ALLOCATION_ID_PATTERN,
        "description": format!("The allocation to {what}: the allocation_id request_resources returned, `alloc-` followed by 12 lowercase hex digits, e.g. alloc-1a2b3c4d5e6f."),
    })
}

fn priority_description(config: &Config) -> String {
    let low = config.priority_reserve_percent.low;
    let mut d = "Scheduling priority: one of low, normal, high, critical (default normal).".to_string();
    if low > 0 {
        d.push_str(&format!(
            " A low-priority request may not take the last {low}% of the pool, which stays free for the others."
        ));
    }
    d
}

/// The input schema of `request_resources`: the limits of `config` (pool size, TTL range,
/// metadata size) stated where an agent reads them.
pub(crate) fn request_input(config: &Config) -> Value {
    json!({
        "type": "object",
        "properties": {
            "job_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_JOB_ID_CHARS,
                "description": format!("Identifier of the job that will use the resources (1 to {MAX_JOB_ID_CHARS} characters, no control characters). Several allocations may carry the same job_id; list_allocations can filter by it."),
            },
            "mcp_servers": {
                "type": "array",
                "items": {
                    "type": "string",
                    "pattern": format!("^[A-Za-z0-9._-]{{1,{MAX_MCP_NAME_CHARS}}}$"),
                },
                "maxItems": MAX_MCP_SERVERS_PER_REQUEST,
                "uniqueItems": true,
                "description": format!("Names of the MCP servers the job needs, e.g. [\"github\", \"jira\"] (each 1 to {MAX_MCP_NAME_CHARS} characters from A-Z a-z 0-9 . _ -, each named once, at most {MAX_MCP_SERVERS_PER_REQUEST}). A server is shared by name: every allocation naming it gets the same endpoint. May be empty when workers is at least 1."),
            },
            "workers": {
                "type": "integer",
                "minimum": 0,
                "maximum": config.in_pool_slots(),
                "default": 0,
                "description": format!("Number of worker slots to reserve, 0 to {} (the pool's size); each holds {} CPU cores and {} MB of memory. get_capacity shows how many are available.", config.in_pool_slots(), crate::domain::model::cores(config.worker_cpu_millicores), config.worker_memory_mib),
            },
            "priority": {
                "type": "string",
                "enum": ["low", "normal", "high", "critical"],
                "default": "normal",
                "description": priority_description(config),
            },
            "ttl_seconds": {
                "type": "integer",
                "minimum": config.min_ttl_seconds,
                "maximum": config.max_ttl_seconds,
                "default": config.default_ttl_seconds,
                "description": format!("Lifetime of the allocation in seconds, {} to {} (default {}). After it the allocation expires and its resources return to the pool; release it earlier with release_resources.", config.min_ttl_seconds, config.max_ttl_seconds, config.default_ttl_seconds),
            },
            "metadata": {
                "type": "object",
                "description": format!("Free-form JSON object stored with the allocation and shown by get_allocation (at most {} bytes as JSON), e.g. {{\"team\": \"infra\"}}.", config.max_metadata_bytes),
            },
            "idempotency_key": {
                "type": "string",
                "minLength": 1,
                "maxLength": crate::MAX_IDEMPOTENCY_KEY_BYTES,
                "description": format!("Makes the call safe to retry: a fresh key (e.g. a UUID, 1 to {} printable bytes) per request. Calling again with the same key and the same arguments returns the original result (the same allocation_id, workers and endpoints, with replayed: true) and grants nothing new; the same key with different arguments is an error. Keys are remembered for {} seconds.", crate::MAX_IDEMPOTENCY_KEY_BYTES, config.idempotency_window_seconds),
            },
            "max_lifetime_seconds": {
                "type": "integer",
                "minimum": config.min_ttl_seconds,
                "description": "Optional bound for renew_allocation: the allocation's deadline never moves past its creation plus this many seconds (at least ttl_seconds).",
            },
            "tenant": {
                "type": "string",
                "minLength": 1,
                "maxLength": crate::domain::quota::MAX_TENANT_CHARS,
                "description": format!("The tenant whose quota the request counts against (default: metadata.{}). A request past its tenant's quota is refused with reason quota, e.g. \"exceeded quota for tenant t1: requested workers=4, used=8, limited=10\".", config.tenant_metadata_key),
            },
            "wait": super::tools::queue::wait_schema(config),
            "queue_timeout_seconds": super::tools::queue::queue_timeout_schema(config),
            "preemptible": preemptible_schema(config),
            "expected_seq": super::tools::contract::expected_seq_schema(),
        },
        "required": ["job_id", "mcp_servers"],
        "additionalProperties": false,
    })
}

/// `request_resources`' `preemptible` argument (`docs/policy.md` §2).
fn preemptible_schema(config: &Config) -> Value {
    let allowed: Vec<&str> = config.non_preemptible_priorities.iter().map(|p| p.as_str()).collect();
    json!({
        "type": "boolean",
        "default": true,
        "description": format!("false protects the allocation from preemption by higher priorities; allowed only for priorities {} (otherwise an error naming preemptible). A preempted allocation first turns preempting (get_allocation shows preempt_deadline: checkpoint and release before it), then preempted after {} s of grace.", if allowed.is_empty() { "(none)".to_string() } else { allowed.join(", ") }, config.preemption_grace_seconds),
    })
}

/// The input schema of tool `name` under `config`.
pub(crate) fn input(name: &str, config: &Config) -> Arc<JsonObject> {
    let v = match name {
        "request_resources" => request_input(config),
        "release_resources" => json!({
            "type": "object",
            "properties": {
                "allocation_id": allocation_id_arg("release"),
                "expected_seq": super::tools::contract::expected_seq_schema(),
            },
            "required": ["allocation_id"],
            "additionalProperties": false,
        }),
        "renew_allocation" => super::tools::contract::renew_input(config),
        "plan_request" => super::tools::contract::plan_input(config),
        "get_allocation" => json!({
            "type": "object",
            "properties": { "allocation_id": allocation_id_arg("show") },
            "required": ["allocation_id"],
            "additionalProperties": false,
        }),
        "list_allocations" => super::tools::list::list_input(),
        "get_capacity" => json!({
            "type": "object",
            "properties": {
                "at": super::tools::history::at_schema(),
                "by_tenant": {
                    "type": "boolean",
                    "description": "Also list each tenant's use now against its quota as `tenants` (not with `at`).",
                },
            },
            "additionalProperties": false,
        }),
        "allocation_history" => super::tools::history::history_input(),
        "usage_report" => super::tools::history::usage_input(),
        "what_if" => super::tools::whatif::whatif_input(),
        "get_pool" => super::tools::pool::get_pool_input(),
        "change_pool" => super::tools::pool::change_pool_input(),
        "reserve_resources" => super::tools::reservation::reserve_input(config),
        "cancel_reservation" => super::tools::reservation::cancel_input(),
        "list_reservations" => super::tools::reservation::list_input(),
        "write_snapshot" => super::tools::admin::write_snapshot_input(),
        "apply_config" => super::tools::admin::apply_config_input(),
        "cancel_request" => super::tools::queue::cancel_request_input(),
        // cleanup_expired
        _ => json!({
            "type": "object",
            "properties": { "expected_seq": super::tools::contract::expected_seq_schema() },
            "additionalProperties": false,
        }),
    };
    object(v)
}

/// `{status: "error", ...}`: invalid arguments, unknown allocations, a ledger that stopped
/// accepting writes.
fn error_shape() -> Value {
    json!({
        "type": "object",
        "description": "An error (isError is true). `error` is the message to act on.",
        "properties": {
            "status": { "const": "error" },
            "error": { "type": "string", "description": "What went wrong; for invalid arguments it names the field and the allowed values. Unknown allocations: \"Allocation <id> not found\"." },
            "kind": { "type": "string", "enum": ["invalid_input", "not_found", "locked", "damaged", "read_only", "poisoned", "no_ledger", "conflict", "not_active", "io"] },
            "field": { "type": "string", "description": "The argument that was rejected (kind invalid_input)." },
            "allocation_id": { "type": "string", "description": "The id that was not found (kind not_found) or is not active (kind not_active)." },
            "state": { "type": "string", "description": "The allocation's state (kind not_active): released, expired or failed." },
            "expected_seq": { "type": "integer", "description": "The expected_seq given (kind conflict)." },
            "current_seq": { "type": "integer", "description": "The ledger's last sequence number now (kind conflict): read or plan again and retry with it." },
        },
        "required": ["status", "error"],
    })
}

fn with_error(success: Vec<Value>) -> Arc<JsonObject> {
    let mut any_of = success;
    any_of.push(error_shape());
    object(json!({ "type": "object", "anyOf": any_of }))
}

fn s(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn int(description: &str) -> Value {
    json!({ "type": "integer", "minimum": 0, "description": description })
}

fn num(description: &str) -> Value {
    json!({ "type": "number", "minimum": 0, "description": description })
}

fn nullable_string(description: &str) -> Value {
    json!({ "type": ["string", "null"], "description": description })
}

fn allocation_id_out() -> Value {
    json!({ "type": "string", "pattern": ALLOCATION_ID_PATTERN })
}

fn priority_out() -> Value {
    json!({ "type": "string", "enum": ["low", "normal", "high", "critical"] })
}

fn state_out() -> Value {
    json!({ "type": "string", "enum": ["active", "released", "expired", "failed", "pending", "cancelled", "preempting", "preempted"] })
}

fn mcp_servers_out() -> Value {
    json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": s("MCP server name."),
                "endpoint": s("Where the job reaches it, e.g. http://localhost:9000."),
                "status": { "type": "string", "enum": ["running", "stopped"] },
            },
            "required": ["name", "endpoint", "status"],
        },
    })
}

fn granted() -> Value {
    json!({
        "type": "object",
        "description": "The request was granted.",
        "properties": {
            "allocation_id": allocation_id_out(),
            "status": { "type": "string", "enum": ["active", "released", "expired"], "description": "active for a grant made now; a replayed answer shows the allocation's state now." },
            "job_id": s("The job the allocation belongs to."),
            "priority": priority_out(),
            "mcp_servers": mcp_servers_out(),
            "workers_allocated": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "worker_id": s("Slot id, e.g. worker-03; unique among active allocations."),
                        "endpoint": s("Where the job reaches the worker, e.g. http://localhost:8003."),
                        "cpu": num("CPU cores."),
                        "memory": int("Memory in MB."),
                        "cpu_millicores": int("CPU in millicores."),
                        "memory_mib": int("Memory in MiB."),
                    },
                    "required": ["worker_id", "endpoint", "cpu", "memory"],
                },
            },
            "resources": {
                "type": "object",
                "properties": {
                    "cpu": num("CPU cores held by the workers."),
                    "memory": int("Memory in MB held by the workers."),
                    "workers": int("Number of workers."),
                    "cpu_millicores": int("CPU in millicores."),
                    "memory_mib": int("Memory in MiB."),
                },
                "required": ["cpu", "memory", "workers"],
            },
            "ttl_seconds": int("Lifetime in seconds."),
            "created_at": s("When the grant was recorded (RFC 3339, UTC)."),
            "expires_at": s("When the allocation expires unless released first (RFC 3339, UTC)."),
            "seq": int("Sequence number of the ledger event that recorded the grant."),
            "replayed": { "type": "boolean", "description": "Present (true) when idempotency_key was decided before: this is the original grant, nothing new was granted." },
        },
        "required": ["allocation_id", "status", "job_id", "mcp_servers", "workers_allocated", "resources", "ttl_seconds", "created_at"],
    })
}

fn failed() -> Value {
    json!({
        "type": "object",
        "description": "The pool cannot hold the request (isError is true); the rejection is recorded with state failed.",
        "properties": {
            "allocation_id": allocation_id_out(),
            "status": { "type": "string", "enum": ["failed", "cancelled"] },
            "error": s("e.g. \"Insufficient workers: requested 5, available 3\", \"Insufficient CPU: needed 4.0, available 2.0\", \"Insufficient memory: needed 8192MB, available 4096MB\"."),
            "job_id": s("The job that asked."),
            "reason": { "type": "string", "enum": ["insufficient_workers", "insufficient_cpu", "insufficient_memory", "quota", "queue_timeout", "cancelled"] },
            "created_at": s("When the rejection was recorded (RFC 3339, UTC)."),
            "seq": int("Sequence number of the ledger event that recorded the rejection."),
            "replayed": { "type": "boolean", "description": "Present (true) when idempotency_key was decided before: this is the original rejection." },
        },
        "required": ["allocation_id", "status", "error"],
    })
}

fn released() -> Value {
    json!({
        "type": "object",
        "properties": {
            "status": {
                "type": "string",
                "enum": ["released", "already_released", "already_expired", "already_failed", "already_preempted", "cancelled", "already_cancelled"],
                "description": "released: this call released it; cancelled: it was waiting in the queue and this call cancelled it (nothing was held); already_*: it had already ended and nothing changed.",
            },
            "allocation_id": allocation_id_out(),
            "job_id": s("The job the allocation belonged to."),
            "state": state_out(),
            "workers_released": int("Workers returned to the pool by this call."),
            "cpu_freed": num("CPU cores returned to the pool by this call."),
            "memory_freed": int("Memory in MB returned to the pool by this call."),
            "released_at": s("When it was released (RFC 3339, UTC)."),
            "expired_at": s("When it expired (already_expired only)."),
            "duration_seconds": num("How long the allocation held its resources."),
        },
        "required": ["status", "allocation_id", "job_id", "workers_released"],
    })
}

fn capacity() -> Value {
    json!({
        "type": "object",
        "properties": {
            "total_cpu": num("CPU cores in the pool."),
            "total_memory": int("Memory in MB in the pool."),
            "total_workers": int("Worker slots in the pool."),
            "allocated_cpu": num("CPU cores held by active allocations."),
            "allocated_memory": int("Memory in MB held by active allocations."),
            "allocated_workers": int("Workers held by active allocations."),
            "available_cpu": num("CPU cores free."),
            "available_memory": int("Memory in MB free."),
            "available_workers": int("Workers free."),
            "running_mcp_servers": { "type": "array", "items": { "type": "string" }, "description": "MCP servers used by at least one active allocation." },
            "active_allocations": int("Number of active allocations."),
            "total_cpu_millicores": int("CPU in the pool, in millicores."),
            "allocated_cpu_millicores": int("CPU held, in millicores."),
            "available_cpu_millicores": int("CPU free, in millicores."),
            "as_of": s("The instant this report describes (RFC 3339, UTC)."),
            "seq": int("Sequence number of the last ledger event in this report."),
            "reserved": { "type": "object", "description": "Present while a reservation is in force: what the reservations in force hold (workers, cpu_millicores, memory_mib), what their holders leave unused (unused_workers, unused_cpu_millicores, unused_memory_mib: nobody else may take it) and their ids (reservations)." },
            "chain_head": { "type": "object", "properties": { "seq": int("The last durable record."), "hash": s("Its chain value (64 hex digits).") }, "description": "The head of the log's tamper-evident chain, as `verify` prints it (pin it; `verify --expect-head SEQ:HASH` proves the log up to SEQ unchanged). Present for the pool now on a writing ledger whose log is chained." },
        },
        "required": ["total_cpu", "total_memory", "total_workers", "allocated_cpu", "allocated_memory", "allocated_workers", "available_cpu", "available_memory", "available_workers", "running_mcp_servers", "active_allocations"],
    })
}

fn details() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocation_id": allocation_id_out(),
            "job_id": s("The job the allocation belongs to."),
            "state": state_out(),
            "priority": priority_out(),
            "resources": {
                "type": "object",
                "properties": {
                    "cpu_allocated": num("CPU cores."),
                    "memory_allocated": int("Memory in MB."),
                    "workers": int("Number of workers."),
                    "cpu_millicores": int("CPU in millicores."),
                    "memory_mib": int("Memory in MiB."),
                },
                "required": ["cpu_allocated", "memory_allocated", "workers"],
            },
            "mcp_servers": mcp_servers_out(),
            "workers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "worker_id": s("Slot id, e.g. worker-03."),
                        "endpoint": s("Worker endpoint."),
                        "status": s("allocated while active, else the allocation's final state."),
                        "cpu": num("CPU cores."),
                        "memory": int("Memory in MB."),
                    },
                    "required": ["worker_id", "endpoint", "status"],
                },
            },
            "timestamps": {
                "type": "object",
                "properties": {
                    "created_at": s("When it was requested (RFC 3339, UTC)."),
                    "activated_at": nullable_string("When it was granted; null for a failed request."),
                    "released_at": nullable_string("When it was released, if it was."),
                    "expired_at": nullable_string("When it expired, if it did."),
                    "expires_at": nullable_string("Its deadline; null for a failed request."),
                    "age_seconds": num("Seconds since it was requested."),
                },
                "required": ["created_at", "age_seconds"],
            },
            "ttl_seconds": int("Lifetime in seconds."),
            "is_expired": { "type": "boolean", "description": "Its deadline has passed." },
            "metadata": { "type": "object", "description": "The metadata given with the request." },
            "error": s("Why a failed request was not granted."),
        },
        "required": ["allocation_id", "job_id", "state", "priority", "resources", "mcp_servers", "workers", "timestamps", "ttl_seconds", "is_expired"],
    })
}

fn list() -> Value {
    json!({
        "type": "object",
        "properties": {
            "allocations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "allocation_id": allocation_id_out(),
                        "job_id": { "type": "string" },
                        "state": state_out(),
                        "priority": priority_out(),
                        "workers": int("Number of workers."),
                        "age_seconds": num("Seconds since it was requested."),
                        "is_expired": { "type": "boolean" },
                        "created_at": s("When it was requested (RFC 3339, UTC)."),
                    },
                    "required": ["allocation_id", "job_id", "state", "priority", "workers", "age_seconds", "is_expired"],
                },
            },
            "count": int("Number of allocations listed."),
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as cursor (with the same filters) for the next page; null on the last page.",
            },
        },
        "required": ["allocations", "count", "next_cursor"],
    })
}

fn cleanup() -> Value {
    json!({
        "type": "object",
        "properties": {
            "cleaned_up": { "type": "array", "items": allocation_id_out(), "description": "Allocations whose expiry this call recorded." },
            "count": int("How many."),
        },
        "required": ["cleaned_up", "count"],
    })
}

/// The output schema of tool `name`: its result shapes and the error shape.
pub(crate) fn output(name: &str) -> Arc<JsonObject> {
    match name {
        "request_resources" => with_error(vec![granted(), failed(), super::tools::queue::pending_output()]),
        "release_resources" => with_error(vec![released()]),
        "get_capacity" => with_error(vec![capacity()]),
        "get_allocation" => with_error(vec![details()]),
        "list_allocations" => with_error(vec![list()]),
        "cleanup_expired" => with_error(vec![cleanup()]),
        "allocation_history" => with_error(vec![super::tools::history::history_output()]),
        "renew_allocation" => with_error(vec![super::tools::contract::renew_output()]),
        "plan_request" => with_error(vec![super::tools::contract::plan_output(granted(), failed())]),
        "usage_report" => with_error(vec![super::tools::history::usage_output()]),
        "what_if" => with_error(vec![super::tools::whatif::whatif_output()]),
        "get_pool" => with_error(vec![super::tools::pool::get_pool_output()]),
        "change_pool" => with_error(vec![super::tools::pool::change_pool_output()]),
        "reserve_resources" | "cancel_reservation" => with_error(vec![super::tools::reservation::reserve_output()]),
        "list_reservations" => with_error(vec![super::tools::reservation::list_output()]),
        "write_snapshot" => with_error(vec![super::tools::admin::write_snapshot_output()]),
        "apply_config" => with_error(vec![super::tools::admin::apply_config_output()]),
        "cancel_request" => with_error(vec![super::tools::queue::cancel_request_output()]),
        other => unreachable!("no output schema for tool {other}"),
    }
}
