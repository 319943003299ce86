//! The one reader of the log: a single fold over its segments, in order, from a sequence number
//! up to another, that owns the log's rules (see [`LogRules`]) and says how the log ends (clean,
//! torn at a place, or damaged). Open, refresh, `verify`, `repair` and history all read through
//! it; what differs between them is an option, not another loop:
//!
//! - [`LogReader::records`] hands over raw payloads (the parallel replay decodes them on other
//!   threads; look-ups decode only the records that can matter to them);
//! - [`LogReader::events`] decodes every record and checks it against the rules first;
//! - [`LogReader::survey`] is `verify`'s read: problems are collected, not returned, and the
//!   read goes on to the end, counting what it can no longer fold.
//!
//! Also here: the newest snapshot that loads ([`newest_loadable`]), allocations rebuilt from
//! the log ([`rebuild_allocations`]) and the retries of a read-only reader beside a live writer
//! ([`retry_beside_writer`]).

mod rebuild;
mod snapshots;

pub use rebuild::{rebuild_allocations, AllocationFilter, ENVELOPE_BYTES};
pub use snapshots::{list_snapshots, newest_loadable};

use crate::domain::clock::{format_micros, Micros};
use crate::domain::event::{Event, EventBody};
use crate::error::Damage;
use crate::log::chain::{self, ChainHead, ChainValue};
use crate::log::segment::{self, RecordPos, ScanStart, Tail, Visit};
use crate::log::storage::Storage;
use crate::log::wal::{self, LogEnd, LogPosition, SegmentInfo, TornTail};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// How far a read gets in a memory-mapped segment before it releases what it has read. The
/// pages read since the last release count in the peak RSS of an open by full replay: 8 MiB
/// made it 3.4 KiB per active allocation on the 1M-event benchmark ledger, 2 MiB 2.6 KiB (one
/// `madvise` per 2 MiB read costs nothing measurable).
const RELEASE_EVERY_BYTES: u64 = 2 << 20;

/// The rules every event of the log obeys, checked in one place: sequence numbers follow each
/// other, the first event is `ledger_created`, and each timestamp is after the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRules {
    expected_seq: u64,
    /// The previous event's timestamp; `None` when it is not known (a read that starts in the
    /// middle of the log checks timestamps from its second event on).
    last_ts_us: Option<Micros>,
}

/// An event that breaks one of the [`LogRules`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleBroken {
    /// The record is not the next one.
    Sequence {
        /// The record's sequence number.
        seq: u64,
        /// The one that was due.
        expected: u64,
    },
    /// The log does not begin with `ledger_created`.
    FirstNotLedgerCreated {
        /// The first event's type.
        found: &'static str,
    },
    /// A timestamp is not after the previous event's.
    TimestampNotAfter {
        /// The event's timestamp.
        ts_us: Micros,
        /// The previous event's.
        previous_us: Micros,
    },
}

/// Whose words a broken rule is reported in: each command's reports have always said it its
/// own way, and people and scripts read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wording {
    /// Opening and refreshing a ledger (and every other reader).
    Open,
    /// `repair`'s plan.
    Repair,
    /// `verify`'s problems (times in RFC 3339).
    Verify,
}

impl RuleBroken {
    /// The reason, as the reader named by `wording` reports it.
    pub fn message(&self, wording: Wording) -> String {
        match (self, wording) {
            (RuleBroken::Sequence { seq, expected }, _) => {
                format!("record has sequence number {seq}, expected {expected}")
            }
            (RuleBroken::FirstNotLedgerCreated { .. }, Wording::Repair) => {
                "the first event is not ledger_created".to_string()
            }
            (RuleBroken::FirstNotLedgerCreated { found }, _) => {
                format!("the first event is {found}, not ledger_created")
            }
            (RuleBroken::TimestampNotAfter { ts_us, previous_us }, Wording::Open) => {
                format!("timestamp {} is not after the previous event's {}", ts_us.as_micros(), previous_us.as_micros())
            }
            (RuleBroken::TimestampNotAfter { ts_us, .. }, Wording::Repair) => {
                format!("timestamp {} is not after the previous event's", ts_us.as_micros())
            }
            (RuleBroken::TimestampNotAfter { ts_us, .. }, Wording::Verify) => {
                format!("timestamp {} is not after the previous event's", format_micros(*ts_us))
            }
        }
    }
}

