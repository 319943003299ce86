//! MCP resources and logging: the MCP-native way to watch the ledger.
//!
//! Resources (JSON text, `application/json`):
//! - `ledger://capacity`: the pool, the same shape as the `get_capacity` tool's result;
//! - `ledger://allocations/{allocation_id}` (a template): one allocation, the same shape as
//!   `get_allocation`'s result;
//! - `ledger://events`: the most recent [`RECENT_EVENTS`] events of the log,
//!   `{last_seq, count, events: [{seq, v, ts_us, type, ...}]}`, oldest first.
//!
//! A session subscribed to a URI (`resources/subscribe`) gets `notifications/resources/updated`
//! once an event that changes it is durable. A session that set a level
//! (`logging/setLevel`) gets `notifications/message` for the ledger's notable events at or
//! above it, at most [`LOG_BURST`] at once and [`LOG_PER_SECOND`] a second after that.
//!
//! How the server learns of writes: one task per server polls [`Ledger::status`] every
//! [`WATCH_INTERVAL`] (a mutex held for a few field reads) and, when the durable sequence
//! number moved and some session listens, reads the new events from the log on the blocking
//! pool and broadcasts what they changed. Every write is seen that way (the tools of every
//! session, the expiry timer, whatever is added later) without a hook in the core library,
//! which stays free of tokio, and a notification never announces an event that is not durable.

// Logging is deprecated by SEP-2577 (2026-07-28) but part of the 2025-11-25 protocol served here.
#![allow(deprecated)]

use crate::domain::event::{EventBody, LoggedEvent};
use crate::{Error, Ledger};
use rmcp::model::{
    ListResourceTemplatesResult, ListResourcesResult, LoggingLevel, LoggingMessageNotificationParam, ProtocolVersion,
    ReadResourceResult, Resource, ResourceContents, ResourceTemplate, ResourceUpdatedNotificationParam,
    ServerCapabilities,
};
use rmcp::service::{Peer, RequestContext, RoleServer};
use rmcp::ErrorData as McpError;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The pool.
pub(crate) const CAPACITY_URI: &str = "ledger://capacity";
/// The most recent events.
pub(crate) const EVENTS_URI: &str = "ledger://events";
/// One allocation: this prefix and its id.
pub(crate) const ALLOCATION_PREFIX: &str = "ledger://allocations/";
const ALLOCATION_TEMPLATE: &str = "ledger://allocations/{allocation_id}";
const JSON: &str = "application/json";
/// How many events `ledger://events` shows.
pub(crate) const RECENT_EVENTS: usize = 100;
/// How often the watcher looks at the ledger's durable sequence number.
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// The most events read per tick; past it every resource counts as changed and one warning
/// replaces the per-event log messages (a bulk import, say).
const MAX_BATCH: u64 = 1000;
/// Subscriptions one session may hold (each is a string kept in memory).
const MAX_SUBSCRIPTIONS: usize = 1000;
const MAX_URI_BYTES: usize = 2048;
/// Log messages a session may receive at once...
pub(crate) const LOG_BURST: u32 = 20;
/// ...and per second after that; the rest are counted and reported as dropped.
pub(crate) const LOG_PER_SECOND: u32 = 10;

/// What one tick of the watcher saw change.
#[derive(Debug, Default)]
pub(crate) struct Change {
    capacity: bool,
    events: bool,
    /// Every allocation may have changed (too many events to read, or reading them failed).
    all_allocations: bool,
    allocations: Vec<String>,
    logs: Vec<(LoggingLevel, Value)>,
}

impl Change {
    fn is_empty(&self) -> bool {
        !self.capacity && !self.events && !self.all_allocations && self.allocations.is_empty() && self.logs.is_empty()
    }

    /// Everything may have changed: read nothing, notify every subscription.
    fn everything(why: String) -> Change {
        let logs = vec![(LoggingLevel::Warning, json!({"event": "events_skipped", "message": why}))];
        Change { capacity: true, events: true, all_allocations: true, allocations: Vec::new(), logs }
    }

