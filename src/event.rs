//! Events: the log's payloads. Each records an *outcome* (which slots, which endpoints, which
//! deadline), so replay never re-runs allocation logic.

use crate::clock::Micros;
use crate::config::Config;
use crate::model::{AllocationId, Priority, Resources};
use serde::{Deserialize, Serialize};

/// Bumped whenever the event schema changes; old versions stay readable.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version of this event.
    pub v: u32,
    /// When the ledger recorded the event; strictly increasing along the log.
    pub ts_us: Micros,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// Always the first event: the ledger's identity and the config in force.
    LedgerCreated {
        ledger_id: String,
        config: Config,
    },
    /// The config in force from this event on.
    ConfigChanged {
        config: Config,
    },
    Granted(Grant),
    Rejected(Rejection),
    Released {
        allocation_id: AllocationId,
    },
    /// The allocation's deadline passed; it held resources until `deadline_us`, whenever this
    /// event was written.
    Expired {
        allocation_id: AllocationId,
        deadline_us: Micros,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerGrant {
    pub slot: u32,
    pub worker_id: String,
    pub endpoint: String,
    pub cpu_millicores: u64,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpGrant {
    pub name: String,
    pub endpoint: String,
    /// Cost charged to the pool while the server runs (once, however many allocations share it).
    #[serde(default)]
    pub cpu_millicores: u64,
    #[serde(default)]
    pub memory_mib: u64,
    /// This grant gave the name its endpoint (it was neither in the catalog nor seen before).
    #[serde(default)]
    pub assigned: bool,
    /// This grant started the server (no other active allocation was using it).
    #[serde(default)]
    pub started: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub allocation_id: AllocationId,
    pub job_id: String,
    pub priority: Priority,
    pub ttl_seconds: u64,
    pub deadline_us: Micros,
    pub workers: Vec<WorkerGrant>,
    pub mcp_servers: Vec<McpGrant>,
    /// What the workers hold (MCP server costs are charged separately, per running server).
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    InsufficientWorkers,
    InsufficientCpu,
    InsufficientMemory,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InsufficientWorkers => "insufficient_workers",
            RejectReason::InsufficientCpu => "insufficient_cpu",
            RejectReason::InsufficientMemory => "insufficient_memory",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub allocation_id: AllocationId,
    pub job_id: String,
    pub priority: Priority,
    pub ttl_seconds: u64,
    pub workers: u32,
    pub mcp_servers: Vec<String>,
    pub reason: RejectReason,
    /// In the reason's unit: workers, millicores or MiB.
    pub needed: u64,
    pub available: u64,
    /// The original's message, e.g. `Insufficient workers: requested 5, available 3`.
    pub error: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl EventBody {
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::LedgerCreated { .. } => "ledger_created",
            EventBody::ConfigChanged { .. } => "config_changed",
            EventBody::Granted(_) => "granted",
            EventBody::Rejected(_) => "rejected",
            EventBody::Released { .. } => "released",
            EventBody::Expired { .. } => "expired",
        }
    }

    /// The allocation this event is about, if any.
    pub fn allocation_id(&self) -> Option<AllocationId> {
        match self {
            EventBody::Granted(g) => Some(g.allocation_id),
            EventBody::Rejected(r) => Some(r.allocation_id),
            EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => Some(*allocation_id),
            _ => None,
        }
    }
}

impl Event {
    pub fn new(ts_us: Micros, body: EventBody) -> Self {
        Event { v: EVENT_SCHEMA_VERSION, ts_us, body }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events always serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Event, String> {
        let event: Event = serde_json::from_slice(bytes).map_err(|e| format!("undecodable event: {e}"))?;
        if event.v == 0 || event.v > EVENT_SCHEMA_VERSION {
            return Err(format!(
                "event schema version {} is not supported (this build reads 1..={EVENT_SCHEMA_VERSION})",
                event.v
            ));
        }
        Ok(event)
    }
}

/// An event with its position in the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedEvent {
    pub seq: u64,
    #[serde(flatten)]
    pub event: Event,
}
