//! Ledger configuration. The config in force is recorded in the log's first event, so a ledger
//! always replays with the numbers it was created with.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

// Limits on everything that comes from outside: each bounds what one request or one config
// can make the ledger hold, so no input can exhaust memory or overflow the integer units.

/// Longest job id, in characters.
pub const MAX_JOB_ID_CHARS: usize = 256;
/// Longest MCP server name, in characters.
pub const MAX_MCP_NAME_CHARS: usize = 64;
/// Most MCP servers one request may name.
pub const MAX_MCP_SERVERS_PER_REQUEST: usize = 64;
/// Longest metadata key, in characters (keys also name `usage --by metadata.KEY` groups).
pub const MAX_METADATA_KEY_CHARS: usize = 128;
/// Most worker slots a pool may have.
pub const MAX_WORKER_SLOTS: u32 = 100_000;
/// Longest worker or MCP endpoint, in bytes.
pub const MAX_ENDPOINT_CHARS: usize = 512;
/// Bound on the pool's totals (millicores, MiB): sums of them cannot overflow a `u64`.
const MAX_TOTAL_UNITS: u64 = 1 << 40;
/// Longest allowed `max_ttl_seconds`: ten years.
const MAX_TTL_LIMIT_SECONDS: u64 = 10 * 365 * 86_400;
/// Most `max_metadata_bytes` may allow: 256 KiB.
const MAX_METADATA_BYTES_LIMIT: usize = 256 * 1024;
/// Smallest segment size: one page.
const MIN_SEGMENT_SIZE_BYTES: u64 = 4096;
/// Largest segment size: 4 GiB (record offsets within a segment are 32-bit).
const MAX_SEGMENT_SIZE_BYTES: u64 = 1 << 32;
/// Most ended allocations memory may keep.
const MAX_TERMINAL_RETAINED: u64 = 10_000_000;
/// Longest idempotency window: 30 days (the key table's memory grows with it).
const MAX_IDEMPOTENCY_WINDOW_SECONDS: u64 = 30 * 86_400;
/// Highest TCP port; a pool's worker ports must stay at or below it.
const MAX_PORT: u32 = 65_535;

/// An MCP server the pool knows in advance: its fixed endpoint and what it costs while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpCatalogEntry {
    /// Where the server listens; every grant naming it gets this endpoint.
    pub endpoint: String,
    /// CPU charged to the pool while any active allocation uses the server.
    #[serde(default)]
    pub cpu_millicores: u64,
    /// Memory charged to the pool while any active allocation uses the server.
    #[serde(default)]
    pub memory_mib: u64,
}

/// Percent of each pool that must stay free after a grant of the given priority. This is what
/// makes priority matter: by default `low` cannot take the last quarter of the pool, which
/// keeps room for everyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityReservePercent {
    /// Kept free from `low` requests (25 by default).
    pub low: u8,
    /// Kept free from `normal` requests.
    pub normal: u8,
    /// Kept free from `high` requests.
    pub high: u8,
    /// Kept free from `critical` requests.
    pub critical: u8,
}

impl PriorityReservePercent {
    /// The percent kept free from requests of `priority`.
    pub fn for_priority(self, priority: crate::domain::model::Priority) -> u8 {
        use crate::domain::model::Priority;
        match priority {
            Priority::Low => self.low,
            Priority::Normal => self.normal,
            Priority::High => self.high,
            Priority::Critical => self.critical,
        }
    }
}

impl Default for PriorityReservePercent {
    fn default() -> Self {
        PriorityReservePercent { low: 25, normal: 0, high: 0, critical: 0 }
    }
}