impl Default for LogRules {
    fn default() -> LogRules {
        LogRules::from_start()
    }
}

impl LogRules {
    /// For a read from the log's first record.
    pub fn from_start() -> LogRules {
        LogRules { expected_seq: 1, last_ts_us: None }
    }

    /// For a read that continues a fold whose last event was `last_seq` at `last_ts_us` (0: none
    /// yet, the read starts at the log's first record).
    pub fn after(last_seq: u64, last_ts_us: Micros) -> LogRules {
        if last_seq == 0 {
            return LogRules::from_start();
        }
        LogRules { expected_seq: last_seq + 1, last_ts_us: Some(last_ts_us) }
    }

    /// For a read that starts after `after_seq` without knowing that event's timestamp.
    pub fn resuming(after_seq: u64) -> LogRules {
        LogRules { expected_seq: after_seq + 1, last_ts_us: None }
    }

    /// Checks the next event and, if it obeys the rules, moves on past it.
    #[inline]
    pub fn check(&mut self, seq: u64, ts_us: Micros, body: &EventBody) -> std::result::Result<(), RuleBroken> {
        if seq != self.expected_seq {
            return Err(RuleBroken::Sequence { seq, expected: self.expected_seq });
        }
        if seq == 1 && !matches!(body, EventBody::LedgerCreated { .. }) {
            return Err(RuleBroken::FirstNotLedgerCreated { found: body.type_name() });
        }
        if let Some(previous_us) = self.last_ts_us.filter(|&p| seq > 1 && ts_us <= p) {
            return Err(RuleBroken::TimestampNotAfter { ts_us, previous_us });
        }
        self.expected_seq = seq + 1;
        self.last_ts_us = Some(ts_us);
        Ok(())
    }
}

/// Something wrong with the log as a whole or with one segment of it.
#[derive(Debug)]
pub enum LogProblem {
    /// A segment does not start where the one before it ended (or the first one not at 1).
    Gap {
        /// The segment.
        path: PathBuf,
        /// Where it starts.
        first_seq: u64,
        /// Where it should have started.
        expected: u64,
        /// It is the first segment the read looked at.
        first_segment: bool,
    },
    /// A segment could not be read.
    Unreadable {
        /// The segment.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// An incomplete record in a segment that is not the last: a later segment was started
    /// only once this one was durable, so this is damage, not an interrupted append.
    TornNotLast {
        /// The segment.
        path: PathBuf,
        /// Where the incomplete record starts.
        offset: u64,
        /// Its bytes.
        len: u64,
        /// The sequence number it should have had.
        seq: u64,
    },
    /// A record (or header) is damaged, or its event could not be folded.
    Damaged(Damage),
}

impl LogProblem {
    /// The error an open (or any reader that stops at the first problem) returns.
    pub fn into_error(self) -> Error {
        match self {
            LogProblem::Gap { path, first_seq, first_segment: true, .. } => Error::Inconsistent {
                path,
                message: format!("the first segment starts at sequence number {first_seq}, not 1 (segments are missing)"),
            },
            LogProblem::Gap { path, first_seq, expected, .. } => Error::Inconsistent {
                path,
                message: format!(
                    "the log has a gap: the previous segment ends before sequence number {expected}, this segment starts at {first_seq} (a segment is missing)"
                ),
            },
            LogProblem::Unreadable { path, error } => Error::io(format!("reading {}", path.display()), error),
            LogProblem::TornNotLast { path, offset, seq, .. } => Error::Damaged(Damage {
                file: path,
                offset,
                seq,
                reason: "incomplete record in a segment that is not the last".into(),
            }),
            LogProblem::Damaged(d) => Error::Damaged(d),
        }
    }

    /// What `verify` says of a problem with the segment's own bytes (its status says
    /// `damaged: ` and this).
    pub fn verify_reason(&self) -> String {
        match self {
            LogProblem::TornNotLast { len, .. } => {
                format!("incomplete record ({len} bytes) in a segment that is not the last")
            }
            LogProblem::Damaged(d) => d.reason.clone(),
            LogProblem::Gap { .. } | LogProblem::Unreadable { .. } => self.verify_text(),
        }
    }

