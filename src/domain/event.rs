//! Events: the log's payloads. Each records an *outcome* (which slots, which endpoints, which
//! deadline), so replay never re-runs allocation logic.

use crate::domain::clock::Micros;
use crate::domain::config::Config;
use crate::domain::model::{AllocationId, Metadata, Priority, Resources};
use serde::{Deserialize, Serialize};

/// Bumped whenever the event schema changes; old versions stay readable.
/// 2: `granted`/`rejected` carry `idempotency_key` and `max_lifetime_seconds` (both optional),
/// and the `renewed` event exists.
/// 3: the queue (`queued` and `cancelled` events, `granted.queued_seq`, reason `queue_timeout`)
/// and reservations (`reserved`, `reservation_rejected`, `reservation_cancelled`, reason
/// `reserved`).
/// 4: preemption (`preempting` and `preempted` events; `granted.preemptible` and
/// `queued.preemptible`, written only when `false`).
pub const EVENT_SCHEMA_VERSION: u32 = 4;

/// One logged fact: what happened, when, in which schema version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version of this event.
    pub v: u32,
    /// When the ledger recorded the event; strictly increasing along the log.
    pub ts_us: Micros,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

/// The kinds of event; serialised with a `type` tag (`granted`, `released`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// Always the first event: the ledger's identity and the config in force.
    LedgerCreated {
        /// The ledger's identity (it keys the allocation ids).
        ledger_id: String,
        /// The config the ledger was created with.
        config: Config,
    },
    /// The config in force from this event on.
    ConfigChanged {
        /// The new config.
        config: Config,
    },
    /// A request was granted: the slots, endpoints and deadline it got.
    Granted(Grant),
    /// A request was valid but the pool could not hold it.
    Rejected(Rejection),
    /// An active allocation was released by its holder.
    Released {
        /// The allocation released.
        allocation_id: AllocationId,
    },
    /// The allocation's deadline passed; it held resources until `deadline_us`, whenever this
    /// event was written.
    Expired {
        /// The allocation that expired.
        allocation_id: AllocationId,
        /// Its deadline: when it stopped holding resources.
        deadline_us: Micros,
    },
    /// An active allocation's lease was renewed: its deadline moved.
    Renewed(Renewal),
    /// Capacity was reserved for a holder over a window (see `domain/reservation.rs`).
    Reserved(crate::domain::reservation::Reservation),
    /// A reservation could not be honoured beside what is held and reserved.
    ReservationRejected(crate::domain::reservation::ReservationRejection),
    /// A reservation was cancelled before its window closed.
    ReservationCancelled {
        /// The reservation cancelled.
        reservation_id: crate::domain::reservation::ReservationId,
    },
    /// A request that did not fit waits in the queue (it asked to, with `wait`).
    Queued(crate::domain::queue::Queued),
    /// A waiting request was withdrawn by its caller.
    Cancelled {
        /// The request withdrawn.
        allocation_id: AllocationId,
    },
    /// A request preempts lower-priority allocations with a grace period: it waits in the
    /// queue, its victims keep their resources until the deadline (`domain/preempt.rs`).
    Preempting(crate::domain::preempt::Preempting),
    /// A victim of a preemption stopped holding its resources.
    Preempted(crate::domain::preempt::Preempted),
}

/// What a renewal decided: the deadline before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// The allocation renewed.
    pub allocation_id: AllocationId,
    /// Its deadline before this renewal.
    pub previous_deadline_us: Micros,
    /// Its deadline from now on.
    pub deadline_us: Micros,
    /// The lifetime asked for, counted from the renewal.
    pub ttl_seconds: u64,
}

/// One worker slot as a grant hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerGrant {
    /// The slot's index in the pool.
    pub slot: u32,
    /// The worker's id (`worker-NN`).
    pub worker_id: String,
    /// Where the job reaches the worker.
    pub endpoint: String,
    /// CPU the worker holds.
    pub cpu_millicores: u64,
    /// Memory the worker holds.
    pub memory_mib: u64,
}

