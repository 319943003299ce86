//! The side-by-side account of reality and the what-if: outcomes, rejections by reason,
//! utilisation per resource (integrated exactly over the window, in integer units), per job
//! and per tenant, and a bucketed timeline of both for the chart.

use crate::domain::clock::{format_micros, Micros};
use crate::domain::model::Resources;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Jobs (and tenants) tracked one by one; beyond this many, the rest are counted together as
/// `(other)`, so the table stays bounded however many distinct jobs a log holds.
pub const MAX_GROUPS: usize = 10_000;

/// Group rows listed in a report, the largest differences first.
pub const MAX_GROUPS_LISTED: usize = 100;

/// Buckets of the timeline both sides are drawn from.
pub const TIMELINE_BUCKETS: usize = 120;

/// Which of the two runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// What the log recorded.
    Reality,
    /// The re-decided run.
    WhatIf,
}

/// What became of one request on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Granted.
    Granted,
    /// Rejected for this reason (`insufficient_workers`, ...).
    Rejected(&'static str),
    /// Not valid under the what-if's config (a field out of its bounds); never in reality.
    Invalid,
}

/// Use of one resource over the window, in its display unit (workers, cores, MiB).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResourceUse {
    /// The most held at any instant.
    pub peak_allocated: f64,
    /// Held, averaged over the window's time.
    pub mean_allocated: f64,
    /// The pool's size, averaged over the window's time.
    pub mean_total: f64,
    /// The highest share of the pool held at any instant (0 to 1).
    pub peak_utilisation: f64,
    /// Held over pool, both integrated over the window (0 to 1).
    pub mean_utilisation: f64,
}

/// One side's account.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SideReport {
    /// Requests granted.
    pub granted: u64,
    /// Requests rejected.
    pub rejected: u64,
    /// Rejections by reason.
    pub rejections: BTreeMap<String, u64>,
    /// Requests not valid under this side's config (what-if only).
    pub invalid: u64,
    /// Allocations released by their holder.
    pub released: u64,
    /// Allocations that reached their deadline.
    pub expired: u64,
    /// Requests that waited in the queue (`wait: true`) and how long.
    pub waits: WaitStats,
    /// Worker slots.
    pub workers: ResourceUse,
    /// CPU, in cores.
    pub cpu: ResourceUse,
    /// Memory, in MiB.
    pub memory: ResourceUse,
}

/// The queue on one side: requests that waited, what became of them, and how long they
/// waited (until granted, timed out, cancelled, or the window's end).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WaitStats {
    /// Requests that joined the queue.
    pub count: u64,
    /// Of them, granted from the queue.
    pub granted: u64,
    /// Timed out (`queue_timeout`).
    pub timed_out: u64,
    /// Cancelled by their caller.
    pub cancelled: u64,
    /// Still waiting at the window's end.
    pub waiting_at_end: u64,
    /// Seconds waited, all of them together.
    pub total_wait_seconds: f64,
    /// The longest wait, seconds.
    pub max_wait_seconds: f64,
}

impl WaitStats {
    fn waited(&mut self, wait_us: i64) {
        let seconds = wait_us.max(0) as f64 / 1e6;
        self.total_wait_seconds += seconds;
        self.max_wait_seconds = self.max_wait_seconds.max(seconds);
    }
}

/// How a wait ended on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// Granted from the queue.
    Granted,
    /// Timed out.
    TimedOut,
    /// Cancelled by its caller.
    Cancelled,
    /// Still waiting when the window closed.
    Open,
}

/// One job's (or tenant's) requests and their outcomes on both sides.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupRow {
    /// The job id or tenant (`(other)`: the groups beyond the tracked ones).
    pub name: String,
    /// Requests in the window.
    pub requests: u64,
    /// Granted in reality.
    pub reality_granted: u64,
    /// Rejected in reality.
    pub reality_rejected: u64,
    /// Granted in the what-if.
    pub what_if_granted: u64,
    /// Rejected in the what-if.
    pub what_if_rejected: u64,
    /// Not valid under the what-if's config.
    pub what_if_invalid: u64,
    /// Worker-seconds its allocations held within the window in reality (CPU and memory of
    /// workers are multiples of it: each worker holds the pool's per-worker amounts).
    pub reality_worker_seconds: f64,
    /// The same in the what-if.
    pub what_if_worker_seconds: f64,
}

impl GroupRow {
    /// Grants gained (positive) or lost (negative) in the what-if.
    pub fn granted_difference(&self) -> i64 {
        self.what_if_granted as i64 - self.reality_granted as i64
    }
}

/// How the outcomes of the same requests compare.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeChanges {
    /// Granted on both sides.
    pub granted_in_both: u64,
    /// Rejected (or invalid) on both sides.
    pub rejected_in_both: u64,
    /// Rejected in reality, granted in the what-if.
    pub granted_only_in_what_if: u64,
    /// Granted in reality, rejected (or invalid) in the what-if.
    pub granted_only_in_reality: u64,
}