    /// The problem as `verify` lists it, naming file, offset and sequence number where it can.
    pub fn verify_text(&self) -> String {
        match self {
            LogProblem::Gap { path, first_seq, expected, .. } => format!(
                "{}: segment starts at sequence number {first_seq}, expected {expected} (a segment is missing or out of place)",
                path.display()
            ),
            LogProblem::Unreadable { path, error } => format!("{}: cannot read: {error}", path.display()),
            LogProblem::TornNotLast { path, offset, seq, .. } => {
                Damage { file: path.clone(), offset: *offset, seq: *seq, reason: self.verify_reason() }.to_string()
            }
            LogProblem::Damaged(d) => d.to_string(),
        }
    }
}

/// One segment read through, for [`Survey::segment`].
#[derive(Debug)]
pub struct SegmentRead<'a> {
    /// The segment.
    pub info: &'a SegmentInfo,
    /// Valid records in it (all of them, including those not handed over).
    pub records: u64,
    /// Its size.
    pub bytes: u64,
    /// How its valid records end.
    pub tail: &'a Tail,
    /// The problem its bytes have, if any (already passed to [`Survey::problem`]).
    pub problem: Option<&'a LogProblem>,
}

/// What `verify` learns as the survey goes.
pub trait Survey {
    /// A problem: the read goes on, but hands no more records over.
    fn problem(&mut self, problem: &LogProblem);
    /// A segment was read through.
    fn segment(&mut self, read: &SegmentRead<'_>);
}

/// A visitor of decoded events (returns false to stop; an error is damage at that record).
pub type EventVisit<'a> = dyn FnMut(RecordPos, Event) -> std::result::Result<bool, String> + 'a;

/// A read of the log: where it is, and which records.
#[derive(Clone, Copy)]
pub struct LogReader<'a> {
    storage: &'a dyn Storage,
    wal_dir: &'a Path,
    after_seq: u64,
    upto: Option<u64>,
    hint: Option<LogPosition>,
    /// The log may start after 1 (its first segments were archived): a follower reads what
    /// is left instead of reporting the missing start as a gap.
    retained: bool,
    /// Recompute every record's chain value and check it, and each segment's chain start
    /// (`verify`); reads otherwise trust the values the checksums cover.
    verify_chain: bool,
}

impl std::fmt::Debug for LogReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("wal_dir", &self.wal_dir)
            .field("after_seq", &self.after_seq)
            .field("upto", &self.upto)
            .field("hint", &self.hint)
            .finish()
    }
}

/// Where the read is within the segment list, threaded through the fold.
#[derive(Default)]
struct Progress {
    last_seq: u64,
    last_record: Option<LogPosition>,
    resumed_from_hint: bool,
    last_valid_len: u64,
    torn: Option<TornTail>,
    /// Where the next segment must start (`None`: not checked).
    expected_next: Option<u64>,
    /// A problem was met (survey only): records are counted, not handed over.
    quiet: bool,
    /// The chain value of `last_seq`, where the log is chained.
    chain: Option<ChainValue>,
    /// The first record of the chain the read is in (see [`LogEnd::chain_from`]).
    chain_from: Option<u64>,
    /// The previous segment read was chained, and read whole (`chain` is its last value).
    previous_chained: Option<bool>,
}

