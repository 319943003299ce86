//! Snapshots as readers of the log use them: the newest one that loads (and is accepted),
//! with the ones passed over on the way and why; and every snapshot decoded, for `verify` and
//! `repair`.

use crate::domain::state::State;
use crate::log::snapshot;
use crate::log::storage::Storage;
use crate::log::wal::LogPosition;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A snapshot file, by the sequence number in its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    /// The sequence number of the last event it holds.
    pub seq: u64,
    /// Where it is.
    pub path: PathBuf,
}

impl SnapshotFile {
    /// Reads the whole file and decodes it; `None` when it is gone since it was listed (a
    /// writer beside us pruned it: gone, not damaged).
    pub fn decode(&self, storage: &dyn Storage) -> Option<std::result::Result<State, String>> {
        match storage.read(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            read => Some(read.map_err(|e| e.to_string()).and_then(|b| snapshot::decode(&b, self.seq))),
        }
    }
}

/// The snapshots in `dir`, newest first.
pub fn list_snapshots(storage: &dyn Storage, dir: &Path) -> Result<Vec<SnapshotFile>> {
    let listed = snapshot::list(storage, dir).map_err(|e| Error::io("listing snapshots", e))?;
    Ok(listed.into_iter().map(|(seq, path)| SnapshotFile { seq, path }).collect())
}

/// A snapshot that loaded and was accepted.
#[derive(Debug)]
pub struct Picked {
    /// Its file.
    pub file: SnapshotFile,
    /// The state it holds.
    pub state: State,
    /// Where its last event sits in the log, when it recorded that.
    pub position: Option<LogPosition>,
}

/// A snapshot passed over: damaged, or not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    /// Its file.
    pub file: SnapshotFile,
    /// Why.
    pub reason: String,
}

/// What [`newest_loadable`] found.
#[derive(Debug, Default)]
pub struct Pick {
    /// The newest snapshot that loaded and was accepted, if any.
    pub loaded: Option<Picked>,
    /// The newer ones passed over, newest first.
    pub passed: Vec<Passed>,
}

/// Whether a snapshot that loaded may be used (given its state and recorded log position), or
/// why not.
pub type Accept<'a> = dyn FnMut(&State, Option<LogPosition>) -> std::result::Result<(), String> + 'a;

/// The newest snapshot in `dir` (at most `at_most_seq`, when given) that loads and that
/// `accept` accepts (it returns why not); the log is the truth, so a damaged or foreign
/// snapshot is passed over for an older one, and the caller decides whether to set it aside.
pub fn newest_loadable(
    storage: &dyn Storage,
    dir: &Path,
    at_most_seq: Option<u64>,
    accept: &mut Accept<'_>,
) -> Result<Pick> {
    let mut pick = Pick::default();
    for file in list_snapshots(storage, dir)? {
        if at_most_seq.is_some_and(|most| file.seq > most) {
            continue;
        }
        let loaded = snapshot::load(storage, &file.path, file.seq)
            .and_then(|(state, position)| accept(&state, position).map(|()| (state, position)));
        match loaded {
            Ok((state, position)) => {
                pick.loaded = Some(Picked { file, state, position });
                break;
            }
            Err(reason) => pick.passed.push(Passed { file, reason }),
        }
    }
    Ok(pick)
}
