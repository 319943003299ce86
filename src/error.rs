//! Errors of the ledger. Each variant maps to one CLI exit code and one MCP error shape.

use std::path::PathBuf;

/// Where in the log or a snapshot damage was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    /// The segment or snapshot file holding the damage.
    pub file: PathBuf,
    /// Byte offset in `file` of the first record that does not read.
    pub offset: u64,
    /// The sequence number the record at `offset` should have had.
    pub seq: u64,
    /// What is wrong there, for a person (checksum mismatch, truncated header, ...).
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

/// Everything the ledger can fail with; each variant has one exit code ([`Error::exit_code`])
/// and one machine-readable kind ([`Error::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input from outside (CLI, MCP, config) was rejected; no event was written.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The rejected field as the library names it (`workers`, `mcp_servers[1]`,
        /// `config.pool`), which the CLI and MCP map to their own spelling.
        field: String,
        /// Why, and what would be accepted.
        message: String,
    },

    /// No allocation has this id (release, get); carries the id as given.
    #[error("Allocation {0} not found")]
    NotFound(String),

    /// Another process holds the ledger's write lock.
    #[error("ledger {} is locked by another writer (only one process may write a ledger; open it read-only to inspect it)", .path.display())]
    Locked {
        /// The ledger directory.
        path: PathBuf,
    },

    /// A record or snapshot does not read; `verify` and `repair` deal with it.
    #[error("ledger damaged: {0}; run `allocation-ledger verify` for details and `allocation-ledger repair` to cut a damaged tail")]
    Damaged(Damage),

    /// The files read, but do not form a valid ledger (a rule of the log is broken).
    #[error("ledger {} is damaged: {message}", .path.display())]
    Inconsistent {
        /// The file or directory at fault.
        path: PathBuf,
        /// Which rule is broken.
        message: String,
    },

    /// A write was attempted on a ledger opened read-only.
    #[error("ledger was opened read-only; writes are not allowed")]
    ReadOnly,

    /// A write or fsync failed earlier; the ledger refuses every further write until reopened.
    #[error("ledger stopped accepting writes after a storage failure ({0}); reopen it to recover from the log")]
    Poisoned(String),

    /// A read-only open found an empty directory (queries never create a ledger).
    #[error("no ledger at {}: the directory holds no log and no snapshot (check --data-dir; `init` or a write such as `request` creates a ledger, queries never do)", .path.display())]
    NoLedger {
        /// The directory looked in.
        path: PathBuf,
    },

    /// A write's `expected_seq` precondition failed: the ledger moved on since the caller read
    /// it. Nothing was written; read again (or plan again) and retry with the current seq.
    #[error("conflict: expected_seq {expected_seq} but the ledger is at seq {current_seq}; nothing was written (read again and retry with expected_seq {current_seq})")]
    Conflict {
        /// The sequence number the caller expected.
        expected_seq: u64,
        /// The ledger's last sequence number now.
        current_seq: u64,
    },

    /// The allocation exists but is no longer active (renewing it is not possible).
    #[error("allocation {allocation_id} is {state}, not active; only an active allocation can be renewed (request a new one)")]
    NotActive {
        /// The allocation.
        allocation_id: String,
        /// Its state (`released`, `expired` or `failed`).
        state: String,
    },

    /// This copy of a replicated ledger cannot take the write now: it is not the leader (the
    /// message names the leader), or the shared log (etcd) has no quorum. Nothing was
    /// acknowledged; retry at the leader or later.
    #[error("{0}")]
    Unavailable(String),

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `cannot open /x/wal/00000001.seg`.
        context: String,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput { field: field.into(), message: message.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// A short machine-readable kind, used in JSON error output (it serialises as the
    /// snake_case string, e.g. `"invalid_input"`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidInput { .. } => ErrorKind::InvalidInput,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Damaged(_) | Error::Inconsistent { .. } => ErrorKind::Damaged,
            Error::ReadOnly => ErrorKind::ReadOnly,
            Error::Poisoned(_) => ErrorKind::Poisoned,
            Error::NoLedger { .. } => ErrorKind::NoLedger,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::NotActive { .. } => ErrorKind::NotActive,
            Error::Io { .. } => ErrorKind::Io,
            Error::Unavailable(_) => ErrorKind::Unavailable,
        }
    }

    /// The process exit code this error ends the CLI (and `serve`) with.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::InvalidInput { .. } => ExitCode::InvalidInput,
            Error::NotFound(_) | Error::NoLedger { .. } => ExitCode::NotFound,
            Error::Locked { .. } => ExitCode::Locked,
            Error::Damaged(_) | Error::Inconsistent { .. } => ExitCode::Damaged,
            Error::Conflict { .. } => ExitCode::Conflict,
            Error::NotActive { .. } => ExitCode::NotActive,
            Error::ReadOnly | Error::Poisoned(_) | Error::Io { .. } | Error::Unavailable(_) => ExitCode::Other,
        }
    }
}

