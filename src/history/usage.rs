//! Usage accounting and the utilisation series. Everything is integrated in integer units
//! (millicore-microseconds, MiB-microseconds, worker-microseconds, in `u128`); the reports
//! carry floats (seconds) converted once at the end.

use crate::domain::clock::{format_micros, Micros};
use crate::domain::event::{EventBody, McpGrant};
use crate::domain::model::{AllocationId, AllocationState, Resources};
use crate::domain::state::Allocation;
use crate::ledger::index::{CapacityIndex, Step};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// How usage is grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// By job id.
    Job,
    /// By the value of this metadata key; allocations without it go to the group `(none)`.
    Metadata(String),
    /// By the tenant recorded with each grant (its quota's tenant); `(none)` for allocations
    /// without one.
    Tenant,
}

/// The group of allocations that lack the metadata key grouped by.
pub const NO_GROUP: &str = "(none)";

impl GroupBy {
    /// `job` or `metadata.KEY`.
    pub fn parse(field: &str, text: &str) -> Result<GroupBy> {
        if text == "job" {
            return Ok(GroupBy::Job);
        }
        if text == "tenant" {
            return Ok(GroupBy::Tenant);
        }
        match text.strip_prefix("metadata.") {
            // A key no grant can have would only ever report the group "(none)".
            Some(key) if !key.is_empty() && !crate::domain::input::metadata_key_allowed(key) => Err(Error::invalid(
                field,
                format!(
                    "{:?} names a metadata key no allocation can have: keys are 1 to 128 characters without control characters",
                    text.chars().take(80).collect::<String>()
                ),
            )),
            Some(key) if !key.is_empty() => Ok(GroupBy::Metadata(key.to_string())),
            _ => Err(Error::invalid(
                field,
                format!("{text:?} is not a grouping; use `job`, `tenant` or `metadata.KEY` (e.g. metadata.team)"),
            )),
        }
    }

    /// The grouping as [`GroupBy::parse`] reads it.
    pub fn as_string(&self) -> String {
        match self {
            GroupBy::Job => "job".into(),
            GroupBy::Metadata(k) => format!("metadata.{k}"),
            GroupBy::Tenant => "tenant".into(),
        }
    }

    fn key_of(&self, job_id: &str, metadata: &crate::domain::model::Metadata, tenant: Option<&str>) -> String {
        match self {
            GroupBy::Job => job_id.to_string(),
            GroupBy::Tenant => tenant.unwrap_or(NO_GROUP).to_string(),
            GroupBy::Metadata(k) => match metadata.get(k) {
                None => NO_GROUP.into(),
                Some(serde_json::Value::String(s)) => s,
                Some(v) => v.to_string(),
            },
        }
    }
}

/// Amounts used over the window by one group (or in total).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageAmounts {
    /// CPU-seconds (cores × seconds).
    pub cpu_seconds: f64,
    /// MiB-seconds.
    pub memory_mib_seconds: f64,
    /// Worker-seconds.
    pub worker_seconds: f64,
    /// Allocations that held resources at some point in the window.
    pub allocations: u64,
    /// Allocations granted in the window.
    pub granted: u64,
    /// Allocations whose holding ended in the window, by how it ended.
    pub released: u64,
    /// Expiries are counted at the deadline, whenever the expiry event was written.
    pub expired: u64,
    /// Requests rejected in the window, by reason (`insufficient_workers`, `insufficient_cpu`,
    /// `insufficient_memory`).
    pub rejected: u64,
    /// The rejections counted by reason.
    pub rejections: BTreeMap<String, u64>,
    /// Exact integral of CPU held, in millicore-µs (the seconds above are derived from it).
    #[serde(skip)]
    pub cpu_millicore_us: u128,
    /// Exact integral of memory held, in MiB-µs.
    #[serde(skip)]
    pub memory_mib_us: u128,
    /// Exact integral of workers held, in worker-µs.
    #[serde(skip)]
    pub worker_us: u128,
}

impl UsageAmounts {
    fn add_held(&mut self, r: Resources, us: i64) {
        let us = us as u128;
        self.cpu_millicore_us += u128::from(r.cpu_millicores) * us;
        self.memory_mib_us += u128::from(r.memory_mib) * us;
        self.worker_us += u128::from(r.workers) * us;
    }

    fn add(&mut self, o: &UsageAmounts) {
        self.cpu_millicore_us += o.cpu_millicore_us;
        self.memory_mib_us += o.memory_mib_us;
        self.worker_us += o.worker_us;
        self.allocations += o.allocations;
        self.granted += o.granted;
        self.released += o.released;
        self.expired += o.expired;
        self.rejected += o.rejected;
        for (k, v) in &o.rejections {
            *self.rejections.entry(k.clone()).or_default() += v;
        }
    }

