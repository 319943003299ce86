//! `verify`: reads every record of every segment and every snapshot without changing anything,
//! folds the whole log, and checks each snapshot against the fold at its sequence number.
//! In a chained log (segment version 4) it recomputes every record's chain value, reports the
//! head `{seq, hash}`, and checks a head pinned earlier (`--expect-head SEQ:HASH`).

use crate::domain::clock::{format_micros, Micros};
use crate::domain::event::Event;
use crate::domain::state::State;
use crate::log::chain::{ChainHead, ChainValue};
use crate::log::layout::{SNAPSHOT_DIR, WAL_DIR};
use crate::log::reader::{list_snapshots, LogProblem, LogReader, LogRules, SegmentRead, Survey};
use crate::log::segment::Tail;
use crate::log::storage::Storage;
use crate::log::wal::{self, SegmentInfo};
use crate::{Config, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `verify` found in one log segment.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    /// The segment file.
    pub file: PathBuf,
    /// The sequence number in its name: its first record's.
    pub first_seq: u64,
    /// Valid records in it.
    pub records: u64,
    /// Its size.
    pub bytes: u64,
    /// `ok`, `torn tail at offset N (M bytes)` or a description of the damage.
    pub status: String,
}

/// What `verify` found of one snapshot file.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// The snapshot file.
    pub file: PathBuf,
    /// The sequence number in its name: the last event it holds.
    pub seq: u64,
    /// `ok` (`ok (records no chain value ...)` for an older snapshot), `damaged: ...`,
    /// `differs from the replayed log`, `records chain value ...` (not the log's chain value at
    /// its record), `ahead of the log` or `not checked (...)`.
    pub status: String,
}

/// Everything `verify` found in a ledger directory.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// True when nothing is damaged (a torn tail alone is not damage: the next read-write open
    /// cuts it).
    pub ok: bool,
    /// The ledger directory.
    pub data_dir: PathBuf,
    /// From the log's first record (empty if it could not be read).
    pub ledger_id: String,
    /// Valid records in all segments.
    pub records: u64,
    /// Sequence number of the last event folded.
    pub last_seq: u64,
    /// When the first event happened, in RFC 3339.
    pub first_event_at: Option<String>,
    /// When the last event folded happened, in RFC 3339.
    pub last_event_at: Option<String>,
    /// Each segment, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Each snapshot, oldest first.
    pub snapshots: Vec<SnapshotReport>,
    /// Where an interrupted final append left an incomplete record, if one did.
    pub torn_tail: Option<String>,
    /// Every problem found, each naming file, offset and sequence number where it can.
    pub problems: Vec<String>,
    /// Active allocations in the state the log folds to.
    pub active_allocations: usize,
    /// The head of the chain: the last record and its chain value, every link checked. `None`
    /// when the log is not chained there (an older ledger's last segment) or has problems.
    pub chain_head: Option<ChainHead>,
    /// The first record the chain covers: 1 for a ledger created chained; for an older ledger,
    /// the first record of its first version 4 segment (the records before are checked by
    /// their checksums only). `None` when the log is not chained.
    pub chain_from: Option<u64>,
    /// What the check of a pinned head found (`None` when none was given).
    pub expect_head: Option<ExpectHeadReport>,
}

/// The check of a head pinned earlier: is the log up to its sequence number the one pinned?
#[derive(Debug, Clone, Serialize)]
pub struct ExpectHeadReport {
    /// The head given.
    pub expected: ChainHead,
    /// The chain value the log holds at `expected.seq`, verified, if it reaches it.
    pub found: Option<ChainValue>,
    /// The log up to `expected.seq` is the one pinned.
    pub matches: bool,
    /// What was found, in words.
    pub message: String,
}

/// What `verify` checks besides the log itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// A head printed by an earlier `verify` (`SEQ:HASH`): the log up to `SEQ` must be the
    /// one it was then.
    pub expect_head: Option<ChainHead>,
}

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Snapshots to compare against the fold, by sequence number, each decoded or why not.
/// A decoded snapshot: its state and the chain value it recorded for its record (`None` in an
/// older snapshot, or one of an unchained log).
type Snapshots = BTreeMap<u64, (PathBuf, std::result::Result<(State, Option<ChainValue>), String>)>;

/// Reads every segment and every snapshot of the ledger in `dir` and reports what is wrong,
/// changing nothing. `progress` hears of each segment read, in bytes.
pub fn verify(storage: &dyn Storage, dir: &Path, progress: Progress<'_>) -> Result<VerifyReport> {
    verify_with(storage, dir, VerifyOptions::default(), progress)
}

