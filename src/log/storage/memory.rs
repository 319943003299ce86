//! A file system in memory: [`MemoryStorage`]. It keeps what a real one would keep across a
//! crash apart from what the process sees (each file's fsynced bytes, each directory's fsynced
//! names), so the fault-injecting double (`FaultyStorage`, tests only) is this file system
//! plus a fault plan and a crash.

use super::{AppendFile, FileBytes, LockGuard, Storage};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Storage held in memory, never touching the disk: what the CLI previews a ledger in (a
/// ledger that would be created, with nothing written), and what tests run ledgers on.
/// Clones share one file system.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    fs: Arc<Mutex<MemFs>>,
}

/// One file's bytes.
#[derive(Debug, Default, Clone)]
pub(super) struct Inode {
    /// What the process sees.
    pub(super) data: Vec<u8>,
    /// What survives a crash (set by fsync).
    pub(super) synced: Vec<u8>,
}

/// The file system behind a [`MemoryStorage`] and its clones.
#[derive(Debug, Default)]
pub(super) struct MemFs {
    pub(super) inodes: Vec<Inode>,
    /// Names as the running process sees them.
    pub(super) names: BTreeMap<PathBuf, usize>,
    /// Names as they would be after a crash (changed by directory fsync).
    pub(super) durable_names: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
    /// Held locks, by path, with the token of their holder.
    pub(super) locks: HashMap<PathBuf, u64>,
    next_lock: u64,
    /// Consulted before each operation that changes something (tests only: see `FaultyStorage`).
    #[cfg(any(test, feature = "test-util"))]
    hook: Option<Arc<dyn Hook>>,
}

/// An operation a [`Hook`] is asked about, with what it needs to decide how much of it happens.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code, reason = "only a fault hook reads them"))]
pub(super) enum Op {
    /// An append of `len` bytes.
    Append { len: usize },
    /// A write of `len` bytes at `offset` to a file of `file_len` bytes.
    WriteAt { offset: u64, len: usize, file_len: usize },
    /// A file's fsync.
    Sync,
    /// A file cut to a length (or extended).
    Truncate,
    /// A rename.
    Rename,
    /// A new file.
    Create,
    /// A directory's fsync.
    SyncDir,
    /// A file's removal.
    Remove,
}

/// What happens to an operation.
#[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code, reason = "only a fault hook fails operations"))]
pub(super) enum Verdict {
    /// It happens.
    Proceed,
    /// It fails with no effect.
    Fail(io::Error),
    /// A write puts down its first `bytes` bytes, then fails.
    Partial { bytes: usize, error: io::Error },
}

impl Verdict {
    /// The error, if the operation fails (a partial write of anything else fails whole).
    fn into_result(self) -> io::Result<()> {
        match self {
            Verdict::Proceed => Ok(()),
            Verdict::Fail(error) | Verdict::Partial { error, .. } => Err(error),
        }
    }

    /// For a write of `len` bytes: how many go down and how it ends; `Err` if none do.
    fn written(self, len: usize) -> io::Result<(usize, io::Result<()>)> {
        match self {
            Verdict::Proceed => Ok((len, Ok(()))),
            Verdict::Fail(error) => Err(error),
            Verdict::Partial { bytes, error } => Ok((bytes.min(len), Err(error))),
        }
    }
}

/// Decides what happens to each operation before the file system performs it, under its lock.
#[cfg(any(test, feature = "test-util"))]
pub(super) trait Hook: Send + Sync + Debug {
    /// What happens to `op`.
    fn before(&self, op: Op) -> Verdict;
}

