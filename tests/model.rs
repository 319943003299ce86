//! Model-based property tests: random operation sequences run against a `Ledger` on the
//! in-memory `FaultyStorage` and against a plain reference model; after every step the ledger
//! must agree with the model, keep its accounting, never double-book a worker slot, and read
//! back the same after a close and reopen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::{FaultyStorage, Storage};
use allocation_ledger::McpCatalogEntry;
use allocation_ledger::{format_micros, Micros};
use allocation_ledger::{
    AllocationDetails, AllocationId, AllocationState, AllocationSummary, CapacityReport, Clock, Config, Error, Ledger,
    ManualClock, OpenOptions, Priority, RequestOutcome, ResourceRequest, State,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

const LEDGER_DIR: &str = "/ledger";
/// MCP server names requests pick from; the last one is invalid.
const NAMES: [&str; 5] = ["github", "slack", "db", "search", "bad name!"];

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Debug, Clone)]
enum Meta {
    Empty,
    Small(u8),
    TooBig,
}

#[derive(Debug, Clone)]
struct Req {
    job: String,
    workers: u32,
    mcp: Vec<usize>,
    priority: Priority,
    ttl: Option<u64>,
    meta: Meta,
}

#[derive(Debug, Clone)]
enum Op {
    Request(Req),
    /// Releases the known allocation at this index (modulo the number known), which may be
    /// active or already terminal.
    ReleaseKnown(usize),
    ReleaseUnknown(u64),
    ReleaseMalformed(String),
    Advance(u64),
    Cleanup,
    Snapshot,
    Reopen,
}

fn priority_strategy() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High), Just(Priority::Critical),]
}

fn request_strategy() -> impl Strategy<Value = Req> {
    // Mostly valid requests, each field now and then invalid.
    let job = prop_oneof![
        60 => (0u8..4).prop_map(|i| format!("job-{i}")),
        1 => Just(String::new()),
        1 => Just("   ".to_string()),
        1 => Just("j".repeat(257)),
        1 => Just("bad\u{7}job".to_string()),
    ];
    let ttl = prop_oneof![
        50 => (60u64..=600).prop_map(Some),
        4 => Just(None),
        1 => Just(Some(59)),
        1 => Just(Some(0)),
        1 => Just(Some(604_801)),
    ];
    let meta = prop_oneof![
        30 => Just(Meta::Empty),
        10 => any::<u8>().prop_map(Meta::Small),
        1 => Just(Meta::TooBig),
    ];
    let workers = prop_oneof![5 => 0u32..=6, 1 => 0u32..=12];
    // Distinct names in random order, sometimes followed by an invalid name or a duplicate.
    let mcp = (
        proptest::sample::subsequence(vec![0usize, 1, 2, 3], 0..=3).prop_shuffle(),
        prop_oneof![30 => Just(None), 1 => Just(Some(4usize)), 1 => Just(Some(0usize))],
    )
        .prop_map(|(mut names, extra)| {
            if let Some(e) = extra {
                names.push(e);
            }
            names
        });
    (job, workers, mcp, priority_strategy(), ttl, meta).prop_map(|(job, workers, mcp, priority, ttl, meta)| Req {
        job,
        workers,
        mcp,
        priority,
        ttl,
        meta,
    })
}

fn op_strategy(with_lifecycle: bool) -> BoxedStrategy<Op> {
    let core = prop_oneof![
        8 => request_strategy().prop_map(Op::Request),
        4 => (0usize..64).prop_map(Op::ReleaseKnown),
        1 => (0u64..=AllocationId::MAX).prop_map(Op::ReleaseUnknown),
        1 => prop_oneof![
            Just("alloc-XYZ".to_string()),
            Just(String::new()),
            Just("alloc-1234".to_string()),
        ]
        .prop_map(Op::ReleaseMalformed),
        3 => (0u64..=700).prop_map(Op::Advance),
        1 => Just(Op::Cleanup),
    ];
    if with_lifecycle {
        prop_oneof![
            18 => core,
            1 => Just(Op::Snapshot),
            1 => Just(Op::Reopen),
        ]
        .boxed()
    } else {
        core.boxed()
    }
}