/// The kind of an [`Error`], as the `kind` field of the CLI's and the MCP tools' JSON error
/// output spells it; callers can match on it without matching every variant's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::InvalidInput`].
    InvalidInput,
    /// [`Error::NotFound`].
    NotFound,
    /// [`Error::Locked`].
    Locked,
    /// [`Error::Damaged`] or [`Error::Inconsistent`].
    Damaged,
    /// [`Error::ReadOnly`].
    ReadOnly,
    /// [`Error::Poisoned`].
    Poisoned,
    /// [`Error::NoLedger`].
    NoLedger,
    /// [`Error::Conflict`].
    Conflict,
    /// [`Error::NotActive`].
    NotActive,
    /// [`Error::Io`].
    Io,
    /// [`Error::Unavailable`].
    Unavailable,
}

impl ErrorKind {
    /// The spelling in JSON output: `invalid_input`, `not_found`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Locked => "locked",
            ErrorKind::Damaged => "damaged",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Poisoned => "poisoned",
            ErrorKind::NoLedger => "no_ledger",
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotActive => "not_active",
            ErrorKind::Io => "io",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with the JSON spelling, so `e.kind() == "locked"` reads as it did when the kind
/// was a string.
impl PartialEq<&str> for ErrorKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The exit codes of the `allocation-ledger` binary, shared by every subcommand including
/// `serve` (README.md documents them; scripts rely on the numbers, which never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum ExitCode {
    /// Success (for `request`: granted).
    Ok = 0,
    /// Any failure without a code of its own (I/O, a poisoned or read-only ledger, ...).
    Other = 1,
    /// Invalid arguments, input or config; nothing was written.
    InvalidInput = 2,
    /// `request` was decided and recorded, but not granted.
    NotGranted = 3,
    /// No allocation has the id given, or there is no ledger in the directory (a read never
    /// creates one).
    NotFound = 4,
    /// Another process holds the ledger's write lock.
    Locked = 5,
    /// The ledger is damaged (or `verify`/`repair` found or left damage).
    Damaged = 6,
    /// A write's `expected_seq` did not match the ledger's last sequence number; nothing was
    /// written.
    Conflict = 7,
    /// The allocation is no longer active (e.g. `renew` of an expired one); nothing was written.
    NotActive = 8,
}

impl ExitCode {
    /// The number handed to the operating system.
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<ExitCode> for i32 {
    fn from(code: ExitCode) -> i32 {
        code.code()
    }
}

/// The ledger's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialise_as_their_spelling() {
        for kind in [
            ErrorKind::InvalidInput,
            ErrorKind::NotFound,
            ErrorKind::Locked,
            ErrorKind::Damaged,
            ErrorKind::ReadOnly,
            ErrorKind::Poisoned,
            ErrorKind::NoLedger,
            ErrorKind::Conflict,
            ErrorKind::NotActive,
            ErrorKind::Io,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), serde_json::Value::from(kind.as_str()));
        }
    }

    #[test]
    fn exit_codes_keep_their_numbers() {
        assert_eq!(Error::invalid("f", "m").exit_code().code(), 2);
        assert_eq!(Error::NotFound("alloc-x".into()).exit_code().code(), 4);
        assert_eq!(Error::Locked { path: "d".into() }.exit_code().code(), 5);
        assert_eq!(Error::Inconsistent { path: "d".into(), message: "m".into() }.exit_code().code(), 6);
        assert_eq!(Error::ReadOnly.exit_code().code(), 1);
        assert_eq!(ExitCode::NotGranted.code(), 3);
        assert_eq!(Error::Conflict { expected_seq: 1, current_seq: 2 }.exit_code().code(), 7);
        assert_eq!(Error::NotActive { allocation_id: "a".into(), state: "expired".into() }.exit_code().code(), 8);
    }
}
