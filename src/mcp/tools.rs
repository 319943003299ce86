//! The six tools. Arguments arrive as raw JSON objects (so a bad argument is a tool result that
//! names the field, not a protocol error) and are validated by the library; results are the
//! report types, which serialise to the original system's shapes.

use super::schemas;
use crate::{Config, Error, Ledger, RequestOutcome, ResourceRequest};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, CustomRequest, CustomResult, JsonObject};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::{tool, tool_handler, tool_router, ErrorData as McpError, ServerHandler};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::task::TaskTracker;

pub(super) mod admin;
pub(super) mod contract;
pub(super) mod history;
pub(super) mod list;
pub(super) mod pool;
pub(super) mod queue;
pub(super) mod reservation;
pub(super) mod whatif;

/// One MCP handler instance (one per stdio session, HTTP session or stateless HTTP request);
/// all of them share the same `Ledger`.
#[derive(Clone)]
pub(crate) struct LedgerTools {
    ledger: Ledger,
    tasks: TaskTracker,
    tool_router: ToolRouter<Self>,
    /// This session's resource subscriptions and log level.
    watch: super::resources::Session,
    /// Serve the conformance suite's fixtures too (`serve --conformance-fixtures`).
    fixtures: bool,
}

impl LedgerTools {
    pub(crate) fn new(
        ledger: Ledger,
        tasks: TaskTracker,
        tool_router: ToolRouter<Self>,
        watch: super::resources::Session,
        fixtures: bool,
    ) -> Self {
        LedgerTools { ledger, tasks, tool_router, watch, fixtures }
    }

    /// The tool list with input schemas that state the limits of `config` (TTL range, worker
    /// count) and output schemas that admit each tool's error shape too.
    pub(crate) fn router(config: &Config, fixtures: bool) -> ToolRouter<Self> {
        let mut router = Self::tool_router()
            + Self::history_router()
            + Self::list_router()
            + Self::contract_router()
            + Self::whatif_router()
            + Self::pool_router()
            + Self::reservation_router()
            + Self::admin_router()
            + Self::queue_router()
            + Self::config_router();
        for (name, route) in &mut router.map {
            route.attr.input_schema = schemas::input(name, config);
            route.attr.output_schema = Some(schemas::output(name));
        }
        if fixtures {
            router += super::fixtures::router();
        }
        router
    }

    /// Runs a blocking ledger call on the blocking pool.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> crate::Result<R> + Send + 'static,
    ) -> Result<crate::Result<R>, McpError> {
        let ledger = self.ledger.clone();
        self.tasks
            .spawn_blocking(move || f(&ledger))
            .await
            .map_err(|e| McpError::internal_error(format!("the ledger call failed: {e}"), None))
    }

    /// After a write awaited on the runtime: the periodic snapshot, if due, on the blocking
    /// pool (tracked, so shutdown waits for it; the write itself is already durable).
    fn snapshot_if_due(&self) {
        if self.ledger.snapshot_due() {
            let ledger = self.ledger.clone();
            self.tasks.spawn_blocking(move || ledger.snapshot_if_due());
        }
    }
}

/// A successful result: structuredContent plus its JSON text copy.
fn ok(value: impl Serialize) -> Result<CallToolResult, McpError> {
    let value = serde_json::to_value(value).map_err(|e| McpError::internal_error(e.to_string(), None))?;
    Ok(CallToolResult::structured(value))
}

/// An `isError: true` result carrying `value` as structuredContent (and its text copy).
fn tool_error(value: Value) -> Result<CallToolResult, McpError> {
    Ok(CallToolResult::structured_error(value))
}