/// One bucket of the timeline: mean held and mean pool per resource, on both sides.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BucketPair {
    /// Where the bucket starts (µs since the epoch).
    pub start_us: Micros,
    /// Where it ends.
    pub end_us: Micros,
    /// Reality: workers, cores, MiB held (mean over the bucket).
    pub reality_allocated: [f64; 3],
    /// Reality: the pool (mean over the bucket).
    pub reality_total: [f64; 3],
    /// What-if: held.
    pub what_if_allocated: [f64; 3],
    /// What-if: the pool.
    pub what_if_total: [f64; 3],
}

/// Integrals of held and pool per resource, in unit-µs.
#[derive(Debug, Clone, Copy, Default)]
struct Integral {
    allocated: [u128; 3],
    total: [u128; 3],
}

/// The levels and running integrals of one side.
#[derive(Debug, Clone, Default)]
struct Track {
    allocated: [u64; 3],
    total: [u64; 3],
    peak: [u64; 3],
    peak_share: [f64; 3],
    whole: Integral,
    buckets: Vec<Integral>,
    report: SideReport,
}

fn levels(r: Resources) -> [u64; 3] {
    [u64::from(r.workers), r.cpu_millicores, r.memory_mib]
}

impl Track {
    fn set(&mut self, allocated: Resources, total: Resources) {
        self.allocated = levels(allocated);
        self.total = levels(total);
        for i in 0..3 {
            self.peak[i] = self.peak[i].max(self.allocated[i]);
            if self.total[i] > 0 {
                let share = self.allocated[i] as f64 / self.total[i] as f64;
                self.peak_share[i] = self.peak_share[i].max(share);
            }
        }
    }

    fn add(integral: &mut Integral, allocated: &[u64; 3], total: &[u64; 3], dt: u128) {
        for i in 0..3 {
            integral.allocated[i] += u128::from(allocated[i]) * dt;
            integral.total[i] += u128::from(total[i]) * dt;
        }
    }

    fn resource(&self, i: usize, span_us: u128, unit: f64) -> ResourceUse {
        let mean = |v: u128| if span_us == 0 { 0.0 } else { v as f64 / span_us as f64 / unit };
        let (a, t) = (self.whole.allocated[i], self.whole.total[i]);
        ResourceUse {
            peak_allocated: self.peak[i] as f64 / unit,
            mean_allocated: mean(a),
            mean_total: mean(t),
            peak_utilisation: self.peak_share[i],
            mean_utilisation: if t == 0 { 0.0 } else { a as f64 / t as f64 },
        }
    }
}

/// Display units of workers, CPU (millicores to cores) and memory.
const UNITS: [f64; 3] = [1.0, 1000.0, 1.0];

/// Outcome counts of one group.
fn count(row: &mut GroupRow, side: Side, outcome: Outcome) {
    match (side, outcome) {
        (Side::Reality, Outcome::Granted) => row.reality_granted += 1,
        (Side::Reality, _) => row.reality_rejected += 1,
        (Side::WhatIf, Outcome::Granted) => row.what_if_granted += 1,
        (Side::WhatIf, Outcome::Rejected(_)) => row.what_if_rejected += 1,
        (Side::WhatIf, Outcome::Invalid) => row.what_if_invalid += 1,
    }
}

/// A bounded table of groups (jobs or tenants).
#[derive(Debug, Default)]
struct Groups {
    rows: HashMap<String, GroupRow>,
    other: GroupRow,
}

impl Groups {
    /// The row of `name`, or `(other)` once the table is full.
    fn row(&mut self, name: &str) -> &mut GroupRow {
        if self.rows.len() < MAX_GROUPS && !self.rows.contains_key(name) {
            self.rows.insert(name.to_string(), GroupRow { name: name.to_string(), ..GroupRow::default() });
        }
        match self.rows.get_mut(name) {
            Some(row) => row,
            None => &mut self.other,
        }
    }

    fn record(&mut self, name: &str, reality: Outcome, what_if: Outcome) {
        let row = self.row(name);
        row.requests += 1;
        count(row, Side::Reality, reality);
        count(row, Side::WhatIf, what_if);
    }

    /// The rows whose outcomes differ, the largest differences first (then by name).
    fn listed(self) -> (Vec<GroupRow>, u64) {
        let mut rows: Vec<GroupRow> = self.rows.into_values().collect();
        if self.other.requests > 0 {
            rows.push(GroupRow { name: "(other)".into(), ..self.other });
        }
        rows.retain(|r| {
            (r.reality_granted, r.reality_rejected) != (r.what_if_granted, r.what_if_rejected + r.what_if_invalid)
        });
        rows.sort_by(|a, b| {
            b.granted_difference().abs().cmp(&a.granted_difference().abs()).then_with(|| a.name.cmp(&b.name))
        });
        let differing = rows.len() as u64;
        rows.truncate(MAX_GROUPS_LISTED);
        (rows, differing)
    }
}