/// The pool and the ledger's limits; recorded in the log, changed only by a logged event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The pool's CPU, shared by workers and running MCP servers.
    pub total_cpu_millicores: u64,
    /// The pool's memory, shared by workers and running MCP servers.
    pub total_memory_mib: u64,
    /// Number of worker slots; slot `i` has id `worker-i` (zero-padded).
    pub worker_slots: u32,
    /// CPU one worker holds.
    pub worker_cpu_millicores: u64,
    /// Memory one worker holds.
    pub worker_memory_mib: u64,
    /// Endpoint of each slot; empty means `http://localhost:<worker_base_port + slot>`.
    pub worker_endpoints: Vec<String>,
    /// Port of slot 0 when `worker_endpoints` is empty.
    pub worker_base_port: u16,
    /// MCP servers with fixed endpoints and an optional cost, charged once while any active
    /// allocation uses the server.
    pub mcp_catalog: BTreeMap<String, McpCatalogEntry>,
    /// Names not in the catalog get `http://localhost:<port>` from this port upward.
    pub mcp_base_port: u16,
    /// When set, a name not in the catalog is invalid input.
    pub strict_mcp_catalog: bool,
    /// Shortest lifetime a request may ask for.
    pub min_ttl_seconds: u64,
    /// Longest lifetime a request may ask for.
    pub max_ttl_seconds: u64,
    /// Lifetime of a request that names none.
    pub default_ttl_seconds: u64,
    /// Take a snapshot after this many events (0 turns periodic snapshots off). A state whose
    /// snapshot exceeds 1 MiB also waits until the log has grown by that snapshot's size.
    pub snapshot_every: u64,
    /// Largest metadata a request may carry, as compact JSON.
    pub max_metadata_bytes: usize,
    /// A segment file is closed and a new one started once it reaches this size.
    pub segment_size_bytes: u64,
    /// Ended allocations (released, expired, failed) kept in memory, newest first; older ones
    /// are read from the log when asked for, so memory does not grow with history. The default
    /// (1000) keeps memory at about 1 KiB per active allocation; a lookup of an allocation
    /// that ended earlier searches the log.
    pub terminal_retained: u64,
    /// How much of the pool each priority must leave free.
    pub priority_reserve_percent: PriorityReservePercent,
    /// How long a request's idempotency key is remembered: a retry within this window gets the
    /// original outcome; after it, the key is new again.
    pub idempotency_window_seconds: u64,
    /// Per-tenant hard limits on what a tenant's active allocations hold at once.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub quotas: BTreeMap<String, crate::domain::quota::Quota>,
    /// The quota of every tenant not named in `quotas`, and of requests without a tenant
    /// (`None`: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_quota: Option<crate::domain::quota::Quota>,
    /// The metadata key that names a request's tenant when the request has no `tenant` field.
    pub tenant_metadata_key: String,
    /// Slots that take no new grants; an allocation holding one keeps it until it ends, and
    /// the slot leaves the pool's worker total when it is freed (`pool drain`).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub drained_workers: BTreeSet<u32>,
    /// Slots gone from the pool: never granted, not counted, their ids never reused (`pool
    /// remove-worker`).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub removed_workers: BTreeSet<u32>,
    /// The pending queue: wait timeouts, aging, backfill depth (`docs/policy.md`, "Fair queue").
    #[serde(skip_serializing_if = "crate::domain::queue::QueueConfig::is_default")]
    pub queue: crate::domain::queue::QueueConfig,
    /// Longest window a reservation may hold capacity for (written only when not the default).
    #[serde(skip_serializing_if = "is_default_reservation_seconds")]
    pub max_reservation_seconds: u64,
    /// How far ahead a reservation's window may open.
    #[serde(skip_serializing_if = "is_default_reservation_lead_seconds")]
    pub max_reservation_lead_seconds: u64,
    /// What each priority may do when it does not fit: `never` or `preempt_lower`
    /// (`docs/policy.md` §2; default: `critical` and `high` preempt lower priorities).
    #[serde(skip_serializing_if = "is_default_preemption")]
    pub preemption: crate::domain::preempt::PreemptionPolicy,
    /// How long a preempted allocation keeps its resources to checkpoint (0: preempted at once).
    #[serde(skip_serializing_if = "is_default_grace_seconds")]
    pub preemption_grace_seconds: u64,
    /// The priorities whose requests may ask for `preemptible: false` (default: `critical`).
    #[serde(skip_serializing_if = "is_default_non_preemptible")]
    pub non_preemptible_priorities: BTreeSet<crate::domain::model::Priority>,
}

/// Default of [`Config::preemption_grace_seconds`]: 30 s to checkpoint.
pub const DEFAULT_PREEMPTION_GRACE_SECONDS: u64 = 30;
/// Longest `preemption_grace_seconds`: a day.
const MAX_PREEMPTION_GRACE_SECONDS: u64 = 86_400;

fn is_default_preemption(p: &crate::domain::preempt::PreemptionPolicy) -> bool {
    *p == crate::domain::preempt::PreemptionPolicy::default()
}

