//! Request input: the one place where a request from the CLI, an MCP call or the library is
//! parsed and checked field by field (an error names the field and the allowed values).

use crate::domain::config::{
    mcp_name_allowed, mcp_name_error, Config, MAX_JOB_ID_CHARS, MAX_MCP_SERVERS_PER_REQUEST, MAX_METADATA_KEY_CHARS,
};
use crate::domain::model::{truncate, Metadata, Priority};
use crate::{Error, Result};

/// A request for resources, as given: build it from CLI flags, MCP arguments
/// ([`ResourceRequest::from_json`]) or in code; validation (`domain::input::validate`) checks it against the config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceRequest {
    /// The job the resources are for (1 to 256 characters, no control characters).
    pub job_id: String,
    /// MCP servers to run for the job, each named once.
    pub mcp_servers: Vec<String>,
    /// Worker slots wanted (0 if only MCP servers are wanted).
    pub workers: u32,
    /// Decides how much of the pool must stay free after the grant.
    pub priority: Priority,
    /// `None` takes the config's `default_ttl_seconds`.
    pub ttl_seconds: Option<u64>,
    /// Free-form JSON stored with the allocation and shown back.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The caller's retry key (1 to 128 printable bytes, e.g. a UUID): a retry with the same key
    /// and the same request gets the original outcome and writes nothing.
    pub idempotency_key: Option<String>,
    /// Renewals never move the deadline past the grant's time plus this; `None`: no bound
    /// beyond `max_ttl_seconds` per renewal.
    pub max_lifetime_seconds: Option<u64>,
    /// The tenant whose quota the request counts against; `None` takes the value of the
    /// config's `tenant_metadata_key` in the metadata, if any.
    pub tenant: Option<String>,
    /// Wait in the queue instead of being rejected when the pool cannot hold it now
    /// (`docs/policy.md`, "Fair queue").
    pub wait: bool,
    /// How long to wait at most (`None`: the config's `queue.default_timeout_seconds`).
    pub queue_timeout_seconds: Option<u64>,
    /// `Some(false)` protects the allocation from preemption; allowed only for the config's
    /// `non_preemptible_priorities` (`None`: preemptible).
    pub preemptible: Option<bool>,
}

impl ResourceRequest {
    /// A request for nothing yet, for `job_id`; add workers or MCP servers.
    pub fn new(job_id: impl Into<String>) -> Self {
        ResourceRequest { job_id: job_id.into(), ..Default::default() }
    }

    /// Asks for `n` workers.
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// Adds an MCP server by name.
    pub fn mcp_server(mut self, name: impl Into<String>) -> Self {
        self.mcp_servers.push(name.into());
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = p;
        self
    }

    /// Sets the lifetime.
    pub fn ttl_seconds(mut self, ttl: u64) -> Self {
        self.ttl_seconds = Some(ttl);
        self
    }

