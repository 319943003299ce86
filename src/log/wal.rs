//! The write-ahead log: an ordered set of segment files in `<data-dir>/wal/`. This room knows
//! bytes and sequence numbers, not events.

use crate::log::chain::{self, ChainValue};
#[cfg(any(test, feature = "test-util"))]
use crate::log::reader::LogReader;
use crate::log::record::{self, RecordHeader};
use crate::log::segment;
use crate::log::storage::{AppendFile, Storage};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A segment file of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Sequence number of its first record, from its name.
    pub first_seq: u64,
    /// Where it is.
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
    /// The segment (always the last one).
    pub file: PathBuf,
    /// Where the torn bytes start: the end of the last whole record (0: the header was torn).
    pub offset: u64,
    /// How many bytes from `offset` are torn (see [`segment::Tail::Torn`]).
    pub len: u64,
    /// Where the cut bytes were copied (set once they were cut).
    pub saved_to: Option<PathBuf>,
}

/// Where one record sits in the log. A snapshot records its last event's position so that
/// opening resumes reading right after it instead of reading the segment from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogPosition {
    /// The segment, by the sequence number in its name.
    pub segment_first_seq: u64,
    /// Byte offset of the record's frame in the segment.
    pub offset: u64,
    /// The record's sequence number.
    pub seq: u64,
    /// CRC-32 of the record framed with a durable lag of 0 (what [`crate::log::record::encode`]
    /// wrote), when known: a snapshot records it to prove it belongs to this log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_crc: Option<u32>,
    /// The record's chain value (segment version 4 on), when known: a snapshot records it, so
    /// that opening from it continues the chain and `verify` can check the snapshot's place in
    /// the chained history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainValue>,
}

/// The record at `offset` of the segment named for `segment_first_seq`, as (sequence number,
/// payload, CRC-32 of the record framed with a durable lag of 0), if a whole valid record
/// is there.
pub fn read_record_at(
    storage: &dyn Storage,
    dir: &Path,
    segment_first_seq: u64,
    offset: u64,
) -> Option<(u64, Vec<u8>, u32)> {
    read_record(storage, dir, segment_first_seq, offset).map(|r| (r.seq, r.payload, r.record_crc))
}

/// A whole valid record read at a known place ([`read_record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordAt {
    /// Its sequence number.
    pub seq: u64,
    /// Its payload.
    pub payload: Vec<u8>,
    /// CRC-32 of the record framed with a durable lag of 0.
    pub record_crc: u32,
    /// Its chain value (segment version 4 on).
    pub chain: Option<ChainValue>,
}

/// The record at `offset` of the segment named for `segment_first_seq`, framed as the
/// segment's header says, if a whole valid record is there.
pub fn read_record(storage: &dyn Storage, dir: &Path, segment_first_seq: u64, offset: u64) -> Option<RecordAt> {
    let path = dir.join(segment::file_name(segment_first_seq));
    let header = segment::decode_header(&storage.read_range(&path, 0, segment::HEADER_LEN).ok()?).ok()?;
    if offset < header.records_offset() as u64 {
        return None;
    }
    let framing = header.framing();
    let raw = storage.read_range(&path, offset, record::HEADER_LEN).ok()?;
    let len = RecordHeader::decode(&raw).ok()?.payload_len();
    if len == 0 || len > record::MAX_PAYLOAD_LEN {
        return None;
    }
    let frame = storage.read_range(&path, offset, framing.overhead() + len).ok()?;
    match record::decode_framed(&frame, framing) {
        record::Decoded::Record { seq, payload, chain, .. } => {
            let link = chain.as_ref().map_or(&[][..], |c| &c.0[..]);
            let record_crc = record::checksum_framed(len as u32, seq, link, payload);
            Some(RecordAt { seq, payload: payload.to_vec(), record_crc, chain })
        }
        _ => None,
    }
}

/// Where a scan of the log ended.
#[derive(Debug, Clone)]
pub struct LogEnd {
    /// Every segment of the log, oldest first (also those the scan skipped).
    pub segments: Vec<SegmentInfo>,
    /// Sequence number of the last valid record (0 if none).
    pub last_seq: u64,
    /// Position of that record, when the scan passed it.
    pub last_record: Option<LogPosition>,
    /// The scan started at a position hint instead of the start of its first segment.
    pub resumed_from_hint: bool,
    /// Length of the valid part of the last segment.
    pub last_valid_len: u64,
    /// A torn tail found at the end of the last segment (not cut by the scan).
    pub torn: Option<TornTail>,
    /// The chain value of record `last_seq` (`None` where the log is not chained there, or the
    /// read did not learn it).
    pub chain: Option<ChainValue>,
    /// Where the chain the read passed through begins: the first record it covers (a new
    /// ledger's: 1; an older ledger's: the first record of its first version 4 segment).
    pub chain_from: Option<u64>,
}