    fn absorb(&mut self, events: &[LoggedEvent]) {
        for e in events {
            self.events = true;
            let body = &e.event.body;
            let id = body.allocation_id().map(|a| a.to_string());
            let (level, changes_capacity, message) = match body {
                EventBody::Granted(g) => {
                    (LoggingLevel::Info, true, format!("granted {} worker(s) to job {}", g.workers.len(), g.job_id))
                }
                EventBody::Rejected(r) => {
                    (LoggingLevel::Notice, false, format!("rejected a request of job {}: {}", r.job_id, r.error))
                }
                EventBody::Released { .. } => (LoggingLevel::Info, true, "released".to_string()),
                EventBody::Expired { .. } => (LoggingLevel::Info, true, "expired".to_string()),
                EventBody::Renewed(r) => (LoggingLevel::Info, false, format!("renewed for {} s", r.ttl_seconds)),
                EventBody::ConfigChanged { .. } => (LoggingLevel::Notice, true, "the config changed".to_string()),
                EventBody::LedgerCreated { .. } => (LoggingLevel::Debug, true, "ledger created".to_string()),
                EventBody::Reserved(r) => (
                    LoggingLevel::Notice,
                    true,
                    format!("reserved {} worker(s) for {}", r.resources.workers, r.holder_text()),
                ),
                EventBody::ReservationRejected(r) => (LoggingLevel::Notice, false, r.error.clone()),
                EventBody::ReservationCancelled { reservation_id } => {
                    (LoggingLevel::Notice, true, format!("reservation {reservation_id} cancelled"))
                }
                EventBody::Queued(q) => (
                    LoggingLevel::Info,
                    false,
                    format!("queued a request of job {} at position {}", q.job_id, q.position),
                ),
                EventBody::Cancelled { .. } => (LoggingLevel::Info, false, "cancelled while waiting".to_string()),
                EventBody::Preempting(p) => (
                    LoggingLevel::Notice,
                    false,
                    format!(
                        "job {} preempts {} allocation(s) after {} s of grace",
                        p.job_id,
                        p.victims.len(),
                        p.grace_seconds
                    ),
                ),
                EventBody::Preempted(p) => (
                    LoggingLevel::Notice,
                    true,
                    format!("preempted by {} (job {}, {})", p.preemptor, p.preemptor_job_id, p.preemptor_priority),
                ),
            };
            self.capacity |= changes_capacity;
            let mut data = json!({"event": body.type_name(), "seq": e.seq, "message": message});
            if let Some(id) = id {
                data["allocation_id"] = json!(id);
                self.allocations.push(id);
            }
            self.logs.push((level, data));
        }
    }
}

/// The server-wide feed of changes; each session that listens holds a receiver.
#[derive(Clone)]
pub(crate) struct Hub {
    tx: broadcast::Sender<Arc<Change>>,
    stop: CancellationToken,
}

impl Hub {
    /// A hub whose forwarders end when `stop` is cancelled.
    pub(crate) fn new(stop: CancellationToken) -> Hub {
        let (tx, _) = broadcast::channel(256);
        Hub { tx, stop }
    }
}

/// What the watcher remembers between ticks.
struct Seen {
    seq: u64,
    poisoned: Option<String>,
    snapshot_error: Option<String>,
}

/// Polls the ledger until `stop`, broadcasting what changed (see the module doc).
pub(crate) async fn watch(ledger: Ledger, hub: Hub, tasks: TaskTracker, stop: CancellationToken) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = ledger.status();
    let mut seen =
        Seen { seq: status.durable_seq, poisoned: status.poisoned, snapshot_error: status.last_snapshot_error };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let change = watch_once(&ledger, &hub, &tasks, &mut seen).await;
        if !change.is_empty() {
            // No receiver is not an error: nobody listens right now.
            let _ = hub.tx.send(Arc::new(change));
        }
    }
}

