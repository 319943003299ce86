//! The layout of a ledger directory: one folder per kind of file.

/// The write-ahead log's segments.
pub const WAL_DIR: &str = "wal";
/// Snapshot files.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// Where damaged files are set aside (never deleted).
pub const QUARANTINE_DIR: &str = "quarantine";
/// The file a writer holds an exclusive lock on.
pub const LOCK_FILE: &str = "LOCK";
/// Where a new ledger's first segment is made durable before the directory is renamed to
/// `wal/` (see `Ledger::create`).
pub const WAL_STAGING_DIR: &str = "wal.new";
/// Snapshots kept on disk; older ones are removed (the log keeps everything).
pub const SNAPSHOTS_KEPT: usize = 4;