fn to_request(r: &Req) -> ResourceRequest {
    let mut q = ResourceRequest::new(r.job.clone()).workers(r.workers).priority(r.priority);
    q.ttl_seconds = r.ttl;
    for &i in &r.mcp {
        q = q.mcp_server(NAMES[i]);
    }
    let mut m = serde_json::Map::new();
    match r.meta {
        Meta::Empty => {}
        Meta::Small(n) => {
            m.insert("n".into(), n.into());
            m.insert("team".into(), "infra".into());
        }
        Meta::TooBig => {
            m.insert("blob".into(), "x".repeat(17_000).into());
        }
    }
    q.metadata(m)
}

/// The default pool (the original's numbers) or a tight pool in which CPU and memory run out
/// before the worker slots do and two catalog MCP servers cost resources.
fn pool_config(tight: bool, snapshot_every: u64) -> Config {
    let mut c = common::small_config(snapshot_every);
    if tight {
        c.worker_slots = 12;
        c.total_cpu_millicores = 11_000;
        c.total_memory_mib = 20_480;
        c.mcp_catalog.insert(
            "db".into(),
            McpCatalogEntry { endpoint: "http://db.internal:5432".into(), cpu_millicores: 0, memory_mib: 4096 },
        );
        c.mcp_catalog.insert(
            "search".into(),
            McpCatalogEntry { endpoint: "http://search.internal:9200".into(), cpu_millicores: 1500, memory_mib: 0 },
        );
    }
    c.validate().expect("test config is valid");
    c
}

// ---------------------------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MState {
    Active,
    Released,
    Expired,
    Failed,
}

impl MState {
    fn name(self) -> &'static str {
        match self {
            MState::Active => "active",
            MState::Released => "released",
            MState::Expired => "expired",
            MState::Failed => "failed",
        }
    }

    fn public(self) -> AllocationState {
        match self {
            MState::Active => AllocationState::Active,
            MState::Released => AllocationState::Released,
            MState::Expired => AllocationState::Expired,
            MState::Failed => AllocationState::Failed,
        }
    }
}

#[derive(Debug, Clone)]
struct MAlloc {
    id: AllocationId,
    job: String,
    priority: Priority,
    workers: u32,
    ttl: u64,
    worker_ids: Vec<String>,
    mcp: Vec<String>,
    state: MState,
    deadline: Micros,
}