// Kept for benchmarks, fuzzing and tests; the library reads through `LogReader`.
#[cfg(any(test, feature = "test-util"))]
/// Reads the log from the first record after `after_seq`, handing each record to `visit`
/// (which returns false to stop early); see `LogReader::records`, which this is.
pub fn scan_log(storage: &dyn Storage, dir: &Path, after_seq: u64, visit: &mut segment::Visit<'_>) -> Result<LogEnd> {
    LogReader::new(storage, dir).after(after_seq).records(visit)
}

// Kept for benchmarks, fuzzing and tests; the library reads through `LogReader`.
#[cfg(any(test, feature = "test-util"))]
/// Like [`scan_log`], for the records after `after_seq` up to and including `upto` only (see
/// `LogReader::upto`).
pub fn scan_log_upto(
    storage: &dyn Storage,
    dir: &Path,
    after_seq: u64,
    upto: u64,
    visit: &mut segment::Visit<'_>,
) -> Result<()> {
    LogReader::new(storage, dir).after(after_seq).upto(upto).records(visit).map(drop)
}

// Kept for benchmarks, fuzzing and tests; the library reads through `LogReader`.
#[cfg(any(test, feature = "test-util"))]
/// Like [`scan_log`], but starting at `hint` when it names the record `after_seq` (see
/// `LogReader::hint`).
pub fn scan_log_from(
    storage: &dyn Storage,
    dir: &Path,
    after_seq: u64,
    hint: Option<LogPosition>,
    visit: &mut segment::Visit<'_>,
) -> Result<LogEnd> {
    LogReader::new(storage, dir).after(after_seq).hint(hint).records(visit)
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
    crate::log::storage::write_atomic(storage, &saved, &bytes).map_err(|e| io("saving torn tail of", e))?;
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
    /// Where the bytes handed on (written, or queued in the outbox) end; records after it are
    /// in `pending`.
    written_len: u64,
    /// Records of the current batch framed but not handed on (pre-filled segments only).
    pending: Vec<u8>,
    /// Where batches wait for the flush that writes them (see [`Outbox`]).
    outbox: Arc<Outbox>,
    /// Zeros were written up to here in the active segment (pre-filled since version 2).
    prefilled_len: u64,
    active_first_seq: u64,
    next_seq: u64,
    last_record: Option<LogPosition>,
    segment_size_bytes: u64,
    /// The active segment was left by an older build (format version 1 to 3: no chain, in
    /// versions 1 and 2 no durable lags): the first append starts a new segment, so that every
    /// record this build writes is chained and can be proven durable or torn. An empty one is
    /// replaced by the new one (same first record).
    rotate_first: bool,
}

impl WalWriter {
    /// Creates the first segment of a new log.
    pub fn create(storage: Arc<dyn Storage>, dir: &Path, segment_size_bytes: u64) -> Result<WalWriter> {
        storage.create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if let Some(parent) = dir.parent() {
            storage.sync_dir(parent).map_err(|e| Error::io(format!("syncing {}", parent.display()), e))?;
        }
        let (active, path, prefilled_len) = new_segment(&*storage, dir, 1, &chain::GENESIS, segment_size_bytes)?;
        let outbox = Outbox::new(active.clone(), &path, segment::HEADER_LEN as u64, Stamped::genesis(0), true);
        Ok(WalWriter {
            storage,
            dir: dir.to_path_buf(),
            active,
            active_path: path,
            active_len: segment::HEADER_LEN as u64,
            written_len: segment::HEADER_LEN as u64,
            pending: Vec::new(),
            outbox,
            prefilled_len,
            active_first_seq: 1,
            next_seq: 1,
            last_record: None,
            segment_size_bytes,
            rotate_first: false,
        })
    }