/// One MCP server as a grant hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpGrant {
    /// The server's name, as requested.
    pub name: String,
    /// Where the job reaches the server.
    pub endpoint: String,
    /// Cost charged to the pool while the server runs (once, however many allocations share it).
    #[serde(default)]
    pub cpu_millicores: u64,
    /// Memory charged while the server runs (see `cpu_millicores`).
    #[serde(default)]
    pub memory_mib: u64,
    /// This grant gave the name its endpoint (it was neither in the catalog nor seen before).
    #[serde(default)]
    pub assigned: bool,
    /// This grant started the server (no other active allocation was using it).
    #[serde(default)]
    pub started: bool,
}

/// What a grant decided: recorded whole, so replay never decides again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// The new allocation.
    pub allocation_id: AllocationId,
    /// The job it is for.
    pub job_id: String,
    /// The request's priority.
    pub priority: Priority,
    /// The granted lifetime.
    pub ttl_seconds: u64,
    /// When it expires unless released first.
    pub deadline_us: Micros,
    /// The slots taken, lowest first.
    pub workers: Vec<WorkerGrant>,
    /// The MCP servers, in the request's order.
    pub mcp_servers: Vec<McpGrant>,
    /// What the workers hold (MCP server costs are charged separately, per running server).
    pub resources: Resources,
    /// The request's metadata.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// The caller's retry key: the same key with the same request returns this outcome again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<std::sync::Arc<str>>,
    /// Renewals never move the deadline past creation + this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<u64>,
    /// The tenant whose quota it counts against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Set when the grant ended a wait: the sequence number of the request's `queued` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_seq: Option<u64>,
    /// Whether a higher priority may preempt it (written only when `false`).
    #[serde(default = "crate::domain::preempt::yes", skip_serializing_if = "crate::domain::preempt::is_true")]
    pub preemptible: bool,
}

/// Which resource a rejected request needed more of than its priority may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectReason {
    /// Not enough free worker slots.
    InsufficientWorkers,
    /// Not enough free CPU.
    InsufficientCpu,
    /// Not enough free memory.
    InsufficientMemory,
    /// The request would take its tenant past a quota.
    Quota,
    /// It would take capacity reserved for someone else (see `domain/reservation.rs`).
    Reserved,
    /// The request waited in the queue for its whole `queue_timeout_seconds` without fitting.
    QueueTimeout,
    /// The waiting request was cancelled (a report's reason; the log has a `cancelled` event).
    Cancelled,
}

