//! The operator's endpoints beside `/mcp`: `GET /healthz` (the process answers), `GET /readyz`
//! (the ledger accepts writes) and `GET /metrics` (Prometheus/OpenMetrics text). The ledger
//! counts in plain atomics (`ledger/metrics.rs`); this file only reads them, with the capacity
//! and the log's size on disk, and encodes them with `prometheus-client` on each scrape.
//! Which of these need the bearer token is decided in `http.rs` (`open_health`).

use super::checks::Checks;
use crate::ledger::HistogramSnapshot;
use crate::log::layout::WAL_DIR;
use crate::Ledger;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Result as FmtResult;
use std::sync::Arc;

/// Every metric's name starts with this (`allocation_ledger_grants_total`, ...).
const PREFIX: &str = "allocation_ledger";
/// The OpenMetrics text format that `prometheus_client::encoding::text` writes; Prometheus
/// asks for it first.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The histograms count microseconds; Prometheus wants seconds.
const SECONDS_PER_MICRO: f64 = 1e-6;

/// The routes `/healthz`, `/readyz` and `/metrics` on `ledger`, behind the Host check that
/// rmcp makes for `/mcp` (a page that rebinds its DNS name to 127.0.0.1 must not read them).
pub(super) fn routes(ledger: Ledger, checks: Checks) -> axum::Router {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(LedgerCollector { ledger: ledger.clone() }));
    let registry = Arc::new(registry);
    let checks = Arc::new(checks);
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", axum::routing::get(move || readyz(ledger.clone())))
        .route("/metrics", axum::routing::get(move || metrics(registry.clone())))
        .route_layer(axum::middleware::from_fn_with_state(checks, super::checks::host_check))
}

/// 200 with `{"ready": true, ...}` while the ledger accepts writes; 503 with the reason
/// otherwise (a failed write or fsync stopped it: only a restart, which recovers from the log,
/// brings it back; or it was opened read-only). A failed periodic snapshot is reported but
/// leaves the ledger ready: writes still succeed.
async fn readyz(ledger: Ledger) -> Response {
    let status = ledger.status();
    let reason = match (&status.poisoned, status.read_only) {
        (Some(why), _) => Some(format!("the ledger stopped accepting writes: {why}")),
        (None, true) => Some("the ledger is open read-only".to_string()),
        (None, false) => None,
    };
    let body = serde_json::json!({
        "ready": reason.is_none(),
        "reason": reason,
        "last_seq": status.last_seq,
        "durable_seq": status.durable_seq,
        "last_snapshot_error": status.last_snapshot_error,
    });
    let code = if reason.is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
}

/// Encodes the registry (on the blocking pool: the collector takes the core lock and lists
/// the log's files).
async fn metrics(registry: Arc<Registry>) -> Response {
    let encoded = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    match encoded {
        Ok(Ok(text)) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n").into_response(),
    }
}

/// Reads the ledger on each scrape (nothing is copied between scrapes).
#[derive(Debug)]
struct LedgerCollector {
    ledger: Ledger,
}

impl Collector for LedgerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> FmtResult {
        self.encode_events(&mut enc)?;
        self.encode_commit(&mut enc)?;
        self.encode_capacity(&mut enc)?;
        self.encode_log(&mut enc)
    }
}

impl LedgerCollector {
    /// What was decided: grants, rejections by reason, releases, expiries.
    fn encode_events(&self, enc: &mut DescriptorEncoder) -> FmtResult {
        let m = self.ledger.metrics().snapshot();
        counter(enc, "grants", "Requests granted since the server started.", m.grants)?;
        let mut family = enc.encode_descriptor(
            "rejections",
            "Requests rejected since the server started, by the resource that was short.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &m.rejections {
            ConstCounter::new(*n).encode(family.encode_family(&[("reason", reason.as_str())])?)?;
        }
        counter(enc, "releases", "Allocations released by their holder since the server started.", m.releases)?;
        counter(enc, "renewals", "Lease renewals since the server started.", m.renewals)?;
        counter(enc, "expiries", "Allocations expired (deadline passed) since the server started.", m.expiries)?;
        counter(enc, "config_changes", "Config changes recorded since the server started.", m.config_changes)?;
        counter(enc, "events", "Events appended to the log since the server started, of every kind.", m.events)
    }