    /// Continues an existing log whose scan ended at `end` (torn tail already cut).
    pub fn resume(storage: Arc<dyn Storage>, dir: &Path, end: &LogEnd, segment_size_bytes: u64) -> Result<WalWriter> {
        let last = end.segments.last().ok_or_else(|| Error::Inconsistent {
            path: dir.to_path_buf(),
            message: "the log has no segment to continue".into(),
        })?;
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
        let last_record = end.last_record.filter(|r| r.seq == end.last_seq).map(|r| {
            let found = read_record(&*storage, dir, r.segment_first_seq, r.offset).filter(|f| f.seq == r.seq);
            let chain = r.chain.or_else(|| found.as_ref().and_then(|f| f.chain));
            LogPosition { record_crc: found.map(|f| f.record_crc), chain, ..r }
        });
        let stamped = resumed_chain(&*storage, &header, last, end, last_record.as_ref())?;
        let outbox = Outbox::new(active.clone(), &last.path, len, stamped, header.records_durable_lags());
        Ok(WalWriter {
            storage,
            dir: dir.to_path_buf(),
            active,
            active_path: last.path.clone(),
            active_len: len,
            written_len: len,
            pending: Vec::new(),
            outbox,
            prefilled_len: file_len,
            active_first_seq: last.first_seq,
            next_seq: end.last_seq + 1,
            last_record,
            segment_size_bytes,
            rotate_first: !header.chained(),
        })
    }

    /// The log directory was renamed to `dir` (a new ledger's staging directory becoming
    /// `wal/`); the open file handles stay valid.
    pub fn moved_to(&mut self, dir: &Path) {
        // The active segment is named for its first record (see `create`, `resume`, `rotate`).
        debug_assert_eq!(
            self.active_path.file_name().and_then(|n| n.to_str()),
            Some(segment::file_name(self.active_first_seq).as_str())
        );
        self.dir = dir.to_path_buf();
        self.active_path = dir.join(segment::file_name(self.active_first_seq));
        lock(&self.outbox.queued).path = self.active_path.clone();
    }

    /// The sequence number the next record appended gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Where the last record appended (or found on resume) sits, with its chain value and
    /// checksum: the records the flush has not stamped yet are chained here (a snapshot asks,
    /// under the ledger's lock; it waits for a write in flight).
    pub fn last_record(&self) -> Option<LogPosition> {
        let mut last = self.last_record?;
        if last.chain.is_some() || last.segment_first_seq != self.active_first_seq {
            return Some(last);
        }
        let stamped = lock(&self.outbox.writing);
        let queued = lock(&self.outbox.queued);
        let mut head = *stamped;
        for frames in [&queued.bytes[..], &self.pending[..]] {
            let mut copy = frames.to_vec();
            if let Some((seq, crc)) = record::stamp_chained(&mut copy, 0, &mut head.chain) {
                (head.seq, head.record_crc) = (seq, Some(crc));
            }
        }
        if head.seq == last.seq {
            (last.chain, last.record_crc) = (Some(head.chain), head.record_crc);
        }
        Some(last)
    }

    /// The head of the chain as far as it is durable: the last record an fsync covered and its
    /// chain value. `None` while the log ends in an older build's segment (not chained).
    pub fn durable_head(&self) -> Option<chain::ChainHead> {
        lock(&self.outbox.queued).durable_head
    }

    /// Sequence number of the first record of the segment being appended to.
    #[cfg(any(test, feature = "test-util"))]
    pub fn active_first_seq(&self) -> u64 {
        self.active_first_seq
    }

    /// The segment being appended to, for its fsync.
    pub fn active_file(&self) -> Arc<dyn AppendFile> {
        self.active.clone()
    }

    /// Where handed-on batches wait to be written; the flush writes them (`Outbox::write_out`).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Changes the size at which a segment is full (a config change); the active segment
    /// rotates once its records reach it.
    pub fn set_segment_size(&mut self, bytes: u64) {
        self.segment_size_bytes = bytes;
    }

