//! Results of the operations, serialising to the original system's JSON shapes (with extra
//! fields: integer units beside the original's floats, deadlines, priorities).
//!
//! Report shaping lives here and only here: each report is a conversion from what the domain
//! decided (an event, an allocation, the state at an instant). Timestamps are typed
//! (`DateTime<Utc>`) and serialise as [`format_micros`](crate::format_micros) writes them:
//! RFC 3339 with microseconds and a `Z`.

use crate::domain::clock::{datetime, Micros};
use crate::domain::event::{EventBody, Grant, RejectReason, Rejection};
use crate::domain::idempotency::KeyRecord;
use crate::domain::input::ResourceRequest;
use crate::domain::model::{cores, AllocationId, AllocationState, Priority, Resources};
use crate::domain::state::{Allocation, State};
use crate::Result;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Serde `with` module for report timestamps: the text [`format_micros`](crate::format_micros)
/// writes, byte for byte, written straight into the output without an intermediate string.
pub(crate) mod rfc3339_micros {
    use crate::domain::clock::{Micros, MicrosText};
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `t` as `format_micros` does.
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&MicrosText(Micros::from_micros(t.timestamp_micros())))
    }

    /// Reads RFC 3339.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        // chrono's own parser also reads the five-digit years of instants past 9999.
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .or_else(|_| text.parse::<DateTime<Utc>>())
            .map_err(serde::de::Error::custom)
    }

    /// The same for optional timestamps (`null` when absent).
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `t` as `format_micros` does, or `null`.
        pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        /// Reads RFC 3339 or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] DateTime<Utc>);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(t)| t))
        }
    }
}

/// An MCP server as a report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct McpServerInfo {
    /// The server's name, as requested.
    pub name: String,
    /// Where the job reaches it.
    pub endpoint: String,
    /// `running` while the allocation is active, `stopped` afterwards (`not_started` for a
    /// failed request).
    pub status: String,
}

/// A granted worker as the grant's report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's id (`worker-NN`).
    pub worker_id: String,
    /// Where the job reaches it.
    pub endpoint: String,
    /// Cores, as the original reported them.
    pub cpu: f64,
    /// MiB (the original called them MB).
    pub memory: u64,
    /// CPU in the ledger's integer unit.
    pub cpu_millicores: u64,
    /// Memory in the ledger's integer unit.
    pub memory_mib: u64,
}

/// What a grant holds, in the original's units and in integer units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GrantedResources {
    /// Cores.
    pub cpu: f64,
    /// MiB.
    pub memory: u64,
    /// Worker slots.
    pub workers: u32,
    /// CPU in the ledger's integer unit.
    pub cpu_millicores: u64,
    /// Memory in the ledger's integer unit.
    pub memory_mib: u64,
}

/// `request_resources` when granted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GrantReport {
    /// The new allocation; keep it to release the resources.
    pub allocation_id: AllocationId,
    /// Always `active`.
    pub status: AllocationState,
    /// The job the resources are for.
    pub job_id: String,
    /// The request's priority.
    pub priority: Priority,
    /// The MCP servers, with their endpoints.
    pub mcp_servers: Vec<McpServerInfo>,
    /// The workers, with their endpoints.
    pub workers_allocated: Vec<WorkerInfo>,
    /// What the workers hold.
    pub resources: GrantedResources,
    /// The granted lifetime.
    pub ttl_seconds: u64,
    /// When the grant was recorded.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// When the allocation expires unless released first.
    #[serde(with = "rfc3339_micros")]
    pub expires_at: DateTime<Utc>,
    /// Sequence number of the grant's event.
    pub seq: u64,
    /// This answer repeats an earlier decision: the request's idempotency key was decided
    /// before (nothing was written now; `status` is the allocation's state now).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

impl GrantReport {
    /// The report of grant `g`, recorded at `ts` as event `seq`.
    pub(crate) fn from_grant(g: &Grant, ts: Micros, seq: u64) -> GrantReport {
        GrantReport {
            allocation_id: g.allocation_id,
            status: AllocationState::Active,
            job_id: g.job_id.clone(),
            priority: g.priority,
            mcp_servers: g
                .mcp_servers
                .iter()
                .map(|m| McpServerInfo { name: m.name.clone(), endpoint: m.endpoint.clone(), status: "running".into() })
                .collect(),
            workers_allocated: g.workers.iter().map(WorkerInfo::of).collect(),
            resources: GrantedResources::of(g.resources),
            ttl_seconds: g.ttl_seconds,
            created_at: datetime(ts),
            expires_at: datetime(g.deadline_us),
            seq,
            replayed: false,
        }
    }