impl<'a> LogReader<'a> {
    /// A read of the whole log in `wal_dir`.
    pub fn new(storage: &'a dyn Storage, wal_dir: &'a Path) -> LogReader<'a> {
        LogReader { storage, wal_dir, after_seq: 0, upto: None, hint: None, retained: false, verify_chain: false }
    }

    /// Reads the records after `seq` only; segments wholly at or before it are not read.
    pub fn after(self, seq: u64) -> LogReader<'a> {
        LogReader { after_seq: seq, ..self }
    }

    /// Reads up to and including `seq` and never decodes what follows: a writer's flush may be
    /// writing the records after the ones a reader waited for, and bytes caught in flight can
    /// look like damage.
    pub fn upto(self, seq: u64) -> LogReader<'a> {
        LogReader { upto: Some(seq), ..self }
    }

    /// Reads the log from its oldest segment on without requiring that it starts at 1 (for a
    /// follower, which checks the oldest sequence number it can serve itself).
    pub fn retained(self) -> LogReader<'a> {
        LogReader { retained: true, ..self }
    }

    /// Checks the chain as it reads: each record's chain value against the one recomputed from
    /// the record before it, and each segment's chain start against the previous segment's last
    /// value (or the genesis value where a chain begins). A mismatch is damage at that record.
    pub fn verify_chain(self) -> LogReader<'a> {
        LogReader { verify_chain: true, ..self }
    }

    /// The head of the chain: the last record's sequence number and chain value, read from the
    /// last segment alone (its header when it holds no record yet). `None` when the last segment
    /// is an older build's (not chained). Checks nothing beyond the checksums.
    pub fn head(&self) -> Result<Option<ChainHead>> {
        let segments = wal::list_segments(self.storage, self.wal_dir)?;
        let Some(last) = segments.last() else { return Ok(None) };
        let end = LogReader { after_seq: last.first_seq.saturating_sub(1), upto: None, ..*self }
            .records(&mut |_, _| Ok(true))?;
        Ok(end.chain.map(|hash| ChainHead { seq: end.last_seq, hash }))
    }

    /// The chain value of record `seq` (stored with it), or `None` if the log does not hold it
    /// or it is not chained. Reads only the segment that holds it.
    pub fn chain_at(&self, seq: u64) -> Result<Option<ChainValue>> {
        if seq == 0 {
            return Ok(None);
        }
        let mut found = None;
        LogReader { after_seq: seq - 1, upto: Some(seq), ..*self }.records(&mut |pos, _| {
            found = pos.chain.filter(|_| pos.seq == seq);
            Ok(false)
        })?;
        Ok(found)
    }

    /// Where the record `after` sits (from a snapshot): when a valid record with that sequence
    /// number is there, reading starts right after it; a hint that does not check out is
    /// ignored (the segment is read from its start).
    pub fn hint(self, hint: Option<LogPosition>) -> LogReader<'a> {
        LogReader { hint, ..self }
    }

    /// Hands each record's payload to `visit` (which returns false to stop). A torn tail in the
    /// last segment ends the read and is reported in the [`LogEnd`]; any other damage is an
    /// error naming file, offset and sequence number. A read whose range is empty reads nothing
    /// and returns an end without segments.
    pub fn records(&self, visit: &mut Visit<'_>) -> Result<LogEnd> {
        self.fold(visit, None)
    }

    /// Decodes each record, checks it against `rules` and hands it to `visit`; a broken rule is
    /// damage at that record, reported in the words of `wording`.
    pub fn events(&self, rules: &mut LogRules, wording: Wording, visit: &mut EventVisit<'_>) -> Result<LogEnd> {
        self.fold(&mut |pos, payload| decode_checked(rules, wording, pos, payload, visit), None)
    }

    /// `verify`'s read: like [`LogReader::events`] (in `verify`'s words), but problems go to
    /// `survey` and the read goes on to the last segment, counting the records it no longer
    /// hands over. Errors only when the segments cannot be listed.
    pub fn survey(&self, rules: &mut LogRules, visit: &mut EventVisit<'_>, survey: &mut dyn Survey) -> Result<LogEnd> {
        self.fold(&mut |pos, payload| decode_checked(rules, Wording::Verify, pos, payload, visit), Some(survey))
    }

    /// The one loop over the segments.
    fn fold(&self, visit: &mut Visit<'_>, mut survey: Option<&mut dyn Survey>) -> Result<LogEnd> {
        let segments = wal::list_segments(self.storage, self.wal_dir)?;
        if self.upto.is_some_and(|u| self.after_seq >= u) {
            return Ok(end_of(Vec::new(), Progress { last_seq: self.after_seq, ..Progress::default() }));
        }
        // First segment that can hold `after_seq + 1`.
        let start = segments.iter().rposition(|s| s.first_seq <= self.after_seq + 1).unwrap_or(0);
        let mut at = Progress { expected_next: (start == 0 && !self.retained).then_some(1), ..Progress::default() };
        if start > 0 {
            at.last_seq = segments[start].first_seq - 1;
        }
        for (i, seg) in segments.iter().enumerate().skip(start) {
            let is_last = i + 1 == segments.len();
            if let Some(expected) = at.expected_next.filter(|&e| e != seg.first_seq && !at.quiet) {
                let gap = LogProblem::Gap {
                    path: seg.path.clone(),
                    first_seq: seg.first_seq,
                    expected,
                    first_segment: i == 0,
                };
                report(&mut survey, &mut at, gap)?;
            }
            let bytes = match self.storage.read(&seg.path) {
                Ok(b) => b,
                Err(error) => {
                    report(&mut survey, &mut at, LogProblem::Unreadable { path: seg.path.clone(), error })?;
                    continue;
                }
            };
            if let Some(problem) = self.chain_start_problem(seg, &bytes, &mut at).filter(|_| !at.quiet) {
                report(&mut survey, &mut at, problem)?;
            }
            let hint = if i == start { self.hint_in(seg, &bytes) } else { None };
            let (scan, records, stop) = self.scan_segment(seg, &bytes, hint, &mut at, visit);
            if scan.next_seq > seg.first_seq {
                at.last_seq = scan.next_seq - 1;
            }
            at.chain = scan.chain;
            at.previous_chained = Some(scan.chain_start.is_some());
            at.last_valid_len = scan.valid_len;
            if stop || scan.stopped {
                break;
            }
            let problem = match scan.tail {
                Tail::Clean => None,
                Tail::Torn { offset, len } if is_last => {
                    at.torn = Some(TornTail { file: seg.path.clone(), offset, len, saved_to: None });
                    None
                }
                Tail::Torn { offset, len } => {
                    Some(LogProblem::TornNotLast { path: seg.path.clone(), offset, len, seq: scan.next_seq })
                }
                Tail::Corrupt(ref d) => Some(LogProblem::Damaged(d.clone())),
            };
            if let Some(s) = survey.as_deref_mut() {
                let bytes = bytes.len() as u64;
                let read = SegmentRead { info: seg, records, bytes, tail: &scan.tail, problem: problem.as_ref() };
                if let Some(p) = &problem {
                    s.problem(p);
                    at.quiet = true;
                }
                s.segment(&read);
            } else if let Some(p) = problem {
                return Err(p.into_error());
            }
            at.expected_next = Some(scan.next_seq);
        }
        Ok(end_of(segments, at))
    }

    /// `hint` if it names the record `after_seq` in `seg` (where the read starts) and a valid
    /// record with that sequence number is there: (the hint with the record's chain value, the
    /// offset after that record).
    fn hint_in(&self, seg: &SegmentInfo, bytes: &[u8]) -> Option<(LogPosition, u64)> {
        let h = self.hint.filter(|h| h.seq == self.after_seq && h.segment_first_seq == seg.first_seq)?;
        let header = segment::decode_header(bytes).ok()?;
        match crate::log::record::decode_framed(bytes.get(usize::try_from(h.offset).ok()?..)?, header.framing()) {
            crate::log::record::Decoded::Record { seq, frame_len, chain, .. }
                if seq == h.seq && h.offset >= header.records_offset() as u64 =>
            {
                Some((LogPosition { chain, ..h }, h.offset + frame_len as u64))
            }
            _ => None,
        }
    }

    /// Where the chain stands at the start of `seg` (whose bytes are `bytes`): a chained segment
    /// after a chained one goes on from its last value; one after an older build's segment (or
    /// the first of the log) begins a chain, from the genesis value. Checked when the read
    /// verifies the chain and saw the segment before whole; the damage, if any.
    fn chain_start_problem(&self, seg: &SegmentInfo, bytes: &[u8], at: &mut Progress) -> Option<LogProblem> {
        let header = segment::decode_header(bytes).ok()?;
        let previous = at.previous_chained.or((seg.first_seq == 1).then_some(false));
        let Some(start) = header.chain_start else {
            at.chain_from = None;
            let after_chain = self.verify_chain && previous == Some(true);
            return after_chain.then(|| chain_damage(seg, "an older format version follows a chained segment".into()));
        };
        if previous == Some(false) {
            at.chain_from = Some(seg.first_seq);
        }
        let expected = match previous {
            Some(true) => at.chain?,
            Some(false) => chain::GENESIS,
            None => return None,
        };
        (self.verify_chain && start != expected).then(|| {
            chain_damage(
                seg,
                format!(
                    "chain mismatch: the segment's chain start {start} is not {} ({expected})",
                    if previous == Some(true) {
                        "the previous segment's last chain value"
                    } else {
                        "the genesis value"
                    }
                ),
            )
        })
    }

    /// Scans one segment's bytes, handing over the records in range unless the read has gone
    /// quiet: (the scan, how many valid records it passed, whether the visitor stopped).
    fn scan_segment(
        &self,
        seg: &SegmentInfo,
        bytes: &crate::log::storage::FileBytes,
        hint: Option<(LogPosition, u64)>,
        at: &mut Progress,
        visit: &mut Visit<'_>,
    ) -> (segment::Scan, u64, bool) {
        if let Some((h, _)) = hint {
            at.resumed_from_hint = true;
            at.last_record = Some(h);
        }
        let verify_chain = self.verify_chain;
        let (after_seq, upto, quiet) = (self.after_seq, self.upto, at.quiet);
        let (mut stop, mut records, mut released) = (false, 0u64, 0u64);
        let last_record = &mut at.last_record;
        let mut on_record = |pos: RecordPos, payload: &[u8]| {
            records += 1;
            *last_record = Some(LogPosition {
                segment_first_seq: seg.first_seq,
                offset: pos.offset,
                seq: pos.seq,
                record_crc: None,
                chain: pos.chain,
            });
            if pos.offset - released >= RELEASE_EVERY_BYTES {
                bytes.release_before(pos.offset as usize);
                released = pos.offset;
            }
            if pos.seq <= after_seq || quiet {
                return Ok(true);
            }
            debug_assert!(upto.is_none_or(|u| pos.seq <= u));
            let go_on = visit(pos, payload)? && upto.is_none_or(|u| pos.seq < u);
            stop = !go_on;
            Ok(go_on)
        };
        let start = match hint {
            Some((h, next_offset)) => ScanStart { offset: next_offset, seq: h.seq + 1, chain: h.chain, verify_chain },
            None => ScanStart { verify_chain, ..ScanStart::default() },
        };
        let scan = segment::scan_from(&seg.path, bytes, seg.first_seq, start, &mut on_record);
        (scan, records, stop)
    }
}