    /// Sets the metadata.
    pub fn metadata(mut self, m: serde_json::Map<String, serde_json::Value>) -> Self {
        self.metadata = m;
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the tenant.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Waits in the queue (at most `timeout_seconds`, or the config's default) instead of
    /// being rejected when the pool cannot hold it now.
    pub fn wait(mut self, timeout_seconds: Option<u64>) -> Self {
        self.wait = true;
        self.queue_timeout_seconds = timeout_seconds;
        self
    }

    /// Marks the allocation preemptible or not (`false` only for the priorities the config's
    /// `non_preemptible_priorities` names).
    pub fn preemptible(mut self, preemptible: bool) -> Self {
        self.preemptible = Some(preemptible);
        self
    }

    /// Whether the allocation may be preempted (the default).
    pub fn is_preemptible(&self) -> bool {
        self.preemptible != Some(false)
    }

    /// Bounds the allocation's lifetime across renewals.
    pub fn max_lifetime_seconds(mut self, seconds: u64) -> Self {
        self.max_lifetime_seconds = Some(seconds);
        self
    }

    /// Builds a request from JSON arguments (the MCP tool's), checking each field's type.
    /// Unknown fields are rejected so that a typo does not silently fall back to a default.
    pub fn from_json(args: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        reject_unknown_arguments(args, REQUEST_ARGUMENTS)?;
        Self::from_known_json(args)
    }

    /// [`ResourceRequest::from_json`] for a tool call that may also carry the write's
    /// precondition `expected_seq` (see `Ledger::if_seq`).
    pub fn from_tool_arguments(args: &serde_json::Map<String, serde_json::Value>) -> Result<(Self, Option<u64>)> {
        reject_unknown_arguments(args, TOOL_ARGUMENTS)?;
        Ok((Self::from_known_json(args)?, json_expected_seq(args.get("expected_seq"))?))
    }

    fn from_known_json(args: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        Ok(ResourceRequest {
            job_id: json_job_id(args.get("job_id"))?,
            mcp_servers: json_mcp_servers(args.get("mcp_servers"))?,
            workers: json_workers(args.get("workers"))?,
            priority: json_priority(args.get("priority"))?,
            ttl_seconds: json_seconds("ttl_seconds", args.get("ttl_seconds"))?,
            metadata: json_metadata(args.get("metadata"))?,
            idempotency_key: json_idempotency_key(args.get("idempotency_key"))?,
            max_lifetime_seconds: json_seconds("max_lifetime_seconds", args.get("max_lifetime_seconds"))?,
            tenant: json_tenant(args.get("tenant"))?,
            wait: json_wait(args.get("wait"))?,
            queue_timeout_seconds: json_seconds("queue_timeout_seconds", args.get("queue_timeout_seconds"))?,
            preemptible: json_preemptible(args.get("preemptible"))?,
        })
    }
}

/// The fields of a request, as its errors list them.
const REQUEST_ARGUMENTS: &str = "job_id, mcp_servers, workers, priority, ttl_seconds, metadata, idempotency_key, max_lifetime_seconds, tenant, wait, queue_timeout_seconds, preemptible";
/// The arguments the `request_resources` tool takes.
const TOOL_ARGUMENTS: &str = "job_id, mcp_servers, workers, priority, ttl_seconds, metadata, idempotency_key, max_lifetime_seconds, tenant, wait, queue_timeout_seconds, preemptible, expected_seq";

fn reject_unknown_arguments(args: &serde_json::Map<String, serde_json::Value>, known: &str) -> Result<()> {
    for key in args.keys() {
        if !known.split(", ").any(|k| k == key) {
            // An empty name or one with control characters is shown quoted, so the field
            // is never blank or garbled.
            let shown = if key.is_empty() || key.chars().any(char::is_control) {
                format!("{:?}", truncate(key))
            } else {
                truncate(key)
            };
            return Err(Error::invalid(shown, format!("unknown argument; allowed arguments: {known}")));
        }
    }
    Ok(())
}

fn json_job_id(v: Option<&serde_json::Value>) -> Result<String> {
    use serde_json::Value;
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(type_err("job_id", "a string", other)),
        None => Err(Error::invalid("job_id", "is required (a non-empty string)")),
    }
}

fn json_mcp_servers(v: Option<&serde_json::Value>) -> Result<Vec<String>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(type_err(&format!("mcp_servers[{i}]"), "a string", other)),
            })
            .collect(),
        Some(other) => Err(type_err("mcp_servers", "an array of strings", other)),
    }
}

fn json_workers(v: Option<&serde_json::Value>) -> Result<u32> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_u64().and_then(|w| u32::try_from(w).ok()) {
            Some(w) => Ok(w),
            None => Err(Error::invalid(
                "workers",
                format!("{n} is not allowed: use a whole number from 0 up to the pool's worker count"),
            )),
        },
        Some(other) => Err(type_err("workers", "a whole number >= 0", other)),
    }
}

fn json_priority(v: Option<&serde_json::Value>) -> Result<Priority> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(Priority::Normal),
        Some(Value::String(s)) => Priority::parse("priority", s),
        Some(other) => Err(type_err("priority", "one of low, normal, high, critical", other)),
    }
}

fn json_seconds(field: &str, v: Option<&serde_json::Value>) -> Result<Option<u64>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) => Ok(Some(t)),
            None => Err(Error::invalid(field, format!("{n} is not allowed: use a whole number of seconds"))),
        },
        Some(other) => Err(type_err(field, "a whole number of seconds", other)),
    }
}