    /// Appends one record (in a pre-filled segment not yet written: see
    /// [`WalWriter::hand_off`]; never yet durable) and returns its sequence number.
    /// `Err(Failed)`: nothing was appended and the log can go on (the room for the record could
    /// not be pre-filled, or a version 1 segment's write failed and was cut back off).
    /// `Err(Poison)`: the log cannot continue (a rotation failed, or cutting back failed); the
    /// caller must stop writing.
    pub fn append(&mut self, payload: &[u8]) -> std::result::Result<u64, AppendError> {
        if self.active_len >= self.segment_size_bytes || self.rotate_first {
            let was_first = std::mem::take(&mut self.rotate_first);
            if let Err(e) = self.rotate() {
                // A segment that could not be created is tried again by the next append.
                self.rotate_first = was_first && matches!(e, AppendError::Failed(_));
                return Err(e);
            }
        }
        let seq = self.next_seq;
        // The scan of a pre-filled segment tells a torn write by its zeros (see `segment`).
        debug_assert!(payload.last() != Some(&0), "a payload must not end in a zero byte");
        let end = self.active_len + (record::CHAINED_OVERHEAD + payload.len()) as u64;
        self.make_room(end, seq)?;
        // The chain value and checksum are stamped by the flush, outside the ledger's lock.
        record::encode_unstamped(seq, payload, &mut self.pending);
        self.last_record = Some(LogPosition {
            segment_first_seq: self.active_first_seq,
            offset: self.active_len,
            seq,
            record_crc: None,
            chain: None,
        });
        self.active_len = end;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Pre-fills the active segment up to past a record of `seq` that ends at `end`, before
    /// anything is folded. A full disk fails here, for this record only; the batch write after
    /// it then only overwrites blocks the file already has.
    fn make_room(&mut self, end: u64, seq: u64) -> std::result::Result<(), AppendError> {
        // A sector more: this record may start a write, moved to the next sector.
        let room = end + segment::SECTOR_BYTES;
        if room > self.prefilled_len {
            let target = self.prefill_target(room);
            // Zeros that landed before a failure are free space: nothing to take back.
            write_zeros(&*self.active, self.prefilled_len, target)
                .map_err(|e| AppendError::Failed(record_failed(e, "making room for", seq, &self.active_path)))?;
            self.prefilled_len = target;
        }
        Ok(())
    }

    /// Hands the records appended since the last call to the outbox, where the next flush
    /// writes them (one write for every batch since the last flush) before its fsync, and
    /// marks them as the last appended. A version 1 segment's records are written already.
    pub fn hand_off(&mut self) {
        let outbox = self.outbox.clone();
        let mut queued = lock(&outbox.queued);
        debug_assert!(std::ptr::addr_eq(Arc::as_ptr(&queued.file), Arc::as_ptr(&self.active)));
        if queued.bytes.is_empty() && queued.records_durable_lags {
            self.start_write_at_a_sector();
        }
        queued.catch_up(self.written_len);
        debug_assert_eq!(self.written_len + self.pending.len() as u64, self.active_len);
        debug_assert!(self.pending.is_empty() || self.active_len <= self.prefilled_len);
        queued.bytes.extend_from_slice(&self.pending);
        queued.last_seq = self.next_seq - 1;
        drop(queued);
        self.written_len = self.active_len;
        self.pending.clear();
    }

    /// The pending records will start a write of their own: move them to the next sector
    /// boundary (over zeros the segment already has), so that no sector holds both records of
    /// an earlier write, which may be durable, and of this one, which a crash may tear. A torn
    /// write then never reaches an earlier write's sector, and damage there stays provable
    /// (by the durable lags of this write's records). Each append makes room for this.
    fn start_write_at_a_sector(&mut self) {
        let pad = self.written_len.next_multiple_of(segment::SECTOR_BYTES) - self.written_len;
        // A segment's first write shares its sector only with the header, fsynced when the
        // segment was created; a torn write leaves that as it was.
        let first_write = self.written_len == segment::HEADER_LEN as u64;
        if pad == 0 || first_write || self.pending.is_empty() {
            return;
        }
        debug_assert!(self.active_len + pad <= self.prefilled_len, "appends make room for the padding");
        self.written_len += pad;
        self.active_len += pad;
        if let Some(last) = self.last_record.as_mut() {
            // Pending records are the newest: the last one moves with them.
            debug_assert!(last.offset >= self.written_len - pad);
            last.offset += pad;
        }
    }

    fn prefill_target(&self, end: u64) -> u64 {
        (end + PREFILL_CHUNK_BYTES).min(self.segment_size_bytes.max(end))
    }

    /// Makes the full segment durable, then starts the next one (file and directory fsynced).
    /// `Poison` if the full segment could not be made durable, or an fsync of the new one
    /// failed; `Failed` if the next one could not be created or written (a full disk) and what
    /// was made of it was removed again, which leaves the log exactly as it was: the next
    /// append tries again.
    fn rotate(&mut self) -> std::result::Result<(), AppendError> {
        self.seal_active().map_err(AppendError::Poison)?;
        if self.active_first_seq == self.next_seq {
            // An older build's empty segment, replaced by this one's (same name): the log ends
            // with the full segment before it in between.
            remove_failed_segment(&*self.storage, &self.dir, self.next_seq).map_err(|e| {
                AppendError::Failed(Error::io(format!("replacing the empty segment {}", self.active_path.display()), e))
            })?;
        }
        // The chain goes on from the last record stamped (all of them now), or begins here
        // after an older build's segments.
        // (The queue's lock is let go first: `writing` is always taken before it.)
        let chained = lock(&self.outbox.queued).records_durable_lags;
        let chain_start = if chained { lock(&self.outbox.writing).chain } else { chain::GENESIS };
        let (file, path, prefilled_len) =
            new_segment_or_why(&*self.storage, &self.dir, self.next_seq, &chain_start, self.segment_size_bytes)
                .map_err(|(e, fsync_failed)| {
                    if fsync_failed {
                        // Latched like every failed fsync: no storage operation after it.
                        return AppendError::Poison(e);
                    }
                    match remove_failed_segment(&*self.storage, &self.dir, self.next_seq) {
                        Ok(()) => AppendError::Failed(e),
                        Err(undo) => AppendError::Poison(Error::io(
                            format!("{e}; removing the new segment again also failed"),
                            undo,
                        )),
                    }
                })?;
        {
            let mut queued = lock(&self.outbox.queued);
            queued.file = file.clone();
            queued.path = path.clone();
            queued.offset = segment::HEADER_LEN as u64;
            queued.records_durable_lags = true;
        }
        self.active = file;
        self.active_path = path;
        self.active_len = segment::HEADER_LEN as u64;
        self.written_len = segment::HEADER_LEN as u64;
        self.prefilled_len = prefilled_len;
        self.active_first_seq = self.next_seq;
        Ok(())
    }

    /// The active segment's last write, then its last fsync.
    fn seal_active(&mut self) -> Result<()> {
        {
            // The segment's last write, then its last fsync: everything queued for it and this
            // batch's records, after any write a flush has in flight to it (so that the fsync
            // covers that one too, and a crash cannot leave a hole before records it made
            // durable).
            let outbox = self.outbox.clone();
            let mut stamped = lock(&outbox.writing);
            let mut queued = lock(&outbox.queued);
            if queued.bytes.is_empty() && queued.records_durable_lags {
                self.start_write_at_a_sector();
            }
            queued.catch_up(self.written_len);
            queued.bytes.extend_from_slice(&self.pending);
            queued.last_seq = self.next_seq - 1;
            let mut taken = queued.take();
            stamped.stamp(&mut taken);
            let framing = if taken.chained { record::Framing::Chained } else { record::Framing::Plain };
            // A replicated log commits the segment's last batch first, as a flush does.
            outbox.commit_first(&taken.bytes, framing)?;
            if !taken.bytes.is_empty() {
                self.active
                    .write_at(taken.offset, &taken.bytes)
                    .map_err(|e| records_write_failed(e, taken.last_seq, taken.offset, &self.active_path))?;
            }
            self.active
                .sync_data()
                .map_err(|e| Error::io(format!("fsync of {} before rotation", self.active_path.display()), e))?;
            // Every write so far went to this segment (or to older ones, fsynced when they
            // filled): all durable now.
            queued.durable_seq = queued.last_seq;
            if let Some(head) = stamped.head(queued.records_durable_lags, queued.last_seq) {
                queued.durable_head = Some(head);
            }
            self.pending.clear();
            self.written_len = self.active_len;
        }
        Ok(())
    }
}

/// Records handed on by the writer and not yet written: batches of commands add to it under
/// the ledger's core lock, and the flush writes all of them with one write just before its
/// fsync. Many batches run per fsync (each caller that finds nobody combining runs one), and a
/// write per batch was a system call per two or three grants.
#[derive(Debug)]
pub struct Outbox {
    /// Held while queued bytes are stamped and written: a rotation waits for a flush's write in
    /// flight to the segment before fsyncing it for the last time. Taken before `queued`. Holds
    /// the chain as far as it is stamped: records are chained in the order they are written.
    writing: Mutex<Stamped>,
    queued: Mutex<Queued>,
    /// What must accept every batch before it is written to the files, by a flush or by a
    /// rotation (a replicated log: `log/backend.rs`); `None` for a local log.
    commit_first: Mutex<Option<HookRef>>,
}

/// The commit hook as the outbox keeps it (a closure has no `Debug`).
#[derive(Clone)]
struct HookRef(Arc<CommitHook>);

impl std::fmt::Debug for HookRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitHook")
    }
}