impl RejectReason {
    /// The reason as events, JSON and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InsufficientWorkers => "insufficient_workers",
            RejectReason::InsufficientCpu => "insufficient_cpu",
            RejectReason::InsufficientMemory => "insufficient_memory",
            RejectReason::Quota => "quota",
            RejectReason::Reserved => "reserved",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares as the JSON text, so `report.reason == "insufficient_workers"` reads as it did
/// when the report's field was a string.
impl PartialEq<str> for RejectReason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for RejectReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for RejectReason {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// What a rejection decided: the request as asked, and why it could not be held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The failed allocation (kept, in state `failed`).
    pub allocation_id: AllocationId,
    /// The job it was for.
    pub job_id: String,
    /// The request's priority.
    pub priority: Priority,
    /// The lifetime asked for (or the default).
    pub ttl_seconds: u64,
    /// Workers asked for.
    pub workers: u32,
    /// MCP servers asked for.
    pub mcp_servers: Vec<String>,
    /// Which resource was short.
    pub reason: RejectReason,
    /// In the reason's unit: workers, millicores or MiB.
    pub needed: u64,
    /// What the request's priority could take of it, in the same unit.
    pub available: u64,
    /// The original's message, e.g. `Insufficient workers: requested 5, available 3`.
    pub error: String,
    /// The request's metadata.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// The caller's retry key (see [`Grant::idempotency_key`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<std::sync::Arc<str>>,
    /// The lifetime bound the request asked for (see [`Grant::max_lifetime_seconds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<u64>,
    /// The tenant the request counted against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// For reason `quota`: which limit, and by how much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<crate::domain::quota::QuotaExceeded>,
}

impl EventBody {
    /// The `type` tag the event is written with.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::LedgerCreated { .. } => "ledger_created",
            EventBody::ConfigChanged { .. } => "config_changed",
            EventBody::Granted(_) => "granted",
            EventBody::Rejected(_) => "rejected",
            EventBody::Released { .. } => "released",
            EventBody::Expired { .. } => "expired",
            EventBody::Renewed(_) => "renewed",
            EventBody::Reserved(_) => "reserved",
            EventBody::ReservationRejected(_) => "reservation_rejected",
            EventBody::ReservationCancelled { .. } => "reservation_cancelled",
            EventBody::Queued(_) => "queued",
            EventBody::Cancelled { .. } => "cancelled",
            EventBody::Preempting(_) => "preempting",
            EventBody::Preempted(_) => "preempted",
        }
    }

    /// The allocation this event is about, if any.
    pub fn allocation_id(&self) -> Option<AllocationId> {
        match self {
            EventBody::Granted(g) => Some(g.allocation_id),
            EventBody::Rejected(r) => Some(r.allocation_id),
            EventBody::Released { allocation_id } | EventBody::Expired { allocation_id, .. } => Some(*allocation_id),
            EventBody::Renewed(r) => Some(r.allocation_id),
            EventBody::Queued(q) => Some(q.allocation_id),
            EventBody::Cancelled { allocation_id } => Some(*allocation_id),
            EventBody::Preempting(p) => Some(p.preemptor),
            EventBody::Preempted(p) => Some(p.allocation_id),
            _ => None,
        }
    }
}

impl Event {
    /// An event of this build's schema version.
    pub fn new(ts_us: Micros, body: EventBody) -> Self {
        Event { v: EVENT_SCHEMA_VERSION, ts_us, body }
    }