    /// The answer to a retry of the grant that created `a` (event `seq`), as `a` is at `now`.
    pub(crate) fn replay_of(a: &Allocation, seq: u64, now: Micros) -> GrantReport {
        let state = a.state_at(now);
        let mcp_status = if a.holds_at(now) { "running" } else { "stopped" };
        GrantReport {
            allocation_id: a.id,
            status: state,
            job_id: a.job_id.clone(),
            priority: a.priority,
            mcp_servers: a
                .mcp_servers
                .iter()
                .map(|m| McpServerInfo {
                    name: m.name.clone(),
                    endpoint: m.endpoint.clone(),
                    status: mcp_status.into(),
                })
                .collect(),
            workers_allocated: a.workers.iter().map(WorkerInfo::of).collect(),
            resources: GrantedResources::of(a.resources),
            ttl_seconds: a.ttl_seconds,
            created_at: datetime(a.created_us),
            expires_at: datetime(a.deadline_us),
            seq,
            replayed: true,
        }
    }
}

impl WorkerInfo {
    fn of(w: &crate::domain::event::WorkerGrant) -> WorkerInfo {
        WorkerInfo {
            worker_id: w.worker_id.clone(),
            endpoint: w.endpoint.clone(),
            cpu: cores(w.cpu_millicores),
            memory: w.memory_mib,
            cpu_millicores: w.cpu_millicores,
            memory_mib: w.memory_mib,
        }
    }
}

impl GrantedResources {
    fn of(r: Resources) -> GrantedResources {
        GrantedResources {
            cpu: cores(r.cpu_millicores),
            memory: r.memory_mib,
            workers: r.workers,
            cpu_millicores: r.cpu_millicores,
            memory_mib: r.memory_mib,
        }
    }
}

/// `request_resources` when the pool cannot grant it (recorded as a `rejected` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FailedReport {
    /// The failed allocation's id (it is kept, in state `failed`).
    pub allocation_id: AllocationId,
    /// Always `failed`.
    pub status: AllocationState,
    /// The original's message, e.g. `Insufficient workers: requested 5, available 3`.
    pub error: String,
    /// The job the request was for.
    pub job_id: String,
    /// Which resource was short.
    pub reason: RejectReason,
    /// When the rejection was recorded.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// Sequence number of the rejection's event.
    pub seq: u64,
    /// This answer repeats an earlier decision (see [`GrantReport::replayed`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

impl FailedReport {
    /// The report of rejection `r`, recorded at `ts` as event `seq`.
    pub(crate) fn from_rejection(r: &Rejection, ts: Micros, seq: u64) -> FailedReport {
        FailedReport {
            allocation_id: r.allocation_id,
            status: AllocationState::Failed,
            error: r.error.clone(),
            job_id: r.job_id.clone(),
            reason: r.reason,
            created_at: datetime(ts),
            seq,
            replayed: false,
        }
    }

    /// The answer to a retry of the rejection that created `a` (event `seq`, for `reason`).
    pub(crate) fn replay_of(a: &Allocation, reason: RejectReason, seq: u64) -> FailedReport {
        FailedReport {
            allocation_id: a.id,
            status: if a.state == AllocationState::Cancelled { a.state } else { AllocationState::Failed },
            error: a.error.clone().unwrap_or_default(),
            job_id: a.job_id.clone(),
            reason,
            created_at: datetime(a.created_us),
            seq,
            replayed: true,
        }
    }
}

/// `request_resources`' answer: a grant, or a recorded failure (invalid input is an error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestOutcome {
    /// The pool granted the request.
    Granted(GrantReport),
    /// The pool could not hold the request.
    Failed(FailedReport),
}

impl RequestOutcome {
    /// Whether the request was granted.
    pub fn is_granted(&self) -> bool {
        matches!(self, RequestOutcome::Granted(_))
    }

    /// The allocation the request created (granted or failed).
    pub fn allocation_id(&self) -> AllocationId {
        match self {
            RequestOutcome::Granted(g) => g.allocation_id,
            RequestOutcome::Failed(f) => f.allocation_id,
        }
    }
}

/// What a `release_resources` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReleaseStatus {
    /// This call released the allocation.
    Released,
    /// It had been released already; nothing was written.
    AlreadyReleased,
    /// It had expired already; nothing was written.
    AlreadyExpired,
    /// The request had failed; nothing was held, nothing was written.
    AlreadyFailed,
    /// Never seen in practice: the log answered for an allocation that is still active (the
    /// release raced with the grant of that very id). Kept so the answer is what it always was.
    AlreadyActive,
    /// A higher-priority request had preempted it; nothing was written.
    AlreadyPreempted,
    /// It was waiting in the queue: this call cancelled it (a `cancelled` event, as
    /// `cancel_request` writes); nothing was held.
    Cancelled,
    /// Its wait had been cancelled already; nothing was written.
    AlreadyCancelled,
}