/// The running account of both sides over the window `[since, until)`.
#[derive(Debug)]
pub struct Compare {
    since: Micros,
    until: Micros,
    now: Micros,
    bucket_us: i64,
    sides: [Track; 2],
    changes: OutcomeChanges,
    requests: u64,
    jobs: Groups,
    tenants: Groups,
    /// Each side's allocations held now: whose, how many workers, since when.
    holdings: [HashMap<crate::domain::model::AllocationId, Holding>; 2],
}

/// An allocation being held on one side, for the per-job and per-tenant worker-seconds.
#[derive(Debug, Clone)]
struct Holding {
    job: String,
    tenant: Option<String>,
    workers: u32,
    start: Micros,
}

impl Compare {
    /// An account of `[since, until)` (until after since).
    pub fn new(since: Micros, until: Micros) -> Compare {
        let span = (until - since).max(1);
        let bucket_us = (span + TIMELINE_BUCKETS as i64 - 1) / TIMELINE_BUCKETS as i64;
        let n = (span + bucket_us - 1) / bucket_us;
        let track = Track { buckets: vec![Integral::default(); n as usize], ..Track::default() };
        Compare {
            since,
            until,
            now: since,
            bucket_us,
            sides: [track.clone(), track],
            changes: OutcomeChanges::default(),
            requests: 0,
            jobs: Groups::default(),
            tenants: Groups::default(),
            holdings: [HashMap::new(), HashMap::new()],
        }
    }

    /// An allocation granted on `side` at `start` begins to hold `workers` for its job and
    /// tenant.
    pub fn hold(
        &mut self,
        side: Side,
        id: crate::domain::model::AllocationId,
        job: &str,
        tenant: Option<&str>,
        workers: u32,
        start: Micros,
    ) {
        let h = Holding { job: job.to_string(), tenant: tenant.map(str::to_string), workers, start };
        self.holdings[side as usize].insert(id, h);
    }

    /// The allocation stops holding at `end`: its worker-seconds within the window go to its
    /// job's and tenant's rows.
    pub fn unhold(&mut self, side: Side, id: crate::domain::model::AllocationId, end: Micros) {
        let Some(h) = self.holdings[side as usize].remove(&id) else { return };
        let (from, to) = (h.start.max(self.since), end.min(self.until));
        if to <= from || h.workers == 0 {
            return;
        }
        let worker_seconds = f64::from(h.workers) * (to - from) as f64 / 1e6;
        let add = |row: &mut GroupRow| match side {
            Side::Reality => row.reality_worker_seconds += worker_seconds,
            Side::WhatIf => row.what_if_worker_seconds += worker_seconds,
        };
        add(self.jobs.row(&h.job));
        if let Some(t) = &h.tenant {
            add(self.tenants.row(t));
        }
    }

    fn track(&mut self, side: Side) -> &mut Track {
        &mut self.sides[side as usize]
    }

    /// Sets one side's levels from this instant on.
    pub fn set(&mut self, side: Side, allocated: Resources, total: Resources) {
        self.track(side).set(allocated, total);
    }

    /// Integrates both sides' levels up to `t` (clamped to the window).
    pub fn advance(&mut self, t: Micros) {
        let t = t.min(self.until);
        while self.now < t {
            let b = ((self.now - self.since) / self.bucket_us) as usize;
            let bucket_end = self.since + (b as i64 + 1) * self.bucket_us;
            let upto = t.min(bucket_end);
            let dt = (upto - self.now) as u128;
            for track in &mut self.sides {
                let (allocated, total) = (track.allocated, track.total);
                Track::add(&mut track.whole, &allocated, &total, dt);
                if let Some(bucket) = track.buckets.get_mut(b) {
                    Track::add(bucket, &allocated, &total, dt);
                }
            }
            self.now = upto;
        }
    }

    /// Counts a release or an expiry on one side.
    pub fn ended(&mut self, side: Side, expired: bool) {
        let r = &mut self.track(side).report;
        if expired {
            r.expired += 1;
        } else {
            r.released += 1;
        }
    }

