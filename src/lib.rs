//! allocation-ledger: an event-sourced, durable ledger that hands worker slots and MCP servers
//! to AI-agent jobs.
//!
//! Every request, grant, rejection, release and expiry is a checksummed event appended to a
//! write-ahead log; the state is a fold over that log. See `docs/design.md` for the rooms and
//! `docs/format.md` for the bytes on disk.
//!
//! ```no_run
//! use allocation_ledger::{Ledger, ResourceRequest, RequestOutcome};
//! let ledger = Ledger::open("/tmp/ledger").unwrap();
//! match ledger.request_resources(&ResourceRequest::new("job-1").workers(2).mcp_server("github")).unwrap() {
//!     RequestOutcome::Granted(g) => println!("got {} workers as {}", g.workers_allocated.len(), g.allocation_id),
//!     RequestOutcome::Failed(f) => println!("not granted: {}", f.error),
//! }
//! ```

// The rooms (docs/design.md). Private: the public surface is the `pub use` list below.
mod domain;
mod error;
mod history;
mod ledger;
mod log;
mod maintenance;
#[cfg(feature = "etcd")]
mod replica;
mod report;
mod whatif;

/// The MCP server (stdio and Streamable HTTP); feature `server`.
#[cfg(feature = "server")]
pub mod mcp;

pub use domain::clock::{format_micros, parse_duration_micros, parse_time, Clock, ManualClock, Micros, SystemClock};
pub use domain::config::{Config, McpCatalogEntry, PriorityReservePercent};
pub use domain::event::{
    Event, EventBody, Grant, LoggedEvent, McpGrant, RejectReason, Rejection, Renewal, WorkerGrant,
};
pub use domain::idempotency::{KeyRecord, KeyView, SharedKeys, MAX_IDEMPOTENCY_KEY_BYTES};
pub use domain::input::{validate_job_id, ResourceRequest};
pub use domain::model::{AllocationId, AllocationState, Metadata, Priority, Resources};
pub use domain::pool::{describe_change, parse_worker, pool_summary, ConfigFieldChange, PoolChange, POOL_ACTIONS};
pub use domain::preempt::{PendingPreemption, PreemptMark, PreemptPolicy, Preempted, Preempting, PreemptionPolicy};
pub use domain::queue::{HeadStart, Queue, QueueConfig, QueueEntry, Queued};
pub use domain::quota::{Quota, QuotaExceeded, TenantUse, NO_TENANT};
pub use domain::reservation::{Reservation, ReservationId, ReservationRejection, ReservationRequest, ReservedAt};
pub use domain::state::{Allocation, State};
pub use error::{Damage, Error, ErrorKind, ExitCode, Result};
pub use history::{
    EventRange, GroupBy, History, HistoryEvent, McpServerUsage, Timeline, TimelineBucket, UsageAmounts, UsageGroup,
    UsageReport,
};
pub use history::{LogPoint, PoolView, StateAt, Step, StepFilter};
pub use ledger::{
    log_cursor, log_cursor_seq, page_history, AllocationPage, ListFilter, PAGE_DEFAULT_LIMIT, PAGE_MAX_LIMIT,
};
pub use ledger::{Admission, CancelReport, GrantWait, PendingReport, RequestFuture};
pub use ledger::{CancelReservationReport, ReservationInfo, ReservationList, ReserveReport};
pub use ledger::{ConfigApplyReport, PoolChangeReport, PoolReport, PoolSlot};
pub use ledger::{Durable, IfSeq, Ledger, LedgerStatus, OpenOptions, RecoveryReport, SetAside, SnapshotInfo};
pub use ledger::{HistogramSnapshot, LedgerMetrics, MetricsSnapshot};
pub use ledger::{Replication, WeakLedger};
pub use log::chain::{chain_next, BadChainValue, ChainHead, ChainValue, GENESIS as CHAIN_GENESIS};
pub use log::follow::{gone_error, oldest_servable_seq, LogFollower, DAMAGE_GRACE};
pub use maintenance::repair::{
    plan_repair, repair, Cut, LostEvent, RepairKind, RepairOptions, RepairPlan, RepairReport, SnapshotAside,
};
pub use maintenance::verify::{verify, SegmentReport, SnapshotReport, VerifyReport};
pub use maintenance::verify::{verify_with, ExpectHeadReport, VerifyOptions};
#[cfg(feature = "etcd")]
pub use replica::{compare_chain, EtcdOptions};
pub use report::{
    AllocationDetails, AllocationResources, AllocationSummary, CapacityReport, CleanupReport, FailedReport,
    GrantReport, GrantedResources, McpServerInfo, PlanReport, ReleaseReport, ReleaseStatus, RenewReport,
    RequestOutcome, ReservedCapacity, TenantCapacity, Timestamps, WorkerInfo, WorkerStatus,
};
pub use whatif::{
    BucketPair, Comparison, GroupRow, Hold, OutcomeChanges, ResourceUse, SideReport, SimObserver, WaitStats,
    WhatIfOptions, WhatIfReport,
};

/// The layout of a ledger directory.
pub mod layout {
    pub use crate::log::layout::*;
}

/// Where the ledger keeps its bytes: the [`Storage`](storage::Storage) trait every file
/// operation goes through, and its implementation on real files.
pub mod storage {
    pub use crate::log::storage::*;
}

/// The on-disk format's building blocks (record framing, segments, snapshots, log scans) and
/// other internals, for format tests, fixtures, fuzzing and benchmarks. Feature `test-util`;
/// not a stable API.
#[cfg(feature = "test-util")]
pub mod testing {
    pub use crate::domain::input::validate_job_id;
    pub use crate::domain::state::sort_for_snapshot;
    pub use crate::log::{record, segment, snapshot, wal};
}
