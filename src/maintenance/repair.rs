//! `repair`: cuts the log back to its last good record, after copying everything it removes
//! to `quarantine/`.
//!
//! - A **torn tail** (an interrupted append in the last segment) is cut as a read-write open
//!   would cut it.
//! - A **damaged tail** (damage after which no readable record follows) is cut: the damaged
//!   bytes are copied aside first, and nothing readable is lost.
//! - **Damage in the middle** (readable records follow the damage, in the same segment or in
//!   later ones, or a segment is missing) is refused unless `force_truncate` is given: the plan
//!   lists exactly which events the cut would lose. Forced, the damaged segment's bytes from
//!   the damage on are copied aside, later segments are moved aside whole, and the log is cut.
//! - Snapshots that are damaged, or ahead of the repaired log, are moved aside too (they are
//!   derived data; the next snapshot is written from the log).
//!
//! Damage in the very first record (nothing would be left) is never cut.

use crate::domain::clock::format_micros;
use crate::domain::event::{Event, EventBody};
use crate::log::layout::{LOCK_FILE, QUARANTINE_DIR, SNAPSHOT_DIR, WAL_DIR};
use crate::log::reader::{list_snapshots, LogReader, LogRules, Wording};
use crate::log::record::{self, Decoded, Framing};
use crate::log::segment;
use crate::log::storage::{write_atomic, Storage};
use crate::log::wal::{self, SegmentInfo, TornTail};
use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What is wrong with the log, as repair sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairKind {
    /// Nothing to cut in the log (damaged snapshots may still be set aside).
    Clean,
    /// An interrupted final append.
    TornTail,
    /// Damage after which nothing readable follows.
    DamagedTail,
    /// Damage with readable records (or whole segments) after it: cutting loses events.
    DamageInTheMiddle,
}

/// A readable record after the cut: an event the cut would lose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostEvent {
    /// Its sequence number.
    pub seq: u64,
    /// The segment it is in.
    pub file: PathBuf,
    /// Where its record starts in that segment.
    pub offset: u64,
    /// The event's type, or `undecodable` if the record is whole but its payload is not an event.
    #[serde(rename = "type")]
    pub kind: String,
    /// The allocation it is about, if any.
    pub allocation_id: Option<String>,
    /// The job, for a grant or a rejection.
    pub job_id: Option<String>,
    /// When it happened, in RFC 3339 (if it decodes).
    pub at: Option<String>,
}

/// Where the log is cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cut {
    /// The segment cut.
    pub file: PathBuf,
    /// Where: the bytes from here on go (the whole file at 0).
    pub offset: u64,
    /// Sequence number of the first record that does not survive the cut.
    pub first_lost_seq: u64,
}

/// A snapshot repair moves to `quarantine/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotAside {
    /// The snapshot file.
    pub file: PathBuf,
    /// `damaged: ...` or `ahead of the repaired log ...`.
    pub reason: String,
}

/// What repair would do, computed without changing anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairPlan {
    /// The ledger directory.
    pub data_dir: PathBuf,
    /// What is wrong with the log.
    pub kind: RepairKind,
    /// The damage found, with file, offset and sequence number.
    pub problem: Option<String>,
    /// Where the log is cut, if it is.
    pub cut: Option<Cut>,
    /// The log keeps the records up to this sequence number.
    pub keeps_through_seq: u64,
    /// Readable records after the cut, oldest first: the events a forced cut loses.
    pub events_lost: Vec<LostEvent>,
    /// Bytes after the cut that are not readable records (the damage itself).
    pub unreadable_bytes: u64,
    /// Segments after the damaged one, moved aside whole.
    pub segments_set_aside: Vec<PathBuf>,
    /// Snapshots moved aside: damaged, or ahead of the repaired log.
    pub snapshots_set_aside: Vec<SnapshotAside>,
    /// True when the cut loses readable events: `force_truncate` is needed.
    pub needs_force: bool,
    /// Why repair cannot cut at all, if it cannot.
    pub impossible: Option<String>,
}

/// How far `repair` may go.
#[derive(Debug, Clone, Copy, Default)]
pub struct RepairOptions {
    /// Cut damage in the middle of the log too (losing the events the plan lists).
    pub force_truncate: bool,
    /// Only compute the plan.
    pub dry_run: bool,
}