    fn finish(&mut self) {
        self.cpu_seconds = self.cpu_millicore_us as f64 / 1e9;
        self.memory_mib_seconds = self.memory_mib_us as f64 / 1e6;
        self.worker_seconds = self.worker_us as f64 / 1e6;
    }
}

/// What one group (a job, or a metadata value) used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageGroup {
    /// The job id or metadata value (`(none)` without the key).
    pub group: String,
    /// What it used.
    #[serde(flatten)]
    pub usage: UsageAmounts,
}

/// What a shared MCP server cost while it ran (charged once, however many allocations used it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McpServerUsage {
    /// The server's catalog name.
    pub name: String,
    /// How long it ran within the window.
    pub running_seconds: f64,
    /// CPU-seconds it cost.
    pub cpu_seconds: f64,
    /// MiB-seconds it cost.
    pub memory_mib_seconds: f64,
    /// Exact integral of its CPU, in millicore-µs.
    #[serde(skip)]
    pub cpu_millicore_us: u128,
    /// Exact integral of its memory, in MiB-µs.
    #[serde(skip)]
    pub memory_mib_us: u128,
}

/// Usage over a window, grouped, with MCP server costs and totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// The window, clamped to the ledger's life (`since` no earlier than its first event,
    /// `until` no later than now).
    pub since: String,
    /// The window's end, in RFC 3339.
    pub until: String,
    /// The window's start, in µs since the epoch.
    pub since_us: Micros,
    /// The window's end, in µs since the epoch.
    pub until_us: Micros,
    /// The window's length.
    pub window_seconds: f64,
    /// `job` or `metadata.KEY`.
    pub group_by: String,
    /// Sorted by group name.
    pub groups: Vec<UsageGroup>,
    /// MCP servers with a cost that ran in the window, by name.
    pub mcp_servers: Vec<McpServerUsage>,
    /// Every group plus the MCP servers' costs: the integral of the allocated capacity.
    pub total: UsageAmounts,
}

fn clip(start: Micros, end: Micros, since: Micros, until: Micros) -> i64 {
    (end.min(until) - start.max(since)).max(0)
}

/// One allocation's holding, as far as the window is concerned.
struct Holding {
    group: String,
    start: Micros,
    deadline: Micros,
    resources: Resources,
    /// (name, cpu, memory) of each MCP server it uses that has a cost.
    servers: Vec<(String, u64, u64)>,
    released_at: Option<Micros>,
}

/// Usage over `[since, until)`, built from the allocations holding at `since` (from the state
/// just before it) and the events in the window, in log order.
pub(super) struct UsageBuilder<'a> {
    since: Micros,
    until: Micros,
    by: &'a GroupBy,
    holdings: HashMap<AllocationId, Holding>,
    groups: HashMap<String, UsageAmounts>,
}

impl<'a> UsageBuilder<'a> {
    pub(super) fn new(since: Micros, until: Micros, by: &'a GroupBy) -> Self {
        UsageBuilder { since, until, by, holdings: HashMap::new(), groups: HashMap::new() }
    }

    fn hold(
        &mut self,
        id: AllocationId,
        group: String,
        start: Micros,
        deadline: Micros,
        r: Resources,
        mcp: &[McpGrant],
    ) {
        let servers = mcp
            .iter()
            .filter(|m| m.cpu_millicores > 0 || m.memory_mib > 0)
            .map(|m| (m.name.clone(), m.cpu_millicores, m.memory_mib))
            .collect();
        self.holdings.insert(id, Holding { group, start, deadline, resources: r, servers, released_at: None });
    }

    /// An allocation of the state just before the window: counted if it still held at `since`
    /// (or its deadline is `since` itself, which ends it in the window).
    pub(super) fn add_before(&mut self, a: &Allocation) {
        if a.state == AllocationState::Active && a.deadline_us >= self.since {
            let group = self.by.key_of(&a.job_id, &a.metadata, a.tenant.as_deref());
            self.hold(a.id, group, a.created_us, a.deadline_us, a.resources, &a.mcp_servers);
        }
    }

