//! The write-ahead log: an ordered set of segment files in `<data-dir>/wal/`. This room knows
//! bytes and sequence numbers, not events.

use crate::error::Damage;
use crate::segment::{self, Tail};
use crate::storage::{AppendFile, Storage};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub first_seq: u64,
    pub path: PathBuf,
}

/// Segment files in `dir`, oldest first. Files that do not look like segments are ignored.
pub fn list_segments(storage: &dyn Storage, dir: &Path) -> Result<Vec<SegmentInfo>> {
    let names = storage.list(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut segs: Vec<SegmentInfo> = names
        .into_iter()
        .filter_map(|n| segment::parse_file_name(&n).map(|first_seq| SegmentInfo { first_seq, path: dir.join(n) }))
        .collect();
    segs.sort_by_key(|s| s.first_seq);
    Ok(segs)
}

/// An incomplete final record found at the end of the last segment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// Where the cut bytes were copied (set once they were cut).
    pub saved_to: Option<PathBuf>,
}

/// How far a scan gets in a memory-mapped segment before it releases what it has read.
const RELEASE_EVERY_BYTES: u64 = 8 << 20;

/// Where one record sits in the log. A snapshot records its last event's position so that
/// opening resumes reading right after it instead of reading the segment from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogPosition {
    /// The segment, by the sequence number in its name.
    pub segment_first_seq: u64,
    /// Byte offset of the record's frame in the segment.
    pub offset: u64,
    pub seq: u64,
}

/// Where a scan of the log ended.
#[derive(Debug, Clone)]
pub struct LogEnd {
    pub segments: Vec<SegmentInfo>,
    /// Sequence number of the last valid record (0 if none).
    pub last_seq: u64,
    /// Position of that record, when the scan passed it.
    pub last_record: Option<LogPosition>,
    /// The scan started at a position hint instead of the start of its first segment.
    pub resumed_from_hint: bool,
    /// Length of the valid part of the last segment.
    pub last_valid_len: u64,
    pub torn: Option<TornTail>,
}

/// Reads the log from the first record after `after_seq`, handing each record to `visit`
/// (which returns false to stop early). Segments wholly at or before `after_seq` are skipped
/// without reading. A torn tail in the last segment ends the scan and is reported; any other
/// damage is an error naming file, offset and sequence number.
pub fn scan_log(storage: &dyn Storage, dir: &Path, after_seq: u64, visit: &mut segment::Visit<'_>) -> Result<LogEnd> {
    scan_log_from(storage, dir, after_seq, None, visit)
}

/// `hint` if it names the record `after_seq` in `seg` (the segment where a scan after
/// `after_seq` starts); whether a valid record is really there is the scan's to check.
fn hint_in(hint: Option<LogPosition>, after_seq: u64, seg: &SegmentInfo) -> Option<LogPosition> {
    hint.filter(|h| h.seq == after_seq && h.segment_first_seq == seg.first_seq)
}

/// Bytes of log a scan after `after_seq` reads, starting at `hint` when it applies.
pub fn bytes_after(storage: &dyn Storage, dir: &Path, after_seq: u64, hint: Option<LogPosition>) -> Result<u64> {
    let segments = list_segments(storage, dir)?;
    let start = segments.iter().rposition(|s| s.first_seq <= after_seq + 1).unwrap_or(0);
    let mut total = 0;
    for (i, seg) in segments.iter().enumerate().skip(start) {
        let len = storage.file_len(&seg.path).map_err(|e| Error::io(format!("reading {}", seg.path.display()), e))?;
        let skip = if i == start { hint_in(hint, after_seq, seg) } else { None };
        total += len.saturating_sub(skip.map_or(0, |h| h.offset));
    }
    Ok(total)
}