impl MAlloc {
    fn state_at(&self, now: Micros) -> MState {
        if self.state == MState::Active && now >= self.deadline {
            MState::Expired
        } else {
            self.state
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Decision {
    Grant,
    Reject { reason: &'static str, message: String },
}

#[derive(Debug)]
struct Model {
    cfg: Config,
    /// Events written so far.
    seq: u64,
    last_ts: Micros,
    allocs: Vec<MAlloc>,
    /// Endpoint each MCP name got (stable forever).
    endpoints: BTreeMap<String, String>,
    /// Names outside the catalog that got a port so far.
    assigned: u64,
}

fn valid_mcp_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars().count() <= 64
        && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Model {
    fn new(cfg: Config, created_ts: Micros) -> Self {
        Model { cfg, seq: 1, last_ts: created_ts, allocs: Vec::new(), endpoints: BTreeMap::new(), assigned: 0 }
    }

    fn next_ts(&self, clock: Micros) -> Micros {
        clock.max(self.last_ts + 1)
    }

    fn write_event(&mut self, clock: Micros) -> Micros {
        let ts = self.next_ts(clock);
        self.last_ts = ts;
        self.seq += 1;
        ts
    }

    fn find(&self, id: AllocationId) -> Option<usize> {
        self.allocs.iter().position(|a| a.id == id)
    }

    /// Every write first records the expiry of each active allocation whose deadline has
    /// come, earliest deadline first.
    fn expire_due(&mut self, clock: Micros) -> Vec<AllocationId> {
        let now = self.next_ts(clock);
        let mut due: Vec<(Micros, AllocationId, usize)> = self
            .allocs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.state == MState::Active && a.deadline <= now)
            .map(|(i, a)| (a.deadline, a.id, i))
            .collect();
        due.sort();
        for &(_, _, i) in &due {
            self.write_event(clock);
            self.allocs[i].state = MState::Expired;
        }
        due.into_iter().map(|(_, id, _)| id).collect()
    }

    /// The field an invalid request is refused for, checked in the documented order.
    fn invalid_field(&self, r: &ResourceRequest) -> Option<String> {
        let job = &r.job_id;
        if job.trim().is_empty() || job.chars().count() > 256 || job.chars().any(char::is_control) {
            return Some("job_id".into());
        }
        let mut seen = BTreeSet::new();
        for (i, n) in r.mcp_servers.iter().enumerate() {
            if !valid_mcp_name(n) || !seen.insert(n.as_str()) {
                return Some(format!("mcp_servers[{i}]"));
            }
        }
        if r.workers > self.cfg.worker_slots || (r.workers == 0 && r.mcp_servers.is_empty()) {
            return Some("workers".into());
        }
        let ttl = r.ttl_seconds.unwrap_or(3600);
        if !(60..=604_800).contains(&ttl) {
            return Some("ttl_seconds".into());
        }
        if serde_json::to_vec(&r.metadata).unwrap().len() > 16 * 1024 {
            return Some("metadata".into());
        }
        None
    }

    fn catalog_cost(&self, name: &str) -> (u64, u64) {
        self.cfg.mcp_catalog.get(name).map_or((0, 0), |e| (e.cpu_millicores, e.memory_mib))
    }

    /// (cpu, memory, workers, running MCP names) held by the allocations `holds` picks.
    fn held_by(&self, holds: impl Fn(&MAlloc) -> bool) -> (u64, u64, u32, BTreeSet<String>) {
        let mut workers = 0;
        let mut running = BTreeSet::new();
        for a in self.allocs.iter().filter(|a| holds(a)) {
            workers += a.workers;
            running.extend(a.mcp.iter().cloned());
        }
        let mut cpu = u64::from(workers) * self.cfg.worker_cpu_millicores;
        let mut mem = u64::from(workers) * self.cfg.worker_memory_mib;
        for n in &running {
            let (c, m) = self.catalog_cost(n);
            cpu += c;
            mem += m;
        }
        (cpu, mem, workers, running)
    }

    /// Grant or reject, by the rules: workers first, then CPU, then memory; a low-priority
    /// request must leave 25% (rounded up) of each pool free.
    fn decide(&self, r: &ResourceRequest) -> Decision {
        let cfg = &self.cfg;
        let (cpu_held, mem_held, workers_held, running) = self.held_by(|a| a.state == MState::Active);
        let mut need_cpu = u64::from(r.workers) * cfg.worker_cpu_millicores;
        let mut need_mem = u64::from(r.workers) * cfg.worker_memory_mib;
        for n in &r.mcp_servers {
            if !running.contains(n) {
                let (c, m) = self.catalog_cost(n);
                need_cpu += c;
                need_mem += m;
            }
        }
        let pct = if r.priority == Priority::Low { 25 } else { 0 };
        let reserve = |total: u64| (total * pct).div_ceil(100);
        let usable = |total: u64, held: u64| (total - held).saturating_sub(reserve(total));
        let w_usable = usable(u64::from(cfg.worker_slots), u64::from(workers_held));
        let c_usable = usable(cfg.total_cpu_millicores, cpu_held);
        let m_usable = usable(cfg.total_memory_mib, mem_held);
        if u64::from(r.workers) > w_usable {
            Decision::Reject {
                reason: "insufficient_workers",
                message: format!("Insufficient workers: requested {}, available {w_usable}", r.workers),
            }
        } else if need_cpu > c_usable {
            Decision::Reject {
                reason: "insufficient_cpu",
                message: format!(
                    "Insufficient CPU: needed {:?}, available {:?}",
                    need_cpu as f64 / 1000.0,
                    c_usable as f64 / 1000.0
                ),
            }
        } else if need_mem > m_usable {
            Decision::Reject {
                reason: "insufficient_memory",
                message: format!("Insufficient memory: needed {need_mem}MB, available {m_usable}MB"),
            }
        } else {
            Decision::Grant
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct Harness {
    storage: Arc<FaultyStorage>,
    clock: ManualClock,
    config: Config,
    ledger: Option<Ledger>,
    model: Model,
    /// How often each decision kind came up (to keep an eye on coverage when debugging).
    stats: BTreeMap<&'static str, u64>,
}

fn open(storage: &Arc<FaultyStorage>, clock: &ManualClock, config: Config) -> Ledger {
    Ledger::open_with(
        LEDGER_DIR,
        OpenOptions::default().storage(storage.clone()).clock(Arc::new(clock.clone())).config(config),
    )
    .expect("opening the ledger")
}

/// What a reader can see of the ledger: the state, capacity, listing and every allocation's
/// details.
#[derive(Debug, PartialEq)]
struct Observed {
    state: State,
    capacity: CapacityReport,
    list: Vec<AllocationSummary>,
    details: Vec<Option<AllocationDetails>>,
}

fn observe(ledger: &Ledger, ids: &[AllocationId]) -> Observed {
    Observed {
        state: ledger.with_state(std::clone::Clone::clone),
        capacity: ledger.get_capacity().unwrap(),
        list: ledger.list_allocations(None, None).unwrap(),
        details: ids.iter().map(|id| ledger.get_allocation(&id.to_string()).unwrap()).collect(),
    }
}

fn field_of(r: &allocation_ledger::Result<impl std::fmt::Debug>) -> Option<String> {
    match r {
        Err(Error::InvalidInput { field, .. }) => Some(field.clone()),
        _ => None,
    }
}

impl Harness {
    fn new(tight: bool) -> Self {
        let storage = Arc::new(FaultyStorage::new());
        let clock = ManualClock::at_default_epoch();
        let config = pool_config(tight, 7);
        let ledger = open(&storage, &clock, config.clone());
        assert!(ledger.recovery_report().created);
        let model = Model::new(config.clone(), clock.now_micros());
        Harness { storage, clock, config, ledger: Some(ledger), model, stats: BTreeMap::new() }
    }

    fn ledger(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let clock = self.clock.now_micros();
        match op {
            Op::Request(r) => self.request(&to_request(r), clock)?,
            Op::ReleaseKnown(i) => {
                let id = if self.model.allocs.is_empty() {
                    AllocationId::from_u64(0xdead_beef)
                } else {
                    self.model.allocs[i % self.model.allocs.len()].id
                };
                self.release(id, clock)?;
            }
            Op::ReleaseUnknown(v) => self.release(AllocationId::from_u64(*v), clock)?,
            Op::ReleaseMalformed(text) => {
                let r = self.ledger().release_resources(text);
                prop_assert_eq!(field_of(&r), Some("allocation_id".to_string()), "{:?}", r);
            }
            Op::Advance(s) => self.clock.advance_seconds(*s as i64),
            Op::Cleanup => {
                let expected = self.model.expire_due(clock);
                let report = self.ledger().cleanup_expired().unwrap();
                prop_assert_eq!(report.count, expected.len());
                prop_assert_eq!(report.cleaned_up, expected);
            }
            Op::Snapshot => {
                let info = self.ledger().snapshot().unwrap();
                prop_assert_eq!(info.seq, self.model.seq);
            }
            Op::Reopen => self.reopen()?,
        }
        self.check()
    }

    fn request(&mut self, req: &ResourceRequest, clock: Micros) -> Result<(), TestCaseError> {
        self.model.expire_due(clock);
        let result = self.ledger().request_resources(req);
        if let Some(field) = self.model.invalid_field(req) {
            *self.stats.entry("invalid").or_default() += 1;
            prop_assert_eq!(field_of(&result), Some(field), "{:?} -> {:?}", req, result);
            return Ok(());
        }
        let decision = self.model.decide(req);
        let outcome = result.map_err(|e| TestCaseError::fail(format!("{req:?}: {e}")))?;
        let ttl = req.ttl_seconds.unwrap_or(3600);
        match (decision, outcome) {
            (Decision::Grant, RequestOutcome::Granted(g)) => {
                *self.stats.entry("granted").or_default() += 1;
                let ts = self.model.write_event(clock);
                prop_assert_eq!(g.seq, self.model.seq);
                prop_assert_eq!(g.status, AllocationState::Active);
                prop_assert_eq!(&g.job_id, &req.job_id);
                prop_assert_eq!(g.priority, req.priority);
                prop_assert_eq!(g.ttl_seconds, ttl);
                prop_assert_eq!(format_micros(Micros::from_micros(g.created_at.timestamp_micros())), format_micros(ts));
                let deadline = ts + ttl as i64 * 1_000_000;
                prop_assert_eq!(
                    format_micros(Micros::from_micros(g.expires_at.timestamp_micros())),
                    format_micros(deadline)
                );
                let cfg = &self.model.cfg;
                prop_assert_eq!(g.resources.workers, req.workers);
                prop_assert_eq!(g.resources.cpu_millicores, u64::from(req.workers) * cfg.worker_cpu_millicores);
                prop_assert_eq!(g.resources.memory_mib, u64::from(req.workers) * cfg.worker_memory_mib);
                prop_assert_eq!(g.workers_allocated.len(), req.workers as usize);
                // Worker slots: valid, distinct, and held by no other active allocation.
                let held: BTreeSet<&String> = self
                    .model
                    .allocs
                    .iter()
                    .filter(|a| a.state == MState::Active)
                    .flat_map(|a| a.worker_ids.iter())
                    .collect();
                let mut mine = BTreeSet::new();
                for w in &g.workers_allocated {
                    let slot: u32 = w
                        .worker_id
                        .strip_prefix("worker-")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| TestCaseError::fail(format!("bad worker id {w:?}")))?;
                    prop_assert!(slot < cfg.worker_slots, "{:?}", w);
                    prop_assert_eq!(&w.endpoint, &format!("http://localhost:{}", 8000 + slot));
                    prop_assert!(!held.contains(&w.worker_id), "{} double-booked", w.worker_id);
                    prop_assert!(mine.insert(w.worker_id.clone()), "{} twice", w.worker_id);
                    prop_assert_eq!(w.cpu_millicores, cfg.worker_cpu_millicores);
                    prop_assert_eq!(w.memory_mib, cfg.worker_memory_mib);
                }
                // MCP servers: catalog endpoints, otherwise one stable port per name from 9000.
                let names: Vec<&str> = g.mcp_servers.iter().map(|m| m.name.as_str()).collect();
                let wanted: Vec<&str> = req.mcp_servers.iter().map(String::as_str).collect();
                prop_assert_eq!(names, wanted);
                for m in &g.mcp_servers {
                    prop_assert_eq!(&m.status, "running");
                    let expected = if let Some(e) = cfg.mcp_catalog.get(&m.name) {
                        e.endpoint.clone()
                    } else if let Some(e) = self.model.endpoints.get(&m.name) {
                        e.clone()
                    } else {
                        let e = format!("http://localhost:{}", 9000 + self.model.assigned);
                        self.model.assigned += 1;
                        e
                    };
                    prop_assert_eq!(&m.endpoint, &expected, "endpoint of {}", m.name);
                    self.model.endpoints.insert(m.name.clone(), expected);
                }
                self.model.allocs.push(MAlloc {
                    id: g.allocation_id,
                    job: req.job_id.clone(),
                    priority: req.priority,
                    workers: req.workers,
                    ttl,
                    worker_ids: g.workers_allocated.iter().map(|w| w.worker_id.clone()).collect(),
                    mcp: req.mcp_servers.clone(),
                    state: MState::Active,
                    deadline,
                });
            }
            (Decision::Reject { reason, message }, RequestOutcome::Failed(f)) => {
                *self.stats.entry(reason).or_default() += 1;
                let ts = self.model.write_event(clock);
                prop_assert_eq!(f.seq, self.model.seq);
                prop_assert_eq!(f.status, AllocationState::Failed);
                prop_assert_eq!(&f.reason, reason);
                prop_assert_eq!(&f.job_id, &req.job_id);
                prop_assert_eq!(format_micros(Micros::from_micros(f.created_at.timestamp_micros())), format_micros(ts));
                if req.priority == Priority::Low {
                    prop_assert!(f.error.starts_with(&message), "{:?} does not start with {:?}", f.error, message);
                } else {
                    prop_assert_eq!(&f.error, &message);
                }
                self.model.allocs.push(MAlloc {
                    id: f.allocation_id,
                    job: req.job_id.clone(),
                    priority: req.priority,
                    workers: req.workers,
                    ttl,
                    worker_ids: Vec::new(),
                    mcp: req.mcp_servers.clone(),
                    state: MState::Failed,
                    deadline: ts,
                });
            }
            (d, o) => {
                return Err(TestCaseError::fail(format!("model decided {d:?} for {req:?}, ledger answered {o:?}")))
            }
        }
        Ok(())
    }

    fn release(&mut self, id: AllocationId, clock: Micros) -> Result<(), TestCaseError> {
        self.model.expire_due(clock);
        let result = self.ledger().release_resources(&id.to_string());
        let Some(i) = self.model.find(id) else {
            prop_assert!(matches!(&result, Err(Error::NotFound(s)) if *s == id.to_string()), "{:?}", result);
            return Ok(());
        };
        let report = result.map_err(|e| TestCaseError::fail(format!("release {id}: {e}")))?;
        prop_assert_eq!(report.allocation_id, id);
        let a = self.model.allocs[i].clone();
        prop_assert_eq!(&report.job_id, &a.job);
        if a.state == MState::Active {
            let ts = self.model.write_event(clock);
            self.model.allocs[i].state = MState::Released;
            prop_assert_eq!(&report.status, "released");
            prop_assert_eq!(report.state, AllocationState::Released);
            prop_assert_eq!(report.workers_released, a.workers);
            prop_assert_eq!(report.memory_freed, u64::from(a.workers) * self.model.cfg.worker_memory_mib);
            prop_assert_eq!(
                report.cpu_freed,
                f64::from(a.workers) * self.model.cfg.worker_cpu_millicores as f64 / 1000.0
            );
            prop_assert_eq!(
                report.released_at.map(|t| format_micros(Micros::from_micros(t.timestamp_micros()))),
                Some(format_micros(ts))
            );
        } else {
            prop_assert_eq!(report.status, format!("already_{}", a.state.name()));
            prop_assert_eq!(report.state, a.state.public());
            prop_assert_eq!(report.workers_released, 0);
            prop_assert_eq!(report.memory_freed, 0);
        }
        Ok(())
    }

    fn reopen(&mut self) -> Result<(), TestCaseError> {
        let ids: Vec<AllocationId> = self.model.allocs.iter().map(|a| a.id).collect();
        let before = observe(self.ledger(), &ids);
        drop(self.ledger.take());
        // An existing ledger keeps the config in its log, whatever the opener passes.
        let ledger = open(&self.storage, &self.clock, Config::default());
        let report = ledger.recovery_report().clone();
        prop_assert!(!report.created);
        prop_assert!(report.torn_tail.is_none(), "{:?}", report);
        prop_assert!(report.snapshots_set_aside.is_empty(), "{:?}", report);
        prop_assert_eq!(report.last_seq, self.model.seq);
        prop_assert_eq!(report.events_replayed, self.model.seq - report.snapshot_seq.unwrap_or(0));
        let after = observe(&ledger, &ids);
        prop_assert_eq!(&after.state.config, &self.config);
        prop_assert_eq!(after, before);
        self.ledger = Some(ledger);
        Ok(())
    }

    /// Checks everything a reader can see against the model.
    fn check(&self) -> Result<(), TestCaseError> {
        let ledger = self.ledger();
        let m = &self.model;
        let status = ledger.status();
        prop_assert_eq!(status.last_seq, m.seq, "events written");
        prop_assert_eq!(status.durable_seq, m.seq, "events durable");
        prop_assert!(status.poisoned.is_none());
        let (inv, anomalies, last_ts) = ledger.with_state(|s| (s.check_invariants(), s.anomalies, s.last_ts_us));
        prop_assert_eq!(inv, Ok(()));
        prop_assert_eq!(anomalies, 0);
        prop_assert_eq!(last_ts, m.last_ts);

        let now = self.clock.now_micros().max(m.last_ts);
        let cap = ledger.get_capacity().unwrap();
        common::assert_capacity_accounting(&cap);
        let (cpu, mem, workers, running) = m.held_by(|a| a.state_at(now) == MState::Active);
        let active = m.allocs.iter().filter(|a| a.state_at(now) == MState::Active).count() as u64;
        prop_assert_eq!(cap.total_workers, m.cfg.worker_slots);
        prop_assert_eq!(cap.total_cpu_millicores, m.cfg.total_cpu_millicores);
        prop_assert_eq!(cap.total_memory, m.cfg.total_memory_mib);
        prop_assert_eq!(cap.allocated_workers, workers, "{:?}", cap);
        prop_assert_eq!(cap.allocated_cpu_millicores, cpu, "{:?}", cap);
        prop_assert_eq!(cap.allocated_memory, mem, "{:?}", cap);
        prop_assert_eq!(cap.running_mcp_servers, running.into_iter().collect::<Vec<_>>());
        prop_assert_eq!(cap.active_allocations, active);
        prop_assert_eq!(cap.seq, m.seq);

        let list = ledger.list_allocations(None, None).unwrap();
        prop_assert_eq!(list.len(), m.allocs.len());
        let listed: BTreeMap<AllocationId, &AllocationSummary> = list.iter().map(|s| (s.allocation_id, s)).collect();
        prop_assert_eq!(listed.len(), m.allocs.len(), "ids are unique");
        let active_list = ledger.list_allocations(Some(AllocationState::Active), None).unwrap();
        prop_assert_eq!(active_list.len() as u64, active);

        let mut slots_in_use = BTreeSet::new();
        for a in &m.allocs {
            let state = a.state_at(now);
            let s = listed.get(&a.id).ok_or_else(|| TestCaseError::fail(format!("{} not listed", a.id)))?;
            prop_assert_eq!(s.state, state.public(), "{}", a.id);
            prop_assert_eq!(s.is_expired, state == MState::Expired);
            prop_assert_eq!(s.workers, a.workers);
            prop_assert_eq!(&s.job_id, &a.job);
            let d = ledger
                .get_allocation(&a.id.to_string())
                .unwrap()
                .ok_or_else(|| TestCaseError::fail(format!("{} not found", a.id)))?;
            prop_assert_eq!(d.state, state.public(), "{}", a.id);
            prop_assert_eq!(d.is_expired, state == MState::Expired);
            prop_assert_eq!(&d.job_id, &a.job);
            prop_assert_eq!(d.priority, a.priority);
            prop_assert_eq!(d.ttl_seconds, a.ttl);
            prop_assert_eq!(d.resources.workers, a.workers);
            prop_assert_eq!(d.error.is_some(), a.state == MState::Failed);
            let ids: Vec<String> = d.workers.iter().map(|w| w.worker_id.clone()).collect();
            prop_assert_eq!(&ids, &a.worker_ids);
            let names: Vec<String> = d.mcp_servers.iter().map(|x| x.name.clone()).collect();
            prop_assert_eq!(&names, &a.mcp);
            if d.state == AllocationState::Active {
                for w in ids {
                    prop_assert!(slots_in_use.insert(w.clone()), "{} in two allocations", w);
                }
            }
        }
        prop_assert_eq!(slots_in_use.len() as u32, cap.allocated_workers);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The ledger behaves like the reference model, step by step, across snapshots and
    /// reopens.
    #[test]
    fn ledger_matches_the_reference_model(
        tight in any::<bool>(),
        ops in proptest::collection::vec(op_strategy(true), 1..=60),
    ) {
        let mut h = Harness::new(tight);
        h.check()?;
        for op in &ops {
            h.step(op)?;
        }
        // And once more at the end: everything survives a reopen.
        h.reopen()?;
        h.check()?;
    }

    /// Opening from a snapshot plus the log tail gives exactly the state a full replay of the
    /// log gives (and the state the writer had when it closed).
    #[test]
    fn snapshot_plus_tail_equals_full_replay(
        tight in any::<bool>(),
        snapshot_every in prop_oneof![Just(0u64), Just(3), Just(7)],
        before in proptest::collection::vec(op_strategy(false), 1..40),
        after in proptest::collection::vec(op_strategy(false), 0..40),
    ) {
        let storage = Arc::new(FaultyStorage::new());
        let clock = ManualClock::at_default_epoch();
        let config = pool_config(tight, snapshot_every);
        let ledger = open(&storage, &clock, config.clone());
        let mut known = Vec::new();
        for op in &before {
            apply_blind(&ledger, &clock, op, &mut known);
        }
        let mid = ledger.snapshot().unwrap();
        for op in &after {
            apply_blind(&ledger, &clock, op, &mut known);
        }
        let live = ledger.with_state(std::clone::Clone::clone);
        let events = common::all_events(&ledger);
        prop_assert_eq!(events.len() as u64, live.last_seq);
        drop(ledger);

        let from_snapshot = open(&storage, &clock, config.clone());
        let report = from_snapshot.recovery_report().clone();
        let snap_seq = report.snapshot_seq.expect("a snapshot was loaded");
        prop_assert!(snap_seq >= mid.seq);
        if snapshot_every == 0 {
            prop_assert_eq!(snap_seq, mid.seq);
        }
        prop_assert_eq!(report.events_replayed, live.last_seq - snap_seq);
        let a = from_snapshot.with_state(std::clone::Clone::clone);
        drop(from_snapshot);
        prop_assert_eq!(&a, &live);

        let snap_dir = Path::new(LEDGER_DIR).join("snapshots");
        for name in storage.list(&snap_dir).unwrap() {
            storage.remove(&snap_dir.join(name)).unwrap();
        }
        let replayed = open(&storage, &clock, config);
        let report = replayed.recovery_report().clone();
        prop_assert_eq!(report.snapshot_seq, None);
        prop_assert_eq!(report.events_replayed, live.last_seq);
        let b = replayed.with_state(std::clone::Clone::clone);
        prop_assert_eq!(&b, &a);
        prop_assert_eq!(&common::fold(&events), &b);
    }
}

/// Applies an operation without a model; only checks that nothing but the expected kinds of
/// refusal happen.
fn apply_blind(ledger: &Ledger, clock: &ManualClock, op: &Op, known: &mut Vec<AllocationId>) {
    let fine = |r: allocation_ledger::Result<()>| match r {
        Ok(()) | Err(Error::InvalidInput { .. } | Error::NotFound(_)) => {}
        Err(e) => panic!("{op:?}: {e}"),
    };
    match op {
        Op::Request(r) => fine(ledger.request_resources(&to_request(r)).map(|o| {
            known.push(o.allocation_id());
        })),
        Op::ReleaseKnown(i) if !known.is_empty() => {
            fine(ledger.release_resources(&known[i % known.len()].to_string()).map(drop));
        }
        Op::ReleaseKnown(_) => {}
        Op::ReleaseUnknown(v) => fine(ledger.release_resources(&AllocationId::from_u64(*v).to_string()).map(drop)),
        Op::ReleaseMalformed(t) => fine(ledger.release_resources(t).map(drop)),
        Op::Advance(s) => clock.advance_seconds(*s as i64),
        Op::Cleanup => fine(ledger.cleanup_expired().map(drop)),
        Op::Snapshot => fine(ledger.snapshot().map(drop)),
        Op::Reopen => unreachable!("not generated here"),
    }
}

/// Sanity check of the harness itself on a fixed sequence that reaches every decision kind:
/// a model that never sees a CPU or memory rejection would prove little.
#[test]
fn fixed_sequence_reaches_every_decision() {
    let mut h = Harness::new(true);
    let req = |job: &str, workers: u32, mcp: &[usize], priority: Priority| {
        Op::Request(Req { job: job.into(), workers, mcp: mcp.to_vec(), priority, ttl: Some(120), meta: Meta::Empty })
    };
    let ops = vec![
        req("a", 12, &[], Priority::Normal),    // 12 000 mc > 11 000: CPU
        req("a", 11, &[], Priority::Normal),    // 22 528 MiB > 20 480: memory
        req("a", 10, &[3], Priority::Normal),   // 10 000 + 1 500 mc: CPU
        req("a", 7, &[2, 0], Priority::Normal), // granted: 14 336 + 4 096 MiB for db
        req("b", 1, &[2], Priority::Normal),    // db already running: exactly 20 480 MiB
        req("c", 1, &[], Priority::Normal),     // memory is full
        req("d", 2, &[], Priority::Low),        // 4 slots free, low keeps 3: workers
        Op::ReleaseKnown(3),
        Op::ReleaseKnown(3),
        Op::Advance(121),
        Op::Cleanup,
        Op::ReleaseKnown(4),
        Op::ReleaseKnown(0),
        req("", 1, &[], Priority::Normal),
        Op::Reopen,
    ];
    for op in &ops {
        h.step(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    for kind in ["granted", "insufficient_workers", "insufficient_cpu", "insufficient_memory", "invalid"] {
        assert!(h.stats.get(kind).copied().unwrap_or(0) > 0, "{kind}: {:?}", h.stats);
    }
}
