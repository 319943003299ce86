//! Every file operation of the log and snapshots goes through [`Storage`]: real files
//! ([`FsStorage`]), a file system in memory ([`MemoryStorage`]: a preview that must write
//! nothing), or, for tests, `FaultyStorage`, which fails chosen operations and simulates a
//! crash (only what was fsynced survives; the unsynced tail of a file may survive in part).

#[cfg(any(test, feature = "test-util"))]
mod faulty;
mod fs;
mod memory;

#[cfg(any(test, feature = "test-util"))]
pub use faulty::{Fault, FaultPlan, FaultyStorage, OpKind};
pub use fs::FsStorage;
pub use memory::MemoryStorage;

use std::fmt::Debug;
use std::io;
use std::path::Path;

/// An open file that is written at its end ([`append`](Self::append)) or, by the log writer
/// that knows where its records end, at a position ([`write_at`](Self::write_at)).
pub trait AppendFile: Send + Sync + Debug {
    /// Appends all of `buf` or fails; on failure part of `buf` may have been written.
    fn append(&self, buf: &[u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (growing the file if it ends before `offset + buf.len()`)
    /// or fails; on failure part of `buf` may have been written.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: everything appended so far is durable when this returns Ok.
    fn sync_data(&self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (used to undo a failed append).
    fn truncate(&self, len: u64) -> io::Result<()>;
}

/// Bytes of a whole file, read or memory-mapped.
pub enum FileBytes {
    /// Read into memory.
    Owned(Vec<u8>),
    /// Memory-mapped (large files, read by the writer that holds the lock).
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(v) => v,
            FileBytes::Mapped(m) => m,
        }
    }
}

impl FileBytes {
    /// Stops counting `..upto` of a memory-mapped file in this process's resident memory (a
    /// no-op for bytes read into memory). The bytes stay readable: touched again, they are
    /// mapped again from the page cache. A scan of a long segment calls this behind itself, so
    /// opening by full replay does not hold a whole 64 MiB segment resident.
    pub fn release_before(&self, upto: usize) {
        #[cfg(unix)]
        if let FileBytes::Mapped(m) = self {
            let upto = upto.min(m.len());
            if upto > 0 {
                // SAFETY: a read-only shared file mapping that nothing writes through:
                // MADV_DONTNEED only drops this process's page-table entries for the range,
                // and a later read of those bytes faults the same file pages in again.
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, upto) };
            }
        }
    }
}

/// Held while a directory is locked for writing; dropping it releases the lock.
pub trait LockGuard: Send + Sync + Debug {}

/// The file operations the log and snapshots make; one implementation per place bytes live.
pub trait Storage: Send + Sync + Debug {
    /// Creates `dir` and its missing parents (not durable until the parent's [`Self::sync_dir`]).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir` (not recursive); empty if `dir` does not exist.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether a file or directory is at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// Creates a new file (failing if it exists) or opens an existing one, for appending.
    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>>;
    /// The whole file. May memory-map it (only where nobody else can truncate it).
    fn read(&self, path: &Path) -> io::Result<FileBytes>;
    /// Bytes `[offset, offset + len)` (fewer at end of file).
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// The file's length in bytes.
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Cuts (or extends with zeros) the file to `len` bytes, durably.
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Renames a file or directory (durable after the directory's [`Self::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file (durable after the directory's [`Self::sync_dir`]).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsync of a directory, making creates, renames and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` (creating it), or `Ok(None)` if another holder has it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>>;
}

/// How much of a file `write_atomic` writes before it fsyncs what it has written so far.
/// Every fsync of the log also flushes whatever else is dirty on a disk like this one (a
/// virtual disk's flush reaches the host's whole image): a 12 MB snapshot written in one go
/// stalled the log's fsyncs behind it, and 64 async callers made 136-156k grants/s against
/// 154-187k with the snapshot flushed a megabyte at a time (same runs, interleaved).
pub const WRITE_ATOMIC_FSYNC_EVERY_BYTES: usize = 1 << 20;

/// Writes `bytes` to `path` atomically: temp file, fsync (every megabyte, see
/// [`WRITE_ATOMIC_FSYNC_EVERY_BYTES`]), rename, directory fsync.
pub fn write_atomic(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    if storage.exists(&tmp) {
        storage.remove(&tmp)?;
    }
    let f = storage.open_append(&tmp, true)?;
    let result = if bytes.is_empty() {
        f.sync_data()
    } else {
        bytes.chunks(WRITE_ATOMIC_FSYNC_EVERY_BYTES).try_for_each(|chunk| f.append(chunk).and_then(|()| f.sync_data()))
    };
    drop(f);
    if let Err(e) = result {
        let _ = storage.remove(&tmp);
        return Err(e);
    }
    storage.rename(&tmp, path)?;
    storage.sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A large file is fsynced a megabyte at a time (so the log's fsyncs do not stall behind
    /// all of it), and a failure at any of those fsyncs leaves neither the file nor its
    /// temporary; the whole file arrives only after the last one.
    #[test]
    fn write_atomic_fsyncs_a_large_file_in_pieces_and_a_failed_piece_leaves_nothing() {
        let bytes: Vec<u8> = (0..(WRITE_ATOMIC_FSYNC_EVERY_BYTES * 5 / 2)).map(|i| i as u8).collect();
        let path = Path::new("/d/file");
        for nth in 0..3 {
            let s = FaultyStorage::new();
            s.create_dir_all(Path::new("/d")).unwrap();
            s.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth, fault: Fault::Fail, sticky: false }));
            assert!(write_atomic(&s, path, &bytes).is_err(), "fsync #{nth} failed");
            assert_eq!(s.faults_fired(), 1);
            assert!(s.files().is_empty(), "fsync #{nth}: {:?}", s.files().keys().collect::<Vec<_>>());
        }
        let s = FaultyStorage::new();
        s.create_dir_all(Path::new("/d")).unwrap();
        s.set_plan(Some(FaultPlan { kind: Some(OpKind::Sync), nth: 3, fault: Fault::Fail, sticky: false }));
        write_atomic(&s, path, &bytes).unwrap();
        assert_eq!(s.faults_fired(), 0, "three fsyncs of the file, then the directory's (not counted as Sync)");
        s.crash(1);
        assert_eq!(s.files()[path], bytes);
    }
}
