//! Real files: [`FsStorage`].

use super::{AppendFile, FileBytes, LockGuard, Storage};
use std::io::{self, Write};
use std::path::Path;

/// The ledger's files on the local file system.
#[derive(Debug, Default, Clone)]
pub struct FsStorage {
    /// Memory-map whole-file reads of at least this many bytes (0: never). Only the writer,
    /// which holds the directory lock, may map: nobody truncates a file under it.
    pub mmap_min_bytes: u64,
}

#[derive(Debug)]
struct FsFile(std::fs::File);

impl AppendFile for FsFile {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        // Not O_APPEND: on Linux that would make `write_at` append too. One writer per file, so
        // seeking to the end first is enough.
        io::Seek::seek(&mut &self.0, io::SeekFrom::End(0))?;
        (&self.0).write_all(buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
        }
        #[cfg(not(unix))]
        {
            io::Seek::seek(&mut &self.0, io::SeekFrom::Start(offset))?;
            (&self.0).write_all(buf)
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

/// Waits between attempts at a held lock (255 ms in all; see `FsStorage::try_lock`).
const LOCK_RETRY_DELAYS_MS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Takes the flock on `path`, calling `wait` with each of `delays_ms` while it is held (see
/// `FsStorage::try_lock`; tests pass a `wait` that releases the holder instead of sleeping).
fn lock_retrying(
    path: &Path,
    delays_ms: &[u64],
    mut wait: impl FnMut(std::time::Duration),
) -> io::Result<Option<Box<dyn LockGuard>>> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
    let mut delays_ms = delays_ms.iter();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(Some(Box::new(FsLock(f)))),
            Err(std::fs::TryLockError::WouldBlock) => match delays_ms.next() {
                Some(&ms) => wait(std::time::Duration::from_millis(ms)),
                None => return Ok(None),
            },
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

#[derive(Debug)]
struct FsLock(#[allow(dead_code)] std::fs::File);
impl LockGuard for FsLock {}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(n) = entry.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true);
        if create_new {
            o.create_new(true);
        }
        Ok(Box::new(FsFile(o.open(path)?)))
    }

    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if self.mmap_min_bytes > 0 && len >= self.mmap_min_bytes {
            // SAFETY: the caller holds the ledger's write lock, so no other process truncates
            // this file while the map lives; this process only writes beyond what it has read
            // (after the last record) and cuts a file only when opening, before any map of it.
            let map = unsafe { memmap2::Mmap::map(&f)? };
            return Ok(FileBytes::Mapped(map));
        }
        let mut buf = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut &f, &mut buf)?;
        Ok(FileBytes::Owned(buf))
    }

    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    /// A held lock is tried again after each of `LOCK_RETRY_DELAYS_MS` (255 ms in all) before it counts as
    /// held: a child that another thread of this process is starting holds a copy of the lock's
    /// descriptor (the lock belongs to the open file, and the copy keeps it open) until it
    /// executes its program, which closes it. A handle just dropped may leave its lock held
    /// that way for a moment (a test that reopened a ledger while another test started the CLI
    /// saw `Locked`).
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        lock_retrying(path, &LOCK_RETRY_DELAYS_MS, std::thread::sleep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_whose_descriptor_a_starting_child_still_holds_is_taken_once_it_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("LOCK");
        let f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).unwrap();
        f.try_lock().unwrap();
        // What a child between fork and exec holds: another descriptor of the same open file,
        // which keeps the lock after the handle's own descriptor is closed.
        let copy = f.try_clone().unwrap();
        drop(f);
        assert!(std::fs::File::open(&path).unwrap().try_lock().is_err(), "the copy holds the lock");
        // The "exec": the copy is closed while the lock is being waited for.
        let mut copy = Some(copy);
        let mut waits = 0;
        let taken = lock_retrying(&path, &LOCK_RETRY_DELAYS_MS, |_| {
            waits += 1;
            copy.take();
        })
        .unwrap();
        assert!(taken.is_some(), "taken once the copy is closed");
        assert_eq!(waits, 1, "held at the first attempt");
        drop(taken);
        // A lock that stays held is reported held.
        let held = FsStorage::default().try_lock(&path).unwrap().expect("free again");
        let mut waits = 0;
        assert!(lock_retrying(&path, &LOCK_RETRY_DELAYS_MS, |_| waits += 1).unwrap().is_none());
        assert_eq!(waits, LOCK_RETRY_DELAYS_MS.len(), "every wait was tried");
        drop(held);
    }
}