/// The error shape: `{status: "error", error, kind, ...}`. `error` is the message an agent
/// reads; for invalid input it names the field and the allowed values.
fn error_value(e: &Error) -> Value {
    match e {
        Error::InvalidInput { field, .. } => json!({
            "status": "error",
            "error": e.to_string(),
            "kind": e.kind(),
            "field": field,
        }),
        Error::NotFound(id) => json!({
            "status": "error",
            "error": e.to_string(),
            "kind": e.kind(),
            "allocation_id": id,
        }),
        Error::Conflict { expected_seq, current_seq } => json!({
            "status": "error",
            "error": e.to_string(),
            "kind": e.kind(),
            "expected_seq": expected_seq,
            "current_seq": current_seq,
        }),
        Error::NotActive { allocation_id, state } => json!({
            "status": "error",
            "error": e.to_string(),
            "kind": e.kind(),
            "allocation_id": allocation_id,
            "state": state,
        }),
        _ => json!({"status": "error", "error": e.to_string(), "kind": e.kind()}),
    }
}

fn from_ledger<R: Serialize>(r: crate::Result<R>) -> Result<CallToolResult, McpError> {
    match r {
        Ok(v) => ok(v),
        Err(e) => tool_error(error_value(&e)),
    }
}

/// Rejects arguments the tool does not take, so a typo is not silently ignored.
fn check_known(args: &JsonObject, known: &[&str]) -> Result<(), Error> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => {
            // An empty name or one with control characters is shown quoted, never blank.
            let short: String = key.chars().take(64).collect();
            let shown =
                if short.is_empty() || short.chars().any(char::is_control) { format!("{short:?}") } else { short };
            let allowed = if known.is_empty() {
                "this tool takes no arguments".to_string()
            } else {
                format!("allowed arguments: {}", known.join(", "))
            };
            Err(Error::invalid(shown, format!("unknown argument; {allowed}")))
        }
    }
}

/// An optional string argument (`null` counts as absent).
fn opt_str<'a>(args: &'a JsonObject, field: &str) -> Result<Option<&'a str>, Error> {
    match args.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Error::invalid(field, format!("must be a string, got {}", kind_of(other)))),
    }
}

fn allocation_id_arg(args: &JsonObject) -> Result<String, Error> {
    allocation_id_arg_and(args, &["allocation_id"])
}