fn lock(fs: &Mutex<MemFs>) -> MutexGuard<'_, MemFs> {
    // Every change under this lock is made whole before anything can panic.
    fs.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemFs {
    /// What happens to `op`.
    #[inline]
    fn judge(&self, op: Op) -> Verdict {
        #[cfg(any(test, feature = "test-util"))]
        if let Some(hook) = &self.hook {
            return hook.before(op);
        }
        let _ = op;
        Verdict::Proceed
    }

    fn inode(&self, path: &Path) -> io::Result<usize> {
        self.names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display())))
    }

    /// Renames a directory with everything in it. Modelled as durable at once (a rename is
    /// atomic, and the crash model does not revert directory renames): the names under it move
    /// in both the current and the durable view.
    fn rename_dir(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        if self.dirs.contains(to) || self.names.contains_key(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: exists", to.display())));
        }
        let moved = |p: &Path| p.strip_prefix(from).ok().map(|rest| to.join(rest));
        let rekey = |map: &mut BTreeMap<PathBuf, usize>| {
            let under: Vec<(PathBuf, usize)> = map.iter().filter_map(|(p, &i)| Some((moved(p)?, i))).collect();
            map.retain(|p, _| !p.starts_with(from));
            map.extend(under);
        };
        rekey(&mut self.names);
        rekey(&mut self.durable_names);
        let dirs: Vec<PathBuf> = self.dirs.iter().filter_map(|d| moved(d)).collect();
        self.dirs.retain(|d| !d.starts_with(from));
        self.dirs.extend(dirs);
        Ok(())
    }
}

impl MemoryStorage {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// A file system whose operations `hook` decides on first.
    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn with_hook(hook: Arc<dyn Hook>) -> Self {
        MemoryStorage { fs: Arc::new(Mutex::new(MemFs { hook: Some(hook), ..MemFs::default() })) }
    }

    /// Runs `f` on the file system, locked.
    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn with_fs<R>(&self, f: impl FnOnce(&mut MemFs) -> R) -> R {
        f(&mut lock(&self.fs))
    }

    /// Every file's current bytes, by path.
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let fs = lock(&self.fs);
        fs.names.iter().map(|(p, &i)| (p.clone(), fs.inodes[i].data.clone())).collect()
    }

    /// Puts `bytes` at `path` (durably, name included), creating the file and its directories
    /// or replacing what is there.
    pub fn put_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut fs = lock(&self.fs);
        for a in path.ancestors().skip(1) {
            fs.dirs.insert(a.to_path_buf());
        }
        let ino = match fs.names.get(path) {
            Some(&i) => i,
            None => {
                fs.inodes.push(Inode::default());
                let i = fs.inodes.len() - 1;
                fs.names.insert(path.to_path_buf(), i);
                fs.durable_names.insert(path.to_path_buf(), i);
                i
            }
        };
        fs.inodes[ino].data = bytes.clone();
        fs.inodes[ino].synced = bytes;
    }
}

/// An open file of a [`MemoryStorage`].
#[derive(Debug)]
struct MemFile {
    fs: Arc<Mutex<MemFs>>,
    inode: usize,
}

impl AppendFile for MemFile {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        let (len, result) = fs.judge(Op::Append { len: buf.len() }).written(buf.len())?;
        fs.inodes[self.inode].data.extend_from_slice(&buf[..len]);
        result
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        let file_len = fs.inodes[self.inode].data.len();
        let (len, result) = fs.judge(Op::WriteAt { offset, len: buf.len(), file_len }).written(buf.len())?;
        let data = &mut fs.inodes[self.inode].data;
        let (start, end) = (offset as usize, offset as usize + len);
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(&buf[..len]);
        result
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        // A failed fsync is like Linux's: the dirty pages may be dropped, so the unsynced bytes
        // may or may not reach the disk; a crash decides.
        fs.judge(Op::Sync).into_result()?;
        let ino = &mut fs.inodes[self.inode];
        ino.synced = ino.data.clone();
        Ok(())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        fs.judge(Op::Truncate).into_result()?;
        fs.inodes[self.inode].data.truncate(len as usize);
        Ok(())
    }
}

/// A lock held on a [`MemoryStorage`] path; dropping it releases the lock (unless a simulated
/// crash dropped every lock since).
#[derive(Debug)]
struct MemLock {
    fs: Arc<Mutex<MemFs>>,
    path: PathBuf,
    token: u64,
}

impl LockGuard for MemLock {}

impl Drop for MemLock {
    fn drop(&mut self) {
        let mut fs = lock(&self.fs);
        if fs.locks.get(&self.path) == Some(&self.token) {
            fs.locks.remove(&self.path);
        }
    }
}

