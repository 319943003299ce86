//! Results of the operations, serialising to the original system's JSON shapes (with extra
//! fields: integer units beside the original's floats, deadlines, priorities).

use crate::domain::model::{AllocationId, AllocationState, Priority};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpServerInfo {
    pub name: String,
    pub endpoint: String,
    /// `running` while the allocation is active, `stopped` afterwards.
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub endpoint: String,
    /// Cores, as the original reported them.
    pub cpu: f64,
    /// MiB (the original called them MB).
    pub memory: u64,
    pub cpu_millicores: u64,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantedResources {
    pub cpu: f64,
    pub memory: u64,
    pub workers: u32,
    pub cpu_millicores: u64,
    pub memory_mib: u64,
}

/// `request_resources` when granted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantReport {
    pub allocation_id: AllocationId,
    /// Always `active`.
    pub status: AllocationState,
    pub job_id: String,
    pub priority: Priority,
    pub mcp_servers: Vec<McpServerInfo>,
    pub workers_allocated: Vec<WorkerInfo>,
    pub resources: GrantedResources,
    pub ttl_seconds: u64,
    pub created_at: String,
    pub expires_at: String,
    pub seq: u64,
}

/// `request_resources` when the pool cannot grant it (recorded as a `rejected` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedReport {
    pub allocation_id: AllocationId,
    /// Always `failed`.
    pub status: AllocationState,
    pub error: String,
    pub job_id: String,
    /// `insufficient_workers`, `insufficient_cpu` or `insufficient_memory`.
    pub reason: String,
    pub created_at: String,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestOutcome {
    Granted(GrantReport),
    Failed(FailedReport),
}

impl RequestOutcome {
    pub fn is_granted(&self) -> bool {
        matches!(self, RequestOutcome::Granted(_))
    }

    pub fn allocation_id(&self) -> AllocationId {
        match self {
            RequestOutcome::Granted(g) => g.allocation_id,
            RequestOutcome::Failed(f) => f.allocation_id,
        }
    }
}

/// `release_resources` result. `status` is `released` for a release that this call recorded, and
/// `already_released`, `already_expired` or `already_failed` when the allocation had already
/// reached that terminal state (nothing is written then).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseReport {
    pub status: String,
    pub allocation_id: AllocationId,
    pub job_id: String,
    /// The allocation's state after the call.
    pub state: AllocationState,
    pub workers_released: u32,
    pub cpu_freed: f64,
    pub memory_freed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<String>,
    pub duration_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    pub total_cpu: f64,
    pub total_memory: u64,
    pub total_workers: u32,
    pub allocated_cpu: f64,
    pub allocated_memory: u64,
    pub allocated_workers: u32,
    pub available_cpu: f64,
    pub available_memory: u64,
    pub available_workers: u32,
    /// Names of the MCP servers used by at least one active allocation.
    pub running_mcp_servers: Vec<String>,
    pub active_allocations: u64,
    pub total_cpu_millicores: u64,
    pub allocated_cpu_millicores: u64,
    pub available_cpu_millicores: u64,
    /// The instant this report describes.
    pub as_of: String,
    /// Sequence number of the last event folded into this report.
    pub seq: u64,
}

impl CapacityReport {
    /// The report for `allocated` out of `total` at `as_of_us`; available is what is left
    /// (saturating: a config change may shrink the pool below what is held).
    pub fn new(
        total: crate::domain::model::Resources,
        allocated: crate::domain::model::Resources,
        running_mcp_servers: Vec<String>,
        active_allocations: u64,
        as_of_us: crate::domain::clock::Micros,
        seq: u64,
    ) -> Self {
        use crate::domain::model::cores;
        let available = crate::domain::model::Resources {
            cpu_millicores: total.cpu_millicores.saturating_sub(allocated.cpu_millicores),
            memory_mib: total.memory_mib.saturating_sub(allocated.memory_mib),
            workers: total.workers.saturating_sub(allocated.workers),
        };
        CapacityReport {
            total_cpu: cores(total.cpu_millicores),
            total_memory: total.memory_mib,
            total_workers: total.workers,
            allocated_cpu: cores(allocated.cpu_millicores),
            allocated_memory: allocated.memory_mib,
            allocated_workers: allocated.workers,
            available_cpu: cores(available.cpu_millicores),
            available_memory: available.memory_mib,
            available_workers: available.workers,
            running_mcp_servers,
            active_allocations,
            total_cpu_millicores: total.cpu_millicores,
            allocated_cpu_millicores: allocated.cpu_millicores,
            available_cpu_millicores: available.cpu_millicores,
            as_of: crate::domain::clock::format_micros(as_of_us),
            seq,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationResources {
    pub cpu_allocated: f64,
    pub memory_allocated: u64,
    pub workers: u32,
    pub cpu_millicores: u64,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub endpoint: String,
    /// `allocated` while active, else the allocation's terminal state.
    pub status: String,
    pub cpu: f64,
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timestamps {
    pub created_at: String,
    /// When the resources were granted (same as created_at; a failed request was never active).
    pub activated_at: Option<String>,
    pub released_at: Option<String>,
    pub expired_at: Option<String>,
    pub expires_at: Option<String>,
    pub age_seconds: f64,
}

/// `get_allocation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationDetails {
    pub allocation_id: AllocationId,
    pub job_id: String,
    pub state: AllocationState,
    pub priority: Priority,
    pub resources: AllocationResources,
    pub mcp_servers: Vec<McpServerInfo>,
    pub workers: Vec<WorkerStatus>,
    pub timestamps: Timestamps,
    pub ttl_seconds: u64,
    pub is_expired: bool,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One row of `list_allocations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationSummary {
    pub allocation_id: AllocationId,
    pub job_id: String,
    pub state: AllocationState,
    pub priority: Priority,
    pub workers: u32,
    pub age_seconds: f64,
    pub is_expired: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanupReport {
    pub cleaned_up: Vec<AllocationId>,
    pub count: usize,
}