impl ReleaseStatus {
    /// The status as JSON and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseStatus::Released => "released",
            ReleaseStatus::AlreadyReleased => "already_released",
            ReleaseStatus::AlreadyExpired => "already_expired",
            ReleaseStatus::AlreadyFailed => "already_failed",
            ReleaseStatus::AlreadyActive => "already_active",
            ReleaseStatus::AlreadyPreempted => "already_preempted",
            ReleaseStatus::Cancelled => "cancelled",
            ReleaseStatus::AlreadyCancelled => "already_cancelled",
        }
    }

    /// The status of a release that found the allocation in `state` already.
    fn already(state: AllocationState) -> ReleaseStatus {
        match state {
            AllocationState::Released => ReleaseStatus::AlreadyReleased,
            AllocationState::Expired => ReleaseStatus::AlreadyExpired,
            AllocationState::Failed => ReleaseStatus::AlreadyFailed,
            AllocationState::Cancelled => ReleaseStatus::AlreadyCancelled,
            AllocationState::Pending | AllocationState::Active | AllocationState::Preempting => {
                ReleaseStatus::AlreadyActive
            }
            AllocationState::Preempted => ReleaseStatus::AlreadyPreempted,
        }
    }
}

impl std::fmt::Display for ReleaseStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares as the JSON text, so `report.status == "released"` reads as it did when the field
/// was a string.
impl PartialEq<str> for ReleaseStatus {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ReleaseStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for ReleaseStatus {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// `release_resources` result. `status` is `released` for a release that this call recorded, and
/// `already_released`, `already_expired` or `already_failed` when the allocation had already
/// reached that terminal state (nothing is written then).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReleaseReport {
    /// What this call did.
    pub status: ReleaseStatus,
    /// The allocation released.
    pub allocation_id: AllocationId,
    /// Its job.
    pub job_id: String,
    /// The allocation's state after the call.
    pub state: AllocationState,
    /// Worker slots this call freed (0 unless it released).
    pub workers_released: u32,
    /// Cores this call freed.
    pub cpu_freed: f64,
    /// MiB this call freed.
    pub memory_freed: u64,
    /// When it was released (absent unless released).
    #[serde(default, with = "rfc3339_micros::option", skip_serializing_if = "Option::is_none")]
    pub released_at: Option<DateTime<Utc>>,
    /// When it expired (already_expired only).
    #[serde(default, with = "rfc3339_micros::option", skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<DateTime<Utc>>,
    /// How long it held its resources.
    pub duration_seconds: f64,
}

impl ReleaseReport {
    /// The report of releasing active allocation `a` at `ts`.
    pub(crate) fn released(a: &Allocation, ts: Micros) -> ReleaseReport {
        debug_assert_eq!(a.state, AllocationState::Active);
        ReleaseReport {
            status: ReleaseStatus::Released,
            allocation_id: a.id,
            job_id: a.job_id.clone(),
            state: AllocationState::Released,
            workers_released: a.resources.workers,
            cpu_freed: cores(a.resources.cpu_millicores),
            memory_freed: a.resources.memory_mib,
            released_at: Some(datetime(ts)),
            expired_at: None,
            duration_seconds: seconds_between(a.created_us, ts),
        }
    }

    /// The report of a release of the waiting request `e`, cancelled at `ts`.
    pub(crate) fn cancelled(e: &crate::domain::queue::QueueEntry) -> ReleaseReport {
        ReleaseReport {
            status: ReleaseStatus::Cancelled,
            allocation_id: e.request.allocation_id,
            job_id: e.request.job_id.clone(),
            state: AllocationState::Cancelled,
            workers_released: 0,
            cpu_freed: 0.0,
            memory_freed: 0,
            released_at: None,
            expired_at: None,
            duration_seconds: 0.0,
        }
    }

    /// The report of a release of `a`, which has ended already: nothing is written.
    pub(crate) fn already_ended(a: &Allocation) -> ReleaseReport {
        let ended = a.ended_us.unwrap_or(a.created_us);
        ReleaseReport {
            status: ReleaseStatus::already(a.state),
            allocation_id: a.id,
            job_id: a.job_id.clone(),
            state: a.state,
            workers_released: 0,
            cpu_freed: 0.0,
            memory_freed: 0,
            released_at: (a.state == AllocationState::Released).then(|| datetime(ended)),
            expired_at: (a.state == AllocationState::Expired).then(|| datetime(ended)),
            duration_seconds: seconds_between(a.created_us, a.held_until()),
        }
    }
}

/// Seconds from `from` to `to`, never negative. Saturating: a crafted snapshot can hold any
/// `i64` (the fuzzer found one).
fn seconds_between(from: Micros, to: Micros) -> f64 {
    to.saturating_since(from).max(0) as f64 / 1e6
}

/// `get_capacity`: the pool, what is held and what is free, at an instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CapacityReport {
    /// The pool's cores.
    pub total_cpu: f64,
    /// The pool's MiB.
    pub total_memory: u64,
    /// The pool's worker slots.
    pub total_workers: u32,
    /// Cores held by active allocations and running MCP servers.
    pub allocated_cpu: f64,
    /// MiB held by active allocations and running MCP servers.
    pub allocated_memory: u64,
    /// Worker slots held.
    pub allocated_workers: u32,
    /// Cores free.
    pub available_cpu: f64,
    /// MiB free.
    pub available_memory: u64,
    /// Worker slots free.
    pub available_workers: u32,
    /// Names of the MCP servers used by at least one active allocation.
    pub running_mcp_servers: Vec<String>,
    /// Allocations active at the instant.
    pub active_allocations: u64,
    /// The pool's CPU in the ledger's integer unit.
    pub total_cpu_millicores: u64,
    /// Held CPU in the ledger's integer unit.
    pub allocated_cpu_millicores: u64,
    /// Free CPU in the ledger's integer unit.
    pub available_cpu_millicores: u64,
    /// The instant this report describes.
    #[serde(with = "rfc3339_micros")]
    pub as_of: DateTime<Utc>,
    /// Sequence number of the last event folded into this report.
    pub seq: u64,
    /// Drained workers an active allocation still holds: counted in the total until freed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<String>,
    /// Drained workers nobody holds: out of the total, never granted until undrained.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained: Vec<String>,
    /// Capacity the reservations in force hold (absent when none is in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<ReservedCapacity>,
}