/// [`verify`], checking what `opts` asks for too (a pinned head: a mismatch is a problem).
pub fn verify_with(
    storage: &dyn Storage,
    dir: &Path,
    opts: VerifyOptions,
    progress: Progress<'_>,
) -> Result<VerifyReport> {
    let wal_dir = dir.join(WAL_DIR);
    let snaps = decode_snapshots(storage, dir)?;
    let mut fold = Fold {
        state: State::empty(Config::default()),
        first_ts: None,
        snap_status: snaps
            .iter()
            .filter_map(|(seq, (_, s))| Some((*seq, format!("damaged: {}", s.as_ref().err()?))))
            .collect(),
        snaps: &snaps,
    };
    let total_bytes: u64 =
        wal::list_segments(storage, &wal_dir)?.iter().map(|s| storage.file_len(&s.path).unwrap_or(0)).sum();
    let mut tally = Tally {
        problems: Vec::new(),
        segments: Vec::new(),
        records: 0,
        torn_tail: None,
        done_bytes: 0,
        total_bytes,
        progress,
    };
    let pinned_seq = opts.expect_head.map(|h| h.seq);
    let mut at_pin = None;
    let end = LogReader::new(storage, &wal_dir).verify_chain().survey(
        &mut LogRules::from_start(),
        &mut |pos, ev| {
            if Some(pos.seq) == pinned_seq {
                at_pin = pos.chain;
            }
            fold.event(pos.seq, pos.chain, ev);
            Ok(true)
        },
        &mut tally,
    )?;
    // Every problem so far is the survey's: it folded the whole log only if there was none.
    let folded = tally.problems.is_empty();
    let mut problems = std::mem::take(&mut tally.problems);
    check_fold(&wal_dir, &end.segments, &fold.state, folded, &mut problems);
    let chain_head = end.chain.filter(|_| folded).map(|hash| ChainHead { seq: fold.state.last_seq, hash });
    let expect_head = opts.expect_head.map(|expected| {
        let report = check_pinned(expected, at_pin, fold.state.last_seq, end.chain_from, folded);
        if !report.matches {
            problems.push(format!("expected head {expected}: {}", report.message));
        }
        report
    });
    let snapshots = snapshot_reports(&snaps, &fold.snap_status, fold.state.last_seq, &mut problems);
    let state = &fold.state;
    Ok(VerifyReport {
        ok: problems.is_empty(),
        data_dir: dir.to_path_buf(),
        ledger_id: state.ledger_id.clone(),
        records: tally.records,
        last_seq: state.last_seq,
        first_event_at: fold.first_ts.map(format_micros),
        last_event_at: (state.last_seq > 0).then(|| format_micros(state.last_ts_us)),
        segments: tally.segments,
        snapshots,
        torn_tail: tally.torn_tail,
        problems,
        active_allocations: state.active_count(),
        chain_head,
        chain_from: end.chain_from,
        expect_head,
    })
}

/// Checks the head pinned as `expected` against the chain value `found` at its sequence number
/// (the log verified up to `verified_seq`; `folded`: with no problem at all).
fn check_pinned(
    expected: ChainHead,
    found: Option<ChainValue>,
    verified_seq: u64,
    chain_from: Option<u64>,
    folded: bool,
) -> ExpectHeadReport {
    let seq = expected.seq;
    let (matches, message) = match found {
        Some(value) if value == expected.hash => (true, format!("the log up to record {seq} is the one pinned")),
        Some(value) => (
            false,
            format!(
                "the log diverges from the pinned history at or before record {seq}: its chain value there is \
                 {value}, the pinned one {}",
                expected.hash
            ),
        ),
        None if seq > verified_seq && folded => {
            (false, format!("record {seq} is beyond the head of the log (the last record is {verified_seq})"))
        }
        None if seq > verified_seq => {
            (false, format!("the log could not be checked up to record {seq}: see the problems above"))
        }
        None => match chain_from {
            Some(from) if from <= seq => {
                (false, format!("the log could not be checked up to record {seq}: see the problems above"))
            }
            Some(from) => (false, format!("record {seq} is not chained: the chain begins at record {from}")),
            None => (false, format!("record {seq} is not chained: this log has no chain (an older format)")),
        },
    };
    ExpectHeadReport { expected, found, matches, message }
}

/// Every snapshot, decoded (one a writer beside us pruned after we listed it is gone, not
/// damaged).
fn decode_snapshots(storage: &dyn Storage, dir: &Path) -> Result<Snapshots> {
    let mut snaps = Snapshots::new();
    for file in list_snapshots(storage, &dir.join(SNAPSHOT_DIR))? {
        let decoded = match storage.read(&file.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            read => read.map_err(|e| e.to_string()).and_then(|b| {
                crate::log::snapshot::decode_with_position(&b, file.seq).map(|(s, p)| (s, p.and_then(|p| p.chain)))
            }),
        };
        snaps.insert(file.seq, (file.path, decoded));
    }
    Ok(snaps)
}