/// Like [`scan_log`], but when `hint` names the record `after_seq` in the segment where the
/// scan starts, and a valid record with that sequence number is there, reading starts right
/// after it. A hint that does not check out is ignored (the segment is read from its start).
pub fn scan_log_from(
    storage: &dyn Storage,
    dir: &Path,
    after_seq: u64,
    hint: Option<LogPosition>,
    visit: &mut segment::Visit<'_>,
) -> Result<LogEnd> {
    let segments = list_segments(storage, dir)?;
    let mut last_record = None;
    let mut resumed_from_hint = false;
    let mut last_seq = 0;
    let mut last_valid_len = 0;
    let mut torn = None;
    let mut expected_next: Option<u64> = None;
    // First segment that can hold `after_seq + 1`.
    let start = segments.iter().rposition(|s| s.first_seq <= after_seq + 1).unwrap_or(0);
    if start > 0 {
        last_seq = segments[start].first_seq - 1;
    }
    for (i, seg) in segments.iter().enumerate().skip(start) {
        let is_last = i + 1 == segments.len();
        if let Some(exp) = expected_next {
            if seg.first_seq != exp {
                return Err(Error::Inconsistent {
                    path: seg.path.clone(),
                    message: format!(
                        "the log has a gap: the previous segment ends before sequence number {exp}, this segment starts at {} (a segment is missing)",
                        seg.first_seq
                    ),
                });
            }
        } else if i == 0 && seg.first_seq != 1 {
            return Err(Error::Inconsistent {
                path: seg.path.clone(),
                message: format!(
                    "the first segment starts at sequence number {}, not 1 (segments are missing)",
                    seg.first_seq
                ),
            });
        }
        let bytes = storage.read(&seg.path).map_err(|e| Error::io(format!("reading {}", seg.path.display()), e))?;
        let mut stop = false;
        let resume = (if i == start { hint_in(hint, after_seq, seg) } else { None }).and_then(|h| {
            match crate::record::decode(bytes.get(usize::try_from(h.offset).ok()?..)?) {
                crate::record::Decoded::Record { seq, frame_len, .. }
                    if seq == h.seq && h.offset >= segment::HEADER_LEN as u64 =>
                {
                    Some((h, h.offset + frame_len as u64))
                }
                _ => None,
            }
        });
        if let Some((h, _)) = resume {
            resumed_from_hint = true;
            last_record = Some(h);
        }
        let first_seq = seg.first_seq;
        let mut released = 0u64;
        let bytes_ref = &bytes;
        let mut on_record = |pos: segment::RecordPos, payload: &[u8]| {
            last_record = Some(LogPosition { segment_first_seq: first_seq, offset: pos.offset, seq: pos.seq });
            if pos.offset - released >= RELEASE_EVERY_BYTES {
                bytes_ref.release_before(pos.offset as usize);
                released = pos.offset;
            }
            if pos.seq <= after_seq {
                return Ok(true);
            }
            let go_on = visit(pos, payload)?;
            stop = !go_on;
            Ok(go_on)
        };
        let scan = match resume {
            Some((h, next_offset)) => {
                segment::scan_from(&seg.path, &bytes, seg.first_seq, next_offset, h.seq + 1, &mut on_record)
            }
            None => segment::scan(&seg.path, &bytes, seg.first_seq, &mut on_record),
        };
        if scan.next_seq > seg.first_seq {
            last_seq = scan.next_seq - 1;
        }
        last_valid_len = scan.valid_len;
        if stop || scan.stopped {
            break;
        }
        match scan.tail {
            Tail::Clean => {}
            Tail::Torn { offset, len } if is_last => {
                torn = Some(TornTail { file: seg.path.clone(), offset, len, saved_to: None });
            }
            Tail::Torn { offset, .. } => {
                return Err(Error::Damaged(Damage {
                    file: seg.path.clone(),
                    offset,
                    seq: scan.next_seq,
                    reason: "incomplete record in a segment that is not the last".into(),
                }))
            }
            Tail::Corrupt(d) => return Err(Error::Damaged(d)),
        }
        expected_next = Some(scan.next_seq);
    }
    Ok(LogEnd { segments, last_seq, last_record, resumed_from_hint, last_valid_len, torn })
}