fn is_default_grace_seconds(v: &u64) -> bool {
    *v == DEFAULT_PREEMPTION_GRACE_SECONDS
}

fn default_non_preemptible() -> BTreeSet<crate::domain::model::Priority> {
    BTreeSet::from([crate::domain::model::Priority::Critical])
}

fn is_default_non_preemptible(v: &BTreeSet<crate::domain::model::Priority>) -> bool {
    *v == default_non_preemptible()
}

/// Default of [`Config::max_reservation_seconds`]: 7 days, the longest lease.
pub const DEFAULT_MAX_RESERVATION_SECONDS: u64 = 604_800;
/// Default of [`Config::max_reservation_lead_seconds`]: 30 days.
pub const DEFAULT_MAX_RESERVATION_LEAD_SECONDS: u64 = 2_592_000;

fn is_default_reservation_seconds(v: &u64) -> bool {
    *v == DEFAULT_MAX_RESERVATION_SECONDS
}

fn is_default_reservation_lead_seconds(v: &u64) -> bool {
    *v == DEFAULT_MAX_RESERVATION_LEAD_SECONDS
}

impl Default for Config {
    /// The embedded default reproduces the original system: 16 CPU, 32768 MiB, 10 workers of
    /// 1 CPU and 2048 MiB each.
    fn default() -> Self {
        Config {
            total_cpu_millicores: 16_000,
            total_memory_mib: 32_768,
            worker_slots: 10,
            worker_cpu_millicores: 1_000,
            worker_memory_mib: 2_048,
            worker_endpoints: Vec::new(),
            worker_base_port: 8000,
            mcp_catalog: BTreeMap::new(),
            mcp_base_port: 9000,
            strict_mcp_catalog: false,
            min_ttl_seconds: 60,
            max_ttl_seconds: 604_800,
            default_ttl_seconds: 3_600,
            snapshot_every: 10_000,
            max_metadata_bytes: 16 * 1024,
            segment_size_bytes: 64 * 1024 * 1024,
            terminal_retained: 1_000,
            priority_reserve_percent: PriorityReservePercent::default(),
            idempotency_window_seconds: 86_400,
            quotas: BTreeMap::new(),
            default_quota: None,
            tenant_metadata_key: "tenant".to_string(),
            drained_workers: BTreeSet::new(),
            removed_workers: BTreeSet::new(),
            max_reservation_seconds: DEFAULT_MAX_RESERVATION_SECONDS,
            max_reservation_lead_seconds: DEFAULT_MAX_RESERVATION_LEAD_SECONDS,
            queue: crate::domain::queue::QueueConfig::default(),
            preemption: crate::domain::preempt::PreemptionPolicy::default(),
            preemption_grace_seconds: DEFAULT_PREEMPTION_GRACE_SECONDS,
            non_preemptible_priorities: default_non_preemptible(),
        }
    }
}

fn cfg_err(field: &str, message: impl Into<String>) -> Error {
    Error::invalid(format!("config.{field}"), message)
}

/// Names the field whose value has the wrong type or range for its Rust type (serde's own
/// message for that gives only a line and column): each field is decoded on its own. Syntax
/// errors and unknown fields are left to the whole-document decode, whose message says where.
fn check_field_types(text: &str) -> Result<()> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return Ok(()) };
    let serde_json::Value::Object(fields) = value else {
        return Err(Error::invalid("config", "must be a JSON object whose keys are config fields"));
    };
    for (key, v) in fields {
        let one = serde_json::Value::Object(std::iter::once((key.clone(), v)).collect());
        if let Err(e) = serde_json::from_value::<Config>(one) {
            let msg = e.to_string();
            if msg.starts_with(&format!("unknown field `{key}`")) {
                continue;
            }
            return Err(cfg_err(&key, msg));
        }
    }
    Ok(())
}