/// The fold of the log, checking each snapshot against it at the snapshot's sequence number.
struct Fold<'a> {
    state: State,
    first_ts: Option<Micros>,
    /// What was found of each snapshot so far.
    snap_status: BTreeMap<u64, String>,
    snaps: &'a Snapshots,
}

impl Fold<'_> {
    /// Folds record `seq` (whose chain value in the log is `chain`, where chained) and checks
    /// a snapshot taken at it: its state, and the chain value it recorded.
    fn event(&mut self, seq: u64, chain: Option<ChainValue>, ev: Event) {
        self.first_ts.get_or_insert(ev.ts_us);
        self.state.evolve(seq, ev.ts_us, &ev.body);
        if let Some((_, Ok((snap, snap_chain)))) = self.snaps.get(&seq) {
            let status = if *snap != self.state {
                "differs from the replayed log".to_string()
            } else {
                match (snap_chain, chain) {
                    (Some(s), Some(l)) if s != &l => format!(
                        "records chain value {s} for record {seq}, but the log's chain value there is {l}: \
                         it does not belong to this history"
                    ),
                    (None, Some(_)) => {
                        "ok (records no chain value: an older snapshot; its state matches the log)".into()
                    }
                    _ => "ok".into(),
                }
            };
            self.snap_status.insert(seq, status);
        }
    }
}

/// What the survey of the segments found.
struct Tally<'p> {
    problems: Vec<String>,
    segments: Vec<SegmentReport>,
    records: u64,
    torn_tail: Option<String>,
    done_bytes: u64,
    total_bytes: u64,
    progress: Progress<'p>,
}

impl Survey for Tally<'_> {
    fn problem(&mut self, problem: &LogProblem) {
        self.problems.push(problem.verify_text());
    }

    fn segment(&mut self, read: &SegmentRead<'_>) {
        self.done_bytes += read.bytes;
        (self.progress)(self.done_bytes, self.total_bytes);
        self.records += read.records;
        let status = match (read.problem, read.tail) {
            (Some(p), _) => format!("damaged: {}", p.verify_reason()),
            (None, Tail::Torn { offset, len }) => {
                let t = format!("torn tail at offset {offset} ({len} bytes; cut on the next read-write open)");
                self.torn_tail = Some(format!("{}: {t}", read.info.path.display()));
                t
            }
            (None, _) => "ok".to_string(),
        };
        self.segments.push(SegmentReport {
            file: read.info.path.clone(),
            first_seq: read.info.first_seq,
            records: read.records,
            bytes: read.bytes,
            status,
        });
    }
}

/// The checks of the log as a whole and of the state its fold ends in.
fn check_fold(wal_dir: &Path, segments: &[SegmentInfo], state: &State, folded: bool, problems: &mut Vec<String>) {
    if segments.is_empty() {
        problems.push(format!("{}: no log segments", wal_dir.display()));
    } else if state.last_seq == 0 && folded {
        // A new ledger's log directory is named only once its first record is durable.
        problems.push(format!(
            "{}: the first record (ledger_created) is not whole: the ledger's identity and config are lost",
            segments[0].path.display()
        ));
    }
    if folded {
        if let Err(e) = state.check_invariants() {
            problems.push(format!("state invariants do not hold after replay: {e}"));
        }
        if state.anomalies > 0 {
            problems.push(format!("{} events did not apply cleanly to the state", state.anomalies));
        }
    }
}

/// Each snapshot's report; a snapshot that is damaged, differs from the log or is ahead of it
/// is a problem.
fn snapshot_reports(
    snaps: &Snapshots,
    snap_status: &BTreeMap<u64, String>,
    last_seq: u64,
    problems: &mut Vec<String>,
) -> Vec<SnapshotReport> {
    let mut reports = Vec::new();
    for (seq, (path, _)) in snaps {
        let status = snap_status.get(seq).cloned().unwrap_or_else(|| {
            if *seq > last_seq {
                "ahead of the log".to_string()
            } else {
                "not checked (the log could not be replayed up to it)".to_string()
            }
        });
        if !status.starts_with("ok") && !status.starts_with("not checked") {
            problems.push(format!("{}: snapshot {status}", path.display()));
        }
        reports.push(SnapshotReport { file: path.clone(), seq: *seq, status });
    }
    reports
}
