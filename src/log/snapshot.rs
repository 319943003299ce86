//! Snapshots: the folded state at a sequence number, so that opening replays only the tail.
//!
//! ```text
//! | magic "ALLOCSNP" | version: u32 LE | flags: u32 LE (0) | seq: u64 LE | payload_len: u64 LE | reserved: u32 (0) | crc: u32 LE | payload |
//! ```
//!
//! `crc` covers the 36 header bytes before it and the payload. Files are named
//! `<seq:020>.snap` and written atomically. Version 3 (written now) has a binary payload:
//!
//! ```text
//! | meta_len: u64 LE | meta: JSON (everything but the allocations, plus the log position) |
//! | count: u64 LE | count allocations, each in the binary layout of `put_allocation` |
//! ```
//!
//! Version 2 (still read) has the JSON of the state (`StateData`) as its payload. `docs/format.md`
//! describes both.

use crate::domain::clock::Micros;
use crate::domain::event::{McpGrant, RejectReason, WorkerGrant};
use crate::domain::idempotency::{ChunkHandle, KeyRecord, KeyView, SharedKeys};
use crate::domain::model::{AllocationId, AllocationState, Metadata, Priority, Resources};
use crate::domain::state::{Allocation, State, StateData, StateLoader};
use crate::log::fields;
use crate::log::storage::{write_atomic, Storage};
use crate::log::wal::LogPosition;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"ALLOCSNP";
/// 2: allocations carry `ended_seq` and the state records how many ended ones were evicted.
/// 3: binary allocations after a JSON meta part that also records the log position.
/// 4: allocations may carry `max_lifetime_seconds` and `renewals` (two new flags), and the meta
/// part the idempotency keys.
/// 5: compact key records (varint deltas; the allocation id implied by the sequence number).
/// 6: allocations may carry `preemptible: false` and a preemption mark (two new flags), and the
/// meta part the preemptions in grace.
pub const FORMAT_VERSION: u32 = 7;
/// The first version with the binary payload (3 and 4 share the decoder: 4 adds flags).
const BINARY_PAYLOAD_VERSION: u32 = 3;
/// Oldest version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 2;
/// The last version whose payload is the state's JSON.
const JSON_PAYLOAD_VERSION: u32 = 2;
/// Bytes of a snapshot header (`SnapshotHeader::LEN`); the payload follows.
pub const HEADER_LEN: usize = SnapshotHeader::LEN;
/// The file name extension of snapshots.
pub const EXTENSION: &str = "snap";
/// Digits of the sequence number in a snapshot's file name (zero-padded).
const FILE_NAME_DIGITS: usize = 20;
/// Limits on what one decoded allocation may claim, so damaged counts fail fast instead of
/// allocating wildly (CRC makes this nearly impossible; a crafted file is the remaining case).
const MAX_LIST_ITEMS: u32 = 1 << 20;
/// At most this many items of a decoded list are allocated for before they are read: a count
/// is only believed as far as the bytes that follow bear it out.
const MAX_PREALLOCATED_ITEMS: usize = 1024;

/// The file name of the snapshot of the state at `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{seq:0FILE_NAME_DIGITS$}.{EXTENSION}")
}

/// The sequence number a snapshot file name stands for.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    if stem.len() != FILE_NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A snapshot header (`docs/format.md`, "Snapshots"); the same layout in every version read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Format version of the payload.
    pub version: u32,
    /// Written 0; not checked on reading (the checksum covers it).
    pub flags: u32,
    /// The last event folded in; equals the number in the file name.
    pub seq: u64,
    /// Bytes of payload after the header.
    pub payload_len: u64,
    /// Written 0; not checked on reading (the checksum covers it).
    pub reserved: u32,
    /// CRC-32 over the header's bytes before it, then the payload.
    pub crc: u32,
}

impl SnapshotHeader {
    /// Where [`MAGIC`] sits.
    pub const MAGIC_OFFSET: usize = 0;
    /// Where the format version sits.
    pub const VERSION_OFFSET: usize = Self::MAGIC_OFFSET + MAGIC.len();
    /// Where the flags sit.
    pub const FLAGS_OFFSET: usize = Self::VERSION_OFFSET + size_of::<u32>();
    /// Where the sequence number sits.
    pub const SEQ_OFFSET: usize = Self::FLAGS_OFFSET + size_of::<u32>();
    /// Where the payload length sits.
    pub const PAYLOAD_LEN_OFFSET: usize = Self::SEQ_OFFSET + size_of::<u64>();
    /// Where the reserved field sits.
    pub const RESERVED_OFFSET: usize = Self::PAYLOAD_LEN_OFFSET + size_of::<u64>();
    /// Where the checksum sits; it covers the bytes before it and the payload.
    pub const CRC_OFFSET: usize = Self::RESERVED_OFFSET + size_of::<u32>();
    /// Bytes of the header.
    pub const LEN: usize = Self::CRC_OFFSET + size_of::<u32>();

    /// The header of a snapshot of `version` at `seq` around `payload`, checksummed.
    pub fn sealed(version: u32, seq: u64, payload: &[u8]) -> Self {
        let mut header =
            SnapshotHeader { version, flags: 0, seq, payload_len: payload.len() as u64, reserved: 0, crc: 0 };
        let mut crc = header.checksum_start();
        crc.update(payload);
        header.crc = crc.finalize();
        header
    }

    /// The checksum over the header's covered bytes, to be continued with the payload.
    pub fn checksum_start(&self) -> crc32fast::Hasher {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.encode()[..Self::CRC_OFFSET]);
        crc
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut raw = [0; Self::LEN];
        fields::put(&mut raw, Self::MAGIC_OFFSET, *MAGIC);
        fields::put(&mut raw, Self::VERSION_OFFSET, self.version.to_le_bytes());
        fields::put(&mut raw, Self::FLAGS_OFFSET, self.flags.to_le_bytes());
        fields::put(&mut raw, Self::SEQ_OFFSET, self.seq.to_le_bytes());
        fields::put(&mut raw, Self::PAYLOAD_LEN_OFFSET, self.payload_len.to_le_bytes());
        fields::put(&mut raw, Self::RESERVED_OFFSET, self.reserved.to_le_bytes());
        fields::put(&mut raw, Self::CRC_OFFSET, self.crc.to_le_bytes());
        raw
    }

    /// The header at the start of `bytes`, if they are long enough and start with [`MAGIC`];
    /// the rest is the caller's to check (it needs the payload and the file name).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let raw = fields::prefix::<{ Self::LEN }>(bytes)
            .map_err(|e| format!("snapshot is {} bytes, shorter than its header", e.got))?;
        if fields::get(raw, Self::MAGIC_OFFSET) != *MAGIC {
            return Err("not a snapshot file (bad magic)".into());
        }
        Ok(SnapshotHeader {
            version: fields::u32_at(raw, Self::VERSION_OFFSET),
            flags: fields::u32_at(raw, Self::FLAGS_OFFSET),
            seq: fields::u64_at(raw, Self::SEQ_OFFSET),
            payload_len: fields::u64_at(raw, Self::PAYLOAD_LEN_OFFSET),
            reserved: fields::u32_at(raw, Self::RESERVED_OFFSET),
            crc: fields::u32_at(raw, Self::CRC_OFFSET),
        })
    }

    /// The version, checked against what this build reads.
    fn readable_version(&self) -> Result<u32, String> {
        let version = self.version;
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "snapshot format version {version} is not supported (this build reads {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
            ));
        }
        Ok(version)
    }

    /// The sequence number, checked against the file name's.
    fn named_seq(&self, expected_seq: u64) -> Result<u64, String> {
        if self.seq != expected_seq {
            return Err(format!("snapshot header says sequence number {}, its name says {expected_seq}", self.seq));
        }
        Ok(self.seq)
    }
}