/// Copies a torn tail's bytes to `quarantine_dir`, then cuts them off (or removes a segment
/// whose header itself was torn). Fsyncs what it changes.
pub fn cut_torn_tail(storage: &dyn Storage, quarantine_dir: &Path, torn: &mut TornTail) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{what} {}", torn.file.display()), e);
    let bytes =
        storage.read_range(&torn.file, torn.offset, torn.len as usize).map_err(|e| io("reading torn tail of", e))?;
    storage.create_dir_all(quarantine_dir).map_err(|e| io("creating quarantine for", e))?;
    // The copy must outlive a crash right after the cut: its directory's own entry too.
    if let Some(parent) = quarantine_dir.parent() {
        storage.sync_dir(parent).map_err(|e| io("syncing the quarantine directory for", e))?;
    }
    let name = torn.file.file_name().and_then(|n| n.to_str()).unwrap_or("segment");
    let saved = quarantine_dir.join(format!("{name}.torn-at-{}", torn.offset));
    crate::storage::write_atomic(storage, &saved, &bytes).map_err(|e| io("saving torn tail of", e))?;
    let dir = torn.file.parent().unwrap_or(Path::new("."));
    if torn.offset == 0 {
        storage.remove(&torn.file).map_err(|e| io("removing torn segment", e))?;
    } else {
        storage.set_len(&torn.file, torn.offset).map_err(|e| io("truncating", e))?;
    }
    storage.sync_dir(dir).map_err(|e| io("syncing directory of", e))?;
    torn.saved_to = Some(saved);
    Ok(())
}

/// How far ahead of its records the writer zero-fills a segment. Each extension costs one
/// slower fsync (the file grows), so larger is rarer; 1 MiB is one slow fsync per ~3500 events
/// and keeps that fsync's extra work near a millisecond.
pub const PREFILL_CHUNK_BYTES: u64 = 1 << 20;

/// The length of the valid part of a segment: where its records end (zeros may follow in a
/// pre-filled one).
pub fn valid_len(storage: &dyn Storage, seg: &SegmentInfo) -> Result<u64> {
    let bytes = storage.read(&seg.path).map_err(|e| Error::io(format!("reading {}", seg.path.display()), e))?;
    Ok(segment::scan(&seg.path, &bytes, seg.first_seq, &mut |_, _| Ok(true)).valid_len)
}

/// Appends records to the newest segment, rotating at a size limit.
#[derive(Debug)]
pub struct WalWriter {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    active: Arc<dyn AppendFile>,
    active_path: PathBuf,
    /// Where the records of the active segment end (written or pending): the next record goes
    /// here.
    active_len: u64,
    /// Where the bytes handed to the file end; records after it are in `pending`.
    written_len: u64,
    /// Records framed but not yet written (pre-filled segments only): written together by
    /// [`WalWriter::write_pending`], one write for a whole batch of commands.
    pending: Vec<u8>,
    /// A rotation started a new segment since [`WalWriter::take_rotated`] was last called.
    rotated: bool,
    /// The active segment is pre-filled (format version 2): zeros were written up to
    /// `prefilled_len`. False for a version 1 segment continued from an older build.
    prefill: bool,
    prefilled_len: u64,
    active_first_seq: u64,
    next_seq: u64,
    last_record: Option<LogPosition>,
    segment_size_bytes: u64,
    frame: Vec<u8>,
}

impl WalWriter {
    /// Creates the first segment of a new log.
    pub fn create(storage: Arc<dyn Storage>, dir: &Path, segment_size_bytes: u64) -> Result<WalWriter> {
        storage.create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if let Some(parent) = dir.parent() {
            storage.sync_dir(parent).map_err(|e| Error::io(format!("syncing {}", parent.display()), e))?;
        }
        let (active, path, prefilled_len) = new_segment(&*storage, dir, 1, segment_size_bytes)?;
        Ok(WalWriter {
            storage,
            dir: dir.to_path_buf(),
            active,
            active_path: path,
            active_len: segment::HEADER_LEN as u64,
            written_len: segment::HEADER_LEN as u64,
            pending: Vec::new(),
            rotated: false,
            prefill: true,
            prefilled_len,
            active_first_seq: 1,
            next_seq: 1,
            last_record: None,
            segment_size_bytes,
            frame: Vec::new(),
        })
    }

