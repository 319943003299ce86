//! `verify`: reads every record of every segment and every snapshot without changing anything,
//! folds the whole log, and checks each snapshot against the fold at its sequence number.

use crate::domain::clock::{format_micros, Micros};
use crate::domain::event::Event;
use crate::domain::state::State;
use crate::log::layout::{SNAPSHOT_DIR, WAL_DIR};
use crate::log::segment::{self, Tail};
use crate::log::snapshot;
use crate::log::storage::Storage;
use crate::log::wal;
use crate::{Config, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    pub file: PathBuf,
    pub first_seq: u64,
    pub records: u64,
    pub bytes: u64,
    /// `ok`, `torn tail at offset N (M bytes)` or a description of the damage.
    pub status: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub file: PathBuf,
    pub seq: u64,
    pub status: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// True when nothing is damaged (a torn tail alone is not damage: the next read-write open
    /// cuts it).
    pub ok: bool,
    pub data_dir: PathBuf,
    pub ledger_id: String,
    pub records: u64,
    pub last_seq: u64,
    pub first_event_at: Option<String>,
    pub last_event_at: Option<String>,
    pub segments: Vec<SegmentReport>,
    pub snapshots: Vec<SnapshotReport>,
    pub torn_tail: Option<String>,
    /// Every problem found, each naming file, offset and sequence number where it can.
    pub problems: Vec<String>,
    pub active_allocations: usize,
}

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

pub fn verify(storage: &dyn Storage, dir: &Path, progress: Progress<'_>) -> Result<VerifyReport> {
    let wal_dir = dir.join(WAL_DIR);
    let segments = wal::list_segments(storage, &wal_dir)?;
    let mut problems = Vec::new();
    let mut seg_reports = Vec::new();

    // Snapshots to compare against the fold, by sequence number.
    let mut snaps: BTreeMap<u64, (PathBuf, std::result::Result<State, String>)> = BTreeMap::new();
    for (seq, path) in
        snapshot::list(storage, &dir.join(SNAPSHOT_DIR)).map_err(|e| crate::Error::io("listing snapshots", e))?
    {
        let loaded = match storage.read(&path) {
            // A writer beside us pruned it after we listed it: gone, not damaged.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            read => read.map_err(|e| e.to_string()).and_then(|b| snapshot::decode(&b, seq)),
        };
        snaps.insert(seq, (path, loaded));
    }
    let mut snap_status: BTreeMap<u64, String> = BTreeMap::new();
    for (seq, (_, loaded)) in &snaps {
        if let Err(e) = loaded {
            snap_status.insert(*seq, format!("damaged: {e}"));
        }
    }

    let total_bytes: u64 = segments.iter().map(|s| storage.file_len(&s.path).unwrap_or(0)).sum();
    let mut done_bytes = 0;
    let mut state = State::empty(Config::default());
    let mut folding = true;
    let mut expected_next = 1u64;
    let mut first_ts: Option<Micros> = None;
    let mut records = 0u64;
    let mut torn_tail = None;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        if seg.first_seq != expected_next && folding {
            problems.push(format!(
                "{}: segment starts at sequence number {}, expected {expected_next} (a segment is missing or out of place)",
                seg.path.display(),
                seg.first_seq
            ));
            folding = false;
        }
        let bytes = match storage.read(&seg.path) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{}: cannot read: {e}", seg.path.display()));
                folding = false;
                continue;
            }
        };
        let mut seg_records = 0u64;
        let scan = segment::scan(&seg.path, &bytes, seg.first_seq, &mut |pos, payload| {
            seg_records += 1;
            if !folding {
                return Ok(true);
            }
            let ev = Event::decode(payload)?;
            if pos.seq > 1 && ev.ts_us <= state.last_ts_us {
                return Err(format!("timestamp {} is not after the previous event's", format_micros(ev.ts_us)));
            }
            first_ts.get_or_insert(ev.ts_us);
            state.evolve(pos.seq, ev.ts_us, &ev.body);
            if let Some((_, Ok(snap))) = snaps.get(&pos.seq) {
                let status =
                    if *snap == state { "ok".to_string() } else { "differs from the replayed log".to_string() };
                snap_status.insert(pos.seq, status);
            }
            Ok(true)
        });
        done_bytes += bytes.len() as u64;
        progress(done_bytes, total_bytes);
        records += seg_records;
        let status = match &scan.tail {
            Tail::Clean => "ok".to_string(),
            Tail::Torn { offset, len } if is_last => {
                let t = format!("torn tail at offset {offset} ({len} bytes; cut on the next read-write open)");
                torn_tail = Some(format!("{}: {t}", seg.path.display()));
                t
            }
            Tail::Torn { offset, len } => {
                // A later segment was started only once this one was durable.
                let d = crate::error::Damage {
                    file: seg.path.clone(),
                    offset: *offset,
                    seq: scan.next_seq,
                    reason: format!("incomplete record ({len} bytes) in a segment that is not the last"),
                };
                problems.push(d.to_string());
                folding = false;
                format!("damaged: {}", d.reason)
            }
            Tail::Corrupt(d) => {
                problems.push(d.to_string());
                folding = false;
                format!("damaged: {}", d.reason)
            }
        };
        expected_next = scan.next_seq;
        seg_reports.push(SegmentReport {
            file: seg.path.clone(),
            first_seq: seg.first_seq,
            records: seg_records,
            bytes: bytes.len() as u64,
            status,
        });
    }
    if segments.is_empty() {
        problems.push(format!("{}: no log segments", wal_dir.display()));
    } else if state.last_seq == 0 && folding {
        // A new ledger's log directory is named only once its first record is durable.
        problems.push(format!(
            "{}: the first record (ledger_created) is not whole: the ledger's identity and config are lost",
            segments[0].path.display()
        ));
    }
    if folding {
        if let Err(e) = state.check_invariants() {
            problems.push(format!("state invariants do not hold after replay: {e}"));
        }
        if state.anomalies > 0 {
            problems.push(format!("{} events did not apply cleanly to the state", state.anomalies));
        }
    }
    let mut snapshot_reports = Vec::new();
    for (seq, (path, _)) in &snaps {
        let status = snap_status.get(seq).cloned().unwrap_or_else(|| {
            if *seq > state.last_seq {
                "ahead of the log".to_string()
            } else {
                "not checked (the log could not be replayed up to it)".to_string()
            }
        });
        if status != "ok" && !status.starts_with("not checked") {
            problems.push(format!("{}: snapshot {status}", path.display()));
        }
        snapshot_reports.push(SnapshotReport { file: path.clone(), seq: *seq, status });
    }
    Ok(VerifyReport {
        ok: problems.is_empty(),
        data_dir: dir.to_path_buf(),
        ledger_id: state.ledger_id.clone(),
        records,
        last_seq: state.last_seq,
        first_event_at: first_ts.map(format_micros),
        last_event_at: (state.last_seq > 0).then(|| format_micros(state.last_ts_us)),
        segments: seg_reports,
        snapshots: snapshot_reports,
        torn_tail,
        problems,
        active_allocations: state.active_count(),
    })
}