/// The `reserved` block of a capacity report: what the reservations in force hold, and the
/// part their holders do not use (which nobody else may take).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedCapacity {
    /// Workers reserved.
    pub workers: u32,
    /// CPU reserved (the reserved workers' share).
    pub cpu_millicores: u64,
    /// Memory reserved.
    pub memory_mib: u64,
    /// Reserved workers their holders do not hold now.
    pub unused_workers: u32,
    /// Reserved CPU their holders do not hold now.
    pub unused_cpu_millicores: u64,
    /// Reserved memory their holders do not hold now.
    pub unused_memory_mib: u64,
    /// The reservations in force, by start.
    pub reservations: Vec<String>,
}

impl ReservedCapacity {
    fn of(r: crate::domain::reservation::ReservedAt) -> Self {
        ReservedCapacity {
            workers: r.reserved.workers,
            cpu_millicores: r.reserved.cpu_millicores,
            memory_mib: r.reserved.memory_mib,
            unused_workers: r.unused.workers,
            unused_cpu_millicores: r.unused.cpu_millicores,
            unused_memory_mib: r.unused.memory_mib,
            reservations: r.reservations.iter().map(ToString::to_string).collect(),
        }
    }
}

impl CapacityReport {
    /// The report with the drained slots named (ids from `config`).
    pub(crate) fn with_drains(
        mut self,
        config: &crate::domain::config::Config,
        draining: &[u32],
        drained: &[u32],
    ) -> Self {
        self.draining = draining.iter().map(|&i| config.worker_id(i)).collect();
        self.drained = drained.iter().map(|&i| config.worker_id(i)).collect();
        self
    }

    /// The report for `allocated` out of `total` at `as_of_us`; available is what is left
    /// (saturating: a config change may shrink the pool below what is held).
    pub(crate) fn new(
        total: Resources,
        allocated: Resources,
        running_mcp_servers: Vec<String>,
        active_allocations: u64,
        as_of_us: Micros,
        seq: u64,
    ) -> Self {
        let available = Resources {
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
            as_of: datetime(as_of_us),
            seq,
            draining: Vec::new(),
            drained: Vec::new(),
            reserved: None,
        }
    }

    /// The capacity `state` shows at `now`: allocations past their deadline count as expired
    /// (and their MCP servers as stopped once no one else uses them) before their expiry
    /// event is written.
    pub(crate) fn of(state: &State, now: Micros) -> CapacityReport {
        let (mut freed, stopped, expired_count) = state.pending_expiry_effect(now);
        let mut running = Vec::new();
        for (name, r) in state.running_servers() {
            let gone = stopped.get(name.as_str()).copied().unwrap_or(0);
            if gone >= r.refcount {
                freed.cpu_millicores += r.cpu_millicores;
                freed.memory_mib += r.memory_mib;
            } else {
                running.push(name.clone());
            }
        }
        let allocated = state.allocated().checked_sub(freed).unwrap_or_default();
        let active = (state.active_count() - expired_count) as u64;
        // A drained slot whose holder is past its deadline is free in truth: out of the total.
        let (draining, drained) = state.drained_slots_at(now);
        let mut total = state.total();
        total.workers = state.config.pool_workers(draining.len());
        CapacityReport::new(total, allocated, running, active, now, state.last_seq).with_drains(
            &state.config,
            &draining,
            &drained,
        )
    }
}

/// What an allocation holds, in the original's units and in integer units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AllocationResources {
    /// Cores.
    pub cpu_allocated: f64,
    /// MiB.
    pub memory_allocated: u64,
    /// Worker slots.
    pub workers: u32,
    /// CPU in the ledger's integer unit.
    pub cpu_millicores: u64,
    /// Memory in the ledger's integer unit.
    pub memory_mib: u64,
}

/// A worker of an allocation as `get_allocation` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// The worker's id.
    pub worker_id: String,
    /// Where the job reaches it.
    pub endpoint: String,
    /// `allocated` while active, else the allocation's terminal state.
    pub status: String,
    /// Cores.
    pub cpu: f64,
    /// MiB.
    pub memory: u64,
}