    /// Continues an existing log whose scan ended at `end` (torn tail already cut).
    pub fn resume(storage: Arc<dyn Storage>, dir: &Path, end: &LogEnd, segment_size_bytes: u64) -> Result<WalWriter> {
        let last = end.segments.last().expect("resume needs a segment");
        let io = |what: &str, e| Error::io(format!("{what} {}", last.path.display()), e);
        let file_len = storage.file_len(&last.path).map_err(|e| io("reading", e))?;
        let header = storage.read_range(&last.path, 0, segment::HEADER_LEN).map_err(|e| io("reading", e))?;
        let header = segment::decode_header(&header)
            .map_err(|message| Error::Inconsistent { path: last.path.clone(), message })?;
        let len = end.last_valid_len;
        if len > file_len || (!header.prefilled() && len != file_len) {
            return Err(Error::Inconsistent {
                path: last.path.clone(),
                message: format!("the log's records end at {len}, the file holds {file_len} bytes"),
            });
        }
        let active: Arc<dyn AppendFile> = Arc::from(
            storage
                .open_append(&last.path, false)
                .map_err(|e| Error::io(format!("opening {}", last.path.display()), e))?,
        );
        Ok(WalWriter {
            storage,
            dir: dir.to_path_buf(),
            active,
            active_path: last.path.clone(),
            active_len: len,
            written_len: len,
            pending: Vec::new(),
            rotated: false,
            prefill: header.prefilled(),
            prefilled_len: file_len,
            active_first_seq: last.first_seq,
            next_seq: end.last_seq + 1,
            last_record: end.last_record.filter(|r| r.seq == end.last_seq),
            segment_size_bytes,
            frame: Vec::new(),
        })
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Where the last record appended (or found on resume) sits.
    pub fn last_record(&self) -> Option<LogPosition> {
        self.last_record
    }

    /// Sequence number of the first record of the segment being appended to.
    pub fn active_first_seq(&self) -> u64 {
        self.active_first_seq
    }

    pub fn active_file(&self) -> Arc<dyn AppendFile> {
        self.active.clone()
    }

    pub fn set_segment_size(&mut self, bytes: u64) {
        self.segment_size_bytes = bytes;
    }

    /// Appends one record (not yet written in a pre-filled segment: see
    /// [`WalWriter::write_pending`]; never yet durable) and returns its sequence number.
    /// `Err(Failed)`: nothing was appended and the log can go on (the room for the record could
    /// not be pre-filled, or a version 1 segment's write failed and was cut back off).
    /// `Err(Poison)`: the log cannot continue (a rotation failed, or cutting back failed); the
    /// caller must stop writing.
    pub fn append(&mut self, payload: &[u8]) -> std::result::Result<u64, AppendError> {
        if self.active_len >= self.segment_size_bytes {
            self.write_pending().map_err(AppendError::Poison)?;
            self.rotate().map_err(AppendError::Poison)?;
        }
        let seq = self.next_seq;
        // The scan of a pre-filled segment tells a torn write by its zeros (see `segment`).
        debug_assert!(payload.last() != Some(&0), "a payload must not end in a zero byte");
        let end = self.active_len + (crate::record::HEADER_LEN + payload.len()) as u64;
        let path = self.active_path.display().to_string();
        let failed = |e, what: &str| Error::io(format!("{what} record {seq} in {path}"), e);
        if self.prefill {
            // Room first: zeros up to past the record, before anything is folded. A full disk
            // fails here, for this record only; the batch write after it then only overwrites
            // blocks the file already has.
            if end > self.prefilled_len {
                let target = self.prefill_target(end);
                // Zeros that landed before a failure are free space: nothing to take back.
                write_zeros(&*self.active, self.prefilled_len, target)
                    .map_err(|e| AppendError::Failed(failed(e, "making room for")))?;
                self.prefilled_len = target;
            }
            crate::record::encode(seq, payload, &mut self.pending);
        } else {
            self.frame.clear();
            crate::record::encode(seq, payload, &mut self.frame);
            if let Err(e) = self.active.write_at(self.active_len, &self.frame) {
                let err = failed(e, "appending");
                // A version 1 segment ends where its records do: cut the partial record off.
                return Err(match self.active.truncate(self.active_len) {
                    Ok(()) => AppendError::Failed(err),
                    Err(u) => AppendError::Poison(Error::io(
                        format!("{err}; cutting the partial record back off also failed"),
                        u,
                    )),
                });
            }
            self.written_len = end;
        }
        self.last_record = Some(LogPosition { segment_first_seq: self.active_first_seq, offset: self.active_len, seq });
        self.active_len = end;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes the pending records with one write. On failure they are in an unknown state on
    /// disk while their events are already folded: the caller must stop writing (as after a
    /// failed fsync). They overwrite pre-filled zeros, so a full disk does not fail this.
    pub fn write_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        debug_assert_eq!(self.written_len + self.pending.len() as u64, self.active_len);
        debug_assert!(self.active_len <= self.prefilled_len);
        if let Err(e) = self.active.write_at(self.written_len, &self.pending) {
            return Err(Error::io(
                format!(
                    "writing records up to {} at offset {} of {}",
                    self.next_seq - 1,
                    self.written_len,
                    self.active_path.display()
                ),
                e,
            ));
        }
        self.written_len = self.active_len;
        self.pending.clear();
        Ok(())
    }

    /// Whether a rotation started a new segment since the last call (its file is then the one
    /// to fsync).
    pub fn take_rotated(&mut self) -> bool {
        std::mem::take(&mut self.rotated)
    }

    fn prefill_target(&self, end: u64) -> u64 {
        (end + PREFILL_CHUNK_BYTES).min(self.segment_size_bytes.max(end))
    }

    /// Makes the full segment durable, then starts the next one (file and directory fsynced).
    fn rotate(&mut self) -> Result<()> {
        self.active
            .sync_data()
            .map_err(|e| Error::io(format!("fsync of {} before rotation", self.active_path.display()), e))?;
        let (file, path, prefilled_len) =
            new_segment(&*self.storage, &self.dir, self.next_seq, self.segment_size_bytes)?;
        debug_assert!(self.pending.is_empty(), "records are written before the segment is sealed");
        self.active = file;
        self.active_path = path;
        self.active_len = segment::HEADER_LEN as u64;
        self.written_len = segment::HEADER_LEN as u64;
        self.rotated = true;
        self.prefill = true;
        self.prefilled_len = prefilled_len;
        self.active_first_seq = self.next_seq;
        Ok(())
    }
}

/// Zeros to write from: a static buffer, so that pre-filling allocates and touches no memory
/// (a fresh zeroed megabyte per chunk cost page faults on every grant path that hit it).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Writes zeros over `[from, to)` of `file`.
fn write_zeros(file: &dyn AppendFile, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64);
        file.write_at(at, &ZEROS[..n as usize])?;
        at += n;
    }
    Ok(())
}

#[derive(Debug)]
pub enum AppendError {
    /// Nothing was appended; the log can go on.
    Failed(Error),
    /// The log is in an unknown state; stop writing.
    Poison(Error),
}

/// Creates a segment: its header and its first pre-filled chunk, fsynced, and its directory
/// entry, fsynced. Returns the file, its path and its length.
fn new_segment(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
    segment_size_bytes: u64,
) -> Result<(Arc<dyn AppendFile>, PathBuf, u64)> {
    let path = dir.join(segment::file_name(first_seq));
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let file = storage.open_append(&path, true).map_err(|e| io("creating segment", e))?;
    let header = segment::encode_header(first_seq);
    let len = PREFILL_CHUNK_BYTES.min(segment_size_bytes).max(segment::HEADER_LEN as u64);
    let mut first = vec![0u8; len as usize];
    first[..segment::HEADER_LEN].copy_from_slice(&header);
    file.append(&first).map_err(|e| io("writing header of", e))?;
    file.sync_data().map_err(|e| io("fsync of", e))?;
    storage.sync_dir(dir).map_err(|e| io("fsync of the directory of", e))?;
    Ok((Arc::from(file), path, len))
}
