//! Pool changes: each is a new config built from the one in force (recorded as a
//! `config_changed` event, so time travel knows the pool as it was), and the words that
//! describe the difference between two configs for `history` and the audit.
//!
//! Drain and removal: a drained slot takes no new grants; whoever holds it keeps it until the
//! allocation ends, and then the slot leaves the pool's worker total. A removed slot is gone:
//! never granted, not counted, its id never reused. Only a drained, idle slot may be removed.

use crate::domain::config::{validate_mcp_name, worker_id_of, Config, McpCatalogEntry};
use crate::domain::state::State;
use crate::{Error, Result};
use serde::Serialize;

/// One change to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolChange {
    /// New slots after the last one (new ids); the totals grow by `count` worker sizes.
    AddWorkers {
        /// How many slots.
        count: u32,
        /// Their endpoints, required iff the config lists explicit `worker_endpoints`.
        endpoints: Vec<String>,
    },
    /// The slot takes no new grants (its holder keeps it).
    Drain {
        /// The slot.
        slot: u32,
    },
    /// A drained slot takes grants again.
    Undrain {
        /// The slot.
        slot: u32,
    },
    /// A drained, idle slot leaves the pool; the totals shrink by one worker size.
    RemoveWorker {
        /// The slot.
        slot: u32,
    },
    /// Adds or changes an MCP catalog entry (costs kept when not given).
    McpSet {
        /// The server's name.
        name: String,
        /// Its endpoint.
        endpoint: String,
        /// Its CPU while running (`None`: keep, or 0 for a new entry).
        cpu_millicores: Option<u64>,
        /// Its memory while running (`None`: keep, or 0 for a new entry).
        memory_mib: Option<u64>,
    },
    /// Drops an MCP catalog entry (refused while an active allocation uses it).
    McpRemove {
        /// The server's name.
        name: String,
    },
}

/// The actions' names, as the MCP tool's `action` field takes them.
pub const POOL_ACTIONS: &[&str] = &["add_workers", "drain", "undrain", "remove_worker", "mcp_set", "mcp_remove"];

/// The slot a worker argument names: `worker-07`, `worker-7` or `7`.
pub fn parse_worker(field: &str, text: &str) -> Result<u32> {
    let digits = text.strip_prefix("worker-").unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(
            field,
            format!("{text:?} is not a worker: give its id (worker-07) or its slot number (7)"),
        ));
    }
    digits.parse().map_err(|_| Error::invalid(field, format!("{text:?} is not a worker: the slot number is too large")))
}

impl PoolChange {
    /// The action's name (see [`POOL_ACTIONS`]).
    pub fn action(&self) -> &'static str {
        match self {
            PoolChange::AddWorkers { .. } => "add_workers",
            PoolChange::Drain { .. } => "drain",
            PoolChange::Undrain { .. } => "undrain",
            PoolChange::RemoveWorker { .. } => "remove_worker",
            PoolChange::McpSet { .. } => "mcp_set",
            PoolChange::McpRemove { .. } => "mcp_remove",
        }
    }

    /// The config after this change to `state`'s, checked against what is held now (the
    /// same check as any config change). Equal to the current config when there is nothing to
    /// do (draining a drained slot).
    pub fn apply_to(&self, state: &State) -> Result<Config> {
        let old = &state.config;
        let mut c = old.clone();
        match self {
            PoolChange::AddWorkers { count, endpoints } => add_workers(&mut c, *count, endpoints)?,
            PoolChange::Drain { slot } => {
                existing(old, *slot)?;
                c.drained_workers.insert(*slot);
            }
            PoolChange::Undrain { slot } => {
                existing(old, *slot)?;
                c.drained_workers.remove(slot);
            }
            PoolChange::RemoveWorker { slot } => remove_worker(&mut c, *slot)?,
            PoolChange::McpSet { name, endpoint, cpu_millicores, memory_mib } => {
                validate_mcp_name("name", name)?;
                let before = old.mcp_catalog.get(name);
                let entry = McpCatalogEntry {
                    endpoint: endpoint.clone(),
                    cpu_millicores: cpu_millicores.or(before.map(|e| e.cpu_millicores)).unwrap_or(0),
                    memory_mib: memory_mib.or(before.map(|e| e.memory_mib)).unwrap_or(0),
                };
                c.mcp_catalog.insert(name.clone(), entry);
            }
            PoolChange::McpRemove { name } => mcp_remove(state, &mut c, name)?,
        }
        if c != *old {
            state.decide_config_change(c.clone())?;
        }
        Ok(c)
    }
}

