//! Following the log as it grows, for `log --follow` and the server's `GET /events`: a
//! [`LogFollower`] remembers the last event it handed over and where that record sits, and each
//! [`LogFollower::poll`] reads only what was appended since, through the one [`LogReader`].
//!
//! It only reads (no write lock, no file created or cut), so it runs beside a writer in another
//! process. The writer's newest record may be caught half-written: a torn tail is "not yet"
//! (the reader reports it without error and the next poll reads the record whole), and damage
//! in the log is retried for [`DAMAGE_GRACE`] before it is reported. Rotation needs nothing
//! special: the reader lists the segments on every poll and starts at the one that holds the
//! next sequence number.
//!
//! Polling rather than file-change notification: a poll whose files did not change costs a
//! directory listing and one `stat`, the same on every platform and file system (inotify does
//! not see writes made on another host of a network file system), and it needs no crate.

use crate::domain::event::LoggedEvent;
use crate::log::layout::WAL_DIR;
use crate::log::reader::{LogReader, LogRules, Wording};
use crate::log::segment::HEADER_LEN;
use crate::log::storage::{AppendFile, FileBytes, FsStorage, LockGuard, Storage};
use crate::log::wal::{self, LogPosition};
use crate::{Error, Result};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long damage may stay in the log before a follower reports it: a writer's record caught
/// in flight looks damaged for as long as the write takes, never seconds.
pub const DAMAGE_GRACE: Duration = Duration::from_secs(5);

/// The error for a follow that asks for events the log no longer holds (its first segments
/// were removed): never a silent gap. `oldest_seq` is the first one it can serve.
pub fn gone_error(from_seq: u64, oldest_seq: u64) -> Error {
    Error::InvalidInput {
        field: "from_seq".into(),
        message: format!(
            "sequence number {from_seq} is no longer in the log: the oldest event it holds is {oldest_seq} (ask for --from-seq {oldest_seq} or later)"
        ),
    }
}

/// The oldest sequence number the log in `dir` can serve (`None`: no segment yet).
pub fn oldest_servable_seq(dir: &Path) -> Result<Option<u64>> {
    let storage = FsStorage { mmap_min_bytes: 0 };
    let segments = wal::list_segments(&storage, &dir.join(WAL_DIR))?;
    Ok(segments.first().map(|s| s.first_seq))
}

/// A reader that hands over each event of the log once, in order, as it is appended.
#[derive(Debug)]
pub struct LogFollower {
    storage: TailStorage,
    wal_dir: PathBuf,
    /// The last event handed over (0: none).
    last_seq: u64,
    rules: LogRules,
    /// Where the record `last_seq` sits, when known.
    hint: Option<LogPosition>,
    /// The files as they were when a poll last found nothing new, if a write since would have
    /// changed them (see [`FilesSeen`]).
    unchanged: Option<FilesSeen>,
    /// Since when the log has looked damaged.
    damaged_since: Option<Instant>,
}

impl LogFollower {
    /// A follower of the ledger in `dir` whose first event is `from_seq` (0 reads as 1). Fails
    /// when there is no ledger, or when the log no longer holds `from_seq` ([`gone_error`]).
    pub fn new(dir: &Path, from_seq: u64) -> Result<LogFollower> {
        let wal_dir = dir.join(WAL_DIR);
        if !wal_dir.is_dir() {
            return Err(Error::NoLedger { path: dir.to_path_buf() });
        }
        let from_seq = from_seq.max(1);
        if let Some(oldest) = oldest_servable_seq(dir)?.filter(|&o| from_seq < o) {
            return Err(gone_error(from_seq, oldest));
        }
        Ok(LogFollower {
            storage: TailStorage::default(),
            wal_dir,
            last_seq: from_seq - 1,
            rules: LogRules::resuming(from_seq - 1),
            hint: None,
            unchanged: None,
            damaged_since: None,
        })
    }

    /// The sequence number of the next event this follower will hand over.
    pub fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// The events appended since the last poll, at most `max` of them and none after `upto`
    /// (a writer in this process passes its durable sequence number; a reader in another
    /// process `None`: every whole record in the files). Empty when there is nothing new yet.
    pub fn poll(&mut self, upto: Option<u64>, max: usize) -> Result<Vec<LoggedEvent>> {
        if max == 0 || upto.is_some_and(|u| u <= self.last_seq) {
            return Ok(Vec::new());
        }
        let segments = wal::list_segments(&self.storage.fs, &self.wal_dir)?;
        let Some(last) = segments.last() else { return Ok(Vec::new()) };
        if let Some(first) = segments.first().filter(|f| f.first_seq > self.next_seq()) {
            return Err(gone_error(self.next_seq(), first.first_seq));
        }
        let files = FilesSeen::now(segments.len(), &last.path, upto);
        if self.unchanged.as_ref().zip(files.as_ref()).is_some_and(|(seen, now)| seen.same(now)) {
            return Ok(Vec::new());
        }
        self.storage.set_resume(
            self.hint.map(|h| (self.wal_dir.join(crate::log::segment::file_name(h.segment_first_seq)), h.offset)),
        );
        let mut reader = LogReader::new(&self.storage, &self.wal_dir).retained().after(self.last_seq).hint(self.hint);
        if let Some(u) = upto {
            reader = reader.upto(u);
        }
        let mut out = Vec::new();
        let mut rules = self.rules;
        let read = reader.events(&mut rules, Wording::Open, &mut |pos, event| {
            out.push(LoggedEvent { seq: pos.seq, event });
            Ok(out.len() < max)
        });
        self.rules = rules;
        if let Some(e) = out.last() {
            self.last_seq = e.seq;
        }
        match read {
            Ok(end) => {
                self.hint = end.last_record.filter(|r| r.seq == self.last_seq);
                self.damaged_since = None;
                self.unchanged = files.filter(|f| out.is_empty() && f.settled());
            }
            Err(e @ (Error::Damaged(_) | Error::Io { .. } | Error::Inconsistent { .. })) => {
                // A record in flight: read again later (from the segment's start when the
                // position of the last record handed over is not known).
                self.hint = self.hint.filter(|_| out.is_empty());
                self.unchanged = None;
                let since = *self.damaged_since.get_or_insert_with(Instant::now);
                if out.is_empty() && since.elapsed() >= DAMAGE_GRACE {
                    return Err(e);
                }
                if !out.is_empty() {
                    self.damaged_since = None;
                }
            }
            Err(e) => return Err(e),
        }
        Ok(out)
    }
}