fn json_wait(v: Option<&serde_json::Value>) -> Result<bool> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(type_err("wait", "true or false", other)),
    }
}

fn json_preemptible(v: Option<&serde_json::Value>) -> Result<Option<bool>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(type_err("preemptible", "true or false", other)),
    }
}

fn json_tenant(v: Option<&serde_json::Value>) -> Result<Option<String>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(type_err("tenant", "a string (1 to 128 characters)", other)),
    }
}

fn json_idempotency_key(v: Option<&serde_json::Value>) -> Result<Option<String>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(type_err("idempotency_key", "a string of 1 to 128 printable bytes", other)),
    }
}

/// An optional `expected_seq`: the write's precondition (see `Ledger::if_seq`).
pub fn json_expected_seq(v: Option<&serde_json::Value>) -> Result<Option<u64>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(seq) => Ok(Some(seq)),
            None => Err(Error::invalid(
                "expected_seq",
                format!("{n} is not allowed: use the whole sequence number a read returned (current_seq)"),
            )),
        },
        Some(other) => Err(type_err("expected_seq", "a whole number (a sequence number)", other)),
    }
}

fn json_metadata(v: Option<&serde_json::Value>) -> Result<serde_json::Map<String, serde_json::Value>> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(serde_json::Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(other) => Err(type_err("metadata", "a JSON object", other)),
    }
}

/// A request whose every field passed [`validate`] against the config in force: what pricing
/// and placement take, so neither checks input again.
#[derive(Debug)]
pub struct ValidRequest<'a> {
    /// The request as given.
    pub request: &'a ResourceRequest,
    /// The lifetime to grant: the request's, or the config's default.
    pub ttl_seconds: u64,
    /// The metadata as events store it (compact JSON text).
    pub metadata: Metadata,
    /// The tenant the request counts against (its `tenant`, or the metadata's tenant key).
    pub tenant: Option<String>,
}

impl ValidRequest<'_> {
    /// The rejection of this request as `id`: short of `reason` (`needed` against `available`,
    /// in the reason's unit), with `error` the message the caller gets. Every rejection of a
    /// valid request (pool, quota, reservation, queue) is built here; a quota rejection adds
    /// which limit it hit.
    pub fn rejection(
        &self,
        id: crate::domain::model::AllocationId,
        reason: crate::domain::event::RejectReason,
        needed: u64,
        available: u64,
        error: String,
    ) -> crate::domain::event::Rejection {
        let req = self.request;
        crate::domain::event::Rejection {
            allocation_id: id,
            job_id: req.job_id.clone(),
            priority: req.priority,
            ttl_seconds: self.ttl_seconds,
            workers: req.workers,
            mcp_servers: req.mcp_servers.clone(),
            reason,
            needed,
            available,
            error,
            metadata: self.metadata.clone(),
            idempotency_key: req.idempotency_key.as_deref().map(std::sync::Arc::from),
            max_lifetime_seconds: req.max_lifetime_seconds,
            tenant: self.tenant.clone(),
            quota: None,
        }
    }
}

/// Checks a request against `config`, field by field in a fixed order (job id, MCP servers,
/// workers, lifetime, metadata); the error names the first field that is wrong and says what
/// is allowed. Nothing here depends on what the pool holds: that is pricing and placement.
pub fn validate<'a>(req: &'a ResourceRequest, config: &Config) -> Result<ValidRequest<'a>> {
    validate_job_id("job_id", &req.job_id)?;
    validate_mcp_servers(&req.mcp_servers, config)?;
    validate_workers(req, config)?;
    let ttl_seconds = validate_ttl(req.ttl_seconds, config)?;
    let metadata = validate_metadata(&req.metadata, config)?;
    if let Some(key) = &req.idempotency_key {
        crate::domain::idempotency::validate_idempotency_key("idempotency_key", key)?;
    }
    validate_max_lifetime(req.max_lifetime_seconds, ttl_seconds)?;
    let tenant = resolve_tenant(req, config)?;
    validate_preemptible(req, config)?;
    Ok(ValidRequest { request: req, ttl_seconds, metadata, tenant })
}