/// A slot that is in the pool (not removed, below `worker_slots`).
fn existing(c: &Config, slot: u32) -> Result<()> {
    if slot >= c.worker_slots {
        let last = if c.worker_slots == 0 {
            "the pool has none".to_string()
        } else {
            format!("the last is {}", worker_id_of(c.worker_slots - 1))
        };
        return Err(Error::invalid("worker", format!("{} is not in the pool: {last}", worker_id_of(slot))));
    }
    if c.removed_workers.contains(&slot) {
        return Err(Error::invalid("worker", format!("{} was removed from the pool", worker_id_of(slot))));
    }
    Ok(())
}

fn add_workers(c: &mut Config, count: u32, endpoints: &[String]) -> Result<()> {
    if count == 0 {
        return Err(Error::invalid("count", "must be at least 1"));
    }
    if c.worker_endpoints.is_empty() && !endpoints.is_empty() {
        return Err(Error::invalid(
            "endpoints",
            "the config lists no worker_endpoints (each worker gets http://localhost:<worker_base_port + slot>): give no endpoints",
        ));
    }
    if !c.worker_endpoints.is_empty() && endpoints.len() != count as usize {
        return Err(Error::invalid(
            "endpoints",
            format!(
                "the config lists each worker's endpoint: give exactly {count} (one per new worker), got {}",
                endpoints.len()
            ),
        ));
    }
    c.worker_slots = c.worker_slots.checked_add(count).ok_or_else(|| Error::invalid("count", "too many workers"))?;
    c.worker_endpoints.extend(endpoints.iter().cloned());
    let grow = |per: u64| per.checked_mul(u64::from(count)).ok_or_else(|| Error::invalid("count", "too many workers"));
    c.total_cpu_millicores = c.total_cpu_millicores.saturating_add(grow(c.worker_cpu_millicores)?);
    c.total_memory_mib = c.total_memory_mib.saturating_add(grow(c.worker_memory_mib)?);
    c.validate().map_err(|e| Error::invalid("count", format!("the pool would be invalid: {e}")))
}

fn remove_worker(c: &mut Config, slot: u32) -> Result<()> {
    existing(c, slot)?;
    if !c.drained_workers.contains(&slot) {
        let id = worker_id_of(slot);
        return Err(Error::invalid(
            "worker",
            format!("{id} is not drained: drain it first (pool drain {id}), then remove it once it is idle"),
        ));
    }
    c.drained_workers.remove(&slot);
    c.removed_workers.insert(slot);
    c.total_cpu_millicores = c.total_cpu_millicores.saturating_sub(c.worker_cpu_millicores);
    c.total_memory_mib = c.total_memory_mib.saturating_sub(c.worker_memory_mib);
    Ok(())
}

fn mcp_remove(state: &State, c: &mut Config, name: &str) -> Result<()> {
    if c.mcp_catalog.remove(name).is_none() {
        let known: Vec<&str> = state.config.mcp_catalog.keys().map(String::as_str).collect();
        let known = if known.is_empty() { "(none)".to_string() } else { known.join(", ") };
        return Err(Error::invalid("name", format!("{name:?} is not in the MCP catalog; catalog names: {known}")));
    }
    if let Some(a) = state
        .allocations()
        .filter(|a| a.state == crate::domain::model::AllocationState::Active)
        .find(|a| a.mcp_servers.iter().any(|m| m.name == name))
    {
        return Err(Error::invalid(
            "name",
            format!(
                "MCP server {name} is running for allocation {} (job {}); remove it once no active allocation uses it",
                a.id, a.job_id
            ),
        ));
    }
    Ok(())
}

/// One field that differs between two configs (JSON values).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ConfigFieldChange {
    /// The field's name.
    pub field: String,
    /// Its value before.
    pub from: serde_json::Value,
    /// Its value after.
    pub to: serde_json::Value,
}

/// The fields of `to` that differ from `from`, in the config's field order.
pub fn config_diff(from: &Config, to: &Config) -> Vec<ConfigFieldChange> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(from), serde_json::to_value(to))
    else {
        return Vec::new();
    };
    let mut out: Vec<ConfigFieldChange> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(v))
        .map(|(field, to)| ConfigFieldChange {
            field: field.clone(),
            from: a.get(field).cloned().unwrap_or_else(|| empty_like(to)),
            to: to.clone(),
        })
        .collect();
    // A field left out when empty (drained_workers, quotas...) that became empty.
    out.extend(a.iter().filter(|(k, _)| !b.contains_key(*k)).map(|(field, from)| ConfigFieldChange {
        field: field.clone(),
        from: from.clone(),
        to: empty_like(from),
    }));
    out
}