const _: () = assert!(SnapshotHeader::LEN == 40, "docs/format.md: a snapshot header is 40 bytes");
const _: () = assert!(SnapshotHeader::CRC_OFFSET == 36 && SnapshotHeader::PAYLOAD_LEN_OFFSET == 24);

/// The JSON part of a v3 snapshot.
#[derive(Serialize)]
struct MetaOut<'a> {
    ledger_id: &'a str,
    created_us: Micros,
    config: &'a crate::domain::config::Config,
    last_seq: u64,
    last_ts_us: Micros,
    evicted: u64,
    assigned_mcp_endpoints: &'a BTreeMap<String, String>,
    assigned_mcp_count: u64,
    log_position: Option<LogPosition>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    reservations: &'a [crate::domain::reservation::Reservation],
    queue: &'a [crate::domain::queue::QueueEntry],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    preemptions: &'a [crate::domain::preempt::PendingPreemption],
}

#[derive(Deserialize)]
struct MetaIn {
    ledger_id: String,
    created_us: Micros,
    config: crate::domain::config::Config,
    last_seq: u64,
    last_ts_us: Micros,
    evicted: u64,
    assigned_mcp_endpoints: BTreeMap<String, String>,
    assigned_mcp_count: u64,
    #[serde(default)]
    reservations: Vec<crate::domain::reservation::Reservation>,
    #[serde(default)]
    log_position: Option<LogPosition>,
    #[serde(default)]
    queue: Vec<crate::domain::queue::QueueEntry>,
    #[serde(default)]
    preemptions: Vec<crate::domain::preempt::PendingPreemption>,
}

/// A v3 snapshot of `state` without a log position.
#[cfg(any(test, feature = "test-util"))]
pub fn encode(state: &StateData) -> Vec<u8> {
    encode_with_position(state, None)
}

/// A v3 snapshot; `position` is where the record `state.last_seq` sits in the log, so opening
/// can resume reading right after it (a position for another record makes the file invalid).
#[cfg(any(test, feature = "test-util"))]
pub fn encode_with_position(state: &StateData, position: Option<LogPosition>) -> Vec<u8> {
    encode_parts(state, &state.allocations, position)
}

/// Like [`encode_with_position`], with the allocations given apart from the rest of `state`
/// (whose own `allocations` are ignored): a ledger snapshots shared ones, without copying.
#[cfg(any(test, feature = "test-util"))]
pub fn encode_parts<A: std::borrow::Borrow<Allocation>>(
    state: &StateData,
    allocations: &[A],
    position: Option<LogPosition>,
) -> Vec<u8> {
    let keys = state.idempotency_keys.iter().map(KeyRecord::view);
    encode_with(state, allocations, |out, ledger_key| put_keys(out, ledger_key, keys), position, put_allocation)
}

/// The snapshot of `state` with `allocations`, each written by `put`, and the idempotency keys
/// written by `put_keys` (given the ledger's key).
fn encode_with<A: std::borrow::Borrow<Allocation>>(
    state: &StateData,
    allocations: &[A],
    put_keys: impl FnOnce(&mut Vec<u8>, u64),
    position: Option<LogPosition>,
    mut put: impl FnMut(&mut Vec<u8>, &Allocation),
) -> Vec<u8> {
    #[allow(clippy::expect_used, reason = "plain fields and a map with string keys always serialize")]
    let meta = serde_json::to_vec(&MetaOut {
        ledger_id: &state.ledger_id,
        created_us: state.created_us,
        config: &state.config,
        last_seq: state.last_seq,
        last_ts_us: state.last_ts_us,
        evicted: state.evicted,
        assigned_mcp_endpoints: &state.assigned_mcp_endpoints,
        assigned_mcp_count: state.assigned_mcp_count,
        log_position: position,
        reservations: &state.reservations,
        queue: &state.queue,
        preemptions: &state.preemptions,
    })
    .expect("snapshot meta serializes");
    // The payload goes straight after room for the header (filled in last): a large state's
    // payload is not copied a second time.
    let mut out = Vec::with_capacity(
        HEADER_LEN + PAYLOAD_COUNTS_BYTES + meta.len() + allocations.len() * TYPICAL_ALLOCATION_BYTES,
    );
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&(allocations.len() as u64).to_le_bytes());
    for a in allocations {
        put(&mut out, a.borrow());
    }
    put_keys(&mut out, AllocationId::ledger_key(&state.ledger_id));
    seal(FORMAT_VERSION, state.last_seq, out)
}

/// Room reserved in an encoding buffer for the payload's meta length and count (16 bytes),
/// rounded up.
const PAYLOAD_COUNTS_BYTES: usize = 64;
/// Room reserved in an encoding buffer per allocation: a guess that covers most without
/// reallocating (one with a few workers and MCP servers and no metadata).
const TYPICAL_ALLOCATION_BYTES: usize = 256;

/// Each allocation's encoding in the last snapshot, reused by the next while the allocation
/// is unchanged: an active allocation that never changes would otherwise be encoded again by
/// every snapshot. An allocation changes only when it ends (its state and `ended_seq`; see
/// `State::apply_end`), and ids never repeat within a ledger, so id, state and `ended_seq`
/// name its encoding. Holds the allocations of the last snapshot only, in snapshot order
/// (`state::sort_for_snapshot`), so the next snapshot finds them by walking both lists in
/// step rather than by hashing every id.
///
/// It keeps the encoding of each whole chunk of idempotency keys too (see
/// `KeyChunk` in `domain/idempotency.rs`): a key never changes once decided, and the window
/// holds many more keys than a snapshot interval adds, so most of them were encoded last time.
#[derive(Debug, Default)]
pub struct EncodingCache {
    entries: Vec<CachedEncoding>,
    keys: Vec<CachedKeys>,
}

/// The encoding of one whole chunk of keys, and what it was encoded after: key records are
/// deltas from the key before, so the bytes hold only after the same one.
#[derive(Debug)]
struct CachedKeys {
    chunk: ChunkHandle,
    before: KeyCursor,
    after: KeyCursor,
    count: u64,
    bytes: Box<[u8]>,
}

#[derive(Debug)]
struct CachedEncoding {
    /// The snapshot order's key.
    created_us: Micros,
    id: u64,
    state: AllocationState,
    ended_seq: Option<u64>,
    renewals: u32,
    preempt: Option<crate::domain::preempt::PreemptMark>,
    bytes: Box<[u8]>,
}