/// The last record stamped with its chain value (see [`record::stamp_chained`]).
#[derive(Debug, Clone, Copy)]
struct Stamped {
    seq: u64,
    chain: ChainValue,
    /// Its checksum framed with a lag of 0, when it was stamped here.
    record_crc: Option<u32>,
}

impl Stamped {
    /// The chain begins after record `seq`.
    fn genesis(seq: u64) -> Stamped {
        Stamped { seq, chain: chain::GENESIS, record_crc: None }
    }

    /// The head once everything up to `last_seq` is stamped, in a chained segment.
    fn head(&self, chained: bool, last_seq: u64) -> Option<chain::ChainHead> {
        debug_assert!(!chained || self.seq == last_seq, "stamped up to {}, written up to {last_seq}", self.seq);
        (chained && self.seq == last_seq && last_seq > 0)
            .then_some(chain::ChainHead { seq: last_seq, hash: self.chain })
    }

    /// Stamps the records taken for a write (chain values, durable lags, checksums), following
    /// on from the last one stamped. Outside the queue's lock: the ledger's appends go on.
    fn stamp(&mut self, taken: &mut Taken) {
        if taken.bytes.is_empty() || !taken.chained {
            return;
        }
        if let Some((seq, crc)) = record::stamp_chained(&mut taken.bytes, taken.durable_seq, &mut self.chain) {
            debug_assert_eq!(seq, taken.last_seq);
            (self.seq, self.record_crc) = (seq, Some(crc));
        }
    }
}