    /// An event with `since <= ts < until`.
    pub(super) fn observe(&mut self, ts: Micros, body: &EventBody) {
        match body {
            EventBody::Granted(g) => {
                let group = self.by.key_of(&g.job_id, &g.metadata, g.tenant.as_deref());
                self.groups.entry(group.clone()).or_default().granted += 1;
                self.hold(g.allocation_id, group, ts, g.deadline_us, g.resources, &g.mcp_servers);
            }
            EventBody::Released { allocation_id }
            | EventBody::Preempted(crate::domain::preempt::Preempted { allocation_id, .. }) => {
                if let Some(h) = self.holdings.get_mut(allocation_id) {
                    if h.released_at.is_none() && ts < h.deadline {
                        h.released_at = Some(ts);
                    }
                }
            }
            EventBody::Rejected(r) => {
                let g = self.groups.entry(self.by.key_of(&r.job_id, &r.metadata, r.tenant.as_deref())).or_default();
                g.rejected += 1;
                *g.rejections.entry(r.reason.as_str().to_string()).or_default() += 1;
            }
            // A renewal moves the end of the same holding: one allocation, one interval.
            EventBody::Renewed(r) => {
                if let Some(h) = self.holdings.get_mut(&r.allocation_id) {
                    if h.released_at.is_none() {
                        h.deadline = r.deadline_us;
                    }
                }
            }
            // An expiry ends the holding at the deadline, known from the grant or the last
            // renewal.
            EventBody::Expired { .. }
            | EventBody::LedgerCreated { .. }
            | EventBody::ConfigChanged { .. }
            | EventBody::Queued(_)
            | EventBody::Preempting(_)
            | EventBody::Cancelled { .. } => {}
            // Reservations hold nothing in use until an allocation does.
            EventBody::Reserved(_) | EventBody::ReservationRejected(_) | EventBody::ReservationCancelled { .. } => {}
        }
    }

    pub(super) fn finish(self) -> UsageReport {
        let (since, until, by) = (self.since, self.until, self.by);
        let mut groups = self.groups;
        // Per MCP server name: (start, end, cpu, memory) of each holding that used it.
        let mut servers: BTreeMap<String, Vec<(Micros, Micros, u64, u64)>> = BTreeMap::new();
        for h in self.holdings.into_values() {
            let end = h.released_at.unwrap_or(h.deadline);
            let held = clip(h.start, end, since, until);
            let g = groups.entry(h.group).or_default();
            if held > 0 {
                g.allocations += 1;
                g.add_held(h.resources, held);
            }
            if h.released_at.is_some() {
                g.released += 1;
            } else if h.deadline >= since && h.deadline < until {
                g.expired += 1;
            }
            for (name, cpu, mem) in h.servers {
                servers.entry(name).or_default().push((h.start, end, cpu, mem));
            }
        }
        let mcp_servers = mcp_server_usage(servers, since, until);
        let mut total = UsageAmounts::default();
        let mut groups: Vec<UsageGroup> = groups
            .into_iter()
            .map(|(group, mut usage)| {
                total.add(&usage);
                usage.finish();
                UsageGroup { group, usage }
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        for m in &mcp_servers {
            total.cpu_millicore_us += m.cpu_millicore_us;
            total.memory_mib_us += m.memory_mib_us;
        }
        total.finish();
        UsageReport {
            since: format_micros(since),
            until: format_micros(until),
            since_us: since,
            until_us: until,
            window_seconds: (until - since) as f64 / 1e6,
            group_by: by.as_string(),
            groups,
            mcp_servers,
            total,
        }
    }
}

/// What each MCP server cost over `[since, until)`, from the holdings that used it (per
/// server: start, end, cpu and memory of each).
fn mcp_server_usage(
    servers: BTreeMap<String, Vec<(Micros, Micros, u64, u64)>>,
    since: Micros,
    until: Micros,
) -> Vec<McpServerUsage> {
    // A server runs while any holding that uses it lasts; each run costs what the grant
    // that started it recorded (every grant during a run records the run's cost).
    let mut mcp_servers = Vec::new();
    for (name, mut holdings) in servers {
        holdings.sort_by_key(|h| h.0);
        let mut u = McpServerUsage {
            name,
            running_seconds: 0.0,
            cpu_seconds: 0.0,
            memory_mib_seconds: 0.0,
            cpu_millicore_us: 0,
            memory_mib_us: 0,
        };
        let mut running_us = 0i64;
        let mut i = 0;
        while i < holdings.len() {
            let (run_start, mut run_end, cpu, mem) = holdings[i];
            let mut j = i + 1;
            while j < holdings.len() && holdings[j].0 < run_end {
                run_end = run_end.max(holdings[j].1);
                j += 1;
            }
            let d = clip(run_start, run_end, since, until);
            running_us += d;
            u.cpu_millicore_us += u128::from(cpu) * d as u128;
            u.memory_mib_us += u128::from(mem) * d as u128;
            i = j;
        }
        if running_us > 0 {
            u.running_seconds = running_us as f64 / 1e6;
            u.cpu_seconds = u.cpu_millicore_us as f64 / 1e9;
            u.memory_mib_seconds = u.memory_mib_us as f64 / 1e6;
            mcp_servers.push(u);
        }
    }
    mcp_servers
}

/// One bucket of the utilisation series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineBucket {
    /// The bucket's start, in RFC 3339.
    pub start: String,
    /// Its end, in RFC 3339.
    pub end: String,
    /// Its start, in µs since the epoch.
    pub start_us: Micros,
    /// Its end, in µs since the epoch.
    pub end_us: Micros,
    /// Time-weighted means over the bucket: cores, MiB, workers.
    pub allocated_cpu: f64,
    /// Mean total CPU, in cores.
    pub total_cpu: f64,
    /// allocated / total (null when the total is 0).
    pub cpu_utilisation: Option<f64>,
    /// Mean memory allocated, in MiB.
    pub allocated_memory: f64,
    /// Mean total memory, in MiB.
    pub total_memory: f64,
    /// Memory allocated / total (null when the total is 0).
    pub memory_utilisation: Option<f64>,
    /// Mean workers allocated.
    pub allocated_workers: f64,
    /// Mean total workers.
    pub total_workers: f64,
    /// Workers allocated / total (null when the total is 0).
    pub worker_utilisation: Option<f64>,
    /// Highest values within the bucket.
    pub peak_allocated_cpu: f64,
    /// Highest memory allocated within the bucket, in MiB.
    pub peak_allocated_memory: u64,
    /// Highest workers allocated within the bucket.
    pub peak_allocated_workers: u32,
    /// Exact integrals over the bucket: [allocated cpu, memory, workers, total cpu, memory,
    /// workers] in unit-µs.
    #[serde(skip)]
    pub integrals: [u128; 6],
}

/// Utilisation over a window, bucket by bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// The window's start, in RFC 3339.
    pub since: String,
    /// Its end, in RFC 3339.
    pub until: String,
    /// Its start, in µs since the epoch.
    pub since_us: Micros,
    /// Its end, in µs since the epoch.
    pub until_us: Micros,
    /// Each bucket's length (the last may be shorter).
    pub bucket_seconds: f64,
    /// The buckets, oldest first.
    pub buckets: Vec<TimelineBucket>,
}