    /// The JSON of the event, byte for byte what `serde_json::to_vec` makes of it. The events
    /// written per grant take a lean path: the envelope `{"v":..,"ts_us":..,"type":".."` is
    /// written by hand and the body serialized as its own struct, without serde's `flatten`
    /// (which goes through a map serializer, and was 7% of a grant's CPU).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        match &self.body {
            EventBody::Granted(g) => self.encode_granted(&mut out, g),
            EventBody::Rejected(r) => self.encode_lean(&mut out, r),
            EventBody::Released { allocation_id } => self.encode_lean(&mut out, &ReleasedOut { allocation_id }),
            EventBody::Expired { allocation_id, deadline_us } => {
                self.encode_lean(&mut out, &ExpiredOut { allocation_id, deadline_us });
            }
            EventBody::Renewed(r) => self.encode_lean(&mut out, r),
            EventBody::LedgerCreated { .. }
            | EventBody::ConfigChanged { .. }
            | EventBody::Reserved(_)
            | EventBody::ReservationRejected(_)
            | EventBody::ReservationCancelled { .. } => put_json(&mut out, self),
            EventBody::Queued(_) | EventBody::Cancelled { .. } => put_json(&mut out, self),
            EventBody::Preempting(_) | EventBody::Preempted(_) => put_json(&mut out, self),
        }
        debug_assert!(
            serde_json::to_vec(self).is_ok_and(|general| general == out),
            "lean encoding differs: {}",
            String::from_utf8_lossy(&out)
        );
        out
    }

    /// `granted`, the event written per grant, by hand: the bytes serde_json writes (the
    /// debug assertion in [`Event::encode`] and a property test check it), without serde's
    /// byte-by-byte escape scan of every string, which was an eighth of a grant's CPU.
    fn encode_granted(&self, out: &mut Vec<u8>, g: &Grant) {
        out.extend_from_slice(b"{\"v\":");
        put_int(out, self.v);
        out.extend_from_slice(b",\"ts_us\":");
        put_int(out, self.ts_us.as_micros());
        out.extend_from_slice(b",\"type\":\"granted\",\"allocation_id\":\"");
        g.allocation_id.put_text(out);
        out.extend_from_slice(b"\",\"job_id\":");
        put_str(out, &g.job_id);
        out.extend_from_slice(b",\"priority\":\"");
        out.extend_from_slice(g.priority.as_str().as_bytes());
        out.extend_from_slice(b"\",\"ttl_seconds\":");
        put_int(out, g.ttl_seconds);
        out.extend_from_slice(b",\"deadline_us\":");
        put_int(out, g.deadline_us.as_micros());
        out.extend_from_slice(b",\"workers\":[");
        for (i, w) in g.workers.iter().enumerate() {
            out.extend_from_slice(if i == 0 { b"{\"slot\":" } else { b",{\"slot\":" });
            put_int(out, w.slot);
            out.extend_from_slice(b",\"worker_id\":");
            put_str(out, &w.worker_id);
            out.extend_from_slice(b",\"endpoint\":");
            put_str(out, &w.endpoint);
            out.push(b',');
            put_usage(out, w.cpu_millicores, w.memory_mib);
            out.push(b'}');
        }
        out.extend_from_slice(b"],\"mcp_servers\":[");
        for (i, m) in g.mcp_servers.iter().enumerate() {
            out.extend_from_slice(if i == 0 { b"{\"name\":" } else { b",{\"name\":" });
            put_str(out, &m.name);
            out.extend_from_slice(b",\"endpoint\":");
            put_str(out, &m.endpoint);
            out.push(b',');
            put_usage(out, m.cpu_millicores, m.memory_mib);
            out.extend_from_slice(b",\"assigned\":");
            out.extend_from_slice(if m.assigned { b"true" } else { b"false" });
            out.extend_from_slice(b",\"started\":");
            out.extend_from_slice(if m.started { b"true}" } else { b"false}" });
        }
        out.extend_from_slice(b"],\"resources\":{");
        put_usage(out, g.resources.cpu_millicores, g.resources.memory_mib);
        out.extend_from_slice(b",\"workers\":");
        put_int(out, g.resources.workers);
        out.push(b'}');
        self.encode_granted_options(out, g);
        out.push(b'}');
    }

    /// The fields of `granted` written only when set.
    fn encode_granted_options(&self, out: &mut Vec<u8>, g: &Grant) {
        if !g.metadata.is_empty() {
            out.extend_from_slice(b",\"metadata\":");
            out.extend_from_slice(g.metadata.as_json().as_bytes());
        }
        if let Some(key) = &g.idempotency_key {
            out.extend_from_slice(b",\"idempotency_key\":");
            put_str(out, key);
        }
        if let Some(seconds) = g.max_lifetime_seconds {
            out.extend_from_slice(b",\"max_lifetime_seconds\":");
            put_int(out, seconds);
        }
        if let Some(tenant) = &g.tenant {
            out.extend_from_slice(b",\"tenant\":");
            put_str(out, tenant);
        }
        if let Some(seq) = g.queued_seq {
            out.extend_from_slice(b",\"queued_seq\":");
            put_int(out, seq);
        }
        if !g.preemptible {
            out.extend_from_slice(b",\"preemptible\":false");
        }
    }

    fn encode_lean(&self, out: &mut Vec<u8>, body: &impl Serialize) {
        out.extend_from_slice(b"{\"v\":");
        put_json(out, &self.v);
        out.extend_from_slice(b",\"ts_us\":");
        put_json(out, &self.ts_us);
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(self.body.type_name().as_bytes());
        out.push(b'"');
        // The body's own object, its `{` turned into the `,` that continues the envelope.
        let start = out.len();
        put_json(out, body);
        debug_assert!(out.len() - start > 2 && out[start] == b'{', "a body has at least one field");
        out[start] = b',';
    }

    /// Decodes one record payload. Events this build wrote take a lean path (the envelope
    /// `{"v":..,"ts_us":..,"type":".."` is read by hand and the body decoded straight into its
    /// struct, without serde's `flatten` buffering); anything else takes the general path,
    /// which also produces the error messages.
    pub fn decode(bytes: &[u8]) -> Result<Event, String> {
        let event = match decode_lean(bytes) {
            Some(e) => e,
            None => serde_json::from_slice(bytes).map_err(|e| format!("undecodable event: {e}"))?,
        };
        if event.v == 0 || event.v > EVENT_SCHEMA_VERSION {
            return Err(format!(
                "event schema version {} is not supported (this build reads 1..={EVENT_SCHEMA_VERSION})",
                event.v
            ));
        }
        Ok(event)
    }
}