/// Decodes a record, checks it against the rules and hands it on.
#[inline]
fn decode_checked(
    rules: &mut LogRules,
    wording: Wording,
    pos: RecordPos,
    payload: &[u8],
    visit: &mut EventVisit<'_>,
) -> std::result::Result<bool, String> {
    let ev = Event::decode(payload)?;
    rules.check(pos.seq, ev.ts_us, &ev.body).map_err(|b| b.message(wording))?;
    visit(pos, ev)
}

/// A problem met by the fold: an error unless a survey collects it.
fn report(survey: &mut Option<&mut dyn Survey>, at: &mut Progress, problem: LogProblem) -> Result<()> {
    match survey {
        Some(s) => {
            s.problem(&problem);
            at.quiet = true;
            Ok(())
        }
        None => Err(problem.into_error()),
    }
}

fn end_of(segments: Vec<SegmentInfo>, at: Progress) -> LogEnd {
    LogEnd {
        segments,
        last_seq: at.last_seq,
        last_record: at.last_record,
        resumed_from_hint: at.resumed_from_hint,
        last_valid_len: at.last_valid_len,
        torn: at.torn,
        chain: at.chain,
        chain_from: at.chain_from,
    }
}

/// Damage to the chain at the start of `seg` (its header).
fn chain_damage(seg: &SegmentInfo, reason: String) -> LogProblem {
    LogProblem::Damaged(Damage { file: seg.path.clone(), offset: 0, seq: seg.first_seq, reason })
}