    /// The write path: group-commit rounds, combining, snapshots.
    fn encode_commit(&self, enc: &mut DescriptorEncoder) -> FmtResult {
        let m = self.ledger.metrics().snapshot();
        let help = "Duration of one group-commit round: writing the queued records and fdatasync of the log.";
        histogram(enc, "fsync_duration", help, Some(&Unit::Seconds), &m.fsync_us, SECONDS_PER_MICRO)?;
        let help = "Events made durable by one group-commit round (how many writes shared an fsync).";
        histogram(enc, "events_per_fsync", help, None, &m.events_per_fsync, 1.0)?;
        let help = "Write commands run in one combining pass (the depth of the write queue when a writer took it).";
        histogram(enc, "combine_batch", help, None, &m.combine_batch, 1.0)?;
        let help = "Duration of one snapshot: encoding, waiting for the log to be durable, writing.";
        histogram(enc, "snapshot_duration", help, Some(&Unit::Seconds), &m.snapshot_us, SECONDS_PER_MICRO)?;
        let help = "Size of the last snapshot this server wrote (0 before the first).";
        gauge(enc, "snapshot_size", help, Some(&Unit::Bytes), m.last_snapshot_bytes)?;
        let help = "Bytes appended to the log (record frames) since the server started.";
        let c = ConstCounter::new(m.log_bytes_appended);
        c.encode(enc.encode_descriptor("log_appended", help, Some(&Unit::Bytes), c.metric_type())?)
    }

    /// The pool now: totals, what is held, what is free.
    fn encode_capacity(&self, enc: &mut DescriptorEncoder) -> FmtResult {
        let Ok(c) = self.ledger.get_capacity() else { return Ok(()) };
        let rows: [(&str, &str, u64); 11] = [
            ("pool_workers", "Worker slots in the pool.", u64::from(c.total_workers)),
            ("allocated_workers", "Worker slots held by active allocations.", u64::from(c.allocated_workers)),
            ("available_workers", "Worker slots free.", u64::from(c.available_workers)),
            ("pool_cpu_millicores", "CPU in the pool.", c.total_cpu_millicores),
            ("allocated_cpu_millicores", "CPU held (workers and running MCP servers).", c.allocated_cpu_millicores),
            ("available_cpu_millicores", "CPU free.", c.available_cpu_millicores),
            ("pool_memory_mib", "Memory in the pool, MiB.", c.total_memory),
            ("allocated_memory_mib", "Memory held, MiB.", c.allocated_memory),
            ("available_memory_mib", "Memory free, MiB.", c.available_memory),
            ("active_allocations", "Allocations active now.", c.active_allocations),
            ("running_mcp_servers", "MCP servers running now.", c.running_mcp_servers.len() as u64),
        ];
        for (name, help, v) in rows {
            gauge(enc, name, help, None, v)?;
        }
        Ok(())
    }

    /// Where the log stands: sequence numbers, readiness, size on disk.
    fn encode_log(&self, enc: &mut DescriptorEncoder) -> FmtResult {
        let s = self.ledger.status();
        gauge(enc, "last_seq", "Sequence number of the last event appended.", None, s.last_seq)?;
        gauge(enc, "durable_seq", "Sequence number of the last event known durable (fsynced).", None, s.durable_seq)?;
        let ready = u64::from(s.poisoned.is_none() && !s.read_only);
        gauge(enc, "ready", "1 while the ledger accepts writes, 0 after a failed write or fsync.", None, ready)?;
        let failing = u64::from(s.last_snapshot_error.is_some());
        gauge(enc, "snapshot_failing", "1 if the last periodic snapshot failed (writes go on).", None, failing)?;
        let help = "Size of the log's segment files on disk.";
        gauge(enc, "log_size", help, Some(&Unit::Bytes), self.log_bytes_on_disk())
    }

    /// The total size of the segment files (0 if they cannot be listed).
    fn log_bytes_on_disk(&self) -> u64 {
        let storage = self.ledger.storage();
        let wal = self.ledger.dir().join(WAL_DIR);
        let names = storage.list(&wal).unwrap_or_default();
        names.iter().filter_map(|n| storage.file_len(&wal.join(n)).ok()).sum()
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> FmtResult {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> FmtResult {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// A ledger histogram (cumulative buckets of integer bounds) as Prometheus wants it: bounds
/// times `scale`, per-bucket counts, and the `+Inf` bucket.
fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    h: &HistogramSnapshot,
    scale: f64,
) -> FmtResult {
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(h.buckets.len() + 1);
    for &(bound, cumulative) in &h.buckets {
        #[allow(clippy::cast_precision_loss, reason = "bucket bounds are small integers")]
        buckets.push((bound as f64 * scale, cumulative - below));
        below = cumulative;
    }
    buckets.push((f64::MAX, h.count - below));
    #[allow(clippy::cast_precision_loss, reason = "a sum of microseconds or counts; a metric, not an account")]
    let sum = h.sum as f64 * scale;
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, h.count, &buckets, None)
}