fn parse_int(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let (negative, digits) = match bytes.first()? {
        b'-' => (true, &bytes[1..]),
        _ => (false, bytes),
    };
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || len > 18 || (len > 1 && digits[0] == b'0') {
        return None;
    }
    let mut v: i64 = 0;
    for &d in &digits[..len] {
        v = v * 10 + i64::from(d - b'0');
    }
    Some((if negative { -v } else { v }, &digits[len..]))
}

// The lean path's wire shapes: a whole event object, flat (`v`, `ts_us` and `type` are
// skipped: already parsed from the prefix), deserialized in place from the log's bytes with
// the metadata borrowed as raw text, so decoding copies nothing it does not keep.

#[derive(Deserialize)]
struct GrantedWire<'a> {
    allocation_id: AllocationId,
    job_id: String,
    priority: Priority,
    ttl_seconds: u64,
    deadline_us: Micros,
    workers: Vec<WorkerGrant>,
    mcp_servers: Vec<McpGrant>,
    resources: Resources,
    #[serde(default, borrow)]
    metadata: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    idempotency_key: Option<std::sync::Arc<str>>,
    #[serde(default)]
    max_lifetime_seconds: Option<u64>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    queued_seq: Option<u64>,
    #[serde(default = "crate::domain::preempt::yes")]
    preemptible: bool,
}

#[derive(Deserialize)]
struct RejectedWire<'a> {
    allocation_id: AllocationId,
    job_id: String,
    priority: Priority,
    ttl_seconds: u64,
    workers: u32,
    mcp_servers: Vec<String>,
    reason: RejectReason,
    needed: u64,
    available: u64,
    error: String,
    #[serde(default, borrow)]
    metadata: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    idempotency_key: Option<std::sync::Arc<str>>,
    #[serde(default)]
    max_lifetime_seconds: Option<u64>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    quota: Option<crate::domain::quota::QuotaExceeded>,
}

#[derive(Deserialize)]
struct ReleasedWire {
    allocation_id: AllocationId,
}

#[derive(Deserialize)]
struct ExpiredWire {
    allocation_id: AllocationId,
    deadline_us: Micros,
}

fn lean_metadata(raw: Option<&serde_json::value::RawValue>) -> Option<Metadata> {
    match raw {
        None => Some(Metadata::default()),
        Some(raw) => Metadata::from_raw(raw),
    }
}