#[cfg(any(test, feature = "test-util"))]
impl EncodingCache {
    /// Allocations whose encoding is kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No encoding is kept (no snapshot yet, or the last one had no allocations).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// [`encode_parts`], reusing (and then replacing) `cache`: the same bytes. `allocations` must be
/// in snapshot order (`state::sort_for_snapshot`); the reuse depends on it, the bytes do not.
/// The idempotency keys are `keys` (those in `state` are ignored): a ledger encodes them from
/// its shared table, without copying them into records first.
pub fn encode_parts_cached<A: std::borrow::Borrow<Allocation>>(
    state: &StateData,
    allocations: &[A],
    keys: &SharedKeys,
    position: Option<LogPosition>,
    cache: &mut EncodingCache,
) -> Vec<u8> {
    let mut next = Vec::with_capacity(allocations.len());
    let mut old = std::mem::take(&mut cache.entries).into_iter().peekable();
    let old_keys = std::mem::take(&mut cache.keys);
    let mut next_keys = Vec::with_capacity(old_keys.len() + 1);
    let put_keys = |out: &mut Vec<u8>, ledger_key| {
        put_keys_cached(out, ledger_key, keys, old_keys, &mut next_keys);
    };
    let bytes = encode_with(state, allocations, put_keys, position, |payload, a| {
        let key = (a.created_us, a.id.as_u64());
        // Entries before this one belong to allocations that left the state.
        while old.next_if(|c| (c.created_us, c.id) < key).is_some() {}
        match old.next_if(|c| (c.created_us, c.id) == key) {
            Some(c)
                if c.state == a.state
                    && c.ended_seq == a.ended_seq
                    && c.renewals == a.renewals
                    && c.preempt == a.preempt =>
            {
                debug_assert!(
                    {
                        let mut fresh = Vec::new();
                        put_allocation(&mut fresh, a);
                        fresh[..] == c.bytes[..]
                    },
                    "allocation {} changed without ending",
                    a.id
                );
                payload.extend_from_slice(&c.bytes);
                next.push(c);
            }
            _ => {
                let start = payload.len();
                put_allocation(payload, a);
                let bytes = payload[start..].into();
                next.push(CachedEncoding {
                    created_us: key.0,
                    id: key.1,
                    state: a.state,
                    ended_seq: a.ended_seq,
                    renewals: a.renewals,
                    preempt: a.preempt,
                    bytes,
                });
            }
        }
    });
    debug_assert!(next.windows(2).all(|w| (w[0].created_us, w[0].id) < (w[1].created_us, w[1].id)));
    cache.entries = next;
    cache.keys = next_keys;
    bytes
}

/// The v2 (JSON) encoding, kept so tests can write what older builds wrote.
#[cfg(any(test, feature = "test-util"))]
pub fn encode_v2(state: &StateData) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    #[allow(clippy::expect_used, reason = "the state's fields always serialize")]
    serde_json::to_writer(&mut out, state).expect("state serializes");
    seal(JSON_PAYLOAD_VERSION, state.last_seq, out)
}

/// Fills in the header of `out`, whose first `HEADER_LEN` bytes are room for it and the rest
/// the payload.
fn seal(version: u32, seq: u64, mut out: Vec<u8>) -> Vec<u8> {
    debug_assert!(out.len() >= HEADER_LEN, "room for the header");
    if let Some((room, payload)) = out.split_first_chunk_mut::<HEADER_LEN>() {
        *room = SnapshotHeader::sealed(version, seq, payload).encode();
    }
    out
}

/// Checks and loads a snapshot; `expected_seq` comes from the file name.
pub fn decode(bytes: &[u8], expected_seq: u64) -> Result<State, String> {
    decode_with_position(bytes, expected_seq).map(|(s, _)| s)
}

