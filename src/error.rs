//! Errors of the ledger. Each variant maps to one CLI exit code and one MCP error shape.

use std::path::PathBuf;

/// Where in the log or a snapshot damage was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    /// The sequence number the record at `offset` should have had.
    pub seq: u64,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {} (expected sequence number {}): {}",
            self.file.display(),
            self.offset,
            self.seq,
            self.reason
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input from outside (CLI, MCP, config) was rejected; no event was written.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },

    #[error("Allocation {0} not found")]
    NotFound(String),

    #[error("ledger {} is locked by another writer (only one process may write a ledger; open it read-only to inspect it)", .path.display())]
    Locked { path: PathBuf },

    #[error("ledger damaged: {0}; run `allocation-ledger verify` for details and `allocation-ledger repair` to cut a damaged tail")]
    Damaged(Damage),

    #[error("ledger {} is damaged: {message}", .path.display())]
    Inconsistent { path: PathBuf, message: String },

    #[error("ledger was opened read-only; writes are not allowed")]
    ReadOnly,

    /// A write or fsync failed earlier; the ledger refuses every further write until reopened.
    #[error("ledger stopped accepting writes after a storage failure ({0}); reopen it to recover from the log")]
    Poisoned(String),

    #[error("no ledger at {}: the directory holds no log and no snapshot (a write such as `request` creates a ledger; queries never do)", .path.display())]
    NoLedger { path: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput { field: field.into(), message: message.into() }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// A short machine-readable kind, used in JSON error output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidInput { .. } => "invalid_input",
            Error::NotFound(_) => "not_found",
            Error::Locked { .. } => "locked",
            Error::Damaged(_) | Error::Inconsistent { .. } => "damaged",
            Error::ReadOnly => "read_only",
            Error::Poisoned(_) => "poisoned",
            Error::NoLedger { .. } => "no_ledger",
            Error::Io { .. } => "io",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