pub(super) fn timeline(ix: &CapacityIndex, since: Micros, until: Micros, bucket_us: i64) -> Timeline {
    let tail = ix.tail_steps(until);
    let steps: Vec<&Step> = ix.steps().iter().chain(tail.iter()).collect();
    let totals = |s: &Step| ix.totals_of(s);
    let mut buckets = Vec::new();
    let mut j = steps.partition_point(|s| s.t <= since).saturating_sub(1);
    let mut a = since;
    while a < until {
        let b = (a + bucket_us).min(until);
        let mut acc = [0u128; 6];
        let (mut peak_cpu, mut peak_mem, mut peak_workers) = (0u64, 0u64, 0u32);
        while j < steps.len() {
            let s = steps[j];
            let next = steps.get(j + 1).map_or(Micros::MAX, |n| n.t);
            let (lo, hi) = (s.t.max(a), next.min(b));
            if hi > lo {
                let d = (hi - lo) as u128;
                let t = totals(s);
                acc[0] += u128::from(s.cpu_millicores) * d;
                acc[1] += u128::from(s.memory_mib) * d;
                acc[2] += u128::from(s.workers) * d;
                acc[3] += u128::from(t.cpu_millicores) * d;
                acc[4] += u128::from(t.memory_mib) * d;
                acc[5] += u128::from(t.workers) * d;
                peak_cpu = peak_cpu.max(s.cpu_millicores);
                peak_mem = peak_mem.max(s.memory_mib);
                peak_workers = peak_workers.max(s.workers);
            }
            if next >= b {
                break;
            }
            j += 1;
        }
        let width = (b - a) as f64;
        let mean = |x: u128| x as f64 / width;
        let ratio = |x: u128, t: u128| (t > 0).then(|| x as f64 / t as f64);
        buckets.push(TimelineBucket {
            start: format_micros(a),
            end: format_micros(b),
            start_us: a,
            end_us: b,
            allocated_cpu: mean(acc[0]) / 1000.0,
            total_cpu: mean(acc[3]) / 1000.0,
            cpu_utilisation: ratio(acc[0], acc[3]),
            allocated_memory: mean(acc[1]),
            total_memory: mean(acc[4]),
            memory_utilisation: ratio(acc[1], acc[4]),
            allocated_workers: mean(acc[2]),
            total_workers: mean(acc[5]),
            worker_utilisation: ratio(acc[2], acc[5]),
            peak_allocated_cpu: peak_cpu as f64 / 1000.0,
            peak_allocated_memory: peak_mem,
            peak_allocated_workers: peak_workers,
            integrals: acc,
        });
        a = b;
    }
    Timeline {
        since: format_micros(since),
        until: format_micros(until),
        since_us: since,
        until_us: until,
        bucket_seconds: bucket_us as f64 / 1e6,
        buckets,
    }
}
