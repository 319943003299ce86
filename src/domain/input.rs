//! Request input: the one place where a request from the CLI, an MCP call or the library is
//! parsed and checked field by field (an error names the field and the allowed values).

use crate::domain::config::MAX_JOB_ID_CHARS;
use crate::domain::model::{truncate, Priority};
use crate::{Error, Result};

/// A request as validated input. Build it from CLI flags or MCP arguments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceRequest {
    pub job_id: String,
    pub mcp_servers: Vec<String>,
    pub workers: u32,
    pub priority: Priority,
    /// `None` takes the config's `default_ttl_seconds`.
    pub ttl_seconds: Option<u64>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl ResourceRequest {
    pub fn new(job_id: impl Into<String>) -> Self {
        ResourceRequest { job_id: job_id.into(), ..Default::default() }
    }

    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    pub fn mcp_server(mut self, name: impl Into<String>) -> Self {
        self.mcp_servers.push(name.into());
        self
    }

    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = p;
        self
    }

    pub fn ttl_seconds(mut self, ttl: u64) -> Self {
        self.ttl_seconds = Some(ttl);
        self
    }

    pub fn metadata(mut self, m: serde_json::Map<String, serde_json::Value>) -> Self {
        self.metadata = m;
        self
    }

    /// Builds a request from JSON arguments (the MCP tool's), checking each field's type.
    /// Unknown fields are rejected so that a typo does not silently fall back to a default.
    pub fn from_json(args: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        use serde_json::Value;
        const KNOWN: &str = "job_id, mcp_servers, workers, priority, ttl_seconds, metadata";
        for key in args.keys() {
            if !KNOWN.split(", ").any(|k| k == key) {
                // An empty name or one with control characters is shown quoted, so the field
                // is never blank or garbled.
                let shown = if key.is_empty() || key.chars().any(char::is_control) {
                    format!("{:?}", truncate(key))
                } else {
                    truncate(key)
                };
                return Err(Error::invalid(shown, format!("unknown argument; allowed arguments: {KNOWN}")));
            }
        }
        let job_id = match args.get("job_id") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(type_err("job_id", "a string", other)),
            None => return Err(Error::invalid("job_id", "is required (a non-empty string)")),
        };
        let mcp_servers = match args.get("mcp_servers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(type_err(&format!("mcp_servers[{i}]"), "a string", other)),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => return Err(type_err("mcp_servers", "an array of strings", other)),
        };
        let workers = match args.get("workers") {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(w) if w <= u32::MAX as u64 => w as u32,
                _ => {
                    return Err(Error::invalid(
                        "workers",
                        format!("{n} is not allowed: use a whole number from 0 up to the pool's worker count"),
                    ))
                }
            },
            Some(other) => return Err(type_err("workers", "a whole number >= 0", other)),
        };
        let priority = match args.get("priority") {
            None | Some(Value::Null) => Priority::Normal,
            Some(Value::String(s)) => Priority::parse("priority", s)?,
            Some(other) => return Err(type_err("priority", "one of low, normal, high, critical", other)),
        };
        let ttl_seconds = match args.get("ttl_seconds") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(t) => Some(t),
                None => {
                    return Err(Error::invalid(
                        "ttl_seconds",
                        format!("{n} is not allowed: use a whole number of seconds"),
                    ))
                }
            },
            Some(other) => return Err(type_err("ttl_seconds", "a whole number of seconds", other)),
        };
        let metadata = match args.get("metadata") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => return Err(type_err("metadata", "a JSON object", other)),
        };
        Ok(ResourceRequest { job_id, mcp_servers, workers, priority, ttl_seconds, metadata })
    }
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
    !key.is_empty() && !key.chars().any(char::is_control) && key.chars().count() <= 128
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