/// What `repair` planned and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// The plan, computed before anything changed.
    pub plan: RepairPlan,
    /// True if the plan was carried out.
    pub applied: bool,
    /// Why it was not, when there was something to do.
    pub refused: Option<String>,
    /// Files written to or moved into `quarantine/`.
    pub saved: Vec<PathBuf>,
}

impl RepairPlan {
    /// Whether carrying the plan out changes anything.
    pub fn has_work(&self) -> bool {
        self.cut.is_some() || !self.snapshots_set_aside.is_empty()
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// How the records of a segment whose bytes are `bytes` are framed, and where they start: as its
/// header says, or, when the header is damaged, as this build writes them.
fn framing_of(bytes: &[u8]) -> (Framing, usize) {
    segment::decode_header(bytes).map_or((Framing::Chained, segment::HEADER_LEN), |h| (h.framing(), h.records_offset()))
}

/// Readable records in `bytes` from `from` on, found by trying every offset: a damaged record
/// says nothing reliable about where the next one starts. The same decoder as every read, framed
/// as the segment's header says.
fn readable_records(path: &Path, bytes: &[u8], from: usize, out: &mut Vec<LostEvent>) -> u64 {
    let (framing, _) = framing_of(bytes);
    let mut pos = from;
    let mut unreadable = 0u64;
    // Zeros at the end hold nothing: a pre-filled segment's free space (or, in a version 1
    // segment, a write that never landed).
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    while pos < end {
        match record::decode_framed(&bytes[pos..], framing) {
            Decoded::Record { seq, payload, frame_len, .. } => {
                let ev = Event::decode(payload).ok();
                out.push(LostEvent {
                    seq,
                    file: path.to_path_buf(),
                    offset: pos as u64,
                    kind: ev.as_ref().map_or("undecodable", |e| e.body.type_name()).to_string(),
                    allocation_id: ev.as_ref().and_then(|e| e.body.allocation_id()).map(|id| id.to_string()),
                    job_id: ev.as_ref().and_then(|e| match &e.body {
                        EventBody::Granted(g) => Some(g.job_id.clone()),
                        EventBody::Rejected(r) => Some(r.job_id.clone()),
                        _ => None,
                    }),
                    at: ev.as_ref().map(|e| format_micros(e.ts_us)),
                });
                pos += frame_len;
            }
            _ => {
                unreadable += 1;
                pos += 1;
            }
        }
    }
    unreadable
}

/// Computes the repair plan for the ledger in `dir`. Reads everything; changes nothing.
pub fn plan_repair(storage: &dyn Storage, dir: &Path) -> Result<RepairPlan> {
    let wal_dir = dir.join(WAL_DIR);
    let segments = wal::list_segments(storage, &wal_dir)?;
    if segments.is_empty() {
        return Err(Error::NoLedger { path: dir.to_path_buf() });
    }
    // Read with the rules replay enforces, remembering the last record that passed them.
    let mut last_good = 0u64;
    let scanned =
        LogReader::new(storage, &wal_dir).events(&mut LogRules::from_start(), Wording::Repair, &mut |pos, _| {
            last_good = pos.seq;
            Ok(true)
        });
    let mut p = RepairPlan {
        data_dir: dir.to_path_buf(),
        kind: RepairKind::Clean,
        problem: None,
        cut: None,
        keeps_through_seq: last_good,
        events_lost: Vec::new(),
        unreadable_bytes: 0,
        segments_set_aside: Vec::new(),
        snapshots_set_aside: Vec::new(),
        needs_force: false,
        impossible: None,
    };
    let cut_at = match scanned {
        Ok(end) => {
            if let Some(t) = end.torn {
                p.kind = RepairKind::TornTail;
                p.problem = Some(format!(
                    "{}: incomplete final record at offset {} ({} bytes)",
                    t.file.display(),
                    t.offset,
                    t.len
                ));
                p.unreadable_bytes = t.len;
                p.cut = Some(Cut { file: t.file, offset: t.offset, first_lost_seq: last_good + 1 });
            }
            None
        }
        Err(Error::Damaged(d)) => {
            p.problem = Some(d.to_string());
            Some((d.file, d.offset))
        }
        Err(Error::Inconsistent { path, message }) => {
            p.problem = Some(format!("{}: {message}", path.display()));
            Some((path, 0))
        }
        Err(e) => return Err(e),
    };
    if let Some((file, offset)) = cut_at {
        plan_cut(storage, &segments, file, offset, &mut p)?;
    }
    plan_snapshots(storage, dir, &mut p)?;
    Ok(p)
}

/// Plans the cut at `offset` of `file`, where the read found damage: what it loses, and
/// whether that needs force.
fn plan_cut(
    storage: &dyn Storage,
    segments: &[SegmentInfo],
    file: PathBuf,
    offset: u64,
    p: &mut RepairPlan,
) -> Result<()> {
    let last_good = p.keeps_through_seq;
    let Some(idx) = segments.iter().position(|s| s.path == file) else {
        return Err(Error::Inconsistent { path: file, message: "repair cannot place this damage in the log".into() });
    };
    let bytes = storage.read(&file).map_err(io(format!("reading {}", file.display())))?;
    let mut lost = Vec::new();
    let mut unreadable = readable_records(&file, &bytes, offset as usize, &mut lost);
    for seg in &segments[idx + 1..] {
        let b = storage.read(&seg.path).map_err(io(format!("reading {}", seg.path.display())))?;
        let hdr = framing_of(&b).1.min(b.len());
        unreadable += readable_records(&seg.path, &b, hdr, &mut lost) + hdr as u64;
        p.segments_set_aside.push(seg.path.clone());
    }
    // A whole record at the cut whose event failed the checks is lost too, but it is not
    // "readable history after the damage".
    let after_damage = lost.iter().filter(|l| !(l.file == file && l.offset == offset)).count();
    p.kind = if after_damage > 0 || !p.segments_set_aside.is_empty() {
        RepairKind::DamageInTheMiddle
    } else {
        RepairKind::DamagedTail
    };
    p.needs_force = p.kind == RepairKind::DamageInTheMiddle;
    p.unreadable_bytes = unreadable;
    p.events_lost = lost;
    p.cut = Some(Cut { file, offset, first_lost_seq: last_good + 1 });
    if last_good == 0 {
        p.impossible = Some(
            "the damage is in the first record of the log: nothing would be left. Move the directory aside \
             and start a new ledger, or restore it from a backup"
                .into(),
        );
    }
    Ok(())
}

/// Snapshots to set aside: damaged ones, and any ahead of what the log keeps.
fn plan_snapshots(storage: &dyn Storage, dir: &Path, p: &mut RepairPlan) -> Result<()> {
    for snap in list_snapshots(storage, &dir.join(SNAPSHOT_DIR))? {
        let reason = if snap.seq > p.keeps_through_seq {
            Some(format!("ahead of the repaired log (which ends at sequence number {})", p.keeps_through_seq))
        } else {
            // Gone since it was listed (repair holds the lock, so nobody prunes): nothing to move.
            snap.decode(storage).and_then(std::result::Result::err).map(|e| format!("damaged: {e}"))
        };
        if let Some(reason) = reason {
            p.snapshots_set_aside.push(SnapshotAside { file: snap.path, reason });
        }
    }
    Ok(())
}

/// Moves `path` into `quarantine` as `<name>.<suffix>`; returns the new path.
fn move_aside(storage: &dyn Storage, path: &Path, quarantine: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let to = quarantine.join(format!("{name}.{suffix}"));
    storage.rename(path, &to).map_err(io(format!("moving {} to {}", path.display(), to.display())))?;
    Ok(to)
}

fn sync_dir(storage: &dyn Storage, dir: &Path) -> Result<()> {
    storage.sync_dir(dir).map_err(io(format!("syncing {}", dir.display())))
}

/// Plans and, unless refused, carries out the repair of the ledger in `dir`. Takes the
/// ledger's write lock, so it never runs beside a writer.
pub fn repair(storage: &dyn Storage, dir: &Path, opts: RepairOptions) -> Result<RepairReport> {
    if !storage.exists(&dir.join(WAL_DIR)) {
        return Err(Error::NoLedger { path: dir.to_path_buf() });
    }
    let Some(_lock) = storage.try_lock(&dir.join(LOCK_FILE)).map_err(io(format!("locking {}", dir.display())))? else {
        return Err(Error::Locked { path: dir.to_path_buf() });
    };
    let plan = plan_repair(storage, dir)?;
    let mut report = RepairReport { plan, applied: false, refused: None, saved: Vec::new() };
    let p = &report.plan;
    if let Some(why) = &p.impossible {
        report.refused = Some(why.clone());
        return Ok(report);
    }
    if p.needs_force && !opts.force_truncate {
        report.refused = Some(format!(
            "the damage is in the middle of the log: cutting it loses {} readable event(s){} listed above. Re-run with \
             --force-truncate to cut anyway (everything cut is copied to {}/ first)",
            p.events_lost.len(),
            if p.segments_set_aside.is_empty() {
                String::new()
            } else {
                format!(" and {} later segment(s)", p.segments_set_aside.len())
            },
            QUARANTINE_DIR
        ));
        return Ok(report);
    }
    if opts.dry_run || !p.has_work() {
        return Ok(report);
    }
    let quarantine = dir.join(QUARANTINE_DIR);
    storage.create_dir_all(&quarantine).map_err(io(format!("creating {}", quarantine.display())))?;
    sync_dir(storage, dir)?;
    let mut saved = Vec::new();
    if let Some(cut) = &p.cut {
        apply_cut(storage, &dir.join(WAL_DIR), &quarantine, p, cut, &mut saved)?;
    }
    set_snapshots_aside(storage, dir, &quarantine, &p.snapshots_set_aside, &mut saved)?;
    report.saved = saved;
    report.applied = true;
    Ok(report)
}

/// Carries out the plan's cut of the log, copying what it removes to `quarantine` first.
fn apply_cut(
    storage: &dyn Storage,
    wal_dir: &Path,
    quarantine: &Path,
    p: &RepairPlan,
    cut: &Cut,
    saved: &mut Vec<PathBuf>,
) -> Result<()> {
    if p.kind == RepairKind::TornTail {
        // The torn bytes the scan found (in a pre-filled segment, zeros follow them).
        let len = p.unreadable_bytes;
        let mut torn = TornTail { file: cut.file.clone(), offset: cut.offset, len, saved_to: None };
        wal::cut_torn_tail(storage, quarantine, &mut torn)?;
        saved.extend(torn.saved_to);
        return Ok(());
    }
    // 1. Copy the damaged segment's bytes from the cut on (durably).
    let len = storage.file_len(&cut.file).map_err(io(format!("reading {}", cut.file.display())))?;
    let bytes = storage
        .read_range(&cut.file, cut.offset, (len - cut.offset) as usize)
        .map_err(io(format!("reading {}", cut.file.display())))?;
    let name = cut.file.file_name().and_then(|n| n.to_str()).unwrap_or("segment");
    let copy = quarantine.join(format!("{name}.damaged-at-{}", cut.offset));
    write_atomic(storage, &copy, &bytes).map_err(io(format!("saving {}", copy.display())))?;
    saved.push(copy);
    // 2. Move later segments aside whole, newest first, so that a crash in between leaves a
    //    log that ends in a contiguous run of segments.
    for seg in p.segments_set_aside.iter().rev() {
        saved.push(move_aside(storage, seg, quarantine, "after-damage")?);
    }
    sync_dir(storage, quarantine)?;
    sync_dir(storage, wal_dir)?;
    // 3. Cut (a damaged header: the whole file goes; its bytes were copied in 1).
    if cut.offset == 0 {
        storage.remove(&cut.file).map_err(io(format!("removing {}", cut.file.display())))?;
    } else {
        storage.set_len(&cut.file, cut.offset).map_err(io(format!("truncating {}", cut.file.display())))?;
    }
    sync_dir(storage, wal_dir)
}

/// Moves the plan's snapshots into `quarantine`.
fn set_snapshots_aside(
    storage: &dyn Storage,
    dir: &Path,
    quarantine: &Path,
    aside: &[SnapshotAside],
    saved: &mut Vec<PathBuf>,
) -> Result<()> {
    for s in aside {
        if storage.exists(&s.file) {
            let suffix = if s.reason.starts_with("damaged") { "damaged" } else { "ahead-of-log" };
            saved.push(move_aside(storage, &s.file, quarantine, suffix)?);
        }
    }
    if !aside.is_empty() {
        sync_dir(storage, quarantine)?;
        sync_dir(storage, &dir.join(SNAPSHOT_DIR))?;
    }
    Ok(())
}