/// The lean path of [`Event::decode`]; `None` sends the payload to the general path.
fn decode_lean(bytes: &[u8]) -> Option<Event> {
    let rest = bytes.strip_prefix(b"{\"v\":")?;
    let (v, rest) = parse_int(rest)?;
    let rest = rest.strip_prefix(b",\"ts_us\":")?;
    let (ts_us, rest) = parse_int(rest)?;
    let rest = rest.strip_prefix(b",\"type\":\"")?;
    let name_len = rest.iter().position(|&b| b == b'"')?;
    let name = &rest[..name_len];
    let body = match name {
        b"granted" => {
            let w: GrantedWire = serde_json::from_slice(bytes).ok()?;
            EventBody::Granted(Grant {
                allocation_id: w.allocation_id,
                job_id: w.job_id,
                priority: w.priority,
                ttl_seconds: w.ttl_seconds,
                deadline_us: w.deadline_us,
                workers: w.workers,
                mcp_servers: w.mcp_servers,
                resources: w.resources,
                metadata: lean_metadata(w.metadata)?,
                idempotency_key: w.idempotency_key,
                max_lifetime_seconds: w.max_lifetime_seconds,
                tenant: w.tenant,
                queued_seq: w.queued_seq,
                preemptible: w.preemptible,
            })
        }
        b"rejected" => {
            let w: RejectedWire = serde_json::from_slice(bytes).ok()?;
            EventBody::Rejected(Rejection {
                allocation_id: w.allocation_id,
                job_id: w.job_id,
                priority: w.priority,
                ttl_seconds: w.ttl_seconds,
                workers: w.workers,
                mcp_servers: w.mcp_servers,
                reason: w.reason,
                needed: w.needed,
                available: w.available,
                error: w.error,
                metadata: lean_metadata(w.metadata)?,
                idempotency_key: w.idempotency_key,
                max_lifetime_seconds: w.max_lifetime_seconds,
                tenant: w.tenant,
                quota: w.quota,
            })
        }
        b"released" => {
            let b: ReleasedWire = serde_json::from_slice(bytes).ok()?;
            EventBody::Released { allocation_id: b.allocation_id }
        }
        b"expired" => {
            let b: ExpiredWire = serde_json::from_slice(bytes).ok()?;
            EventBody::Expired { allocation_id: b.allocation_id, deadline_us: b.deadline_us }
        }
        b"renewed" => EventBody::Renewed(serde_json::from_slice(bytes).ok()?),
        _ => return None,
    };
    Some(Event { v: u32::try_from(v).ok()?, ts_us: Micros::from_micros(ts_us), body })
}

#[derive(Serialize)]
struct ReleasedOut<'a> {
    allocation_id: &'a AllocationId,
}

#[derive(Serialize)]
struct ExpiredOut<'a> {
    allocation_id: &'a AllocationId,
    deadline_us: &'a Micros,
}

#[allow(
    clippy::expect_used,
    reason = "events are structs of strings, numbers and string-keyed maps: writing them to memory cannot fail"
)]
fn put_json(out: &mut Vec<u8>, value: &impl Serialize) {
    serde_json::to_writer(out, value).expect("events always serialize");
}

/// An integer as JSON writes it.
fn put_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `"cpu_millicores":C,"memory_mib":M`.
fn put_usage(out: &mut Vec<u8>, cpu_millicores: u64, memory_mib: u64) {
    out.extend_from_slice(b"\"cpu_millicores\":");
    put_int(out, cpu_millicores);
    out.extend_from_slice(b",\"memory_mib\":");
    put_int(out, memory_mib);
}

/// A JSON string as serde_json writes it: a string that needs no escape (no control character,
/// quote or backslash: what names, endpoints and keys are) is copied after one branch-free pass;
/// any other takes serde_json's path.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let plain = s.bytes().fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        put_json(out, &s);
    }
}