/// An allocation's moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Timestamps {
    /// When it was requested.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// When the resources were granted (same as created_at; a failed request was never active).
    #[serde(with = "rfc3339_micros::option")]
    pub activated_at: Option<DateTime<Utc>>,
    /// When it was released, if it was.
    #[serde(with = "rfc3339_micros::option")]
    pub released_at: Option<DateTime<Utc>>,
    /// When it expired, if it did (its deadline, whenever the expiry was written).
    #[serde(with = "rfc3339_micros::option")]
    pub expired_at: Option<DateTime<Utc>>,
    /// Its deadline; `None` for a failed request.
    #[serde(with = "rfc3339_micros::option")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Seconds since it was requested.
    pub age_seconds: f64,
}

/// `get_allocation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AllocationDetails {
    /// The allocation.
    pub allocation_id: AllocationId,
    /// Its job.
    pub job_id: String,
    /// Its state at the instant asked about.
    pub state: AllocationState,
    /// The request's priority.
    pub priority: Priority,
    /// What it holds (or held).
    pub resources: AllocationResources,
    /// Its MCP servers.
    pub mcp_servers: Vec<McpServerInfo>,
    /// Its workers.
    pub workers: Vec<WorkerStatus>,
    /// Its moments.
    pub timestamps: Timestamps,
    /// The granted (or requested) lifetime.
    pub ttl_seconds: u64,
    /// Whether it has expired by the instant asked about.
    pub is_expired: bool,
    /// The request's metadata.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Why the request failed (failed allocations only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many times the lease was renewed (absent if never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
    /// The bound on renewals: the deadline never passes creation + this (absent if unbounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<u64>,
    /// A pending request's place in the queue (1 = next), absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Why a pending request waits: the resource that is short, or who is ahead of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
    /// Whether a higher priority may preempt it (`docs/policy.md` §8; written only when
    /// `false`, so the original's shape is unchanged).
    #[serde(default = "crate::domain::preempt::yes", skip_serializing_if = "crate::domain::preempt::is_true")]
    pub preemptible: bool,
    /// While `preempting`: when its grace ends and it is preempted unless released first.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_micros::option")]
    pub preempt_deadline: Option<DateTime<Utc>>,
    /// The allocation that preempts it (or did), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempted_by: Option<AllocationId>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl AllocationDetails {
    /// `get_allocation`'s view of `a` at `now`.
    pub(crate) fn of(a: &Allocation, now: Micros) -> AllocationDetails {
        let state = a.state_at(now);
        let active = a.holds_at(now);
        let failed = a.state == AllocationState::Failed;
        let mcp_status = if failed {
            "not_started"
        } else if active {
            "running"
        } else {
            "stopped"
        };
        let worker_status = if state == AllocationState::Active { "allocated" } else { state.as_str() };
        AllocationDetails {
            allocation_id: a.id,
            job_id: a.job_id.clone(),
            state,
            priority: a.priority,
            resources: AllocationResources {
                cpu_allocated: cores(a.resources.cpu_millicores),
                memory_allocated: a.resources.memory_mib,
                workers: a.resources.workers,
                cpu_millicores: a.resources.cpu_millicores,
                memory_mib: a.resources.memory_mib,
            },
            mcp_servers: a
                .mcp_servers
                .iter()
                .map(|m| McpServerInfo {
                    name: m.name.clone(),
                    endpoint: m.endpoint.clone(),
                    status: mcp_status.into(),
                })
                .collect(),
            workers: a
                .workers
                .iter()
                .map(|w| WorkerStatus {
                    worker_id: w.worker_id.clone(),
                    endpoint: w.endpoint.clone(),
                    status: worker_status.into(),
                    cpu: cores(w.cpu_millicores),
                    memory: w.memory_mib,
                })
                .collect(),
            timestamps: Timestamps::of(a, state, now),
            ttl_seconds: a.ttl_seconds,
            is_expired: state == AllocationState::Expired,
            metadata: a.metadata.to_map(),
            error: a.error.clone(),
            renewals: a.renewals,
            max_lifetime_seconds: a.max_lifetime_seconds,
            queue_position: None,
            waiting_reason: None,
            preemptible: a.preemptible,
            preempt_deadline: a
                .preempt
                .filter(|_| state == AllocationState::Preempting)
                .map(|m| datetime(m.deadline_us)),
            preempted_by: a.preempt.map(|m| m.by),
        }
    }
}

impl Timestamps {
    /// The moments of `a`, which reads as `state` at `now`.
    fn of(a: &Allocation, state: AllocationState, now: Micros) -> Timestamps {
        let (released_at, expired_at) = match (a.state, state) {
            (AllocationState::Released, _) => (a.ended_us.map(datetime), None),
            (AllocationState::Expired, _) => (None, a.ended_us.map(datetime)),
            (AllocationState::Active, AllocationState::Expired) => (None, Some(datetime(a.deadline_us))),
            _ => (None, None),
        };
        let failed = a.state == AllocationState::Failed;
        Timestamps {
            created_at: datetime(a.created_us),
            activated_at: if failed { None } else { Some(datetime(a.created_us)) },
            released_at,
            expired_at,
            expires_at: if failed { None } else { Some(datetime(a.deadline_us)) },
            age_seconds: seconds_between(a.created_us, now),
        }
    }
}