/// The chain as it stands when a writer resumes the log (its last segment's `header`): after the
/// last record, whose value is stored with it (or in the header of a segment that holds none
/// yet); where the last segment is an older build's, the chain begins at the next one.
fn resumed_chain(
    storage: &dyn Storage,
    header: &segment::Header,
    last: &SegmentInfo,
    end: &LogEnd,
    last_record: Option<&LogPosition>,
) -> Result<Stamped> {
    if !header.chained() {
        return Ok(Stamped::genesis(end.last_seq));
    }
    let chain = if end.last_seq < last.first_seq { header.chain_start } else { last_record.and_then(|r| r.chain) };
    // The read did not pass the last record (the segment after it was set aside as torn): the
    // segment holds it, read it again.
    let chain = chain.or_else(|| {
        let bytes = storage.read(&last.path).ok()?;
        let scan = segment::scan(&last.path, &bytes, last.first_seq, &mut |_, _| Ok(true));
        scan.chain.filter(|_| scan.next_seq == end.last_seq + 1)
    });
    let chain = chain.ok_or_else(|| Error::Inconsistent {
        path: last.path.clone(),
        message: format!("the chain value of record {} could not be read", end.last_seq),
    })?;
    Ok(Stamped { seq: end.last_seq, chain, record_crc: last_record.and_then(|r| r.record_crc) })
}

#[derive(Debug)]
struct Queued {
    /// The active segment.
    file: Arc<dyn AppendFile>,
    path: PathBuf,
    /// Where `bytes` go in `file`.
    offset: u64,
    bytes: Vec<u8>,
    /// The last record appended: in `bytes`, or written already.
    last_seq: u64,
    /// The last written buffer, kept for its allocation.
    spare: Vec<u8>,
    /// The active segment's records carry durable lags and chain values (format version 4;
    /// false only for an older build's segment, never written to).
    records_durable_lags: bool,
    /// The last record an fsync that returned success covered: each record written gets its
    /// lag from it.
    durable_seq: u64,
    /// That record's chain value, where the log is chained.
    durable_head: Option<chain::ChainHead>,
}

/// Queued bytes taken for one write, not yet stamped.
struct Taken {
    file: Arc<dyn AppendFile>,
    offset: u64,
    bytes: Vec<u8>,
    last_seq: u64,
    /// The last record known durable when they were taken: their durable lags count from it.
    durable_seq: u64,
    /// They go to a chained segment (always, once anything is queued).
    chained: bool,
}