impl Config {
    /// Parses a JSON config; unknown fields are errors that list the known ones.
    pub fn from_json(text: &str) -> Result<Config> {
        check_field_types(text)?;
        let config: Config = serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            Error::invalid(
                "config",
                format!(
                    "{msg} (known fields: total_cpu_millicores, total_memory_mib, worker_slots, worker_cpu_millicores, worker_memory_mib, worker_endpoints, worker_base_port, mcp_catalog, mcp_base_port, strict_mcp_catalog, min_ttl_seconds, max_ttl_seconds, default_ttl_seconds, snapshot_every, max_metadata_bytes, segment_size_bytes, terminal_retained, priority_reserve_percent, idempotency_window_seconds, quotas, default_quota, tenant_metadata_key, drained_workers, removed_workers, queue, max_reservation_seconds, max_reservation_lead_seconds, preemption, preemption_grace_seconds, non_preemptible_priorities)"
                ),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Self::from_json(&text)
    }

    /// Checks every field and their relations; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<()> {
        self.validate_pool()?;
        self.validate_endpoints()?;
        self.validate_pool_sets()?;
        self.validate_ttls()?;
        self.validate_limits()?;
        crate::domain::quota::validate_quotas(&self.quotas, self.default_quota.as_ref())?;
        if self.max_reservation_seconds == 0 {
            return Err(cfg_err("max_reservation_seconds", "must be at least 1"));
        }
        self.queue.validate()?;
        if self.preemption_grace_seconds > MAX_PREEMPTION_GRACE_SECONDS {
            return Err(cfg_err(
                "preemption_grace_seconds",
                format!(
                    "{} is out of range; allowed values: 0 (preempt at once) to {MAX_PREEMPTION_GRACE_SECONDS} seconds",
                    self.preemption_grace_seconds
                ),
            ));
        }
        if !crate::domain::input::metadata_key_allowed(&self.tenant_metadata_key) {
            return Err(cfg_err("tenant_metadata_key", "must be 1 to 128 characters without control characters"));
        }
        Ok(())
    }

    /// The quota of `tenant` (`None`: unlimited).
    pub fn quota_of(&self, tenant: Option<&str>) -> Option<&crate::domain::quota::Quota> {
        tenant.and_then(|t| self.quotas.get(t)).or(self.default_quota.as_ref())
    }

    /// The pool's totals and what one worker takes of them.
    fn validate_pool(&self) -> Result<()> {
        if self.worker_slots > MAX_WORKER_SLOTS {
            return Err(cfg_err(
                "worker_slots",
                format!("{} is above the limit of {MAX_WORKER_SLOTS}", self.worker_slots),
            ));
        }
        if self.total_cpu_millicores == 0 {
            return Err(cfg_err("total_cpu_millicores", "must be greater than 0"));
        }
        if self.total_memory_mib == 0 {
            return Err(cfg_err("total_memory_mib", "must be greater than 0"));
        }
        if self.total_cpu_millicores > MAX_TOTAL_UNITS || self.total_memory_mib > MAX_TOTAL_UNITS {
            return Err(cfg_err("total_cpu_millicores", "totals must be below 2^40"));
        }
        if self.worker_cpu_millicores > self.total_cpu_millicores {
            return Err(cfg_err(
                "worker_cpu_millicores",
                format!("{} exceeds total_cpu_millicores {}", self.worker_cpu_millicores, self.total_cpu_millicores),
            ));
        }
        if self.worker_memory_mib > self.total_memory_mib {
            return Err(cfg_err(
                "worker_memory_mib",
                format!("{} exceeds total_memory_mib {}", self.worker_memory_mib, self.total_memory_mib),
            ));
        }
        Ok(())
    }

    /// Worker endpoints and ports, and the MCP catalog.
    fn validate_endpoints(&self) -> Result<()> {
        if !self.worker_endpoints.is_empty() && self.worker_endpoints.len() != self.worker_slots as usize {
            return Err(cfg_err(
                "worker_endpoints",
                format!(
                    "has {} entries; it must be empty or have exactly worker_slots ({}) entries",
                    self.worker_endpoints.len(),
                    self.worker_slots
                ),
            ));
        }
        for (i, e) in self.worker_endpoints.iter().enumerate() {
            check_endpoint(&format!("worker_endpoints[{i}]"), e)?;
        }
        if u32::from(self.worker_base_port) + self.worker_slots > MAX_PORT + 1 {
            return Err(cfg_err("worker_base_port", "worker_base_port + worker_slots must stay within port 65535"));
        }
        for (name, entry) in &self.mcp_catalog {
            validate_mcp_name(&format!("config.mcp_catalog key {name:?}"), name)?;
            check_endpoint(&format!("mcp_catalog.{name}.endpoint"), &entry.endpoint)?;
            if entry.cpu_millicores > self.total_cpu_millicores || entry.memory_mib > self.total_memory_mib {
                return Err(cfg_err(&format!("mcp_catalog.{name}"), "costs more than the whole pool"));
            }
        }
        Ok(())
    }

