//! The bodies of the fuzz targets. Each takes arbitrary bytes, feeds them to one parser of the
//! ledger and checks what must hold whatever the input: no panic, no unbounded allocation, and
//! the parser's own promises (a decoded record re-encodes to the same bytes, a scan's offsets
//! add up, an accepted request decides to a valid event, ...).
//!
//! `fuzz/fuzz_targets/*.rs` call these under libFuzzer (scripts/fuzz.sh);
//! `tests/fuzz_regressions.rs` includes this file and replays every kept crasher and seed
//! through the same functions in the normal test run.

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::testing::record::{self, Decoded};
use allocation_ledger::testing::segment::{self, Tail};
use allocation_ledger::testing::snapshot;
use allocation_ledger::{testing::validate_job_id, ResourceRequest, State};
use allocation_ledger::{AllocationId, AllocationState, Priority};
use allocation_ledger::{Config, Error, ManualClock, Micros};
use allocation_ledger::{Event, EventBody};
use allocation_ledger::{Ledger, OpenOptions};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// 2026-01-01T00:00:00Z, the instant the in-memory ledgers are created at.
const EPOCH_US: Micros = Micros::from_micros(1_767_225_600_000_000);

fn check_invalid_input(e: &Error, what: &str) {
    match e {
        Error::InvalidInput { field, message } => {
            assert!(!field.is_empty(), "{what}: an invalid-input error without a field: {e}");
            assert!(!message.is_empty(), "{what}: an invalid-input error without a message: {e}");
        }
        other => panic!("{what}: expected an invalid-input error, got {other:?}"),
    }
}