/// An event with its position in the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedEvent {
    /// Its sequence number: its place in the log, from 1.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_lines, reason = "a table of sample events, one of each kind")]
    fn samples() -> Vec<Event> {
        let id = AllocationId::from_u64(0xabcdef012345);
        let mut metadata = serde_json::Map::new();
        metadata.insert("tenant".into(), "acme \"quoted\" \u{e9}".into());
        vec![
            Event::new(
                Micros::from_micros(1),
                EventBody::LedgerCreated { ledger_id: "x".into(), config: Config::default() },
            ),
            Event::new(
                Micros::from_micros(-5),
                EventBody::Granted(Grant {
                    allocation_id: id,
                    job_id: "job \"1\"".into(),
                    priority: Priority::High,
                    ttl_seconds: 60,
                    deadline_us: Micros::from_micros(60_000_005),
                    workers: vec![WorkerGrant {
                        slot: 3,
                        worker_id: "worker-03".into(),
                        endpoint: "http://localhost:8003".into(),
                        cpu_millicores: 1000,
                        memory_mib: 2048,
                    }],
                    mcp_servers: vec![McpGrant {
                        name: "github".into(),
                        endpoint: "http://localhost:9000".into(),
                        cpu_millicores: 0,
                        memory_mib: 0,
                        assigned: true,
                        started: true,
                    }],
                    resources: Resources { cpu_millicores: 1000, memory_mib: 2048, workers: 1 },
                    metadata: metadata.into(),
                    idempotency_key: Some("retry-\"7\"".into()),
                    max_lifetime_seconds: Some(86_400),
                    tenant: Some("team \"a\"".into()),
                    queued_seq: Some(3),
                    preemptible: false,
                }),
            ),
            Event::new(
                Micros::from_micros(7),
                EventBody::Rejected(Rejection {
                    allocation_id: id,
                    job_id: "j".into(),
                    priority: Priority::Low,
                    ttl_seconds: 60,
                    workers: 5,
                    mcp_servers: vec![],
                    reason: RejectReason::InsufficientWorkers,
                    needed: 5,
                    available: 3,
                    error: "Insufficient workers: requested 5, available 3".into(),
                    metadata: Default::default(),
                    idempotency_key: None,
                    max_lifetime_seconds: None,
                    tenant: None,
                    quota: None,
                }),
            ),
            Event::new(
                Micros::from_micros(7),
                EventBody::Rejected(Rejection {
                    allocation_id: id,
                    job_id: "q".into(),
                    priority: Priority::Normal,
                    ttl_seconds: 60,
                    workers: 4,
                    mcp_servers: vec![],
                    reason: RejectReason::Quota,
                    needed: 4,
                    available: 2,
                    error: "exceeded quota for tenant t1: requested workers=4, used=8, limited=10".into(),
                    metadata: Default::default(),
                    idempotency_key: None,
                    max_lifetime_seconds: None,
                    tenant: Some("t1".into()),
                    quota: Some(crate::domain::quota::QuotaExceeded {
                        tenant: "t1".into(),
                        resource: "workers".into(),
                        requested: 4,
                        used: 8,
                        limited: 10,
                    }),
                }),
            ),
            Event::new(Micros::from_micros(8), EventBody::Released { allocation_id: id }),
            Event::new(
                Micros::from_micros(9),
                EventBody::Expired { allocation_id: id, deadline_us: Micros::from_micros(8) },
            ),
            Event::new(
                Micros::from_micros(10),
                EventBody::Renewed(Renewal {
                    allocation_id: id,
                    previous_deadline_us: Micros::from_micros(60_000_005),
                    deadline_us: Micros::from_micros(120_000_010),
                    ttl_seconds: 120,
                }),
            ),
        ]
    }

    #[test]
    fn lean_path_equals_the_general_path() {
        for ev in samples() {
            let bytes = ev.encode();
            let general: Event = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(general, ev);
            assert_eq!(Event::decode(&bytes).unwrap(), ev);
            if !matches!(ev.body, EventBody::LedgerCreated { .. }) {
                assert_eq!(decode_lean(&bytes).as_ref(), Some(&ev), "{}", String::from_utf8_lossy(&bytes));
            }
        }
    }

    /// The lean encoder writes what serde's derived (flattened) encoding writes, which is
    /// what every earlier build wrote; checked in release builds too, where the debug
    /// assertion in `encode` is off.
    #[test]
    fn lean_encoding_equals_serde_encoding() {
        let mut events = samples();
        for (ts_us, ttl_seconds) in [(Micros::MIN, 0), (Micros::MAX, u64::MAX), (Micros::EPOCH, 1)] {
            for ev in samples() {
                let mut ev = Event { ts_us, ..ev };
                if let EventBody::Granted(g) = &mut ev.body {
                    g.ttl_seconds = ttl_seconds;
                    g.metadata = Metadata::default();
                    g.mcp_servers.clear();
                    g.workers.clear();
                }
                events.push(ev);
            }
        }
        for ev in events {
            assert_eq!(ev.encode(), serde_json::to_vec(&ev).unwrap(), "{ev:?}");
        }
    }

    fn any_grant() -> impl proptest::strategy::Strategy<Value = Grant> {
        use proptest::prelude::*;
        // Strings of any characters: plain ones, and ones with quotes, backslashes, control
        // characters and non-ASCII that take serde_json's escaping path.
        let text = || prop_oneof!["[a-z0-9:/._-]{0,24}", any::<String>(), "[\"\\\\\u{0}-\u{1f}\u{7f}a\u{e9}]{0,6}"];
        let worker = (any::<u32>(), text(), text(), any::<u64>(), any::<u64>()).prop_map(|(slot, w, e, c, m)| {
            WorkerGrant { slot, worker_id: w, endpoint: e, cpu_millicores: c, memory_mib: m }
        });
        let mcp = (text(), text(), any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(name, endpoint, c, m, assigned, started)| McpGrant {
                name,
                endpoint,
                cpu_millicores: c,
                memory_mib: m,
                assigned,
                started,
            },
        );
        let metadata = proptest::collection::btree_map(text(), text(), 0..3)
            .prop_map(|m| Metadata::from_map(&m.into_iter().map(|(k, v)| (k, v.into())).collect()));
        let head = (0..=AllocationId::MAX, text(), 0..4usize, any::<u64>(), any::<i64>());
        let lists = (proptest::collection::vec(worker, 0..3), proptest::collection::vec(mcp, 0..3));
        let resources = (any::<u64>(), any::<u64>(), any::<u32>());
        let options = (metadata, proptest::option::of(text()), any::<Option<u64>>(), proptest::option::of(text()));
        let tail = (any::<Option<u64>>(), any::<bool>());
        (head, lists, resources, options, tail).prop_map(
            |(
                (id, job_id, p, ttl_seconds, deadline),
                (workers, mcp_servers),
                (c, m, w),
                (md, key, life, tenant),
                (q, pre),
            )| Grant {
                allocation_id: AllocationId::from_u64(id),
                job_id,
                priority: [Priority::Low, Priority::Normal, Priority::High, Priority::Critical][p],
                ttl_seconds,
                deadline_us: Micros::from_micros(deadline),
                workers,
                mcp_servers,
                resources: Resources { cpu_millicores: c, memory_mib: m, workers: w },
                metadata: md,
                idempotency_key: key.map(Into::into),
                max_lifetime_seconds: life,
                tenant,
                queued_seq: q,
                preemptible: pre,
            },
        )
    }

    proptest::proptest! {
        /// The hand-written `granted` encoding is byte for byte serde_json's, whatever the
        /// strings hold (escapes included), the ids, the numbers and the optional fields.
        #[test]
        fn granted_by_hand_equals_serde(grant in any_grant(), ts in proptest::prelude::any::<i64>(), v in 0u32..10) {
            let ev = Event { v, ts_us: Micros::from_micros(ts), body: EventBody::Granted(grant) };
            let mut by_hand = Vec::new();
            if let EventBody::Granted(g) = &ev.body {
                ev.encode_granted(&mut by_hand, g);
            }
            let by_serde = serde_json::to_vec(&ev).unwrap();
            proptest::prop_assert_eq!(String::from_utf8_lossy(&by_hand), String::from_utf8_lossy(&by_serde));
        }
    }

    #[test]
    fn malformed_events_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"v\":1,\"ts_us\":5,\"type\":\"granted\",}",
            b"{\"v\":1,\"ts_us\":5,\"type\":\"released\",\"allocation_id\":\"nope\"}",
            b"{\"v\":99,\"ts_us\":5,\"type\":\"released\",\"allocation_id\":\"alloc-000000000001\"}",
            b"{\"v\":1,\"ts_us\":99999999999999999999,\"type\":\"released\",\"allocation_id\":\"alloc-000000000001\"}",
            b"{\"v\":1,\"ts_us\":5,\"type\":\"bogus\"}",
        ] {
            assert!(Event::decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