    /// Drained and removed slots exist and are in one set at most.
    fn validate_pool_sets(&self) -> Result<()> {
        for (field, set) in [("drained_workers", &self.drained_workers), ("removed_workers", &self.removed_workers)] {
            if let Some(&slot) = set.iter().next_back().filter(|&&s| s >= self.worker_slots) {
                return Err(cfg_err(
                    field,
                    format!(
                        "slot {slot} is not in the pool: slots are 0 to {} (worker_slots - 1)",
                        i64::from(self.worker_slots) - 1
                    ),
                ));
            }
        }
        if let Some(slot) = self.drained_workers.intersection(&self.removed_workers).next() {
            return Err(cfg_err(
                "drained_workers",
                format!("slot {slot} is also in removed_workers; a slot is drained or removed, not both"),
            ));
        }
        Ok(())
    }

    /// Slots that are part of the pool (all but the removed ones), drained ones included.
    pub fn in_pool_slots(&self) -> u32 {
        self.worker_slots - self.removed_workers.len() as u32
    }

    /// Whether a grant may take `slot`: in range, neither drained nor removed.
    pub fn grantable(&self, slot: u32) -> bool {
        slot < self.worker_slots && !self.drained_workers.contains(&slot) && !self.removed_workers.contains(&slot)
    }

    /// The pool's worker total when `held_drained` of the drained slots are still held: every
    /// slot not removed, less the drained ones already freed.
    pub fn pool_workers(&self, held_drained: usize) -> u32 {
        let idle_drained = self.drained_workers.len().saturating_sub(held_drained) as u32;
        self.in_pool_slots().saturating_sub(idle_drained)
    }

    /// The lifetimes a request may ask for.
    fn validate_ttls(&self) -> Result<()> {
        if self.min_ttl_seconds == 0 {
            return Err(cfg_err("min_ttl_seconds", "must be at least 1"));
        }
        if self.max_ttl_seconds < self.min_ttl_seconds {
            return Err(cfg_err(
                "max_ttl_seconds",
                format!("{} is below min_ttl_seconds {}", self.max_ttl_seconds, self.min_ttl_seconds),
            ));
        }
        if self.max_ttl_seconds > MAX_TTL_LIMIT_SECONDS {
            return Err(cfg_err("max_ttl_seconds", format!("must be at most ten years ({MAX_TTL_LIMIT_SECONDS})")));
        }
        if self.default_ttl_seconds < self.min_ttl_seconds || self.default_ttl_seconds > self.max_ttl_seconds {
            return Err(cfg_err(
                "default_ttl_seconds",
                format!(
                    "{} must lie between min_ttl_seconds {} and max_ttl_seconds {}",
                    self.default_ttl_seconds, self.min_ttl_seconds, self.max_ttl_seconds
                ),
            ));
        }
        Ok(())
    }

    /// Sizes of metadata, segments and memory, and the priority reserves.
    fn validate_limits(&self) -> Result<()> {
        if self.max_metadata_bytes > MAX_METADATA_BYTES_LIMIT {
            return Err(cfg_err("max_metadata_bytes", format!("must be at most {MAX_METADATA_BYTES_LIMIT}")));
        }
        if !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&self.segment_size_bytes) {
            return Err(cfg_err(
                "segment_size_bytes",
                format!("must lie between {MIN_SEGMENT_SIZE_BYTES} and {MAX_SEGMENT_SIZE_BYTES}"),
            ));
        }
        if !(1..=MAX_IDEMPOTENCY_WINDOW_SECONDS).contains(&self.idempotency_window_seconds) {
            return Err(cfg_err(
                "idempotency_window_seconds",
                format!("must lie between 1 and {MAX_IDEMPOTENCY_WINDOW_SECONDS} (30 days)"),
            ));
        }
        if self.terminal_retained > MAX_TERMINAL_RETAINED {
            return Err(cfg_err("terminal_retained", format!("must be at most {MAX_TERMINAL_RETAINED}")));
        }
        let r = self.priority_reserve_percent;
        for (name, v) in [("low", r.low), ("normal", r.normal), ("high", r.high), ("critical", r.critical)] {
            if v > 100 {
                return Err(cfg_err(
                    &format!("priority_reserve_percent.{name}"),
                    format!("{v} is not a percentage (0..=100)"),
                ));
            }
        }
        Ok(())
    }

    /// The id a grant gives the worker in `slot`.
    pub fn worker_id(&self, slot: u32) -> String {
        worker_id_of(slot)
    }

    /// The endpoint a grant gives the worker in `slot`.
    pub fn worker_endpoint(&self, slot: u32) -> String {
        match self.worker_endpoints.get(slot as usize) {
            Some(e) => e.clone(),
            None => {
                // By hand, not `format!`: every grant makes one per worker.
                let port = u32::from(self.worker_base_port) + slot;
                let mut digits = itoa::Buffer::new();
                ["http://localhost:", digits.format(port)].concat()
            }
        }
    }
}