async fn watch_once(ledger: &Ledger, hub: &Hub, tasks: &TaskTracker, seen: &mut Seen) -> Change {
    let status = ledger.status();
    let mut change = Change::default();
    if status.poisoned != seen.poisoned {
        if let Some(why) = &status.poisoned {
            let message = format!("the ledger stopped accepting writes: {why}");
            change.logs.push((LoggingLevel::Error, json!({"event": "stopped", "message": message})));
        }
        seen.poisoned.clone_from(&status.poisoned);
    }
    if status.last_snapshot_error != seen.snapshot_error {
        let data = match &status.last_snapshot_error {
            Some(e) => json!({"event": "snapshot_failed", "message": format!("writing a snapshot failed: {e}")}),
            None => json!({"event": "snapshot_written", "message": "snapshots are written again"}),
        };
        change.logs.push((LoggingLevel::Warning, data));
        seen.snapshot_error.clone_from(&status.last_snapshot_error);
    }
    if status.durable_seq <= seen.seq {
        return change;
    }
    let from = seen.seq + 1;
    seen.seq = status.durable_seq;
    if hub.tx.receiver_count() == 0 {
        return change;
    }
    let new = status.durable_seq - from + 1;
    if new > MAX_BATCH {
        let mut all = Change::everything(format!("{new} events since the last look: too many to report one by one"));
        all.logs.splice(0..0, change.logs);
        return all;
    }
    let l = ledger.clone();
    let limit = usize::try_from(new).unwrap_or(usize::MAX);
    match tasks.spawn_blocking(move || l.events(from, limit)).await {
        Ok(Ok(events)) => change.absorb(&events),
        Ok(Err(e)) => return Change::everything(format!("reading the new events failed: {e}")),
        Err(e) => return Change::everything(format!("reading the new events failed: {e}")),
    }
    change
}

/// One session's subscriptions and log level, shared by its handler's clones.
#[derive(Clone)]
pub(crate) struct Session {
    hub: Hub,
    state: Arc<Mutex<SessionState>>,
}

#[derive(Default)]
struct SessionState {
    subscriptions: HashSet<String>,
    level: Option<LoggingLevel>,
    forwarding: bool,
}