impl Storage for MemoryStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        for a in dir.ancestors() {
            fs.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let fs = lock(&self.fs);
        Ok(fs
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let fs = lock(&self.fs);
        fs.names.contains_key(path) || fs.dirs.contains(path) || fs.names.keys().any(|p| p.starts_with(path))
    }

    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>> {
        let mut fs = lock(&self.fs);
        let inode = if create_new {
            fs.judge(Op::Create).into_result()?;
            if fs.names.contains_key(path) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
            }
            fs.inodes.push(Inode::default());
            let i = fs.inodes.len() - 1;
            fs.names.insert(path.to_path_buf(), i);
            i
        } else {
            fs.inode(path)?
        };
        Ok(Box::new(MemFile { fs: self.fs.clone(), inode }))
    }

    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        let fs = lock(&self.fs);
        let i = fs.inode(path)?;
        Ok(FileBytes::Owned(fs.inodes[i].data.clone()))
    }

    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let fs = lock(&self.fs);
        let d = &fs.inodes[fs.inode(path)?].data;
        let start = (offset as usize).min(d.len());
        let end = start.saturating_add(len).min(d.len());
        Ok(d[start..end].to_vec())
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let fs = lock(&self.fs);
        Ok(fs.inodes[fs.inode(path)?].data.len() as u64)
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        fs.judge(Op::Truncate).into_result()?;
        let i = fs.inode(path)?;
        let ino = &mut fs.inodes[i];
        ino.data.resize(len as usize, 0);
        ino.synced = ino.data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        fs.judge(Op::Rename).into_result()?;
        if fs.dirs.contains(from) && !fs.names.contains_key(from) {
            return fs.rename_dir(from, to);
        }
        let i = fs.inode(from)?;
        fs.names.remove(from);
        fs.names.insert(to.to_path_buf(), i);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        fs.judge(Op::Remove).into_result()?;
        fs.inode(path)?;
        fs.names.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = lock(&self.fs);
        fs.judge(Op::SyncDir).into_result()?;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        let current: Vec<(PathBuf, usize)> =
            fs.names.iter().filter(|(p, _)| in_dir(p)).map(|(p, &i)| (p.clone(), i)).collect();
        fs.durable_names.retain(|p, _| !in_dir(p));
        fs.durable_names.extend(current);
        Ok(())
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut fs = lock(&self.fs);
        if fs.locks.contains_key(path) {
            return Ok(None);
        }
        fs.next_lock += 1;
        let token = fs.next_lock;
        fs.locks.insert(path.to_path_buf(), token);
        Ok(Some(Box::new(MemLock { fs: self.fs.clone(), path: path.to_path_buf(), token })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_at_overwrites_and_grows() {
        let s = MemoryStorage::new();
        let f = s.open_append(Path::new("/a"), true).unwrap();
        f.append(b"abcdef").unwrap();
        f.write_at(2, b"XY").unwrap();
        f.write_at(8, b"Z").unwrap();
        assert_eq!(s.files()[Path::new("/a")], b"abXYef\0\0Z");
    }

    #[test]
    fn lock_is_exclusive_until_dropped() {
        let s = MemoryStorage::new();
        let a = s.try_lock(Path::new("/d/LOCK")).unwrap();
        assert!(a.is_some());
        assert!(s.try_lock(Path::new("/d/LOCK")).unwrap().is_none());
        drop(a);
        assert!(s.try_lock(Path::new("/d/LOCK")).unwrap().is_some());
    }

    #[test]
    fn a_directory_moves_with_its_files() {
        let s = MemoryStorage::new();
        s.create_dir_all(Path::new("/l/wal.new")).unwrap();
        s.open_append(Path::new("/l/wal.new/1.wal"), true).unwrap().append(b"x").unwrap();
        s.sync_dir(Path::new("/l/wal.new")).unwrap();
        s.rename(Path::new("/l/wal.new"), Path::new("/l/wal")).unwrap();
        assert_eq!(s.files().keys().collect::<Vec<_>>(), [Path::new("/l/wal/1.wal")]);
        assert!(s.exists(Path::new("/l/wal")) && !s.exists(Path::new("/l/wal.new")));
    }
}