/// Like [`decode`], also returning the log position the snapshot recorded (v3 only).
pub fn decode_with_position(bytes: &[u8], expected_seq: u64) -> Result<(State, Option<LogPosition>), String> {
    let header = SnapshotHeader::decode(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let len = header.payload_len;
    if len != payload.len() as u64 {
        return Err(format!("snapshot payload should be {len} bytes, file holds {}", payload.len()));
    }
    let mut crc = header.checksum_start();
    crc.update(payload);
    if crc.finalize() != header.crc {
        return Err("snapshot checksum mismatch".into());
    }
    let version = header.readable_version()?;
    let seq = header.named_seq(expected_seq)?;
    if version == JSON_PAYLOAD_VERSION {
        let data: StateData =
            serde_json::from_slice(payload).map_err(|e| format!("snapshot payload does not decode: {e}"))?;
        if data.last_seq != seq {
            return Err("snapshot payload disagrees with its header".into());
        }
        let state = State::from_data(data).map_err(|e| format!("snapshot state is inconsistent: {e}"))?;
        return Ok((state, None));
    }
    decode_v3_payload(payload, seq, version)
}

fn decode_v3_payload(payload: &[u8], seq: u64, version: u32) -> Result<(State, Option<LogPosition>), String> {
    let mut r = Reader { bytes: payload, at: 0 };
    let loaded = decode_v3(&mut r, payload.len(), seq, version)?;
    if r.at != payload.len() {
        return Err(format!("{} bytes follow the last allocation", payload.len() - r.at));
    }
    Ok(loaded)
}

/// The v3 or v4 payload from `r`, which holds `payload_len` bytes.
fn decode_v3(
    r: &mut impl Source,
    payload_len: usize,
    seq: u64,
    version: u32,
) -> Result<(State, Option<LogPosition>), String> {
    let meta_len = r.u64()?;
    let meta_len = usize::try_from(meta_len).ok().filter(|&l| l <= payload_len).ok_or("meta length overflows")?;
    let meta: MetaIn =
        serde_json::from_slice(r.take(meta_len)?).map_err(|e| format!("snapshot meta does not decode: {e}"))?;
    let ledger_key = AllocationId::ledger_key(&meta.ledger_id);
    if meta.last_seq != seq || meta.log_position.is_some_and(|p| p.seq != seq) {
        return Err("snapshot payload disagrees with its header".into());
    }
    let count = r.u64()?;
    if count > (payload_len / MIN_ALLOCATION_BOUND_BYTES) as u64 {
        return Err(format!("snapshot claims {count} allocations, more than its {payload_len} bytes can hold"));
    }
    let data = StateData {
        ledger_id: meta.ledger_id,
        created_us: meta.created_us,
        config: meta.config,
        last_seq: meta.last_seq,
        last_ts_us: meta.last_ts_us,
        allocations: Vec::new(),
        evicted: meta.evicted,
        assigned_mcp_endpoints: meta.assigned_mcp_endpoints,
        assigned_mcp_count: meta.assigned_mcp_count,
        idempotency_keys: Vec::new(),
        reservations: meta.reservations,
        queue: meta.queue,
        preemptions: meta.preemptions,
    };
    let inconsistent = |e: String| format!("snapshot state is inconsistent: {e}");
    let mut loader = StateLoader::new(data, count as usize).map_err(inconsistent)?;
    for i in 0..count {
        let a = get_allocation(r).map_err(|e| format!("allocation {i} at byte {}: {e}", r.at()))?;
        loader.add(a).map_err(inconsistent)?;
    }
    if version >= KEYS_VERSION {
        let keys = if version >= COMPACT_KEYS_VERSION {
            get_keys(r, payload_len, ledger_key, version)
        } else {
            get_keys_v4(r, payload_len)
        };
        let keys = keys.map_err(|e| format!("idempotency keys at byte {}: {e}", r.at()))?;
        loader.set_idempotency_keys(keys).map_err(inconsistent)?;
    }
    Ok((loader.finish().map_err(inconsistent)?, meta.log_position))
}

/// The first version whose payload ends with the idempotency keys.
const KEYS_VERSION: u32 = 4;
/// The first version with compact key records (varint deltas, implied allocation ids).
const COMPACT_KEYS_VERSION: u32 = 5;
/// On-disk codes of a key's rejection reason: 0 granted, else 1 + the index here. Never
/// reorder; only append.
const REJECT_CODES: [RejectReason; 7] = [
    RejectReason::InsufficientWorkers,
    RejectReason::InsufficientCpu,
    RejectReason::InsufficientMemory,
    RejectReason::Quota,
    RejectReason::Reserved,
    RejectReason::QueueTimeout,
    RejectReason::Cancelled,
];
/// The fewest bytes a version 4 key record takes (an empty key).
const MIN_KEY_BYTES_V4: usize = STR_LEN_BYTES + 8 + 8 + 8 + 1 + 8;
/// The fewest bytes a version 5 key record takes (an empty key, one-byte deltas, the implied
/// allocation id).
const MIN_KEY_BYTES: usize = 1 + 1 + 1 + 1 + 8;
/// The first version whose key records start with their flags and store a key that is a
/// canonical UUID as its 16 bytes.
const UUID_KEYS_VERSION: u32 = 7;
/// Set in a version 5 key record's flags when the allocation id is the one its sequence
/// number gives (`AllocationId::for_seq`), which is every id this build decides; the id is
/// then not stored.
const KEY_ID_FROM_SEQ: u8 = 0x80;
/// Set in a version 7 key record's flags when the key is a canonical UUID (36 characters:
/// lowercase hex digits, hyphens after the 8th, 12th, 16th and 20th) stored as its 16 bytes:
/// the key clients most often send, in 17 bytes instead of 37.
const KEY_IS_UUID: u8 = 0x40;
/// The bits of a key record's flags that hold its rejection code: 7 bits in versions 5 and 6,
/// 6 from version 7 on.
const KEY_REJECT_MASK_V5: u8 = 0x7f;
const KEY_REJECT_MASK: u8 = 0x3f;
const _: () = assert!(REJECT_CODES.len() < KEY_REJECT_MASK as usize);
const _: () = assert!(KEY_IS_UUID & KEY_REJECT_MASK == 0 && KEY_IS_UUID & KEY_ID_FROM_SEQ == 0);

/// [`put_keys_cached`] with no cache, from any run of keys.
#[cfg(any(test, feature = "test-util"))]
fn put_keys<'k>(out: &mut Vec<u8>, ledger_key: u64, keys: impl IntoIterator<Item = KeyView<'k>>) {
    let count_at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    let mut cursor = KeyCursor { ledger_key, ts_us: 0, seq: 0 };
    let mut count = 0u64;
    for k in keys {
        put_key(out, &mut cursor, k);
        count += 1;
    }
    out[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
}

/// The idempotency keys (version 7), oldest first: `count u64`, then each key's record
/// ([`put_key`]). Binary, not in the JSON meta, and compact: a busy window holds hundreds of
/// thousands of keys, which every snapshot copies (a UUID key takes about 30 bytes, other
/// 38-byte keys about 52, against 77 in version 4). The count is written last, where room was
/// left for it, so the keys are read once, straight from the table.
///
/// The keys come chunk by chunk: a whole chunk whose encoding `old` holds (encoded after the
/// same key) is copied from there. `next` gets the encoding of every whole chunk,
/// for the next snapshot; a chunk that left the window or changed (copied on write, so a new
/// chunk) is not found again and its encoding is dropped. Returns how many chunks were copied.
fn put_keys_cached(
    out: &mut Vec<u8>,
    ledger_key: u64,
    keys: &SharedKeys,
    mut old: Vec<CachedKeys>,
    next: &mut Vec<CachedKeys>,
) -> usize {
    let count_at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    let mut cursor = KeyCursor { ledger_key, ts_us: 0, seq: 0 };
    let mut count = 0u64;
    // Chunks come in queue order, and so do the cached ones: the search resumes after the
    // last one found.
    let (mut from, mut reused) = (0, 0);
    for chunk in keys.chunks() {
        let whole = chunk.is_whole();
        let found =
            if whole { old[from..].iter().position(|c| chunk.is(&c.chunk) && c.before == cursor) } else { None };
        if let Some(i) = found {
            let cached = &mut old[from + i];
            from += i + 1;
            debug_assert!(
                {
                    let (mut fresh, mut c) = (Vec::new(), cursor);
                    chunk.views().for_each(|k| put_key(&mut fresh, &mut c, k));
                    fresh[..] == cached.bytes[..] && c == cached.after
                },
                "a whole chunk of keys changed while its encoding was kept"
            );
            out.extend_from_slice(&cached.bytes);
            count += cached.count;
            cursor = cached.after;
            next.push(CachedKeys { bytes: std::mem::take(&mut cached.bytes), chunk: chunk.handle(), ..*cached });
            reused += 1;
            continue;
        }
        let (start, before, count_before) = (out.len(), cursor, count);
        for k in chunk.views() {
            put_key(out, &mut cursor, k);
            count += 1;
        }
        if whole {
            let bytes = out[start..].into();
            next.push(CachedKeys { chunk: chunk.handle(), before, after: cursor, count: count - count_before, bytes });
        }
    }
    out[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
    reused
}

/// Where a run of key records stands: the ledger's key (which implied allocation ids depend
/// on) and the timestamp and sequence number of the key before (which the next one's deltas
/// are from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyCursor {
    ledger_key: u64,
    ts_us: i64,
    seq: u64,
}

/// One version 7 key record, after the key `cursor` stands at: `flags u8 | key | ts_delta
/// varint (zigzag, from the previous key's, the first from 0) | seq_delta varint (zigzag, the
/// same way) | [allocation_id u64] | fingerprint u64`, where `key` is the 16 bytes of a
/// canonical UUID when `flags` has [`KEY_IS_UUID`], else `key_len varint | key`. `flags` holds
/// the rejection code (0 granted, else 1 + reason code), [`KEY_ID_FROM_SEQ`] and
/// [`KEY_IS_UUID`].
fn put_key(out: &mut Vec<u8>, cursor: &mut KeyCursor, k: KeyView<'_>) {
    let code = k.rejected.and_then(|r| REJECT_CODES.iter().position(|c| *c == r)).map_or(0, |i| i as u8 + 1);
    let implied = k.seq <= AllocationId::MAX && AllocationId::for_seq(cursor.ledger_key, k.seq) == k.allocation_id;
    let uuid = canonical_uuid(k.key);
    out.push(code | if implied { KEY_ID_FROM_SEQ } else { 0 } | if uuid.is_some() { KEY_IS_UUID } else { 0 });
    if let Some(bytes) = uuid {
        out.extend_from_slice(&bytes);
    } else {
        put_varint(out, k.key.len() as u64);
        out.extend_from_slice(k.key.as_bytes());
    }
    put_varint(out, zigzag(k.ts_us.as_micros().wrapping_sub(cursor.ts_us)));
    put_varint(out, zigzag(k.seq.wrapping_sub(cursor.seq) as i64));
    (cursor.ts_us, cursor.seq) = (k.ts_us.as_micros(), k.seq);
    if !implied {
        out.extend_from_slice(&k.allocation_id.as_u64().to_le_bytes());
    }
    out.extend_from_slice(&k.fingerprint.to_le_bytes());
}

/// The 16 bytes of `key` if it is a UUID in canonical form (lowercase, hyphenated), which
/// [`uuid_key`] gives back exactly; `None` for anything else (uppercase hex included).
fn canonical_uuid(key: &str) -> Option<[u8; 16]> {
    // uuid's parser is table-driven; of the forms it accepts only the hyphenated one has 36
    // characters, and it accepts upper-case hex, which would not read back as written.
    let b = key.as_bytes();
    if b.len() != uuid::fmt::Hyphenated::LENGTH || b.iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    uuid::Uuid::try_parse_ascii(b).ok().map(uuid::Uuid::into_bytes)
}

/// The canonical form of the UUID whose bytes are `bytes`.
fn uuid_key(bytes: [u8; 16]) -> std::sync::Arc<str> {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    (&*uuid::Uuid::from_bytes(bytes).hyphenated().encode_lower(&mut buf)).into()
}

/// The compact key records of version 5 to 7 (see [`put_key`]; versions 5 and 6 put the
/// flags after the deltas and store every key as `key_len varint | key`).
fn get_keys(r: &mut impl Source, payload_len: usize, ledger_key: u64, version: u32) -> Result<Vec<KeyRecord>, String> {
    let count = key_count(r, payload_len, MIN_KEY_BYTES)?;
    let mut keys = Vec::with_capacity(count.min(MAX_PREALLOCATED_ITEMS));
    let flags_first = version >= UUID_KEYS_VERSION;
    let reject_mask = if flags_first { KEY_REJECT_MASK } else { KEY_REJECT_MASK_V5 };
    let (mut ts_before, mut seq_before) = (0i64, 0u64);
    for _ in 0..count {
        let early_flags = if flags_first { Some(r.u8()?) } else { None };
        let key = match early_flags {
            Some(flags) if flags & KEY_IS_UUID != 0 => {
                uuid_key(r.take(16)?.try_into().map_err(|_| "a UUID key is 16 bytes")?)
            }
            _ => {
                let len =
                    usize::try_from(r.varint()?).ok().filter(|&l| l <= payload_len).ok_or("key length overflows")?;
                std::str::from_utf8(r.take(len)?).map_err(|e| format!("invalid UTF-8: {e}"))?.into()
            }
        };
        let ts_us = ts_before.wrapping_add(unzigzag(r.varint()?));
        let seq = seq_before.wrapping_add(unzigzag(r.varint()?) as u64);
        (ts_before, seq_before) = (ts_us, seq);
        let flags = match early_flags {
            Some(flags) => flags,
            None => r.u8()?,
        };
        let allocation_id = if flags & KEY_ID_FROM_SEQ == 0 {
            let id = r.u64()?;
            if id > AllocationId::MAX {
                return Err(format!("allocation id {id} beyond 48 bits"));
            }
            AllocationId::from_u64(id)
        } else if seq <= AllocationId::MAX {
            AllocationId::for_seq(ledger_key, seq)
        } else {
            return Err(format!("sequence number {seq} beyond 48 bits"));
        };
        let rejected = match flags & reject_mask {
            0 => None,
            code => Some(from_code(&REJECT_CODES, code - 1, "rejection reason")?),
        };
        let ts_us = Micros::from_micros(ts_us);
        keys.push(KeyRecord { key, ts_us, seq, allocation_id, rejected, fingerprint: r.u64()? });
    }
    Ok(keys)
}

/// The key count, checked against what the payload can hold.
fn key_count(r: &mut impl Source, payload_len: usize, min_key_bytes: usize) -> Result<usize, String> {
    let count = r.u64()?;
    if count > (payload_len / min_key_bytes) as u64 {
        return Err(format!("{count} keys claimed, more than the payload can hold"));
    }
    Ok(count as usize)
}

/// The version 4 key records: `count u64`, then each `key str | ts_us i64 | seq u64 |
/// allocation_id u64 | rejected u8 (0 granted, else 1 + reason code) | fingerprint u64`.
fn get_keys_v4(r: &mut impl Source, payload_len: usize) -> Result<Vec<KeyRecord>, String> {
    let count = key_count(r, payload_len, MIN_KEY_BYTES_V4)?;
    let mut keys = Vec::with_capacity(count.min(MAX_PREALLOCATED_ITEMS));
    for _ in 0..count {
        let key: std::sync::Arc<str> = r.string()?.into();
        let ts_us = Micros::from_micros(r.i64()?);
        let seq = r.u64()?;
        let allocation_id = AllocationId::from_u64(r.u64()?);
        let rejected = match r.u8()? {
            0 => None,
            code => Some(from_code(&REJECT_CODES, code - 1, "rejection reason")?),
        };
        keys.push(KeyRecord { key, ts_us, seq, allocation_id, rejected, fingerprint: r.u64()? });
    }
    Ok(keys)
}

/// LEB128: seven bits a byte, low first; the high bit says another byte follows.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A signed delta as an unsigned one with small magnitudes small (protobuf's zigzag).
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Loads the snapshot at `path` (named for `expected_seq`), reading a v3 file in chunks so
/// that its bytes and the state built from them are never in memory together. The checksum is
/// checked before the state is returned; for a damaged file it is the error reported.
pub fn load(storage: &dyn Storage, path: &Path, expected_seq: u64) -> Result<(State, Option<LogPosition>), String> {
    load_chunked(storage, path, expected_seq, CHUNK_BYTES)
}

pub(crate) fn load_chunked(
    storage: &dyn Storage,
    path: &Path,
    expected_seq: u64,
    chunk_bytes: usize,
) -> Result<(State, Option<LogPosition>), String> {
    let file_len = storage.file_len(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let raw = storage.read_range(path, 0, HEADER_LEN).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let header = match SnapshotHeader::decode(&raw) {
        Ok(header) if (BINARY_PAYLOAD_VERSION..=FORMAT_VERSION).contains(&header.version) => header,
        _ => {
            // Short, not a snapshot, or an older version: the whole-file path says which.
            let bytes = storage.read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            return decode_with_position(&bytes, expected_seq);
        }
    };
    let (seq, len) = (header.seq, header.payload_len);
    let held = file_len.saturating_sub(HEADER_LEN as u64);
    if len != held {
        return Err(format!("snapshot payload should be {len} bytes, file holds {held}"));
    }
    let crc = header.checksum_start();
    let mut r = ChunkReader {
        storage,
        path,
        chunk_bytes: chunk_bytes.max(1),
        file_len,
        buf_offset: HEADER_LEN as u64,
        buf: Vec::new(),
        pos: 0,
        payload_base: 0,
        crc,
    };
    let decoded = usize::try_from(len)
        .map_err(|_| "snapshot payload length overflows".to_string())
        .and_then(|payload_len| decode_v3(&mut r, payload_len, seq, header.version))
        .and_then(|loaded| if r.at_end() { Ok(loaded) } else { Err("bytes follow the last allocation".into()) });
    if r.finish_crc()? != header.crc {
        return Err("snapshot checksum mismatch".into());
    }
    header.named_seq(expected_seq)?;
    decoded
}

// ----- the binary allocation layout (all integers little-endian) -----
//
// id u64 | job_id str | priority u8 | state u8 | flags u8 (1: ended_us, 2: ended_seq, 4: error)
// | ttl_seconds u64 | created_us i64 | deadline_us i64 | [ended_us i64] | [ended_seq u64]
// | resources: cpu_millicores u64, memory_mib u64, workers u32
// | workers: count u32, each: slot u32, worker_id str, endpoint str, cpu_millicores u64, memory_mib u64
// | mcp_servers: count u32, each: name str, endpoint str, cpu_millicores u64, memory_mib u64,
//   flags u8 (1: assigned, 2: started)
// | metadata str (compact JSON object, empty for none) | [error str]
// | [max_lifetime_seconds u64 (flag 8, v4)] | [renewals u32 (flag 16, v4)] | [tenant str (flag 32, v4)]
//
// str = len u32 + UTF-8 bytes.

const FLAG_ENDED_US: u8 = 1;
const FLAG_ENDED_SEQ: u8 = 2;
const FLAG_ERROR: u8 = 4;
/// Version 4 only: the allocation has a lifetime bound; it was renewed.
const FLAG_MAX_LIFETIME: u8 = 8;
const FLAG_RENEWALS: u8 = 16;
/// Version 4 only: the allocation counts against a tenant's quota.
const FLAG_TENANT: u8 = 32;
/// Version 6 only: the allocation asked not to be preempted.
const FLAG_NOT_PREEMPTIBLE: u8 = 64;
/// Version 6 only: a preemption marks it (preemptor id u64, grace deadline i64 follow).
const FLAG_PREEMPT: u8 = 128;
/// MCP server flags: this grant gave the name its endpoint; no other allocation was using it.
const MCP_FLAG_ASSIGNED: u8 = 1;
const MCP_FLAG_STARTED: u8 = 2;

/// The fewest bytes an allocation takes: every fixed field, and each string and list empty.
const MIN_ALLOCATION_BYTES: usize = size_of::<u64>() // id
    + STR_LEN_BYTES // job_id
    + 3 * size_of::<u8>() // priority, state, flags
    + size_of::<u64>() + 2 * size_of::<i64>() // ttl_seconds, created_us, deadline_us
    + 2 * size_of::<u64>() + size_of::<u32>() // resources
    + 2 * size_of::<u32>() // worker and MCP server counts
    + STR_LEN_BYTES; // metadata
/// Bytes of a string's length prefix.
const STR_LEN_BYTES: usize = size_of::<u32>();
/// The bound on a payload's allocation count: each allocation takes at least this many
/// bytes, so a count beyond `payload_len / this` is damage. Below the true minimum, so it
/// never refuses a real snapshot.
const MIN_ALLOCATION_BOUND_BYTES: usize = 60;
const _: () = assert!(MIN_ALLOCATION_BOUND_BYTES <= MIN_ALLOCATION_BYTES);

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(u32::try_from(s.len()).is_ok(), "a string of {} bytes", s.len());
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// On-disk codes: the index in these tables. Never reorder them; only append.
const PRIORITY_CODES: [Priority; 4] = [Priority::Low, Priority::Normal, Priority::High, Priority::Critical];
const STATE_CODES: [AllocationState; 8] = [
    AllocationState::Active,
    AllocationState::Released,
    AllocationState::Expired,
    AllocationState::Failed,
    AllocationState::Pending,
    AllocationState::Cancelled,
    AllocationState::Preempting,
    AllocationState::Preempted,
];

/// A priority's on-disk code: its index in [`PRIORITY_CODES`] (a test holds the two together).
fn priority_code(priority: Priority) -> u8 {
    match priority {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

/// A state's on-disk code: its index in [`STATE_CODES`] (a test holds the two together).
fn state_code(state: AllocationState) -> u8 {
    match state {
        AllocationState::Active => 0,
        AllocationState::Released => 1,
        AllocationState::Expired => 2,
        AllocationState::Failed => 3,
        AllocationState::Pending => 4,
        AllocationState::Cancelled => 5,
        AllocationState::Preempting => 6,
        AllocationState::Preempted => 7,
    }
}

fn from_code<T: Copy>(table: &[T], code: u8, what: &str) -> Result<T, String> {
    table
        .get(usize::from(code))
        .copied()
        .ok_or_else(|| format!("{what} code {code} (allowed: 0 to {})", table.len() - 1))
}

fn put_allocation(out: &mut Vec<u8>, a: &Allocation) {
    out.extend_from_slice(&a.id.as_u64().to_le_bytes());
    put_str(out, &a.job_id);
    out.push(priority_code(a.priority));
    out.push(state_code(a.state));
    let flags = if a.ended_us.is_some() { FLAG_ENDED_US } else { 0 }
        | if a.ended_seq.is_some() { FLAG_ENDED_SEQ } else { 0 }
        | if a.error.is_some() { FLAG_ERROR } else { 0 }
        | if a.max_lifetime_seconds.is_some() { FLAG_MAX_LIFETIME } else { 0 }
        | if a.renewals > 0 { FLAG_RENEWALS } else { 0 }
        | if a.tenant.is_some() { FLAG_TENANT } else { 0 }
        | if a.preemptible { 0 } else { FLAG_NOT_PREEMPTIBLE }
        | if a.preempt.is_some() { FLAG_PREEMPT } else { 0 };
    out.push(flags);
    out.extend_from_slice(&a.ttl_seconds.to_le_bytes());
    out.extend_from_slice(&a.created_us.as_micros().to_le_bytes());
    out.extend_from_slice(&a.deadline_us.as_micros().to_le_bytes());
    if let Some(t) = a.ended_us {
        out.extend_from_slice(&t.as_micros().to_le_bytes());
    }
    if let Some(s) = a.ended_seq {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(&a.resources.cpu_millicores.to_le_bytes());
    out.extend_from_slice(&a.resources.memory_mib.to_le_bytes());
    out.extend_from_slice(&a.resources.workers.to_le_bytes());
    out.extend_from_slice(&(a.workers.len() as u32).to_le_bytes());
    for w in &a.workers {
        out.extend_from_slice(&w.slot.to_le_bytes());
        put_str(out, &w.worker_id);
        put_str(out, &w.endpoint);
        out.extend_from_slice(&w.cpu_millicores.to_le_bytes());
        out.extend_from_slice(&w.memory_mib.to_le_bytes());
    }
    out.extend_from_slice(&(a.mcp_servers.len() as u32).to_le_bytes());
    for m in &a.mcp_servers {
        put_str(out, &m.name);
        put_str(out, &m.endpoint);
        out.extend_from_slice(&m.cpu_millicores.to_le_bytes());
        out.extend_from_slice(&m.memory_mib.to_le_bytes());
        out.push(if m.assigned { MCP_FLAG_ASSIGNED } else { 0 } | if m.started { MCP_FLAG_STARTED } else { 0 });
    }
    put_str(out, if a.metadata.is_empty() { "" } else { a.metadata.as_json() });
    if let Some(e) = &a.error {
        put_str(out, e);
    }
    if let Some(m) = a.max_lifetime_seconds {
        out.extend_from_slice(&m.to_le_bytes());
    }
    if a.renewals > 0 {
        out.extend_from_slice(&a.renewals.to_le_bytes());
    }
    if let Some(t) = &a.tenant {
        put_str(out, t);
    }
    if let Some(m) = a.preempt {
        out.extend_from_slice(&m.by.as_u64().to_le_bytes());
        out.extend_from_slice(&m.deadline_us.as_micros().to_le_bytes());
    }
}

/// Where the decoder reads from: a whole payload in memory, or a file read in chunks.
trait Source {
    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&[u8], String>;
    /// Payload bytes consumed so far.
    fn at(&self) -> usize;

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        self.take(N)?.first_chunk::<N>().copied().ok_or_else(|| "truncated".to_string())
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|e| format!("invalid UTF-8: {e}"))
    }
    /// A LEB128 varint of at most ten bytes.
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than ten bytes".into())
    }
    fn count(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u32()?;
        if n > MAX_LIST_ITEMS {
            return Err(format!("{n} {what} is beyond the limit of {MAX_LIST_ITEMS}"));
        }
        Ok(n as usize)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Source for Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn at(&self) -> usize {
        self.at
    }
}

/// Bytes read from a snapshot file at a time.
const CHUNK_BYTES: usize = 1 << 20;

/// A snapshot file's payload read in chunks, checksummed as it goes, so loading never holds
/// the whole file in memory next to the state it is building.
struct ChunkReader<'a> {
    storage: &'a dyn Storage,
    path: &'a Path,
    chunk_bytes: usize,
    file_len: u64,
    /// File offset of `buf[0]`.
    buf_offset: u64,
    buf: Vec<u8>,
    pos: usize,
    /// Payload offset of `buf[0]`.
    payload_base: usize,
    crc: crc32fast::Hasher,
}

impl ChunkReader<'_> {
    /// Reads more of the file so that at least `n` unread bytes are buffered.
    fn fill(&mut self, n: usize) -> Result<(), String> {
        let unread = self.buf.len() - self.pos;
        if unread >= n {
            return Ok(());
        }
        let next = self.buf_offset + self.buf.len() as u64;
        let want = (n - unread).max(self.chunk_bytes) as u64;
        let want = want.min(self.file_len.saturating_sub(next));
        if (unread as u64) + want < n as u64 {
            return Err("truncated".into());
        }
        let chunk = self
            .storage
            .read_range(self.path, next, want as usize)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        if chunk.len() as u64 != want {
            return Err(format!("{} changed while it was read", self.path.display()));
        }
        self.crc.update(&chunk);
        self.buf.drain(..self.pos);
        self.buf_offset += self.pos as u64;
        self.payload_base += self.pos;
        self.pos = 0;
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }

    /// Reads (and checksums) whatever is left of the file.
    fn finish_crc(mut self) -> Result<u32, String> {
        loop {
            let next = self.buf_offset + self.buf.len() as u64;
            if next >= self.file_len {
                return Ok(self.crc.finalize());
            }
            self.pos = self.buf.len();
            self.fill(1)?;
        }
    }

    fn at_end(&self) -> bool {
        self.buf_offset + self.pos as u64 == self.file_len
    }
}

impl Source for ChunkReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        self.fill(n)?;
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn at(&self) -> usize {
        self.payload_base + self.pos
    }
}