/// What [`Outbox::write_out`] wrote: the file to fsync and the last sequence number that fsync
/// makes durable. Pass it to [`Outbox::sync`], which records what the fsync proved.
#[derive(Debug)]
pub struct WriteOut {
    /// The segment written to.
    pub file: Arc<dyn AppendFile>,
    /// The last record the fsync of `file` makes durable.
    pub last_seq: u64,
    /// Its chain value, where the log is chained.
    head: Option<chain::ChainHead>,
}

impl Queued {
    /// Takes the queued bytes for one write, for [`Stamped::stamp`].
    fn take(&mut self) -> Taken {
        let spare = std::mem::take(&mut self.spare);
        let bytes = std::mem::replace(&mut self.bytes, spare);
        let offset = self.offset;
        self.offset += bytes.len() as u64;
        debug_assert!(bytes.is_empty() || self.records_durable_lags, "records queued for an older build's segment");
        Taken {
            file: self.file.clone(),
            offset,
            bytes,
            last_seq: self.last_seq,
            durable_seq: self.durable_seq,
            chained: self.records_durable_lags,
        }
    }

    /// Checks that the queued bytes end where the writer's handed-on bytes do; with nothing
    /// queued, starts the queue there (a version 1 segment's records are written directly).
    fn catch_up(&mut self, written_len: u64) {
        if self.bytes.is_empty() {
            self.offset = written_len;
        }
        debug_assert_eq!(self.offset + self.bytes.len() as u64, written_len);
    }
}

impl Outbox {
    fn new(
        file: Arc<dyn AppendFile>,
        path: &Path,
        offset: u64,
        stamped: Stamped,
        records_durable_lags: bool,
    ) -> Arc<Outbox> {
        let last_seq = stamped.seq;
        Arc::new(Outbox {
            writing: Mutex::new(stamped),
            queued: Mutex::new(Queued {
                file,
                path: path.to_path_buf(),
                offset,
                bytes: Vec::new(),
                last_seq,
                spare: Vec::new(),
                records_durable_lags,
                // A new log has nothing durable; a resumed one is fsynced by the open before
                // anything is written.
                durable_seq: last_seq,
                durable_head: (records_durable_lags && last_seq > 0)
                    .then_some(chain::ChainHead { seq: last_seq, hash: stamped.chain }),
            }),
            commit_first: Mutex::new(None),
        })
    }

    /// From now on every batch goes to `hook` before it is written to the files, by a flush
    /// or by a rotation: a local file must never hold a record the shared log refused.
    pub fn set_commit_first(&self, hook: Arc<CommitHook>) {
        *lock(&self.commit_first) = Some(HookRef(hook));
    }

    /// `bytes` (framed as `framing`) accepted by the commit hook, if there is one.
    fn commit_first(&self, bytes: &[u8], framing: record::Framing) -> Result<()> {
        let hook = lock(&self.commit_first).clone();
        match hook {
            Some(HookRef(hook)) if !bytes.is_empty() => hook(bytes, framing).map_err(Error::Unavailable),
            _ => Ok(()),
        }
    }

    /// Fsyncs what `written` wrote (and everything written before it to the same file; older
    /// segments were fsynced when they filled). On success the records up to it are durable,
    /// which the lags of the records written next say.
    pub fn sync(&self, written: &WriteOut) -> std::io::Result<()> {
        written.file.sync_data()?;
        let mut q = lock(&self.queued);
        q.durable_seq = q.durable_seq.max(written.last_seq);
        if let Some(head) = written.head.filter(|h| q.durable_head.is_none_or(|d| d.seq < h.seq)) {
            q.durable_head = Some(head);
        }
        Ok(())
    }