/// How a field left out of a config's JSON (because it is empty) reads: `[]`, `{}` or `null`.
fn empty_like(present: &serde_json::Value) -> serde_json::Value {
    match present {
        serde_json::Value::Array(_) => serde_json::Value::Array(Vec::new()),
        serde_json::Value::Object(_) => serde_json::Value::Object(serde_json::Map::new()),
        _ => serde_json::Value::Null,
    }
}

/// The difference between two configs in words, pool first: "added worker-10, worker-11",
/// "drained worker-03", "MCP server github removed", then any other field as `field: a -> b`.
pub fn describe_change(from: &Config, to: &Config) -> Vec<String> {
    let ids = |slots: Vec<u32>| slots.into_iter().map(worker_id_of).collect::<Vec<_>>().join(", ");
    let mut words = Vec::new();
    let added: Vec<u32> = (from.worker_slots..to.worker_slots).collect();
    if !added.is_empty() {
        words.push(format!("added {}", ids(added)));
    }
    let mut set_words = |verb: &str, slots: Vec<u32>| {
        if !slots.is_empty() {
            words.push(format!("{verb} {}", ids(slots)));
        }
    };
    set_words("removed", to.removed_workers.difference(&from.removed_workers).copied().collect());
    set_words("drained", to.drained_workers.difference(&from.drained_workers).copied().collect());
    let removed_now = &to.removed_workers;
    set_words(
        "undrained",
        from.drained_workers.difference(&to.drained_workers).filter(|s| !removed_now.contains(s)).copied().collect(),
    );
    for (name, e) in &to.mcp_catalog {
        if from.mcp_catalog.get(name) != Some(e) {
            words.push(format!(
                "MCP server {name} set to {} ({} millicores, {} MiB)",
                e.endpoint, e.cpu_millicores, e.memory_mib
            ));
        }
    }
    for name in from.mcp_catalog.keys().filter(|n| !to.mcp_catalog.contains_key(*n)) {
        words.push(format!("MCP server {name} removed"));
    }
    const WORDED: &[&str] = &["worker_slots", "drained_workers", "removed_workers", "mcp_catalog", "worker_endpoints"];
    for c in config_diff(from, to).into_iter().filter(|c| !WORDED.contains(&c.field.as_str())) {
        words.push(format!("{}: {} -> {}", c.field, c.from, c.to));
    }
    if from.worker_endpoints != to.worker_endpoints && to.worker_slots == from.worker_slots {
        words.push("worker_endpoints changed".to_string());
    }
    words
}

/// A config's pool in a line, for event tables that show a config without the one before:
/// "pool: 12 worker slots (drained worker-03; removed worker-05), 18000 millicores, 36864 MiB".
pub fn pool_summary(c: &Config) -> String {
    let ids =
        |set: &std::collections::BTreeSet<u32>| set.iter().map(|&s| worker_id_of(s)).collect::<Vec<_>>().join(", ");
    let mut sets = Vec::new();
    if !c.drained_workers.is_empty() {
        sets.push(format!("drained {}", ids(&c.drained_workers)));
    }
    if !c.removed_workers.is_empty() {
        sets.push(format!("removed {}", ids(&c.removed_workers)));
    }
    let sets = if sets.is_empty() { String::new() } else { format!(" ({})", sets.join("; ")) };
    format!(
        "pool: {} worker slots{sets}, {} millicores, {} MiB, {} MCP catalog entries",
        c.worker_slots,
        c.total_cpu_millicores,
        c.total_memory_mib,
        c.mcp_catalog.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_parse() {
        assert_eq!(parse_worker("worker", "worker-07").unwrap(), 7);
        assert_eq!(parse_worker("worker", "12").unwrap(), 12);
        assert!(parse_worker("worker", "w7").unwrap_err().to_string().contains("worker"));
        assert!(parse_worker("worker", "").is_err());
    }

    #[test]
    fn changes_are_described_in_words() {
        let a = Config::default();
        let mut b = a.clone();
        b.worker_slots = 12;
        b.total_cpu_millicores += 2000;
        b.drained_workers.insert(3);
        let words = describe_change(&a, &b);
        assert_eq!(words[0], "added worker-10, worker-11");
        assert_eq!(words[1], "drained worker-03");
        assert!(words.iter().any(|w| w.starts_with("total_cpu_millicores: 16000 -> 18000")), "{words:?}");
        let mut c = b.clone();
        c.drained_workers.clear();
        c.removed_workers.insert(3);
        assert_eq!(describe_change(&b, &c), vec!["removed worker-03".to_string()]);
    }
}