fn get_allocation(r: &mut impl Source) -> Result<Allocation, String> {
    let id = r.u64()?;
    if id > AllocationId::MAX {
        return Err(format!("allocation id {id:#x} is beyond 48 bits"));
    }
    let id = AllocationId::from_u64(id);
    let job_id = r.string()?;
    let priority = from_code(&PRIORITY_CODES, r.u8()?, "priority")?;
    let state = from_code(&STATE_CODES, r.u8()?, "state")?;
    let flags = r.u8()?;
    let known = FLAG_ENDED_US
        | FLAG_ENDED_SEQ
        | FLAG_ERROR
        | FLAG_MAX_LIFETIME
        | FLAG_RENEWALS
        | FLAG_TENANT
        | FLAG_NOT_PREEMPTIBLE
        | FLAG_PREEMPT;
    if flags & !known != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let ttl_seconds = r.u64()?;
    let created_us = Micros::from_micros(r.i64()?);
    let deadline_us = Micros::from_micros(r.i64()?);
    let ended_us = if flags & FLAG_ENDED_US != 0 { Some(Micros::from_micros(r.i64()?)) } else { None };
    let ended_seq = if flags & FLAG_ENDED_SEQ != 0 { Some(r.u64()?) } else { None };
    let resources = Resources { cpu_millicores: r.u64()?, memory_mib: r.u64()?, workers: r.u32()? };
    let workers = get_workers(r)?;
    let mcp_servers = get_mcp_servers(r)?;
    let text = r.string()?;
    let metadata = if text.is_empty() { Metadata::default() } else { Metadata::from_json_text(text)? };
    let error = if flags & FLAG_ERROR != 0 { Some(r.string()?) } else { None };
    let max_lifetime_seconds = if flags & FLAG_MAX_LIFETIME != 0 { Some(r.u64()?) } else { None };
    let renewals = if flags & FLAG_RENEWALS != 0 { r.u32()? } else { 0 };
    let tenant = if flags & FLAG_TENANT != 0 { Some(r.string()?) } else { None };
    let preempt = if flags & FLAG_PREEMPT != 0 {
        let by = r.u64()?;
        if by > AllocationId::MAX {
            return Err(format!("preemptor id {by:#x} is beyond 48 bits"));
        }
        let deadline_us = Micros::from_micros(r.i64()?);
        Some(crate::domain::preempt::PreemptMark { by: AllocationId::from_u64(by), deadline_us })
    } else {
        None
    };
    Ok(Allocation {
        id,
        job_id,
        priority,
        state,
        ttl_seconds,
        created_us,
        deadline_us,
        ended_us,
        ended_seq,
        workers,
        mcp_servers,
        resources,
        metadata,
        error,
        max_lifetime_seconds,
        renewals,
        tenant,
        preemptible: flags & FLAG_NOT_PREEMPTIBLE == 0,
        preempt,
    })
}