    /// Writes everything queued. Returns the file to fsync and the last sequence number that
    /// fsync makes durable: every record up to it is in what this call wrote, or was written
    /// before and fsynced by an earlier flush or by a rotation (flushes run one at a time).
    /// On failure the records are in an unknown state while their events are folded: the
    /// caller must stop writing, as after a failed fsync.
    /// With a commit hook ([`Outbox::set_commit_first`]), the bytes are written only once it
    /// accepted them; if it fails, nothing is written and the records are dropped: the caller
    /// must stop writing.
    pub fn write_out(&self) -> Result<WriteOut> {
        let mut stamped = lock(&self.writing);
        let mut taken = lock(&self.queued).take();
        stamped.stamp(&mut taken);
        // Held until the bytes are written: a rotation waits for a write in flight.
        let head = stamped.head(taken.chained, taken.last_seq);
        let framing = if taken.chained { record::Framing::Chained } else { record::Framing::Plain };
        let Taken { file, offset, mut bytes, last_seq, .. } = taken;
        if !bytes.is_empty() {
            self.commit_first(&bytes, framing)?;
            file.write_at(offset, &bytes)
                .map_err(|e| records_write_failed(e, last_seq, offset, &lock(&self.queued).path))?;
            bytes.clear();
            let mut q = lock(&self.queued);
            if q.spare.capacity() < bytes.capacity() {
                q.spare = bytes;
            }
        }
        Ok(WriteOut { file, last_seq, head })
    }
}

/// What must accept a batch of framed records (framed as the `Framing` says) before it is
/// written locally; its error is the reason it did not.
pub type CommitHook = dyn Fn(&[u8], record::Framing) -> std::result::Result<(), String> + Send + Sync;

/// The error of a failed append of record `seq` to the segment at `path`. Formats the path only
/// on failure: appends run for every record.
fn record_failed(e: std::io::Error, what: &str, seq: u64, path: &Path) -> Error {
    Error::io(format!("{what} record {seq} in {}", path.display()), e)
}

/// The error of a failed write of queued records (by a flush, or by a rotation).
fn records_write_failed(e: std::io::Error, last_seq: u64, offset: u64, path: &Path) -> Error {
    Error::io(format!("writing records up to {last_seq} at offset {offset} of {}", path.display()), e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every change under these locks is made whole before anything can panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Zeros to write from: a static buffer, so that pre-filling allocates and touches no memory
/// (a fresh zeroed megabyte per chunk cost page faults on every grant path that hit it).
static ZEROS: [u8; ZERO_BUFFER_BYTES] = [0; ZERO_BUFFER_BYTES];
/// The most zeros one write puts down while pre-filling.
const ZERO_BUFFER_BYTES: usize = 64 << 10;

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

/// Why an append did not happen, and whether the log can go on.
#[derive(Debug)]
pub enum AppendError {
    /// Nothing was appended; the log can go on.
    Failed(Error),
    /// The log is in an unknown state; stop writing.
    Poison(Error),
}

/// Removes what a failed [`new_segment`] left of the segment starting at `first_seq`, so that
/// the log ends with the full segment before it again (and no process after this one finds a
/// torn header to set aside).
fn remove_failed_segment(storage: &dyn Storage, dir: &Path, first_seq: u64) -> std::io::Result<()> {
    let path = dir.join(segment::file_name(first_seq));
    if storage.exists(&path) {
        storage.remove(&path)?;
    }
    storage.sync_dir(dir)
}

/// Creates a segment: its header and its first pre-filled chunk, fsynced, and its directory
/// entry, fsynced. Returns the file, its path and its length.
fn new_segment(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
    chain_start: &ChainValue,
    segment_size_bytes: u64,
) -> Result<NewSegment> {
    new_segment_or_why(storage, dir, first_seq, chain_start, segment_size_bytes).map_err(|(e, _)| e)
}

/// A new segment: its file, path and length (its header and first pre-filled chunk).
type NewSegment = (Arc<dyn AppendFile>, PathBuf, u64);

/// [`new_segment`], telling a failed fsync (`true`: never to be followed by another storage
/// operation) from a failure to create or write the file.
fn new_segment_or_why(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
    chain_start: &ChainValue,
    segment_size_bytes: u64,
) -> std::result::Result<NewSegment, (Error, bool)> {
    let path = dir.join(segment::file_name(first_seq));
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let file = storage.open_append(&path, true).map_err(|e| (io("creating segment", e), false))?;
    let header = segment::encode_header(first_seq, chain_start);
    let len = PREFILL_CHUNK_BYTES.min(segment_size_bytes).max(segment::HEADER_LEN as u64);
    let mut first = vec![0u8; len as usize];
    first[..segment::HEADER_LEN].copy_from_slice(&header);
    file.append(&first).map_err(|e| (io("writing header of", e), false))?;
    file.sync_data().map_err(|e| (io("fsync of", e), true))?;
    storage.sync_dir(dir).map_err(|e| (io("fsync of the directory of", e), true))?;
    Ok((Arc::from(file), path, len))
}