    /// Counts one request's outcomes.
    pub fn request(&mut self, job: &str, tenant: Option<&str>, reality: Outcome, what_if: Outcome) {
        self.requests += 1;
        for (side, outcome) in [(Side::Reality, reality), (Side::WhatIf, what_if)] {
            let r = &mut self.track(side).report;
            match outcome {
                Outcome::Granted => r.granted += 1,
                Outcome::Rejected(reason) => {
                    r.rejected += 1;
                    *r.rejections.entry(reason.to_string()).or_default() += 1;
                }
                Outcome::Invalid => r.invalid += 1,
            }
        }
        let c = &mut self.changes;
        match (reality == Outcome::Granted, what_if == Outcome::Granted) {
            (true, true) => c.granted_in_both += 1,
            (false, false) => c.rejected_in_both += 1,
            (false, true) => c.granted_only_in_what_if += 1,
            (true, false) => c.granted_only_in_reality += 1,
        }
        self.jobs.record(job, reality, what_if);
        if let Some(t) = tenant {
            self.tenants.record(t, reality, what_if);
        }
    }

    /// A request joined the queue on `side`.
    pub fn queued(&mut self, side: Side) {
        self.track(side).report.waits.count += 1;
    }

    /// A wait on `side` ended as `end` after `wait_us`.
    pub fn wait_ended(&mut self, side: Side, end: WaitEnd, wait_us: i64) {
        let w = &mut self.track(side).report.waits;
        match end {
            WaitEnd::Granted => w.granted += 1,
            WaitEnd::TimedOut => w.timed_out += 1,
            WaitEnd::Cancelled => w.cancelled += 1,
            WaitEnd::Open => w.waiting_at_end += 1,
        }
        w.waited(wait_us);
    }

    fn side_report(&self, side: Side) -> SideReport {
        let track = &self.sides[side as usize];
        let span = (self.until - self.since).max(0) as u128;
        SideReport {
            workers: track.resource(0, span, UNITS[0]),
            cpu: track.resource(1, span, UNITS[1]),
            memory: track.resource(2, span, UNITS[2]),
            ..track.report.clone()
        }
    }

    fn timeline(&self) -> Vec<BucketPair> {
        let [reality, what_if] = &self.sides;
        let mean = |i: &Integral, len: i64| -> ([f64; 3], [f64; 3]) {
            let len = len.max(1) as f64;
            let f = |k: usize, v: &[u128; 3]| v[k] as f64 / len / UNITS[k];
            ([0, 1, 2].map(|k| f(k, &i.allocated)), [0, 1, 2].map(|k| f(k, &i.total)))
        };
        (0..reality.buckets.len())
            .map(|b| {
                let start_us = self.since + b as i64 * self.bucket_us;
                let end_us = (start_us + self.bucket_us).min(self.until);
                let (ra, rt) = mean(&reality.buckets[b], end_us - start_us);
                let (wa, wt) = mean(&what_if.buckets[b], end_us - start_us);
                BucketPair {
                    start_us,
                    end_us,
                    reality_allocated: ra,
                    reality_total: rt,
                    what_if_allocated: wa,
                    what_if_total: wt,
                }
            })
            .collect()
    }

    /// The finished account, integrated up to the window's end.
    pub fn finish(mut self) -> Comparison {
        for side in [Side::Reality, Side::WhatIf] {
            let ids: Vec<_> = self.holdings[side as usize].keys().copied().collect();
            for id in ids {
                self.unhold(side, id, self.until);
            }
        }
        self.advance(self.until);
        let reality = self.side_report(Side::Reality);
        let what_if = self.side_report(Side::WhatIf);
        let timeline = self.timeline();
        let (jobs, jobs_differing) = std::mem::take(&mut self.jobs).listed();
        let (tenants, tenants_differing) = std::mem::take(&mut self.tenants).listed();
        Comparison {
            since: format_micros(self.since),
            until: format_micros(self.until),
            since_us: self.since,
            until_us: self.until,
            requests: self.requests,
            reality,
            what_if,
            changes: self.changes,
            jobs_differing,
            jobs,
            tenants_differing,
            tenants,
            timeline,
        }
    }
}

/// Reality and the what-if side by side over one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Start of the window (RFC 3339).
    pub since: String,
    /// End of the window (exclusive).
    pub until: String,
    /// Start, µs since the epoch.
    pub since_us: Micros,
    /// End, µs since the epoch.
    pub until_us: Micros,
    /// Requests that arrived in the window.
    pub requests: u64,
    /// What the log recorded.
    pub reality: SideReport,
    /// What the same demand gets under the what-if's config.
    pub what_if: SideReport,
    /// The same requests' outcomes compared.
    pub changes: OutcomeChanges,
    /// Jobs whose outcomes differ.
    pub jobs_differing: u64,
    /// Those jobs (at most 100), the largest differences first.
    pub jobs: Vec<GroupRow>,
    /// Tenants (`metadata.tenant`) whose outcomes differ.
    pub tenants_differing: u64,
    /// Those tenants, the largest differences first.
    pub tenants: Vec<GroupRow>,
    /// Both utilisation timelines, for the chart.
    #[serde(skip)]
    pub timeline: Vec<BucketPair>,
}
