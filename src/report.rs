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

#[cfg(test)]
mod tests {
    use crate::domain::config::Config;
    use crate::domain::decide::{already_ended_report, decide_release, decide_request_outcome};
    use crate::domain::event::EventBody;
    use crate::domain::input::ResourceRequest;
    use crate::domain::model::{AllocationId, Priority};
    use crate::domain::state::State;

    const T0: i64 = 1_767_225_600_000_000;

    /// Every report type's JSON for a fixed clock, byte for byte what the string-typed
    /// reports produced before their fields were typed.
    #[test]
    fn report_json_is_unchanged() {
        let mut s = State::empty(Config::default());
        s.evolve(1, T0, &EventBody::LedgerCreated { ledger_id: "fixed".into(), config: Config::default() });
        let mut out = Vec::new();
        let mut meta = serde_json::Map::new();
        meta.insert("team".into(), "a".into());
        let requests = [
            (ResourceRequest::new("a").workers(2).mcp_server("github").ttl_seconds(60).metadata(meta), T0 + 1_234_567),
            (ResourceRequest::new("b").workers(9).priority(Priority::High), T0 + 2_000_001),
            (ResourceRequest::new("c").workers(1), T0 + 3_000_000),
            (ResourceRequest::new("d").workers(1).ttl_seconds(120), T0 + 4_000_000),
        ];
        let mut ids = Vec::new();
        for (req, ts) in requests {
            let (events, outcome) = decide_request_outcome(&s, ts, &req).unwrap();
            out.push(serde_json::to_string(&outcome).unwrap());
            ids.push(outcome.allocation_id());
            for e in events {
                s.evolve(s.last_seq + 1, ts, &e);
            }
        }
        let (events, report) = decide_release(&s, T0 + 5_500_000, ids[2]).unwrap();
        out.push(serde_json::to_string(&report).unwrap());
        for e in events {
            s.evolve(s.last_seq + 1, T0 + 5_500_000, &e);
        }
        let expired_at = T0 + 1_234_567 + 60_000_000;
        s.evolve(s.last_seq + 1, expired_at + 5, &EventBody::Expired { allocation_id: ids[0], deadline_us: expired_at });
        for id in &ids[..3] {
            out.push(serde_json::to_string(&already_ended_report(s.allocation(*id).unwrap())).unwrap());
            out.push(serde_json::to_string(&decide_release(&s, T0 + 90_000_000, *id).unwrap().1).unwrap());
        }
        let now = T0 + 100_000_000;
        out.push(serde_json::to_string(&s.capacity(now)).unwrap());
        out.push(serde_json::to_string(&s.capacity(T0 + 200_000_000_000)).unwrap());
        for id in &ids {
            out.push(serde_json::to_string(&s.details(*id, now).unwrap()).unwrap());
            out.push(serde_json::to_string(&s.details(*id, T0 + 200_000_000_000).unwrap()).unwrap());
        }
        out.push(serde_json::to_string(&s.list(None, None, now)).unwrap());
        out.push(serde_json::to_string(&s.allocation(ids[3]).unwrap().summary(now)).unwrap());
        let got = out.join("\n");
        assert_eq!(got, EXPECTED);
    }