impl Session {
    /// A session that nothing has been asked of yet.
    pub(crate) fn new(hub: Hub) -> Session {
        Session { hub, state: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, SessionState> {
        // The state stays consistent whatever a panicking holder did (plain inserts).
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `resources/subscribe`. Any URI is accepted (the protocol defines no error for one the
    /// server never updates); only those of this module are ever notified.
    pub(crate) fn subscribe(&self, uri: String, context: &RequestContext<RoleServer>) -> Result<(), McpError> {
        if uri.len() > MAX_URI_BYTES {
            return Err(McpError::invalid_params(format!("uri is longer than {MAX_URI_BYTES} bytes"), None));
        }
        {
            let mut state = self.lock();
            if state.subscriptions.len() >= MAX_SUBSCRIPTIONS && !state.subscriptions.contains(&uri) {
                return Err(McpError::invalid_params(
                    format!("a session may hold at most {MAX_SUBSCRIPTIONS} subscriptions"),
                    None,
                ));
            }
            state.subscriptions.insert(uri);
        }
        self.start_forwarding(context);
        Ok(())
    }

    /// `resources/unsubscribe`: unknown URIs are ignored.
    pub(crate) fn unsubscribe(&self, uri: &str) {
        self.lock().subscriptions.remove(uri);
    }

    /// `logging/setLevel`.
    pub(crate) fn set_level(&self, level: LoggingLevel, context: &RequestContext<RoleServer>) {
        self.lock().level = Some(level);
        self.start_forwarding(context);
    }

    /// Starts this session's forwarder once. A stateless (2026-07-28) request has no stream
    /// to notify on after its answer, so it starts none.
    fn start_forwarding(&self, context: &RequestContext<RoleServer>) {
        let stateless =
            context.protocol_version().is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
        if stateless {
            return;
        }
        {
            let mut state = self.lock();
            if state.forwarding {
                return;
            }
            state.forwarding = true;
        }
        let rx = self.hub.tx.subscribe();
        tokio::spawn(forward(self.clone(), context.peer.clone(), rx));
    }

    /// The URIs of `change` this session subscribed to, and its log level.
    fn wanted(&self, change: &Change) -> (Vec<String>, Option<LoggingLevel>) {
        let state = self.lock();
        let mut uris = Vec::new();
        let mut add = |uri: &str, changed: bool| {
            if changed && state.subscriptions.contains(uri) {
                uris.push(uri.to_string());
            }
        };
        add(CAPACITY_URI, change.capacity);
        add(EVENTS_URI, change.events);
        if change.all_allocations {
            uris.extend(state.subscriptions.iter().filter(|u| u.starts_with(ALLOCATION_PREFIX)).cloned());
        } else {
            let mut seen = HashSet::new();
            for id in &change.allocations {
                let uri = format!("{ALLOCATION_PREFIX}{id}");
                if state.subscriptions.contains(&uri) && seen.insert(id) {
                    uris.push(uri);
                }
            }
        }
        (uris, state.level)
    }
}

/// Sends one session its notifications until its transport closes or the server stops.
async fn forward(session: Session, peer: Peer<RoleServer>, mut rx: broadcast::Receiver<Arc<Change>>) {
    let mut limiter = Limiter::new(Instant::now());
    loop {
        let received = tokio::select! {
            () = session.hub.stop.cancelled() => return,
            r = rx.recv() => r,
        };
        let change = match received {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                Arc::new(Change::everything(format!("this session fell {n} changes behind")))
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if peer.is_transport_closed() {
            return;
        }
        let (uris, level) = session.wanted(&change);
        for uri in uris {
            if peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri)).await.is_err() {
                return;
            }
        }
        let Some(level) = level else { continue };
        for (l, data) in change.logs.iter().filter(|(l, _)| rank(*l) >= rank(level)) {
            let Some(dropped) = limiter.allow(Instant::now()) else { continue };
            if dropped > 0 {
                let message = format!("{dropped} log message(s) dropped (at most {LOG_PER_SECOND} a second)");
                let note = json!({"event": "messages_dropped", "count": dropped, "message": message});
                if send_log(&peer, LoggingLevel::Warning, note).await.is_err() {
                    return;
                }
            }
            if send_log(&peer, *l, data.clone()).await.is_err() {
                return;
            }
        }
    }
}

async fn send_log(peer: &Peer<RoleServer>, level: LoggingLevel, data: Value) -> Result<(), rmcp::ServiceError> {
    peer.notify_logging_message(LoggingMessageNotificationParam::new(level, data).with_logger("allocation-ledger"))
        .await
}

/// Severity order of the MCP log levels (RFC 5424's, least severe first).
fn rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

/// A token bucket: [`LOG_BURST`] tokens, [`LOG_PER_SECOND`] back a second.
struct Limiter {
    tokens: f64,
    at: Instant,
    dropped: u64,
}

impl Limiter {
    fn new(now: Instant) -> Limiter {
        Limiter { tokens: f64::from(LOG_BURST), at: now, dropped: 0 }
    }

    /// `Some(messages dropped since the last one allowed)` if a message may go now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(LOG_PER_SECOND);
        self.tokens = (self.tokens + refill).min(f64::from(LOG_BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            None
        }
    }
}

/// The capabilities the server advertises: tools, resources with subscriptions, logging; with
/// the conformance fixtures also prompts and completions (which only the fixtures offer).
pub(crate) fn capabilities(fixtures: bool) -> ServerCapabilities {
    let mut caps = ServerCapabilities::builder()
        .enable_logging()
        .enable_resources()
        .enable_resources_subscribe()
        .enable_tools()
        .build();
    if fixtures {
        let extra = ServerCapabilities::builder().enable_prompts().enable_completions().build();
        caps.prompts = extra.prompts;
        caps.completions = extra.completions;
    }
    caps
}

/// `resources/list`: the two fixed resources (allocations are reached through the template).
pub(crate) fn list() -> ListResourcesResult {
    ListResourcesResult::with_all_items(vec![
        Resource::new(CAPACITY_URI, "capacity")
            .with_title("Capacity")
            .with_description("The pool: total, allocated and available CPU, memory and workers, the MCP servers in use and the number of active allocations (the get_capacity tool's result). Updated by every grant, release, expiry and config change.")
            .with_mime_type(JSON),
        Resource::new(EVENTS_URI, "events")
            .with_title("Recent events")
            .with_description(format!("The last {RECENT_EVENTS} events of the log, oldest first: {{last_seq, count, events: [{{seq, v, ts_us, type, ...}}]}}. Updated by every event written."))
            .with_mime_type(JSON),
    ])
}

/// `resources/templates/list`: one allocation.
pub(crate) fn templates() -> ListResourceTemplatesResult {
    ListResourceTemplatesResult::with_all_items(vec![ResourceTemplate::new(ALLOCATION_TEMPLATE, "allocation")
        .with_title("Allocation")
        .with_description("One allocation (the get_allocation tool's result); allocation_id as request_resources or list_allocations return it. Updated when it is granted, released, renewed or expires.")
        .with_mime_type(JSON)])
}

/// `resources/read`.
pub(crate) async fn read(ledger: &Ledger, tasks: &TaskTracker, uri: String) -> Result<ReadResourceResult, McpError> {
    let l = ledger.clone();
    let target = uri.clone();
    let read = tasks
        .spawn_blocking(move || read_value(&l, &target))
        .await
        .map_err(|e| McpError::internal_error(format!("the ledger call failed: {e}"), None))?;
    match read {
        Ok(Some(value)) => {
            Ok(ReadResourceResult::new(vec![ResourceContents::text(value.to_string(), uri).with_mime_type(JSON)]))
        }
        Ok(None) => Err(McpError::resource_not_found(
            format!("no resource {uri}: this server has {CAPACITY_URI}, {EVENTS_URI} and {ALLOCATION_TEMPLATE}"),
            Some(json!({"uri": uri})),
        )),
        Err(Error::InvalidInput { .. } | Error::NotFound(_)) => Err(McpError::resource_not_found(
            format!("no resource {uri}: no such allocation"),
            Some(json!({"uri": uri})),
        )),
        Err(e) => Err(McpError::internal_error(e.to_string(), None)),
    }
}

/// The JSON of the resource at `uri`; `None` if there is none.
fn read_value(ledger: &Ledger, uri: &str) -> crate::Result<Option<Value>> {
    if uri == CAPACITY_URI {
        return ledger.get_capacity().map(|c| Some(to_json(&c)));
    }
    if uri == EVENTS_URI {
        let last_seq = ledger.with_state(|s| s.last_seq);
        let from = (last_seq + 1).saturating_sub(RECENT_EVENTS as u64).max(1);
        let events = ledger.events(from, RECENT_EVENTS)?;
        let last = events.last().map_or(0, |e| e.seq);
        return Ok(Some(json!({"last_seq": last, "count": events.len(), "events": events})));
    }
    match uri.strip_prefix(ALLOCATION_PREFIX) {
        Some(id) if !id.is_empty() => Ok(ledger.get_allocation(id)?.map(|a| to_json(&a))),
        _ => Ok(None),
    }
}

/// A report as JSON (reports are plain data: this cannot fail).
fn to_json(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_a_burst_then_a_rate_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        for _ in 0..LOG_BURST {
            assert_eq!(l.allow(t0), Some(0));
        }
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0), None);
        // A tenth of a second later: one token back, and the two dropped are reported.
        assert_eq!(l.allow(t0 + Duration::from_millis(100)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_millis(100)), None);
    }

    #[test]
    fn levels_are_ordered_by_severity() {
        assert!(rank(LoggingLevel::Debug) < rank(LoggingLevel::Info));
        assert!(rank(LoggingLevel::Notice) < rank(LoggingLevel::Warning));
        assert!(rank(LoggingLevel::Error) < rank(LoggingLevel::Emergency));
    }

    #[test]
    fn the_capabilities_include_subscriptions_and_logging() {
        let caps = serde_json::to_value(capabilities(false)).unwrap();
        assert_eq!(caps["resources"]["subscribe"], true, "{caps}");
        assert!(caps["logging"].is_object(), "{caps}");
        assert!(caps["tools"].is_object(), "{caps}");
    }
}