/// How long a read-only reader waits before it reads the log again when it found damage: a
/// reader beside a live writer can catch the writer's newest records being written, bytes that
/// look like damage until the write is whole. Damage that is still there after these waits is
/// reported.
const READ_ONLY_RETRY_WAITS: [std::time::Duration; 3] =
    [std::time::Duration::from_millis(1), std::time::Duration::from_millis(10), std::time::Duration::from_millis(100)];

/// Runs `read` (a read-only handle's pass over the log in `wal_dir`) again after each of
/// `READ_ONLY_RETRY_WAITS` while it reports damage that a writer's write in flight can explain
/// (see [`damage_may_be_a_write_in_flight`]).
pub fn retry_beside_writer<T>(storage: &dyn Storage, wal_dir: &Path, mut read: impl FnMut() -> Result<T>) -> Result<T> {
    let last_segment = || wal::list_segments(storage, wal_dir).ok().and_then(|s| s.last().map(|l| l.first_seq));
    for wait in READ_ONLY_RETRY_WAITS {
        let last_before = last_segment();
        match read() {
            Err(Error::Damaged(d)) if damage_may_be_a_write_in_flight(&d.file, last_before) => std::thread::sleep(wait),
            done => return done,
        }
    }
    read()
}

/// Whether damage a reader found in `file` may be a live writer's write caught in flight: only
/// the last segment is written to (a rotation finishes a segment before it creates the next),
/// so the file must be the segment that was last when the read began (`last_before`, by its
/// first sequence number), or one created since. Comparing with the last segment after the read
/// instead missed a rotation that happened during it.
fn damage_may_be_a_write_in_flight(file: &Path, last_before: Option<u64>) -> bool {
    let first_seq = file.file_name().and_then(|n| n.to_str()).and_then(segment::parse_file_name);
    match (first_seq, last_before) {
        (Some(first_seq), Some(last)) => first_seq >= last,
        (Some(_), None) => true,
        // Not a segment: snapshots are written whole and renamed into place.
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A locking.rs run under load failed: the reader caught a write in flight in segment 143,
    /// and the writer rotated to segment 157 before the reader looked at which segment was last.
    #[test]
    fn damage_in_the_segment_that_was_last_when_the_read_began_may_be_a_write_in_flight() {
        let seg = |first_seq| PathBuf::from("/l/wal").join(segment::file_name(first_seq));
        assert!(damage_may_be_a_write_in_flight(&seg(143), Some(143)), "last when the read began");
        assert!(damage_may_be_a_write_in_flight(&seg(157), Some(143)), "created during the read");
        assert!(damage_may_be_a_write_in_flight(&seg(1), None), "the first segment, being created");
        assert!(!damage_may_be_a_write_in_flight(&seg(120), Some(143)), "finished before the read began");
        assert!(!damage_may_be_a_write_in_flight(Path::new("/l/snapshots/x.snap"), Some(143)), "not a segment");
    }

    fn created() -> EventBody {
        EventBody::LedgerCreated { ledger_id: "x".into(), config: crate::Config::default() }
    }

    /// The instant `us` microseconds after the epoch.
    fn t(us: i64) -> Micros {
        Micros::from_micros(us)
    }

    fn released() -> EventBody {
        EventBody::Released { allocation_id: crate::AllocationId::parse("id", "alloc-1a2b3c4d5e6f").unwrap() }
    }

    #[test]
    fn the_rules_hold_from_the_start_and_in_the_middle() {
        let mut rules = LogRules::from_start();
        assert_eq!(rules.check(1, t(10), &released()), Err(RuleBroken::FirstNotLedgerCreated { found: "released" }));
        assert_eq!(rules.check(2, t(10), &created()), Err(RuleBroken::Sequence { seq: 2, expected: 1 }));
        assert_eq!(rules.check(1, t(10), &created()), Ok(()));
        assert_eq!(
            rules.check(2, t(10), &released()),
            Err(RuleBroken::TimestampNotAfter { ts_us: t(10), previous_us: t(10) })
        );
        assert_eq!(rules.check(2, t(11), &released()), Ok(()));
        // In the middle, without the previous timestamp: checked from the second event on.
        let mut rules = LogRules::resuming(5);
        assert_eq!(rules.check(6, t(1), &released()), Ok(()));
        assert!(rules.check(7, t(1), &released()).is_err());
        let mut rules = LogRules::after(5, t(100));
        assert!(rules.check(6, t(100), &released()).is_err());
        assert_eq!(rules.check(6, t(101), &released()), Ok(()));
    }

    #[test]
    fn each_command_words_a_broken_rule_as_it_always_has() {
        let ts = RuleBroken::TimestampNotAfter { ts_us: t(5), previous_us: t(7) };
        assert_eq!(ts.message(Wording::Open), "timestamp 5 is not after the previous event's 7");
        assert_eq!(ts.message(Wording::Repair), "timestamp 5 is not after the previous event's");
        let first = RuleBroken::FirstNotLedgerCreated { found: "granted" };
        assert_eq!(first.message(Wording::Open), "the first event is granted, not ledger_created");
        assert_eq!(first.message(Wording::Repair), "the first event is not ledger_created");
    }
}
