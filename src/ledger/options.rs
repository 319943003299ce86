//! The small public types of the ledger: how to open one, and what opening, a snapshot and a
//! status look found.

use crate::domain::clock::{Clock, SystemClock};
use crate::domain::config::Config;
use crate::log::storage::{FsStorage, Storage};
use crate::log::wal::TornTail;
use std::path::PathBuf;
use std::sync::Arc;

/// How to open a ledger.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Config for a ledger created by this open; an existing ledger keeps the config in its log.
    pub config: Option<Config>,
    /// Where event timestamps come from (a manual clock makes tests and replays deterministic).
    pub clock: Arc<dyn Clock>,
    /// Where the bytes go: real files, or a test double that injects faults.
    pub storage: Arc<dyn Storage>,
    /// Create the ledger if the directory holds none (read-write opens only).
    pub create: bool,
    /// Open without the write lock, beside a running writer; every write fails.
    pub read_only: bool,
    /// Replicated mode: open the ledger as one copy of a log shared through a cluster
    /// (`OpenOptions::etcd`, docs/replication.md); `None` is the local log.
    pub replication: Option<Arc<dyn Replication>>,
}

/// How a replicated ledger opens (etcd: `OpenOptions::etcd`). The local copy keeps the log in
/// the directory's files in the usual format, so every read, history and `verify` runs
/// locally; writes are decided by one leader and committed to the shared log first.
pub trait Replication: Send + Sync + std::fmt::Debug {
    /// Opens the copy in `dir` (`opts` without the replication set).
    fn open(&self, dir: &std::path::Path, opts: OpenOptions) -> crate::Result<super::Ledger>;
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            config: None,
            clock: Arc::new(SystemClock),
            storage: Arc::new(FsStorage { mmap_min_bytes: 1 << 20 }),
            create: true,
            read_only: false,
            replication: None,
        }
    }
}

impl OpenOptions {
    /// Options for a reader beside a running writer: no lock, no creation, nothing written;
    /// files are mapped whatever their size (a reader only reads).
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            create: false,
            storage: Arc::new(FsStorage { mmap_min_bytes: 0 }),
            ..Default::default()
        }
    }

    /// The config a ledger created by this open starts with.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Replaces the clock (tests use a manual one).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces the storage (tests use one that injects faults).
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = storage;
        self
    }
}

/// A snapshot that an open did not use (it failed to load, or belongs to another log).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SetAside {
    /// The snapshot file as it was found.
    pub file: PathBuf,
    /// Why it was not used.
    pub reason: String,
    /// Where it was moved (read-write opens only).
    pub moved_to: Option<PathBuf>,
}

/// What opening found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// The directory held no ledger and this open created one.
    pub created: bool,
    /// The sequence number of the snapshot the open started from, if any loaded.
    pub snapshot_seq: Option<u64>,
    /// Events folded from the log after the snapshot (or from the start).
    pub events_replayed: u64,
    /// Replay started right after the snapshot's last event (the position it recorded checked
    /// out) rather than at the start of that event's segment.
    pub resumed_from_snapshot_position: bool,
    /// The sequence number of the last event after the open.
    pub last_seq: u64,
    /// An incomplete write at the end of the log: cut (read-write) or only reported (read-only).
    pub torn_tail: Option<TornTail>,
    /// Snapshots that did not load or did not match the log, newest first.
    pub snapshots_set_aside: Vec<SetAside>,
}

/// A snapshot that was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// The sequence number of the last event it holds.
    pub seq: u64,
    /// The file it was written to.
    pub path: PathBuf,
}

/// The ledger's health at a glance (CLI `status`, MCP health).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerStatus {
    /// The directory the ledger lives in.
    pub data_dir: PathBuf,
    /// The identity written in the log's first record.
    pub ledger_id: String,
    /// Whether this handle was opened without the write lock.
    pub read_only: bool,
    /// The last event folded into the state (durable or not yet).
    pub last_seq: u64,
    /// The last event known to be durable.
    pub durable_seq: u64,
    /// Why the ledger stopped accepting writes, if it did.
    pub poisoned: Option<String>,
    /// Why the last periodic snapshot failed, if it did (snapshots are derived data: the write
    /// that triggered it succeeded).
    pub last_snapshot_error: Option<String>,
    /// The head of the log's tamper-evident chain as far as it is durable (`{seq, hash}`);
    /// `None` for a read-only handle, or while the log ends in an older, unchained segment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_head: Option<crate::log::chain::ChainHead>,
}
