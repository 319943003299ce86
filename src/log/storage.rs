//! Every file operation of the log and snapshots goes through [`Storage`], so tests can swap
//! the real file system for [`FaultyStorage`], which fails chosen operations and simulates a
//! crash (only what was fsynced survives; the unsynced tail of a file may survive in part).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    Owned(Vec<u8>),
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

pub trait Storage: Send + Sync + Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir` (not recursive); empty if `dir` does not exist.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Creates a new file (failing if it exists) or opens an existing one, for appending.
    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>>;
    /// The whole file. May memory-map it (only where nobody else can truncate it).
    fn read(&self, path: &Path) -> io::Result<FileBytes>;
    /// Bytes `[offset, offset + len)` (fewer at end of file).
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
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
        bytes.chunks(WRITE_ATOMIC_FSYNC_EVERY_BYTES).try_for_each(|chunk| f.append(chunk).and_then(|_| f.sync_data()))
    };
    drop(f);
    if let Err(e) = result {
        let _ = storage.remove(&tmp);
        return Err(e);
    }
    storage.rename(&tmp, path)?;
    storage.sync_dir(dir)
}

// ---------------------------------------------------------------------------------------------
// Real files.

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

    /// A held lock is tried again after each of [`LOCK_RETRY_DELAYS_MS`] before it counts as
    /// held: a child that another thread of this process is starting holds a copy of the lock's
    /// descriptor (the lock belongs to the open file, and the copy keeps it open) until it
    /// executes its program, which closes it. A handle just dropped may leave its lock held
    /// that way for a moment (a test that reopened a ledger while another test started the CLI
    /// saw `Locked`).
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        lock_retrying(path, &LOCK_RETRY_DELAYS_MS, std::thread::sleep)
    }
}

// ---------------------------------------------------------------------------------------------
// The fault-injecting double.

/// Kinds of operation a [`FaultPlan`] can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Write,
    Sync,
    Truncate,
    Rename,
    Create,
    SyncDir,
    Remove,
}

/// What happens to the targeted operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation fails with EIO and has no effect.
    Fail,
    /// A write puts only the first half of its bytes in the file, then fails.
    ShortWrite,
    /// The operation fails with "no space left on device". An append may have put part of its
    /// bytes in the file first, as a real disk does; a positional write puts down the bytes
    /// that fall within the file (their blocks exist) and fails only if it grows the file.
    NoSpace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Count operations of this kind (None: every kind counts).
    pub kind: Option<OpKind>,
    /// Zero-based index of the operation, among those counted, that fails.
    pub nth: u64,
    pub fault: Fault,
    /// Keep failing every later matching operation too (a disk that stays full).
    pub sticky: bool,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    /// What survives a crash.
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct MemFs {
    inodes: Vec<Inode>,
    /// Names as the running process sees them.
    names: BTreeMap<PathBuf, usize>,
    /// Names as they would be after a crash (changed by directory fsync).
    durable_names: BTreeMap<PathBuf, usize>,
    dirs: std::collections::BTreeSet<PathBuf>,
    locks: HashMap<PathBuf, u64>,
    next_lock: u64,
    ops: u64,
    ops_by_kind: HashMap<OpKind, u64>,
    plan: Option<FaultPlan>,
    fired: u64,
    log: Vec<String>,
}

impl MemFs {
    /// Counts an operation and says which fault, if any, applies to it.
    fn check(&mut self, kind: OpKind) -> Option<Fault> {
        let n_any = self.ops;
        self.ops += 1;
        let n_kind = *self.ops_by_kind.get(&kind).unwrap_or(&0);
        *self.ops_by_kind.entry(kind).or_default() += 1;
        let plan = self.plan?;
        let n = match plan.kind {
            None => n_any,
            Some(k) if k == kind => n_kind,
            Some(_) => return None,
        };
        if n == plan.nth || (plan.sticky && n > plan.nth) {
            self.fired += 1;
            self.log.push(format!("{kind:?} #{n}: {:?}", plan.fault));
            Some(plan.fault)
        } else {
            None
        }
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
            let under: Vec<PathBuf> = map.keys().filter(|p| p.starts_with(from)).cloned().collect();
            for p in under {
                let i = map.remove(&p).expect("listed");
                map.insert(moved(&p).expect("under from"), i);
            }
        };
        rekey(&mut self.names);
        rekey(&mut self.durable_names);
        let dirs: Vec<PathBuf> = self.dirs.iter().filter(|p| p.starts_with(from)).cloned().collect();
        for d in dirs {
            self.dirs.remove(&d);
            self.dirs.insert(moved(&d).expect("under from"));
        }
        Ok(())
    }

    fn inode(&self, path: &Path) -> io::Result<usize> {
        self.names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display())))
    }
}

fn injected(fault: Fault) -> io::Error {
    match fault {
        Fault::NoSpace => io::Error::from_raw_os_error(28), // ENOSPC
        _ => io::Error::other("injected I/O error"),
    }
}

/// In-memory storage with fault injection and crash simulation.
#[derive(Debug, Clone, Default)]
pub struct FaultyStorage {
    fs: Arc<Mutex<MemFs>>,
}

#[derive(Debug)]
struct MemFile {
    fs: Arc<Mutex<MemFs>>,
    inode: usize,
}

impl AppendFile for MemFile {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        match fs.check(OpKind::Write) {
            None => {
                fs.inodes[self.inode].data.extend_from_slice(buf);
                Ok(())
            }
            Some(f @ (Fault::ShortWrite | Fault::NoSpace)) => {
                let half = buf.len() / 2;
                fs.inodes[self.inode].data.extend_from_slice(&buf[..half]);
                Err(injected(f))
            }
            Some(f) => Err(injected(f)),
        }
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        let len_now = fs.inodes[self.inode].data.len();
        let (len, result) = match fs.check(OpKind::Write) {
            None => (buf.len(), Ok(())),
            Some(f @ Fault::ShortWrite) => (buf.len() / 2, Err(injected(f))),
            // A full disk still takes writes over blocks the file has; it fails the rest.
            Some(f @ Fault::NoSpace) => match len_now.saturating_sub(offset as usize).min(buf.len()) {
                all if all == buf.len() => (all, Ok(())),
                fits => (fits, Err(injected(f))),
            },
            Some(f) => return Err(injected(f)),
        };
        let data = &mut fs.inodes[self.inode].data;
        let (start, end) = (offset as usize, offset as usize + len);
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(&buf[..len]);
        result
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        if let Some(f) = fs.check(OpKind::Sync) {
            // Like Linux after a failed fsync: the dirty pages may be dropped, so the unsynced
            // bytes may or may not reach the disk; a crash decides.
            return Err(injected(f));
        }
        let ino = &mut fs.inodes[self.inode];
        ino.synced = ino.data.clone();
        Ok(())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        if let Some(f) = fs.check(OpKind::Truncate) {
            return Err(injected(f));
        }
        fs.inodes[self.inode].data.truncate(len as usize);
        Ok(())
    }
}

#[derive(Debug)]
struct MemLock {
    fs: Arc<Mutex<MemFs>>,
    path: PathBuf,
    token: u64,
}
impl LockGuard for MemLock {}
impl Drop for MemLock {
    fn drop(&mut self) {
        let mut fs = self.fs.lock().unwrap();
        if fs.locks.get(&self.path) == Some(&self.token) {
            fs.locks.remove(&self.path);
        }
    }
}

impl FaultyStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a fault; operations are counted from now on.
    pub fn set_plan(&self, plan: Option<FaultPlan>) {
        let mut fs = self.fs.lock().unwrap();
        fs.plan = plan;
        fs.ops = 0;
        fs.ops_by_kind.clear();
        fs.fired = 0;
    }

    /// How many operations were counted since the plan was set.
    pub fn ops(&self) -> u64 {
        self.fs.lock().unwrap().ops
    }

    /// How many times the armed fault fired.
    pub fn faults_fired(&self) -> u64 {
        self.fs.lock().unwrap().fired
    }

    /// Simulates power loss: names revert to their last directory fsync, each file keeps what
    /// was fsynced overlaid, chosen by `seed`, with a prefix of what was written after (a torn
    /// write: the new bytes up to a point, the old ones after it), and every lock is dropped.
    /// Faults are disarmed.
    pub fn crash(&self, seed: u64) {
        let mut fs = self.fs.lock().unwrap();
        let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        for ino in fs.inodes.iter_mut() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let survived = survivor(&ino.data, &ino.synced, rng >> 33);
            ino.data = survived.clone();
            ino.synced = survived;
        }
        fs.names = fs.durable_names.clone();
        fs.locks.clear();
        fs.plan = None;
    }

    /// Every file's current bytes, for assertions.
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let fs = self.fs.lock().unwrap();
        fs.names.iter().map(|(p, &i)| (p.clone(), fs.inodes[i].data.clone())).collect()
    }

    /// Replaces a file's bytes (durably), for corruption tests.
    pub fn put_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut fs = self.fs.lock().unwrap();
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

/// What a file holds after power loss, given what the process wrote (`data`) and what the last
/// fsync made durable (`synced`). A disk writes a 512-byte sector whole or not at all, and the
/// sectors of unsynced writes land in any order: each sector whose written bytes differ from
/// its durable ones landed or did not, chosen by `pick` (all of them, none, the first few in
/// file order, or each by chance). The length is the written or the durable one; a sector that
/// did not land reads as its durable bytes, and as zeros past the durable end. An unsynced cut
/// back (`data` a prefix of `synced`) either happened or not. Durable bytes are never lost.
fn survivor(data: &[u8], synced: &[u8], pick: u64) -> Vec<u8> {
    const SECTOR: usize = 512;
    if data == synced {
        return synced.to_vec();
    }
    let mut rng = pick.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        rng >> 33
    };
    if data.len() < synced.len() && synced.starts_with(data) {
        return if next().is_multiple_of(2) { data } else { synced }.to_vec();
    }
    let len = if next().is_multiple_of(2) { data.len() } else { synced.len() };
    let sectors = len.div_ceil(SECTOR);
    let mode = next() % 4;
    let first_missing = next() as usize % (sectors + 1);
    let new = |i: usize| data.get(i).copied().unwrap_or(0);
    let old = |i: usize| synced.get(i).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(len);
    for sector in 0..sectors {
        let bytes = sector * SECTOR..((sector + 1) * SECTOR).min(len);
        let changed = bytes.clone().any(|i| new(i) != old(i));
        let lands = !changed
            || match mode {
                0 => true,
                1 => false,
                2 => sector < first_missing,
                _ => next().is_multiple_of(2),
            };
        out.extend(bytes.map(|i| if lands { new(i) } else { old(i) }));
    }
    out
}

impl Storage for FaultyStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        for a in dir.ancestors() {
            fs.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let fs = self.fs.lock().unwrap();
        Ok(fs
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let fs = self.fs.lock().unwrap();
        fs.names.contains_key(path) || fs.dirs.contains(path) || fs.names.keys().any(|p| p.starts_with(path))
    }

    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>> {
        let mut fs = self.fs.lock().unwrap();
        let inode = if create_new {
            if let Some(f) = fs.check(OpKind::Create) {
                return Err(injected(f));
            }
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
        let fs = self.fs.lock().unwrap();
        let i = fs.inode(path)?;
        Ok(FileBytes::Owned(fs.inodes[i].data.clone()))
    }

    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let fs = self.fs.lock().unwrap();
        let d = &fs.inodes[fs.inode(path)?].data;
        let start = (offset as usize).min(d.len());
        let end = start.saturating_add(len).min(d.len());
        Ok(d[start..end].to_vec())
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let fs = self.fs.lock().unwrap();
        Ok(fs.inodes[fs.inode(path)?].data.len() as u64)
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        if let Some(f) = fs.check(OpKind::Truncate) {
            return Err(injected(f));
        }
        let i = fs.inode(path)?;
        let ino = &mut fs.inodes[i];
        ino.data.resize(len as usize, 0);
        ino.synced = ino.data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        if let Some(f) = fs.check(OpKind::Rename) {
            return Err(injected(f));
        }
        if fs.dirs.contains(from) && !fs.names.contains_key(from) {
            return fs.rename_dir(from, to);
        }
        let i = fs.inode(from)?;
        fs.names.remove(from);
        fs.names.insert(to.to_path_buf(), i);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        if let Some(f) = fs.check(OpKind::Remove) {
            return Err(injected(f));
        }
        fs.inode(path)?;
        fs.names.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut fs = self.fs.lock().unwrap();
        if let Some(f) = fs.check(OpKind::SyncDir) {
            return Err(injected(f));
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        let current: Vec<(PathBuf, usize)> =
            fs.names.iter().filter(|(p, _)| in_dir(p)).map(|(p, &i)| (p.clone(), i)).collect();
        fs.durable_names.retain(|p, _| !in_dir(p));
        fs.durable_names.extend(current);
        Ok(())
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut fs = self.fs.lock().unwrap();
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
    fn crash_keeps_synced_bytes_and_durable_names() {
        let s = FaultyStorage::new();
        let dir = Path::new("/d");
        s.create_dir_all(dir).unwrap();
        let f = s.open_append(&dir.join("a"), true).unwrap();
        f.append(b"hello").unwrap();
        f.sync_data().unwrap();
        s.sync_dir(dir).unwrap();
        f.append(b" world").unwrap();
        let g = s.open_append(&dir.join("b"), true).unwrap();
        g.append(b"lost").unwrap();
        g.sync_data().unwrap(); // synced, but its name never was
        s.crash(7);
        let files = s.files();
        assert!(files[&dir.join("a")].starts_with(b"hello"));
        assert!(files[&dir.join("a")].len() <= 11);
        assert!(!files.contains_key(&dir.join("b")));
    }

    #[test]
    fn crash_tears_overwrites_in_place_sector_by_sector() {
        // A pre-filled file: zeros made durable (4 sectors), then records written over them.
        let synced = vec![0u8; 2048];
        let mut data = synced.clone();
        data[100..1900].iter_mut().enumerate().for_each(|(i, b)| *b = 1 + (i % 200) as u8);
        let mut patterns = std::collections::BTreeSet::new();
        for pick in 0..400 {
            let out = survivor(&data, &synced, pick);
            assert_eq!(out.len(), 2048);
            // Each sector is wholly the new bytes or wholly the durable ones.
            let landed: Vec<bool> = (0..4)
                .map(|s| {
                    let sector = &out[s * 512..(s + 1) * 512];
                    let new = &data[s * 512..(s + 1) * 512];
                    assert!(sector == new || sector.iter().all(|&b| b == 0), "sector {s} of pick {pick} is mixed");
                    sector == new
                })
                .collect();
            patterns.insert(landed);
        }
        assert_eq!(patterns.len(), 16, "every set of landed sectors happens, in any order");
        // Appending past the durable end: the durable bytes stay; the rest landed or reads as
        // zeros, or the file keeps its durable length.
        for pick in 0..50 {
            let out = survivor(b"hello world", b"hello", pick);
            assert!([&b"hello"[..], b"hello world", b"hello\0\0\0\0\0\0"].contains(&&out[..]), "{out:?}");
        }
    }

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

    #[test]
    fn write_at_overwrites_and_grows() {
        let s = FaultyStorage::new();
        let f = s.open_append(Path::new("/a"), true).unwrap();
        f.append(b"abcdef").unwrap();
        f.write_at(2, b"XY").unwrap();
        f.write_at(8, b"Z").unwrap();
        assert_eq!(s.files()[Path::new("/a")], b"abXYef\0\0Z");
    }

    #[test]
    fn nth_fault_fires_once() {
        let s = FaultyStorage::new();
        s.create_dir_all(Path::new("/d")).unwrap();
        let f = s.open_append(Path::new("/d/a"), true).unwrap();
        s.set_plan(Some(FaultPlan { kind: Some(OpKind::Write), nth: 1, fault: Fault::ShortWrite, sticky: false }));
        f.append(b"1234").unwrap();
        assert!(f.append(b"5678").is_err());
        f.append(b"9").unwrap();
        assert_eq!(s.files()[Path::new("/d/a")], b"1234569");
        assert_eq!(s.faults_fired(), 1);
    }

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

    #[test]
    fn lock_is_exclusive_until_dropped() {
        let s = FaultyStorage::new();
        let a = s.try_lock(Path::new("/d/LOCK")).unwrap();
        assert!(a.is_some());
        assert!(s.try_lock(Path::new("/d/LOCK")).unwrap().is_none());
        drop(a);
        assert!(s.try_lock(Path::new("/d/LOCK")).unwrap().is_some());
    }
}