/// The id of the worker in `slot` (`worker-07`: at least two digits); the same in every config.
pub fn worker_id_of(slot: u32) -> String {
    let mut digits = itoa::Buffer::new();
    let zero = if slot < 10 { "0" } else { "" };
    ["worker-", zero, digits.format(slot)].concat()
}

fn check_endpoint(field: &str, e: &str) -> Result<()> {
    if e.is_empty() || e.len() > MAX_ENDPOINT_CHARS || e.chars().any(char::is_control) {
        return Err(cfg_err(
            field,
            format!("must be a non-empty URL of at most {MAX_ENDPOINT_CHARS} characters without control characters"),
        ));
    }
    Ok(())
}

/// MCP server names: 1..=64 characters from `A-Z a-z 0-9 . _ -`.
pub fn validate_mcp_name(field: &str, name: &str) -> Result<()> {
    if !mcp_name_allowed(name) {
        return Err(mcp_name_error(field, name));
    }
    Ok(())
}

/// Whether `name` may name an MCP server (see [`validate_mcp_name`]); allocates nothing, so a
/// request's names are checked without building field names.
pub fn mcp_name_allowed(name: &str) -> bool {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    !name.is_empty() && name.chars().count() <= MAX_MCP_NAME_CHARS && ok_chars
}

/// The error for an MCP server name that [`mcp_name_allowed`] refuses.
pub fn mcp_name_error(field: &str, name: &str) -> Error {
    Error::invalid(
        field,
        format!(
            "{name:?} is not a valid MCP server name: use 1 to {MAX_MCP_NAME_CHARS} characters from A-Z a-z 0-9 . _ -"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_original_pool() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.total_cpu_millicores, 16_000);
        assert_eq!(c.total_memory_mib, 32_768);
        assert_eq!(c.worker_slots, 10);
        assert_eq!(c.worker_endpoint(3), "http://localhost:8003");
    }

    /// Worker ids and default endpoints are what `format!` made of them before (ids with at
    /// least two digits), for every slot the limits allow.
    #[test]
    fn worker_ids_and_endpoints_are_the_formatted_ones() {
        let c = Config { worker_slots: MAX_WORKER_SLOTS, ..Config::default() };
        for slot in (0..200).chain([MAX_WORKER_SLOTS - 1, 65_535, u32::MAX - u32::from(c.worker_base_port)]) {
            assert_eq!(worker_id_of(slot), format!("worker-{slot:02}"));
            assert_eq!(c.worker_endpoint(slot), format!("http://localhost:{}", u32::from(c.worker_base_port) + slot));
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = Config::from_json(r#"{"worker_slotz": 3}"#).unwrap_err().to_string();
        assert!(err.contains("worker_slotz") && err.contains("known fields"), "{err}");
        let err = Config::from_json(r#"{"min_ttl_seconds": 100, "max_ttl_seconds": 50}"#).unwrap_err().to_string();
        assert!(err.contains("max_ttl_seconds"), "{err}");
        let err = Config::from_json(r#"{"total_cpu_millicores": -1}"#).unwrap_err().to_string();
        assert!(err.contains("config"), "{err}");
        let err =
            Config::from_json(r#"{"priority_reserve_percent": {"low": 101, "normal": 0, "high": 0, "critical": 0}}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("priority_reserve_percent.low"), "{err}");
    }
}
