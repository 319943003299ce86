//! The ledger's own counters: plain atomics bumped by one-line hooks in the write path
//! (`apply.rs`: each appended event; `commit.rs`: each group-commit round and combining pass;
//! `snapshots.rs`: each snapshot), read through [`Ledger::metrics`](super::Ledger::metrics).
//! No exposition format here: the server (`mcp/http/ops.rs`) encodes them for Prometheus, and
//! an embedding program may export them however it likes. Relaxed ordering throughout: each
//! value is a statistic read on its own, never used to synchronise anything.

use crate::domain::event::{EventBody, RejectReason};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (inclusive, microseconds) of the duration buckets: an fsync takes tens of
/// microseconds on a battery-backed controller and tens of milliseconds on a busy disk.
pub const DURATION_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// Upper bounds (inclusive) of the count buckets: events per fsync, commands per combining
/// pass (group commit gathers up to a few hundred at 64 concurrent writers).
pub const COUNT_BOUNDS: [u64; 12] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

/// A histogram with fixed bucket bounds, lock-free: one atomic per bucket, plus the sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, plus the overflow bucket; not cumulative.
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

/// A histogram as read at one moment (buckets cumulative, as Prometheus wants them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations <= bound)`, in increasing bound order; the `+Inf` bucket
    /// is `count`.
    pub buckets: Vec<(u64, u64)>,
    /// How many observations there were.
    pub count: u64,
    /// The sum of the observed values (microseconds for durations).
    pub sum: u64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds must increase");
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    /// Records one observation of `value`.
    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Records a duration in microseconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// The buckets, count and sum now. Read bucket by bucket while others may observe: the
    /// count is the buckets' total, so the snapshot is always self-consistent.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let overflow = self.counts.last().map_or(0, |c| c.load(Ordering::Relaxed));
        HistogramSnapshot { buckets, count: cumulative + overflow, sum: self.sum.load(Ordering::Relaxed) }
    }
}

/// What the ledger counted since this handle opened it (a restart starts from zero, as
/// Prometheus counters expect).
#[derive(Debug)]
pub struct LedgerMetrics {
    grants: AtomicU64,
    rejections_workers: AtomicU64,
    rejections_cpu: AtomicU64,
    rejections_memory: AtomicU64,
    rejections_quota: AtomicU64,
    rejections_reserved: AtomicU64,
    releases: AtomicU64,
    renewals: AtomicU64,
    expiries: AtomicU64,
    config_changes: AtomicU64,
    events: AtomicU64,
    log_bytes_appended: AtomicU64,
    /// Write + fdatasync of one group-commit round, microseconds.
    fsync_us: Histogram,
    /// Events made durable by one group-commit round.
    events_per_fsync: Histogram,
    /// Commands run in one combining pass under the core lock.
    combine_batch: Histogram,
    /// Encoding and writing one snapshot, microseconds.
    snapshot_us: Histogram,
    last_snapshot_bytes: AtomicU64,
}

impl Default for LedgerMetrics {
    fn default() -> Self {
        LedgerMetrics {
            grants: AtomicU64::new(0),
            rejections_workers: AtomicU64::new(0),
            rejections_cpu: AtomicU64::new(0),
            rejections_memory: AtomicU64::new(0),
            rejections_quota: AtomicU64::new(0),
            rejections_reserved: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            expiries: AtomicU64::new(0),
            config_changes: AtomicU64::new(0),
            events: AtomicU64::new(0),
            log_bytes_appended: AtomicU64::new(0),
            fsync_us: Histogram::new(&DURATION_BOUNDS_US),
            events_per_fsync: Histogram::new(&COUNT_BOUNDS),
            combine_batch: Histogram::new(&COUNT_BOUNDS),
            snapshot_us: Histogram::new(&DURATION_BOUNDS_US),
            last_snapshot_bytes: AtomicU64::new(0),
        }
    }
}

