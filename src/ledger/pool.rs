//! The pool's slots as they are now (`pool show`, `get_pool`), and pool changes (`pool ...`,
//! `change_pool`): each builds the new config from the one in force under the core lock and
//! records it as a `config_changed` event (see `domain/pool.rs` for the rules).

use super::Ledger;
use crate::domain::clock::Micros;
use crate::domain::config::{worker_id_of, McpCatalogEntry};
use crate::domain::pool::{config_diff, describe_change, ConfigFieldChange, PoolChange};
use crate::domain::state::State;
use crate::report::CapacityReport;
use crate::{Config, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One worker slot and what it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSlot {
    /// Its id (`worker-07`).
    pub worker_id: String,
    /// Its slot number.
    pub slot: u32,
    /// `free`, `held`, `draining` (drained, still held), `drained` (idle, out of the pool) or
    /// `removed`.
    pub state: String,
    /// The allocation holding it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<String>,
    /// Where a grant sends its work.
    pub endpoint: String,
}

/// `pool show` / `get_pool`: every slot with its state, the MCP catalog and the capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    /// Every slot ever in the pool, removed ones included.
    pub workers: Vec<PoolSlot>,
    /// The MCP servers with fixed endpoints and costs.
    pub mcp_catalog: BTreeMap<String, McpCatalogEntry>,
    /// CPU one worker holds (what `add-workers` adds to the total per worker).
    pub worker_cpu_millicores: u64,
    /// Memory one worker holds.
    pub worker_memory_mib: u64,
    /// Totals, held and free now.
    pub capacity: CapacityReport,
    /// The ledger's last sequence number (an `expected_seq` for the next change).
    pub seq: u64,
}

/// What a pool change did (or, dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolChangeReport {
    /// The action (`add_workers`, `drain`, ...).
    pub action: String,
    /// The change in words ("drained worker-03").
    pub summary: Vec<String>,
    /// The config fields that change.
    pub changes: Vec<ConfigFieldChange>,
    /// Whether a `config_changed` event was written.
    pub applied: bool,
    /// Nothing was written because it was asked not to be.
    pub dry_run: bool,
    /// The ledger's last sequence number after it (the change's event when applied).
    pub seq: u64,
}

impl PoolReport {
    fn of(state: &State, now: Micros) -> PoolReport {
        let c = &state.config;
        let workers = (0..c.worker_slots)
            .map(|slot| {
                let holder = state.slot_owner(slot).filter(|id| state.allocation(*id).is_some_and(|a| a.holds_at(now)));
                let drained = c.drained_workers.contains(&slot);
                let what = match (c.removed_workers.contains(&slot), drained, holder.is_some()) {
                    (true, _, _) => "removed",
                    (_, true, true) => "draining",
                    (_, true, false) => "drained",
                    (_, false, true) => "held",
                    (_, false, false) => "free",
                };
                PoolSlot {
                    worker_id: worker_id_of(slot),
                    slot,
                    state: what.to_string(),
                    allocation_id: holder.map(|id| id.to_string()),
                    endpoint: c.worker_endpoint(slot),
                }
            })
            .collect();
        PoolReport {
            workers,
            mcp_catalog: c.mcp_catalog.clone(),
            worker_cpu_millicores: c.worker_cpu_millicores,
            worker_memory_mib: c.worker_memory_mib,
            capacity: state.capacity(now),
            seq: state.last_seq,
        }
    }
}

impl Ledger {
    /// The pool now: each slot's state, the MCP catalog, the capacity.
    pub fn pool(&self) -> Result<PoolReport> {
        self.read(PoolReport::of)
    }

    /// Changes the pool: the new config is built from the one in force and recorded as a
    /// `config_changed` event, refused (naming the field) if it would take away what an active
    /// allocation holds. A change that changes nothing writes nothing; `dry_run` writes
    /// nothing either. `expected_seq`: apply only if the ledger is still there.
    pub fn change_pool(
        &self,
        change: &PoolChange,
        expected_seq: Option<u64>,
        dry_run: bool,
    ) -> Result<PoolChangeReport> {
        let action = change.action().to_string();
        if dry_run {
            return self.read(|s, _| {
                s.check_expected_seq(expected_seq)?;
                let new = change.apply_to(s)?;
                let summary = describe_change(&s.config, &new);
                let changes = config_diff(&s.config, &new);
                Ok(PoolChangeReport { action, summary, changes, applied: false, dry_run, seq: s.last_seq })
            })?;
        }
        let change = change.clone();
        self.write_checked(
            move |state, _| state.check_expected_seq(expected_seq).map(|()| None),
            move |state, _, _| {
                let new = change.apply_to(state)?;
                let summary = describe_change(&state.config, &new);
                let changes = config_diff(&state.config, &new);
                let applied = !changes.is_empty();
                let seq = state.last_seq + u64::from(applied);
                let report = PoolChangeReport { action, summary, changes, applied, dry_run, seq };
                let events =
                    if applied { vec![crate::domain::event::EventBody::ConfigChanged { config: new }] } else { vec![] };
                Ok((events, report))
            },
        )
    }
}

/// What `config apply` / `apply_config` did (or, dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigApplyReport {
    /// The config fields that change (none: the ledger already records this config).
    pub changes: Vec<ConfigFieldChange>,
    /// Whether a `config_changed` event was written.
    pub applied: bool,
    /// Nothing was written because it was asked not to be.
    pub dry_run: bool,
    /// The change's event, when applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Ledger {
    /// Records `new` as the config (a `config_changed` event) after showing what changes: refused,
    /// naming the field and the allocation, if it would take away what an active allocation
    /// holds; a config equal to the recorded one writes nothing; `dry_run` writes nothing.
    /// `expected_seq`: apply only if the ledger is still there.
    pub fn apply_config(&self, new: Config, expected_seq: Option<u64>, dry_run: bool) -> Result<ConfigApplyReport> {
        let (current, verdict) =
            self.with_state(|s| (s.config.clone(), s.decide_config_change(new.clone()).map(|_| ())));
        let changes = config_diff(&current, &new);
        if changes.is_empty() {
            return Ok(ConfigApplyReport { changes, applied: false, dry_run, seq: None });
        }
        verdict?;
        let seq = match (dry_run, expected_seq) {
            (true, _) => None,
            (false, Some(seq)) => Some(self.if_seq(seq).reconfigure(new)?),
            (false, None) => Some(self.reconfigure(new)?),
        };
        Ok(ConfigApplyReport { applied: seq.is_some(), dry_run, seq, changes })
    }
}
