//! The fault-injecting double, for tests (feature `test-util`): [`FaultyStorage`] is a
//! [`MemoryStorage`] whose operations a [`FaultPlan`] can fail, and which can simulate power
//! loss ([`FaultyStorage::crash`]).

use super::memory::{Hook, Op, Verdict};
use super::{AppendFile, FileBytes, LockGuard, MemoryStorage, Storage};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Kinds of operation a [`FaultPlan`] can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// An append or a positional write.
    Write,
    /// A file's fsync.
    Sync,
    /// A file cut to a length (`truncate`, `set_len`).
    Truncate,
    /// A rename (file or directory).
    Rename,
    /// A new file.
    Create,
    /// A directory's fsync.
    SyncDir,
    /// A file's removal.
    Remove,
}

impl OpKind {
    fn of(op: Op) -> OpKind {
        match op {
            Op::Append { .. } | Op::WriteAt { .. } => OpKind::Write,
            Op::Sync => OpKind::Sync,
            Op::Truncate => OpKind::Truncate,
            Op::Rename => OpKind::Rename,
            Op::Create => OpKind::Create,
            Op::SyncDir => OpKind::SyncDir,
            Op::Remove => OpKind::Remove,
        }
    }
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

/// Which operation fails, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Count operations of this kind (None: every kind counts).
    pub kind: Option<OpKind>,
    /// Zero-based index of the operation, among those counted, that fails.
    pub nth: u64,
    /// What happens to it.
    pub fault: Fault,
    /// Keep failing every later matching operation too (a disk that stays full).
    pub sticky: bool,
}

/// `ENOSPC`: no space left on device.
const ENOSPC: i32 = 28;
/// A sector: a disk writes it whole or not at all (what a crash can tear).
const SECTOR_BYTES: usize = crate::log::segment::SECTOR_BYTES as usize;
/// The multiplier and increment of the crash model's generator (Knuth's MMIX LCG).
const LCG_MULTIPLIER: u64 = 6364136223846793005;
const LCG_INCREMENT: u64 = 1442695040888963407;
/// Spreads a pick over the generator's state (the 64-bit golden ratio).
const PICK_SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;
/// The generator's output: its state's high bits, the better ones of an LCG.
const LCG_OUTPUT_SHIFT: u32 = 33;

/// In-memory storage with fault injection and crash simulation. Clones share one file system.
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    mem: MemoryStorage,
    faults: Arc<Faults>,
}

impl Default for FaultyStorage {
    fn default() -> Self {
        let faults = Arc::new(Faults::default());
        FaultyStorage { mem: MemoryStorage::with_hook(faults.clone()), faults }
    }
}

/// The fault plan and what it counted; the [`Hook`] of a [`FaultyStorage`]'s file system.
#[derive(Debug, Default)]
struct Faults {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    ops: u64,
    ops_by_kind: HashMap<OpKind, u64>,
    plan: Option<FaultPlan>,
    fired: u64,
    /// Each fault fired, for a test's debugging output.
    log: Vec<String>,
}

impl Faults {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Every change under this lock is made whole before anything can panic.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Counts {
    /// Counts an operation and says which fault, if any, applies to it.
    fn check(&mut self, kind: OpKind) -> Option<Fault> {
        let n_any = self.ops;
        self.ops += 1;
        let by_kind = self.ops_by_kind.entry(kind).or_default();
        let n_kind = *by_kind;
        *by_kind += 1;
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
}

impl Hook for Faults {
    fn before(&self, op: Op) -> Verdict {
        let Some(fault) = self.counts().check(OpKind::of(op)) else {
            return Verdict::Proceed;
        };
        let error = injected(fault);
        match (fault, op) {
            (Fault::ShortWrite | Fault::NoSpace, Op::Append { len }) | (Fault::ShortWrite, Op::WriteAt { len, .. }) => {
                Verdict::Partial { bytes: len / 2, error }
            }
            // A full disk still takes writes over blocks the file has; it fails the rest.
            (Fault::NoSpace, Op::WriteAt { offset, len, file_len }) => {
                match file_len.saturating_sub(offset as usize).min(len) {
                    all if all == len => Verdict::Proceed,
                    fits => Verdict::Partial { bytes: fits, error },
                }
            }
            _ => Verdict::Fail(error),
        }
    }
}

fn injected(fault: Fault) -> io::Error {
    match fault {
        Fault::NoSpace => io::Error::from_raw_os_error(ENOSPC),
        _ => io::Error::other("injected I/O error"),
    }
}

impl FaultyStorage {
    /// An empty file system with no fault armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a fault; operations are counted from now on.
    pub fn set_plan(&self, plan: Option<FaultPlan>) {
        let mut counts = self.faults.counts();
        counts.plan = plan;
        counts.ops = 0;
        counts.ops_by_kind.clear();
        counts.fired = 0;
    }