/// One row of `list_allocations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AllocationSummary {
    /// The allocation.
    pub allocation_id: AllocationId,
    /// Its job.
    pub job_id: String,
    /// Its state at the instant asked about.
    pub state: AllocationState,
    /// The request's priority.
    pub priority: Priority,
    /// Worker slots it holds (or held, or asked for).
    pub workers: u32,
    /// Seconds since it was requested.
    pub age_seconds: f64,
    /// Whether it has expired by the instant asked about.
    pub is_expired: bool,
    /// When it was requested.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// Whether a higher priority may preempt it (written only when `false`).
    #[serde(default = "crate::domain::preempt::yes", skip_serializing_if = "crate::domain::preempt::is_true")]
    pub preemptible: bool,
    /// While `preempting`: when its grace ends.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_micros::option")]
    pub preempt_deadline: Option<DateTime<Utc>>,
}

impl AllocationSummary {
    /// `list_allocations`' row for `a` at `now`.
    pub(crate) fn of(a: &Allocation, now: Micros) -> AllocationSummary {
        let state = a.state_at(now);
        AllocationSummary {
            allocation_id: a.id,
            job_id: a.job_id.clone(),
            state,
            priority: a.priority,
            workers: a.resources.workers,
            age_seconds: seconds_between(a.created_us, now),
            is_expired: state == AllocationState::Expired,
            created_at: datetime(a.created_us),
            preemptible: a.preemptible,
            preempt_deadline: a
                .preempt
                .filter(|_| state == AllocationState::Preempting)
                .map(|m| datetime(m.deadline_us)),
        }
    }

    /// The rows of `state`'s allocations in `filter` (as seen at `now`) and of `job_id`,
    /// oldest first.
    pub(crate) fn list(
        state: &State,
        filter: Option<AllocationState>,
        job_id: Option<&str>,
        now: Micros,
    ) -> Vec<AllocationSummary> {
        // A scan: memory holds the active allocations and at most `terminal_retained` ended
        // ones, and a per-job index cost two heap blocks per grant on the fold's hot path.
        let mut out: Vec<&Allocation> = state
            .allocations()
            .filter(|a| job_id.is_none_or(|j| a.job_id == j) && filter.is_none_or(|s| a.state_at(now) == s))
            .collect();
        out.sort_by_key(|a| (a.created_us, a.id));
        out.into_iter().map(|a| AllocationSummary::of(a, now)).collect()
    }
}

// The views by the names their callers use (`state.capacity(now)`, `a.details(now)`): the
// shaping is above; the state only answers queries.

impl State {
    /// `get_capacity` at `now`; see [`CapacityReport`].
    pub fn capacity(&self, now: Micros) -> CapacityReport {
        let mut report = CapacityReport::of(self, now);
        report.reserved = self.reserved_at(now).map(ReservedCapacity::of);
        report
    }

    /// `get_allocation` of `id` at `now`, if memory holds it.
    pub fn details(&self, id: AllocationId, now: Micros) -> Option<AllocationDetails> {
        self.allocation(id).map(|a| AllocationDetails::of(a, now))
    }

    /// Allocations filtered by state (as seen at `now`) and job, oldest first.
    pub fn list(&self, state: Option<AllocationState>, job_id: Option<&str>, now: Micros) -> Vec<AllocationSummary> {
        AllocationSummary::list(self, state, job_id, now)
    }
}

impl Allocation {
    /// `get_allocation`'s view of this allocation at `now`.
    pub fn details(&self, now: Micros) -> AllocationDetails {
        AllocationDetails::of(self, now)
    }

    /// `list_allocations`' row for this allocation at `now`.
    pub fn summary(&self, now: Micros) -> AllocationSummary {
        AllocationSummary::of(self, now)
    }
}

/// `cleanup_expired`: the allocations whose expiry this call recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CleanupReport {
    /// Their ids, earliest deadline first.
    pub cleaned_up: Vec<AllocationId>,
    /// How many.
    pub count: usize,
}

/// One tenant's use against its quota (`capacity --by-tenant`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TenantCapacity {
    /// The tenant (`(none)` for allocations without one).
    pub tenant: String,
    /// What its active allocations hold: workers, and their CPU and memory.
    pub used: crate::domain::model::Resources,
    /// Its active allocations per MCP server name.
    pub mcp_servers: std::collections::BTreeMap<String, u32>,
    /// Its quota (`None`: unlimited); named in `quotas`, or the `default_quota`.
    pub quota: Option<crate::domain::quota::Quota>,
}