/// The counters as read at one moment, for an exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Requests granted.
    pub grants: u64,
    /// Requests rejected, by the resource that was short.
    pub rejections: Vec<(RejectReason, u64)>,
    /// Allocations released by their holder.
    pub releases: u64,
    /// Lease renewals.
    pub renewals: u64,
    /// Allocations that reached their deadline.
    pub expiries: u64,
    /// Config changes recorded.
    pub config_changes: u64,
    /// Events appended, of every kind.
    pub events: u64,
    /// Bytes appended to the log (record frames).
    pub log_bytes_appended: u64,
    /// Duration of each group-commit round's write + fdatasync, microseconds.
    pub fsync_us: HistogramSnapshot,
    /// Events made durable by each group-commit round.
    pub events_per_fsync: HistogramSnapshot,
    /// Commands run per combining pass (how deep the write queue was when a writer took it).
    pub combine_batch: HistogramSnapshot,
    /// Duration of each snapshot (encoding, waiting for the log to be durable, writing),
    /// microseconds.
    pub snapshot_us: HistogramSnapshot,
    /// Size of the last snapshot written by this handle, bytes.
    pub last_snapshot_bytes: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl LedgerMetrics {
    /// Counts one appended event of `body`'s kind and its record's `frame_bytes`.
    pub(super) fn on_event(&self, body: &EventBody, frame_bytes: usize) {
        bump(&self.events);
        self.log_bytes_appended.fetch_add(frame_bytes as u64, Ordering::Relaxed);
        match body {
            EventBody::Granted(_) => bump(&self.grants),
            EventBody::Rejected(r) => bump(match r.reason {
                RejectReason::InsufficientWorkers => &self.rejections_workers,
                RejectReason::InsufficientCpu => &self.rejections_cpu,
                RejectReason::InsufficientMemory => &self.rejections_memory,
                RejectReason::Quota => &self.rejections_quota,
                RejectReason::Reserved => &self.rejections_reserved,
                // Ended waits are not capacity rejections; counted with the quota ones until
                // they get a counter of their own.
                RejectReason::QueueTimeout | RejectReason::Cancelled => &self.rejections_quota,
            }),
            EventBody::Renewed(_) => bump(&self.renewals),
            EventBody::Released { .. } => bump(&self.releases),
            EventBody::Expired { .. } => bump(&self.expiries),
            EventBody::ConfigChanged { .. } => bump(&self.config_changes),
            // The creation, and kinds added later until they get a counter of their own.
            _ => {}
        }
    }

    /// One group-commit round made `events` durable in `took`.
    pub(super) fn on_fsync(&self, took: Duration, events: u64) {
        self.fsync_us.observe_duration(took);
        self.events_per_fsync.observe(events);
    }

    /// One combining pass took `commands` from the queue.
    pub(super) fn on_combine(&self, commands: usize) {
        self.combine_batch.observe(commands as u64);
    }

    /// One snapshot of `bytes` was written in `took`.
    pub(super) fn on_snapshot(&self, took: Duration, bytes: usize) {
        self.snapshot_us.observe_duration(took);
        self.last_snapshot_bytes.store(bytes as u64, Ordering::Relaxed);
    }

    /// Every counter and histogram now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            grants: get(&self.grants),
            rejections: vec![
                (RejectReason::InsufficientWorkers, get(&self.rejections_workers)),
                (RejectReason::InsufficientCpu, get(&self.rejections_cpu)),
                (RejectReason::InsufficientMemory, get(&self.rejections_memory)),
                (RejectReason::Quota, get(&self.rejections_quota)),
                (RejectReason::Reserved, get(&self.rejections_reserved)),
            ],
            releases: get(&self.releases),
            renewals: get(&self.renewals),
            expiries: get(&self.expiries),
            config_changes: get(&self.config_changes),
            events: get(&self.events),
            log_bytes_appended: get(&self.log_bytes_appended),
            fsync_us: self.fsync_us.snapshot(),
            events_per_fsync: self.events_per_fsync.snapshot(),
            combine_batch: self.combine_batch.snapshot(),
            snapshot_us: self.snapshot_us.snapshot(),
            last_snapshot_bytes: get(&self.last_snapshot_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let h = Histogram::new(&COUNT_BOUNDS);
        for v in [1, 2, 3, 4, 5000] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 5010);
        assert_eq!(s.buckets[0], (1, 1));
        assert_eq!(s.buckets[1], (2, 2));
        assert_eq!(s.buckets[2], (4, 4), "3 and 4 fall in the <= 4 bucket");
        assert_eq!(s.buckets.last(), Some(&(4096, 4)), "5000 only in +Inf");
    }

    #[test]
    fn durations_are_microseconds() {
        let h = Histogram::new(&DURATION_BOUNDS_US);
        h.observe_duration(Duration::from_millis(3));
        let s = h.snapshot();
        assert_eq!(s.sum, 3000);
        assert_eq!(s.buckets.iter().find(|(b, _)| *b == 5_000).map(|x| x.1), Some(1));
        assert_eq!(s.buckets.iter().find(|(b, _)| *b == 2_500).map(|x| x.1), Some(0));
    }
}