/// `preemptible: false` only from a priority the config lets opt out of preemption.
fn validate_preemptible(req: &ResourceRequest, config: &Config) -> Result<()> {
    if req.is_preemptible() || config.non_preemptible_priorities.contains(&req.priority) {
        return Ok(());
    }
    let allowed: Vec<&str> = config.non_preemptible_priorities.iter().map(|p| p.as_str()).collect();
    Err(Error::invalid(
        "preemptible",
        format!(
            "false is not allowed for {} priority requests; only priorities {} may ask not to be preempted (config non_preemptible_priorities)",
            req.priority,
            if allowed.is_empty() { "(none)".to_string() } else { allowed.join(", ") }
        ),
    ))
}

/// The request's tenant: its `tenant` field (checked as a tenant name), else a string under the
/// config's `tenant_metadata_key` in its metadata that is a valid tenant name (metadata written
/// before quotas existed is free-form: anything else there names no tenant).
pub fn resolve_tenant(req: &ResourceRequest, config: &Config) -> Result<Option<String>> {
    if let Some(t) = &req.tenant {
        crate::domain::quota::validate_tenant("tenant", t)?;
        return Ok(Some(t.clone()));
    }
    Ok(match req.metadata.get(&config.tenant_metadata_key) {
        Some(serde_json::Value::String(t)) if crate::domain::quota::validate_tenant("tenant", t).is_ok() => {
            Some(t.clone())
        }
        _ => None,
    })
}

/// Longest `max_lifetime_seconds`: ten years, as for `max_ttl_seconds`.
const MAX_LIFETIME_LIMIT_SECONDS: u64 = 10 * 365 * 86_400;

/// A lifetime bound at least as long as the first lease.
fn validate_max_lifetime(max_lifetime_seconds: Option<u64>, ttl_seconds: u64) -> Result<()> {
    match max_lifetime_seconds {
        Some(m) if m < ttl_seconds || m > MAX_LIFETIME_LIMIT_SECONDS => Err(Error::invalid(
            "max_lifetime_seconds",
            format!(
                "{m} is out of range; allowed values: the request's ttl_seconds ({ttl_seconds}) to {MAX_LIFETIME_LIMIT_SECONDS} seconds"
            ),
        )),
        _ => Ok(()),
    }
}