    // Recorded from the string-typed reports (before this module typed them).
    const EXPECTED: &str = r#"{"allocation_id":"alloc-295fe91bc34f","status":"active","job_id":"a","priority":"normal","mcp_servers":[{"name":"github","endpoint":"http://localhost:9000","status":"running"}],"workers_allocated":[{"worker_id":"worker-00","endpoint":"http://localhost:8000","cpu":1.0,"memory":2048,"cpu_millicores":1000,"memory_mib":2048},{"worker_id":"worker-01","endpoint":"http://localhost:8001","cpu":1.0,"memory":2048,"cpu_millicores":1000,"memory_mib":2048}],"resources":{"cpu":2.0,"memory":4096,"workers":2,"cpu_millicores":2000,"memory_mib":4096},"ttl_seconds":60,"created_at":"2026-01-01T00:00:01.234567Z","expires_at":"2026-01-01T00:01:01.234567Z","seq":2}
{"allocation_id":"alloc-6083052e8ee5","status":"failed","error":"Insufficient workers: requested 9, available 8","job_id":"b","reason":"insufficient_workers","created_at":"2026-01-01T00:00:02.000001Z","seq":3}
{"allocation_id":"alloc-a29f5d43d397","status":"active","job_id":"c","priority":"normal","mcp_servers":[],"workers_allocated":[{"worker_id":"worker-02","endpoint":"http://localhost:8002","cpu":1.0,"memory":2048,"cpu_millicores":1000,"memory_mib":2048}],"resources":{"cpu":1.0,"memory":2048,"workers":1,"cpu_millicores":1000,"memory_mib":2048},"ttl_seconds":3600,"created_at":"2026-01-01T00:00:03.000000Z","expires_at":"2026-01-01T01:00:03.000000Z","seq":4}
{"allocation_id":"alloc-8c1ea5df8b24","status":"active","job_id":"d","priority":"normal","mcp_servers":[],"workers_allocated":[{"worker_id":"worker-03","endpoint":"http://localhost:8003","cpu":1.0,"memory":2048,"cpu_millicores":1000,"memory_mib":2048}],"resources":{"cpu":1.0,"memory":2048,"workers":1,"cpu_millicores":1000,"memory_mib":2048},"ttl_seconds":120,"created_at":"2026-01-01T00:00:04.000000Z","expires_at":"2026-01-01T00:02:04.000000Z","seq":5}
{"status":"released","allocation_id":"alloc-a29f5d43d397","job_id":"c","state":"released","workers_released":1,"cpu_freed":1.0,"memory_freed":2048,"released_at":"2026-01-01T00:00:05.500000Z","duration_seconds":2.5}
{"status":"already_expired","allocation_id":"alloc-295fe91bc34f","job_id":"a","state":"expired","workers_released":0,"cpu_freed":0.0,"memory_freed":0,"expired_at":"2026-01-01T00:01:01.234567Z","duration_seconds":60.0}
{"status":"already_expired","allocation_id":"alloc-295fe91bc34f","job_id":"a","state":"expired","workers_released":0,"cpu_freed":0.0,"memory_freed":0,"expired_at":"2026-01-01T00:01:01.234567Z","duration_seconds":60.0}
{"status":"already_failed","allocation_id":"alloc-6083052e8ee5","job_id":"b","state":"failed","workers_released":0,"cpu_freed":0.0,"memory_freed":0,"duration_seconds":0.0}
{"status":"already_failed","allocation_id":"alloc-6083052e8ee5","job_id":"b","state":"failed","workers_released":0,"cpu_freed":0.0,"memory_freed":0,"duration_seconds":0.0}
{"status":"already_released","allocation_id":"alloc-a29f5d43d397","job_id":"c","state":"released","workers_released":0,"cpu_freed":0.0,"memory_freed":0,"released_at":"2026-01-01T00:00:05.500000Z","duration_seconds":2.5}
{"status":"already_released","allocation_id":"alloc-a29f5d43d397","job_id":"c","state":"released","workers_released":0,"cpu_freed":0.0,"memory_freed":0,"released_at":"2026-01-01T00:00:05.500000Z","duration_seconds":2.5}
{"total_cpu":16.0,"total_memory":32768,"total_workers":10,"allocated_cpu":1.0,"allocated_memory":2048,"allocated_workers":1,"available_cpu":15.0,"available_memory":30720,"available_workers":9,"running_mcp_servers":[],"active_allocations":1,"total_cpu_millicores":16000,"allocated_cpu_millicores":1000,"available_cpu_millicores":15000,"as_of":"2026-01-01T00:01:40.000000Z","seq":7}
{"total_cpu":16.0,"total_memory":32768,"total_workers":10,"allocated_cpu":0.0,"allocated_memory":0,"allocated_workers":0,"available_cpu":16.0,"available_memory":32768,"available_workers":10,"running_mcp_servers":[],"active_allocations":0,"total_cpu_millicores":16000,"allocated_cpu_millicores":0,"available_cpu_millicores":16000,"as_of":"2026-01-03T07:33:20.000000Z","seq":7}
{"allocation_id":"alloc-295fe91bc34f","job_id":"a","state":"expired","priority":"normal","resources":{"cpu_allocated":2.0,"memory_allocated":4096,"workers":2,"cpu_millicores":2000,"memory_mib":4096},"mcp_servers":[{"name":"github","endpoint":"http://localhost:9000","status":"stopped"}],"workers":[{"worker_id":"worker-00","endpoint":"http://localhost:8000","status":"expired","cpu":1.0,"memory":2048},{"worker_id":"worker-01","endpoint":"http://localhost:8001","status":"expired","cpu":1.0,"memory":2048}],"timestamps":{"created_at":"2026-01-01T00:00:01.234567Z","activated_at":"2026-01-01T00:00:01.234567Z","released_at":null,"expired_at":"2026-01-01T00:01:01.234567Z","expires_at":"2026-01-01T00:01:01.234567Z","age_seconds":98.765433},"ttl_seconds":60,"is_expired":true,"metadata":{"team":"a"}}
{"allocation_id":"alloc-295fe91bc34f","job_id":"a","state":"expired","priority":"normal","resources":{"cpu_allocated":2.0,"memory_allocated":4096,"workers":2,"cpu_millicores":2000,"memory_mib":4096},"mcp_servers":[{"name":"github","endpoint":"http://localhost:9000","status":"stopped"}],"workers":[{"worker_id":"worker-00","endpoint":"http://localhost:8000","status":"expired","cpu":1.0,"memory":2048},{"worker_id":"worker-01","endpoint":"http://localhost:8001","status":"expired","cpu":1.0,"memory":2048}],"timestamps":{"created_at":"2026-01-01T00:00:01.234567Z","activated_at":"2026-01-01T00:00:01.234567Z","released_at":null,"expired_at":"2026-01-01T00:01:01.234567Z","expires_at":"2026-01-01T00:01:01.234567Z","age_seconds":199998.765433},"ttl_seconds":60,"is_expired":true,"metadata":{"team":"a"}}
{"allocation_id":"alloc-6083052e8ee5","job_id":"b","state":"failed","priority":"high","resources":{"cpu_allocated":0.0,"memory_allocated":0,"workers":9,"cpu_millicores":0,"memory_mib":0},"mcp_servers":[],"workers":[],"timestamps":{"created_at":"2026-01-01T00:00:02.000001Z","activated_at":null,"released_at":null,"expired_at":null,"expires_at":null,"age_seconds":97.999999},"ttl_seconds":3600,"is_expired":false,"metadata":{},"error":"Insufficient workers: requested 9, available 8"}
{"allocation_id":"alloc-6083052e8ee5","job_id":"b","state":"failed","priority":"high","resources":{"cpu_allocated":0.0,"memory_allocated":0,"workers":9,"cpu_millicores":0,"memory_mib":0},"mcp_servers":[],"workers":[],"timestamps":{"created_at":"2026-01-01T00:00:02.000001Z","activated_at":null,"released_at":null,"expired_at":null,"expires_at":null,"age_seconds":199997.999999},"ttl_seconds":3600,"is_expired":false,"metadata":{},"error":"Insufficient workers: requested 9, available 8"}
{"allocation_id":"alloc-a29f5d43d397","job_id":"c","state":"released","priority":"normal","resources":{"cpu_allocated":1.0,"memory_allocated":2048,"workers":1,"cpu_millicores":1000,"memory_mib":2048},"mcp_servers":[],"workers":[{"worker_id":"worker-02","endpoint":"http://localhost:8002","status":"released","cpu":1.0,"memory":2048}],"timestamps":{"created_at":"2026-01-01T00:00:03.000000Z","activated_at":"2026-01-01T00:00:03.000000Z","released_at":"2026-01-01T00:00:05.500000Z","expired_at":null,"expires_at":"2026-01-01T01:00:03.000000Z","age_seconds":97.0},"ttl_seconds":3600,"is_expired":false,"metadata":{}}
{"allocation_id":"alloc-a29f5d43d397","job_id":"c","state":"released","priority":"normal","resources":{"cpu_allocated":1.0,"memory_allocated":2048,"workers":1,"cpu_millicores":1000,"memory_mib":2048},"mcp_servers":[],"workers":[{"worker_id":"worker-02","endpoint":"http://localhost:8002","status":"released","cpu":1.0,"memory":2048}],"timestamps":{"created_at":"2026-01-01T00:00:03.000000Z","activated_at":"2026-01-01T00:00:03.000000Z","released_at":"2026-01-01T00:00:05.500000Z","expired_at":null,"expires_at":"2026-01-01T01:00:03.000000Z","age_seconds":199997.0},"ttl_seconds":3600,"is_expired":false,"metadata":{}}
{"allocation_id":"alloc-8c1ea5df8b24","job_id":"d","state":"active","priority":"normal","resources":{"cpu_allocated":1.0,"memory_allocated":2048,"workers":1,"cpu_millicores":1000,"memory_mib":2048},"mcp_servers":[],"workers":[{"worker_id":"worker-03","endpoint":"http://localhost:8003","status":"allocated","cpu":1.0,"memory":2048}],"timestamps":{"created_at":"2026-01-01T00:00:04.000000Z","activated_at":"2026-01-01T00:00:04.000000Z","released_at":null,"expired_at":null,"expires_at":"2026-01-01T00:02:04.000000Z","age_seconds":96.0},"ttl_seconds":120,"is_expired":false,"metadata":{}}
{"allocation_id":"alloc-8c1ea5df8b24","job_id":"d","state":"expired","priority":"normal","resources":{"cpu_allocated":1.0,"memory_allocated":2048,"workers":1,"cpu_millicores":1000,"memory_mib":2048},"mcp_servers":[],"workers":[{"worker_id":"worker-03","endpoint":"http://localhost:8003","status":"expired","cpu":1.0,"memory":2048}],"timestamps":{"created_at":"2026-01-01T00:00:04.000000Z","activated_at":"2026-01-01T00:00:04.000000Z","released_at":null,"expired_at":"2026-01-01T00:02:04.000000Z","expires_at":"2026-01-01T00:02:04.000000Z","age_seconds":199996.0},"ttl_seconds":120,"is_expired":true,"metadata":{}}
[{"allocation_id":"alloc-295fe91bc34f","job_id":"a","state":"expired","priority":"normal","workers":2,"age_seconds":98.765433,"is_expired":true,"created_at":"2026-01-01T00:00:01.234567Z"},{"allocation_id":"alloc-6083052e8ee5","job_id":"b","state":"failed","priority":"high","workers":9,"age_seconds":97.999999,"is_expired":false,"created_at":"2026-01-01T00:00:02.000001Z"},{"allocation_id":"alloc-a29f5d43d397","job_id":"c","state":"released","priority":"normal","workers":1,"age_seconds":97.0,"is_expired":false,"created_at":"2026-01-01T00:00:03.000000Z"},{"allocation_id":"alloc-8c1ea5df8b24","job_id":"d","state":"active","priority":"normal","workers":1,"age_seconds":96.0,"is_expired":false,"created_at":"2026-01-01T00:00:04.000000Z"}]
{"allocation_id":"alloc-8c1ea5df8b24","job_id":"d","state":"active","priority":"normal","workers":1,"age_seconds":96.0,"is_expired":false,"created_at":"2026-01-01T00:00:04.000000Z"}"#;
}