impl State {
    /// Every tenant that holds something or has a quota of its own, by name, with its use at
    /// `now` against its quota (allocations past their deadline hold nothing, as in
    /// `capacity`).
    pub fn tenant_capacity(&self, now: Micros) -> Vec<TenantCapacity> {
        let mut uses = self.tenants_in_use().clone();
        for (id, _) in self.due_for_expiry(now) {
            let Some(a) = self.allocation(id) else { continue };
            let key = a.tenant.as_deref().unwrap_or(crate::domain::quota::NO_TENANT);
            if let Some(u) = uses.get_mut(key) {
                u.remove(a.resources, a.mcp_servers.iter().map(|m| m.name.as_str()));
            }
        }
        let mut names: std::collections::BTreeSet<&str> = uses.keys().map(String::as_str).collect();
        names.extend(self.config.quotas.keys().map(String::as_str));
        names
            .into_iter()
            .filter(|name| self.config.quotas.contains_key(*name) || uses.get(*name).is_some_and(|u| !u.is_empty()))
            .map(|name| {
                let tenant = (name != crate::domain::quota::NO_TENANT).then_some(name);
                let used = uses.get(name).cloned().unwrap_or_default();
                TenantCapacity {
                    tenant: name.to_string(),
                    used: used.resources,
                    mcp_servers: used.mcp_servers,
                    quota: self.config.quota_of(tenant).cloned(),
                }
            })
            .collect()
    }
}

/// `renew_allocation`: the lease's new deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RenewReport {
    /// The allocation renewed.
    pub allocation_id: AllocationId,
    /// Its job.
    pub job_id: String,
    /// Always `active`.
    pub status: AllocationState,
    /// The deadline before this renewal.
    #[serde(with = "rfc3339_micros")]
    pub previous_expires_at: DateTime<Utc>,
    /// The deadline from now on.
    #[serde(with = "rfc3339_micros")]
    pub expires_at: DateTime<Utc>,
    /// The lifetime this renewal counted from now.
    pub ttl_seconds: u64,
    /// Whether `max_lifetime_seconds` cut the deadline short of now + `ttl_seconds`.
    pub capped_by_max_lifetime: bool,
    /// Renewals so far, this one included.
    pub renewals: u32,
    /// Sequence number of the `renewed` event.
    pub seq: u64,
}

/// `plan_request`: what `request_resources` would answer now, with nothing written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlanReport {
    /// Whether the request would be granted.
    pub would_grant: bool,
    /// The ledger's last sequence number: pass it as `expected_seq` to act only if nothing
    /// changed in between.
    pub current_seq: u64,
    /// The answer a request would get now (`allocation_id` and `seq` are the ones it would
    /// take if nothing else is written first; `replayed` if its idempotency key was decided).
    pub outcome: RequestOutcome,
}

// The ledger's commands: a decision (domain/decide.rs) composed with the report it answers
// with. Here, not in the domain, so the pure core never imports the report room.

/// `request_resources` decided against `state` at `ts`: the event and the caller's report.
pub(crate) fn decide_request_outcome(
    state: &State,
    ts: Micros,
    req: &ResourceRequest,
) -> Result<(Vec<EventBody>, RequestOutcome)> {
    match decide_request_or_wait(state, ts, req, false)? {
        (events, Ok(outcome)) => Ok((events, outcome)),
        (_, Err(_)) => Err(crate::Error::invalid("wait", "a waiting request is answered by request_or_queue")),
    }
}

/// [`decide_request_outcome`], where a preemption with a grace period may be decided
/// (`allow_grace`): then the answer is the preemptor's id, which waits for its grant.
pub(crate) fn decide_request_or_wait(
    state: &State,
    ts: Micros,
    req: &ResourceRequest,
    allow_grace: bool,
) -> Result<(Vec<EventBody>, std::result::Result<RequestOutcome, AllocationId>)> {
    // Victims preempted at once (grace 0) come before the grant.
    let mut bodies = state.decide_admission_preempting(req, ts, allow_grace)?;
    let seq = state.last_seq + bodies.len() as u64;
    let last = bodies.pop().ok_or_else(|| crate::Error::invalid("request", "no decision"))?;
    Ok(match last {
        EventBody::Granted(g) => {
            let report = RequestOutcome::Granted(GrantReport::from_grant(&g, ts, seq));
            bodies.push(EventBody::Granted(g));
            (bodies, Ok(report))
        }
        EventBody::Rejected(r) => {
            let report = RequestOutcome::Failed(FailedReport::from_rejection(&r, ts, seq));
            bodies.push(EventBody::Rejected(r));
            (bodies, Ok(report))
        }
        EventBody::Preempting(p) => {
            let id = p.preemptor;
            bodies.push(EventBody::Preempting(p));
            (bodies, Err(id))
        }
        // Only a request with `wait` is queued, and those take `Ledger::request_or_queue`.
        _ => return Err(crate::Error::invalid("wait", "a waiting request is answered by request_or_queue")),
    })
}

/// The answer to a request whose idempotency key `record` already decided, from its
/// allocation `a` as it is at `now`.
pub(crate) fn replayed_outcome(a: &Allocation, record: &KeyRecord, now: Micros) -> RequestOutcome {
    debug_assert_eq!(a.id, record.allocation_id);
    match record.rejected {
        None => RequestOutcome::Granted(GrantReport::replay_of(a, record.seq, now)),
        Some(reason) => RequestOutcome::Failed(FailedReport::replay_of(a, reason, record.seq)),
    }
}