/// At most [`MAX_MCP_SERVERS_PER_REQUEST`] names, each valid, each once, each in the catalog
/// when the catalog is strict.
fn validate_mcp_servers(names: &[String], cfg: &Config) -> Result<()> {
    if names.len() > MAX_MCP_SERVERS_PER_REQUEST {
        return Err(Error::invalid(
            "mcp_servers",
            format!("{} names given; at most {MAX_MCP_SERVERS_PER_REQUEST} are allowed", names.len()),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if !mcp_name_allowed(name) {
            return Err(mcp_name_error(&format!("mcp_servers[{i}]"), name));
        }
        // A scan, not a set: at most 64 names, and no heap block per request.
        if names[..i].contains(name) {
            return Err(Error::invalid(
                format!("mcp_servers[{i}]"),
                format!("{name:?} is listed twice; name each MCP server once"),
            ));
        }
        if cfg.strict_mcp_catalog && !cfg.mcp_catalog.contains_key(name) {
            let known: Vec<&str> = cfg.mcp_catalog.keys().map(String::as_str).collect();
            return Err(Error::invalid(
                format!("mcp_servers[{i}]"),
                format!(
                    "{name:?} is not in the MCP catalog; known servers: {}",
                    if known.is_empty() { "(none)".to_string() } else { known.join(", ") }
                ),
            ));
        }
    }
    Ok(())
}

/// No more workers than the pool has, and something asked for.
fn validate_workers(req: &ResourceRequest, cfg: &Config) -> Result<()> {
    let pool = cfg.in_pool_slots();
    if req.workers > pool {
        return Err(Error::invalid(
            "workers",
            format!("{} exceeds the pool of {pool} workers; allowed values: 0 to {pool}", req.workers),
        ));
    }
    if req.workers == 0 && req.mcp_servers.is_empty() {
        return Err(Error::invalid(
            "workers",
            "the request asks for nothing: ask for at least 1 worker or name at least one MCP server in mcp_servers",
        ));
    }
    Ok(())
}

/// The lifetime to grant, within the config's bounds.
fn validate_ttl(ttl_seconds: Option<u64>, cfg: &Config) -> Result<u64> {
    let ttl_seconds = ttl_seconds.unwrap_or(cfg.default_ttl_seconds);
    if ttl_seconds < cfg.min_ttl_seconds || ttl_seconds > cfg.max_ttl_seconds {
        return Err(Error::invalid(
            "ttl_seconds",
            format!(
                "{ttl_seconds} is out of range; allowed values: {} to {} seconds",
                cfg.min_ttl_seconds, cfg.max_ttl_seconds
            ),
        ));
    }
    Ok(ttl_seconds)
}

/// The metadata as stored, within the config's size and with allowed keys.
fn validate_metadata(map: &serde_json::Map<String, serde_json::Value>, cfg: &Config) -> Result<Metadata> {
    let metadata = Metadata::from_map(map);
    let metadata_bytes = metadata.as_json().len();
    if metadata_bytes > cfg.max_metadata_bytes {
        return Err(Error::invalid(
            "metadata",
            format!("is {metadata_bytes} bytes as JSON; at most {} bytes are allowed", cfg.max_metadata_bytes),
        ));
    }
    if let Some(key) = map.keys().find(|key| !metadata_key_allowed(key)) {
        return Err(Error::invalid(
            "metadata",
            format!(
                "key {:?} is not allowed: keys are 1 to {MAX_METADATA_KEY_CHARS} characters without control characters",
                truncate(key)
            ),
        ));
    }
    Ok(metadata)
}

fn type_err(field: &str, expected: &str, got: &serde_json::Value) -> Error {
    let kind = match got {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    };
    Error::invalid(field, format!("must be {expected}, got {kind}"))
}

/// Whether `key` may name a metadata entry: 1 to 128 characters without control characters
/// (what a grant's metadata keys, and so `usage --by metadata.KEY`, may be).
pub fn metadata_key_allowed(key: &str) -> bool {
    !key.is_empty() && !key.chars().any(char::is_control) && key.chars().count() <= MAX_METADATA_KEY_CHARS
}

/// Checks a job id from outside: 1..=256 characters, no control characters.
pub fn validate_job_id(field: &str, job_id: &str) -> Result<()> {
    if job_id.trim().is_empty() {
        return Err(Error::invalid(field, "must be a non-empty string"));
    }
    if job_id.chars().count() > MAX_JOB_ID_CHARS {
        return Err(Error::invalid(
            field,
            format!("is {} characters long; at most {MAX_JOB_ID_CHARS} are allowed", job_id.chars().count()),
        ));
    }
    if job_id.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_checks_types() {
        let parse = |v: serde_json::Value| ResourceRequest::from_json(v.as_object().unwrap());
        let field = |r: Result<ResourceRequest>| match r {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(parse(serde_json::json!({"mcp_servers": []}))), "job_id");
        assert_eq!(field(parse(serde_json::json!({"job_id": 3}))), "job_id");
        assert_eq!(field(parse(serde_json::json!({"job_id": "j", "workers": -1}))), "workers");
        assert_eq!(field(parse(serde_json::json!({"job_id": "j", "workers": 1.5}))), "workers");
        assert_eq!(field(parse(serde_json::json!({"job_id": "j", "priority": "urgent"}))), "priority");
        assert_eq!(field(parse(serde_json::json!({"job_id": "j", "metadata": [1]}))), "metadata");
        assert_eq!(field(parse(serde_json::json!({"job_id": "j", "mcp_servers": [1]}))), "mcp_servers[0]");
        assert_eq!(field(parse(serde_json::json!({"job_id": "j", "wrokers": 1}))), "wrokers");
        let ok =
            parse(serde_json::json!({"job_id": "j", "workers": 2, "priority": "high", "ttl_seconds": 120})).unwrap();
        assert_eq!((ok.workers, ok.priority, ok.ttl_seconds), (2, Priority::High, Some(120)));
    }
}