/// `allocation_id` from a tool that takes `known` arguments.
fn allocation_id_arg_and(args: &JsonObject, known: &[&str]) -> Result<String, Error> {
    check_known(args, known)?;
    match opt_str(args, "allocation_id")? {
        Some(id) => Ok(id.to_string()),
        None => Err(Error::invalid(
            "allocation_id",
            "is required: the id request_resources returned, e.g. alloc-1a2b3c4d5e6f",
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[tool_router]
impl LedgerTools {
    #[tool(
        description = "Reserve worker slots and MCP servers for a job. On success the result has status \"active\", an allocation_id (keep it to release the resources later), the granted workers with their endpoints, the MCP server endpoints, and the deadline (expires_at) after which the allocation expires by itself. If the pool cannot hold the request the result is an error with status \"failed\" and a message such as \"Insufficient workers: requested 5, available 3\" — call get_capacity, then retry with fewer workers or later. Invalid arguments give an error naming the field and the allowed values. Pass an idempotency_key (e.g. a UUID) to make retries safe: a retry with the same key returns the original result with replayed: true instead of granting twice. plan_request shows the outcome without reserving; expected_seq makes the request apply only if the ledger has not changed since.",
        annotations(
            title = "Request resources",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn request_resources(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let (req, expected_seq) = match ResourceRequest::from_tool_arguments(&args) {
            Ok(r) => r,
            Err(e) => return tool_error(error_value(&e)),
        };
        if (req.wait || self.ledger.preempts_with_grace(req.priority)) && expected_seq.is_none() {
            return self.request_waiting(req).await;
        }
        // Awaited on the runtime, not on a blocking thread: waiting for the fsync costs a task,
        // and a flush covers every connected agent's grant at once.
        let outcome = match expected_seq {
            Some(seq) => self.ledger.if_seq(seq).request_resources_async(&req).await,
            None => self.ledger.request_resources_async(&req).await,
        };
        let outcome = match outcome {
            // A retry whose allocation left memory: the log has it (a blocking read).
            Err(Error::NotFound(_)) if req.idempotency_key.is_some() => {
                self.call(move |l| match expected_seq {
                    Some(seq) => l.if_seq(seq).request_resources(&req),
                    None => l.request_resources(&req),
                })
                .await?
            }
            other => other,
        };
        self.snapshot_if_due();
        match outcome {
            Ok(RequestOutcome::Granted(g)) => ok(g),
            // The original's `failed` shape, as an error result: nothing was granted.
            Ok(RequestOutcome::Failed(f)) => {
                let value = serde_json::to_value(f).map_err(|e| McpError::internal_error(e.to_string(), None))?;
                tool_error(value)
            }
            Err(e) => tool_error(error_value(&e)),
        }
    }

    #[tool(
        description = "Release an allocation: its workers and MCP servers return to the pool. Returns status \"released\" with workers_released, cpu_freed, memory_freed and duration_seconds. Safe to retry: releasing an allocation that already ended is not an error: status is then \"already_released\", \"already_expired\" or \"already_failed\" and nothing changes. An unknown allocation_id is an error: \"Allocation <id> not found\".",
        annotations(
            title = "Release resources",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn release_resources(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = allocation_id_arg_and(&args, &["allocation_id", "expected_seq"]).and_then(|id| {
            let parsed = crate::AllocationId::parse("allocation_id", &id)?;
            Ok((id, parsed, contract::expected_seq_arg(&args)?))
        });
        let (id, parsed, expected_seq) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        let released = match expected_seq {
            Some(seq) => self.ledger.if_seq(seq).release_resources_async(&id).await,
            None => self.ledger.release_resources_async(&id).await,
        };
        let released = match released {
            // Ended so long ago that it left memory: the log has it (a blocking read).
            Err(Error::NotFound(_)) => self.call(move |l| l.release_not_in_memory(parsed)).await?,
            other => other,
        };
        self.snapshot_if_due();
        from_ledger(released)
    }

    #[tool(
        description = "Show the pool: total, allocated and available CPU (cores), memory (MB) and workers, the MCP servers in use (running_mcp_servers) and the number of active allocations. Call it before a large request to see what fits. With `at` (RFC 3339 or relative such as -15m) it shows the pool as it was at that instant. With by_tenant: true it also lists each tenant's use against its quota (tenants).",
        annotations(title = "Get capacity", read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn get_capacity(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let parsed = check_known(&args, &["at", "by_tenant"]).and_then(|()| {
            let at = opt_str(&args, "at")?.map(str::to_string);
            let by_tenant = match args.get("by_tenant") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(Error::invalid("by_tenant", format!("must be true or false, got {}", kind_of(other))))
                }
            };
            if by_tenant && at.is_some() {
                return Err(Error::invalid("by_tenant", "shows use now: it cannot be combined with at"));
            }
            Ok((at, by_tenant))
        });
        let (at, by_tenant) = match parsed {
            Ok(x) => x,
            Err(e) => return tool_error(error_value(&e)),
        };
        let report = self
            .call(move |l| {
                let now = at.is_none();
                let capacity = match history::parse_at(l, "at", at.as_deref())? {
                    None => l.get_capacity()?,
                    Some(t) => l.capacity_at(t)?,
                };
                let mut v = serde_json::to_value(capacity).map_err(|e| Error::io("serialising", e.into()))?;
                if let Some(head) = l.status().chain_head.filter(|_| now) {
                    v["chain_head"] = serde_json::json!(head);
                }
                if by_tenant {
                    v["tenants"] =
                        serde_json::to_value(l.tenant_capacity()?).map_err(|e| Error::io("serialising", e.into()))?;
                }
                Ok(v)
            })
            .await?;
        from_ledger(report)
    }

    #[tool(
        description = "Show one allocation: state (active, released, expired or failed), priority, resources, workers with endpoints, MCP servers, timestamps (created_at, released_at or expired_at, expires_at, age_seconds), ttl_seconds, is_expired and metadata. An unknown allocation_id is an error: \"Allocation <id> not found\".",
        annotations(title = "Get allocation", read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn get_allocation(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let id = match allocation_id_arg(&args) {
            Ok(id) => id,
            Err(e) => return tool_error(error_value(&e)),
        };
        let lookup = id.clone();
        match self.call(move |l| l.get_allocation(&lookup)).await? {
            Ok(Some(details)) => ok(details),
            Ok(None) => tool_error(error_value(&Error::NotFound(id))),
            Err(e) => tool_error(error_value(&e)),
        }
    }

    #[tool(
        description = "Record the expiry of every active allocation whose deadline (created_at + ttl_seconds) has passed, returning their ids as {cleaned_up: [...], count}. The server also does this on its own every second, so this is rarely needed.",
        annotations(
            title = "Clean up expired allocations",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn cleanup_expired(&self, args: JsonObject) -> Result<CallToolResult, McpError> {
        let expected_seq = match check_known(&args, &["expected_seq"]).and_then(|()| contract::expected_seq_arg(&args))
        {
            Ok(seq) => seq,
            Err(e) => return tool_error(error_value(&e)),
        };
        from_ledger(
            self.call(move |l| match expected_seq {
                Some(seq) => l.if_seq(seq).cleanup_expired(),
                None => l.cleanup_expired(),
            })
            .await?,
        )
    }
}

/// What `initialize` tells the client about using the server.
const INSTRUCTIONS: &str = "A durable ledger of worker slots and MCP servers for AI-agent jobs. Call request_resources to reserve workers and MCP servers for a job (keep the allocation_id), use the endpoints it returns, and call release_resources with the allocation_id when done; unreleased allocations expire after ttl_seconds. get_capacity shows what is free; get_allocation and list_allocations show allocations (get_capacity and list_allocations also as of a past instant, with `at`); allocation_history shows what happened to an allocation or a job, and usage_report what each job or tenant used over a window. Errors are tool results with isError true whose message names the field and the allowed values.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for LedgerTools {
    fn get_info(&self) -> rmcp::model::ServerConfig {
        rmcp::model::ServerConfig::new(super::resources::capabilities(self.fixtures))
            .with_server_info(rmcp::model::Implementation::new("allocation-ledger", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_resources(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourcesResult, McpError> {
        let mut list = super::resources::list();
        if self.fixtures {
            super::fixtures::add_resources(&mut list)?;
        }
        Ok(list)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, McpError> {
        let mut list = super::resources::templates();
        if self.fixtures {
            super::fixtures::add_templates(&mut list)?;
        }
        Ok(list)
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResponse, McpError> {
        if let Some(read) = self.fixtures.then(|| super::fixtures::read(&request.uri)).flatten() {
            return read.map(Into::into);
        }
        super::resources::read(&self.ledger, &self.tasks, request.uri).await.map(Into::into)
    }

    async fn list_prompts(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListPromptsResult, McpError> {
        if self.fixtures {
            return super::fixtures::prompts();
        }
        Err(McpError::method_not_found::<rmcp::model::ListPromptsRequestMethod>())
    }

    async fn get_prompt(
        &self,
        request: rmcp::model::GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::GetPromptResponse, McpError> {
        if self.fixtures {
            let args = request.arguments.unwrap_or_default();
            return super::fixtures::prompt(&request.name, &args).map(Into::into);
        }
        Err(McpError::method_not_found::<rmcp::model::GetPromptRequestMethod>())
    }

    async fn complete(
        &self,
        _request: rmcp::model::CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CompleteResult, McpError> {
        if self.fixtures {
            return super::fixtures::complete();
        }
        Err(McpError::method_not_found::<rmcp::model::CompleteRequestMethod>())
    }

    async fn subscribe(
        &self,
        request: rmcp::model::SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.watch.subscribe(request.uri, &context)
    }

    async fn unsubscribe(
        &self,
        request: rmcp::model::UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.watch.unsubscribe(&request.uri);
        Ok(())
    }

    #[allow(deprecated, reason = "logging is deprecated by SEP-2577 (2026-07-28), not in 2025-11-25")]
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.watch.set_level(request.level, &context);
        Ok(())
    }

    /// rmcp hands over as a custom request any message whose params do not decode as its
    /// method's, e.g. `tools/call` with `arguments` that is not an object; for a method MCP
    /// defines that is invalid params (-32602), not "method not found" (rmcp's default).
    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        let params = request.params.as_ref();
        if request.method == "tools/call" {
            let message = match params.and_then(|p| p.get("arguments")) {
                Some(a) if !a.is_object() && !a.is_null() => {
                    format!("tools/call: arguments must be an object, got {}", kind_of(a))
                }
                _ => "tools/call: params must be {name: string, arguments: object}".to_string(),
            };
            return Err(McpError::invalid_params(message, None));
        }
        if KNOWN_METHODS.contains(&request.method.as_str()) {
            return Err(McpError::invalid_params(format!("{}: invalid params", request.method), None));
        }
        Err(McpError::new(rmcp::model::ErrorCode::METHOD_NOT_FOUND, request.method, None))
    }
}

/// Client requests MCP defines: params that do not decode for one of these are invalid params.
const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_error_shape() {
        let v = error_value(&Error::Poisoned("fsync of the log failed: EIO".into()));
        assert_eq!(v["status"], "error");
        assert_eq!(v["kind"], "poisoned");
        assert!(v["error"].as_str().unwrap().contains("stopped accepting writes"), "{v}");
        let v = error_value(&Error::NotFound("alloc-000000000000".into()));
        assert_eq!(
            v,
            json!({"status": "error", "error": "Allocation alloc-000000000000 not found", "kind": "not_found", "allocation_id": "alloc-000000000000"})
        );
        let v = error_value(&Error::invalid("ttl_seconds", "59 is out of range"));
        assert_eq!((v["field"].as_str(), v["kind"].as_str()), (Some("ttl_seconds"), Some("invalid_input")));
    }

    #[test]
    fn every_tool_gets_schemas_from_the_config() {
        let config = Config { worker_slots: 40, min_ttl_seconds: 10, ..Config::default() };
        let router = LedgerTools::router(&config, false);
        let tools = router.list_all();
        for name in [
            "request_resources",
            "release_resources",
            "get_capacity",
            "get_allocation",
            "list_allocations",
            "cleanup_expired",
        ] {
            assert!(tools.iter().any(|t| t.name == name), "{name} is missing");
        }
        for t in &tools {
            assert_eq!(t.input_schema["type"], "object", "{}", t.name);
            let out = t.output_schema.as_ref().expect("an output schema");
            assert_eq!(out["type"], "object", "{}", t.name);
            assert!(out["anyOf"].as_array().is_some_and(|a| a.len() >= 2), "{}: success and error shapes", t.name);
        }
        let req = tools.iter().find(|t| t.name == "request_resources").unwrap();
        assert_eq!(req.input_schema["properties"]["workers"]["maximum"], 40);
        assert_eq!(req.input_schema["properties"]["ttl_seconds"]["minimum"], 10);
    }

    #[test]
    fn unknown_arguments_are_named() {
        let args: JsonObject = serde_json::from_value(json!({"verbose": true})).unwrap();
        let e = check_known(&args, &[]).unwrap_err().to_string();
        assert!(e.contains("verbose") && e.contains("takes no arguments"), "{e}");
        let e =
            allocation_id_arg(&serde_json::from_value(json!({"allocation_id": 7})).unwrap()).unwrap_err().to_string();
        assert!(e.contains("allocation_id") && e.contains("must be a string"), "{e}");
    }
}