    /// How many operations were counted since the plan was set.
    pub fn ops(&self) -> u64 {
        self.faults.counts().ops
    }

    /// How many times the armed fault fired.
    pub fn faults_fired(&self) -> u64 {
        self.faults.counts().fired
    }

    /// Simulates power loss: names revert to their last directory fsync, each file keeps what
    /// was fsynced overlaid, chosen by `seed`, with a prefix of what was written after (a torn
    /// write: the new bytes up to a point, the old ones after it), and every lock is dropped.
    /// Faults are disarmed.
    pub fn crash(&self, seed: u64) {
        self.mem.with_fs(|fs| {
            let mut rng = seed.wrapping_mul(LCG_MULTIPLIER).wrapping_add(LCG_INCREMENT);
            for ino in &mut fs.inodes {
                rng = rng.wrapping_mul(LCG_MULTIPLIER).wrapping_add(LCG_INCREMENT);
                let survived = survivor(&ino.data, &ino.synced, rng >> LCG_OUTPUT_SHIFT);
                ino.data = survived.clone();
                ino.synced = survived;
            }
            fs.names = fs.durable_names.clone();
            fs.locks.clear();
        });
        self.faults.counts().plan = None;
    }

    /// Every file's current bytes, for assertions.
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        self.mem.files()
    }

    /// Replaces a file's bytes (durably), for corruption tests.
    pub fn put_file(&self, path: &Path, bytes: Vec<u8>) {
        self.mem.put_file(path, bytes);
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
    /// How the changed sectors land: all, none, the first few, or each by chance.
    const MODES: u64 = 4;
    if data == synced {
        return synced.to_vec();
    }
    let mut rng = pick.wrapping_mul(PICK_SPREAD) | 1;
    let mut next = move || {
        rng = rng.wrapping_mul(LCG_MULTIPLIER).wrapping_add(LCG_INCREMENT);
        rng >> LCG_OUTPUT_SHIFT
    };
    if data.len() < synced.len() && synced.starts_with(data) {
        return if next().is_multiple_of(2) { data } else { synced }.to_vec();
    }
    let len = if next().is_multiple_of(2) { data.len() } else { synced.len() };
    let sectors = len.div_ceil(SECTOR_BYTES);
    let mode = next() % MODES;
    let first_missing = next() as usize % (sectors + 1);
    let new = |i: usize| data.get(i).copied().unwrap_or(0);
    let old = |i: usize| synced.get(i).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(len);
    for sector in 0..sectors {
        let bytes = sector * SECTOR_BYTES..((sector + 1) * SECTOR_BYTES).min(len);
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

/// Every operation goes to the in-memory file system, which asks the fault plan first.
impl Storage for FaultyStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.mem.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.mem.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.mem.exists(path)
    }
    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>> {
        self.mem.open_append(path, create_new)
    }
    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        self.mem.read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.mem.read_range(path, offset, len)
    }
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.mem.file_len(path)
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        self.mem.set_len(path, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.mem.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.mem.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.mem.sync_dir(dir)
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.mem.try_lock(path)
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
}