/// `plan_request` decided against `state` with the clock at `clock`: the report a request
/// would get, nothing written; or the key's record when its allocation must be read from the
/// log.
pub(crate) fn plan_report(
    state: &State,
    clock: Micros,
    req: &ResourceRequest,
) -> Result<std::result::Result<PlanReport, KeyRecord>> {
    let now = crate::domain::decide::next_event_ts(state, clock);
    let current_seq = state.last_seq;
    if let Some(record) = state.decide_replay(req, now)? {
        if state.queue().get(record.allocation_id).is_some() {
            return Err(crate::Error::invalid(
                "idempotency_key",
                format!(
                    "names {}, which waits in the queue: nothing to plan (get_allocation shows its place)",
                    record.allocation_id
                ),
            ));
        }
        let Some(a) = state.allocation(record.allocation_id) else { return Ok(Err(record)) };
        let outcome = replayed_outcome(a, &record, now);
        return Ok(Ok(PlanReport { would_grant: outcome.is_granted(), current_seq, outcome }));
    }
    let planned = state.plan_request(req, clock)?;
    let outcome = match &planned.outcome {
        Ok(g) => RequestOutcome::Granted(GrantReport::from_grant(g, planned.ts_us, planned.seq)),
        Err(r) => RequestOutcome::Failed(FailedReport::from_rejection(r, planned.ts_us, planned.seq)),
    };
    Ok(Ok(PlanReport { would_grant: outcome.is_granted(), current_seq, outcome }))
}

/// A renewal decided against `state` at `ts`: the event and its report.
pub(crate) fn decide_renewal(
    state: &State,
    ts: Micros,
    id: AllocationId,
    ttl_seconds: Option<u64>,
) -> Result<(Vec<EventBody>, RenewReport)> {
    let renewal = state.decide_renewal(id, ttl_seconds, ts)?;
    let Some(a) = state.allocation(id) else { return Err(crate::Error::NotFound(id.to_string())) };
    let wanted = ts + (renewal.ttl_seconds as i64) * crate::domain::clock::MICROS_PER_SECOND;
    let report = RenewReport {
        allocation_id: id,
        job_id: a.job_id.clone(),
        status: AllocationState::Active,
        previous_expires_at: datetime(renewal.previous_deadline_us),
        expires_at: datetime(renewal.deadline_us),
        ttl_seconds: renewal.ttl_seconds,
        capped_by_max_lifetime: renewal.deadline_us < wanted,
        renewals: a.renewals.saturating_add(1),
        seq: state.last_seq + 1,
    };
    Ok((vec![EventBody::Renewed(renewal)], report))
}

/// `release_resources` decided against `state` at `ts`. An unknown id (which may have ended
/// long ago and left memory) is `NotFound`; an ended one is reported and nothing is written.
pub(crate) fn decide_release(state: &State, ts: Micros, id: AllocationId) -> Result<(Vec<EventBody>, ReleaseReport)> {
    // A request waiting in the queue holds nothing: releasing it cancels it.
    if let Some(e) = state.queue().get(id) {
        return Ok((vec![state.decide_cancel(id, ts)?], ReleaseReport::cancelled(e)));
    }
    Ok(match state.decide_release(id)? {
        (a, Some(event)) => (vec![event], ReleaseReport::released(a, ts)),
        (a, None) => (Vec::new(), ReleaseReport::already_ended(a)),
    })
}

/// `release_resources` of an allocation that has already ended: nothing is written.
pub(crate) fn already_ended_report(a: &Allocation) -> ReleaseReport {
    ReleaseReport::already_ended(a)
}

#[cfg(test)]
mod tests {
    use super::{already_ended_report, decide_release, decide_request_outcome};
    use crate::domain::clock::Micros;
    use crate::domain::config::Config;
    use crate::domain::event::EventBody;
    use crate::domain::input::ResourceRequest;
    use crate::domain::model::Priority;
    use crate::domain::state::State;

    const T0: Micros = Micros::from_micros(1_767_225_600_000_000);

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
        s.evolve(
            s.last_seq + 1,
            expired_at + 5,
            &EventBody::Expired { allocation_id: ids[0], deadline_us: expired_at },
        );
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

    /// The timestamp fields write what `format_micros` writes, across its fast and general
    /// paths, and read it back.
    #[test]
    fn timestamps_serialise_as_format_micros() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct T(#[serde(with = "super::rfc3339_micros")] chrono::DateTime<chrono::Utc>);
        for t in [
            0,
            1,
            -1,
            -62_135_596_800_000_000,
            T0.as_micros() + 123_456,
            253_402_300_799_999_999,
            253_402_300_800_000_000,
        ] {
            let at = Micros::from_micros(t);
            let json = serde_json::to_string(&T(crate::domain::clock::datetime(at))).unwrap();
            assert_eq!(json, format!("\"{}\"", crate::format_micros(at)), "{t}");
            let back: T = serde_json::from_str(&json).unwrap();
            assert_eq!(back.0.timestamp_micros(), t);
        }
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