/// What a poll that found nothing new saw of the files. Segments are pre-filled with zeros, so
/// an append changes the last one's modification time, not its size; a poll may skip reading
/// when nothing changed, but only once that time is settled: file times come from a coarse
/// clock, and a write in the same tick as the one seen would leave the time as it was.
#[derive(Debug, Clone, Copy)]
struct FilesSeen {
    segments: usize,
    last_len: u64,
    last_modified: std::time::SystemTime,
    upto: Option<u64>,
    /// When it was seen (not compared).
    seen_at: std::time::SystemTime,
}

/// How long after a write its file time is certainly behind a later write's.
const FILE_TIME_SETTLED: Duration = Duration::from_secs(1);

impl FilesSeen {
    fn now(segments: usize, last: &Path, upto: Option<u64>) -> Option<FilesSeen> {
        let seen_at = std::time::SystemTime::now();
        let meta = std::fs::metadata(last).ok()?;
        Some(FilesSeen { segments, last_len: meta.len(), last_modified: meta.modified().ok()?, upto, seen_at })
    }

    /// Whether the files are as they were (the time each was looked at aside).
    fn same(&self, other: &FilesSeen) -> bool {
        (self.segments, self.last_len, self.last_modified, self.upto)
            == (other.segments, other.last_len, other.last_modified, other.upto)
    }

    /// Whether a write after this was seen would change what is seen.
    fn settled(&self) -> bool {
        self.last_modified + FILE_TIME_SETTLED < self.seen_at
    }
}

/// The files read through [`FsStorage`] (never memory-mapped: the writer may cut a torn tail
/// under a reader in another process), except that the segment a poll resumes in is read from
/// the resume offset on: the bytes before it were read by earlier polls and stay zeros (pages
/// that are never touched), so a poll of a 64 MiB segment reads what is new, not 64 MiB.
#[derive(Debug, Default)]
struct TailStorage {
    fs: FsStorage,
    /// The segment and the offset of the record a poll resumes at.
    resume: Mutex<Option<(PathBuf, u64)>>,
}

impl TailStorage {
    fn set_resume(&self, resume: Option<(PathBuf, u64)>) {
        *self.resume.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = resume;
    }

    /// The header and the bytes from `offset` of `path`, at their places in a buffer of the
    /// file's length.
    fn read_tail(&self, path: &Path, offset: u64) -> io::Result<FileBytes> {
        let len = self.fs.file_len(path)?;
        let header = HEADER_LEN as u64;
        if offset < header || offset >= len {
            return self.fs.read(path);
        }
        let len_usize = usize::try_from(len).map_err(io::Error::other)?;
        let at = usize::try_from(offset).map_err(io::Error::other)?;
        let mut bytes = vec![0u8; len_usize];
        bytes[..HEADER_LEN].copy_from_slice(&self.fs.read_range(path, 0, HEADER_LEN)?);
        let tail = self.fs.read_range(path, offset, len_usize - at)?;
        bytes[at..at + tail.len()].copy_from_slice(&tail);
        Ok(FileBytes::Owned(bytes))
    }
}

impl Storage for TailStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.fs.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.fs.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.fs.exists(path)
    }
    fn open_append(&self, _path: &Path, _create_new: bool) -> io::Result<Box<dyn AppendFile>> {
        Err(read_only())
    }
    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        let resume = self.resume.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match resume {
            Some((p, offset)) if p == path => self.read_tail(path, offset),
            _ => self.fs.read(path),
        }
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.fs.read_range(path, offset, len)
    }
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.fs.file_len(path)
    }
    fn set_len(&self, _path: &Path, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn rename(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        Err(read_only())
    }
    fn remove(&self, _path: &Path) -> io::Result<()> {
        Err(read_only())
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Err(read_only())
    }
    fn try_lock(&self, _path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        Err(read_only())
    }
}

/// A follower never writes.
fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "a log follower only reads")
}