/// An allocation's worker list (`put_allocation`'s layout).
fn get_workers(r: &mut impl Source) -> Result<Vec<WorkerGrant>, String> {
    let n = r.count("workers")?;
    let mut workers = Vec::with_capacity(n.min(MAX_PREALLOCATED_ITEMS));
    for _ in 0..n {
        workers.push(WorkerGrant {
            slot: r.u32()?,
            worker_id: r.string()?,
            endpoint: r.string()?,
            cpu_millicores: r.u64()?,
            memory_mib: r.u64()?,
        });
    }
    Ok(workers)
}

/// An allocation's MCP server list (`put_allocation`'s layout).
fn get_mcp_servers(r: &mut impl Source) -> Result<Vec<McpGrant>, String> {
    let n = r.count("MCP servers")?;
    let mut mcp_servers = Vec::with_capacity(n.min(MAX_PREALLOCATED_ITEMS));
    for _ in 0..n {
        let name = r.string()?;
        let endpoint = r.string()?;
        let (cpu_millicores, memory_mib) = (r.u64()?, r.u64()?);
        let f = r.u8()?;
        if f & !(MCP_FLAG_ASSIGNED | MCP_FLAG_STARTED) != 0 {
            return Err(format!("unknown MCP server flags {f:#x}"));
        }
        mcp_servers.push(McpGrant {
            name,
            endpoint,
            cpu_millicores,
            memory_mib,
            assigned: f & MCP_FLAG_ASSIGNED != 0,
            started: f & MCP_FLAG_STARTED != 0,
        });
    }
    Ok(mcp_servers)
}