/// The record decoder on raw bytes, plus a round trip of the bytes as a payload.
pub fn record_decode(data: &[u8]) {
    if !data.is_empty() {
        match record::decode(data) {
            Decoded::Record { seq, payload, frame_len, durable_lag, chain: _ } => {
                assert_eq!(frame_len, record::HEADER_LEN + payload.len());
                assert!(frame_len <= data.len());
                let mut again = Vec::new();
                record::encode(seq, payload, &mut again);
                if durable_lag > 0 {
                    // A lag past the start of the log is never written, but decodes.
                    let Some(durable_seq) = seq.checked_sub(durable_lag) else { return };
                    record::set_durable_lags(&mut again, durable_seq);
                }
                assert_eq!(&again[..], &data[..frame_len], "a decoded record re-encodes to other bytes");
            }
            Decoded::Incomplete => {
                if data.len() >= record::HEADER_LEN {
                    let len = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize;
                    assert!(record::HEADER_LEN + len > data.len(), "incomplete, but the whole record is there");
                }
            }
            Decoded::Corrupt(reason) => assert!(!reason.is_empty()),
        }
        let _ = record::length_field_damaged(data);
        let _ = record::valid_record_follows(&data[..data.len().min(4096)]);
    }
    // The same bytes as a payload: a frame decodes back to them, every strict prefix of it is
    // incomplete, and no single flipped bit goes unnoticed.
    if !data.is_empty() && data.len() <= 4096 {
        let seq = data.len() as u64 * 7919;
        let mut frame = Vec::new();
        record::encode(seq, data, &mut frame);
        assert_eq!(
            record::decode(&frame),
            Decoded::Record { seq, payload: data, frame_len: frame.len(), durable_lag: 0, chain: None }
        );
        let cut = 1 + data[0] as usize % (frame.len() - 1);
        assert_eq!(record::decode(&frame[..cut]), Decoded::Incomplete);
        let bit = (data[data.len() - 1] as usize * 31 + data.len()) % (frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        assert!(!matches!(record::decode(&frame), Decoded::Record { .. }), "bit {bit} flipped went unnoticed");
    }
}

/// Scans `bytes` as a segment file and checks that offsets, sequence numbers and the tail add up.
fn scan_checked(bytes: &[u8], first_seq: u64) {
    let mut next = first_seq;
    let mut end = segment::decode_header(bytes).map_or(segment::BASE_HEADER_LEN, |h| h.records_offset()) as u64;
    let scan = segment::scan(Path::new("fuzz.wal"), bytes, first_seq, &mut |pos, payload| {
        assert_eq!(pos.seq, next, "records are handed over in sequence");
        // Back to back, but for version 3's zeros up to the sector where a write starts.
        let padded = end.next_multiple_of(segment::SECTOR_BYTES);
        let pad_ok = pos.offset == padded && bytes[end as usize..padded as usize].iter().all(|&b| b == 0);
        assert!(pos.offset == end || pad_ok, "records are back to back");
        end = pos.offset;
        let overhead = if pos.chain.is_some() { record::CHAINED_OVERHEAD } else { record::HEADER_LEN };
        assert_eq!(pos.frame_len as usize, overhead + payload.len());
        next += 1;
        end += u64::from(pos.frame_len);
        Ok(true)
    });
    assert!(scan.valid_len <= bytes.len() as u64);
    assert_eq!(scan.next_seq, next);
    // In a pre-filled (version 2) segment, zeros after the records are free space.
    let zeros_after = |at: u64| scan.version >= 2 && bytes[at as usize..].iter().all(|&b| b == 0);
    match scan.tail {
        Tail::Clean => assert!(
            scan.valid_len == bytes.len() as u64 || zeros_after(scan.valid_len),
            "clean, yet bytes are left over"
        ),
        Tail::Torn { offset, len } => {
            assert!(
                offset + len == bytes.len() as u64 || (offset + len < bytes.len() as u64 && zeros_after(offset + len)),
                "a torn tail runs to the end of the file (or of what was written)"
            );
            assert!(offset == 0 || offset == scan.valid_len);
        }
        Tail::Corrupt(d) => {
            assert!(d.offset <= bytes.len() as u64);
            assert!(!d.reason.is_empty());
        }
    }
}

/// Frames `payloads` as records `1..` of a first segment.
pub fn frame_segment(payloads: &[&[u8]]) -> Vec<u8> {
    let mut seg = segment::encode_header(1, &allocation_ledger::CHAIN_GENESIS).to_vec();
    let mut chain = allocation_ledger::CHAIN_GENESIS;
    for (i, p) in payloads.iter().enumerate() {
        record::encode_chained(i as u64 + 1, p, &mut chain, &mut seg);
    }
    seg
}

/// Opens (read-write, then read-only) a ledger whose only segment is `segment_bytes`, on
/// in-memory storage. Whatever the log holds, opening either fails with an error or gives a
/// ledger whose state keeps its invariants, that takes a write, and that `verify` reads.
fn open_log(segment_bytes: Vec<u8>) {
    let storage = FaultyStorage::new();
    let dir = Path::new("/fuzz");
    storage.put_file(&dir.join("wal").join(segment::file_name(1)), segment_bytes);
    let clock = ManualClock::new(EPOCH_US);
    let opts = OpenOptions::default().storage(Arc::new(storage.clone())).clock(Arc::new(clock.clone()));
    let read_only = Ledger::open_with(dir, OpenOptions { read_only: true, create: false, ..opts.clone() });
    if let Ok(l) = &read_only {
        l.with_state(allocation_ledger::State::check_invariants).expect("a replayed state keeps its invariants");
        let _ = l.get_capacity();
        let _ = l.list_allocations(None, None);
    }
    drop(read_only);
    let Ok(ledger) = Ledger::open_with(dir, opts) else { return };
    ledger.with_state(allocation_ledger::State::check_invariants).expect("a replayed state keeps its invariants");
    let _ = ledger.get_capacity();
    let _ = ledger.list_allocations(None, None);
    clock.advance_seconds(1);
    match ledger.request_resources(&ResourceRequest::new("fuzz").mcp_server("fuzz-mcp")) {
        Ok(_) | Err(Error::InvalidInput { .. }) => {}
        Err(e) => panic!("a write to a replayed ledger failed: {e}"),
    }
    let _ = ledger.cleanup_expired();
    ledger.with_state(allocation_ledger::State::check_invariants).expect("invariants hold after a write");
    drop(ledger);
    let report = allocation_ledger::verify(&storage, dir, &mut |_, _| {}).expect("verify runs");
    let _ = report.ok;
}

/// Segment loading: the bytes as a whole segment file, as the records after a valid header,
/// and as newline-separated payloads framed with good checksums (so the fuzzer reaches event
/// decoding, replay and the fold) in a ledger opened on in-memory storage.
pub fn segment_scan(data: &[u8]) {
    scan_checked(data, 1);
    let mut v1 = segment::encode_header_version(1, 1).to_vec();
    v1.extend_from_slice(data);
    scan_checked(&v1, 1);
    let mut seg = segment::encode_header(1, &allocation_ledger::CHAIN_GENESIS).to_vec();
    seg.extend_from_slice(data);
    scan_checked(&seg, 1);
    let payloads: Vec<&[u8]> = data.split(|&b| b == b'\n').filter(|p| !p.is_empty()).take(64).collect();
    if !payloads.is_empty() {
        open_log(frame_segment(&payloads));
    }
    // And the raw bytes after a valid header, as a ledger's log: torn-tail classification
    // and the cut on open.
    open_log(seg);
}

/// A snapshot file of format `version` around `payload`, with a good checksum, for sequence
/// number `seq`.
pub fn frame_snapshot(version: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(snapshot::HEADER_LEN + payload.len());
    out.extend_from_slice(snapshot::MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..36]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Snapshot loading: the raw bytes as a snapshot file, and the bytes as the payload of a
/// well-formed snapshot, both the JSON of version 2 and the binary of version 3 (so the state
/// rebuild and its checks are reached).
pub fn snapshot_decode(data: &[u8]) {
    let seq = if data.len() >= 24 { u64::from_le_bytes(data[16..24].try_into().unwrap()) } else { 0 };
    if let Ok(state) = snapshot::decode(data, seq) {
        state.check_invariants().expect("a loaded snapshot keeps its invariants");
    }
    let json_seq = serde_json::from_slice::<Value>(data).ok().and_then(|v| v.get("last_seq")?.as_u64());
    // A v3 payload names its sequence number in the JSON meta part after the 8-byte length.
    let meta_seq = data.get(8..).and_then(|rest| {
        let meta_len = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
        serde_json::from_slice::<Value>(rest.get(..meta_len)?).ok()?.get("last_seq")?.as_u64()
    });
    snapshot_payload(2, json_seq.unwrap_or(0), data);
    snapshot_payload(3, meta_seq.unwrap_or(0), data);
}

fn snapshot_payload(version: u32, seq: u64, data: &[u8]) {
    let framed = frame_snapshot(version, seq, data);
    if let Ok(state) = snapshot::decode(&framed, seq) {
        state.check_invariants().expect("a loaded snapshot keeps its invariants");
        let again = snapshot::decode(&snapshot::encode(&state.to_data()), seq).expect("a re-encoded snapshot loads");
        assert_eq!(again, state, "a snapshot does not survive a round trip");
        let _ = state.capacity(state.last_ts_us);
        let _ = state.list(None, None, state.last_ts_us);
    }
}

/// Event deserialisation: decode, round trip, and replay after a `ledger_created`.
pub fn event_decode(data: &[u8]) {
    let Ok(ev) = Event::decode(data) else { return };
    let again = Event::decode(&ev.encode()).expect("a decoded event re-encodes to a decodable one");
    assert_eq!(again, ev, "an event does not survive a round trip");
    let _ = ev.body.type_name();
    let _ = ev.body.allocation_id();
    let created = Event::new(
        EPOCH_US - 1_000_000,
        EventBody::LedgerCreated {
            ledger_id: "00000000-0000-4000-8000-000000000000".into(),
            config: Config::default(),
        },
    )
    .encode();
    if matches!(ev.body, EventBody::LedgerCreated { .. }) {
        open_log(frame_segment(&[data]));
    }
    open_log(frame_segment(&[&created, data]));
}

/// The MCP tools' arguments: `request_resources` arguments through `ResourceRequest::from_json`
/// and the decision, and every string argument through the parsers of ids, states, priorities
/// and job ids that the other tools use.
pub fn mcp_args(data: &[u8]) {
    let Ok(Value::Object(args)) = serde_json::from_slice::<Value>(data) else { return };
    match ResourceRequest::from_json(&args) {
        Ok(req) => {
            let mut state = State::empty(Config::default());
            let created = EventBody::LedgerCreated { ledger_id: "fuzz".into(), config: Config::default() };
            state.evolve(1, EPOCH_US, &created);
            match state.decide_request(&req, EPOCH_US + 1, AllocationId::from_u64(1)) {
                Ok(body) => {
                    assert!(matches!(body, EventBody::Granted(_) | EventBody::Rejected(_)));
                    let payload = Event::new(EPOCH_US + 1, body).encode();
                    assert!(payload.len() <= record::MAX_PAYLOAD_LEN, "an accepted request makes an oversized event");
                    let ev = Event::decode(&payload).expect("a decided event decodes");
                    state.evolve(2, ev.ts_us, &ev.body);
                    assert_eq!(state.anomalies, 0);
                    state.check_invariants().expect("invariants hold after a decided event");
                }
                Err(e) => check_invalid_input(&e, "decide_request"),
            }
        }
        Err(e) => check_invalid_input(&e, "ResourceRequest::from_json"),
    }
    for value in args.values() {
        if let Value::String(s) = value {
            for r in [
                AllocationId::parse("allocation_id", s).map(drop),
                AllocationState::parse("state", s).map(drop),
                Priority::parse("priority", s).map(drop),
                validate_job_id("job_id", s),
            ] {
                if let Err(e) = r {
                    check_invalid_input(&e, "string argument");
                }
            }
        }
    }
}

/// Config files: parse, validate, and build a state from what was accepted.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_json(text) {
        Ok(config) => {
            config.validate().expect("an accepted config validates");
            let again = Config::from_json(&serde_json::to_string(&config).unwrap()).expect("round trip");
            assert_eq!(again, config);
            let state = State::empty(config);
            state.check_invariants().expect("an empty state keeps its invariants");
        }
        Err(e) => check_invalid_input(&e, "Config::from_json"),
    }
}