/// Writes an encoded snapshot of the state at `seq` atomically.
pub fn write_encoded(storage: &dyn Storage, dir: &Path, seq: u64, bytes: &[u8]) -> std::io::Result<PathBuf> {
    storage.create_dir_all(dir)?;
    let path = dir.join(file_name(seq));
    write_atomic(storage, &path, bytes)?;
    Ok(path)
}

/// Snapshot files in `dir`, newest first.
pub fn list(storage: &dyn Storage, dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> =
        storage.list(dir)?.into_iter().filter_map(|n| parse_file_name(&n).map(|s| (s, dir.join(n)))).collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::config::Config;

    #[test]
    fn header_round_trips_and_refuses_short_input() {
        let h = SnapshotHeader::sealed(FORMAT_VERSION, 40000, b"payload");
        let raw = h.encode();
        assert_eq!(SnapshotHeader::decode(&raw), Ok(h));
        let mut crc = h.checksum_start();
        crc.update(b"payload");
        assert_eq!(crc.finalize(), h.crc);
        assert_eq!(
            SnapshotHeader::decode(&raw[..HEADER_LEN - 1]),
            Err("snapshot is 39 bytes, shorter than its header".into())
        );
    }

    #[test]
    fn codes_are_the_table_indexes() {
        for (code, p) in PRIORITY_CODES.into_iter().enumerate() {
            assert_eq!(usize::from(priority_code(p)), code);
        }
        for (code, s) in STATE_CODES.into_iter().enumerate() {
            assert_eq!(usize::from(state_code(s)), code);
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let s = State::empty(Config::default());
        let bytes = encode(&s.to_data());
        assert_eq!(decode(&bytes, 0).unwrap(), s);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b, 0).is_err(), "byte {i}");
        }
        assert!(decode(&bytes[..bytes.len() - 1], 0).is_err());
    }

    fn key_record(ledger_key: u64, k: (String, i64, u64, bool, u8, u64)) -> KeyRecord {
        let (key, ts, seq, implied, code, fingerprint) = k;
        let seq = seq % AllocationId::MAX;
        let allocation_id =
            if implied { AllocationId::for_seq(ledger_key, seq) } else { AllocationId::from_u64(fingerprint >> 16) };
        let rejected = (code > 0).then(|| REJECT_CODES[usize::from(code - 1) % REJECT_CODES.len()]);
        KeyRecord { key: key.into(), ts_us: Micros::from_micros(ts), seq, allocation_id, rejected, fingerprint }
    }

    /// A key: printable ASCII, a canonical UUID (stored as 16 bytes), or one in upper case or
    /// almost canonical (stored as text).
    fn any_key() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[ -~]{0,40}",
            any::<u128>().prop_map(|u| uuid::Uuid::from_u128(u).to_string()),
            any::<u128>().prop_map(|u| uuid::Uuid::from_u128(u).to_string().to_uppercase()),
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-fA-G]{4}-[0-9a-f]{4}[-_][0-9a-f]{12}",
        ]
    }

    proptest::proptest! {
        /// Compact key records read back exactly, whatever the order of their timestamps and
        /// sequence numbers, whether or not their ids are the ones their seqs give, and whether
        /// or not the keys are canonical UUIDs; every truncation is an error, never a shorter
        /// table.
        #[test]
        fn key_records_round_trip(
            ledger_key in proptest::prelude::any::<u64>(),
            raw in proptest::collection::vec(
                (any_key(), proptest::prelude::any::<i64>(), proptest::prelude::any::<u64>(),
                 proptest::prelude::any::<bool>(), 0u8..8, proptest::prelude::any::<u64>()),
                0..20,
            ),
        ) {
            let keys: Vec<KeyRecord> = raw.into_iter().map(|k| key_record(ledger_key, k)).collect();
            let mut out = Vec::new();
            put_keys(&mut out, ledger_key, keys.iter().map(KeyRecord::view));
            let mut r = Reader { bytes: &out, at: 0 };
            proptest::prop_assert_eq!(&get_keys(&mut r, out.len(), ledger_key, FORMAT_VERSION).unwrap(), &keys);
            proptest::prop_assert_eq!(r.at, out.len());
            for cut in 0..out.len() {
                let mut r = Reader { bytes: &out[..cut], at: 0 };
                proptest::prop_assert!(
                    get_keys(&mut r, out.len(), ledger_key, FORMAT_VERSION).is_err(), "cut at {}", cut
                );
            }
        }

        /// Only a canonical UUID is stored as bytes, and it reads back as the same text.
        #[test]
        fn only_canonical_uuids_are_stored_as_bytes(key in any_key()) {
            match canonical_uuid(&key) {
                Some(bytes) => proptest::prop_assert_eq!(&*uuid_key(bytes), key.as_str()),
                None => proptest::prop_assert!(uuid::Uuid::try_parse(&key).map_or(true, |u| u.to_string() != key)),
            }
        }
    }

    /// Keys encoded chunk by chunk, reusing the last snapshot's encodings, give the bytes of a
    /// fresh encoding as keys arrive, leave the window (part of a chunk, then whole chunks) and
    /// are decided again (which marks a slot of a whole, cached chunk: copied on write); and
    /// the whole chunks are reused.
    #[test]
    fn cached_key_chunks_match_a_fresh_encoding() {
        use crate::domain::idempotency::KeyTable;
        let ledger_key = AllocationId::ledger_key("ledger");
        let ts = |seq: u64| Micros::from_micros(1_700_000_000_000_000 + seq as i64 * 1_000);
        let record = |seq: u64, key: String| {
            // Every seventh with an id its seq does not imply, every fifth rejected.
            let id = if seq.is_multiple_of(7) {
                AllocationId::from_u64(seq)
            } else {
                AllocationId::for_seq(ledger_key, seq)
            };
            let rejected = seq.is_multiple_of(5).then_some(RejectReason::InsufficientWorkers);
            KeyRecord { key: key.into(), ts_us: ts(seq), seq, allocation_id: id, rejected, fingerprint: seq }
        };
        let key_of = |n: u64| {
            if n.is_multiple_of(2) {
                uuid::Uuid::from_u128(u128::from(n)).to_string()
            } else {
                format!("key-{n}")
            }
        };
        let (mut table, mut cache, mut seq) = (KeyTable::default(), Vec::new(), 0u64);
        for round in 0..7 {
            for _ in 0..1500 {
                seq += 1;
                table.insert(record(seq, key_of(seq)));
            }
            match round {
                // Decided again: key 1101 sits in the second chunk, cached whole since round 1.
                2 => {
                    seq += 1;
                    table.insert(record(seq, key_of(1101)));
                }
                // The last key of chunk 1 decided again: chunk 2 now follows another key.
                // And part of the first chunk leaves the window (whole chunks later).
                3 => {
                    seq += 1;
                    table.insert(record(seq, key_of(2048)));
                    table.forget_older(ts(300 + 1_000), 1);
                }
                4.. => table.forget_older(ts(seq - 3_500 + 1_000), 1),
                _ => {}
            }
            let shared = table.shared();
            let mut fresh = Vec::new();
            put_keys(&mut fresh, ledger_key, shared.views());
            let (mut cached, mut next) = (Vec::new(), Vec::new());
            let reused = put_keys_cached(&mut cached, ledger_key, &shared, std::mem::take(&mut cache), &mut next);
            assert_eq!(cached, fresh, "round {round}");
            let whole = shared.chunks().filter(crate::domain::idempotency::KeyChunk::is_whole).count();
            assert_eq!(next.len(), whole, "round {round}: every whole chunk is kept");
            match round {
                0 => assert_eq!(reused, 0),
                // Chunk 0, whole at round 0.
                1 => assert_eq!(reused, 1),
                // Chunks 0 and 1 were whole at round 1; chunk 1 was copied on write.
                2 => assert_eq!((reused, whole), (1, 4)),
                // Chunks 1 (copied on write) and 2 (after another key) are encoded again.
                3 => assert_eq!((reused, whole), (1, 4)),
                _ => assert!(reused > 0, "round {round}: nothing reused"),
            }
            cache = next;
        }
    }

    #[test]
    fn a_typical_key_record_is_compact() {
        let ledger_key = AllocationId::ledger_key("ledger");
        let keys: Vec<KeyRecord> = (1..=1000u64)
            .map(|seq| {
                let key = format!("{:038}", seq);
                key_record(ledger_key, (key, 1_700_000_000_000_000 + seq as i64 * 250, seq * 2, true, 0, seq))
            })
            .collect();
        let mut out = Vec::new();
        put_keys(&mut out, ledger_key, keys.iter().map(KeyRecord::view));
        // 38 key bytes + 1 length + 2 (ts delta 250 µs) + 1 (seq delta) + 1 flags + 8 fingerprint.
        assert!(out.len() <= 8 + 1000 * 52, "{} bytes", out.len());
        // The same with UUID keys: 16 bytes each, no length.
        let uuids: Vec<KeyRecord> = keys
            .iter()
            .map(|k| KeyRecord { key: uuid::Uuid::from_u128(u128::from(k.seq)).to_string().into(), ..k.clone() })
            .collect();
        let mut out = Vec::new();
        put_keys(&mut out, ledger_key, uuids.iter().map(KeyRecord::view));
        assert!(out.len() <= 8 + 1000 * 29, "{} bytes", out.len());
    }

    /// A version 6 key record (flags after the deltas, every key as text) still reads, and its
    /// flags' bit 6 is part of the rejection code there, not the UUID mark.
    #[test]
    fn version_6_key_records_still_read() {
        let ledger_key = AllocationId::ledger_key("ledger");
        let key = uuid::Uuid::from_u128(7).to_string();
        let mut out = 1u64.to_le_bytes().to_vec();
        put_varint(&mut out, key.len() as u64);
        out.extend_from_slice(key.as_bytes());
        put_varint(&mut out, zigzag(1_000));
        put_varint(&mut out, zigzag(5));
        out.push(KEY_ID_FROM_SEQ | 2);
        out.extend_from_slice(&9u64.to_le_bytes());
        let mut r = Reader { bytes: &out, at: 0 };
        let keys = get_keys(&mut r, out.len(), ledger_key, 6).unwrap();
        let expected = KeyRecord {
            key: key.into(),
            ts_us: Micros::from_micros(1_000),
            seq: 5,
            allocation_id: AllocationId::for_seq(ledger_key, 5),
            rejected: Some(REJECT_CODES[1]),
            fingerprint: 9,
        };
        assert_eq!(keys, [expected]);
        let flags_at = out.len() - 9;
        out[flags_at] |= KEY_IS_UUID;
        let mut r = Reader { bytes: &out, at: 0 };
        let err = get_keys(&mut r, out.len(), ledger_key, 6).unwrap_err();
        assert!(err.contains("rejection reason"), "{err}");
    }
}
